"""Generate TextWorld SFT data for the policy and the reflector.

    python -m data_gen.gen_sft --env textworld --output_dir data/textworld

The same episodes and files as ALFWorld's (``data_gen.alfworld.gen_sft.generate``): the expert (TextWorld's
walkthrough, replanned from each state) taking a random admissible command at ``--random_action_rate``, negative
examples on a replayed branch at ``--negative_rate``, rule reflections (``data_gen.textworld.reflection``) or an
API reflector's.
Training episodes play the train games, ``test/`` the test games (other seeds, no game in common).
"""

from __future__ import annotations

from pathlib import Path

from data_gen.alfworld.gen_sft import generate
from data_gen.textworld.reflection import api_messages, rule_reflection
from experiment_args import TextWorldArguments
from run_utils import cli


@cli
def main(argv: list[str] | None = None) -> Path:
    return generate(argv, TextWorldArguments, rule_reflection, api_messages)


if __name__ == "__main__":
    main()
