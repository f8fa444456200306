"""DangerousTaxi (Reflect-RL section 5.2): gymnasium's Taxi as text, where a step that changes nothing
ends the episode.

Dynamics are gymnasium's ``Taxi-v4`` with its defaults (the v3 dynamics: 500 states, 6 actions,
deterministic). Changes, as in the paper:

- **Danger rule.** A step that leaves the state unchanged (a wall bump, an illegal pick-up or
  drop-off, or an invalid action) gives -10 and ends the episode. The original applied it only from
  the second step on, an artefact of comparing rendered grids; here it applies to every step.
- **Rewards** are gymnasium's (-1 a step, +20 on delivery) divided by 20, plus a pick-up bonus of
  +1 (20/20) the first time the passenger boards (stages ``pickup`` and ``full``).
- **Horizon** 15 steps, then ``truncated``.
- ``reward="success"`` (not in the paper) pays 1 for finishing the stage and 0 otherwise;
  ``reward="success_danger"`` also keeps the paper's -0.5 for the danger rule (no cost per step);
  ``reward="progress"`` is ``success`` plus 0.1 for each step of the oracle's distance to the goal
  that a move gains (minus 0.1 for each it loses; a crash gains nothing and ends the episode): a dense
  signal, potential-based shaping (Ng et al. 1999) in the undiscounted sum, which over an episode is
  0.1 times the distance covered, so it cannot pay more than finishing.
- **Stages** (curriculum): ``pickup`` ends with success on the first pick-up; ``dropoff`` starts
  with the passenger already in the taxi, at the spot where it was picked up (what the original's
  oracle replay produced), and succeeds on delivery; ``full`` succeeds on delivery. With
  ``dropoff_start="anywhere"`` the drop-off stage starts with the passenger in the taxi on any cell but
  the destination (96 start states instead of 12). Success is
  ``info["success"]`` and is reachable in every stage (the original's threshold of -1 for the
  non-curriculum setting was not).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gymnasium.envs.toy_text.taxi import TaxiEnv as GymTaxi

from envs.base import Observation, TextEnv

ACTIONS = ["move south", "move north", "move east", "move west", "pick up passenger", "drop off passenger"]
STAGES = ("pickup", "dropoff", "full")
REWARDS = ("paper", "success", "success_danger", "progress")
PROGRESS_REWARD = 0.1  # per step of the distance to the goal gained (reward="progress")
DROPOFF_STARTS = ("pickup", "anywhere")
IN_TAXI = 4
REWARD_SCALE = 20.0
DANGER_REWARD = -10.0 / REWARD_SCALE
PICKUP_BONUS = 20.0 / REWARD_SCALE

INSTRUCTIONS = (
    "You drive a taxi on a 5x5 grid. Pick up the passenger and drop them off at the destination. "
    "Map: T taxi, P passenger, D destination, O taxi on the passenger's cell, X taxi carrying the "
    "passenger; '|' is a wall. A move into a wall, or a pick-up or drop-off that is not allowed, "
    "ends the episode."
)


@cache
def _gym() -> GymTaxi:
    """One gymnasium Taxi for its transition table and map (read-only)."""
    return GymTaxi()


def transition(state: int, action: int) -> tuple[int, float, bool]:
    """Gymnasium's deterministic transition: (next_state, raw reward, delivered)."""
    ((_, next_state, reward, delivered),) = _gym().P[state][action]
    return int(next_state), float(reward), bool(delivered)


def decode(state: int) -> tuple[int, int, int, int]:
    """(taxi_row, taxi_col, passenger_index, destination_index); passenger 4 means in the taxi."""
    return tuple(int(v) for v in _gym().decode(state))


def encode(row: int, col: int, passenger: int, destination: int) -> int:
    return int(_gym().encode(row, col, passenger, destination))


LOCS = [tuple(loc) for loc in _gym().locs]  # the four landmarks R, G, Y, B as (row, col)


