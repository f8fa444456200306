"""Test accuracy against training steps for in-context RL runs, on one figure, as a PNG.

    python -m visualization.plot_icrl runs/icrl/b77_naive runs/icrl/b77_explorative --output_dir figures

Every folder from ``python -m evaluation.icrl`` adds one curve, labelled with its context strategy (from
``summary.json``, else ``config.yaml``; runs that share a strategy get their folder name added). A dotted
line marks each run's zero-shot accuracy (its step-0 test). The figure is ``icrl_test_accuracy.png`` in
``--output_dir`` (default: the folders' common parent), written whole or not at all. Runs still going are
drawn up to their last test step.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from evaluation.compare import unique_labels
from experiment_args import UsageError
from run_utils import cli
from visualization.plot import read_metrics, save_png

WHAT_TO_PASS = "pass run folders from python -m evaluation.icrl"


def run_label(folder: Path) -> str:
    """The strategy name, marked when the run is supervised ICL (``--no_icrl``)."""
    summary, config = folder / "summary.json", folder / "config.yaml"
    try:
        if summary.is_file():
            return str(json.loads(summary.read_text())["name"])
        if config.is_file():
            cfg = yaml.safe_load(config.read_text()) or {}
            return str(cfg["strategy"]) + ("" if cfg.get("icrl", True) else " (supervised ICL)")
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        pass
    return folder.resolve().name


def test_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["test/accuracy"]) for r in rows if "step" in r and r.get("test/accuracy") is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_test_accuracy(runs: dict[str, tuple[list[int], list[float]]], title: str) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, (label, (steps, accuracy)) in enumerate(runs.items()):
        color = f"C{i % 10}"
        ax.plot(steps, accuracy, color=color, linewidth=1.8, marker="o", markersize=3, label=label)
        if steps and steps[0] == 0:  # zero-shot: the empty-context test at step 0
            ax.axhline(accuracy[0], color=color, linestyle=":", linewidth=1, alpha=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=min(len(runs), 3))
    return fig


@cli
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m visualization.plot_icrl", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run folders from python -m evaluation.icrl")
    parser.add_argument("--output_dir", default="", help="where the PNG goes (default: the folders' common parent)")
    parser.add_argument("--title", default="", help="figure title (default: the tasks of the runs)")
    args = parser.parse_args(argv)

    # Read and check everything before writing anything.
    folders = [Path(d) for d in args.dirs]
    curves, names, tasks = [], [], []
    for folder in folders:
        path = folder / "metrics.jsonl"
        if not path.is_file():
            raise UsageError(f"{folder} has no metrics.jsonl; {WHAT_TO_PASS}")
        steps, accuracy = test_curve(read_metrics(path))
        if not steps:
            raise UsageError(f"{path} has no test accuracy yet (the first test is at step 0); {WHAT_TO_PASS}")
        curves.append((steps, accuracy))
        names.append(run_label(folder))
        config = folder / "config.yaml"
        if config.is_file():
            tasks.append(str((yaml.safe_load(config.read_text()) or {}).get("task", "")))
    labels = unique_labels(names, folders)
    title = args.title or f"In-context RL: test accuracy ({', '.join(sorted({t for t in tasks if t})) or 'ICRL'})"

    output_dir = Path(args.output_dir) if args.output_dir else Path(os.path.commonpath([f.resolve() for f in folders]))
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / "icrl_test_accuracy.png"
    save_png(plot_test_accuracy(dict(zip(labels, curves, strict=True)), title), out)
    print(out)
    return out


if __name__ == "__main__":
    main()
