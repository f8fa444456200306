"""Every option of every command, as one dataclass per component (parsed with HfArgumentParser by
``run_utils.parse_args``).

Each field has a default and a help string; ``__post_init__`` derives values and fails fast with a
message that names the flag to change. A YAML recipe passed as ``--config recipe.yaml`` may set the
same fields; flags given on the command line win. Nothing here imports ``run_utils``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

# bitsandbytes tries to fetch an optional CPU kernel from the hub at import and warns when it cannot;
# the built-in kernel it falls back to is what we test, so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing half-written."""


# Named recipes for the real settings, per script. A preset only sets defaults: --config and the
# command line override it. "paper" follows the original code (see ../shared/reference/reflect_rl.md):
# GPT-2 XL in 8-bit, LoRA r=64 alpha=16 on c_attn, lr 2e-4, batch 1, clip 0.3; RL is REINFORCE on
# cost-to-go (no baseline, gamma 1, no KL), Adam 2e-4, a 50-episode replay buffer of successes,
# shuffled labels, 4 episodes per iteration and reflections sampled at T=1 with up to 100 tokens.
# "smollm2" is the pretrained SmolLM2-135M-Instruct with LoRA on every linear layer: a setting
# for one GPU (the CPU is too slow for it, see the README), with PPO.
PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "sft": {
            "model_name_or_path": "gpt2-xl",
            "load_in_8bit": True,
            "use_peft": True,
            "lora_r": 64,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "lora_target_modules": "c_attn",
            "learning_rate": 2e-4,
            "lr_scheduler_type": "constant_with_warmup",
            "per_device_train_batch_size": 1,
            "max_grad_norm": 0.3,
            "max_steps": 2000,
            "activation_checkpointing": True,
        },
        "rl": {
            "algo": "reinforce",
            "reinforce_baseline": "none",
            "gamma": 1.0,
            "kl_coef": 0.0,
            "learning_rate": 2e-4,
            "max_grad_norm": 0.3,
            "num_envs": 4,
            "minibatch_size": 1024,  # the paper takes one optimizer step per rollout batch
            "replay_buffer_size": 50,
            "replay_episodes": 1,
            "shuffle_labels": True,
            "iterations": 2000,
            "save_steps": 100,
            "reflection_max_tokens": 100,
            "reflection_temperature": 1.0,
        },
        "eval": {"reflection_max_tokens": 100, "reflection_temperature": 1.0},
    },
    "smollm2": {
        "sft": {
            "model_name_or_path": "smollm2-135m",
            "use_peft": True,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_target_modules": "all-linear",
            "learning_rate": 2e-4,
            "per_device_train_batch_size": 16,
            "num_train_epochs": 3,
        },
        "rl": {
            "algo": "ppo",
            "learning_rate": 2e-5,
            "num_envs": 64,
            "minibatch_size": 64,
            "update_epochs": 4,
            "kl_coef": 0.05,
            "target_kl": 0.05,
            "iterations": 200,
            "save_steps": 20,
            "reflection_max_tokens": 64,
            "reflection_temperature": 1.0,
        },
        "eval": {"reflection_max_tokens": 64, "reflection_temperature": 1.0},
    },
}


