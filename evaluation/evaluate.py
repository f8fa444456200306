"""Evaluate a policy (with or without its reflector) or a reference agent on fixed seeded episodes.

    python -m evaluation.evaluate --run_dir runs/reflect_rl --output_dir runs/reflect_rl/eval
    python -m evaluation.evaluate --run_dir runs/sft_policy --reflector_path runs/sft_reflector \
        --output_dir runs/eval/sft
    python -m evaluation.evaluate --agent oracle --output_dir runs/eval/oracle --stages pickup,dropoff,full
    python -m evaluation.evaluate --agent llm --agent_model smollm2-135m --output_dir runs/eval/smollm2

The episodes are the same for every run (``--seed``), and they go through ``training.rollout.rollout``,
the function RL trains with. Writes ``summary.json`` (per stage: success rate with a 95% interval
that resamples start states, since episodes from one start are not independent tests, and the Wilson
interval over episodes; distinct start states; mean return and length; invalid-action rate) and
``episodes.jsonl`` (full transcripts with reflections). ``--agent llm`` is a language model playing in context
(evaluation/in_context_agent.py: local or behind an API, optionally shown past episodes; the ``--agent_*``
flags), stepped by the same rollout; its usage goes into the summary. An environment that counts engine
faults (ALFWorld's crashed, hung or broken games, skipped) adds them per stage as ``engine_faults``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from experiment_args import EvalArguments, InContextAgentArguments, UsageError
from run_utils import atomic_write_text, cli, inherited_run_flags, latest_checkpoint, parse_with_env
from training.players import load_players
from training.rollout import (
    LMPolicy,
    OracleAgent,
    RandomAgent,
    Reflector,
    ServedReflector,
    episode_stats,
    prompts_cut,
    rollout,
)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def start_bootstrap_interval(
    successes: list[bool], starts: list, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the success rate that resamples start states, not episodes.

    Episodes from the same start state are not independent tests (Taxi's dropoff stage has 12 starts),
    so the interval draws whole start states with replacement and pools their episodes.
    """
    groups: dict = {}
    for won, start in zip(successes, starts):
        wins_count = groups.setdefault(start, [0, 0])
        wins_count[0] += int(won)
        wins_count[1] += 1
    wins = np.array([w for w, _ in groups.values()], dtype=np.float64)
    counts = np.array([c for _, c in groups.values()], dtype=np.float64)
    pick = np.random.default_rng(seed).integers(len(groups), size=(resamples, len(groups)))
    rates = wins[pick].sum(1) / counts[pick].sum(1)
    return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


