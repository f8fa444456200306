"""SFT data for any environment: ``python -m data_gen.gen_sft --env taxi [that env's flags]``.

Each environment has its own generator module (``data_gen/<env>/gen_sft.py``), since expert
trajectories and reflections are environment-specific; this entry point picks it by name.
"""

from __future__ import annotations

import importlib
import sys

from experiment_args import UsageError
from run_utils import cli

GENERATORS = {
    "taxi": "data_gen.taxi.gen_sft",
    "auto_explore": "data_gen.auto_explore.gen_sft",
    "alfworld": "data_gen.alfworld.gen_sft",
    "textworld": "data_gen.textworld.gen_sft",
}


@cli
def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--env" not in argv or argv.index("--env") + 1 >= len(argv):
        raise UsageError(f"pass --env, one of {', '.join(GENERATORS)}")
    i = argv.index("--env")
    env = argv[i + 1]
    if env not in GENERATORS:
        raise UsageError(f"--env {env!r} has no data generator; choose one of {', '.join(GENERATORS)}")
    return importlib.import_module(GENERATORS[env]).main(argv[:i] + argv[i + 2 :])


if __name__ == "__main__":
    main()
