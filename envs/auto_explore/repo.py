"""A read-only view of a repository that no command can leave.

AutoExplore's commands (``cd``, ``cat``, ``id``) are interpreted here, never run by a shell: nothing is
executed or written. Every path is a repo-relative, ``/``-separated string built from names this view
listed itself, and is checked again when used:

- no absolute paths, no ``..`` component (``cd ..`` is handled by the environment as "drop the last
  component", never resolved by the OS), no empty components;
- no names with whitespace, quotes, backslashes or control characters (such names are not listed);
- symlinks are followed only when they resolve inside the root (a link pointing out is not listed and
  cannot be opened);
- binary files, and files over ``max_file_bytes``, are not read: ``cat`` answers with a note.

Which entries are listed follows the paper's repository filter (its ``filter_repo``): hidden and
``_``-prefixed names, licences, build files, tests and examples are left out, as are files whose suffix
is not a text format it allows. Listings are sorted, so episodes replay exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The paper's allowed suffixes (code, notebooks, data, docs, configs, shell).
SUFFIXES = frozenset(
    ".py .c .cpp .cxx .cc .h .hpp .hxx .cs .java .go .ipynb .csv .tsv .txt .md .rst .json .yaml .yml .sh .bash "
    ".zsh".split()
)
# Substrings that drop a name (the paper's list; "ci" is matched as a whole name part, not inside words).
DROP_SUBSTRINGS = ("LICENSE", "Makefile", "conf.py", "artwork", "requirements", "tests", "examples")
DROP_PARTS = frozenset({"ci", "test", "out", "__pycache__"})
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
DATA_SUFFIXES = frozenset({".csv", ".tsv", ".json", ".yaml", ".yml", ".ipynb"})


class PathError(ValueError):
    """A path that would leave the repository or is not a listed entry."""


def kind_of(name: str) -> str:
    """code, data or text: how much of a file ``cat`` shows (the paper's per-kind line limits)."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in DATA_SUFFIXES:
        return "data"
    if suffix in {".md", ".rst", ".txt"}:
        return "text"
    return "code"


def listed_name(name: str) -> bool:
    """Whether the filter keeps an entry called ``name`` (before checking what it is)."""
    if not SAFE_NAME.match(name) or name.startswith((".", "_")) or name in (".", ".."):
        return False
    if any(s in name for s in DROP_SUBSTRINGS):
        return False
    stem = os.path.splitext(name)[0].lower()
    return stem not in DROP_PARTS and not stem.startswith("test_")


class RepoView:
    """The filtered, read-only tree under ``root``; ``hidden`` entries (repo-relative paths) are left out
    of listings and cannot be opened (the training-time leave-out)."""

    def __init__(self, root: str | Path, max_file_bytes: int = 200_000, min_file_chars: int = 10):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise PathError(f"repository {root} is not a directory")
        self.max_file_bytes = max_file_bytes
        self.min_file_chars = min_file_chars
        self.hidden: frozenset[str] = frozenset()
        self._listing: dict[str, tuple[list[str], list[str]]] = {}

    # -- paths --------------------------------------------------------------------------------------
    def check(self, rel: str) -> Path:
        """The real path of repo-relative ``rel`` after every safety rule; raises PathError."""
        if rel in ("", "."):
            return self.root
        if rel.startswith("/") or "\\" in rel:
            raise PathError(f"{rel!r} is not a relative path")
        parts = rel.split("/")
        if any(p in ("", ".", "..") or not SAFE_NAME.match(p) for p in parts):
            raise PathError(f"{rel!r} has an empty, '.', '..' or unsafe component")
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise PathError(f"{rel!r} leads outside the repository")
        return path

    def _entries(self, rel: str) -> tuple[list[str], list[str]]:
        """(directories, files) of ``rel`` that the filter keeps, ignoring ``hidden``; cached."""
        if rel not in self._listing:
            path = self.check(rel)
            dirs, files = [], []
            try:
                names = sorted(os.listdir(path))
            except OSError:
                names = []
            for name in names:
                if not listed_name(name):
                    continue
                child = f"{rel}/{name}" if rel else name
                try:
                    real = self.check(child)
                except PathError:
                    continue  # e.g. a symlink pointing outside
                if real.is_dir():
                    dirs.append(name)
                elif real.is_file() and os.path.splitext(name)[1].lower() in SUFFIXES and self._readable(real):
                    files.append(name)
            self._listing[rel] = (dirs, files)
        return self._listing[rel]

    def _readable(self, path: Path) -> bool:
        """Text (not binary), at least ``min_file_chars`` long, mostly ASCII (the paper's 0.9)."""
        try:
            size = path.stat().st_size
            if size > self.max_file_bytes:
                return True  # listed; ``cat`` answers that it is too large
            data = path.read_bytes()
        except OSError:
            return False
        if b"\0" in data[:4096] or len(data) < self.min_file_chars:
            return False
        return sum(b < 128 for b in data) >= 0.9 * len(data)

    def listdir(self, rel: str) -> tuple[list[str], list[str]]:
        """(directories, files) shown in ``rel``: the filtered entries minus the hidden ones."""
        dirs, files = self._entries(rel)
        join = (lambda n: f"{rel}/{n}") if rel else (lambda n: n)
        return [d for d in dirs if join(d) not in self.hidden], [f for f in files if join(f) not in self.hidden]

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` is a directory reachable by ``cd``s from the root (every step listed)."""
        if rel == "":
            return True
        parent, _, name = rel.rpartition("/")
        return self.is_dir(parent) and name in self.listdir(parent)[0]

    def is_file(self, rel: str) -> bool:
        parent, _, name = rel.rpartition("/")
        return bool(name) and self.is_dir(parent) and name in self.listdir(parent)[1]

    def read(self, rel: str) -> str:
        """The text of listed file ``rel`` (undecodable bytes replaced); PathError when it is not listed."""
        if not self.is_file(rel):
            raise PathError(f"{rel!r} is not a listed file")
        path = self.check(rel)
        if path.stat().st_size > self.max_file_bytes:
            raise PathError(f"{rel} is larger than {self.max_file_bytes} bytes")
        return path.read_text(encoding="utf-8", errors="replace")

    def files(self, max_depth: int | None = None) -> list[str]:
        """Every listed file (repo-relative), depth-first in sorted order, at most ``max_depth`` ``cd``s deep."""
        out, stack = [], [("", 0)]
        while stack:
            rel, depth = stack.pop()
            dirs, files = self.listdir(rel)
            out += [f"{rel}/{f}" if rel else f for f in files]
            if max_depth is None or depth < max_depth:
                stack += [(f"{rel}/{d}" if rel else d, depth + 1) for d in reversed(dirs)]
        return sorted(out)
