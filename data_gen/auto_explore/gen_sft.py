"""Generate AutoExplore SFT data for the policy and the reflector.

    python -m data_gen.gen_sft --env auto_explore --output_dir data/auto_explore
    python -m data_gen.gen_sft --env auto_explore --output_dir data/ae --auto_explore_holdout_repos click,idna

Each episode plays one task (episode ``i`` of a split plays task ``seed * 10000 + i`` modulo the split's
task count) with the expert (``cd`` down the shortest path, ``cat`` the answer, ``id`` it), taking a
random non-``id`` command instead at rate ``--random_action_rate``; the label is the expert's command,
or the one taken under ``--label_source executed``. At rate ``--negative_rate``, where the current
directory has a file that does not answer the task, a step also yields a **negative example** (the
paper's): a wrong ``cat`` on a copy of the environment, then a reflection that names the mistake,
labelled with the expert's correction. Training episodes use the train split's tasks with the
leave-out; ``test/`` uses the test split (held-out repositories with ``--auto_explore_holdout_repos``).
The files are the shared format of ``data_gen.writer``.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

from data_gen.auto_explore.reflection import api_messages, rule_reflection
from data_gen.reflectors import APIReflections
from data_gen.writer import begin_dataset, write_dataset
from envs.auto_explore import AutoExploreEnv
from experiment_args import AutoExploreArguments, DataGenArguments, DataGenReflectorArguments, UsageError
from run_utils import cli, parse_args


def run_episode(env: AutoExploreEnv, seed: int, rng: random.Random, args: DataGenArguments, reflect) -> list[dict]:
    """One episode as labelled steps ``{obs, reflection, label, kind, step, meta}``."""
    obs = env.reset(seed=seed)
    meta = {"repo": env.task.repo_name, "depth": env.task.depth}
    steps = []
    while not env.done:
        best = env.oracle_action()
        explore = [i for i, a in enumerate(obs.actions) if not a.startswith("id ")]
        action = rng.choice(explore) if explore and rng.random() < args.random_action_rate else best
        steps.append(
            dict(
                obs=obs,
                reflection=reflect(env, obs),
                label=action if args.label_source == "executed" else best,
                kind="positive",
                step=env.steps,
                meta=meta,
            )
        )
        here = f"{env.cwd}/" if env.cwd else ""
        wrong = [
            i
            for i, a in enumerate(obs.actions)
            if a.startswith("cat ") and here + a[4:] not in env.task.answers and i != best
        ]
        if wrong and rng.random() < args.negative_rate:
            branch = copy.deepcopy(env)
            branch_obs, *_ = branch.step(rng.choice(wrong))
            if not branch.done:
                steps.append(
                    dict(
                        obs=branch_obs,
                        reflection=reflect(branch, branch_obs),
                        label=branch.oracle_action(),
                        kind="negative",
                        step=branch.steps,
                        meta=meta,
                    )
                )
        obs, *_ = env.step(action)
    return steps


def make_reflect(api_args: DataGenReflectorArguments, output_dir: Path, data_seed: int):
    """``reflect(env, obs)`` for the chosen reflector (the rule's text, or the API request to send later), and
    the :class:`APIReflections` that send them (None for the rule)."""
    if api_args.reflector == "rule":
        return (lambda env, obs: rule_reflection(env)), None
    cache = Path(api_args.reflector_cache_dir or output_dir.parent / ".reflection_cache")
    api = APIReflections(api_args, cache, data_seed)
    return (lambda env, obs: api.pending(api_messages(env, obs.text))), api


@cli
def main(argv: list[str] | None = None) -> Path:
    data_args, env_args, api_args = parse_args(
        (DataGenArguments, AutoExploreArguments, DataGenReflectorArguments), argv
    )
    if data_args.swap_rate:
        raise UsageError("--swap_rate is Taxi's (its rule reflector's plan names one move); drop it for auto_explore")
    output_dir, config, done = begin_dataset(data_args, env_args, api_args)
    if done:
        return output_dir
    envs = {"train": env_args.make_env(split="train"), "test": env_args.make_env(split="test")}
    reflect, api = make_reflect(api_args, output_dir, data_args.seed)
    rng = random.Random(data_args.seed)

    def episode(split: str, i: int) -> list[dict]:
        return run_episode(envs[split], data_args.seed * 10_000 + i, rng, data_args, reflect)

    return write_dataset(
        output_dir,
        config,
        {"train": data_args.num_episodes, "test": data_args.num_test_episodes},
        episode,
        desc="auto_explore",
        stats={"tasks": {split: len(env.tasks) for split, env in envs.items()}},
        api_reflections=api,
    )


if __name__ == "__main__":
    main()