def cuda_bf16() -> bool:
    """Whether a CUDA device with bf16 is present: the default for bf16 weights and autocast."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def check_numbers(
    args, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (), unit: tuple[str, ...] = ()
) -> None:
    """Numeric flags must be finite, and > 0, >= 0 or in [0, 1] as listed; else a one-line UsageError."""
    import math

    for name in (*positive, *non_negative, *unit):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number, not {value}")
        if name in positive and value <= 0:
            raise UsageError(f"--{name} must be > 0, not {value}")
        if name in non_negative and value < 0:
            raise UsageError(f"--{name} must be >= 0, not {value}")
        if name in unit and not 0 <= value <= 1:
            raise UsageError(f"--{name} must be in [0, 1], not {value}")


# Weights dtypes of a model loaded here: auto is bf16 on a GPU that supports it, else fp32
# (training.models.resolve_dtype).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass
class ModelArguments:
    """Which model to load and how (shared by SFT, RL and evaluation)."""

    model_name_or_path: str = field(
        default="tiny-gpt2",
        metadata={
            "help": "A built-in name (tiny-gpt2, smollm2-135m), a local HF model folder, or a hub id "
            "(e.g. gpt2-xl, needs network)."
        },
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (bitsandbytes); needs LoRA."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes); needs LoRA."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bf16 where the GPU supports it, else fp32), float32, bfloat16, float16."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters; false trains all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names for LoRA, or 'all-linear'."}
    )
    cache_dir: str = field(
        default="",
        metadata={"help": "Where built-in models are materialised; default $REFLECT_RL_CACHE or ~/.cache/reflect_rl."},
    )

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise UsageError("--load_in_8bit and --load_in_4bit are exclusive; pass only one")
        if (self.load_in_8bit or self.load_in_4bit) and not self.use_peft:
            # A quantised model has no trainable weights of its own (transformers#30526).
            raise UsageError(
                "a quantised base can only be trained through LoRA; drop --use_peft false or the 8/4-bit flag"
            )
        check_dtype(self.dtype)
        if self.lora_r <= 0:
            raise UsageError("--lora_r must be positive")


SPLITS = ("train", "validation", "test")


class EnvArguments:
    """What every environment's argument dataclass adds to its flags, which all start with ``prefix``.

    ``name`` is its ``--env`` value, ``stages`` its curriculum stages in order (the first is the default
    unless the env has a stage flag), ``make_env(stage, split)`` builds one environment: an environment
    with a task list draws a seed's task from ``split`` (train, validation or test); one without (Taxi)
    ignores it, its evaluation seeds being disjoint from training's. ``ENV_ARGUMENTS`` maps names to them.
    """

    name: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()

    @property
    def stage(self) -> str:
        return self.stages[0]

    def make_env(self, stage: str | None = None, split: str = "train"):
        raise NotImplementedError

    @classmethod
    def check_stages(cls, flag: str, value: str) -> None:
        """``value``, a comma-separated list, names only stages of this environment."""
        bad = [s for s in value.split(",") if s not in cls.stages]
        if bad:
            raise UsageError(f"{flag} has unknown {cls.name} stage(s) {', '.join(bad)}; use {', '.join(cls.stages)}")


@dataclass
class TaxiArguments(EnvArguments):
    """DangerousTaxi options (envs/taxi.py), shared by data generation, RL and evaluation."""

    name: ClassVar[str] = "taxi"
    prefix: ClassVar[str] = "taxi_"
    stages: ClassVar[tuple[str, ...]] = ("pickup", "dropoff", "full")  # envs.taxi.STAGES (a test checks)

    taxi_stage: str = field(default="full", metadata={"help": "Curriculum stage: pickup, dropoff or full."})
    taxi_horizon: int = field(
        default=15,
        metadata={"help": "Steps before truncation (paper: 15; at 15, 80.7%% of full-stage starts can be finished)."},
    )
    taxi_danger: bool = field(default=True, metadata={"help": "A step that changes nothing gives -10/20 and ends."})
    taxi_coordinates: bool = field(default=True, metadata={"help": "Add a plain-coordinates line under the grid."})
    taxi_instructions: bool = field(default=False, metadata={"help": "Start each observation with the rules."})
    taxi_history: bool = field(default=True, metadata={"help": "List the actions taken so far (as the paper)."})
    taxi_reward: str = field(
        default="paper",
        metadata={
            "help": "paper (gym's rewards / 20, -10/20 danger), success (1 on success, else 0) or success_danger "
            "(1 on success, -10/20 when the danger rule ends the episode, else 0) or progress (success plus 0.1 "
            "per step of the oracle's distance to the goal that a move gains, minus 0.1 per step lost)."
        },
    )
    taxi_dropoff_start: str = field(
        default="pickup",
        metadata={
            "help": "Where the dropoff stage starts: pickup (the passenger's spot, 12 starts, as the paper) or "
            "anywhere (any cell but the destination, 96 starts)."
        },
    )

    def __post_init__(self):
        from envs.taxi import DROPOFF_STARTS

        if self.taxi_dropoff_start not in DROPOFF_STARTS:
            raise UsageError(
                f"--taxi_dropoff_start {self.taxi_dropoff_start!r} is not one of {', '.join(DROPOFF_STARTS)}"
            )

        if self.taxi_stage not in self.stages:
            raise UsageError(f"--taxi_stage {self.taxi_stage!r} is not one of {', '.join(self.stages)}")
        if self.taxi_horizon <= 0:
            raise UsageError("--taxi_horizon must be positive")
        from envs.taxi import REWARDS

        if self.taxi_reward not in REWARDS:
            raise UsageError(f"--taxi_reward {self.taxi_reward!r} is not one of {', '.join(REWARDS)}")

    @property
    def stage(self) -> str:
        return self.taxi_stage

    def make_env(self, stage: str | None = None, split: str = "train"):
        from envs.taxi import TaxiEnv

        return TaxiEnv(
            stage=stage or self.taxi_stage,
            horizon=self.taxi_horizon,
            danger=self.taxi_danger,
            coordinates=self.taxi_coordinates,
            instructions=self.taxi_instructions,
            history=self.taxi_history,
            reward=self.taxi_reward,
            dropoff_start=self.taxi_dropoff_start,
        )


# The offline default repositories of AutoExplore: source trees of pure-Python packages this project's
# environment installs (its own dependencies and theirs). Those missing from an environment are skipped.
# accelerate, gymnasium and peft have sub-packages, so answers two cds deep (the paper's depth 2) exist:
# 9, 55 and 147 of their tasks; the other nine have 2 among them.
AUTO_EXPLORE_PACKAGES = (
    "tqdm", "packaging", "fsspec", "urllib3", "click", "jinja2", "requests", "idna", "dill",
    "accelerate", "gymnasium", "peft",
)  # fmt: skip


@dataclass
class AutoExploreArguments(EnvArguments):
    """AutoExplore options (envs/auto_explore/): repositories, tasks, splits and the episode rules."""

    name: ClassVar[str] = "auto_explore"
    prefix: ClassVar[str] = "auto_explore_"
    # depth1: answers at most one cd deep (the paper's Depth 1, its depths 0 and 1 merged); depth2: two
    # cds; all: every task. A curriculum is --curriculum depth1,depth2.
    stages: ClassVar[tuple[str, ...]] = ("all", "depth1", "depth2")

    auto_explore_stage: str = field(default="all", metadata={"help": "Tasks by depth: all, depth1 or depth2."})
    auto_explore_repo_dirs: str = field(
        default="",
        metadata={
            "help": "Comma-separated repository directories; default: the installed source trees of "
            + ", ".join(AUTO_EXPLORE_PACKAGES)
            + "."
        },
    )
    auto_explore_tasks: str = field(
        default="", metadata={"help": "A tasks .jsonl (envs.auto_explore.tasks.save_tasks); default: generated."}
    )
    auto_explore_max_depth: int = field(default=2, metadata={"help": "Deepest answer (cds) a generated task has."})
    auto_explore_holdout_repos: str = field(
        default="",
        metadata={"help": "Comma-separated repository names whose tasks are the test split, never trained on."},
    )
    auto_explore_split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation/test split."})
    auto_explore_horizon: int = field(default=15, metadata={"help": "Steps before truncation (paper: 15)."})
    auto_explore_leave_out: float = field(
        default=0.5,
        metadata={"help": "Training only: chance to hide each entry off the answer's path (paper: 0.5)."},
    )
    auto_explore_max_cat_chars: int = field(
        default=1500, metadata={"help": "Characters of a file that cat shows (then a notice)."}
    )

    def __post_init__(self):
        if self.auto_explore_stage not in self.stages:
            stages = ", ".join(self.stages)
            raise UsageError(f"--auto_explore_stage {self.auto_explore_stage!r} is not one of {stages}")
        if self.auto_explore_horizon <= 0 or self.auto_explore_max_cat_chars <= 0:
            raise UsageError("--auto_explore_horizon and --auto_explore_max_cat_chars must be positive")
        if not 0 <= self.auto_explore_leave_out < 1:
            raise UsageError("--auto_explore_leave_out must be in [0, 1)")
        if self.auto_explore_tasks and not Path(self.auto_explore_tasks).is_file():
            raise UsageError(f"--auto_explore_tasks {self.auto_explore_tasks} is not a file")
        for d in self.repo_dirs():
            if not Path(d).is_dir():
                raise UsageError(f"--auto_explore_repo_dirs: {d} is not a directory")

    @property
    def stage(self) -> str:
        return self.auto_explore_stage

    def repo_dirs(self) -> list[str]:
        if self.auto_explore_repo_dirs:
            return [d for d in self.auto_explore_repo_dirs.split(",") if d]
        from envs.auto_explore.tasks import installed_source_dirs

        found = installed_source_dirs(AUTO_EXPLORE_PACKAGES)
        if not found:
            raise UsageError("none of the default AutoExplore packages is installed; pass --auto_explore_repo_dirs")
        return list(found)

    def tasks(self, stage: str | None = None, split: str = "train") -> list:
        """The tasks of ``split`` at ``stage``'s depths."""
        from envs.auto_explore.tasks import cached_tasks, split_tasks

        every = cached_tasks(tuple(self.repo_dirs()), self.auto_explore_tasks, self.auto_explore_max_depth)
        holdout = tuple(r for r in self.auto_explore_holdout_repos.split(",") if r)
        tasks = split_tasks(list(every), split, self.auto_explore_split_seed, holdout)
        stage = stage or self.auto_explore_stage
        if stage == "depth1":
            tasks = [t for t in tasks if t.depth <= 1]
        elif stage == "depth2":
            tasks = [t for t in tasks if t.depth == 2]
        if not tasks:
            raise UsageError(
                f"AutoExplore has no {split} tasks at stage {stage} (repositories: {', '.join(self.repo_dirs())}); "
                "pass other --auto_explore_repo_dirs, --auto_explore_holdout_repos or --auto_explore_stage"
            )
        return tasks

    def make_env(self, stage: str | None = None, split: str = "train"):
        from envs.auto_explore import AutoExploreEnv

        return AutoExploreEnv(
            self.tasks(stage, split),
            horizon=self.auto_explore_horizon,
            leave_out=self.auto_explore_leave_out if split == "train" else 0.0,
            max_cat_chars=self.auto_explore_max_cat_chars,
        )


ALFWORLD_TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)  # envs.alfworld.TASK_TYPES (a test checks)