@cache
def goal_distances(goal: str) -> np.ndarray:
    """Fewest steps from every state to the goal, never taking a no-op step (which would end the
    episode). ``goal`` is ``pickup`` (passenger in the taxi) or ``deliver``. Unreachable: inf.

    Dynamic programming on the transition table, iterated to a fixed point (at most ~20 sweeps).
    """
    n_states, n_actions = 500, len(ACTIONS)
    dist = np.full(n_states, np.inf)
    if goal == "pickup":
        for s in range(n_states):
            if decode(s)[2] == IN_TAXI:
                dist[s] = 0.0
    changed = True
    while changed:
        changed = False
        for s in range(n_states):
            if goal == "pickup" and dist[s] == 0.0:
                continue
            best = dist[s]
            for a in range(n_actions):
                ns, _, delivered = transition(s, a)
                if goal == "deliver" and delivered:
                    best = min(best, 1.0)
                elif ns != s:
                    best = min(best, 1.0 + dist[ns])
            if best < dist[s]:
                dist[s], changed = best, True
    return dist


def stage_goal(stage: str, state: int) -> str:
    """The goal the oracle steers towards: pick-up first unless the stage is ``pickup`` only."""
    return "pickup" if stage == "pickup" else "deliver"


def action_values(state: int, stage: str) -> list[float]:
    """Steps-to-goal after each action (inf for no-op actions, 0 for the finishing action)."""
    goal = stage_goal(stage, state)
    dist = goal_distances(goal)
    values = []
    for a in range(len(ACTIONS)):
        ns, _, delivered = transition(state, a)
        if ns == state:
            values.append(np.inf)
        elif goal == "deliver" and delivered:
            values.append(0.0)
        else:
            values.append(float(dist[ns]))
    return values


def optimal_actions(state: int, stage: str = "full") -> list[int]:
    """All actions on a shortest path to the stage's goal."""
    values = action_values(state, stage)
    best = min(values)
    return [a for a, v in enumerate(values) if v == best and np.isfinite(v)]


def oracle_action(state: int, stage: str = "full") -> int:
    """The BFS oracle: the lowest-index optimal action (deterministic)."""
    return optimal_actions(state, stage)[0]


def render_grid(state: int) -> str:
    """Gymnasium's ASCII map with cells T, P, D, O (taxi on passenger) or X (passenger in taxi);
    the landmark letters R/G/Y/B are erased so only the marks carry information."""
    row, col, passenger, destination = decode(state)
    desc = [[c.decode() for c in line] for line in _gym().desc.tolist()]
    for r, c in LOCS:
        desc[1 + r][2 * c + 1] = " "

    def mark(r: int, c: int, ch: str) -> None:
        desc[1 + r][2 * c + 1] = ch

    mark(*LOCS[destination], "D")
    if passenger == IN_TAXI:
        mark(row, col, "X")
    else:
        mark(*LOCS[passenger], "P")
        mark(row, col, "O" if (row, col) == LOCS[passenger] else "T")
    return "\n".join("".join(line) for line in desc)


def describe_positions(state: int) -> str:
    """The plain-coordinates line (the ``coordinates`` option)."""
    row, col, passenger, destination = decode(state)
    where = "in the taxi" if passenger == IN_TAXI else f"at {LOCS[passenger]}"
    return f"Taxi at ({row}, {col}), passenger {where}, destination at {LOCS[destination]}."


