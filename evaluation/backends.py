"""One small interface to a language model for every in-context method: a local HF model or an OpenAI-compatible API.

    backend = make_backend(BackendArguments(backend="local", model="smollm2-135m"))
    gens = backend.generate(prompts, max_tokens=32, temperature=1.0, seed=7, choices=labels, prefill="Intent:")

A prompt is a ``str`` (plain completion) or a list of ``{"role", "content"}`` messages (chat). ``prefill`` is
text that opens the assistant turn after the rendered prompt (ICRL appends the bare prediction prefix
``Intent:``). ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible.

Constrained choice (``choices`` given), as in Monea et al.'s ICRL (see ../shared/reference/icrl_baselines.md A.4):

- :class:`LocalBackend` decodes over a token trie of ``" " + choice`` followed by the end token (the chat
  end-of-turn token for chat prompts, else EOS): each step keeps only the tokens that continue some choice,
  so the output is always one of the strings and sampling at T=1 is the method's exploration. Greedy is
  token by token (the argmax of the first token, then of the next...), not the argmax of whole-sequence
  log-probs. ``logprob`` is the model's own sequence log-prob of the chosen string (unmasked log-softmax
  at temperature 1, end token included), so it is comparable across choices and runs.
- :class:`OpenAIBackend` cannot mask a remote model's logits, so it sends the request as is and parses the
  answer (:func:`parse_choice`): an exact match after stripping (then case-insensitive), else the longest
  choice contained in the text, else ``choice=None`` (counted in ``usage.unparsed_choices``). Callers score
  None as a wrong answer.

The local backend reuses the KV cache of a long token prefix shared by the prompts of one call (ICRL scores
500 test queries against one context) and keeps a small LRU of such prefixes across calls (Approximate
ICRL's contexts are append-only, so the next step's prompt extends a cached prefix). The API backend caches
every response on disk keyed by the full request, so re-runs and resumed runs cost nothing, retries rate
limits, server errors, timeouts and dropped connections with exponential backoff and jitter, and never
writes the API key anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiment_args import ModelArguments, UsageError, atomic_write_text

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
        seed: int | None = None,
        prefill: str = "",
    ) -> list[Generation]:
        """One Generation per prompt, in order. With ``choices``, ``max_tokens`` and ``stop`` do not apply
        locally (decoding runs until a choice is complete); the API backend sends them and parses the answer."""
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


# ---------------------------------------------------------------------------------------------------
# 1. a local HF model: chat rendering, the choice trie, batched decoding with a shared-prefix KV cache
# ---------------------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt: Prompt, prefill: str = "") -> str:
    """The text the model continues: a str as is; messages through the chat template, then ``prefill``.

    A tokenizer without a chat template gets a plain ``role: content`` line per message and ``assistant:``.
    """
    if isinstance(prompt, str):
        return prompt + prefill
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
    return text + prefill


def end_of_turn_id(tokenizer) -> int:
    """The special token that closes an assistant turn in the chat template (``<|im_end|>``...), else EOS."""
    marker = "\u2603choice\u2603"
    if getattr(tokenizer, "chat_template", None):
        try:
            conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            if after and after[0] in tokenizer.all_special_ids:
                return after[0]
        except Exception:  # a template that rejects this conversation: fall back to EOS
            pass
    return tokenizer.eos_token_id


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    choice: int | None = None  # set on the node after a choice's last token


def build_choice_trie(sequences: list[list[int]]) -> _TrieNode:
    """A trie over token id sequences; the node after sequence i's last token has ``choice == i``.

    Duplicated sequences keep the first index. Every sequence ends in the end token, so no choice is a
    proper prefix of another and decoding stops exactly when a node with a choice is reached.
    """
    root = _TrieNode()
    for i, seq in enumerate(sequences):
        node = root
        for token in seq:
            node = node.children.setdefault(token, _TrieNode())
        if node.choice is None:
            node.choice = i
    return root


def _pick(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from scores (B, V): argmax at T=0, else a sample at ``temperature`` within ``top_p``."""
    if temperature == 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(row) for row in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


