"""AutoExplore: navigate a repository with ``cd`` / ``cat`` / ``id`` to identify the file that answers a question.

The paper's environment (its ``nat_lang_envs/auto_explore.py`` and ``auto_explore_copilot.py``), on a
read-only :class:`~envs.auto_explore.repo.RepoView`:

- The observation has the paper's sections: task, current working directory, files under it, command
  history, result of the last command. The admissible commands, in sorted order: ``cd ..`` (except at
  the root), ``cd <dir>``, ``cat <file>`` (each file once), ``id <file>``.
- ``cat`` shows at most the kind's line limit (code 1000, data 5, text 100 lines, as the paper) and
  ``max_cat_chars`` characters, then a notice, so the task text at the top of the prompt is never cut.
- An episode ends at the first ``id`` (right or wrong) or at the horizon (15).
- Reward, the paper's cost scaled by 1/15 and negated: -1/15 a step, -1/15 more for an invalid action
  (no command), -2/15 more for a command that failed; +1 for identifying a right file, -1 for a wrong
  one or for reaching the horizon without an ``id``. Costs come from the environment's own events, not
  from counting "Error" in the text (the original also charged a file that contained "ValueError").
  Success is a right ``id``.
- Training leave-out (``leave_out``, the paper's 0.5): every entry off the path to an answer is hidden
  with that probability, drawn per episode from its seed; evaluation uses 0.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from envs.auto_explore.repo import PathError, RepoView, kind_of
from envs.auto_explore.tasks import Task
from envs.base import Observation, TextEnv

LINE_LIMITS = {"code": 1000, "data": 5, "text": 100}
STEP_COST = 1 / 15
INVALID_COST = 1 / 15
ERROR_COST = 2 / 15
FINAL_REWARD = 1.0


def _join(cwd: str, name: str) -> str:
    return f"{cwd}/{name}" if cwd else name


class AutoExploreEnv(TextEnv):
    has_expert = True

    def __init__(
        self,
        tasks: list[Task],
        horizon: int = 15,
        leave_out: float = 0.0,
        max_cat_chars: int = 1500,
        max_cat_lines: int | None = None,
    ):
        if not tasks:
            raise ValueError("AutoExplore needs at least one task")
        if not 0 <= leave_out < 1:
            raise ValueError("leave_out must be in [0, 1)")
        self.tasks = tasks
        self.horizon = horizon
        self.leave_out = leave_out
        self.max_cat_chars = max_cat_chars
        self.max_cat_lines = max_cat_lines
        self._views: dict[str, RepoView] = {}
        self.task: Task | None = None

    # -- episode --------------------------------------------------------------------------------------
    def _view(self, repo: str) -> RepoView:
        if repo not in self._views:
            self._views[repo] = RepoView(repo)
        return self._views[repo]

    def reset(self, seed: int | None = None) -> Observation:
        rng = random.Random(seed)
        self.task = self.tasks[(seed if seed is not None else rng.randrange(2**31)) % len(self.tasks)]
        self.view = self._view(self.task.repo)
        self.view.hidden = frozenset()
        if self.leave_out > 0:
            self.view.hidden = self._leave_out(rng)
        self.cwd = ""
        self.history: list[str] = []
        self.catted: set[str] = set()
        self.result = ""
        self.steps = 0
        self.done = False
        return self.observation()

    def _leave_out(self, rng: random.Random) -> frozenset[str]:
        """Entries (files and directories) hidden this episode: each off every answer's path with
        probability ``leave_out``; inside a hidden directory nothing more is drawn."""
        keep = set()
        for answer in self.task.answers:
            parts = answer.split("/")
            keep.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        hidden, stack = set(), [""]
        while stack:
            rel = stack.pop()
            dirs, files = self.view.listdir(rel)
            for name in dirs + files:
                child = _join(rel, name)
                if child not in keep and rng.random() < self.leave_out:
                    hidden.add(child)
                elif name in dirs:
                    stack.append(child)
        return frozenset(hidden)

    # -- observation ----------------------------------------------------------------------------------
    def current_actions(self) -> list[str]:
        dirs, files = self.view.listdir(self.cwd)
        actions = ["cd .."] if self.cwd else []
        actions += [f"cd {d}" for d in dirs]
        actions += [f"cat {f}" for f in files if _join(self.cwd, f) not in self.catted]
        actions += [f"id {f}" for f in files]
        return actions

    def observation(self) -> Observation:
        dirs, files = self.view.listdir(self.cwd)
        listing = "\n".join([f"{d}/" for d in dirs] + files) or "(empty)"
        text = (
            f"# Task\n{self.task.question}\n\n"
            f"# Current working directory\n{self.cwd + '/' if self.cwd else './'}\n\n"
            f"# Files under current working directory\n{listing}\n\n"
            f"# Command history\n{chr(10).join(self.history) or '(none)'}\n\n"
            f"# Execution result of your last command\n{self.result or '(none)'}"
        )
        tags = {"depth": self.task.depth, "repo": self.task.repo_name}
        return Observation(text, self.current_actions(), {"tags": tags})

    def state_key(self):
        """The task and everything the observation shows (directory, history, hidden entries)."""
        key = "\x00".join([self.task.repo, self.task.question, self.cwd, *self.history, *sorted(self.view.hidden)])
        return hashlib.sha1(key.encode()).hexdigest()

    # -- commands -------------------------------------------------------------------------------------
    def _cat(self, rel: str) -> tuple[str, bool]:
        name = rel.rpartition("/")[2]
        try:
            text = self.view.read(rel)
        except PathError as e:  # a listed file over the size limit: a note, not an error
            return f"Note: {name} is not shown ({e}).", False
        lines = text.splitlines()
        limit = self.max_cat_lines or LINE_LIMITS[kind_of(rel)]
        shown = "\n".join(lines[:limit])
        cut = len(lines) > limit or len(shown) > self.max_cat_chars
        shown = shown[: self.max_cat_chars]
        if cut:
            shown += f"\n...\n(file cut: at most {limit} lines and {self.max_cat_chars} characters are shown)"
        return f"Success: The content of {name} is:\n{shown}", False

    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        actions = self.current_actions()
        self.steps += 1
        reward, terminated, success, error = -STEP_COST, False, False, False
        invalid = action is None or not 0 <= action < len(actions)
        if invalid:
            reward -= INVALID_COST
            self.result = "Warning: that is not one of the listed commands; answer with one command's label."
        else:
            command = actions[action]
            verb, _, arg = command.partition(" ")
            self.history.append(command)
            if verb == "cd":
                target = self.cwd.rpartition("/")[0] if arg == ".." else _join(self.cwd, arg)
                if self.view.is_dir(target):
                    self.cwd = target
                    self.result = f"Executing: {command}\nSuccess: Now at {target + '/' if target else './'}"
                else:  # unreachable through the listed commands; kept for safety
                    error, self.result = True, f"Executing: {command}\nError: no directory {arg}"
            elif verb == "cat":
                self.catted.add(_join(self.cwd, arg))
                output, error = self._cat(_join(self.cwd, arg))
                self.result = f"Executing: {command}\n{output}"
            else:  # id
                path = _join(self.cwd, arg)
                success = path in self.task.answers
                terminated = True
                reward += FINAL_REWARD if success else -FINAL_REWARD
                self.result = f"Executing: {command}\nSuccess: Identified file {arg}"
        if error:
            reward -= ERROR_COST
        truncated = not terminated and self.steps >= self.horizon
        if truncated:
            reward -= FINAL_REWARD
        self.done = terminated or truncated
        info = {"success": success, "invalid_action": invalid, "error": error, "depth": self.task.depth}
        return self.observation(), reward, terminated, truncated, info

    # -- expert ---------------------------------------------------------------------------------------
    def oracle_action(self) -> int:
        """The next command of a shortest path to the nearest answer: up to the common directory, down
        to the answer's, ``cat`` it (once), then ``id`` it."""
        actions = self.current_actions()

        def cost(answer: str) -> tuple[int, str]:
            here = self.cwd.split("/") if self.cwd else []
            there = answer.split("/")[:-1]
            common = 0
            while common < min(len(here), len(there)) and here[common] == there[common]:
                common += 1
            return (len(here) - common) + (len(there) - common), answer

        answer = min(self.task.answers, key=cost)
        directory, _, name = answer.rpartition("/")
        if directory == self.cwd:
            command = f"id {name}" if answer in self.catted else f"cat {name}"
        elif self.cwd and not (directory + "/").startswith(self.cwd + "/"):
            command = "cd .."
        else:
            rest = directory[len(self.cwd) + 1 :] if self.cwd else directory
            command = f"cd {rest.split('/')[0]}"
        return actions.index(command)
