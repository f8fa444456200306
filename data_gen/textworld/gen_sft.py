"""Generate TextWorld SFT data for the policy and the reflector.

    python -m data_gen.gen_sft --env textworld --output_dir data/textworld

The same episodes as ALFWorld's (``data_gen.alfworld.gen_sft.run_episode``): the expert (TextWorld's walkthrough,
replanned from each state) taking a random admissible command at ``--random_action_rate``, negative examples on a
replayed branch at ``--negative_rate``, rule reflections (``data_gen.textworld.reflection``) or an API reflector's.
Training episodes play the train games, ``test/`` the test games (other seeds, no game in common).
"""

from __future__ import annotations

import random
from pathlib import Path

from data_gen.alfworld.gen_sft import run_episode
from data_gen.reflectors import APIReflections
from data_gen.textworld.reflection import api_messages, rule_reflection
from data_gen.writer import begin_dataset, write_dataset
from experiment_args import DataGenArguments, DataGenReflectorArguments, TextWorldArguments, UsageError
from run_utils import cli, parse_args


@cli
def main(argv: list[str] | None = None) -> Path:
    data_args, env_args, api_args = parse_args((DataGenArguments, TextWorldArguments, DataGenReflectorArguments), argv)
    if data_args.swap_rate:
        raise UsageError("--swap_rate is Taxi's (its rule reflector's plan names one move); drop it for textworld")
    output_dir, config, done = begin_dataset(data_args, env_args, api_args)
    if done:
        return output_dir
    envs = {split: env_args.make_env(split=split) for split in ("train", "test")}
    branch = env_args.make_env(split="train")
    if api_args.reflector == "rule":
        api = None

        def reflect(env, obs, detour):
            return rule_reflection(env, detour)

    else:
        cache = Path(api_args.reflector_cache_dir or output_dir.parent / ".reflection_cache")
        api = APIReflections(api_args, cache, data_args.seed)

        def reflect(env, obs, detour):
            return api.pending(api_messages(env, obs.text))

    rng = random.Random(data_args.seed)

    def episode(split: str, i: int) -> list[dict]:
        return run_episode(envs[split], branch, data_args.seed * 10_000 + i, rng, data_args, reflect)

    try:
        return write_dataset(
            output_dir,
            config,
            {"train": data_args.num_episodes, "test": data_args.num_test_episodes},
            episode,
            desc="textworld",
            stats={"games": {split: len(env.games) for split, env in envs.items()}},
            api_reflections=api,
        )
    finally:
        for env in (*envs.values(), branch):
            env.close()


if __name__ == "__main__":
    main()
