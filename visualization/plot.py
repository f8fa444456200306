"""Learning curves of RL runs and a bar chart of their evaluations, as PNG files.

    python -m visualization.plot runs/reflect_rl runs/rl_noreflect --smooth 5
    python -m visualization.plot runs/reflect_rl/eval runs/eval/oracle --output_dir figures

Every folder with ``metrics.jsonl`` (training.rl_finetune) adds its curves to ``learning_curves.png``:
success rate, return, KL to the SFT policy and policy entropy against environment steps. Every folder
with ``summary.json`` (evaluation.evaluate), or with such a folder directly inside it, adds its bars
to ``comparison.png``: success rate per stage with the 95% interval. Figures go to the common parent of
the folders unless ``--output_dir`` is given, and are written whole or not at all.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.compare import find_summaries, ordered_stages, read_summary, unique_labels
from experiment_args import UsageError
from run_utils import cli
from visualization.jsonl import read_rows

WHAT_TO_PASS = "pass run folders from training.rl_finetune or evaluation folders from evaluation.evaluate"

# (title, metric keys): the first key a run logged is drawn. rollout_kl is the KL measured on the
# rollout batch, logged when the KL term is off (kl_coef 0) and objective/kl is absent.
PANELS = (
    ("success rate", ("env/success_rate",)),
    ("return", ("env/return",)),
    ("KL to SFT policy", ("objective/kl", "objective/rollout_kl")),
    ("policy entropy", ("policy/entropy",)),
)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; UsageError naming the file and line if one is not a JSON object."""
    rows, _ = read_rows(path, WHAT_TO_PASS)
    for number, row in rows:
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {number} is not a JSON object; {WHAT_TO_PASS}")
    return [row for _, row in rows]


def curve(rows: list[dict], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(env_steps, values) of the first of ``keys`` that any row holds; rows without a finite value are
    skipped (explained variance and KL can be NaN or absent). None if no row holds any of the keys."""
    for key in keys:
        points = [(r["env_steps"], r[key]) for r in rows if "env_steps" in r and key in r]
        points = [(x, float(y)) for x, y in points if isinstance(y, (int, float)) and math.isfinite(y)]
        if points:
            x, y = np.array(points).T
            return x, y
    return None


def moving_average(values: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k`` points centred on each point (a trailing mean would lag a rising curve and understate
    where it ends); at the edges the window shrinks to what exists, so the curve keeps its length."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(len(values))
    starts = np.maximum(index - k // 2, 0)
    ends = np.minimum(index + (k - 1) // 2 + 1, len(values))
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_learning_curves(runs: dict[str, list[dict]], smooth: int) -> Figure:
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).flat
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        drawn = False
        for (label, rows), color in zip(runs.items(), colors, strict=True):
            xy = curve(rows, keys)
            if xy is None:
                continue
            x, y = xy
            drawn = True
            if smooth > 1 and len(y) > 1:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
                y = moving_average(y, smooth)
            ax.plot(x, y, color=color, linewidth=1.8, label=label, marker="o" if len(x) == 1 else None)
        if not drawn:
            message = f"no run logged {' or '.join(keys)}"
            ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
        if title == "success rate":
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    # One legend for the figure, below the panels: inside an axis it would cover a curve.
    handles = {label: line for ax in fig.axes for line, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 4))
    smoothing = f" (moving average over {smooth} iterations, raw faint)" if smooth > 1 else ""
    fig.suptitle(f"Learning curves{smoothing}")
    return fig


def plot_comparison(summaries: list[dict]) -> Figure:
    stages = ordered_stages(summaries)
    fig = Figure(figsize=(max(6.0, 1.2 + len(stages) * (0.6 + 0.35 * len(summaries))), 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(summaries)
    for i, summary in enumerate(summaries):
        xs, heights, errors = [], [], [[], []]
        for j, stage in enumerate(stages):
            stats = summary["stages"].get(stage)
            if stats is None:  # a gap in the group, not a zero bar
                continue
            rate = stats["success_rate"]
            low, high = stats.get("success_ci95") or (rate, rate)
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(rate)
            errors[0].append(max(rate - low, 0.0))
            errors[1].append(max(high - rate, 0.0))
        ax.bar(xs, heights, width * 0.9, yerr=errors, capsize=3, color=f"C{i % 10}", label=summary["name"])
    ax.set_xticks(range(len(stages)), stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Evaluation success rate per stage (95% interval)")
    fig.legend(loc="outside lower center", ncols=min(len(summaries), 3))
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Render to a temporary file next to ``path``, then rename: a reader never sees half a PNG."""
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")  # keep wide legends whole
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cli
def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m visualization.plot", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run folders and/or evaluation folders")
    parser.add_argument("--output_dir", default="", help="where the PNGs go (default: the folders' common parent)")
    parser.add_argument(
        "--smooth", type=int, default=5, metavar="K", help="centred moving average over K iterations (0 or 1: raw)"
    )
    args = parser.parse_args(argv)
    if args.smooth < 0:
        raise UsageError("--smooth must be >= 0 (0 or 1 draws the raw curves)")

    # Read and check everything before writing anything.
    folders = [Path(d) for d in args.dirs]
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder; {WHAT_TO_PASS}")
    curve_folders, runs = [], []
    for folder in folders:
        if (folder / "metrics.jsonl").is_file():
            rows = read_metrics(folder / "metrics.jsonl")
            if any("env_steps" in r for r in rows):
                curve_folders.append(folder)
                runs.append(rows)
            else:  # an SFT run's trainer log, or an RL run that has not finished an iteration
                print(f"note: {folder / 'metrics.jsonl'} has no env_steps yet; no curves from it", file=sys.stderr)
    summary_paths = [path for folder in folders for path in find_summaries(folder)]
    summaries = [read_summary(path) for path in summary_paths]
    if not runs and not summaries:
        raise UsageError(f"none of {', '.join(args.dirs)} holds an RL metrics.jsonl or a summary.json; {WHAT_TO_PASS}")
    labels = unique_labels([f.resolve().name for f in curve_folders], curve_folders)
    summary_labels = unique_labels([str(s["name"]) for s in summaries], [p.parent for p in summary_paths])
    for summary, label in zip(summaries, summary_labels, strict=True):
        summary["name"] = label

    if args.output_dir:
        output_dir = Path(args.output_dir)
    else:
        output_dir = Path(os.path.commonpath([f.resolve() for f in folders]))
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if runs:
        written.append(output_dir / "learning_curves.png")
        save_png(plot_learning_curves(dict(zip(labels, runs, strict=True)), args.smooth), written[-1])
    if summaries:
        written.append(output_dir / "comparison.png")
        save_png(plot_comparison(summaries), written[-1])
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
