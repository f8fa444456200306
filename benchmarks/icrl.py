"""Approximate ICRL: prompt tokens prefilled per step with the local backend's prefix KV reuse vs without.

``llm.local.LocalBackend`` counts what it does: ``usage.prompt_tokens`` (every prompt's tokens),
``prefix_tokens_reused`` (prompt tokens whose keys and values came from a prefix cache) and
``prefix_tokens_computed`` (tokens run to build prefix caches). The tokens actually prefilled are

    prompt_tokens - prefix_tokens_reused + prefix_tokens_computed

and with ``reuse_prefix=False`` simply ``prompt_tokens``. Two backends on tiny-gpt2, one with reuse and one
without, each run the same short ``evaluation.icrl.run.run`` loop (``approximate_only_positive``, the
README's Approximate setting with a larger ``context_p_keep`` so contexts grow within a short run) on a
small synthetic TREC-format task written to a temp dir (four question templates, four coarse classes).
The two runs take the same decisions (the test suite checks reuse changes no output), so they prefill
the same prompts. Figures: prefilled tokens per step and wall seconds per step, reuse / no reuse (lower
is better; the table prints them as ratios, no target was set).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from benchmarks.common import Figure, log, synchronize
from evaluation.icrl.run import ICRLArguments
from evaluation.icrl.run import run as run_icrl
from experiment_args import BackendArguments
from llm.local import LocalBackend

TEMPLATES = {  # TREC code -> question template
    "NUM:date": "When did the {noun} of {place} {verb} ?",
    "HUM:ind": "Who {verb} the first {noun} in {place} ?",
    "LOC:city": "Where in {place} can one {verb} a {noun} ?",
    "DESC:def": "What does it mean to {verb} a {noun} ?",
}
NOUNS = ["bridge", "river", "train", "library", "clock", "garden", "radio", "statue", "market", "ship"]
PLACES = ["Paris", "Peru", "Ohio", "Kenya", "Oslo", "Texas", "Japan", "Chile"]
VERBS = ["build", "open", "paint", "sell", "repair", "find", "cross", "name"]


def write_task(data_dir: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """TREC-format files (``train_5500.label``, ``TREC_10.label``) of templated questions."""
    rng = random.Random(seed)
    codes = list(TEMPLATES)

    def lines(n: int) -> str:
        out = []
        for _ in range(n):
            code = rng.choice(codes)
            words = {"noun": rng.choice(NOUNS), "place": rng.choice(PLACES), "verb": rng.choice(VERBS)}
            out.append(f"{code} {TEMPLATES[code].format(**words)}\n")
        return "".join(out)

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train_5500.label").write_text(lines(n_train))
    (data_dir / "TREC_10.label").write_text(lines(n_test))
    return data_dir


def _measure(backend: LocalBackend, args: ICRLArguments, device: str) -> dict:
    before = (backend.usage.prompt_tokens, backend.prefix_tokens_reused, backend.prefix_tokens_computed)
    synchronize(device)
    start = time.perf_counter()
    summary = run_icrl(args, BackendArguments(model=backend.model_name), backend)
    synchronize(device)
    seconds = time.perf_counter() - start
    prompt = backend.usage.prompt_tokens - before[0]
    reused = backend.prefix_tokens_reused - before[1]
    computed = backend.prefix_tokens_computed - before[2]
    steps = summary["steps_done"]
    return {
        "steps": steps,
        "seconds": seconds,
        "prompt_tokens": prompt,
        "prefix_tokens_reused": reused,
        "prefix_tokens_computed": computed,
        "prefilled_tokens": prompt - reused + computed,
        "test_accuracy_curve": summary["test_curve"],
        "train_accuracy": summary["train_accuracy"],
    }


def run(
    work_dir: Path,
    steps: int = 60,
    test_k: int = 16,
    test_every: int = 30,
    device: str = "cpu",
    model_name: str = "tiny-gpt2",
) -> list[Figure]:
    """Rows ``icrl/prefill_tokens`` and ``icrl/step_time``: with prefix reuse / without."""
    data_dir = write_task(work_dir / "task", n_train=steps, n_test=test_k)
    results = {}
    for reuse in (True, False):
        backend = LocalBackend(model_name, batch_size=16, device=device, reuse_prefix=reuse)
        backend.generate(["warm-up"], max_tokens=2)  # lazy initialisation, untimed (too short to cache)
        args = ICRLArguments(
            task="trec_coarse",
            data_dir=str(data_dir),
            output_dir=str(work_dir / f"icrl_reuse_{reuse}"),
            strategy="approximate_only_positive",
            context_p_keep=0.5,
            max_contexts=8,
            approximate_context_sampling_method="uniform",
            train_k=steps,
            test_k=test_k,
            test_every=test_every,
            seed=100,
            overwrite_output_dir=True,
        )
        log(f"icrl: {steps} Approximate ICRL steps, prefix reuse {'on' if reuse else 'off'}")
        results["reuse" if reuse else "no_reuse"] = _measure(backend, args, device)
    on, off = results["reuse"], results["no_reuse"]
    raw = {
        "strategy": "approximate_only_positive",
        "max_contexts": 8,
        "context_p_keep": 0.5,
        "test_k": test_k,
        "test_every": test_every,
        "prefix_cache_size": backend.prefix_cache_size,
        "prefix_min_tokens": backend.prefix_min_tokens,
        **results,
    }
    figures = [
        Figure(
            "icrl/prefill_tokens",
            "ICRL prefilled tokens/step",
            "tokens/step",
            on["prefilled_tokens"] / on["steps"],
            off["prefilled_tokens"] / off["steps"],
            "re-encoding every prompt",
            raw=raw,
        ),
        Figure(
            "icrl/step_time",
            "ICRL seconds/step",
            "s/step",
            on["seconds"] / on["steps"],
            off["seconds"] / off["steps"],
            "re-encoding every prompt",
            raw=raw,
        ),
    ]
    for f in figures:
        log(f"{f.label}: {f.value:.4g} with prefix reuse vs {f.baseline:.4g} without: {f.ratio:.3f}x")
    return figures
