"""AutoExplore tasks: a question about a repository and the file(s) that answer it.

The offline generator reads the code, so every answer is verifiable and no model is needed:

- Python files (``ast``): a top-level function or class with a docstring gives "Which file defines the
  function `name`, documented as: <first docstring sentence>?"; the answers are every listed file that
  defines that name at top level (so a name defined twice has two right answers).
- Markdown and reST documents: a section heading gives "Which document has a section titled <heading>?";
  the answers are every document with that heading.

A question never names its file. Each task carries its depth (the number of ``cd``s to the shallowest
answer) and its optimal command path (``cd`` down, ``cat`` the file, ``id`` it), which the expert
replays. Tasks are split into train / validation / test by a seeded hash of the question, or whole
repositories are held out for test (``--auto_explore_holdout_repos``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from envs.auto_explore.repo import RepoView

SPLITS = ("train", "validation", "test")
HEADING_MD = re.compile(r"^#{1,3}\s+(.{4,80}?)\s*#*\s*$")
RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{3,}\s*$")


@dataclass
class Task:
    question: str
    answers: list[str]  # repo-relative paths; identifying any of them succeeds
    repo: str  # the repository's root directory
    depth: int  # cds to the shallowest answer
    optimal_path: list[str]  # the expert's commands to the shallowest answer
    kind: str = "code"  # code (a definition) or doc (a heading)
    extra: dict = field(default_factory=dict)

    @property
    def repo_name(self) -> str:
        return Path(self.repo).name

    def to_json(self) -> dict:
        return asdict(self)


def optimal_path(answer: str) -> list[str]:
    """``cd`` into each directory of ``answer``, then ``cat`` and ``id`` the file."""
    *dirs, name = answer.split("/")
    return [f"cd {d}" for d in dirs] + [f"cat {name}", f"id {name}"]


def _first_sentence(doc: str, max_chars: int = 120) -> str:
    text = " ".join(doc.strip().split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= max_chars else sentence[: max_chars - 3].rstrip() + "..."


def _definitions(source: str) -> list[tuple[str, str, str]]:
    """(kind, name, first docstring sentence) of the documented top-level functions and classes."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 3:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                out.append((kind, node.name, _first_sentence(doc)))
    return out


def _headings(text: str, suffix: str) -> list[str]:
    """Section headings of a Markdown (``#``..``###``) or reST (text over an underline) document."""
    lines = text.splitlines()
    if suffix == ".md":
        heads = [m.group(1) for line in lines if (m := HEADING_MD.match(line))]
    else:
        heads = [
            lines[i - 1].strip()
            for i in range(1, len(lines))
            if RST_UNDERLINE.match(lines[i]) and 4 <= len(lines[i - 1].strip()) <= 80
        ]
    return [h for h in heads if re.search(r"[A-Za-z]{3}", h)]


def generate_tasks(repo: str | Path, max_depth: int = 2, per_file: int = 2) -> list[Task]:
    """Every verifiable task of one repository, deterministic: at most ``per_file`` questions a file,
    files at most ``max_depth`` directories deep."""
    view = RepoView(repo)
    files = view.files(max_depth)
    where: dict[tuple[str, str], list[str]] = {}  # (kind, key) -> files that answer it
    phrasing: dict[tuple[str, str], str] = {}
    for rel in files:
        suffix = Path(rel).suffix.lower()
        try:
            text = view.read(rel)
        except (OSError, ValueError):
            continue
        keys = []
        if suffix == ".py":
            for kind, name, sentence in _definitions(text):
                key = ("code", name)
                keys.append(key)
                phrasing.setdefault(key, f"Which file defines the {kind} `{name}`, documented as: {sentence}")
        elif suffix in (".md", ".rst"):
            for heading in _headings(text, suffix):
                key = ("doc", heading.lower())
                keys.append(key)
                phrasing.setdefault(key, f'Which document has a section titled "{heading}"?')
        for key in dict.fromkeys(keys):
            where.setdefault(key, []).append(rel)
    # per_file questions a file: the first keys in file order, preferring names unique to the file
    taken: dict[str, int] = {}
    tasks = []
    for key, answers in sorted(where.items(), key=lambda kv: (len(kv[1]), kv[1][0], kv[0])):
        if len(answers) > 3 or taken.get(answers[0], 0) >= per_file:
            continue  # a name defined everywhere (e.g. `main`) is no question
        taken[answers[0]] = taken.get(answers[0], 0) + 1
        shallowest = min(answers, key=lambda a: (a.count("/"), a))
        tasks.append(
            Task(
                question=phrasing[key],
                answers=sorted(answers),
                repo=str(view.root),
                depth=shallowest.count("/"),
                optimal_path=optimal_path(shallowest),
                kind=key[0],
            )
        )
    return sorted(tasks, key=lambda t: (t.answers[0], t.question))


def split_of(task: Task, seed: int, fractions: tuple[float, float] = (0.7, 0.2)) -> str:
    """train / validation / test for ``task``, by a seeded hash of its repository and question (the
    paper's 0.7 / 0.2 / 0.1, but reproducible)."""
    digest = hashlib.sha256(f"{seed}:{task.repo_name}:{task.question}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < fractions[0] else "validation" if u < fractions[0] + fractions[1] else "test"


def split_tasks(tasks: list[Task], split: str, seed: int = 0, holdout_repos: tuple[str, ...] = ()) -> list[Task]:
    """The tasks of ``split``. Held-out repositories (by directory name) give all their tasks to test and
    none to train or validation; the other repositories split by :func:`split_of`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if holdout_repos:
        if split == "test":
            return [t for t in tasks if t.repo_name in holdout_repos]
        tasks = [t for t in tasks if t.repo_name not in holdout_repos]
        # without the held-out repos, the rest splits train / validation only
        return [t for t in tasks if (split_of(t, seed, (0.8, 0.2)) == split)]
    return [t for t in tasks if split_of(t, seed) == split]


def save_tasks(tasks: list[Task], path: str | Path) -> None:
    from run_utils import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(t.to_json()) + "\n" for t in tasks))


def load_tasks(path: str | Path) -> list[Task]:
    """Tasks saved by :func:`save_tasks`; a malformed line is a UsageError naming the file and line."""
    from experiment_args import UsageError

    tasks = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(Task(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise UsageError(f"--auto_explore_tasks {path}:{number} is not a task record ({err})") from None
    return tasks


@functools.lru_cache(maxsize=8)
def installed_source_dirs(packages: tuple[str, ...]) -> tuple[str, ...]:
    """The source folders of those ``packages`` that are installed, looked up once per process (RL builds
    one environment per episode slot, each of which asks)."""
    import importlib.util

    found = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            found.append(str(Path(list(spec.submodule_search_locations)[0]).resolve()))
    return tuple(found)


@functools.lru_cache(maxsize=8)
def cached_tasks(repos: tuple[str, ...], tasks_file: str, max_depth: int) -> tuple[Task, ...]:
    """Every task of ``repos`` (or of ``tasks_file``), generated once per process."""
    if tasks_file:
        return tuple(load_tasks(tasks_file))
    return tuple(t for repo in repos for t in generate_tasks(repo, max_depth=max_depth))