def load_agent(args: EvalArguments, agent_args: InContextAgentArguments | None = None):
    """(agent, reflector or None, description) for the evaluated run."""
    if args.agent == "llm":
        from evaluation.in_context_agent import make_agent

        if args.reflector_path:
            raise UsageError(
                "--agent llm reads a served reflector only: serve --reflector_path with evaluation.serve and pass "
                "--reflector_api_base"
            )
        agent_args = agent_args or InContextAgentArguments()
        reflector = None
        if args.reflector_api_base:
            reflector = ServedReflector(
                args.reflector_backend(), args.reflection_max_tokens, args.reflection_temperature
            )
        meta = {
            "reflection": reflector is not None,
            "reflector_path": args.reflector_api_base,
            "agent_backend": agent_args.agent_backend,
            "agent_model": agent_args.agent_model,
            "agent_api_base": agent_args.agent_api_base,
            "agent_context": agent_args.agent_context,
        }
        return make_agent(agent_args, args.seed), reflector, meta
    if args.agent == "random":
        return RandomAgent(args.seed), None, {"reflection": False}
    if args.agent == "oracle":
        return OracleAgent(), None, {"reflection": False}
    run = Path(args.run_dir)
    config_path = run / "config.yaml"
    if not config_path.exists():
        raise UsageError(
            f"--run_dir {run} has no config.yaml; pass a folder from training.sft or training.rl_finetune"
        )
    config = yaml.safe_load(config_path.read_text()) or {}
    checkpoint = None
    if "policy_path" in config:  # an RL run: its SFT players, then the latest checkpoint's policy
        from training.rl_finetune import load_policy_weights

        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise UsageError(f"--run_dir {run} has no checkpoint-N folder yet")
        policy_path, reflector_path = config["policy_path"], config.get("reflector_path", "")
        if not args.reflector_api_base and config.get("reflector_api_base"):  # the run's served reflector
            args.reflector_api_base, args.reflector_model = config["reflector_api_base"], config["reflector_model"]
    else:
        policy_path, reflector_path = str(run), args.reflector_path
    players = load_players(policy_path, reflector_path, with_reference=False, trainable=False)
    if checkpoint is not None:
        load_policy_weights(checkpoint, players)
    players.to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    policy = LMPolicy(
        players.policy_model, players.tokenizer, None, players.policy_adapter, shuffle_labels=args.shuffle_labels
    )
    reflector = None
    if players.reflector_model is not None:
        reflector = Reflector(
            players.reflector_model,
            players.tokenizer,
            players.reflector_adapter,
            args.reflection_max_tokens,
            args.reflection_temperature,
        )
    elif args.reflector_api_base:
        reflector = ServedReflector(args.reflector_backend(), args.reflection_max_tokens, args.reflection_temperature)
    meta = {
        "reflection": reflector is not None,
        "policy_path": policy_path,
        "reflector_path": reflector_path or args.reflector_api_base,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    return policy, reflector, meta


def success_by_tag(episodes) -> dict:
    """{tag: {value: {"episodes", "success_rate"}}} over the tags environments put on episodes."""
    groups: dict = {}
    for e in episodes:
        for tag, value in e.tags.items():
            groups.setdefault(tag, {}).setdefault(str(value), []).append(e.success)
    return {
        tag: {v: {"episodes": len(s), "success_rate": sum(s) / len(s)} for v, s in sorted(values.items())}
        for tag, values in sorted(groups.items())
    }


def summarise(episodes) -> dict:
    n = len(episodes)
    wins = sum(e.success for e in episodes)
    returns = np.array([e.ret for e in episodes])
    stats = episode_stats(episodes)
    starts = [ep.steps[0].state_key if ep.steps else None for ep in episodes]
    known = all(s is not None for s in starts)
    wilson = list(wilson_interval(wins, n))
    by_start = list(start_bootstrap_interval([e.success for e in episodes], starts)) if known else None
    return {
        "episodes": n,
        "distinct_starts": len(set(starts)) if known else None,
        "success_rate": wins / n,
        # the honest interval where the environment says which episodes share a start state
        "success_ci95": by_start or wilson,
        "success_ci95_wilson": wilson,
        "success_ci95_starts": by_start,
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "length_mean": stats["env/episode_length"],
        "invalid_action_rate": stats["env/invalid_action_rate"],
        "success_by": success_by_tag(episodes),
    }


@cli
def main(argv: list[str] | None = None) -> dict:
    # The environment the run was trained on and, for an RL run, its reflection and label settings,
    # unless the command line says otherwise: what is evaluated is what was trained.
    args, agent_args, env_args = parse_with_env(
        (EvalArguments, InContextAgentArguments), argv, "run_dir", scope="eval", extra=inherited_run_flags
    )
    if args.stages:
        env_args.check_stages("--stages", args.stages)
    output_dir = Path(args.output_dir)
    if (output_dir / "summary.json").exists() and not args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir} already holds an evaluation; pass another --output_dir or --overwrite_output_dir"
        )
    agent, reflector, meta = load_agent(args, agent_args)
    stages = args.stages.split(",") if args.stages else [env_args.stage]
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the reflector samples from the global generator
    random.seed(args.seed)  # shuffled labels draw from Python's
    summary = {
        "name": args.name or output_dir.name,
        "agent": args.agent,
        "run_dir": args.run_dir,
        "greedy": args.greedy,
        "reflection_max_tokens": args.reflection_max_tokens,
        "reflection_temperature": args.reflection_temperature,
        "shuffle_labels": args.shuffle_labels,
        "env": args.env,
        "split": args.split,
        **meta,
        "stages": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=".eval.", dir=output_dir.parent if output_dir.parent.exists() else None))
    try:
        with open(tmp / "episodes.jsonl", "w") as transcripts:
            for stage in stages:
                episodes = []
                if hasattr(agent, "observe"):
                    agent.reset()  # an in-context agent learns within a stage, from its first episode
                # created once per stage and reused by every batch
                envs = [env_args.make_env(stage, args.split) for _ in range(min(args.batch_size, args.num_episodes))]
                if args.agent == "oracle" and not envs[0].has_expert:
                    raise UsageError(f"--agent oracle: the {args.env} environment has no expert")
                bar = tqdm(total=args.num_episodes, desc=f"eval {summary['name']} {stage}", unit="ep")
                seeds = [args.seed + i for i in range(args.num_episodes)]
                if hasattr(agent, "observe"):
                    # an in-context agent reads the episodes so far: batches of batch_size, each seen after it ends
                    for start in range(0, args.num_episodes, args.batch_size):
                        chunk = seeds[start : start + args.batch_size]
                        batch = rollout(envs[: len(chunk)], chunk, agent, reflector, None, args.greedy, generator)
                        episodes += batch
                        agent.observe(batch)
                        bar.update(len(batch))
                else:
                    # batch_size envs in lockstep, each starting the next episode as soon as its own ends
                    episodes = rollout(
                        envs,
                        seeds,
                        agent,
                        reflector,
                        None,
                        args.greedy,
                        generator,
                        on_episode=lambda _, bar=bar: bar.update(1),
                    )
                bar.close()
                faults: Counter = Counter()  # games an engine failed on (ALFWorld), skipped: {} elsewhere
                for env in envs:
                    faults.update(getattr(env, "faults", {}))
                    env.close()
                for ep in episodes:
                    transcripts.write(json.dumps(ep.transcript()) + "\n")
                summary["stages"][stage] = summarise(episodes) | {"engine_faults": dict(faults)}
                s = summary["stages"][stage]
                print(
                    f"{summary['name']} {stage}: success {s['success_rate']:.3f} "
                    f"[{s['success_ci95'][0]:.3f}, {s['success_ci95'][1]:.3f}], return {s['return_mean']:.3f}, "
                    f"length {s['length_mean']:.2f}"
                )
                if faults:
                    print(f"  engine faults (games marked bad and skipped): {dict(faults)}")
                for tag, values in s["success_by"].items():
                    rates = ", ".join(f"{v} {r['success_rate']:.3f} (n={r['episodes']})" for v, r in values.items())
                    print(f"  by {tag}: {rates}")
        # prompts longer than the model's window lose their start; an environment should cap its observation
        summary["prompts_cut"] = prompts_cut(agent, reflector)
        if hasattr(agent, "stats"):
            summary["agent_stats"] = agent.stats()
        if summary["prompts_cut"]:
            print(
                f"warning: {summary['prompts_cut']} prompts were longer than the model's window and cut from the left"
            )
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
        if output_dir.exists():
            for name in ("summary.json", "episodes.jsonl"):
                (output_dir / name).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("episodes.jsonl", "summary.json"):  # summary last: it marks a finished evaluation
            shutil.move(str(tmp / name), output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
