"""ALFWorld (the paper's third environment): household tasks in text, played by the real engine on games
generated offline (:mod:`envs.alfworld.generator`) or on the official files under ``$ALFWORLD_DATA``."""

from envs.alfworld.engine import Engine, EngineFault
from envs.alfworld.env import BAD_GAMES, AlfWorldEnv, Game, generated_games, official_games
from envs.alfworld.expert import expert_command, plan_text
from envs.alfworld.generator import TASK_TYPES, generate_games

__all__ = [
    "BAD_GAMES",
    "TASK_TYPES",
    "AlfWorldEnv",
    "Engine",
    "EngineFault",
    "Game",
    "expert_command",
    "generate_games",
    "generated_games",
    "official_games",
    "plan_text",
]
