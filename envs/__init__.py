"""Text environments behind one interface (:class:`envs.base.TextEnv`).

``ENVS`` maps the ``--env`` name to its class (``icpi`` is the base of its six tasks, ``envs.icpi.ENVS``;
ScienceWorld's module loads its Java simulator only when an environment is reset).
"""

from envs.alfworld import AlfWorldEnv
from envs.auto_explore import AutoExploreEnv
from envs.base import Observation, TextEnv
from envs.icpi import IcpiEnv
from envs.scienceworld_env import ScienceWorldEnv
from envs.taxi import TaxiEnv
from envs.textworld_env import TextWorldEnv

ENVS: dict[str, type[TextEnv]] = {
    "taxi": TaxiEnv,
    "auto_explore": AutoExploreEnv,
    "alfworld": AlfWorldEnv,
    "textworld": TextWorldEnv,
    "icpi": IcpiEnv,
    "scienceworld": ScienceWorldEnv,
}

__all__ = [
    "ENVS", "AlfWorldEnv", "AutoExploreEnv", "IcpiEnv", "Observation", "ScienceWorldEnv", "TextEnv", "TaxiEnv",
    "TextWorldEnv",
]  # fmt: skip