class LocalBackend(Backend):
    """A local HF causal LM (a built-in name, a folder, optionally a LoRA or full fine-tuned ``adapter``).

    Prompts are decoded in batches of ``batch_size``. When the prompts of one call share at least
    ``prefix_min_tokens`` leading tokens, the prefix is run once and its KV cache is copied into every batch;
    the last ``prefix_cache_size`` prefixes are kept across calls, and a new prefix only runs the tokens after
    the longest part it shares with a kept one. ``reuse_prefix = False`` turns this off (the results are the
    same up to float rounding; a test checks it). ``logprob`` is the sum of the model's log-probs (temperature
    1, no mask) of every generated token, the end token included; stop strings cut the text, not the sum.
    """

    name = "local"

    def __init__(
        self,
        model_name_or_path: str,
        adapter: str | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
        device: str = "auto",
        prefix_min_tokens: int = 16,
        prefix_cache_size: int = 4,
        reuse_prefix: bool = True,
    ) -> None:
        from training.models import _accepts_logits_to_keep, load_model, load_tokenizer, max_positions

        super().__init__()
        if batch_size < 1:
            raise UsageError("--batch_size must be >= 1")
        self.model_name = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path)
        # An adapter folder with adapter_config.json is LoRA on the base; any other folder is a whole model.
        use_peft = adapter is not None and os.path.isfile(os.path.join(adapter, "adapter_config.json"))
        args = ModelArguments(model_name_or_path=model_name_or_path, dtype=dtype, use_peft=use_peft)
        model = load_model(args, adapter_path=adapter, trainable=False)
        if use_peft:
            model = model.merge_and_unload()  # plain weights: faster decoding, same outputs
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.max_positions = max_positions(model)
        # Only the last position's logits are used: skip the (B, T, V) LM head over the whole prompt.
        self._keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self.batch_size = batch_size
        self.prefix_min_tokens = prefix_min_tokens
        self.prefix_cache_size = prefix_cache_size
        self.reuse_prefix = reuse_prefix
        self.prefix_tokens_computed = 0  # tokens run to build prefix caches
        self.prefix_tokens_reused = 0  # prompt tokens whose keys/values came from a prefix cache
        self._prefixes: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.pad_id = self.tokenizer.pad_token_id
        self.end_of_turn = end_of_turn_id(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._tries: dict[tuple, _TrieNode] = {}

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model_name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    # -- prompts -----------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, prefill: str = "") -> list[int]:
        """Token ids of the rendered prompt; a chat template's text already holds its special tokens."""
        text = render_prompt(self.tokenizer, prompt, prefill)
        return self.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]

    def _trie(self, choices: list[str], chat: bool) -> _TrieNode:
        end = self.end_of_turn if chat else self.tokenizer.eos_token_id
        key = (tuple(choices), end)
        if key not in self._tries:
            # The leading space: after a prefix like "Intent:" the label is a new word (ICRL's tokenisation).
            seqs = [self.tokenizer(" " + c, add_special_tokens=False)["input_ids"] + [end] for c in choices]
            if len(self._tries) >= 8:  # calls repeat one label set; a few are plenty
                self._tries.clear()
            self._tries[key] = build_choice_trie(seqs)
        return self._tries[key]

    # -- the model ---------------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,  # fine-tuned folders may say use_cache=False (a training setting)
            **self._keep_last,
        )
        return out.logits[:, -1, :].float(), out.past_key_values  # (B, V)

    def _prefix_cache(self, prefix: tuple[int, ...]):
        """The KV cache of ``prefix`` (batch 1): from the LRU, or built on the kept prefix sharing most of its tokens.

        A kept prefix that ``prefix`` extends (Approximate ICRL's append-only contexts) is reused whole; one that
        diverges is cropped to the shared part first, when all its layers are plain (croppable) DynamicLayers.
        """
        from transformers.cache_utils import DynamicLayer

        if prefix in self._prefixes:
            self._prefixes.move_to_end(prefix)
            return self._prefixes[prefix]
        base, shared = None, 0
        for key, kept in self._prefixes.items():
            n = _common_prefix_length([key, prefix])
            if n > shared and (n == len(key) or all(type(layer) is DynamicLayer for layer in kept.layers)):
                base, shared = key, n
        cache = None
        if base is not None:
            cache = copy.deepcopy(self._prefixes[base])
            if shared < len(base):
                cache.crop(shared - len(base))  # a negative count removes that many tokens from the end
        if shared < len(prefix):
            self.prefix_tokens_computed += len(prefix) - shared
            new = torch.tensor([prefix[shared:]], dtype=torch.long, device=self.device)  # (1, T)
            positions = torch.arange(shared, len(prefix), device=self.device)[None, :]  # (1, T)
            mask = torch.ones((1, len(prefix)), dtype=torch.long, device=self.device)
            _, cache = self._forward(new, mask, positions, cache)
        if self.prefix_cache_size > 0:
            self._prefixes[prefix] = cache
            while len(self._prefixes) > self.prefix_cache_size:
                self._prefixes.popitem(last=False)
        return cache

    @torch.no_grad()
    def _generate(self, prompts, *, max_tokens, temperature, top_p, stop, choices, seed, prefill):
        rows = [self.encode(p, prefill) for p in prompts]
        if any(not row for row in rows):
            raise ValueError("an empty prompt has nothing to continue")
        tries = [self._trie(choices, not isinstance(p, str)) for p in prompts] if choices else [None] * len(rows)
        if choices:  # a choice must be completed whatever max_tokens says
            max_tokens = max(_depth(trie) for trie in {id(t): t for t in tries}.values())
        if self.max_positions is not None and max(map(len, rows)) + max_tokens > self.max_positions:
            raise ValueError(
                f"a prompt of {max(map(len, rows))} tokens plus {max_tokens} new tokens exceeds the model's "
                f"{self.max_positions} positions; shorten the prompt or lower max_tokens"
            )
        # Every prompt keeps at least its last token out of the prefix: its logits start decoding.
        shared = _common_prefix_length(rows) if self.reuse_prefix else 0
        shared = min(shared, min(map(len, rows)) - 1)
        prefix_cache = self._prefix_cache(tuple(rows[0][:shared])) if shared >= self.prefix_min_tokens else None
        shared = shared if prefix_cache is not None else 0
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(rows), self.batch_size):
            batch = slice(start, start + self.batch_size)
            out += self._decode(
                rows[batch],
                tries[batch],
                shared,
                prefix_cache,
                max_tokens,
                temperature,
                top_p,
                stop,
                choices,
                generator,
            )
            if prefix_cache is not None:
                self.prefix_tokens_reused += shared * len(rows[batch])
        self._count(
            requests=len(out),
            prompt_tokens=sum(g.prompt_tokens for g in out),
            completion_tokens=sum(g.completion_tokens for g in out),
        )
        return out

    def _decode(self, rows, tries, shared, prefix_cache, max_tokens, temperature, top_p, stop, choices, generator):
        """Decode one batch: the suffixes after ``shared`` prefix tokens, left-padded, on a copy of its cache."""
        B, device = len(rows), self.device
        suffixes = [row[shared:] for row in rows]
        width = max(map(len, suffixes))
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=device)  # (B, T)
        attention_mask = torch.zeros((B, shared + width), dtype=torch.long, device=device)  # (B, P + T)
        attention_mask[:, :shared] = 1
        for b, suffix in enumerate(suffixes):
            input_ids[b, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long, device=device)
            attention_mask[b, shared + width - len(suffix) :] = 1
        # Positions count real tokens only, so a padded prompt sees the positions it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # (B, T)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
        logits, cache = self._forward(input_ids, attention_mask, position_ids, cache)

        nodes = list(tries)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs = [0.0] * B
        done = [False] * B
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # (B, V) the model's own log-probs, T=1
            scores = logits
            if choices:
                allowed = torch.full_like(logits, float("-inf"))  # (B, V) -inf off the trie
                for b, node in enumerate(nodes):
                    ids = list(node.children) if not done[b] else [self.pad_id]
                    allowed[b, ids] = 0.0
                scores = logits + allowed
            picked = _pick(scores, temperature, top_p, generator)  # (B,)
            picked_logp = logp.gather(1, picked[:, None]).squeeze(1).tolist()
            picked = picked.tolist()
            for b in range(B):
                if done[b]:
                    continue
                tokens[b].append(picked[b])
                logprobs[b] += picked_logp[b]
                if choices:
                    nodes[b] = nodes[b].children[picked[b]]
                    done[b] = nodes[b].choice is not None
                elif picked[b] in self.eos_ids or picked[b] == self.end_of_turn:
                    done[b] = True
                elif stop and any(s in self.tokenizer.decode(tokens[b], skip_special_tokens=True) for s in stop):
                    done[b] = True
            if all(done):
                break
            next_ids = torch.tensor([[t[-1] if not d else self.pad_id] for t, d in zip(tokens, done)], device=device)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            logits, cache = self._forward(next_ids, attention_mask, position_ids, cache)

        out = []
        for b in range(B):
            common = {"logprob": logprobs[b], "prompt_tokens": len(rows[b]), "completion_tokens": len(tokens[b])}
            if choices:
                out.append(Generation(text=choices[nodes[b].choice], choice=nodes[b].choice, **common))
                continue
            text = self.tokenizer.decode(tokens[b], skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in stop or []) if i >= 0]
            text = text[: min(cuts)] if cuts else text
            out.append(Generation(text=text, finish_reason="stop" if done[b] else "length", **common))
        return out


