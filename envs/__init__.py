"""Text environments behind one interface (:class:`envs.base.TextEnv`).

``ENVS`` maps the ``--env`` name to its class; later environments (ALFWorld, the ICPI
tasks, classification bandits, Game of 24) are added here.
"""

from envs.alfworld import AlfWorldEnv
from envs.auto_explore import AutoExploreEnv
from envs.base import Observation, TextEnv
from envs.taxi import TaxiEnv
from envs.textworld_env import TextWorldEnv

ENVS: dict[str, type[TextEnv]] = {
    "taxi": TaxiEnv,
    "auto_explore": AutoExploreEnv,
    "alfworld": AlfWorldEnv,
    "textworld": TextWorldEnv,
}

__all__ = ["ENVS", "AlfWorldEnv", "AutoExploreEnv", "Observation", "TextEnv", "TaxiEnv", "TextWorldEnv"]
