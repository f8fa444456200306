"""Rollout throughput: the batched lockstep rollout vs the same rollout one environment at a time.

Both sides call ``training.rollout.rollout`` with the same policy and reflector (one ``--model`` object,
tiny-gpt2-compact by default, serves as both, as ``LMPolicy(model, tok)`` and
``Reflector(model, tok, None, max_tokens, T)``) on
``envs.taxi.TaxiEnv(stage, history=False)`` (the demo's prompts) started from the same seeds:

- batched: ``rollout(N envs, seeds[:E])`` with ``E = episodes_per_env * N``, one call, for each N in
  ``sizes``: the N envs step in lockstep and each starts the next seed's episode when its own ends (the
  auto-reset of a vector env, which evaluation uses), so the batch stays full until the seeds run out;
- sequential: ``rollout([env], [seed])`` for each seed in turn. One pass over ``seeds[:E_max]`` is timed
  episode by episode, and the rate over the first E episodes is the baseline of size N (the seeds nest,
  so each N is compared on exactly its own seeds).

Figures are env steps/s (steps summed over episodes / wall time) and their ratio. The raw numbers also
hold ``drain_*``: N envs playing one episode each (``rollout(N envs, seeds[:N])``), whose batch empties as
episodes end (the untrained model ends most Taxi episodes within two steps). Rows: reflections
sampled at T=1 (no memo; the paper's setting) and greedy (T=0), which ``Reflector`` memoises by
prompt. Each measurement starts from the same torch seed and a fresh reflector (an empty memo); the
sequential greedy pass keeps one reflector for all its episodes, as an RL run keeps one for all its
iterations. Sampled actions follow the same generator seed, but a batch draws them in another order
than a sequence of single episodes, so the two sides' episodes have the same starts, not the same
trajectories: the mean episode length of each side is in the raw numbers.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Figure, log, synchronize
from envs.taxi import TaxiEnv
from experiment_args import ModelArguments
from training.models import load_model, load_tokenizer
from training.rollout import LMPolicy, Reflector, rollout

# The targets, with sampled reflections: batching pays off at least 10x, at 100 env steps/s or more.
# They are checked at the largest N (N envs cannot gain 10x over one at N < 10); the greedy memoised rows,
# whose sequential side skips most generation too, are reported without a target.
TARGET_SPEEDUP = 10.0
TARGET_STEPS_PER_S = 100.0


def _rollout(
    model, tokenizer, n_envs: int, seeds: list[int], stage: str, reflector: Reflector, seed: int, device: str
):
    """(env steps, seconds, episodes) of one batched rollout of ``n_envs`` envs over ``seeds``."""
    envs = [TaxiEnv(stage=stage, history=False) for _ in range(n_envs)]
    generator = torch.Generator().manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    episodes = rollout(envs, seeds, LMPolicy(model, tokenizer), reflector, generator=generator)
    synchronize(device)
    return sum(len(e.steps) for e in episodes), time.perf_counter() - start, len(episodes)


def _sequential(model, tokenizer, seeds: list[int], stage: str, reflector: Reflector, seed: int, device: str):
    """Cumulative (steps, seconds) after each episode of a one-env-at-a-time pass over ``seeds``."""
    generator = torch.Generator().manual_seed(seed)
    policy = LMPolicy(model, tokenizer)
    env = TaxiEnv(stage=stage, history=False)
    steps, seconds, cumulative = 0, 0.0, []
    for i, s in enumerate(seeds):
        if i and i % 32 == 0:
            log(f"  {i}/{len(seeds)} episodes, {steps / seconds:.1f} env steps/s so far")
        synchronize(device)
        start = time.perf_counter()
        (episode,) = rollout([env], [s], policy, reflector, generator=generator)
        synchronize(device)
        seconds += time.perf_counter() - start
        steps += len(episode.steps)
        cumulative.append((steps, seconds))
    return cumulative


def run(
    sizes: list[int],
    stage: str = "dropoff",
    max_new_tokens: int = 32,
    device: str = "cpu",
    model_name: str = "tiny-gpt2",
    seed: int = 0,
    episodes_per_env: int = 4,
    threads: int | None = None,
) -> list[Figure]:
    """Rows ``rollout/sampled/n{N}`` and ``rollout/greedy_memo/n{N}`` for each N in ``sizes``; both sides on
    ``threads`` torch threads (default: as they are)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _run(sizes, stage, max_new_tokens, device, model_name, seed, episodes_per_env)
    finally:
        torch.set_num_threads(previous)


