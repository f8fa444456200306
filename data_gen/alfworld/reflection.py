"""ALFWorld reflections: the built-in rule-based reflector and the chat messages for an API reflector.

A rule reflection names the last command when it was a detour, says what the agent holds and what it needs
next, and ends with the expert's command: the plan of :func:`envs.alfworld.plan_text`, e.g. ``"take pen 1
from desk 1 did not help. I hold the pencil 1; the pencil 1 is not what the task asks for, so I put it down.
Best next command: move pencil 1 to desk 1."``
"""

from __future__ import annotations

from envs.alfworld import AlfWorldEnv, plan_text

SYSTEM_PROMPT = (
    "You help an agent finish a household task in a text game. Given the current state, analyze the situation "
    "and plan what to do next in at most 50 words: whether the last command helped and why, what the task still "
    "needs, and which command to run next. You are told the best next command as a spoiler: use it to plan, but "
    "never mention that you were told."
)


def rule_reflection(env: AlfWorldEnv, detour: str | None = None) -> str:
    """The plan in ``env``'s state; ``detour`` is the last command when it was not the expert's."""
    plan = plan_text(env.state, env.game.goal())
    return f"{detour} did not help. {plan}" if detour else plan


def api_messages(env: AlfWorldEnv, state_text: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """A request in the shape of the paper's reflection prompts, with the expert's command as a spoiler (any
    environment with an expert: TextWorld's requests are these with its own system prompt)."""
    best = env.current_actions()[env.oracle_action()]
    user = (
        f"------ State ------\n{state_text}\n\n"
        f"--- Spoiler: the best command to run next is {best} ---\n\n"
        "------ Analyze the situation and plan what to do next (at most 50 words) ---"
    )
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
