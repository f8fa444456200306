"""AutoExplore (the paper's main benchmark): find the file of a repository that answers a question."""

from envs.auto_explore.env import AutoExploreEnv
from envs.auto_explore.repo import PathError, RepoView
from envs.auto_explore.tasks import Task, generate_tasks, load_tasks, save_tasks, split_tasks

__all__ = [
    "AutoExploreEnv",
    "PathError",
    "RepoView",
    "Task",
    "generate_tasks",
    "load_tasks",
    "save_tasks",
    "split_tasks",
]
