"""Taxi reflections: the built-in rule-based reflector and the chat messages for an API reflector.

A reflection says what the last action did, whether it helped, and the plan (the oracle's next
action), as the paper's GPT-4 reflections did with their "spoiler" of the best action. The verdict on
the last action is written only when the prompt shows it (``--taxi_history true``): a reflector that
cannot see the last action could only guess it, so without history a reflection is the plan alone.
"""

from __future__ import annotations

from envs.taxi import ACTIONS, IN_TAXI, LOCS, TaxiEnv, decode, goal_distances

SYSTEM_PROMPT = (
    "You are a reflectioner helping a taxi driver on a 5x5 grid. Given the current state, write a short "
    "reflection: the consequence of the last action, whether it was good or bad and why, and what to do "
    "next. You are told the best next action as a spoiler: use it to plan, but never mention that you "
    "were told. At most 100 words."
)


def _phase(state: int) -> str:
    return "drop-off" if decode(state)[2] == IN_TAXI else "pick-up"


def _target(state: int) -> tuple[int, int]:
    _, _, passenger, destination = decode(state)
    return LOCS[destination] if passenger == IN_TAXI else LOCS[passenger]


def rule_reflection(
    env: TaxiEnv, prev_state: int | None, action: int | None, state: int, plan_action: int | None = None
) -> str:
    """What ``action`` did between ``prev_state`` and ``state``, and the plan from ``state``.

    ``prev_state=None`` is the first step of an episode: only the plan. ``plan_action`` replaces the
    oracle's action in the plan (a swapped example's reflection).
    """
    best = ACTIONS[env.oracle_action_at(state) if plan_action is None else plan_action]
    phase = _phase(state)
    # Steps to the next milestone (pick-up, then drop-off); the drop-off counts its final action.
    left = int(goal_distances("pickup" if phase == "pick-up" else "deliver")[state])
    # The decision first: a small reflector then predicts it from the state alone, not after a distance
    # it may have miscounted (plan accuracy 0.85 vs 0.81 for the other order, 400 SFT steps of tiny-gpt2).
    plan = f"Best next action: {best}. The {phase} at {_target(state)} is {left} step{'' if left == 1 else 's'} away."
    if not env.history:
        return plan
    if prev_state is None or action is None:
        return f"Start. {plan}"
    name = ACTIONS[action]
    if decode(prev_state)[2] != IN_TAXI and decode(state)[2] == IN_TAXI:
        return f"'{name}' picked up the passenger, good. {plan}"
    # The verdict uses the whole stage's distance: a good action shortens it by exactly one step.
    if env.distance_to_goal(state) < env.distance_to_goal(prev_state):
        return f"'{name}' was good: it got closer. {plan}"
    return f"'{name}' was a mistake: it is not on a shortest path. {plan}"


def api_messages(env: TaxiEnv, state_text: str, state: int, first_step: bool) -> list[dict]:
    """The paper's request to its GPT-4 reflectioner (its data_gen/taxi/reflection.py format)."""
    best = ACTIONS[env.oracle_action_at(state)]
    ask = "Give me a one-sentence analysis on what I should do" if first_step else "Give me a two-sentence reflection"
    user = (
        f"------ State ------\n{state_text}\n\n"
        f"--- Spoiler: the best action you should take next is {best} ---\n\n------ {ask} ---"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
