"""Generate ALFWorld SFT data for the policy and the reflector.

    python -m data_gen.gen_sft --env alfworld --output_dir data/alfworld
    python -m data_gen.gen_sft --env alfworld --output_dir data/alfworld_pp --alfworld_stage pick_and_place_simple

Episode ``i`` of a split plays game ``seed * 10000 + i`` (modulo the split's games: generated ones, or the
official train and ``valid_unseen`` games under ``--alfworld_data``) with the expert, taking a random admissible
command instead at rate ``--random_action_rate`` (the paper's noisy expert); the label is the expert's command,
or the one taken under ``--label_source executed``. At rate ``--negative_rate`` a step also yields a **negative
example** (the paper's): a random non-expert command on a replayed copy of the episode, then a reflection that
names it, labelled with the expert's correction. Reflections are the rule's plan (``data_gen.alfworld.reflection``)
or an API reflector's. The files are the shared format of ``data_gen.writer``.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_gen.alfworld.reflection import api_messages, rule_reflection
from data_gen.reflectors import APIReflections
from data_gen.writer import begin_dataset, write_dataset
from envs.alfworld import AlfWorldEnv
from experiment_args import AlfWorldArguments, DataGenArguments, DataGenReflectorArguments, UsageError
from run_utils import cli, parse_args


def run_episode(
    env: AlfWorldEnv, branch: AlfWorldEnv, seed: int, rng: random.Random, args: DataGenArguments, reflect
) -> list[dict]:
    """One episode as labelled steps ``{obs, reflection, label, kind, step, meta}``. TextWorld's data use it too:
    any environment with ``oracle_action``, ``done``, ``steps`` and ``copy_into`` (a replayed branch)."""
    obs = env.reset(seed=seed)
    meta = dict(obs.extra.get("tags", {}))  # the task type
    steps, detour = [], None
    while not env.done:
        best = env.oracle_action()
        action = rng.randrange(len(obs.actions)) if rng.random() < args.random_action_rate else best
        steps.append(
            dict(
                obs=obs,
                reflection=reflect(env, obs, detour),
                label=action if args.label_source == "executed" else best,
                kind="positive",
                step=env.steps,
                meta=meta,
            )
        )
        wrong = [i for i in range(len(obs.actions)) if i != best]
        if wrong and rng.random() < args.negative_rate:
            env.copy_into(branch)
            mistake = rng.choice(wrong)
            branch_obs, *_ = branch.step(mistake)
            if not branch.done:
                steps.append(
                    dict(
                        obs=branch_obs,
                        reflection=reflect(branch, branch_obs, obs.actions[mistake]),
                        label=branch.oracle_action(),
                        kind="negative",
                        step=branch.steps,
                        meta=meta,
                    )
                )
        detour = obs.actions[action] if action != best else None
        obs, *_ = env.step(action)
    return steps


def make_reflect(api_args: DataGenReflectorArguments, output_dir: Path, data_seed: int, rule, messages):
    """``reflect(env, obs, detour)`` for the chosen reflector (``rule(env, detour)``'s text, or the API request
    ``messages(env, state_text)`` to send later), and the :class:`APIReflections` that send them (None: rule)."""
    if api_args.reflector == "rule":
        return (lambda env, obs, detour: rule(env, detour)), None
    cache = Path(api_args.reflector_cache_dir or output_dir.parent / ".reflection_cache")
    api = APIReflections(api_args, cache, data_seed)
    return (lambda env, obs, detour: api.pending(messages(env, obs.text))), api


def generate(argv: list[str] | None, env_class, rule, messages) -> Path:
    """The data set of a game environment played with :func:`run_episode` (ALFWorld's; TextWorld's too)."""
    data_args, env_args, api_args = parse_args((DataGenArguments, env_class, DataGenReflectorArguments), argv)
    if data_args.swap_rate:
        raise UsageError(f"--swap_rate is Taxi's (its rule reflector names a move); drop it for {env_class.name}")
    output_dir, config, done = begin_dataset(data_args, env_args, api_args)
    if done:
        return output_dir
    envs = {split: env_args.make_env(split=split) for split in ("train", "test")}
    branch = env_args.make_env(split="train")  # replays any game of either split
    reflect, api = make_reflect(api_args, output_dir, data_args.seed, rule, messages)
    rng = random.Random(data_args.seed)

    def episode(split: str, i: int) -> list[dict]:
        return run_episode(envs[split], branch, data_args.seed * 10_000 + i, rng, data_args, reflect)

    try:
        return write_dataset(
            output_dir,
            config,
            {"train": data_args.num_episodes, "test": data_args.num_test_episodes},
            episode,
            desc=env_class.name,
            stats={"games": {split: len(env.games) for split, env in envs.items()}},
            api_reflections=api,
        )
    finally:
        for env in (*envs.values(), branch):
            env.close()


@cli
def main(argv: list[str] | None = None) -> Path:
    return generate(argv, AlfWorldArguments, rule_reflection, api_messages)


if __name__ == "__main__":
    main()
