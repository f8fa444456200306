"""Any OpenAI-compatible server as a backend: a disk cache keyed by the full request, retries with backoff and
jitter, bounded concurrency, and an API key that is never written anywhere (not in errors, logs or the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiment_args import UsageError
from llm.base import Backend, BackendError, Generation, Prompt, parse_choice
from run_utils import atomic_write_text


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
        flag_prefix: str = "",
    ) -> None:
        """``flag_prefix`` is how the caller's flags are named in errors (data generation's are
        ``--reflector_model``, ``--reflector_api_base``...; evaluation's ``--model``, ``--api_base``...)."""
        import openai

        super().__init__()
        # Local servers (vLLM, llama.cpp, evaluation.serve) accept any key; OpenAI itself needs a real one.
        key = api_key or os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        self.flags = flag_prefix
        if key is None:
            raise UsageError(
                f"the openai backend needs a key in ${api_key_env}; set it, or pass --{flag_prefix}api_base for a "
                "local server"
            )
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
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        calls = []
        for prompt, one_seed in zip(prompts, seeds):
            cacheable = self.cache_dir is not None and (temperature == 0 or one_seed is not None)
            request = sampling if one_seed is None else {**sampling, "seed": one_seed}
            calls.append((prompt, request, prefill, cacheable))
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
                f"check --{self.flags}model, --{self.flags}api_base and the key in ${self.api_key_env}"
            )
        if attempt == self.max_retries:
            return BackendError(
                f"the API failed {attempt + 1} times in a row ({type(err).__name__}: {self._scrub(str(err))}); "
                f"check --{self.flags}api_base, or raise --{self.flags}max_retries or --{self.flags}timeout"
            )
        return None