@dataclass
class AlfWorldArguments(EnvArguments):
    """ALFWorld options (envs/alfworld/): generated or official games, task types, the episode rules."""

    name: ClassVar[str] = "alfworld"
    prefix: ClassVar[str] = "alfworld_"
    # all: every task type together; one task type alone (the paper used pick_and_place_simple)
    stages: ClassVar[tuple[str, ...]] = ("all", *ALFWORLD_TASK_TYPES)

    alfworld_stage: str = field(
        default="all", metadata={"help": "Task type: all, or one of " + ", ".join(ALFWORLD_TASK_TYPES) + "."}
    )
    alfworld_data: str = field(
        default="",
        metadata={
            "help": "Official ALFWorld data (the folder alfworld-download fills, with json_2.1.1/): its train, "
            "valid_seen (validation) and valid_unseen (test) games are played. Default: $ALFWORLD_DATA where it "
            "holds json_2.1.1/, else games generated offline; 'generated' forces generated games."
        },
    )
    alfworld_games_dir: str = field(
        default="",
        metadata={"help": "Where generated games are written once and reused; default $REFLECT_RL_CACHE/alfworld."},
    )
    alfworld_train_games: int = field(default=40, metadata={"help": "Generated training games per task type."})
    alfworld_eval_games: int = field(
        default=10, metadata={"help": "Generated validation and test games per task type (each)."}
    )
    alfworld_seed: int = field(default=0, metadata={"help": "Seed of the game generator."})
    alfworld_max_receptacles: int = field(default=8, metadata={"help": "Receptacles in a generated room (at most)."})
    alfworld_horizon: int = field(default=15, metadata={"help": "Steps before truncation (paper: 15; GiGPO: 50)."})
    alfworld_history: int = field(
        default=4, metadata={"help": "Previous steps (action, observation) shown in the observation."}
    )
    alfworld_step_timeout: float = field(
        default=60.0,
        metadata={"help": "Seconds the engine may take for a load or a step; past it the game is marked bad."},
    )

    def __post_init__(self):
        if self.alfworld_stage not in self.stages:
            raise UsageError(f"--alfworld_stage {self.alfworld_stage!r} is not one of {', '.join(self.stages)}")
        for name in ("alfworld_train_games", "alfworld_eval_games", "alfworld_horizon", "alfworld_max_receptacles"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive")
        if self.alfworld_history < 0:
            raise UsageError("--alfworld_history must be >= 0")
        check_numbers(self, positive=("alfworld_step_timeout",))
        if self.alfworld_max_receptacles < 4:
            raise UsageError("--alfworld_max_receptacles must be at least 4 (a task can need four receptacles)")
        official = os.environ.get("ALFWORLD_DATA", "")
        if not self.alfworld_data and official and (Path(official) / "json_2.1.1").is_dir():
            self.alfworld_data = official  # recorded in config.yaml like any flag
        if self.alfworld_data and self.alfworld_data != "generated":
            if not (Path(self.alfworld_data) / "json_2.1.1").is_dir():
                raise UsageError(
                    f"--alfworld_data {self.alfworld_data} has no json_2.1.1/ folder (run alfworld-download where "
                    "there is internet, or pass --alfworld_data generated)"
                )

    @property
    def stage(self) -> str:
        return self.alfworld_stage

    @property
    def official(self) -> bool:
        return bool(self.alfworld_data) and self.alfworld_data != "generated"

    def games(self, stage: str | None = None, split: str = "train") -> list:
        """The games of ``split`` of ``stage``'s task types (generated on first use, then read from disk)."""
        from envs.alfworld import generate_games, generated_games, official_games
        from envs.alfworld.generator import default_games_dir

        stage = stage or self.alfworld_stage
        task_types = ALFWORLD_TASK_TYPES if stage == "all" else (stage,)
        if self.official:
            games = list(official_games(self.alfworld_data, split, task_types))
        else:
            settings = {
                "counts": {"train": self.alfworld_train_games}
                | {"validation": self.alfworld_eval_games, "test": self.alfworld_eval_games},
                "seed": self.alfworld_seed,
                "max_receptacles": self.alfworld_max_receptacles,
            }
            folder = self.alfworld_games_dir or default_games_dir(settings)
            files = generate_games(folder, **settings, engine_timeout=max(self.alfworld_step_timeout, 60.0))
            games = [g for g in generated_games(files[split]) if g.task_type in task_types]
        if not games:
            where = self.alfworld_data if self.official else "the generated set"
            raise UsageError(f"ALFWorld has no {split} games of stage {stage} in {where}; pass other --alfworld_stage")
        return games

    def make_env(self, stage: str | None = None, split: str = "train"):
        from envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(
            self.games(stage, split),
            horizon=self.alfworld_horizon,
            history=self.alfworld_history,
            step_timeout=self.alfworld_step_timeout,
            stage=stage or self.alfworld_stage,
        )


@dataclass
class TextWorldArguments(EnvArguments):
    """TextWorld options (envs/textworld_env.py): the generator's settings and the episode rules."""

    name: ClassVar[str] = "textworld"
    prefix: ClassVar[str] = "textworld_"
    stages: ClassVar[tuple[str, ...]] = ("all",)

    textworld_games_dir: str = field(
        default="",
        metadata={"help": "Where generated games are written once and reused; default $REFLECT_RL_CACHE/textworld."},
    )
    textworld_train_games: int = field(default=50, metadata={"help": "Training games."})
    textworld_eval_games: int = field(default=10, metadata={"help": "Validation and test games (each)."})
    textworld_seed: int = field(default=0, metadata={"help": "Seed of the game generator."})
    textworld_world_size: int = field(default=3, metadata={"help": "Rooms of a game."})
    textworld_nb_objects: int = field(default=6, metadata={"help": "Objects of a game."})
    textworld_quest_length: int = field(default=3, metadata={"help": "Actions the quest needs at least."})
    textworld_horizon: int = field(default=15, metadata={"help": "Steps before truncation."})
    textworld_history: int = field(
        default=4, metadata={"help": "Previous steps (command, answer) shown in the observation."}
    )

    def __post_init__(self):
        for name in (
            "textworld_train_games",
            "textworld_eval_games",
            "textworld_world_size",
            "textworld_nb_objects",
            "textworld_quest_length",
            "textworld_horizon",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive")
        if self.textworld_history < 0:
            raise UsageError("--textworld_history must be >= 0")

    def games(self, split: str = "train") -> list:
        from envs.textworld_env import default_games_dir, generate_games

        eval_games = self.textworld_eval_games
        settings = {
            "counts": {"train": self.textworld_train_games, "validation": eval_games, "test": eval_games},
            "seed": self.textworld_seed,
            "world_size": self.textworld_world_size,
            "nb_objects": self.textworld_nb_objects,
            "quest_length": self.textworld_quest_length,
        }
        return generate_games(self.textworld_games_dir or default_games_dir(settings), **settings)[split]

    def make_env(self, stage: str | None = None, split: str = "train"):
        from envs.textworld_env import TextWorldEnv

        return TextWorldEnv(self.games(split), horizon=self.textworld_horizon, history=self.textworld_history)


ICPI_STAGES = ("chain", "distractor_chain", "maze", "mini_catch", "mini_invaders", "point_mass")  # envs.icpi.ENVS


@dataclass
class IcpiArguments(EnvArguments):
    """The six small environments of ICPI (envs/icpi.py); each stage is one environment, not a curriculum step."""

    name: ClassVar[str] = "icpi"
    prefix: ClassVar[str] = "icpi_"
    stages: ClassVar[tuple[str, ...]] = ICPI_STAGES

    icpi_stage: str = field(default="chain", metadata={"help": "Environment: " + ", ".join(ICPI_STAGES) + "."})
    icpi_hint: bool = field(
        default=True,
        metadata={"help": "Append the hint clauses (the paper's italics, e.g. 'and state != [4]') to state texts."},
    )

    def __post_init__(self):
        if self.icpi_stage not in self.stages:
            raise UsageError(f"--icpi_stage {self.icpi_stage!r} is not one of {', '.join(self.stages)}")

    @property
    def stage(self) -> str:
        return self.icpi_stage

    def make_env(self, stage: str | None = None, split: str = "train"):
        # no task list: evaluation seeds are disjoint from training's, as for Taxi
        from envs.icpi import make_icpi_env

        return make_icpi_env(stage or self.icpi_stage, hint=self.icpi_hint)


# envs.scienceworld_env.task_names() of scienceworld 1.2.3 (a test checks)
SCIENCEWORLD_TASKS = (
    "boil", "change-the-state-of-matter-of", "chemistry-mix", "chemistry-mix-paint-secondary-color",
    "chemistry-mix-paint-tertiary-color", "find-animal", "find-living-thing", "find-non-living-thing", "find-plant",
    "freeze", "grow-fruit", "grow-plant", "identify-life-stages-1", "identify-life-stages-2",
    "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces",
    "inclined-plane-friction-unnamed-surfaces", "lifespan-longest-lived", "lifespan-longest-lived-then-shortest-lived",
    "lifespan-shortest-lived", "measure-melting-point-known-substance", "measure-melting-point-unknown-substance",
    "melt", "mendelian-genetics-known-plant", "mendelian-genetics-unknown-plant", "power-component",
    "power-component-renewable-vs-nonrenewable-energy", "test-conductivity", "test-conductivity-of-unknown-substances",
    "use-thermometer",
)  # fmt: skip
SCIENCEWORLD_SIMPLIFICATIONS = (
    "easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors", "noElectricalAction",
)  # fmt: skip


@dataclass
class ScienceWorldArguments(EnvArguments):
    """ScienceWorld options (envs/scienceworld_env.py): tasks, ScienceWorld's variation splits, the episode rules."""

    name: ClassVar[str] = "scienceworld"
    prefix: ClassVar[str] = "scienceworld_"
    # all: the 30 tasks together (the seed picks the task); one task alone, so --stages boil,melt evaluates per task
    # and --curriculum find-animal,all trains one task first
    stages: ClassVar[tuple[str, ...]] = ("all", *SCIENCEWORLD_TASKS)

    scienceworld_task: str = field(
        default="all", metadata={"help": "Task: all (the 30 tasks, the seed picks one), or one task name."}
    )
    scienceworld_horizon: int = field(default=15, metadata={"help": "Steps before truncation (Song et al.: 15)."})
    scienceworld_history: int = field(
        default=4,
        metadata={"help": "Previous steps (action, answer, '(Reward: x)') shown; 15 shows whole episodes."},
    )
    scienceworld_max_actions: int = field(
        default=40,
        metadata={
            "help": "Actions listed (at most 62, the labels every agent has), kept by a seeded round-robin over "
            "ScienceWorld's action templates (envs.scienceworld_env.cap_actions); typed actions reach all."
        },
    )
    scienceworld_keep_gold: bool = field(
        default=False,
        metadata={
            "help": "Always list the expert's next action (the gold path's): the oracle can then win, and the task "
            "is easier than with the cap alone and shows a learner the expert's choice among the listed ones."
        },
    )
    scienceworld_simplifications: str = field(
        default="",
        metadata={
            "help": "ScienceWorld's simplifications, comma-separated: " + ", ".join(SCIENCEWORLD_SIMPLIFICATIONS) + "."
        },
    )
    scienceworld_step_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a step may take (a reset 5 times as long); past it the JVM is killed, the fault counted "
            "and the episode ended."
        },
    )
    scienceworld_java_options: str = field(
        default="-Xmx1g -XX:+UseSerialGC",
        metadata={
            "help": "Options of each environment's JVM: the heap cap holds one at ~250-600 MB resident (uncapped: "
            "1-2.5 GB), the serial collector at one GC thread."
        },
    )

    def __post_init__(self):
        import importlib.util
        import shutil

        if self.scienceworld_task not in self.stages:
            raise UsageError(f"--scienceworld_task {self.scienceworld_task!r} is not all or a ScienceWorld task name")
        if self.scienceworld_horizon <= 0:
            raise UsageError("--scienceworld_horizon must be positive")
        if self.scienceworld_history < 0:
            raise UsageError("--scienceworld_history must be >= 0")
        if not 1 <= self.scienceworld_max_actions <= 62:
            raise UsageError(f"--scienceworld_max_actions must be in [1, 62], not {self.scienceworld_max_actions}")
        check_numbers(self, positive=("scienceworld_step_timeout",))
        chosen = [s for s in self.scienceworld_simplifications.split(",") if s]
        bad = [s for s in chosen if s not in SCIENCEWORLD_SIMPLIFICATIONS]
        if bad:
            raise UsageError(f"--scienceworld_simplifications has unknown {', '.join(bad)}")
        electrical = [t for t in SCIENCEWORLD_TASKS if "power-component" in t or "conductivity" in t]
        if "noElectricalAction" in chosen and self.scienceworld_task in ("all", *electrical):
            raise UsageError("--scienceworld_simplifications noElectricalAction makes electrical tasks unsolvable")
        if importlib.util.find_spec("scienceworld") is None:
            raise UsageError("--env scienceworld needs the scienceworld package: pip install scienceworld==1.2.3")
        if shutil.which("java") is None:
            raise UsageError("--env scienceworld needs Java (17 or later) on PATH for its simulator")

    @property
    def stage(self) -> str:
        return self.scienceworld_task

    def make_env(self, stage: str | None = None, split: str = "train"):
        from envs.scienceworld_env import ScienceWorldEnv

        stage = stage or self.scienceworld_task
        return ScienceWorldEnv(
            SCIENCEWORLD_TASKS if stage == "all" else (stage,),
            split=split,
            horizon=self.scienceworld_horizon,
            history=self.scienceworld_history,
            max_actions=self.scienceworld_max_actions,
            keep_gold=self.scienceworld_keep_gold,
            simplifications=self.scienceworld_simplifications,
            step_timeout=self.scienceworld_step_timeout,
            java_options=self.scienceworld_java_options,
            stage=stage,
        )


