"""The six small environments of ICPI (Brooks et al., "Large Language Models Can Implement Policy Iteration",
NeurIPS 2023), with the Python-like text the method shows a language model.

    chain             pos 0..7, goal 4, start uniform; left / try_goal / right; try_goal ends the episode,
                      reward 1 iff pos == 4. Time limit 8, max_q_steps 6, optimal 0.8^|s0 - 4|.
    distractor_chain  chain with state [pos, distractor]; the distractor is redrawn uniformly every step.
    maze              3x3 cells C(i, j), goal C(i=1, j=0), walls (1,0)|(1,1) and (1,1)|(2,1); left/down/up/right.
                      The step taken *while on the goal* gives reward 1 and ends the episode (checked before
                      moving). Start uniform over the 9 cells; time limit 8, max_q_steps 6, optimal 0.8^(BFS).
    mini_catch        bsuite catch, 5 rows x 4 columns: paddle at x = 2, ball at x ~ U{0..3}, y = 4, falling one
                      row a step; left/stay/right. The step after the ball reaches y = 0 ends the episode with
                      reward 1 iff paddle.x == ball.x. gamma 1, optimal 1, max_q_steps 5.
    mini_invaders     width 4, 2 aliens spawned at y = 5, ship and alien x's distinct. A step: (1) shoot gives +1
                      per live alien above the ship, which dies; (2) a live alien at y == 0 ends the episode;
                      (3) aliens descend; (4) no alien left ends it; (5) the ship moves -1/0/+1 (left/shoot/
                      right, clipped). At most 6 steps; gamma 0.8 for Q, the logged return is undiscounted
                      (optimal 2); max_q_steps 8.
    point_mass        pos ~ U(-6, -2) or U(2, 6), vel 0; decel/accel: pos += vel (the old vel), then vel -/+ 1.
                      |pos| <= 2 and vel == 0, checked before acting, gives reward 1 and ends the episode.
                      Time limit 8, max_q_steps 8, optimal 0.8^(2 ceil(sqrt(|pos0| - 2))).

(``../shared/reference/icrl_baselines.md`` C.4.) Every environment is two things:

* the **ICPI side** the algorithm (``evaluation/icpi.py``) uses: pure dynamics ``start_state(rng)`` and
  ``transition(state, action, rng)``, the text of a state, an action, a reward and a done flag
  (``state_str(state, hint)``, ``action_str(a)``, ``reward_str(r)``, ``done_str(done)``, ``initial_str``), the
  policy-prompt rendering of a step (``ts_to_string``), and parsers from a model's completion back to a
  state / action / reward / done that return None when the completion is malformed;
* a :class:`envs.base.TextEnv` the rest of the toolkit plays: the observation text is the state text, the
  actions are the action names, ``reset(seed)`` is seeded, and an exhaustive-search oracle gives the optimal
  action (every environment here is small and, but for chain's distractor, deterministic). An invalid action
  is replaced by a uniformly random one, as ICPI does with a policy completion it cannot parse.

States are plain tuples (hashable, JSON-able as nested lists: :func:`as_state` turns them back).
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from envs.base import Observation, TextEnv

State = tuple


@dataclass
class TimeStep:
    """One transition as ICPI stores it. ``done`` is False on a step the time limit cut (C.1)."""

    state: State
    action: int
    reward: float
    done: bool
    next_state: State


def as_state(value: Any) -> Any:
    """A state read back from JSON: lists become tuples, all the way down."""
    return tuple(as_state(v) for v in value) if isinstance(value, list | tuple) else value


_DONE = re.compile(r"\s*assert (not )?done\b")
_REWARD = re.compile(r"\s*assert reward == (\d+)\b")


class IcpiEnv(TextEnv):
    """What the six environments share: text conventions, the TextEnv adapter, the search oracle."""

    name: ClassVar[str] = ""
    actions: ClassVar[tuple[str, ...]] = ()
    time_limit: ClassVar[int | None] = 8  # gym TimeLimit in the original; None: the episode ends by itself
    horizon: ClassVar[int] = 8  # the most steps an episode can take
    max_q_steps: ClassVar[int] = 6  # rollout length of Q estimation
    gamma: ClassVar[float] = 0.8  # discount of Q estimation
    log_gamma: ClassVar[float] = 0.8  # discount of the logged return that regret compares with the optimum
    failure_threshold: ClassVar[float] = 0.0
    initial_str: ClassVar[str] = "\nstate, reward = reset()\n"
    action_stop: ClassVar[str] = "\n"
    reward_stop: ClassVar[str] = "\n"
    # policy examples (ts_to_string): chain, maze and point-mass print the reward as a float ("0.0");
    # catch and invaders add the done line; catch, invaders and point-mass add the terminal next state
    policy_float_reward: ClassVar[bool] = True
    policy_done_line: ClassVar[bool] = False
    policy_terminal_state: ClassVar[bool] = False
    has_expert = True

    def __init__(self, hint: bool = True):
        self.hint = hint
        self.rng = np.random.default_rng()
        self.state: State | None = None
        self.start: State | None = None
        self.t = 0
        self.rewards: list[float] = []
        self.done = True

    # -- dynamics (pure: the algorithm and the tests call them on any state) --------------------------------
    @abstractmethod
    def start_state(self, rng: np.random.Generator) -> State:
        """A draw from the start distribution."""

    @abstractmethod
    def transition(self, state: State, action: int, rng: np.random.Generator) -> tuple[State, float, bool]:
        """(next state, reward, terminated) of ``action`` in ``state``; the time limit is not applied here."""

    @abstractmethod
    def optimal_return(self, start: State) -> float:
        """The best return from ``start``, discounted by ``log_gamma`` (what regret is measured against)."""

    def success(self, rewards: list[float], terminated: bool) -> bool:
        """Whether a finished episode solved the task (default: it ended on a positive reward)."""
        return terminated and bool(rewards) and rewards[-1] > 0

    # -- text ---------------------------------------------------------------------------------------------
    @abstractmethod
    def state_text(self, state: State, hint: bool = True) -> str:
        """``assert ...`` for ``state``, with the hint clauses when ``hint``; no trailing newline."""

    @abstractmethod
    def action_text(self, action: int) -> str:
        """The action's code up to (not including) ``action_stop``."""

    @abstractmethod
    def parse_state(self, text: str) -> State | None:
        """The state a completion describes (hint clauses are not checked), None if it is not one."""

    def state_str(self, state: State, hint: bool = True) -> str:
        return self.state_text(state, hint) + "\n"

    def action_str(self, action: int) -> str:
        return self.action_text(action) + self.action_stop

    def reward_str(self, reward: float) -> str:
        return f"assert reward == {int(reward)}"

    def done_str(self, done: bool) -> str:
        return "assert done" if done else "assert not done"

    def ts_to_string(self, ts: TimeStep, hint: bool = True) -> str:
        """A step as the policy prompt shows it (C.4 'Common')."""
        reward = f"assert reward == {float(ts.reward)}" if self.policy_float_reward else self.reward_str(ts.reward)
        parts = [self.state_str(ts.state, hint), self.action_str(ts.action), reward, self.reward_stop]
        if self.policy_done_line:
            parts += [self.done_str(ts.done), "\n"]
        if self.policy_terminal_state and ts.done:
            parts.append(self.state_str(ts.next_state, hint))
        return "".join(parts)

    def parse_action(self, text: str) -> int | None:
        """The action whose code a completion is (its first line; the rest of catch's two-line action is fixed)."""
        first = text.strip().split("\n")[0].strip()
        matches = [a for a in range(len(self.actions)) if self.action_text(a).split("\n")[0] == first]
        return matches[0] if len(matches) == 1 else None

    @staticmethod
    def parse_done(text: str) -> bool | None:
        match = _DONE.match(text)
        return None if match is None else match.group(1) is None

    @staticmethod
    def parse_reward(text: str) -> float | None:
        match = _REWARD.match(text)
        return None if match is None else float(match.group(1))

    # -- TextEnv --------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        self.rng = np.random.default_rng(seed)
        self.state = self.start = self.start_state(self.rng)
        self.t, self.rewards, self.done = 0, [], False
        return self.observation()

    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        invalid = action is None or not 0 <= action < len(self.actions)
        if invalid:  # ICPI's rule for a policy completion it cannot parse: a random action
            action = int(self.rng.integers(len(self.actions)))
        next_state, reward, terminated = self.transition(self.state, action, self.rng)
        self.t += 1
        self.rewards.append(reward)
        truncated = not terminated and self.time_limit is not None and self.t >= self.time_limit
        self.done = terminated or truncated
        info = {
            "success": self.success(self.rewards, terminated),
            "invalid_action": invalid,
            "action": action,
            "state": next_state,
            "optimal": self.optimal_return(self.start),
        }
        self.state = next_state
        return self.observation(), reward, terminated, truncated, info

    def current_actions(self) -> list[str]:
        return list(self.actions)

    def observation(self) -> Observation:
        return Observation(self.state_text(self.state, self.hint), list(self.actions), {"state": self.state})

    def state_key(self) -> State:
        return self.state

    def oracle_action(self) -> int:
        steps_left = (self.time_limit or self.horizon) - self.t
        return self.best_action(self.state, steps_left)

    def best_action(self, state: State, steps_left: int) -> int:
        """The first action of a best ``gamma``-discounted plan of ``steps_left`` steps (ties: the first action).
        The draws of chain's distractor come from a fixed generator: they change no reward."""
        rng = np.random.default_rng(0)
        memo: dict[tuple, float] = {}

        def value(s: State, left: int) -> float:
            if left == 0:
                return 0.0
            if (s, left) not in memo:
                memo[(s, left)] = max(q(s, a, left) for a in range(len(self.actions)))
            return memo[(s, left)]

        def q(s: State, a: int, left: int) -> float:
            nxt, r, done = self.transition(s, a, rng)
            return r + (0.0 if done else self.gamma * value(nxt, left - 1))

        values = [q(state, a, steps_left) for a in range(len(self.actions))]
        return int(np.argmax(values))


