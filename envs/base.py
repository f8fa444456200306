"""The one interface every text environment implements.

An environment is stepped with the *index* of an admissible action (or ``None`` for model output
that named no admissible action). Each environment decides what an invalid action costs, so a
rollout never crashes on malformed output: it counts it and steps with ``None``.

Reward contract (the same for every env): ``reward`` is a float, ``terminated`` means the task
reached a terminal state (success or failure), ``truncated`` means the horizon ran out. ``info``
always has ``success`` (bool, meaningful once the episode ends) and ``invalid_action`` (bool), e.g.
``{"success": False, "invalid_action": False, "state": 314}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Observation:
    """What the agent sees: the state text and the actions it may take now.

    ``text`` holds no action list; :func:`envs.prompt.policy_prompt` appends the labelled actions so
    that every environment is rendered the same way. ``actions`` may change every step
    (AutoExplore's `cd`/`cat` lists), or stay fixed (Taxi), or be a single free-form slot (Game of 24
    uses an empty list and reads text through :meth:`TextEnv.step_text`).
    """

    text: str
    actions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


class TextEnv(ABC):
    """Gymnasium-like text environment: ``reset(seed) -> Observation``, ``step(action) -> 5-tuple``.

    Optional capabilities are declared, not assumed: ``has_expert`` (then :meth:`oracle_action` gives
    the expert's action, for data generation and the oracle agent), :meth:`state_key` (for grouping by
    state), and stages (in the environment's argument dataclass, ``experiment_args.EnvArguments``).
    """

    has_expert: ClassVar[bool] = False

    @abstractmethod
    def reset(self, seed: int | None = None) -> Observation:
        """Start a new episode; the same seed gives the same episode."""

    @abstractmethod
    def step(self, action: int | None) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Take admissible action ``action`` (an index into ``Observation.actions``).

        ``None`` or an out-of-range index is an invalid action; the environment handles it (it
        must not raise) and sets ``info["invalid_action"] = True``.
        """

    def step_text(self, text: str) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Take a free-form action. Environments whose actions are a fixed list match the text
        against the admissible actions; environments with free-form answers override this."""
        actions = self.current_actions()
        cleaned = text.strip().lower()
        index = next((i for i, a in enumerate(actions) if a.lower() == cleaned), None)
        return self.step(index)

    @abstractmethod
    def current_actions(self) -> list[str]:
        """The admissible actions of the current state."""

    def oracle_action(self) -> int:
        """The expert's action (an index into the current actions); only where ``has_expert``."""
        raise NotImplementedError(f"{type(self).__name__} has no expert")

    def state_key(self) -> Hashable | None:
        """A hashable key of the current environment state, equal exactly when two states are the same
        (optional: ``--group_by_state`` needs it; None means the environment has none)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional: most environments hold nothing)
        """Release what the environment holds (processes, files); a no-op by default."""
