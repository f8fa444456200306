"""ScienceWorld (Wang et al. 2022): 30 grade-school science tasks in a text simulator, the ``scienceworld``
package's Java engine driven through py4j, with the per-step reward annotation of Song et al. 2025 ("Reward Is
Enough", reference B.3: every observation annotated ``(Reward: x)``, x the step's score increment).

- **Engine**: one simulator (one JVM, ~3-5 s to start) per environment, started on the first reset and reused by
  every later one; :meth:`ScienceWorldEnv.close` shuts it down. ``java_options`` go to that JVM (through
  ``JAVA_TOOL_OPTIONS``: the package starts it and takes no options); the default heap cap holds one at ~250-600 MB,
  where an uncapped JVM grows to 1-2.5 GB.
- **Tasks**: ``reset(seed)`` plays task ``tasks[seed % n]`` (n tasks) and of its variations in ScienceWorld's own
  split of ``split`` (train, validation = ScienceWorld's dev, test) the one at ``(seed // n) % len(variations)``:
  consecutive seeds cycle through the tasks.
- **Observation**: the task description, the last ``history`` steps (action, ScienceWorld's answer and
  ``(Reward: x)``, x in ScienceWorld's points), then the room the agent is in (ScienceWorld's free ``look``).
  The choices are ScienceWorld's valid action-object combinations, de-duplicated, without ``reset task`` (it
  would undo the episode's progress), capped at ``max_actions`` by :func:`cap_actions` and sorted.
- **Rewards**: the step's score increment / 100, so an episode's return is the score it gained / 100 (a few
  variations start with some points). Success is the task completed (score 100); ScienceWorld fails a task by
  setting its score to -100 (e.g. after focusing on the wrong thing). Terminated on either; truncated at
  ``horizon`` (15, as Song et al.'s max_env_steps).
- **Invalid actions**: ``None`` or an out-of-range index costs a step with reward 0 and changes nothing.
  :meth:`ScienceWorldEnv.step_text` sends other text to ScienceWorld's parser, which reaches the whole action
  space (not only the listed actions); text it does not know is invalid the same way. An answer "Ambiguous
  request" (one string naming several objects) is resolved with ScienceWorld's first choice.
- **Expert**: the gold action sequence ScienceWorld makes when it loads the variation; :meth:`oracle_action` is its
  first action not taken yet, when that action is listed, else ``look around``. With the cap it is seldom listed
  unless ``keep_gold``, which lists it on every step (off by default: it makes the task easier and shows a
  learner one action the expert would take). A gold path can outrun the horizon (boil's take 39 to 152 steps,
  find-animal's 10 to 16).
- **Faults**: a JVM that dies (``crash``), a call past ``step_timeout`` seconds (``timeout``; a reset, which loads
  the task and makes its gold path, may take 5 times as long) or a Java exception (``error``) is counted in
  :attr:`ScienceWorldEnv.faults` and ``info["fault"]`` and never raises: mid-episode it ends the episode
  (truncated, reward 0, no success), in a reset it marks the variation bad for the process
  (:data:`BAD_VARIATIONS`) and the next one is played. A killed JVM is restarted by the next reset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as CallTimeout
from typing import Any

from envs.alfworld.env import with_previous_path
from envs.base import Observation, TextEnv

HIDDEN_ACTIONS = ("reset task",)  # resets the goal progress inside the episode
SPLIT_METHODS = {"train": "get_variations_train", "validation": "get_variations_dev", "test": "get_variations_test"}
NO_MATCH = "No known action matches that input."
AMBIGUOUS = "Ambiguous request"
FALLBACK_ACTION = "look around"  # the oracle's action when the gold one is not listed: it changes nothing
JAVA_OPTIONS = "-Xmx1g -XX:+UseSerialGC"  # as --scienceworld_java_options: a heap cap, one GC thread
STARTUP_TIMEOUT = 300.0  # seconds a JVM may take to start on a busy machine
MAX_RESET_FAULTS = 3  # faults in a row after which a reset gives up (a broken Java install, not a variation)

SPLIT_VARIATIONS: dict[tuple[str, str], list[int]] = {}  # (task, split) -> ScienceWorld's variations, per process
BAD_VARIATIONS: dict[tuple[str, int], str] = {}  # (task, variation) -> the fault that made it bad, per process
_TEMPLATES: list[str] = []  # ScienceWorld's action templates ("move OBJ to OBJ"), the same for every JVM


def task_names() -> tuple[str, ...]:
    """ScienceWorld's 30 task names, sorted (from the package's task list: no JVM needed)."""
    from scienceworld.constants import ID2TASK
    from scienceworld.utils import infer_task

    return tuple(sorted(infer_task(name) for name in ID2TASK.values()))


class ScienceWorldFault(Exception):
    """The simulator failed: ``kind`` is ``crash``, ``timeout`` or ``error``."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def template_of(action: str, templates: list[str]) -> str:
    """The ScienceWorld template an action string fills (``pick up OBJ`` for ``pick up thermometer``): the
    longest template whose words before its first ``OBJ`` start the action, or its first word where none does."""
    best = ""
    for template in templates:
        head = template.split("OBJ")[0]
        fits = action == template if head == template else action.startswith(head)
        if fits and len(head) > len(best):
            best = head
    return best.strip() or action.split(" ")[0]


