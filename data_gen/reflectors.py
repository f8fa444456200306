"""Reflection writers for SFT data: a chat model behind any OpenAI-compatible API.

The API reflector caches every response on disk, keyed by the full request, so a re-run (or a run
resumed after a crash) costs nothing, and retries rate limits, server errors and timeouts with
exponential backoff and jitter (the openai client's own retries are off, so the count is ours).
The API key is read from an environment variable and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from experiment_args import ReflectorAPIArguments, UsageError, atomic_write_text


class APIReflector:
    """``reflect(messages) -> str`` through ``chat.completions`` with a disk cache."""

    def __init__(self, args: ReflectorAPIArguments, cache_dir: str | Path):
        import openai

        self.args = args
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Local servers (vLLM, llama.cpp, our evaluation.serve) accept any key; OpenAI needs a real one.
        key = os.environ.get(args.reflector_api_key_env) or ("EMPTY" if args.reflector_api_base else None)
        if key is None:
            raise UsageError(
                f"the API reflector needs a key in ${args.reflector_api_key_env}; set it, or pass "
                "--reflector_api_base for a local server, or --reflector rule"
            )
        self.client = openai.OpenAI(
            api_key=key,
            base_url=args.reflector_api_base or None,
            timeout=args.reflector_timeout,
            max_retries=0,
        )
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def _key(self, request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def reflect(self, messages: list[dict]) -> str:
        request = {
            "model": self.args.reflector_model,
            "messages": messages,
            "temperature": self.args.reflector_temperature,
            "max_tokens": self.args.reflector_max_tokens,
        }
        path = self.cache_dir / f"{self._key(request)}.json"
        if path.exists():
            self.stats["cache_hits"] += 1
            return json.loads(path.read_text())["content"]
        content = self._request_with_retries(request)
        atomic_write_text(path, json.dumps({"request": request, "content": content}))
        return content

    def _request_with_retries(self, request: dict) -> str:
        import openai

        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
        for attempt in range(self.args.reflector_max_retries + 1):
            try:
                self.stats["requests"] += 1
                response = self.client.chat.completions.create(**request)
                if response.usage is not None:
                    self.stats["prompt_tokens"] += response.usage.prompt_tokens or 0
                    self.stats["completion_tokens"] += response.usage.completion_tokens or 0
                return (response.choices[0].message.content or "").strip()
            except retryable as err:  # APITimeoutError is an APIConnectionError
                if attempt == self.args.reflector_max_retries:
                    raise UsageError(
                        f"the reflector API failed {attempt + 1} times ({type(err).__name__}: {err}); "
                        "check --reflector_api_base and --reflector_model, or raise --reflector_max_retries"
                    ) from None
                self.stats["retries"] += 1
                time.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
            except openai.APIStatusError as err:  # 4xx other than 429: retrying will not help
                raise UsageError(
                    f"the reflector API refused the request ({err.status_code}: {err.message}); "
                    "check --reflector_model and the key in --reflector_api_key_env"
                ) from None
        raise AssertionError("unreachable")