# -------------------------------------------------------------------------------------------------------
# chain and distractor chain (icpi/chain.py: d = 1 and d = 2)
# -------------------------------------------------------------------------------------------------------


class ChainEnv(IcpiEnv):
    name = "chain"
    actions = ("left", "try_goal", "right")
    n, goal, d = 8, 4, 1
    max_q_steps = 2 + max(8 - 4, 4)  # the original's 2 + max(n - goal, goal) = 6

    def start_state(self, rng):
        return tuple(int(x) for x in rng.integers(self.n, size=self.d))

    def transition(self, state, action, rng):
        # the distractor is redrawn before the move, every step (d = 1 draws nothing)
        tail = tuple(int(x) for x in rng.integers(self.n, size=self.d - 1))
        pos = min(max(state[0] + action - 1, 0), self.n - 1)
        done = action == 1
        return (pos, *tail), float(done and pos == self.goal), done

    def optimal_return(self, start):
        return self.gamma ** abs(start[0] - self.goal)

    def state_text(self, state, hint=True):
        text = f"assert state == {list(state)}"
        if hint:
            goal = [self.goal, *state[1:]]
            text += f" and state {'==' if list(state) == goal else '!='} {goal}"
        return text

    def action_text(self, action):
        if action == 1:
            return "reward = try_goal(state)"
        return f"state = {self.actions[action]}()"

    def parse_state(self, text):
        pattern = r"\s*assert state == \[" + ", ".join([r"(\d+)"] * self.d) + r"\]"
        match = re.match(pattern, text)
        if match is None:
            return None
        state = tuple(int(x) for x in match.groups())
        return state if all(x < self.n for x in state) else None


