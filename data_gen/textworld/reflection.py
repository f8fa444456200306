"""TextWorld reflections: a rule-based plan from TextWorld's own walkthrough, and the API reflector's messages.

The rule names the last command when it was a detour, says how many steps of the quest remain, and ends with the
walkthrough's next command, e.g. ``"go north did not help. 2 steps of the quest remain. Best next command: take
napkin."``
"""

from __future__ import annotations

from data_gen.alfworld.reflection import SYSTEM_PROMPT as ALFWORLD_SYSTEM_PROMPT
from data_gen.alfworld.reflection import api_messages as alfworld_messages
from envs.textworld_env import TextWorldEnv

SYSTEM_PROMPT = ALFWORLD_SYSTEM_PROMPT.replace("a household task", "the quest")


def rule_reflection(env: TextWorldEnv, detour: str | None = None) -> str:
    plan = env.state["policy_commands"] or []
    best = env.current_actions()[env.oracle_action()]
    remaining = f"{len(plan)} step{'s' if len(plan) != 1 else ''} of the quest remain{'s' if len(plan) == 1 else ''}."
    text = f"{remaining} Best next command: {best}."
    return f"{detour} did not help. {text}" if detour else text


def api_messages(env: TextWorldEnv, state_text: str) -> list[dict]:
    return alfworld_messages(env, state_text, SYSTEM_PROMPT)