def _run(sizes, stage, max_new_tokens, device, model_name, seed, episodes_per_env) -> list[Figure]:
    model = load_model(ModelArguments(model_name_or_path=model_name, use_peft=False), trainable=False).to(device)
    tokenizer = load_tokenizer(model_name)
    seeds = list(range(seed, seed + episodes_per_env * max(sizes)))
    # warm-up (untimed): the first generate() call pays for lazy initialisation
    _rollout(model, tokenizer, 2, seeds[:2], stage, Reflector(model, tokenizer, None, 4, 1.0), seed, device)

    figures = []
    for name, temperature in (("sampled", 1.0), ("greedy_memo", 0.0)):
        torch.manual_seed(seed)
        reflector = Reflector(model, tokenizer, None, max_new_tokens, temperature)
        log(f"rollout {name}: sequential pass over {len(seeds)} episodes")
        cumulative = _sequential(model, tokenizer, seeds, stage, reflector, seed, device)
        sequential_hits = reflector.hits / max(reflector.calls, 1)
        for n in sizes:
            runs = {}
            for kind, count in (("drain", n), ("batched", episodes_per_env * n)):
                torch.manual_seed(seed)
                reflector = Reflector(model, tokenizer, None, max_new_tokens, temperature)
                runs[kind] = _rollout(model, tokenizer, n, seeds[:count], stage, reflector, seed, device)
            steps, seconds, episodes = runs["batched"]
            drain_steps, drain_seconds, _ = runs["drain"]
            seq_steps, seq_seconds = cumulative[episodes - 1]
            figure = Figure(
                key=f"rollout/{name}/n{n}",
                label=f"rollout {name.replace('_', ' ')} N={n}",
                unit="env steps/s",
                value=steps / seconds,
                baseline=seq_steps / seq_seconds,
                baseline_name="same rollout(), one env at a time",
                raw={
                    "num_envs": n,
                    "torch_threads": torch.get_num_threads(),
                    "stage": stage,
                    "reflection_temperature": temperature,
                    "reflection_max_new_tokens": max_new_tokens,
                    "episodes": episodes,
                    "batched_steps": steps,
                    "batched_s": seconds,
                    "batched_mean_episode_length": steps / episodes,
                    "sequential_steps": seq_steps,
                    "sequential_s": seq_seconds,
                    "sequential_mean_episode_length": seq_steps / episodes,
                    "drain_episodes": n,
                    "drain_steps": drain_steps,
                    "drain_s": drain_seconds,
                    "drain_steps_per_s": drain_steps / drain_seconds,
                    "drain_speedup": (drain_steps / drain_seconds) / (cumulative[n - 1][0] / cumulative[n - 1][1]),
                },
            )
            if temperature == 0:
                figure.raw["batched_memo_hit_rate"] = reflector.hits / max(reflector.calls, 1)
                figure.raw["sequential_memo_hit_rate_all_episodes"] = sequential_hits
            if temperature > 0 and n == max(sizes):
                figure.ratio_target(">=", TARGET_SPEEDUP)
                figure.value_target(">=", TARGET_STEPS_PER_S)
            log(
                f"rollout {name} N={n}: {figure.value:.1f} env steps/s batched ({steps} steps of {episodes} episodes "
                f"in {seconds:.1f} s) vs {figure.baseline:.1f} sequential: {figure.ratio:.2f}x; one episode per env "
                f"{figure.raw['drain_steps_per_s']:.1f} ({figure.raw['drain_speedup']:.2f}x)"
            )
            figures.append(figure)
    return figures