def cap_actions(actions: list[str], k: int, seed: int, template: Callable[[str], str]) -> list[str]:
    """At most ``k`` of ``actions``, sorted: a round-robin over ScienceWorld's action templates.

    Each template's actions are ranked by a hash of (``seed``, action); round r takes the r-th ranked action of
    every template that has one (those rounds' actions again in hash order) until ``k`` are kept. So while the
    state has fewer kinds of action than ``k``, every kind is listed (``look around``, ``go to``, ``focus on``,
    ...), and few of the hundreds to thousands of two-object combinations (``connect``, ``move``, ``pour``) are.
    The cap makes the task harder than ScienceWorld's full action space, as the action a task needs may be left
    out, and each choice easier, with 40 choices in place of up to ~3000. The rank depends on the seed and the
    action alone, so the same state gives the same list in every episode of that seed.
    """
    if len(actions) <= k:
        return sorted(actions)
    rank = {a: hashlib.sha1(f"{seed}\0{a}".encode()).digest() for a in actions}
    groups: dict[str, list[str]] = defaultdict(list)
    for a in actions:
        groups[template(a)].append(a)
    ranked = [sorted(g, key=rank.__getitem__) for g in groups.values()]
    kept: list[str] = []
    for r in range(max(map(len, ranked))):
        row = sorted((g[r] for g in ranked if r < len(g)), key=rank.__getitem__)
        kept += row[: k - len(kept)]
        if len(kept) == k:
            break
    return sorted(kept)


