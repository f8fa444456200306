"""ALFWorld as a text environment (Reflect-RL section 3.3; the paper's ``nat_lang_envs/alfworld_env.py``).

- **Games**: ``game.tw-pddl`` files played by the real engine (:mod:`envs.alfworld.engine`): generated offline
  (:mod:`envs.alfworld.generator`) or the official ones under ``$ALFWORLD_DATA`` (:func:`official_games`).
  ``reset(seed)`` plays game ``seed % len(games)``.
- **Observation**: the game's first text (the room and "Your task is to: ..."), then the paper's
  "Here is the previous path:" with the last ``history`` steps (action and what it showed), numbered from the
  episode's start. The admissible commands are the choices (the engine's, sorted, without ``help``).
- **Rewards**: 1 when the game is won (the engine's score), else 0; success is the win. An invalid label costs a
  step with reward 0 and changes nothing (the paper re-prompted). Horizon 15 as the paper (GiGPO uses 50).
- **Faults**: an engine crash, a step past ``step_timeout`` or a game file the engine cannot read marks that
  game bad for every environment of the process (:data:`BAD_GAMES`), is counted in :attr:`AlfWorldEnv.faults`
  and ``info["fault"]``, and never raises: a reset skips bad games, a fault mid-episode ends it (truncated,
  reward 0, no success). Only a game list with no good game left is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from envs.alfworld.engine import Engine, EngineFault
from envs.alfworld.expert import expert_command
from envs.alfworld.generator import TASK_TYPES
from envs.base import Observation, TextEnv

BAD_GAMES: dict[str, str] = {}  # game file -> the fault that made it bad (shared by the process's environments)
HIDDEN_COMMANDS = ("help",)  # its answer is a list of verbs; the admissible commands are listed anyway
OFFICIAL_SPLITS = {"train": "train", "validation": "valid_seen", "test": "valid_unseen"}


@dataclass(frozen=True)
class Game:
    """A game file and its goal (ALFRED's ``pddl_params``)."""

    path: str
    task_type: str
    object_target: str
    parent_target: str = ""
    toggle_target: str = ""

    def goal(self) -> dict:
        return {
            "task_type": self.task_type,
            "object_target": self.object_target,
            "parent_target": self.parent_target,
            "toggle_target": self.toggle_target,
        }


def generated_games(paths: list[str | Path]) -> list[Game]:
    """Games of generated files (their goal is in the file). An unreadable file keeps the task type of its folder
    (``<split>/<task_type>/<i>/game.tw-pddl``) and no goal, so that the engine, not this listing, finds it broken
    and it is counted like any bad game."""
    games = []
    for path in paths:
        try:
            goal = json.loads(Path(path).read_text())["goal"]
        except (OSError, ValueError, KeyError, TypeError):
            goal = {"task_type": Path(path).parent.parent.name, "object_target": ""}
        games.append(Game(str(path), **{k: goal.get(k, "") for k in Game.__dataclass_fields__ if k != "path"}))
    return games


@cache
def official_games(root: str, split: str, task_types: tuple[str, ...] = TASK_TYPES) -> tuple[Game, ...]:
    """The official solvable games of ``split`` (train, validation = valid_seen, test = valid_unseen) under
    ``root`` (``$ALFWORLD_DATA``), as ``alfworld`` lists them: ``json_2.1.1/<split>/**/traj_data.json`` with a
    ``game.tw-pddl`` beside it marked solvable; movable-receptacle and sliced tasks are skipped, as there."""
    folder = Path(root) / "json_2.1.1" / OFFICIAL_SPLITS[split]
    games = []
    for traj in sorted(folder.rglob("traj_data.json")):
        game_file = traj.parent / "game.tw-pddl"
        if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game_file.exists():
            continue
        try:
            params = json.loads(traj.read_text())
            if params["task_type"] not in task_types or not json.loads(game_file.read_text()).get("solvable"):
                continue
            pddl = params["pddl_params"]
        except (OSError, ValueError, KeyError):
            continue  # the engine would find it broken too; the official lister skips such files
        games.append(
            Game(
                str(game_file),
                params["task_type"],
                pddl["object_target"],
                pddl.get("parent_target") or "",
                pddl.get("toggle_target") or "",
            )
        )
    return tuple(games)


def with_previous_path(intro: str, path: list[tuple[str, str]], history: int) -> str:
    """``intro``, then the paper's "Here is the previous path:" with the last ``history`` of the episode's
    (command, answer) steps, numbered from the episode's start."""
    shown = path[-history:] if history else []
    if not shown:
        return intro
    first = len(path) - len(shown) + 1
    steps = "".join(
        f"--- Step: {first + i} ---\nAction: {command}\nObservation: {feedback}\n\n"
        for i, (command, feedback) in enumerate(shown)
    )
    return f"{intro}\n\nHere is the previous path:\n{steps.rstrip()}"


class AlfWorldEnv(TextEnv):
    has_expert = True

    def __init__(
        self,
        games: list[Game],
        horizon: int = 15,
        history: int = 4,
        step_timeout: float = 60.0,
        stage: str = "all",
        max_actions: int = 62,
    ):
        if not games:
            raise ValueError("ALFWorld needs at least one game")
        if horizon <= 0 or history < 0:
            raise ValueError("the ALFWorld horizon must be positive and the history >= 0")
        self.games = list(games)
        self.horizon, self.history, self.stage, self.max_actions = horizon, history, stage, max_actions
        self.engine = Engine(timeout=step_timeout)
        self.faults: Counter = Counter()  # faults this environment met: crash, timeout, broken
        self.game: Game | None = None
        self.state: dict = {}
        self.done = True

    # -- episode --------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        start = (seed or 0) % len(self.games)
        for k in range(len(self.games)):
            game = self.games[(start + k) % len(self.games)]
            if game.path in BAD_GAMES:
                continue
            try:
                self.state = self.engine.load(game.path)
            except EngineFault as fault:
                self._mark_bad(game, fault)
                continue
            break
        else:
            raise RuntimeError(f"every one of the {len(self.games)} ALFWorld games failed in the engine: {BAD_GAMES}")
        self.game = game
        self.intro = self.state["feedback"].strip()
        self.path: list[tuple[str, str]] = []
        self.steps = 0
        self.done = False
        return self.observation()

    def _mark_bad(self, game: Game, fault: EngineFault) -> None:
        BAD_GAMES[game.path] = fault.kind
        self.faults[fault.kind] += 1
        print(f"ALFWorld: game {game.path} is bad ({fault}); it is skipped from now on")

    def current_actions(self) -> list[str]:
        actions = [a for a in self.state.get("admissible_commands", []) if a not in HIDDEN_COMMANDS]
        if len(actions) > self.max_actions:  # official rooms can list more than the labels; examine goes first
            best = expert_command(self.state, self.game.goal())
            kept = [a for a in actions if not a.startswith("examine ") or a == best]
            actions = kept[: self.max_actions]
            if best in self.state["admissible_commands"] and best not in actions:
                actions[-1] = best
        return actions

    def observation(self) -> Observation:
        text = with_previous_path(self.intro, self.path, self.history)
        return Observation(text, self.current_actions(), {"tags": {"task_type": self.game.task_type}})

    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        actions = self.current_actions()
        self.steps += 1
        invalid = action is None or not 0 <= action < len(actions)
        fault = None
        if not invalid:
            command = actions[action]
            try:
                self.state = self.engine.step(command)
                self.path.append((command, self.state["feedback"].strip()))
            except EngineFault as err:
                fault = err.kind
                self._mark_bad(self.game, err)
        won = fault is None and bool(self.state.get("won"))
        terminated = won
        truncated = not terminated and (fault is not None or self.steps >= self.horizon)
        self.done = terminated or truncated
        info = {"success": won, "invalid_action": invalid, "task_type": self.game.task_type, "fault": fault}
        return self.observation(), 1.0 if won else 0.0, terminated, truncated, info

    def copy_into(self, other: AlfWorldEnv) -> None:
        """Put ``other`` (another environment, with its own engine) in this episode's state by replaying its
        commands: the branch of a negative example (an engine process cannot be deep-copied)."""
        other.state = other.engine.load(self.game.path)
        for command, _ in self.path:
            other.state = other.engine.step(command)
        other.game, other.intro, other.path = self.game, self.intro, list(self.path)
        other.steps, other.done = self.steps, self.done

    # -- expert and state ---------------------------------------------------------------------------------
    def oracle_action(self) -> int:
        """The expert's command (:func:`envs.alfworld.expert.expert_command`); ``look`` if it sees no way."""
        actions = self.current_actions()
        command = expert_command(self.state, self.game.goal())
        return actions.index(command) if command in actions else actions.index("look")

    def state_key(self):
        """The game, the engine's facts and the steps the observation shows."""
        facts = sorted(map(tuple, self.state.get("facts", [])))
        shown = self.path[-self.history :] if self.history else []
        key = json.dumps([self.game.path, facts, shown])
        return hashlib.sha1(key.encode()).hexdigest()

    def close(self) -> None:
        self.engine.close()