class DistractorChainEnv(ChainEnv):
    name = "distractor_chain"
    d = 2


# -------------------------------------------------------------------------------------------------------
# maze (icpi/maze.py)
# -------------------------------------------------------------------------------------------------------

MAZE_SIZE = 3
MAZE_GOAL = (1, 0)
MAZE_WALLS = frozenset({frozenset({(1, 0), (1, 1)}), frozenset({(1, 1), (2, 1)})})
MAZE_DELTAS = ((0, -1), (1, 0), (-1, 0), (0, 1))  # left, down, up, right


def maze_move(cell: tuple[int, int], action: int) -> tuple[int, int]:
    """The cell after ``action``: a wall or the maze's edge leaves the agent in place."""
    di, dj = MAZE_DELTAS[action]
    nxt = (cell[0] + di, cell[1] + dj)
    inside = 0 <= nxt[0] < MAZE_SIZE and 0 <= nxt[1] < MAZE_SIZE
    return nxt if inside and frozenset({cell, nxt}) not in MAZE_WALLS else cell


def maze_distances() -> dict[tuple[int, int], int]:
    """BFS moves from every cell to the goal (moves are symmetric, so BFS from the goal)."""
    dist = {MAZE_GOAL: 0}
    queue = deque([MAZE_GOAL])
    while queue:
        cell = queue.popleft()
        for action in range(len(MAZE_DELTAS)):
            nxt = maze_move(cell, action)
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist


