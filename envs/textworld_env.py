"""TextWorld: games made locally by TextWorld's own generator, played through its engine (Inform 7 + Jericho).

- **Games** (:func:`generate_games`): ``textworld.generator.make_game`` with a seed per game, ``world_size``
  rooms, ``nb_objects`` objects and a quest of ``quest_length`` actions, compiled to ``.z8`` with the Inform 7
  compiler the ``textworld`` wheel ships. Train, validation and test draw from disjoint seed ranges, and a game
  whose world and quest repeat one of an earlier split is dropped, so the sets never share a game. Written once
  per setting under ``$REFLECT_RL_CACHE/textworld`` and reused.
- **Observation**: the quest ("objective"), the room the game opened in, the last ``history`` steps (command and
  what the game answered); the admissible commands (TextWorld's, sorted) are the choices.
- **Rewards**: 1 when the quest is done (the game is won), else 0; a lost game ends with 0. An invalid label costs
  a step with reward 0 and changes nothing. Horizon 15.
- **Expert**: the walkthrough, replanned by TextWorld from the current state (``policy_commands``), so it
  finishes the quest after any detour.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from envs.alfworld.env import with_previous_path
from envs.base import Observation, TextEnv

GENERATOR_VERSION = 1
SPLIT_SEEDS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}  # disjoint seed ranges per split


def _clean(text: str) -> str:
    """The game's answer without its prompt marks, score lines, status bar and runs of blank lines."""
    lines = [line.rstrip() for line in text.replace(">", "").splitlines()]
    lines = [line for line in lines if not re.search(r"Your score has just gone (up|down)", line)]
    lines = [line for line in lines if not re.match(r"\s{20,}\S", line)]  # the status bar: room, score/moves
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def default_games_dir(settings: dict) -> Path:
    """``$REFLECT_RL_CACHE/textworld/games-<hash of the settings>`` (``~/.cache/reflect_rl`` without it)."""
    key = hashlib.sha1(json.dumps([GENERATOR_VERSION, settings], sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.expanduser(os.environ.get("REFLECT_RL_CACHE") or "~/.cache/reflect_rl")
    return Path(root) / "textworld" / f"games-{key}"


def generate_games(
    folder: str | Path,
    counts: dict[str, int],
    seed: int = 0,
    world_size: int = 3,
    nb_objects: int = 6,
    quest_length: int = 3,
) -> dict[str, list[Path]]:
    """Make and compile ``counts[split]`` games per split into ``folder/<split>/<i>.z8``; split -> game files.
    A folder made before with the same settings is reused (``folder/manifest.json``)."""
    settings = {
        "version": GENERATOR_VERSION,
        "counts": counts,
        "seed": seed,
        "world_size": world_size,
        "nb_objects": nb_objects,
        "quest_length": quest_length,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists() and json.loads(manifest.read_text()).get("settings") == settings:
            saved = json.loads(manifest.read_text())["games"]
            return {split: [folder / p for p in paths] for split, paths in saved.items()}
        from textworld import GameOptions
        from textworld.generator import compile_game, make_game

        games: dict[str, list[str]] = {}
        seen: set[str] = set()
        for split in ("train", "validation", "test"):  # train first: later splits drop games it already has
            games[split] = []
            k = 0
            while len(games[split]) < counts.get(split, 0):
                if k > 20 * counts[split] + 50:
                    raise RuntimeError(f"could not make {counts[split]} distinct {split} TextWorld games")
                options = GameOptions()
                options.seeds = seed * 10_000_000 + SPLIT_SEEDS[split] + k
                options.nb_rooms, options.nb_objects, options.quest_length = world_size, nb_objects, quest_length
                k += 1
                game = make_game(options)
                key = hashlib.sha1(
                    json.dumps([sorted(map(str, game.world.facts)), game.objective, game.walkthrough]).encode()
                ).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                options.path = str(folder / split / f"{len(games[split])}.z8")
                options.force_recompile = True
                games[split].append(str(Path(compile_game(game, options)).relative_to(folder)))
        tmp = manifest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"settings": settings, "games": games}, indent=1))
        tmp.replace(manifest)
    return {split: [folder / p for p in paths] for split, paths in games.items()}