def _depth(node: _TrieNode) -> int:
    return max((1 + _depth(child) for child in node.children.values()), default=0)


# ---------------------------------------------------------------------------------------------------
# 2. an OpenAI-compatible API: disk cache, retries with backoff, bounded concurrency
# ---------------------------------------------------------------------------------------------------


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, ``evaluation.serve``) through the ``openai`` client.

    Chat prompts go to ``chat.completions``, str prompts to ``completions`` (with ``prefill`` appended). The
    chat API has no way to open the assistant turn, so there ``prefill`` is not sent; an answer that repeats
    it has it removed. Unseeded sampling (temperature > 0, no seed) is not reproducible, so it is never cached.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 6,
        concurrency: int = 8,
        cache_dir: str | Path | None = None,
        price_per_1k_prompt: float = 0.0,
        price_per_1k_completion: float = 0.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        import openai

        super().__init__()
        # Local servers (vLLM, llama.cpp, evaluation.serve) accept any key; OpenAI itself needs a real one.
        key = api_key or os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        if key is None:
            raise UsageError(f"the openai backend needs a key in ${api_key_env}; set it, or pass --api_base")
        self.model = model
        self.base_url = base_url or None
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.price_per_1k_prompt = price_per_1k_prompt
        self.price_per_1k_completion = price_per_1k_completion
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # The key lives only inside the client; our retries replace the client's (max_retries=0).
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, key from ${self.api_key_env})"

    def _scrub(self, text: str) -> str:
        key = self.client.api_key
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def _generate(self, prompts, *, max_tokens, temperature, top_p, stop, choices, seed, prefill):
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if stop:
            sampling["stop"] = stop
        if seed is not None:
            sampling["seed"] = seed
        cacheable = self.cache_dir is not None and (temperature == 0 or seed is not None)
        calls = [(p, sampling, prefill, cacheable) for p in prompts]
        if len(calls) == 1 or self.concurrency == 1:
            out = [self._one(*call) for call in calls]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(calls))) as pool:
                futures = [pool.submit(self._one, *call) for call in calls]
                try:
                    out = [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        if choices is not None:
            for gen in out:
                gen.choice = parse_choice(gen.text, choices, prefill)
                if gen.choice is None:
                    self._count(unparsed_choices=1)
        return out

    def _one(self, prompt: Prompt, sampling: dict, prefill: str, cacheable: bool) -> Generation:
        if isinstance(prompt, str):
            kind, request = "completions", {"model": self.model, "prompt": prompt + prefill, **sampling}
        else:
            kind, request = "chat", {"model": self.model, "messages": prompt, **sampling}
        path = None
        if cacheable:
            blob = json.dumps({"kind": kind, "base_url": self.base_url, "request": request}, sort_keys=True)
            key = hashlib.sha256(blob.encode()).hexdigest()
            path = self.cache_dir / key[:2] / f"{key}.json"
            if path.exists():
                self._count(cache_hits=1)
                return Generation(**json.loads(path.read_text())["response"], cached=True)
        gen = self._request_with_retries(kind, request)
        if not isinstance(prompt, str) and prefill.strip() and gen.text.lstrip().startswith(prefill.strip()):
            gen.text = gen.text.lstrip()[len(prefill.strip()) :].lstrip()
        cost = (
            gen.prompt_tokens * self.price_per_1k_prompt + gen.completion_tokens * self.price_per_1k_completion
        ) / 1000
        self._count(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens, cost_usd=cost)
        if path is not None:
            response = {k: v for k, v in dataclasses.asdict(gen).items() if k not in ("cached", "choice")}
            atomic_write_text(path, json.dumps({"kind": kind, "request": request, "response": response}))
        return gen

    def _request_with_retries(self, kind: str, request: dict) -> Generation:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                self._count(requests=1)
                if kind == "chat":
                    response = self.client.chat.completions.create(**request)
                    text = response.choices[0].message.content or ""
                else:
                    response = self.client.completions.create(**request)
                    text = response.choices[0].text or ""
                usage = response.usage
                return Generation(
                    text=text,
                    prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
                    completion_tokens=(usage.completion_tokens or 0) if usage else 0,
                    finish_reason=response.choices[0].finish_reason or "stop",
                )
            except (openai.APIConnectionError, openai.APIStatusError) as err:  # APITimeoutError is a connection error
                failure = self._failure(err, attempt)
            # Raised here, outside the except block, so the openai error (whose request holds the key in its
            # headers) is not kept as __context__.
            if failure is not None:
                self._count(failures=1)
                raise failure
            self._count(retries=1)
            time.sleep(min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _failure(self, err: Exception, attempt: int) -> BackendError | None:
        """None to retry (429, 408, 5xx, timeouts, dropped connections while retries last), else the error."""
        status = getattr(err, "status_code", None)
        if status is not None and status not in (408, 429) and status < 500:  # retrying will not help
            return BackendError(
                f"the API refused the request to model {self.model!r} ({status}: {self._scrub(str(err.message))}); "
                f"check --model, --api_base and the key in ${self.api_key_env}"
            )
        if attempt == self.max_retries:
            return BackendError(
                f"the API failed {attempt + 1} times in a row ({type(err).__name__}: {self._scrub(str(err))}); "
                "check --api_base, or raise --max_retries or --timeout"
            )
        return None


# ---------------------------------------------------------------------------------------------------
# 3. flags
# ---------------------------------------------------------------------------------------------------


@dataclass
class BackendArguments:
    """Which language model answers the in-context methods: a local HF model or an OpenAI-compatible API."""

    backend: str = field(
        default="local", metadata={"help": "local (an HF model here) or openai (any compatible API)."}
    )
    model: str = field(
        default="tiny-gpt2",
        metadata={
            "help": "local: a built-in name (tiny-gpt2, smollm2-135m) or an HF folder; openai: the API's model name "
            "(pin a dated one)."
        },
    )
    adapter: str = field(
        default="", metadata={"help": "local: a LoRA adapter folder (or a whole fine-tuned model folder)."}
    )
    api_base: str = field(
        default="",
        metadata={"help": "openai: base URL of the server, e.g. http://127.0.0.1:8000/v1 (default OpenAI)."},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "openai: environment variable holding the key (never written)."}
    )
    cache_dir: str = field(
        default="",
        metadata={
            "help": "openai: response cache folder; default $REFLECT_RL_CACHE/api_responses "
            "(~/.cache/reflect_rl/api_responses); 'none' turns caching off."
        },
    )
    concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once."})
    timeout: float = field(default=60.0, metadata={"help": "openai: seconds before one request times out."})
    max_retries: int = field(default=6, metadata={"help": "openai: retries on 429/5xx/timeouts, with backoff."})
    price_per_1k_prompt: float = field(default=0.0, metadata={"help": "openai: USD per 1k prompt tokens (cost)."})
    price_per_1k_completion: float = field(
        default=0.0, metadata={"help": "openai: USD per 1k completion tokens (cost)."}
    )
    batch_size: int = field(default=16, metadata={"help": "local: prompts decoded together."})
    dtype: str = field(default="float32", metadata={"help": "local: float32, bfloat16, float16 or auto."})
    device: str = field(default="auto", metadata={"help": "local: auto (cuda if available), cpu, cuda, cuda:1..."})

    def __post_init__(self):
        if self.backend not in ("local", "openai"):
            raise UsageError(f"--backend {self.backend!r} is not one of local, openai")
        if not self.model:
            raise UsageError("--model is empty; name a local model or the API's model")
        if self.backend == "openai" and self.adapter:
            raise UsageError("--adapter is for --backend local; serve the adapter with evaluation.serve instead")
        if self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")
        if self.max_retries < 0:
            raise UsageError("--max_retries must be >= 0")
        if self.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if self.price_per_1k_prompt < 0 or self.price_per_1k_completion < 0:
            raise UsageError("--price_per_1k_prompt and --price_per_1k_completion must be >= 0")
        if self.batch_size < 1:
            raise UsageError("--batch_size must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")


def make_backend(args: BackendArguments) -> Backend:
    """The backend ``args`` describe (loads the model for ``local``)."""
    if args.backend == "local":
        return LocalBackend(
            args.model, adapter=args.adapter or None, dtype=args.dtype, batch_size=args.batch_size, device=args.device
        )
    from training.models import cache_root

    cache_dir = None if args.cache_dir == "none" else args.cache_dir or os.path.join(cache_root(), "api_responses")
    return OpenAIBackend(
        args.model,
        base_url=args.api_base or None,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        max_retries=args.max_retries,
        concurrency=args.concurrency,
        cache_dir=cache_dir,
        price_per_1k_prompt=args.price_per_1k_prompt,
        price_per_1k_completion=args.price_per_1k_completion,
    )
