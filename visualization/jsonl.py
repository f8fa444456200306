"""Reading the JSONL files a run writes while it runs (metrics.jsonl, episodes.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from experiment_args import UsageError


def read_rows(path: Path, hint: str) -> tuple[list[tuple[int, object]], bool]:
    """(line number, parsed value) of each non-blank line, and whether an unfinished last line was skipped.

    A live run may be halfway through appending its last row, so an unparsable last line is left out;
    any other unreadable file or line is a UsageError naming it, followed by ``hint``.
    """
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}; {hint}") from None
    rows: list[tuple[int, object]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError as err:
            if number == len(lines):
                return rows, True
            raise UsageError(f"{path} line {number} is not valid JSON ({err.msg}); {hint}") from None
    return rows, False