# --env name -> its argument dataclass; an environment is added here and in envs.ENVS.
ENV_ARGUMENTS: dict[str, type[EnvArguments]] = {
    TaxiArguments.name: TaxiArguments,
    AutoExploreArguments.name: AutoExploreArguments,
    AlfWorldArguments.name: AlfWorldArguments,
    TextWorldArguments.name: TextWorldArguments,
    IcpiArguments.name: IcpiArguments,
    ScienceWorldArguments.name: ScienceWorldArguments,
}


def env_arguments(name: str) -> type[EnvArguments]:
    if name not in ENV_ARGUMENTS:
        raise UsageError(f"--env {name!r} is not one of {', '.join(ENV_ARGUMENTS)}")
    return ENV_ARGUMENTS[name]


@dataclass
class LocalModelArguments:
    """A local HF model that answers prompts (the in-context methods' ``--backend local``, and evaluation.serve)."""

    model: str = field(
        default="tiny-gpt2", metadata={"help": "A built-in name (tiny-gpt2, smollm2-135m) or an HF model folder."}
    )
    adapter: str = field(
        default="", metadata={"help": "Local model: a LoRA adapter folder (or a whole fine-tuned model folder)."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Local model: weights dtype, float32, bfloat16, float16 or auto (bf16 where the GPU has it)."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Local model: auto (cuda if available), cpu, cuda, cuda:1..."}
    )
    batch_size: int = field(default=16, metadata={"help": "Local model: the most prompts decoded together."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError("--batch_size must be >= 1")
        check_dtype(self.dtype)


@dataclass
class BackendArguments(LocalModelArguments):
    """Which language model answers the in-context methods: a local HF model or an OpenAI-compatible API."""

    model: str = field(
        default="tiny-gpt2",
        metadata={
            "help": "local: a built-in name (tiny-gpt2, smollm2-135m) or an HF folder; openai: the API's model name "
            "(pin a dated one)."
        },
    )
    backend: str = field(
        default="local", metadata={"help": "local (an HF model here) or openai (any compatible API)."}
    )
    api_base: str = field(
        default="",
        metadata={"help": "openai: base URL of the server, e.g. http://127.0.0.1:8000/v1 (default OpenAI)."},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "openai: environment variable holding the key (never written)."}
    )
    cache_dir: str = field(
        default="",
        metadata={
            "help": "openai: response cache folder; default $REFLECT_RL_CACHE/api_responses "
            "(~/.cache/reflect_rl/api_responses); 'none' turns caching off."
        },
    )
    concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once."})
    timeout: float = field(default=60.0, metadata={"help": "openai: seconds before one request times out."})
    max_retries: int = field(default=6, metadata={"help": "openai: retries on 429/5xx/timeouts, with backoff."})
    price_per_1k_prompt: float = field(default=0.0, metadata={"help": "openai: USD per 1k prompt tokens (cost)."})
    price_per_1k_completion: float = field(
        default=0.0, metadata={"help": "openai: USD per 1k completion tokens (cost)."}
    )

    def __post_init__(self):
        if self.backend not in ("local", "openai"):
            raise UsageError(f"--backend {self.backend!r} is not one of local, openai")
        if not self.model:
            raise UsageError("--model is empty; name a local model or the API's model")
        if self.backend == "openai" and self.adapter:
            raise UsageError("--adapter is for --backend local; serve the adapter with evaluation.serve instead")
        if self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")
        if self.max_retries < 0:
            raise UsageError("--max_retries must be >= 0")
        if self.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if self.price_per_1k_prompt < 0 or self.price_per_1k_completion < 0:
            raise UsageError("--price_per_1k_prompt and --price_per_1k_completion must be >= 0")
        super().__post_init__()


@dataclass
class ReflectorAPIArguments:
    """The frozen reflector behind an OpenAI-compatible server: ``evaluation.serve --adapter SFT_REFLECTOR``, vLLM
    on other GPUs, or a hosted model. RL and evaluation take it in place of ``--reflector_path``; data generation
    (DataGenReflectorArguments, ``--reflector api``) asks it for the reflections of its SFT data."""

    reflector_api_base: str = field(
        default="",
        metadata={
            "help": "Base URL of an OpenAI-compatible server that serves the reflector, e.g. http://127.0.0.1:8000/v1 "
            "for evaluation.serve (RL and evaluation: instead of --reflector_path; data generation: default the "
            "openai client's)."
        },
    )
    reflector_model: str = field(default="", metadata={"help": "The served reflector's model name."})
    reflector_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the server's key (never written or logged)."},
    )
    reflector_concurrency: int = field(default=16, metadata={"help": "Reflection requests in flight at once."})
    reflector_timeout: float = field(default=60.0, metadata={"help": "Seconds before one request times out."})
    reflector_max_retries: int = field(default=6, metadata={"help": "Retries on 429/5xx/timeouts, with backoff."})

    def __post_init__(self):
        if self.reflector_api_base and not self.reflector_model:
            raise UsageError("--reflector_api_base needs --reflector_model, the name the server gives the reflector")
        if self.reflector_concurrency < 1:
            raise UsageError("--reflector_concurrency must be >= 1")
        if self.reflector_max_retries < 0:
            raise UsageError("--reflector_max_retries must be >= 0")
        check_numbers(self, positive=("reflector_timeout",))

    def check_served_reflector(self, reflector_path: str) -> None:
        """RL and evaluation: the served reflector is in place of the one at ``--reflector_path``."""
        if self.reflector_api_base and reflector_path:
            raise UsageError("pass --reflector_path or --reflector_api_base, not both")

    def reflector_backend(self, cache_dir=None):
        """The OpenAIBackend these flags describe; its errors name them."""
        from llm.openai_api import OpenAIBackend

        return OpenAIBackend(
            self.reflector_model,
            base_url=self.reflector_api_base or None,
            api_key_env=self.reflector_api_key_env,
            timeout=self.reflector_timeout,
            max_retries=self.reflector_max_retries,
            concurrency=self.reflector_concurrency,
            cache_dir=cache_dir,
            flag_prefix="reflector_",
        )