class TaxiEnv(TextEnv):
    """DangerousTaxi as a text environment. See the module docstring for the rules."""

    has_expert = True  # the BFS oracle

    def __init__(
        self,
        stage: str = "full",
        horizon: int = 15,
        danger: bool = True,
        coordinates: bool = False,
        instructions: bool = False,
        history: bool = True,
        reward: str = "paper",
        dropoff_start: str = "pickup",
    ):
        if reward not in REWARDS:
            raise ValueError(f"unknown Taxi reward {reward!r}; choose one of {', '.join(REWARDS)}")
        if stage not in STAGES:
            raise ValueError(f"unknown Taxi stage {stage!r}; choose one of {', '.join(STAGES)}")
        if horizon <= 0:
            raise ValueError("the Taxi horizon must be positive")
        if dropoff_start not in DROPOFF_STARTS:
            raise ValueError(f"unknown drop-off start {dropoff_start!r}; choose one of {', '.join(DROPOFF_STARTS)}")
        self.dropoff_start = dropoff_start
        self.stage, self.horizon, self.danger = stage, horizon, danger
        self.coordinates, self.instructions, self.history = coordinates, instructions, history
        self.reward_mode = reward
        self.state = 0
        self.steps = 0
        self.picked_up = False
        self.done = True
        self.action_history: list[str] = []

    # -- interface ----------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        rng = np.random.default_rng(seed)
        starts = np.flatnonzero(_gym().initial_state_distrib)  # 300 states: passenger waiting, not at dest
        state = int(rng.choice(starts))
        if self.stage == "dropoff":
            row, col, passenger, destination = decode(state)
            if self.dropoff_start == "anywhere":
                cells = [(r, c) for r in range(5) for c in range(5) if (r, c) != LOCS[destination]]
                row, col = cells[int(rng.integers(len(cells)))]
                state = encode(row, col, IN_TAXI, destination)
            else:
                state = encode(*LOCS[passenger], IN_TAXI, destination)
        self.state, self.steps, self.done = state, 0, False
        self.picked_up = self.stage == "dropoff"
        self.action_history = []
        return self.observation()

    def step(self, action: int | None):
        if self.done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        invalid = action is None or not 0 <= action < len(ACTIONS)
        prev = self.state
        self.steps += 1
        if invalid:
            next_state, raw, delivered = prev, -10.0, False
        else:
            next_state, raw, delivered = transition(prev, action)
        self.action_history.append("(invalid action)" if invalid else ACTIONS[action])
        reward, terminated, success = raw / REWARD_SCALE, False, False
        if next_state == prev and (self.danger or invalid):
            reward, terminated = DANGER_REWARD, True
        elif delivered:
            terminated = success = self.stage != "pickup"
        elif decode(next_state)[2] == IN_TAXI and not self.picked_up:
            self.picked_up = True
            reward += PICKUP_BONUS
            terminated = success = self.stage == "pickup"
        if self.reward_mode == "success":
            # Only finishing the stage pays. Under the paper's shaping a policy that never succeeds
            # does best by crashing at once (-0.5 beats wandering at -0.05 a step and then crashing).
            reward = 1.0 if success else 0.0
        elif self.reward_mode == "success_danger":
            # Finishing pays 1 and the danger rule still costs the paper's -0.5, with no cost per step:
            # a policy that cannot finish yet learns to stay alive (and so finds the goal more often).
            reward = 1.0 if success else DANGER_REWARD if terminated else 0.0
        elif self.reward_mode == "progress":
            # Every move is scored, not only the rare finished episode; looping gains nothing. No crash cost:
            # with one, RL first learned to stay alive, turned deterministic and looped.
            dist = goal_distances(stage_goal(self.stage, prev))
            gained = 0.0 if invalid else dist[prev] - (0.0 if success else dist[next_state])
            reward = (1.0 if success else 0.0) + PROGRESS_REWARD * float(gained)
        self.state = next_state
        truncated = not terminated and self.steps >= self.horizon
        self.done = terminated or truncated
        info = {"success": success, "invalid_action": invalid, "state": next_state, "prev_state": prev}
        return self.observation(), reward, terminated, truncated, info

    def current_actions(self) -> list[str]:
        return list(ACTIONS)

    # -- helpers ------------------------------------------------------------------------------------
    def observation(self) -> Observation:
        parts = [INSTRUCTIONS] if self.instructions else []
        if self.history:
            done = "\n".join(self.action_history) if self.action_history else "(none)"
            parts.append(f"You have already completed the following actions:\n{done}")
        state = f"--- Current State ---\n{render_grid(self.state)}"
        if self.coordinates:
            state += "\n" + describe_positions(self.state)
        parts.append(state)
        return Observation(text="\n\n".join(parts), actions=list(ACTIONS), extra={"state": self.state})

    def oracle_action(self) -> int:
        return oracle_action(self.state, self.stage)

    def state_key(self) -> tuple:
        """The grid state, plus the action history when the observation shows it (then it is part of
        what the policy sees) and whether the passenger was picked up (it changes the rewards)."""
        history = tuple(self.action_history) if self.history else ()
        return (self.state, self.picked_up, history)

    def oracle_action_at(self, state: int) -> int:
        return oracle_action(state, self.stage)

    def distance_to_goal(self, state: int | None = None) -> float:
        """Steps the oracle needs from ``state`` (default: now) to finish this stage."""
        s = self.state if state is None else state
        return float(goal_distances(stage_goal(self.stage, s))[s])
