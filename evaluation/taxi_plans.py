"""How often a Taxi reflector's plan names a shortest-path action, over every state of a stage; and with
``--policy_path``, how much a policy acts on the plan.

    python -m evaluation.taxi_plans --reflector_path runs/demo/sft_reflector
    python -m evaluation.taxi_plans --reflector_path runs/demo/sft_reflector --taxi_stage full --output plans.json
    python -m evaluation.taxi_plans --reflector_path runs/demo/sft_reflector --policy_path runs/demo/sft_policy

The reflector's ceiling on Reflect-RL: a policy that follows the plan cannot beat the plan. Every state
the stage can be in is shown to the reflector as an episode's first observation (with the Taxi flags of
the reflector's SFT data unless given), which it continues greedily; the plan's "Best next action: X" is
right when X is one of the BFS oracle's shortest-path actions (``envs.taxi.optimal_actions``). Prints
the accuracy and the wrong states; ``--output`` writes them as JSON.

``--policy_path`` (an SFT policy folder) adds the policy's probability of the plan's move in each state,
and the **swap shift**: with the plan's move replaced by each other move in turn, how much that move's
probability rises (mean over states and moves). A policy that reads the state and not the plan shifts
~0; RL from such a policy learned no more than without reflection in the demo (README, "Measured").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from envs.base import Observation
from envs.taxi import ACTIONS, IN_TAXI, LOCS, TaxiEnv, decode, encode, optimal_actions
from experiment_args import PlanCheckArguments, TaxiArguments
from run_utils import atomic_write_text, cli, inherited_env_flags, parse_args

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


def swap_plan(reflection: str, action: int) -> str:
    """The reflection with its plan naming ``action`` instead."""
    return PLAN.sub(f"Best next action: {ACTIONS[action]}.", reflection, count=1)


def plan_reading(
    score: Callable[[list[str], list[int]], torch.Tensor],
    observations: list[Observation],
    reflections: list[str],
    labels: Callable[[int], list[str]],
) -> dict:
    """How a policy acts on the plan: ``score(prompts, n_actions) -> (B, A) probabilities``.

    ``follow`` is the mean probability of the plan's move; ``swapped_follow`` that of another move when the
    plan names it instead, ``unswapped`` that move's probability under the true plan, and ``swap_shift``
    their difference (mean over states with a plan that names a move, and the other moves).
    """
    from envs.prompt import policy_prompt

    moves = [i for i, name in enumerate(ACTIONS) if name.startswith("move")]
    prompts, n_actions, index = [], [], []  # index: (state, the plan's move, the swapped-in move or None)
    for b, (obs, text) in enumerate(zip(observations, reflections)):
        named = plan_action(text)
        if named not in moves:
            continue
        for move in [None] + [m for m in moves if m != named]:
            reflection = text if move is None else swap_plan(text, move)
            prompts.append(policy_prompt(obs, labels(len(obs.actions)), reflection))
            n_actions.append(len(obs.actions))
            index.append((b, named, move))
    if not prompts:
        return {"states": 0}  # no plan names a move: nothing to swap
    probs = score(prompts, n_actions)
    true_row = {b: row for (b, _, move), row in zip(index, probs) if move is None}
    follow = [float(true_row[b][named]) for b, named, move in index if move is None]
    swapped = [
        (float(row[move]), float(true_row[b][move])) for (b, _, move), row in zip(index, probs) if move is not None
    ]
    return {
        "states": len(follow),
        "follow": sum(follow) / len(follow),
        "swapped_follow": sum(s for s, _ in swapped) / len(swapped),
        "unswapped": sum(u for _, u in swapped) / len(swapped),
        "swap_shift": sum(s - u for s, u in swapped) / len(swapped),
    }


def plan_accuracy(reflect: Callable[[list[Observation]], list[str]], env: TaxiEnv) -> dict:
    """Show ``reflect`` every state of ``env``'s stage; the share whose plan is a shortest-path action."""
    states = stage_states(env.stage)
    observations = stage_observations(env, states)
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


def stage_observations(env: TaxiEnv, states: list[int]) -> list[Observation]:
    """Each state shown as an episode's first observation."""
    observations = []
    for state in states:
        env.reset(seed=0)
        env.state, env.picked_up = state, decode(state)[2] == IN_TAXI
        observations.append(env.observation())
    return observations


@cli
def main(argv: list[str] | None = None) -> dict:
    from training.models import load_model
    from training.players import run_model_args, run_tokenizer
    from training.rollout import Reflector

    args, taxi_args = parse_args((PlanCheckArguments, TaxiArguments), argv)
    # the environment the reflector was trained on, unless the command line says otherwise
    args, taxi_args = parse_args(
        (PlanCheckArguments, TaxiArguments), argv, inherited_env_flags(args.reflector_path, TaxiArguments.prefix)
    )
    model_args = run_model_args(args.reflector_path, "--reflector_path")
    model = load_model(model_args, adapter_path=args.reflector_path, trainable=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = run_tokenizer(args.reflector_path, model_args)
    reflector = Reflector(model, tokenizer, None, args.reflection_max_tokens, temperature=0)

    def reflect(observations: list[Observation]) -> list[str]:
        out = []
        for start in range(0, len(observations), args.batch_size):
            out += reflector.reflect(observations[start : start + args.batch_size])
        return out

    env = taxi_args.make_env()
    result = plan_accuracy(reflect, env)
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
    if args.policy_path:
        reading = result["policy"] = _policy_reading(args, env, reflect)
        if not reading["states"]:
            print(f"policy {args.policy_path}: no plan names a move, so there is nothing to swap")
        else:
            print(
                f"policy {args.policy_path}: p(plan's move) {reading['follow']:.3f}; a swapped-in plan raises its "
                f"move from {reading['unswapped']:.3f} to {reading['swapped_follow']:.3f} (swap shift "
                f"{reading['swap_shift']:+.3f}, over {reading['states']} states)"
            )
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(result, indent=2))
    return result


def _policy_reading(args, env: TaxiEnv, reflect: Callable[[list[Observation]], list[str]]) -> dict:
    from training.models import load_model
    from training.players import run_model_args, run_tokenizer
    from training.rollout import LMPolicy

    model_args = run_model_args(args.policy_path, "--policy_path")
    model = load_model(model_args, adapter_path=args.policy_path, trainable=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    policy = LMPolicy(model, run_tokenizer(args.policy_path, model_args))

    @torch.no_grad()
    def score(prompts: list[str], n_actions: list[int]) -> torch.Tensor:
        rows = []
        for start in range(0, len(prompts), args.batch_size):
            logprobs, _, _ = policy.score(
                prompts[start : start + args.batch_size], n_actions[start : start + args.batch_size]
            )
            rows.append(logprobs.float().exp().cpu())
        width = max(r.shape[1] for r in rows)
        return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])

    observations = stage_observations(env, stage_states(env.stage))
    # the reflector's greedy plans are memoised by prompt: these are plan_accuracy's, not decoded again
    result = plan_reading(score, observations, reflect(observations), policy.labels)
    return {"policy_path": args.policy_path, **result}


if __name__ == "__main__":
    main()
