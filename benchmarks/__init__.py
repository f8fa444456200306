"""Benchmarks of the toolkit's speed and memory: ``make bench`` (``python -m benchmarks.run``).

Every figure is a ratio of two things measured side by side in the same run, with the same model, data
and seeds, and both raw numbers are kept:

1. ``rollout``  the batched lockstep rollout vs the same ``rollout()`` called one env at a time
2. ``memory``   policy + reflector + reference as three LoRA adapters on one base vs one model alone
                (and two full copies vs one model, as the original Reflect-RL code holds them)
3. ``sft``      ``training.sft`` samples/s vs a minimal hand-written loop on the same tokenized data
4. ``icrl``     prompt tokens prefilled per step of Approximate ICRL with prefix KV reuse vs without
5. ``scaling``  SFT and RL at 2 processes vs 1 (``--scaling``; accelerate over gloo on the CPU)

Each part lives in its own module with a ``run(...) -> list[Figure]``; ``benchmarks.run`` calls them,
prints one table and writes the JSON.
"""
