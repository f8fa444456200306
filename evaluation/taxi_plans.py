"""How often a Taxi reflector's plan names a shortest-path action, over every state of a stage.

    python -m evaluation.taxi_plans --reflector_path runs/demo/sft_reflector
    python -m evaluation.taxi_plans --reflector_path runs/demo/sft_reflector --taxi_stage full --output plans.json

The reflector's ceiling on Reflect-RL: a policy that follows the plan cannot beat the plan. Every state
the stage can be in is shown to the reflector as an episode's first observation (with the Taxi flags of
the reflector's SFT data unless given), which it continues greedily; the plan's "Best next action: X" is
right when X is one of the BFS oracle's shortest-path actions (``envs.taxi.optimal_actions``). Prints
the accuracy and the wrong states; ``--output`` writes them as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from envs.base import Observation
from envs.taxi import ACTIONS, IN_TAXI, LOCS, TaxiEnv, decode, encode, optimal_actions
from experiment_args import (
    PlanCheckArguments,
    TaxiArguments,
    atomic_write_text,
    cli,
    inherited_env_flags,
    parse_args,
)

PLAN = re.compile(r"Best next action: (.+?)\.")


def stage_states(stage: str) -> list[int]:
    """Every state an episode of ``stage`` can be in before it ends: the passenger waiting at a spot that
    is not the destination (pickup), in the taxi (dropoff), or either (full)."""
    states = []
    for row in range(5):
        for col in range(5):
            for destination in range(len(LOCS)):
                if stage in ("dropoff", "full"):
                    states.append(encode(row, col, IN_TAXI, destination))
                if stage in ("pickup", "full"):
                    states += [encode(row, col, p, destination) for p in range(len(LOCS)) if p != destination]
    return sorted(states)


def plan_action(reflection: str) -> int | None:
    """The action index a reflection's plan names, or None when it names none."""
    match = PLAN.search(reflection)
    return ACTIONS.index(match.group(1)) if match and match.group(1) in ACTIONS else None


def plan_accuracy(reflect: Callable[[list[Observation]], list[str]], env: TaxiEnv) -> dict:
    """Show ``reflect`` every state of ``env``'s stage; the share whose plan is a shortest-path action."""
    states = stage_states(env.stage)
    observations = []
    for state in states:
        env.reset(seed=0)
        env.state, env.picked_up = state, decode(state)[2] == IN_TAXI
        observations.append(env.observation())
    reflections = reflect(observations)
    wrong = []
    for state, text in zip(states, reflections):
        named = plan_action(text)
        if named is None or named not in optimal_actions(state, env.stage):
            wrong.append({"state": state, "grid": decode(state), "reflection": text})
    return {
        "stage": env.stage,
        "states": len(states),
        "accuracy": 1 - len(wrong) / len(states),
        "wrong": wrong,
    }


@cli
def main(argv: list[str] | None = None) -> dict:
    from training.models import load_model, load_tokenizer
    from training.players import run_model_args
    from training.rollout import Reflector

    args, taxi_args = parse_args((PlanCheckArguments, TaxiArguments), argv)
    # the environment the reflector was trained on, unless the command line says otherwise
    args, taxi_args = parse_args(
        (PlanCheckArguments, TaxiArguments), argv, inherited_env_flags(args.reflector_path, TaxiArguments.prefix)
    )
    model_args = run_model_args(args.reflector_path, "--reflector_path")
    model = load_model(model_args, adapter_path=args.reflector_path, trainable=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.cache_dir)
    reflector = Reflector(model, tokenizer, None, args.reflection_max_tokens, temperature=0)

    def reflect(observations: list[Observation]) -> list[str]:
        out = []
        for start in range(0, len(observations), args.batch_size):
            out += reflector.reflect(observations[start : start + args.batch_size])
        return out

    result = plan_accuracy(reflect, taxi_args.make_env())
    result["reflector_path"] = args.reflector_path
    print(
        f"plans right in {result['states'] - len(result['wrong'])}/{result['states']} {result['stage']} states "
        f"({result['accuracy']:.3f})"
    )
    for row in result["wrong"][:10]:
        print(
            f"  wrong at taxi {row['grid'][:2]}, passenger {row['grid'][2]}, destination {row['grid'][3]}: "
            f"{row['reflection'][:80]!r}"
        )
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
