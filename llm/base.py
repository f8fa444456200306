"""The interface every language-model backend implements, and what it returns.

A prompt is a ``str`` (plain completion) or a list of ``{"role", "content"}`` messages (chat). ``prefill`` is
text that opens the assistant turn after the rendered prompt (ICRL appends the bare prediction prefix
``Intent:``). ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible. With ``choices``, the
answer is one of them: :class:`llm.local.LocalBackend` constrains decoding to them, and
:class:`llm.openai_api.OpenAIBackend` parses the free answer with :func:`parse_choice` (``choice=None`` when
nothing matches, counted in ``usage.unparsed_choices``; callers score it as wrong).

Per-token output, for backends with ``token_level`` (the local one): ``top_logprobs=k`` fills each Generation's
``token_ids``, ``token_logprobs`` and ``top_logprobs`` (the k most likely tokens at each step, k may be 0), and
``on_token(index, token_id, logprob, top)`` is called as each token of prompt ``index`` is decoded (streaming).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from experiment_args import UsageError

Prompt = str | list[dict]


class BackendError(UsageError):
    """An API request failed for good (a 4xx, or retries exhausted); printed as one line by ``cli``."""


@dataclass
class Generation:
    """One completion of one prompt."""

    text: str  # generated text (for constrained choice: exactly the chosen string)
    choice: int | None = None  # index into `choices` when choices were given; None if unparseable (API fallback)
    logprob: float | None = None  # sum of token log-probs of the generated text where the backend gives them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # served from the on-disk cache
    finish_reason: str = "stop"  # "stop" (end token, stop string or a complete choice) or "length" (max_tokens)
    # With top_logprobs=k: every generated token (end token included), its log-prob (the same as in `logprob`),
    # and the k most likely (token id, log-prob) pairs at its step, most likely first.
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Usage:
    """Running totals of a backend, for run summaries. Cached responses add to ``cache_hits`` only."""

    requests: int = 0  # local: prompts generated; API: HTTP requests sent, retried ones included
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0
    unparsed_choices: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Backend:
    """``generate(prompts) -> [Generation]`` in input order; subclasses fill in ``_generate``."""

    name: str = "backend"
    token_level: bool = False  # gives per-token log-probs (top_logprobs) and calls on_token while decoding

    def __init__(self) -> None:
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    def _count(self, **amounts) -> None:
        with self._usage_lock:
            for key, amount in amounts.items():
                setattr(self.usage, key, getattr(self.usage, key) + amount)

    def generate(
        self,
        prompts: list[Prompt],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        choices: list[str] | None = None,
        seed: int | list[int] | None = None,
        prefill: str = "",
        top_logprobs: int | None = None,
        on_token: Callable[[int, int, float, list[tuple[int, float]] | None], None] | None = None,
    ) -> list[Generation]:
        """One Generation per prompt, in order. With ``choices``, ``max_tokens`` and ``stop`` do not apply
        locally (decoding runs until a choice is complete); the API backend sends them and parses the answer.
        ``seed`` may be a list, one per prompt (the API backend sends each its own; the local one takes one).
        ``top_logprobs`` and ``on_token`` need a ``token_level`` backend (see the module docstring)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        if choices is not None and (not choices or any(not c.strip() for c in choices)):
            raise ValueError("choices must be a non-empty list of non-blank strings")
        for prompt in prompts:
            if not isinstance(prompt, str) and not (
                isinstance(prompt, list)
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
            ):
                raise ValueError("each prompt must be a str or a list of {role, content} messages")
        if isinstance(seed, list) and len(seed) != len(prompts):
            raise ValueError(f"got {len(seed)} seeds for {len(prompts)} prompts")
        extra = {}
        if top_logprobs is not None or on_token is not None:
            if not self.token_level:
                raise ValueError(f"the {self.name} backend gives no per-token log-probs")
            if top_logprobs is not None and top_logprobs < 0:
                raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
            extra = {"top_logprobs": top_logprobs, "on_token": on_token}
        if not prompts:
            return []
        return self._generate(
            list(prompts),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop) if stop else None,
            choices=list(choices) if choices is not None else None,
            seed=seed,
            prefill=prefill,
            **extra,
        )

    def _generate(self, prompts: list[Prompt], **kwargs) -> list[Generation]:
        raise NotImplementedError


def parse_choice(text: str, choices: list[str], prefill: str = "") -> int | None:
    """The choice an API answer names: exact (then case-insensitive) match, else the longest one it contains.

    A repeated ``prefill`` (``Intent: card arrival``) is dropped first. Equally long contained choices go to the
    one that appears first in the text. None when no choice is found.
    """
    answer = text.strip()
    if prefill.strip() and answer.lower().startswith(prefill.strip().lower()):
        answer = answer[len(prefill.strip()) :].strip()
    for same in (str.__eq__, lambda a, b: a.lower() == b.lower()):
        for i, choice in enumerate(choices):
            if same(answer, choice.strip()):
                return i
    lowered = answer.lower()
    found = [(-len(c.strip()), lowered.find(c.strip().lower()), i) for i, c in enumerate(choices)]
    found = [f for f in found if f[1] >= 0]
    return min(found)[2] if found else None