class ScienceWorldEnv(TextEnv):
    has_expert = True

    def __init__(
        self,
        tasks: list[str] | tuple[str, ...],
        split: str = "train",
        horizon: int = 15,
        history: int = 4,
        max_actions: int = 40,
        keep_gold: bool = False,
        simplifications: str = "",
        step_timeout: float = 60.0,
        java_options: str = JAVA_OPTIONS,
        stage: str = "all",
    ):
        if not tasks:
            raise ValueError("ScienceWorld needs at least one task")
        if split not in SPLIT_METHODS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLIT_METHODS)}")
        if horizon <= 0 or history < 0 or max_actions <= 0 or step_timeout <= 0:
            raise ValueError("the ScienceWorld horizon, max_actions and step_timeout must be positive, history >= 0")
        self.tasks, self.split, self.stage = list(tasks), split, stage
        self.horizon, self.history, self.max_actions, self.keep_gold = horizon, history, max_actions, keep_gold
        self.simplifications, self.step_timeout, self.java_options = simplifications, step_timeout, java_options
        self.faults: Counter = Counter()  # faults this environment met: crash, timeout, error
        self._sw = None  # the scienceworld.ScienceWorldEnv (its JVM), started on the first reset
        self._executor: ThreadPoolExecutor | None = None  # runs each JVM call, so that a hang has a deadline
        self._template_cache: dict[str, str] = {}
        self.task, self.variation, self.seed = "", -1, 0
        self.actions: list[str] = []
        self.done = True

    # -- the simulator ------------------------------------------------------------------------------------------
    def _start(self):
        from scienceworld import ScienceWorldEnv as Simulator

        # py4j logs a traceback for every retry to reach a JVM that died; the fault is reported once, here
        logging.getLogger("py4j").setLevel(logging.CRITICAL)
        previous = os.environ.get("JAVA_TOOL_OPTIONS")
        os.environ["JAVA_TOOL_OPTIONS"] = " ".join(o for o in (previous, self.java_options) if o)
        try:
            return Simulator("", envStepLimit=10**9)  # the horizon ends episodes, not ScienceWorld's step limit
        finally:
            if previous is None:
                os.environ.pop("JAVA_TOOL_OPTIONS")
            else:
                os.environ["JAVA_TOOL_OPTIONS"] = previous

    def _call(self, fn: Callable, *args, timeout: float | None = None):
        """``fn(*args)`` on the JVM within ``timeout`` (default ``step_timeout``); a failure is a ScienceWorldFault."""
        from py4j.protocol import Py4JError, Py4JJavaError

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="scienceworld")
        future = self._executor.submit(fn, *args)
        timeout = timeout or self.step_timeout
        name = getattr(fn, "__name__", "call")
        try:
            return future.result(timeout)
        except CallTimeout:
            self._kill()
            raise ScienceWorldFault("timeout", f"no answer to {name}{args!r} within {timeout:g} s") from None
        except Py4JJavaError as err:  # the simulator threw; the JVM lives on
            raise ScienceWorldFault("error", f"{name}{args!r}: {str(err).splitlines()[0]}") from err
        except (Py4JError, OSError) as err:  # the JVM died (or never started)
            self._kill()
            raise ScienceWorldFault("crash", f"{name}{args!r}: {type(err).__name__}: {err}") from err

    def _simulator(self):
        if self._sw is None:
            self._sw = self._call(self._start, timeout=max(STARTUP_TIMEOUT, self.step_timeout))
        return self._sw

    def _kill(self) -> None:
        """End the JVM at once (after a crash or a hang) and the thread that waited on it."""
        sw, self._sw = self._sw, None
        if sw is not None:
            process = sw._gateway.java_process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            try:
                sw._gateway.shutdown()
            except Exception:  # a dead JVM's gateway may fail to say goodbye; nothing is left to release
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def close(self) -> None:
        """Shut the JVM down (politely, then by force)."""
        if self._sw is not None:
            try:
                self._call(self._sw.close, timeout=10)
            except ScienceWorldFault:
                pass
        self._kill()

    # -- episode ------------------------------------------------------------------------------------------------
    def variations(self, task: str) -> list[int]:
        """ScienceWorld's variations of ``task`` in this environment's split (asked once per process)."""
        if (task, self.split) not in SPLIT_VARIATIONS:
            sw = self._simulator()
            self._call(sw.load, task, 0, "", False, timeout=5 * self.step_timeout)  # the splits need a loaded task
            for split, method in SPLIT_METHODS.items():
                SPLIT_VARIATIONS[task, split] = sorted(self._call(getattr(sw, method)))
        return SPLIT_VARIATIONS[task, self.split]

    def reset(self, seed: int | None = None) -> Observation:
        self.seed = seed or 0
        task = self.tasks[self.seed % len(self.tasks)]
        faults = 0
        while True:
            variation = None
            try:
                variations = self.variations(task)
                start = (self.seed // len(self.tasks)) % len(variations)
                good = [v for v in variations[start:] + variations[:start] if (task, v) not in BAD_VARIATIONS]
                if not good:
                    raise RuntimeError(
                        f"every {self.split} variation of ScienceWorld's {task} failed: {BAD_VARIATIONS}"
                    )
                variation = good[0]
                self._load(task, variation)
                break
            except ScienceWorldFault as fault:
                faults += 1
                self.faults[fault.kind] += 1
                if variation is not None:
                    BAD_VARIATIONS[task, variation] = fault.kind
                print(f"ScienceWorld: {task} variation {variation} failed ({fault}); it is skipped from now on")
                if faults >= MAX_RESET_FAULTS:
                    raise RuntimeError(f"ScienceWorld failed {faults} resets in a row; last: {fault}") from fault
        return self.observation()

    def _load(self, task: str, variation: int) -> None:
        sw = self._simulator()
        self._call(sw.load, task, variation, self.simplifications, True, timeout=5 * self.step_timeout)
        if not _TEMPLATES:  # ScienceWorld lists its templates once a task is loaded
            _TEMPLATES.extend(self._call(sw.get_possible_actions))
        gold = list(self._call(sw.get_gold_action_sequence))
        self.gold = [] if any(a.startswith("ERROR") for a in gold) else gold
        answer, _, _, info = self._call(sw.step, "look around")  # what the wrapper's reset does after its reset
        self.task, self.variation = task, variation
        self.description = info["taskDesc"].strip()
        self.look, self.valid, self.score, self.completed = answer, info["valid"], info["score"], False
        self.path: list[tuple[str, str]] = []
        self.steps, self.gold_index = 0, 0
        self.done = False
        self.actions = self._listed()

    def _template(self, action: str) -> str:
        if action not in self._template_cache:
            self._template_cache[action] = template_of(action, _TEMPLATES)
        return self._template_cache[action]

    def _next_gold(self) -> str | None:
        return self.gold[self.gold_index] if self.gold_index < len(self.gold) else None

    def _listed(self) -> list[str]:
        actions = sorted(set(self.valid) - set(HIDDEN_ACTIONS))
        gold = self._next_gold() if self.keep_gold else None
        if gold is None:
            return cap_actions(actions, self.max_actions, self.seed, self._template)
        others = cap_actions([a for a in actions if a != gold], self.max_actions - 1, self.seed, self._template)
        return sorted([*others, gold])

    def current_actions(self) -> list[str]:
        return list(self.actions)

    def observation(self) -> Observation:
        text = with_previous_path(self.description, self.path, self.history)
        text = f"{text}\n\nCurrent observation:\n{self.look.strip()}"
        return Observation(text, list(self.actions), {"tags": {"task": self.task}})

    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        invalid = action is None or not 0 <= action < len(self.actions)
        return self._act(None if invalid else self.actions[action])

    def step_text(self, text: str) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """A typed action: a listed one (case and spaces aside) or any text ScienceWorld's parser knows."""
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        command = " ".join(text.split())
        listed = {a.lower(): a for a in self.actions}
        hidden = command.lower() in HIDDEN_ACTIONS
        return self._act(listed.get(command.lower(), None if not command or hidden else command))

    def _act(self, command: str | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        self.steps += 1
        invalid, fault, points = command is None, None, 0
        if not invalid:
            try:
                answer, points, completed, info = self._call(self._sw.step, command)
                if answer.startswith(AMBIGUOUS):  # ScienceWorld waits for the number of the object meant
                    answer, more, completed, info = self._call(self._sw.step, "0")
                    points += more
                if answer.strip() == NO_MATCH:
                    invalid = True  # the parser changed nothing
                else:
                    self.look, self.valid, self.score, self.completed = (
                        info["look"],
                        info["valid"],
                        info["score"],
                        completed,
                    )
                    self.path.append((command, f"{answer.strip()} (Reward: {points})"))
                    if command == self._next_gold():
                        self.gold_index += 1
                    self.actions = self._listed()
            except ScienceWorldFault as err:
                fault, points = err.kind, 0
                self.faults[fault] += 1
                print(f"ScienceWorld: {self.task} variation {self.variation} failed mid-episode ({err})")
        success = fault is None and self.score >= 100
        terminated = fault is None and (self.completed or success)
        truncated = not terminated and (fault is not None or self.steps >= self.horizon)
        self.done = terminated or truncated
        info = {
            "success": success,
            "invalid_action": invalid,
            "task": self.task,
            "variation": self.variation,
            "score": self.score,
            "fault": fault,
        }
        return self.observation(), points / 100, terminated, truncated, info

    # -- expert and state ---------------------------------------------------------------------------------------
    def oracle_action(self) -> int:
        """The gold sequence's first action not taken yet, where it is listed; else ``look around`` (or the first
        action). Actions the agent took besides the gold ones do not move it on, so after a detour it may fail."""
        gold = self._next_gold()
        if gold in self.actions:
            return self.actions.index(gold)
        return self.actions.index(FALLBACK_ACTION) if FALLBACK_ACTION in self.actions else 0

    def state_key(self):
        """The variation, the seed (it picks the listed actions) and the actions taken so far."""
        key = [self.task, self.variation, self.simplifications, self.seed, [c for c, _ in self.path]]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()
