"""What every command does around its arguments: the CLI wrapper, flag parsing (presets, ``--config``, the
environment and settings a command inherits from the run it starts from), run folders (the resolved
``config.yaml``, refusing to mix two runs, atomic writes) and resume.

Above ``experiment_args`` in the import graph: it reads the argument dataclasses, never the reverse.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from experiment_args import PRESETS, TaxiArguments, UsageError, env_arguments


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


def _pop_flag(argv: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` (or ``flag=VALUE``) from argv and return VALUE."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _as_flags(mapping: dict) -> list[str]:
    out: list[str] = []
    for key, value in mapping.items():
        out += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return out


def parse_args(
    dataclass_types: tuple,
    argv: list[str] | None = None,
    defaults: list[str] = (),
    scope: str = "",
    known_only: bool = False,
) -> tuple:
    """Parse flags (and an optional ``--config file.yaml`` and ``--preset NAME``) into the dataclasses.

    Later sources win: ``defaults``, then the preset's entry for ``scope`` (sft, rl, eval), then the
    ``--config`` file, then the command line. ``__post_init__`` failures and unknown flags become
    UsageError, so they print as one line. ``known_only`` is the first of two passes (see
    :func:`parse_with_env`): flags of other dataclasses are left for the second.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    preset_args: list[str] = []
    preset = _pop_flag(argv, "--preset")
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
        if scope not in PRESETS[preset]:
            raise UsageError(f"--preset {preset} has no settings for this command; drop --preset")
        preset_args = _as_flags(PRESETS[preset][scope])
    config_args: list[str] = []
    path = _pop_flag(argv, "--config")
    if path is not None:
        try:
            with open(path) as f:
                recipe = yaml.safe_load(f) or {}
        except OSError as err:
            raise UsageError(f"cannot read --config {path}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"--config {path} is not valid YAML ({where}{problem})") from None
        if not isinstance(recipe, dict):
            raise UsageError(f"--config {path} must hold a mapping of flag names to values")
        config_args = _as_flags(recipe)
    try:
        parsed = parser.parse_args_into_dataclasses(
            args=[*defaults, *preset_args, *config_args, *argv], return_remaining_strings=True
        )
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    *objs, remaining = parsed
    if remaining and not known_only:
        raise UsageError(f"unknown flag(s): {' '.join(remaining)} (see --help)")
    return tuple(objs)


def resolved_config(*configs, ignore: tuple[str, ...] = ()) -> dict:
    """One flat dict of every field of the given dataclasses (TrainingArguments included)."""
    out: dict = {}
    for cfg in configs:
        items = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
        out.update({k: v for k, v in items.items() if k not in ignore and not k.startswith("_")})
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(
    output_dir: str | Path,
    config: dict,
    flag: str = "--output_dir",
    overwrite: bool = False,
    compare_ignore: tuple[str, ...] = (),
    added_defaults: dict | None = None,
) -> bool:
    """Refuse to mix two runs in one folder.

    Returns True when ``output_dir`` already holds a run with the same config (the caller may resume
    or skip), False when it is new or empty. A folder holding a different run raises UsageError.
    With ``overwrite`` any existing folder is deleted first. ``added_defaults`` are settings newer than
    some saved runs, with their defaults: a saved config that lacks one had that default.
    """
    import yaml

    output_dir = Path(output_dir)
    saved = output_dir / "config.yaml"
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return False
    if overwrite:
        shutil.rmtree(output_dir)
        return False
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        old = {**(added_defaults or {}), **old}
        keys = (set(old) | set(config)) - set(compare_ignore)
        differ = sorted(k for k in keys if _plain(old.get(k)) != _plain(config.get(k)))
        if not differ:
            return True
        what = f"a different run (differs in {', '.join(differ[:4])}{'...' if len(differ) > 4 else ''})"
    else:
        what = "files that are not from this command"
    raise UsageError(f"{output_dir} holds {what}; pass another {flag} or --overwrite_output_dir")


def _plain(value):
    """Normalise a config value so that YAML round trips compare equal (tuples, enums, paths)."""
    import json

    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N, if any."""
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> str:
    """``--resume_from_checkpoint`` as a folder path: '' to start fresh, ``latest`` is the newest
    ``checkpoint-N`` of ``output_dir``, and a given folder must exist."""
    if resume == "latest":
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise UsageError(f"--resume_from_checkpoint latest: {output_dir} has no checkpoint-N folder")
        return str(checkpoint)
    if resume and not Path(resume).is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume} is not a folder")
    return resume or ""


def _run_config(run_dir: str | Path) -> dict | None:
    import yaml

    path = Path(run_dir) / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def run_env(run_dir: str | Path, _depth: int = 0) -> str:
    """The ``--env`` a data folder, SFT run or RL run was made with ('' if it records none).

    Each records it in its config.yaml, or names the folder it started from (``data_dir``,
    ``policy_path``); folders written before ``--env`` was recorded hold only Taxi flags.
    """
    config = _run_config(run_dir)
    if config is None or _depth > 3:
        return ""
    if config.get("env"):
        return str(config["env"])
    if any(k.startswith(TaxiArguments.prefix) for k in config):
        return TaxiArguments.name
    for parent in ("data_dir", "policy_path"):
        if config.get(parent):
            return run_env(config[parent], _depth + 1)
    return ""


def inherited_env_flags(run_dir: str | Path, prefix: str, _depth: int = 0) -> list[str]:
    """The environment flags (those starting with ``prefix``) a run was made with, as command-line flags
    (``[]`` if none are found).

    An RL run stores them in its config.yaml; an SFT run names its data folder, whose config.yaml holds
    them. Evaluation and RL start from these so a run is tested on the environment it learned.
    """
    config = _run_config(run_dir)
    if config is None or _depth > 3:
        return []
    own = {k: v for k, v in config.items() if k.startswith(prefix)}
    if own:
        return [x for k, v in sorted(own.items()) for x in (f"--{k}", str(v))]
    for parent in ("data_dir", "policy_path"):
        if config.get(parent):
            return inherited_env_flags(config[parent], prefix, _depth + 1)
    return []


def parse_with_env(
    dataclass_types: tuple, argv: list[str] | None, run_flag: str = "", scope: str = "", extra=None
) -> tuple:
    """Parse ``dataclass_types`` (the first has an ``env`` field) plus the chosen environment's arguments.

    The environment is ``--env`` if given, else the one the run named by the ``run_flag`` field (e.g.
    ``policy_path``) was made with, else taxi; that run's environment flags are defaults the command line
    overrides, and so are ``extra(run_dir)`` (e.g. an RL run's reflection settings). Returns the parsed
    dataclasses with the environment's last; ``env`` is set to the name. Asking for another environment
    than the run's is a UsageError.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # the help of the named env (or taxi), before any flag is checked
        given = _pop_flag(list(argv), "--env")
        return parse_args((*dataclass_types, env_arguments(given or TaxiArguments.name)), argv, scope=scope)
    first = parse_args(dataclass_types, argv, scope=scope, known_only=True)[0]
    run_dir = getattr(first, run_flag) if run_flag else ""
    made_with = run_env(run_dir)
    name = first.env or made_with or TaxiArguments.name
    env_class = env_arguments(name)
    if made_with and made_with != name:
        raise UsageError(f"--env {name}: {run_dir} was made with --env {made_with}; drop --env or pass another run")
    defaults = ["--env", name, *inherited_env_flags(run_dir, env_class.prefix), *(extra(run_dir) if extra else [])]
    return parse_args((*dataclass_types, env_class), argv, defaults, scope=scope)


# What an RL run decided about how its policy sees the world, beyond the environment: evaluation uses the
# same, so the evaluated agent is the trained one (flags on the command line still win).
RL_FLAGS_EVAL_INHERITS = ("reflection_max_tokens", "reflection_temperature", "shuffle_labels")


def inherited_run_flags(run_dir: str | Path, names: tuple[str, ...] = RL_FLAGS_EVAL_INHERITS) -> list[str]:
    """``names`` from an RL run's config.yaml as command-line flags (``[]`` for any other folder)."""
    import yaml

    path = Path(run_dir) / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    if "policy_path" not in config:  # an SFT run: nothing RL-specific to inherit
        return []
    return [x for k in names if k in config for x in (f"--{k}", str(config[k]))]


def save_config(output_dir: str | Path, config: dict) -> None:
    import yaml

    atomic_write_text(Path(output_dir) / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=True))
