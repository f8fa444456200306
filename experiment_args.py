"""Every option of every command, as one dataclass per component (parsed with HfArgumentParser).

Each field has a default and a help string; ``__post_init__`` derives values and fails fast with a
message that names the flag to change. A YAML recipe passed as ``--config recipe.yaml`` may set the
same fields; flags given on the command line win.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Callable

ENV_NAMES = ("taxi",)  # grows with envs.ENVS; checked here so a typo fails before any model loads


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing half-written."""


def cli(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], object]:
    """Run ``main`` so that a UsageError becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse flags (and an optional ``--config file.yaml``) into the given dataclasses.

    ``__post_init__`` failures and unknown flags become UsageError, so they print as one line.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    config_args: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UsageError("--config needs a YAML file path")
        path = argv[i + 1]
        del argv[i : i + 2]
        try:
            with open(path) as f:
                recipe = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"cannot read --config {path}: {err}") from None
        if not isinstance(recipe, dict):
            raise UsageError(f"--config {path} must hold a mapping of flag names to values")
        for key, value in recipe.items():
            if isinstance(value, list):
                config_args += [f"--{key}", *map(str, value)]
            else:
                config_args += [f"--{key}", str(value)]
    try:
        parsed = parser.parse_args_into_dataclasses(args=config_args + argv, return_remaining_strings=True)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    *objs, remaining = parsed
    if remaining:
        raise UsageError(f"unknown flag(s): {' '.join(remaining)} (see --help)")
    return tuple(objs)


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
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes); needs LoRA."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bf16 where the GPU supports it, else fp32), float32, bfloat16, float16."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters; false trains all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names for LoRA, or 'all-linear'."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    cache_dir: str = field(
        default="",
        metadata={"help": "Where built-in models are materialised; default $REFLECT_RL_CACHE or ~/.cache/reflect_rl."},
    )

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise UsageError("--load_in_8bit and --load_in_4bit are exclusive; pass only one")
        if (self.load_in_8bit or self.load_in_4bit) and not self.use_peft:
            # A quantised model has no trainable weights of its own (transformers#30526).
            raise UsageError("a quantised base can only be trained through LoRA; drop --use_peft false or the 8/4-bit flag")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.lora_r <= 0:
            raise UsageError("--lora_r must be positive")
