"""AutoExplore reflections: the built-in rule-based reflector and the chat messages for an API reflector.

A rule reflection says what the last command found, then the plan: the expert's next command (the
"spoiler" the paper gave its GPT-4 reflectioner for Taxi; for AutoExplore its GPT-4 played the tasks
itself). For example ``"utils.py does not answer the task. Best next command: cd .."``.
"""

from __future__ import annotations

from envs.auto_explore import AutoExploreEnv

SYSTEM_PROMPT = (
    "You help an agent explore a code repository to find the file that answers a question. Given the "
    "current state, analyze the situation and plan what to do next in at most 50 words: whether the last "
    "command helped and why, and which command to run next. You are told the best next command as a "
    "spoiler: use it to plan, but never mention that you were told."
)


def _situation(env: AutoExploreEnv) -> str:
    """What the last command found, from the environment's own record."""
    if not env.history:
        return "Start."
    verb, _, arg = env.history[-1].partition(" ")
    if verb == "cat":
        path = f"{env.cwd}/{arg}" if env.cwd else arg
        return f"{arg} answers the task." if path in env.task.answers else f"{arg} does not answer the task."
    if verb == "cd":
        return f"Now in {env.cwd + '/' if env.cwd else './'}."
    return ""


def rule_reflection(env: AutoExploreEnv) -> str:
    best = env.current_actions()[env.oracle_action()]
    return f"{_situation(env)} Best next command: {best}."


def api_messages(env: AutoExploreEnv, state_text: str) -> list[dict]:
    """A request in the shape of the paper's reflection prompts, with the expert's command as a spoiler."""
    best = env.current_actions()[env.oracle_action()]
    user = (
        f"------ State ------\n{state_text}\n\n"
        f"--- Spoiler: the best command to run next is {best} ---\n\n"
        "------ Analyze the situation and plan what to do next (at most 50 words) ---"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