class MazeEnv(IcpiEnv):
    name = "maze"
    actions = ("left", "down", "up", "right")
    max_q_steps = MAZE_SIZE + MAZE_SIZE  # the original's height + width

    def __init__(self, hint: bool = True):
        super().__init__(hint)
        self.distances = maze_distances()

    def start_state(self, rng):
        return (int(rng.integers(MAZE_SIZE)), int(rng.integers(MAZE_SIZE)))

    def transition(self, state, action, rng):
        success = state == MAZE_GOAL  # the reward comes on the step taken while on the goal
        return maze_move(state, action), float(success), success

    def optimal_return(self, start):
        return self.gamma ** self.distances[start]

    def state_text(self, state, hint=True):
        text = f"assert state == C(i={state[0]}, j={state[1]})"
        if hint:
            text += f" and state {'==' if state == MAZE_GOAL else '!='} C(i={MAZE_GOAL[0]}, j={MAZE_GOAL[1]})"
        return text

    def action_text(self, action):
        return f"state, reward = {self.actions[action]}()"

    def parse_state(self, text):
        match = re.match(r"\s*assert state == C\(i=(\d+), j=(\d+)\)", text)
        if match is None:
            return None
        state = (int(match.group(1)), int(match.group(2)))
        return state if max(state) < MAZE_SIZE else None


# -------------------------------------------------------------------------------------------------------
# mini catch (icpi/catch.py: bsuite catch, rows 5, columns 4)
# -------------------------------------------------------------------------------------------------------


