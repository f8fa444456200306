"""One table of evaluation results across runs, for the terminal or the README.

    python -m evaluation.compare runs/eval/oracle runs/reflect_rl/eval runs/rl_noreflect/eval
    python -m evaluation.compare runs/reflect_rl runs/rl_noreflect --markdown   # finds eval*/summary.json

Each DIR is an evaluation folder (``evaluation.evaluate --output_dir``) or a run folder with such a
folder directly inside it (every one found gives a row). Columns: success rate with its 95% interval
per stage, then mean return (ret) and episode length (len) of the last stage. Prints only; writes nothing.

    python -m evaluation.compare runs/demo_seed*/eval --over_seeds   # one row per run name across seeds

``--over_seeds`` groups the summaries by run name (one per seed folder) and shows, per stage, the mean
success over the seeds, its sample standard deviation and the lowest and highest seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from experiment_args import ENV_ARGUMENTS, UsageError
from run_utils import cli

# Each environment's curriculum order (Taxi: pickup -> dropoff -> full); other stages follow in order seen.
STAGE_ORDER = tuple(dict.fromkeys(stage for env in ENV_ARGUMENTS.values() for stage in env.stages))
WHAT_TO_PASS = "pass the --output_dir of evaluation.evaluate, or a run folder holding one"


def find_summaries(folder: str | Path) -> list[Path]:
    """``folder/summary.json`` if it exists, else every ``folder/*/summary.json`` (sorted)."""
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        return [folder / "summary.json"]
    if not folder.is_dir():
        return []
    return sorted(p / "summary.json" for p in folder.iterdir() if (p / "summary.json").is_file())


def read_summary(path: str | Path) -> dict:
    """A summary.json as written by evaluation.evaluate; UsageError naming the file if it is not one."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}; {WHAT_TO_PASS}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), dict) or not summary["stages"]:
        raise UsageError(f"{path} has no stages; {WHAT_TO_PASS}")
    for stage, stats in summary["stages"].items():
        if not isinstance(stats, dict) or not isinstance(stats.get("success_rate"), (int, float)):
            raise UsageError(f"{path} stage {stage!r} has no success_rate; {WHAT_TO_PASS}")
    summary.setdefault("name", path.parent.name)
    return summary


def unique_labels(names: list[str], folders: list[Path]) -> list[str]:
    """``names``, with each name that several folders share extended by the folder's path below their
    common parent: evaluate names a run after its folder, so runs/a/eval and runs/b/eval both say "eval"."""
    resolved = [Path(f).resolve() for f in folders]
    labels = []
    for name, folder in zip(names, resolved, strict=True):
        namesakes = [f for n, f in zip(names, resolved, strict=True) if n == name]
        common = Path(os.path.commonpath(namesakes))
        if len(namesakes) == 1 or folder == common:
            labels.append(name)
            continue
        rel = folder.relative_to(common).as_posix()
        labels.append(rel if rel.split("/")[-1] == name else f"{name} ({rel})")
    return labels


def ordered_stages(summaries: list[dict]) -> list[str]:
    seen = [s for summary in summaries for s in summary["stages"]]
    return [s for s in STAGE_ORDER if s in seen] + [s for s in dict.fromkeys(seen) if s not in STAGE_ORDER]


def success_cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    ci = stats.get("success_ci95")
    if not ci:
        return f"{stats['success_rate']:.2f}"
    return f"{stats['success_rate']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table_rows(summaries: list[dict]) -> list[dict[str, str]]:
    """One dict per summary, from column header to cell text (``-`` where a stage was not evaluated)."""
    stages = ordered_stages(summaries)
    last = stages[-1] if stages else ""
    rows = []
    for summary in summaries:
        row = {"run": str(summary["name"])}
        for stage in stages:
            row[stage] = success_cell(summary["stages"].get(stage))
        stats = summary["stages"].get(last)
        columns = [(f"ret ({last})", "return_mean", ".2f"), (f"len ({last})", "length_mean", ".1f")]
        if any(s["stages"].get(last, {}).get("distinct_starts") for s in summaries):
            columns.append(("starts", "distinct_starts", "d"))  # how many independent tests the interval has
        for column, key, fmt in columns:
            value = stats.get(key) if stats else None
            row[column] = "-" if value is None else format(value, fmt)
        rows.append(row)
    return rows


def seed_rows(summaries: list[dict]) -> list[dict[str, str]]:
    """One row per run name: mean +- sample std (min-max) of each stage's success over its summaries."""
    stages = ordered_stages(summaries)
    groups: dict[str, list[dict]] = {}
    for summary in summaries:
        groups.setdefault(str(summary["name"]), []).append(summary)
    rows = []
    for name, group in groups.items():
        row = {"run": name, "seeds": str(len(group))}
        for stage in stages:
            values = [s["stages"][stage]["success_rate"] for s in group if stage in s["stages"]]
            if not values:
                row[stage] = "-"
                continue
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            row[stage] = f"{mean:.2f} ± {std:.2f} ({min(values):.2f}-{max(values):.2f})"
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, str]], markdown: bool = False) -> str:
    columns = list(rows[0])
    if markdown:
        # A "|" inside a run name would split the cell in GitHub's renderer.
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"]
        lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in columns) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, widths, strict=True)
        return "  ".join([first[0].ljust(first[1])] + [cell.rjust(w) for cell, w in rest]).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([r[c] for c in columns]) for r in rows])


@cli
def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="evaluation folders, or run folders holding one")
    parser.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    parser.add_argument(
        "--over_seeds", action="store_true", help="one row per run name: mean, std and range of success over the DIRs"
    )
    args = parser.parse_args(argv)

    summaries = []
    for folder in args.dirs:
        if not Path(folder).is_dir():
            raise UsageError(f"{folder} is not a folder; {WHAT_TO_PASS}")
        paths = find_summaries(folder)
        if not paths:
            raise UsageError(f"{folder} has no summary.json (nor a subfolder with one); {WHAT_TO_PASS}")
        summaries += [(path, read_summary(path)) for path in paths]

    if args.over_seeds:
        rows = seed_rows([s for _, s in summaries])
        print(format_table(rows, markdown=args.markdown))
        return rows
    labels = unique_labels([str(s["name"]) for _, s in summaries], [path.parent for path, _ in summaries])
    for (_, summary), label in zip(summaries, labels, strict=True):
        summary["name"] = label
    rows = table_rows([s for _, s in summaries])
    print(format_table(rows, markdown=args.markdown))
    return rows


if __name__ == "__main__":
    main()
