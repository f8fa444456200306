"""Generate DangerousTaxi SFT data for the policy and the reflector.

    python -m data_gen.taxi.gen_sft --output_dir data/taxi
    python -m data_gen.taxi.gen_sft --output_dir data/taxi_gpt --reflector api --reflector_model gpt-4o-mini-2024-07-18

Trajectories follow the BFS oracle, with a random (non-fatal) action instead at rate
``--random_action_rate``; every visited state is labelled with the oracle's action, or with the
action actually taken under ``--label_source executed`` (the paper's noisy labels). At rate
``--negative_rate`` a step also yields a **negative example**: a wrong move is taken on a copy of the
env, and the state it leads to gets a reflection that names the mistake and the correction, labelled
with the oracle's correcting action (the paper's negative examples, section 4).

Writes ``train/`` and ``test/`` (held-out episode seeds), each with
``sft.jsonl`` (prompt -> action, no reflection), ``sft_reflection.jsonl`` (prompt -> reflection),
``sft_policy.jsonl`` (prompt + reflection -> action) and ``*_positive.jsonl`` (no negative examples),
in ``datasets`` prompt/completion format. Prompts come from ``envs.prompt``, the same code RL and
evaluation use, so training and acting see identical text.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data_gen.reflectors import APIReflector
from data_gen.taxi.reflection import api_messages, rule_reflection
from envs.prompt import action_labels, policy_prompt, reflection_prompt
from envs.taxi import TaxiEnv, optimal_actions, transition
from experiment_args import (
    DataGenArguments,
    ReflectorAPIArguments,
    TaxiArguments,
    atomic_write_text,
    check_output_dir,
    cli,
    parse_args,
    resolved_config,
    save_config,
)

TEST_SEED_OFFSET = 1_000_000  # held-out episodes use seeds disjoint from the training ones
FILES = ("sft", "sft_reflection", "sft_policy")


def safe_actions(state: int) -> list[int]:
    """Actions that change the state (so they do not end the episode under the danger rule)."""
    return [a for a in range(6) if transition(state, a)[0] != state]


def run_episode(env: TaxiEnv, seed: int, rng: random.Random, args: DataGenArguments, reflect) -> list[dict]:
    """One episode as a list of labelled steps ``{obs, reflection, label, kind, step}``."""
    obs = env.reset(seed=seed)
    prev_state, last_action, steps = None, None, []
    while not env.done:
        state = env.state
        best = env.oracle_action()
        action = rng.choice(safe_actions(state)) if rng.random() < args.random_action_rate else best
        steps.append(
            dict(
                obs=obs,
                reflection=reflect(prev_state, last_action, state, obs),
                label=action if args.label_source == "executed" else best,
                kind="positive",
                step=env.steps,
            )
        )
        wrong = [a for a in safe_actions(state) if a not in optimal_actions(state, env.stage)]
        if wrong and rng.random() < args.negative_rate:
            branch = copy.deepcopy(env)
            mistake = rng.choice(wrong)
            branch_obs, *_ = branch.step(mistake)
            if not branch.done:
                steps.append(
                    dict(
                        obs=branch_obs,
                        reflection=reflect(state, mistake, branch.state, branch_obs),
                        label=branch.oracle_action(),
                        kind="negative",
                        step=branch.steps,
                    )
                )
        obs, *_ = env.step(action)
        prev_state, last_action = state, action
    return steps


def to_records(steps: list[dict], episode: int) -> dict[str, list[dict]]:
    """The three SFT views of each step, with metadata columns for analysis."""
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for s in steps:
        labels = action_labels(len(s["obs"].actions))
        meta = {"episode": episode, "step": s["step"], "kind": s["kind"], "action": s["obs"].actions[s["label"]]}
        answer = labels[s["label"]]
        out["sft"].append({"prompt": policy_prompt(s["obs"], labels), "completion": answer, **meta})
        out["sft_reflection"].append({"prompt": reflection_prompt(s["obs"]), "completion": s["reflection"], **meta})
        out["sft_policy"].append(
            {"prompt": policy_prompt(s["obs"], labels, s["reflection"]), "completion": answer, **meta}
        )
    return out


def make_reflect(env: TaxiEnv, api_args: ReflectorAPIArguments, output_dir: Path):
    """``reflect(prev_state, action, state, obs) -> str`` for the chosen reflector, and the API client."""
    if api_args.reflector == "rule":
        return (lambda prev, action, state, obs: rule_reflection(env, prev, action, state)), None
    cache = Path(api_args.reflector_cache_dir or output_dir.parent / ".reflection_cache")
    client = APIReflector(api_args, cache)

    def reflect(prev, action, state, obs):
        return client.reflect(api_messages(env, obs.text, state, first_step=prev is None))

    return reflect, client


def write_split(folder: Path, records: dict[str, list[dict]]) -> dict[str, int]:
    folder.mkdir(parents=True)
    counts = {}
    for name, rows in records.items():
        positive = [r for r in rows if r["kind"] == "positive"]
        for fname, subset in ((name, rows), (f"{name}_positive", positive)):
            with open(folder / f"{fname}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in subset)
            counts[fname] = len(subset)
    return counts


@cli
def main(argv: list[str] | None = None) -> Path:
    data_args, taxi_args, api_args = parse_args((DataGenArguments, TaxiArguments, ReflectorAPIArguments), argv)
    output_dir = Path(data_args.output_dir)
    config = {
        "env": taxi_args.name,
        **resolved_config(data_args, taxi_args, api_args, ignore=("overwrite_output_dir",)),
    }
    if check_output_dir(output_dir, config, overwrite=data_args.overwrite_output_dir):
        print(f"{output_dir} already holds this data set; nothing to do")
        return output_dir

    env = taxi_args.make_env()
    reflect, client = make_reflect(env, api_args, output_dir)
    rng = random.Random(data_args.seed)
    splits = {"train": (data_args.num_episodes, 0), "test": (data_args.num_test_episodes, TEST_SEED_OFFSET)}
    tmp = Path(
        tempfile.mkdtemp(dir=output_dir.parent if output_dir.parent.exists() else None, prefix=f".{output_dir.name}.")
    )
    try:
        stats: dict = {"stage": env.stage}
        for split, (n, offset) in splits.items():
            records: dict[str, list[dict]] = {name: [] for name in FILES}
            kinds: Counter = Counter()
            for episode in tqdm(range(n), desc=f"taxi {split} episodes", unit="ep"):
                steps = run_episode(env, data_args.seed * 10_000 + offset + episode, rng, data_args, reflect)
                kinds.update(s["kind"] for s in steps)
                for name, rows in to_records(steps, episode).items():
                    records[name].extend(rows)
            stats[split] = {"episodes": n, "steps": dict(kinds), "files": write_split(tmp / split, records)}
        if client is not None:
            stats["api"] = client.stats
        atomic_write_text(tmp / "stats.json", json.dumps(stats, indent=2))
        save_config(tmp, config)
        if output_dir.exists():
            shutil.rmtree(output_dir)  # empty, or a different run the user asked to overwrite
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {output_dir}: {json.dumps({k: stats[k]['files'] for k in splits})}")
    return output_dir


if __name__ == "__main__":
    main()
