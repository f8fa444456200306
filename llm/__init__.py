"""One access layer to language models for data generation, evaluation and the server: a local HF model or any
OpenAI-compatible API behind one ``generate`` call. Below ``data_gen/`` and ``evaluation/`` in the import graph.

    backend = make_backend(BackendArguments(backend="local", model="smollm2-135m"))
    gens = backend.generate(prompts, max_tokens=32, temperature=1.0, seed=7, choices=labels, prefill="Intent:")

``llm.base`` holds the interface (``Backend``, ``Generation``, ``Usage``, ``parse_choice``), ``llm.local`` the HF
model, ``llm.openai_api`` the API client.
"""

from __future__ import annotations

import os

from experiment_args import BackendArguments
from llm.base import Backend

# The submodules are imported where they are used: llm.local loads torch, which data generation does not need.


def make_backend(args: BackendArguments, flag_prefix: str = "") -> Backend:
    """The backend ``args`` describe (loads the model for ``local``); API errors name the flags as
    ``--{flag_prefix}api_base`` and so on."""
    if args.backend == "local":
        from llm.local import LocalBackend

        return LocalBackend(
            args.model, adapter=args.adapter or None, dtype=args.dtype, batch_size=args.batch_size, device=args.device
        )
    from llm.openai_api import OpenAIBackend
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
        flag_prefix=flag_prefix,
    )
