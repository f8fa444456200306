"""The SFT data set every environment's generator writes: one format, one atomic write.

An environment's ``gen_sft`` supplies only its episodes, as lists of labelled steps
``{obs, reflection, label, kind, step}`` (``kind`` is ``positive``, ``negative`` or ``swapped``, ``label``
an index into ``obs.actions``; a swapped step, whose reflection names another action than the best, is
policy data only). This module renders them with ``envs.prompt`` (the code RL and evaluation use,
so training and acting see identical text) and writes, per split (``train/``, ``test/``):

- ``sft.jsonl``: prompt -> action label (no reflection);
- ``sft_reflection.jsonl``: reflection prompt -> reflection;
- ``sft_policy.jsonl``: prompt with the reflection -> action label;
- each again as ``*_positive.jsonl`` without the negative examples (the paper's ablation);

plus ``stats.json`` (with ``action_labels``, every label the data uses) and ``config.yaml``, all into a
temporary folder renamed into place at the end, so an interrupted run leaves nothing half-written.
Labels are ``0``-``9``, ``a``-``z``, ``A``-``Z`` (``envs.prompt.action_labels``); a state with more actions
is a clear error. SFT checks that its tokenizer keeps each label one token and that RL and evaluation
would render the same labels, so the three can never disagree.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from envs.prompt import action_labels, policy_prompt, reflection_prompt
from experiment_args import UsageError
from run_utils import atomic_write_text, check_output_dir, resolved_config, save_config

FILES = ("sft", "sft_reflection", "sft_policy")
MAX_LABELS = len(action_labels(62))  # digits and letters: single tokens for every tokenizer we know


def to_records(steps: list[dict], episode: int) -> dict[str, list[dict]]:
    """The three SFT views of each step, with metadata columns for analysis."""
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for s in steps:
        n = len(s["obs"].actions)
        if n > MAX_LABELS:
            raise UsageError(
                f"a state has {n} actions, more than the {MAX_LABELS} single-character labels (0-9, a-z, A-Z) the "
                "data uses; cap the environment's actions (e.g. smaller directories for AutoExplore)"
            )
        labels = action_labels(n)
        meta = {"episode": episode, "step": s["step"], "kind": s["kind"], "action": s["obs"].actions[s["label"]]}
        meta.update(s.get("meta", {}))
        answer = labels[s["label"]]
        if s["kind"] != "swapped":  # its reflection is not the reflector's to learn, nor its label the state's
            out["sft"].append({"prompt": policy_prompt(s["obs"], labels), "completion": answer, **meta})
            out["sft_reflection"].append(
                {"prompt": reflection_prompt(s["obs"]), "completion": s["reflection"], **meta}
            )
        out["sft_policy"].append(
            {"prompt": policy_prompt(s["obs"], labels, s["reflection"]), "completion": answer, **meta}
        )
    return out


def write_split(folder: Path, records: dict[str, list[dict]]) -> dict[str, int]:
    folder.mkdir(parents=True)
    counts = {}
    for name, rows in records.items():
        positive = [r for r in rows if r["kind"] == "positive"]
        for fname, subset in ((name, rows), (f"{name}_positive", positive)):
            with open(folder / f"{fname}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in subset)
            counts[fname] = len(subset)
    return counts


def begin_dataset(data_args, env_args, api_args) -> tuple[Path, dict, bool]:
    """(output_dir, config, done) of a generator's run: the config it records (``env`` first) and whether
    ``output_dir`` already holds this very data set (then there is nothing to do)."""
    output_dir = Path(data_args.output_dir)
    config = {
        "env": env_args.name,
        **resolved_config(data_args, env_args, api_args, ignore=("overwrite_output_dir",)),
    }
    # how many requests run at once does not change the data
    done = check_output_dir(
        output_dir, config, overwrite=data_args.overwrite_output_dir, compare_ignore=("reflector_concurrency",)
    )
    if done:
        print(f"{output_dir} already holds this data set; nothing to do")
    return output_dir, config, done


def write_dataset(
    output_dir: str | Path,
    config: dict,
    splits: dict[str, int],
    episode: Callable[[str, int], list[dict]],
    desc: str,
    stats: dict | None = None,
    api_reflections=None,
) -> Path:
    """Write ``splits`` (split -> number of episodes; ``episode(split, i)`` gives episode ``i``'s steps)
    to ``output_dir`` atomically. ``stats`` start stats.json. With ``api_reflections``
    (:class:`data_gen.reflectors.APIReflections`) a split's pending reflections are asked for together once
    its episodes are generated, and the API's counters end stats.json."""
    output_dir = Path(output_dir)
    parent = output_dir.parent if output_dir.parent.exists() else None
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output_dir.name}."))
    stats = dict(stats or {})
    widest = 0  # the most actions of any state: its labels are every label the data uses
    try:
        for split, n in splits.items():
            records: dict[str, list[dict]] = {name: [] for name in FILES}
            kinds: Counter = Counter()
            episodes = [episode(split, i) for i in tqdm(range(n), desc=f"{desc} {split} episodes", unit="ep")]
            if api_reflections is not None:
                api_reflections.fill(split, episodes)
            for i, steps in enumerate(episodes):
                widest = max([widest] + [len(s["obs"].actions) for s in steps])
                kinds.update(s["kind"] for s in steps)
                for name, rows in to_records(steps, i).items():
                    records[name].extend(rows)
            stats[split] = {"episodes": n, "steps": dict(kinds), "files": write_split(tmp / split, records)}
        stats["action_labels"] = action_labels(min(widest, MAX_LABELS))
        if api_reflections is not None:
            stats["api"] = api_reflections.stats()
        atomic_write_text(tmp / "stats.json", json.dumps(stats, indent=2))
        save_config(tmp, config)
        if output_dir.exists():
            shutil.rmtree(output_dir)  # empty, or a different run the user asked to overwrite
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {output_dir}: {json.dumps({k: stats[k]['files'] for k in splits})}")
    return output_dir