class MiniCatchEnv(IcpiEnv):
    """State (paddle_x, ball_x, ball_y); the paddle's y is 0."""

    name = "mini_catch"
    actions = ("left", "stay", "right")
    rows, columns = 5, 4
    time_limit = None
    horizon = 5  # the ball falls 4 rows, then the termination step
    max_q_steps = 5  # rows
    gamma = 1.0
    log_gamma = 1.0
    initial_str = "\npaddle, ball = reset()\n"
    action_stop = "\nball.descend()\n"
    policy_float_reward = False
    policy_done_line = True
    policy_terminal_state = True

    def start_state(self, rng):
        return (self.columns // 2, int(rng.integers(self.columns)), self.rows - 1)

    def transition(self, state, action, rng):
        paddle, ball_x, ball_y = state
        if ball_y == 0:  # bsuite checks for the catch before moving: this step ends the episode
            return state, float(paddle == ball_x), True
        paddle = min(max(paddle + action - 1, 0), self.columns - 1)
        return (paddle, ball_x, ball_y - 1), 0.0, False

    def optimal_return(self, start):
        return 1.0

    def state_text(self, state, hint=True):
        paddle, ball_x, ball_y = state
        text = f"assert paddle == C({paddle}, 0) and ball == C({ball_x}, {ball_y})"
        if hint:
            op = "<" if paddle < ball_x else ">" if paddle > ball_x else "=="
            text += f" and paddle.x == {paddle} and ball.x == {ball_x} and paddle.x {op} ball.x and ball.y == {ball_y}"
        return text

    def action_text(self, action):
        return f"reward = paddle.{self.actions[action]}()"

    def parse_state(self, text):
        match = re.match(r"\s*assert paddle == C\((\d+), 0\) and ball == C\((\d+), (\d+)\)", text)
        if match is None:
            return None
        paddle, ball_x, ball_y = (int(x) for x in match.groups())
        ok = paddle < self.columns and ball_x < self.columns and ball_y < self.rows
        return (paddle, ball_x, ball_y) if ok else None


# -------------------------------------------------------------------------------------------------------
# mini space invaders (icpi/space_invaders.py: width 4, height 5, 2 aliens)
# -------------------------------------------------------------------------------------------------------


class MiniInvadersEnv(IcpiEnv):
    """State (ship_x, aliens): each alien is (x, y), or None once shot down."""

    name = "mini_invaders"
    actions = ("left", "shoot", "right")
    width, height, n_aliens = 4, 5, 2
    time_limit = None
    horizon = 6  # aliens spawn at y = 5 and land on the 6th step
    max_q_steps = 4 * 2  # width * n_aliens
    log_gamma = 1.0  # the logged return is undiscounted; Q still uses gamma 0.8
    failure_threshold = 1.0
    initial_str = "\nship, aliens = reset()\n"
    reward_stop = "()\n"
    policy_float_reward = False
    policy_done_line = True
    policy_terminal_state = True

    def start_state(self, rng):
        ship, *xs = (int(x) for x in rng.choice(self.width, size=self.n_aliens + 1, replace=False))
        return (ship, tuple((x, self.height) for x in xs))

    def transition(self, state, action, rng):
        ship, aliens = state
        reward, done, after = 0.0, False, []
        for alien in aliens:
            if action == 1 and alien is not None and alien[0] == ship:  # (1) shot down
                reward += 1.0
                alien = None
            if alien is not None and alien[1] == 0:  # (2) an alien that landed ends the episode
                done = True
            after.append(None if alien is None else (alien[0], alien[1] - 1))  # (3) descend
        if all(alien is None for alien in after):  # (4) none left
            done = True
        ship = min(max(ship + action - 1, 0), self.width - 1)  # (5) the ship moves last
        return (ship, tuple(after)), reward, done

    def optimal_return(self, start):
        return float(self.n_aliens)

    def success(self, rewards, terminated):
        return sum(rewards) >= self.n_aliens

    def reward_str(self, reward):
        # the reward line is followed by the descent the step makes; reward_stop "()\n" closes it
        return f"assert reward == {int(reward)}\nfor a in aliens:\n    a.descend"

    def ts_to_string(self, ts, hint=True):
        # the original closes an invaders episode's terminal state with one more newline
        return super().ts_to_string(ts, hint) + ("\n" if ts.done else "")

    def state_text(self, state, hint=True):
        ship, aliens = state
        shown = ", ".join("None" if a is None else f"C({a[0]}, {a[1]})" for a in aliens)
        parts = [f"ship == C({ship}, 0)", f"aliens == [{shown}]"]
        if hint:
            alive = [(i, a) for i, a in enumerate(aliens) if a is not None]
            lhs = ", ".join(["ship.x"] + [f"aliens[{i}].x" for i, _ in alive])
            rhs = ", ".join([str(ship)] + [str(a[0]) for _, a in alive])
            parts.append(f"({lhs}) == ({rhs})")
            for i, a in alive:
                op = "<" if ship < a[0] else ">" if ship > a[0] else "=="
                parts.append(f"ship.x {op} aliens[{i}].x")
        return "assert " + " and ".join(parts)

    def action_text(self, action):
        if action == 1:
            return "reward = ship.shoot(aliens)"
        return f"ship.{self.actions[action]}()"

    def parse_state(self, text):
        match = re.match(r"\s*assert ship == C\((\d+), 0\) and aliens == \[([^\]]*)\]", text)
        if match is None:
            return None
        ship, inner = int(match.group(1)), match.group(2)
        items = [m for m in re.finditer(r"C\((\d+), (\d+)\)|None", inner)]
        if ", ".join(m.group(0) for m in items) != inner or ship >= self.width or len(items) != self.n_aliens:
            return None
        aliens = tuple(None if m.group(0) == "None" else (int(m.group(1)), int(m.group(2))) for m in items)
        if any(a is not None and (a[0] >= self.width or a[1] > self.height) for a in aliens):
            return None
        return (ship, aliens)


# -------------------------------------------------------------------------------------------------------
# point mass (icpi/point_mass.py: max_distance 6, pos_threshold 2)
# -------------------------------------------------------------------------------------------------------


class PointMassEnv(IcpiEnv):
    """State (pos, vel); vel stays an integer (it changes by 1 a step)."""

    name = "point_mass"
    actions = ("decel", "accel")
    max_distance, threshold = 6, 2
    max_q_steps = 8
    initial_str = "\npos, vel = reset()\n"
    policy_terminal_state = True

    def start_state(self, rng):
        # the original draws both sides, then picks one: equal odds, uniform within each
        left = rng.uniform(-self.max_distance, -self.threshold)
        right = rng.uniform(self.threshold, self.max_distance)
        return (float(rng.choice([left, right])), 0)

    def transition(self, state, action, rng):
        pos, vel = state
        success = abs(pos) <= self.threshold and vel == 0  # checked before acting
        return (pos + vel, vel + (1 if action == 1 else -1)), float(success), success

    def optimal_return(self, start):
        # accelerate k steps then brake k steps covers k^2: the least k with k^2 >= the distance, plus one
        # step to collect the reward at rest
        return self.gamma ** (2 * math.ceil(math.sqrt(abs(start[0]) - self.threshold)))

    def state_text(self, state, hint=True):
        pos, vel = state
        text = f"assert pos == {pos:.2f} and vel == {vel:.2f}"
        if hint:
            t = self.threshold
            where = f"pos < {-t}" if pos < -t else f"{t} < pos" if pos > t else f"{-t} <= pos <= {t}"
            text += f" and {where} and vel {'==' if vel == 0 else '!='} 0"
        return text

    def action_text(self, action):
        return f"pos, vel = {self.actions[action]}(pos, vel)"

    def parse_state(self, text):
        match = re.match(r"\s*assert pos == (-?\d+\.\d+) and vel == (-?\d+\.\d+)", text)
        if match is None:
            return None
        return (float(match.group(1)), float(match.group(2)))


ENVS: dict[str, type[IcpiEnv]] = {
    cls.name: cls for cls in (ChainEnv, DistractorChainEnv, MazeEnv, MiniCatchEnv, MiniInvadersEnv, PointMassEnv)
}


def make_icpi_env(stage: str, hint: bool = True) -> IcpiEnv:
    if stage not in ENVS:
        raise ValueError(f"unknown ICPI environment {stage!r}; choose one of {', '.join(ENVS)}")
    return ENVS[stage](hint=hint)