class TextWorldEnv(TextEnv):
    has_expert = True

    def __init__(self, games: list[str | Path], horizon: int = 15, history: int = 4, max_actions: int = 62):
        if not games:
            raise ValueError("TextWorld needs at least one game")
        if horizon <= 0 or history < 0:
            raise ValueError("the TextWorld horizon must be positive and the history >= 0")
        self.games = [str(g) for g in games]
        self.horizon, self.history, self.max_actions = horizon, history, max_actions
        self._env = None
        self.game: str | None = None
        self.state: Any = None
        self.done = True

    def _start(self):
        import warnings

        import textworld

        # Jericho knows TextWorld's games by no hash and says it cannot track score or moves; TextWorld tracks them
        warnings.filterwarnings("ignore", message="Game .* is not fully supported")

        infos = textworld.EnvInfos(
            admissible_commands=True, won=True, lost=True, policy_commands=True, objective=True, description=True
        )
        return textworld.start(self.game, request_infos=infos)

    def reset(self, seed: int | None = None) -> Observation:
        game = self.games[(seed or 0) % len(self.games)]
        if game != self.game or self._env is None:  # one engine per game file, reused while it repeats
            self.close()
            self.game = game
            self._env = self._start()
        self.state = self._env.reset()
        self.intro = f"Your task: {_clean(self.state['objective'])}\n\n{_clean(self.state['description'])}"
        self.path: list[tuple[str, str]] = []
        self.steps = 0
        self.done = False
        return self.observation()

    def current_actions(self) -> list[str]:
        actions = sorted(self.state["admissible_commands"])
        if len(actions) > self.max_actions:  # keep the expert's command among the first max_actions
            best = self._best()
            actions = [a for a in actions if a != best][: self.max_actions - 1] + ([best] if best else [])
            actions.sort()
        return actions

    def observation(self) -> Observation:
        text = with_previous_path(self.intro, self.path, self.history)
        return Observation(text, self.current_actions(), {"tags": {"game": Path(self.game).stem}})

    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        actions = self.current_actions()
        self.steps += 1
        invalid = action is None or not 0 <= action < len(actions)
        if not invalid:
            self.state, _, _ = self._env.step(actions[action])
            self.path.append((actions[action], _clean(self.state.feedback)))
        won, lost = bool(self.state["won"]), bool(self.state["lost"])
        terminated = won or lost
        truncated = not terminated and self.steps >= self.horizon
        self.done = terminated or truncated
        info = {"success": won, "invalid_action": invalid}
        return self.observation(), 1.0 if won else 0.0, terminated, truncated, info

    def _best(self) -> str | None:
        plan = self.state["policy_commands"] or []
        return plan[0] if plan and plan[0] in self.state["admissible_commands"] else None

    def oracle_action(self) -> int:
        """The first command of TextWorld's plan from here (the walkthrough, replanned); ``look`` without one."""
        actions = self.current_actions()
        best = self._best()
        return actions.index(best) if best in actions else actions.index("look")

    def copy_into(self, other: TextWorldEnv) -> None:
        """Put ``other`` in this episode's state by replaying its commands (a negative example's branch)."""
        if other.game != self.game or other._env is None:
            other.close()
            other.game = self.game
            other._env = other._start()
        other.state = other._env.reset()
        for command, _ in self.path:
            other.state, _, _ = other._env.step(command)
        other.intro, other.path, other.steps, other.done = self.intro, list(self.path), self.steps, self.done

    def state_key(self):
        key = json.dumps([self.game, [c for c, _ in self.path], self.path[-self.history :] if self.history else []])
        return hashlib.sha1(key.encode()).hexdigest()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