@dataclass
class DataGenReflectorArguments(ReflectorAPIArguments):
    """Who writes the reflections of SFT data: the built-in rule, or a chat model behind an OpenAI-compatible API
    (data generation; a hosted model by default, hence its own defaults of the model and of concurrency)."""

    reflector: str = field(default="rule", metadata={"help": "Who writes reflections: rule (built-in) or api."})
    reflector_model: str = field(
        default="gpt-4o-mini-2024-07-18", metadata={"help": "Chat model name (pin a dated one)."}
    )
    reflector_concurrency: int = field(default=8, metadata={"help": "Reflection requests in flight at once."})
    reflector_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (paper: 0.7)."})
    reflector_max_tokens: int = field(default=150, metadata={"help": "Token cap of one reflection."})
    reflector_cache_dir: str = field(
        default="", metadata={"help": "On-disk response cache; default <output_dir>/../.reflection_cache."}
    )

    def __post_init__(self):
        if self.reflector not in ("rule", "api"):
            raise UsageError(f"--reflector {self.reflector!r} is not one of rule, api")
        super().__post_init__()


@dataclass
class LLMTaskArguments:
    """AutoExplore tasks written by a language model (python -m data_gen.auto_explore.llm_tasks)."""

    output_file: str = field(
        default="", metadata={"help": "The task list (JSONL) to write; pass it later as --auto_explore_tasks."}
    )
    max_files: int = field(default=100, metadata={"help": "Files asked about per repository (the paper's 100)."})
    questions_per_file: int = field(default=2, metadata={"help": "Question/answer pairs asked for per file."})
    excerpt_chars: int = field(
        default=6000, metadata={"help": "Characters of the line block shown (the paper: ~2000 tokens)."}
    )
    min_chars: int = field(default=200, metadata={"help": "Files shorter than this are skipped (~50 tokens)."})
    max_tokens: int = field(default=400, metadata={"help": "Tokens the model may answer with, per file."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (cached by the API backend)."})
    seed: int = field(default=0, metadata={"help": "Which files and line blocks are picked (and sampling seeds)."})

    def __post_init__(self):
        if not self.output_file:
            raise UsageError("--output_file is required: where the task list goes")
        check_numbers(
            self,
            positive=("max_files", "questions_per_file", "excerpt_chars", "max_tokens"),
            non_negative=("min_chars", "temperature"),
        )


@dataclass
class DataGenArguments:
    """SFT data generation (data_gen/taxi/gen_sft.py)."""

    output_dir: str = field(default="data/taxi", metadata={"help": "Where train/ and test/ JSONL files go."})
    num_episodes: int = field(default=300, metadata={"help": "Training episodes."})
    num_test_episodes: int = field(default=60, metadata={"help": "Held-out episodes (other seeds)."})
    random_action_rate: float = field(
        default=0.3,
        metadata={"help": "Probability of a random (non-fatal) action instead of the oracle's (paper: 0.9)."},
    )
    label_source: str = field(
        default="oracle",
        metadata={
            "help": "Action label of a trajectory step: oracle (the best action) or executed (the action taken, "
            "random detours included: the paper's noisy labels, which leave a softer policy for RL to sharpen)."
        },
    )
    negative_rate: float = field(
        default=0.3,
        metadata={
            "help": "Per step, the chance to add a negative example: a wrong move, then a corrective reflection."
        },
    )
    swap_rate: float = field(
        default=0.0,
        metadata={
            "help": "Per negative example, the chance to add a swapped one (Taxi, rule reflector): the same state "
            "with a reflection whose plan names another move, labelled with that move, for the policy data only. "
            "It teaches the policy to act on the reflection, which a rule reflector's plan, a function of the "
            "state, does not (0: the paper's data)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the episode starts and random actions."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an output_dir from a different run."})

    def __post_init__(self):
        if self.num_episodes <= 0 or self.num_test_episodes < 0:
            raise UsageError("--num_episodes must be positive and --num_test_episodes >= 0")
        for name in ("random_action_rate", "negative_rate", "swap_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name} must be in [0, 1]")
        if self.label_source not in ("oracle", "executed"):
            raise UsageError(f"--label_source {self.label_source!r} is not one of oracle, executed")


@dataclass
class SFTScriptArguments:
    """What training.sft trains on (the model and trainer options are separate dataclasses)."""

    role: str = field(
        default="policy",
        metadata={
            "help": "policy (prompt + reflection -> action), reflector (prompt -> reflection) or plain "
            "(prompt -> action, the no-reflection baseline)."
        },
    )
    data_dir: str = field(default="data/taxi", metadata={"help": "Output of data_gen (holds train/ and test/)."})
    positive_only: bool = field(default=False, metadata={"help": "Use *_positive.jsonl (no negative examples)."})
    max_eval_samples: int = field(default=400, metadata={"help": "Held-out examples scored after training (0: none)."})

    def __post_init__(self):
        if self.role not in SFT_FILES:
            raise UsageError(f"--role {self.role!r} is not one of {', '.join(SFT_FILES)}")

    def data_file(self, split: str) -> str:
        name = SFT_FILES[self.role] + ("_positive" if self.positive_only else "")
        return str(Path(self.data_dir) / split / f"{name}.jsonl")


SFT_FILES = {"policy": "sft_policy", "reflector": "sft_reflection", "plain": "sft"}


def _build_sft_training_arguments():
    """SFTTrainingArguments subclasses TRL's SFTConfig, and importing trl takes seconds; it is built on
    first use (see ``__getattr__``) so commands that do not train with TRL start fast."""
    from trl import SFTConfig

    @dataclass
    class SFTTrainingArguments(SFTConfig):
        """TRL's SFTConfig with defaults that run anywhere: bf16 only where the GPU has it, TensorBoard
        always, the paper's LoRA learning rate (2e-4) and a cosine schedule."""

        output_dir: str = field(
            default="runs/sft", metadata={"help": "Run folder: adapter, checkpoints, config, metrics."}
        )
        bf16: bool | None = field(
            default=None, metadata={"help": "bf16 mixed precision; default: where CUDA supports it."}
        )
        learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (paper: 2e-4 with LoRA)."})
        lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule (cosine avoids late swings)."})
        warmup_steps: float = field(
            default=0.03, metadata={"help": "Warm-up: a fraction of steps if < 1, else a count."}
        )
        num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (max_steps > 0 overrides)."})
        per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per process."})
        per_device_eval_batch_size: int = field(default=32, metadata={"help": "Eval batch size per process."})
        logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
        save_steps: float = field(default=100, metadata={"help": "Checkpoint every N steps."})
        save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept."})
        report_to: None | str | list[str] = field(
            default="tensorboard",
            metadata={"help": "tensorboard, wandb, trackio or none (metrics.jsonl is always written)."},
        )
        overwrite_output_dir: bool = field(
            default=False, metadata={"help": "Delete output_dir if it holds another run."}
        )
        activation_checkpointing: bool | None = field(
            default=False,
            metadata={"help": "Recompute activations in backward (TRL's default is on; small models run faster off)."},
        )
        gradient_checkpointing: bool | None = field(
            default=None, metadata={"help": "Old name of --activation_checkpointing."}
        )
        ddp_find_unused_parameters: bool | None = field(
            default=False,
            metadata={"help": "DDP graph walk for unused parameters (LoRA and full models use them all)."},
        )

        def __post_init__(self):
            import torch

            if self.bf16 is None:
                self.bf16 = cuda_bf16()
            if not torch.cuda.is_available():
                self.use_cpu = True
            try:
                super().__post_init__()
            except ValueError as err:
                raise UsageError(str(err).splitlines()[0]) from None

    # Trainer pickles its args into every checkpoint; pickle finds the class by this name through
    # the module-level __getattr__ below.
    SFTTrainingArguments.__qualname__ = "SFTTrainingArguments"
    return SFTTrainingArguments


def __getattr__(name: str):
    if name == "SFTTrainingArguments":
        cls = _build_sft_training_arguments()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'experiment_args' has no attribute {name!r}")


@dataclass
class RLArguments(ReflectorAPIArguments):
    """Online RL of the policy with a frozen reflector (training/rl_finetune.py)."""

    output_dir: str = field(
        default="runs/rl", metadata={"help": "Run folder: config, metrics, checkpoints, episodes."}
    )
    env: str = field(
        default="", metadata={"help": f"Environment: {', '.join(ENV_ARGUMENTS)}; default: the SFT data's (else taxi)."}
    )
    policy_path: str = field(default="", metadata={"help": "SFT policy run folder (adapter or full model)."})
    reflector_path: str = field(
        default="", metadata={"help": "SFT reflector run folder; empty runs the no-reflection setting."}
    )
    algo: str = field(
        default="ppo",
        metadata={
            "help": "ppo (clipped, value head, GAE, KL), reinforce (the paper's), rloo or grpo (group_size "
            "episodes per task, the group as baseline, no critic)."
        },
    )
    group_size: int = field(
        default=1, metadata={"help": "rloo/grpo: episodes of the same task (seed) per group; divides num_envs."}
    )
    scale_group_std: bool = field(
        default=True, metadata={"help": "grpo: divide group-centred advantages by the group's std."}
    )
    group_by_state: bool = field(
        default=False,
        metadata={
            "help": "rloo/grpo: add GiGPO's step-level term: steps of a group taken from the same env state "
            "share a baseline at that state."
        },
    )
    step_advantage_weight: float = field(
        default=1.0, metadata={"help": "Weight of the step-level term of --group_by_state (GiGPO's omega)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast in forward passes; default: where CUDA supports it."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything: episode starts, sampling, LoRA init."})
    iterations: int = field(default=50, metadata={"help": "Rollout + update rounds."})
    num_envs: int = field(default=32, metadata={"help": "Episodes per iteration, stepped in lockstep."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate (paper: 2e-4)."})
    anneal_lr: bool = field(
        default=False,
        metadata={"help": "Decay the learning rate linearly to 0 over --iterations (CleanRL's anneal_lr)."},
    )
    gamma: float = field(default=0.95, metadata={"help": "Discount (paper: 1.0)."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda (ppo)."})
    clip_coef: float = field(default=0.2, metadata={"help": "PPO ratio clip."})
    vf_coef: float = field(default=0.5, metadata={"help": "Value loss weight."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus weight."})
    kl_coef: float = field(
        default=0.02,
        metadata={"help": "Weight of KL(pi || SFT policy), exact over the action labels, in the loss (0: off)."},
    )
    target_kl: float = field(
        default=0.0, metadata={"help": "Stop an update's epochs once approx_kl exceeds it (0: off)."}
    )
    update_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch (reinforce: 1)."})
    minibatch_size: int = field(default=64, metadata={"help": "Steps per gradient step."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping (paper: 0.3)."})
    reinforce_baseline: str = field(
        default="mean",
        metadata={"help": "reinforce only: none (the paper), mean (per-timestep mean return) or value."},
    )
    replay_buffer_size: int = field(default=0, metadata={"help": "Successful episodes kept for replay (paper: 50)."})
    replay_episodes: int = field(default=1, metadata={"help": "Replayed episodes added to each update."})
    curriculum: str = field(default="", metadata={"help": "Comma-separated stages, e.g. pickup,dropoff,full."})
    curriculum_switch: float = field(
        default=0.0,
        metadata={"help": "0: split iterations evenly between stages; >0: advance once success rate reaches it."},
    )
    reflection_max_tokens: int = field(default=48, metadata={"help": "Token cap of one reflection."})
    reflection_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Reflector sampling temperature (the paper: 1.0). 0 = greedy: deterministic reflections, "
            "memoised per prompt (far faster rollouts when prompts repeat)."
        },
    )
    shuffle_labels: bool = field(
        default=False, metadata={"help": "Draw fresh random action labels every step (the paper's shuffle_action)."}
    )
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N iterations (and at the end)."})
    log_episodes: int = field(
        default=2, metadata={"help": "Decoded episodes written to episodes.jsonl per iteration."}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, trackio or none."})
    resume_from_checkpoint: str = field(default="", metadata={"help": "A checkpoint folder, or 'latest'."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete output_dir if it holds another run."})
    max_bad_updates: int = field(default=3, metadata={"help": "Non-finite updates in a row before the run stops."})

    def __post_init__(self):
        if self.algo not in ("ppo", "reinforce", "rloo", "grpo"):
            raise UsageError(f"--algo {self.algo!r} is not one of ppo, reinforce, rloo, grpo")
        if self.env:
            env_arguments(self.env)
        if not self.policy_path:
            raise UsageError("--policy_path is required (an SFT run folder from training.sft)")
        super().__post_init__()  # the --reflector_api_* flags
        self.check_served_reflector(self.reflector_path)
        if self.reinforce_baseline not in ("none", "mean", "value"):
            raise UsageError(f"--reinforce_baseline {self.reinforce_baseline!r} is not one of none, mean, value")
        for name in ("iterations", "num_envs", "minibatch_size", "update_epochs", "save_steps", "group_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive")
        for name in ("replay_buffer_size", "replay_episodes", "log_episodes", "reflection_max_tokens"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be >= 0")
        check_numbers(
            self,
            positive=("learning_rate", "max_grad_norm", "clip_coef"),
            non_negative=(
                "vf_coef",
                "ent_coef",
                "kl_coef",
                "target_kl",
                "reflection_temperature",
                "step_advantage_weight",
                "curriculum_switch",
            ),
            unit=("gamma", "gae_lambda", "curriculum_switch"),
        )
        if self.max_bad_updates <= 0:
            raise UsageError("--max_bad_updates must be positive")
        if self.algo in ("rloo", "grpo"):
            if self.group_size < 2:
                raise UsageError(f"--algo {self.algo} needs --group_size >= 2 (episodes of one task compared)")
            if self.num_envs % self.group_size:
                raise UsageError(f"--num_envs {self.num_envs} must be a multiple of --group_size {self.group_size}")
            if self.replay_buffer_size > 0:
                raise UsageError(
                    "--replay_buffer_size needs --algo ppo or reinforce (a replayed episode has no group)"
                )
        elif self.group_size != 1 or self.group_by_state:
            raise UsageError("--group_size and --group_by_state need --algo rloo or grpo")
        if self.bf16 is None:
            self.bf16 = cuda_bf16()
        if self.algo == "reinforce":
            self.update_epochs = 1


@dataclass
class PlanCheckArguments:
    """How often a Taxi reflector's plan is a shortest-path action (evaluation/taxi_plans.py)."""

    reflector_path: str = field(default="", metadata={"help": "SFT reflector run folder (training.sft)."})
    policy_path: str = field(
        default="",
        metadata={
            "help": "Also an SFT policy folder: how much it acts on the plan (its move's probability, swap shift)."
        },
    )
    reflection_max_tokens: int = field(default=32, metadata={"help": "Token cap of one reflection."})
    batch_size: int = field(default=64, metadata={"help": "States reflected on (or prompts scored) at once."})
    output: str = field(default="", metadata={"help": "Also write the result (wrong states included) as JSON."})

    def __post_init__(self):
        if not self.reflector_path:
            raise UsageError("--reflector_path is required (an SFT reflector run folder from training.sft)")
        if self.policy_path and not Path(self.policy_path).is_dir():
            raise UsageError(f"--policy_path {self.policy_path} is not a folder; pass an SFT policy run folder")
        if self.reflection_max_tokens <= 0 or self.batch_size <= 0:
            raise UsageError("--reflection_max_tokens and --batch_size must be positive")


# Which past episodes an in-context agent sees (evaluation/in_context_agent.py): Monea et al.'s strategies
# (evaluation/icrl/context.py) over whole episodes, an episode's feedback being its success.
AGENT_CONTEXTS = {
    "none": None,  # zero-shot: the current episode only
    "naive": "random_biased_end",  # the most recent episodes, won or lost
    "only_positive": "random_biased_end_only_positive",  # the most recent won episodes (Naive+)
    "stochastic": "random_unbiased_only_positive",  # a fresh random subset of the won ones (Explorative)
    "approximate": "approximate_only_positive",  # K append-only contexts of won episodes (Approximate)
}


@dataclass
class InContextAgentArguments:
    """An LLM that plays the environment in context (``evaluation.evaluate --agent llm``): a local HF model or any
    OpenAI-compatible API (a hosted model, vLLM, ``evaluation.serve``), reading the trained policy's prompt and
    answering with an action label; past episodes with their rewards can go into its prompt."""

    agent_backend: str = field(
        default="local", metadata={"help": "local (an HF model here) or openai (any OpenAI-compatible API)."}
    )
    agent_model: str = field(
        default="smollm2-135m",
        metadata={"help": "local: a built-in name (smollm2-135m, tiny-gpt2) or an HF folder; openai: the model name."},
    )
    agent_adapter: str = field(default="", metadata={"help": "local: a LoRA adapter folder on --agent_model."})
    agent_dtype: str = field(default="float32", metadata={"help": "local: float32, bfloat16, float16 or auto."})
    agent_device: str = field(default="auto", metadata={"help": "local: auto (cuda if available), cpu, cuda..."})
    agent_api_base: str = field(
        default="", metadata={"help": "openai: base URL, e.g. http://127.0.0.1:8000/v1 (default OpenAI's)."}
    )
    agent_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "openai: environment variable holding the key (never written)."}
    )
    agent_concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once."})
    agent_timeout: float = field(default=60.0, metadata={"help": "openai: seconds before one request times out."})
    agent_max_retries: int = field(default=6, metadata={"help": "openai: retries on 429/5xx/timeouts."})
    agent_cache_dir: str = field(
        default="",
        metadata={"help": "openai: response cache folder (default $REFLECT_RL_CACHE/api_responses); 'none': off."},
    )
    agent_max_tokens: int = field(
        default=16, metadata={"help": "openai: token cap of an answer (a label is one or two tokens)."}
    )
    agent_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the answers (--greedy: 0, argmax)."}
    )
    agent_context: str = field(
        default="none",
        metadata={"help": f"Past episodes in the prompt: {', '.join(AGENT_CONTEXTS)} (Monea et al.'s strategies)."},
    )
    agent_context_episodes: int = field(default=4, metadata={"help": "The most past episodes in one prompt."})
    agent_context_tokens: int = field(
        default=1024, metadata={"help": "Token budget of the past episodes (older steps of a long one are cut)."}
    )
    agent_p_keep: float = field(
        default=0.1, metadata={"help": "stochastic / approximate: the chance a won episode is kept (Monea: 0.1)."}
    )
    agent_max_contexts: int = field(default=8, metadata={"help": "approximate: contexts kept (Monea: 8)."})

    def __post_init__(self):
        if self.agent_backend not in ("local", "openai"):
            raise UsageError(f"--agent_backend {self.agent_backend!r} is not one of local, openai")
        if self.agent_context not in AGENT_CONTEXTS:
            raise UsageError(f"--agent_context {self.agent_context!r} is not one of {', '.join(AGENT_CONTEXTS)}")
        if self.agent_backend == "openai" and self.agent_adapter:
            raise UsageError("--agent_adapter is for --agent_backend local; serve the adapter with evaluation.serve")
        if self.agent_dtype not in DTYPES:
            raise UsageError(f"--agent_dtype {self.agent_dtype!r} is not one of {', '.join(DTYPES)}")
        if min(self.agent_concurrency, self.agent_max_tokens, self.agent_max_contexts) < 1:
            raise UsageError("--agent_concurrency, --agent_max_tokens and --agent_max_contexts must be >= 1")
        if self.agent_max_retries < 0:
            raise UsageError("--agent_max_retries must be >= 0")
        if self.agent_context_episodes < 0 or self.agent_context_tokens < 0:
            raise UsageError("--agent_context_episodes and --agent_context_tokens must be >= 0")
        if not 0 < self.agent_p_keep <= 1:
            raise UsageError(f"--agent_p_keep must be in (0, 1], got {self.agent_p_keep}")
        check_numbers(self, positive=("agent_timeout",), non_negative=("agent_temperature",))

    def backend_arguments(self) -> BackendArguments:
        """The same model as the in-context methods' ``--backend/--model/...`` flags describe it."""
        return BackendArguments(
            model=self.agent_model,
            adapter=self.agent_adapter,
            dtype=self.agent_dtype,
            device=self.agent_device,
            backend=self.agent_backend,
            api_base=self.agent_api_base,
            api_key_env=self.agent_api_key_env,
            cache_dir=self.agent_cache_dir,
            concurrency=self.agent_concurrency,
            timeout=self.agent_timeout,
            max_retries=self.agent_max_retries,
        )


@dataclass
class EvalArguments(ReflectorAPIArguments):
    """Evaluation of a trained policy or a reference agent (evaluation/evaluate.py)."""

    output_dir: str = field(default="runs/eval", metadata={"help": "Where summary.json and episodes.jsonl go."})
    run_dir: str = field(
        default="", metadata={"help": "An RL run (its latest checkpoint is used) or an SFT policy run folder."}
    )
    reflector_path: str = field(
        default="", metadata={"help": "SFT reflector folder for an SFT policy (RL runs name their own)."}
    )
    agent: str = field(
        default="model",
        metadata={"help": "model (the run's policy), llm (an in-context LLM: the --agent_* flags), random or oracle."},
    )
    name: str = field(default="", metadata={"help": "Row label in comparisons; default: the output folder's name."})
    env: str = field(
        default="", metadata={"help": f"Environment: {', '.join(ENV_ARGUMENTS)}; default: the run's (else taxi)."}
    )
    stages: str = field(default="", metadata={"help": "Comma-separated stages; default: the env's configured stage."})
    split: str = field(
        default="test",
        metadata={
            "help": "Task split of environments with a task list: test, validation or train (never by default)."
        },
    )
    num_episodes: int = field(default=100, metadata={"help": "Seeded episodes per stage (the same for every run)."})
    batch_size: int = field(
        default=50,
        metadata={
            "help": "Environments stepped in lockstep; each starts the next episode when its own ends (an in-context "
            "agent: batches of this many, each read after it ends)."
        },
    )
    greedy: bool = field(default=False, metadata={"help": "Argmax actions instead of sampling (the paper samples)."})
    seed: int = field(default=123_456, metadata={"help": "Seed of the evaluation episodes (disjoint from training)."})
    reflection_max_tokens: int = field(default=48, metadata={"help": "Token cap of one reflection."})
    reflection_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Reflector sampling temperature (the paper: 1.0). 0 = greedy: deterministic reflections, "
            "memoised per prompt (far faster rollouts when prompts repeat)."
        },
    )
    shuffle_labels: bool = field(
        default=False, metadata={"help": "Fresh random action labels every step (an RL run's own setting by default)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing evaluation."})

    def __post_init__(self):
        if self.agent not in ("model", "llm", "random", "oracle"):
            raise UsageError(f"--agent {self.agent!r} is not one of model, llm, random, oracle")
        if self.agent == "model" and not self.run_dir:
            raise UsageError("--run_dir is required with --agent model (an RL or SFT run folder)")
        super().__post_init__()  # the --reflector_api_* flags
        self.check_served_reflector(self.reflector_path)
        if self.env:
            env_arguments(self.env)
        if self.split not in SPLITS:
            raise UsageError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.num_episodes <= 0 or self.batch_size <= 0:
            raise UsageError("--num_episodes and --batch_size must be positive")
        if self.reflection_max_tokens < 0:
            raise UsageError("--reflection_max_tokens must be >= 0")
        check_numbers(self, non_negative=("reflection_temperature",))


ICPI_METHODS = ("icpi", "no_argmax", "tabular_q", "matching", "random")


@dataclass
class ICPIArguments(BackendArguments):
    """In-context policy iteration and its baselines on the ICPI environments (evaluation/icpi.py); the
    environment is --icpi_stage (IcpiArguments). Defaults are the paper's (reference C.5) except where noted."""

    output_dir: str = field(default="runs/icpi", metadata={"help": "Run folder (rerun the command to resume)."})
    method: str = field(
        default="icpi",
        metadata={
            "help": "icpi (argmax over LLM rollouts), no_argmax (the LLM rollout policy acts directly), tabular_q "
            "(lr 1, optimistic Q0 = 1), matching (the buffer's most recent identical state-action in place of the "
            "LLM) or random."
        },
    )
    total_steps: int = field(
        default=200, metadata={"help": "Environment steps to train for (the episode in progress finishes)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the episode starts, exploration and prompt shuffles."})
    success_buffer_size: int = field(
        default=8, metadata={"help": "Trajectories the policy prompt draws from (the paper's recency c = 8)."}
    )
    min_successes: int = field(
        default=3, metadata={"help": "Successes before the model acts half the time (use-model sigmoid)."}
    )
    max_resamples: int = field(default=3, metadata={"help": "Tries (each a fresh shuffle) per model prediction."})
    max_prompts: int = field(
        default=5, metadata={"help": "Redraws of a shuffle that repeats an earlier try's prompt, per try."}
    )
    temperature: float = field(default=0.1, metadata={"help": "Sampling temperature of every LLM prediction."})
    max_tokens: int = field(default=100, metadata={"help": "Token cap of one completion (paper: 100)."})
    prompt_tokens: int = field(
        default=3800,
        metadata={
            "help": "Tokens a prompt keeps, examples dropped from the left (paper: 4000 - 100 - 100 with "
            "code-davinci-002; a small model on a CPU wants ~300-1000). Counted with the local model's tokenizer, "
            "else as characters / 4."
        },
    )
    policy_hint: bool = field(default=True, metadata={"help": "Hints in the policy prompt's states too."})
    balance_prompts: bool = field(
        default=True, metadata={"help": "Upsample example groups to equal size (ablation: No Balance)."}
    )
    constrain_prompts: bool = field(
        default=True, metadata={"help": "World-model examples only of the queried action (ablation: No Constraints)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete an existing run folder first."})

    def __post_init__(self):
        if self.method not in ICPI_METHODS:
            raise UsageError(f"--method {self.method!r} is not one of {', '.join(ICPI_METHODS)}")
        for flag in ("total_steps", "success_buffer_size", "max_resamples", "max_prompts", "max_tokens"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1")
        if self.min_successes < 0:
            raise UsageError("--min_successes must be >= 0")
        if self.prompt_tokens < 64:
            raise UsageError(f"--prompt_tokens {self.prompt_tokens} leaves no room for examples; pass >= 64")
        check_numbers(self, non_negative=("temperature",))
        super().__post_init__()

    @property
    def uses_llm(self) -> bool:
        return self.method in ("icpi", "no_argmax")
