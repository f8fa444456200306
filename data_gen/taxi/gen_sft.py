"""Generate DangerousTaxi SFT data for the policy and the reflector.

    python -m data_gen.taxi.gen_sft --output_dir data/taxi
    python -m data_gen.taxi.gen_sft --output_dir data/taxi_gpt --reflector api --reflector_model gpt-4o-mini-2024-07-18

Trajectories follow the BFS oracle, with a random (non-fatal) action instead at rate
``--random_action_rate``; every visited state is labelled with the oracle's action, or with the
action actually taken under ``--label_source executed`` (the paper's noisy labels). At rate
``--negative_rate`` a step also yields a **negative example**: a wrong move is taken on a copy of the
env, and the state it leads to gets a reflection that names the mistake and the correction, labelled
with the oracle's correcting action (the paper's negative examples, section 4). At rate
``--swap_rate`` a negative example also yields a **swapped** one (not in the paper; rule reflector
only): the same state and reflection, but the plan names another move and the label is that move. In
the rule reflector's data the plan is a function of the state, so a small policy can fit its labels from
the state and ignore the reflection; swapped examples are fit only by reading it (they go to the policy
data alone, never to the reflector's or the no-reflection data).

Writes ``train/`` and ``test/`` (held-out episode seeds) in the shared format of ``data_gen.writer``
(``sft``, ``sft_reflection``, ``sft_policy`` and their ``*_positive`` variants).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

from data_gen.reflectors import APIReflections
from data_gen.taxi.reflection import api_messages, rule_reflection
from data_gen.writer import begin_dataset, write_dataset
from envs.taxi import TaxiEnv, optimal_actions, transition
from experiment_args import DataGenArguments, DataGenReflectorArguments, TaxiArguments, UsageError
from run_utils import cli, parse_args

TEST_SEED_OFFSET = 1_000_000  # held-out episodes use seeds disjoint from the training ones


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
                fix = branch.oracle_action()
                steps.append(
                    dict(
                        obs=branch_obs,
                        reflection=reflect(state, mistake, branch.state, branch_obs),
                        label=fix,
                        kind="negative",
                        step=branch.steps,
                    )
                )
                others = [a for a in safe_actions(branch.state) if a != fix]
                if args.swap_rate and others and rng.random() < args.swap_rate:
                    move = rng.choice(others)
                    steps.append(
                        dict(
                            obs=branch_obs,
                            reflection=rule_reflection(env, state, mistake, branch.state, move),
                            label=move,
                            kind="swapped",
                            step=branch.steps,
                        )
                    )
        obs, *_ = env.step(action)
        prev_state, last_action = state, action
    return steps


def make_reflect(env: TaxiEnv, api_args: DataGenReflectorArguments, output_dir: Path, data_seed: int):
    """``reflect(prev_state, action, state, obs)`` for the chosen reflector (the rule's text, or the API request
    to send later), and the :class:`APIReflections` that send them (None for the rule)."""
    if api_args.reflector == "rule":
        return (lambda prev, action, state, obs: rule_reflection(env, prev, action, state)), None
    cache = Path(api_args.reflector_cache_dir or output_dir.parent / ".reflection_cache")
    api = APIReflections(api_args, cache, data_seed)

    def reflect(prev, action, state, obs):
        return api.pending(api_messages(env, obs.text, state, first_step=prev is None))

    return reflect, api


@cli
def main(argv: list[str] | None = None) -> Path:
    data_args, taxi_args, api_args = parse_args((DataGenArguments, TaxiArguments, DataGenReflectorArguments), argv)
    if data_args.swap_rate and api_args.reflector != "rule":
        raise UsageError("--swap_rate needs --reflector rule (it rewrites the plan of a rule reflection)")
    output_dir, config, done = begin_dataset(data_args, taxi_args, api_args)
    if done:
        return output_dir

    env = taxi_args.make_env()
    reflect, api = make_reflect(env, api_args, output_dir, data_args.seed)
    rng = random.Random(data_args.seed)
    offsets = {"train": 0, "test": TEST_SEED_OFFSET}

    def episode(split: str, i: int) -> list[dict]:
        return run_episode(env, data_args.seed * 10_000 + offsets[split] + i, rng, data_args, reflect)

    return write_dataset(
        output_dir,
        config,
        {"train": data_args.num_episodes, "test": data_args.num_test_episodes},
        episode,
        desc="taxi",
        stats={"stage": env.stage},
        api_reflections=api,
    )


if __name__ == "__main__":
    main()
