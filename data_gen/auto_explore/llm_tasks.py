"""AutoExplore tasks written by a language model from file excerpts, the paper's second task generator.

    python -m data_gen.auto_explore.llm_tasks --output_file tasks/llm.jsonl --backend openai \\
        --model gpt-4o-mini-2024-07-18
    python -m data_gen.auto_explore.llm_tasks --output_file tasks/llm.jsonl --backend openai \\
        --api_base http://127.0.0.1:8000/v1 --model tiny-gpt2          # evaluation.serve, vLLM, ...

then ``--auto_explore_tasks tasks/llm.jsonl`` for ``data_gen.gen_sft --env auto_explore`` (RL and evaluation
inherit it from the data). The repositories are AutoExplore's (``--auto_explore_repo_dirs``; default the
installed source trees), and so is ``--auto_explore_max_depth``.

As in the paper's ``gen_task``: per repository up to ``--max_files`` files (no ``__init__.py``, nothing
under a ``test`` folder, at most ``--auto_explore_max_depth`` folders deep), a block of lines of each (data
files: their first 20 lines; files shorter than ``--min_chars`` skipped), a code / text / data prompt, and
the model answers ``- QUERY1: ... - ANSWER1: ...`` pairs. The question's answer file is the file it was
asked about. Kept: questions of 10-300 characters that do not name the file (its name, its stem, its path),
first occurrence of each (case- and punctuation-insensitive) question in the repository. Every rejection is
counted by reason in the summary printed at the end and in ``<output_file>.summary.json``. The model never
sees the file's name. Greedy requests (the default) are cached by the API backend, so a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from tqdm.auto import tqdm

from envs.auto_explore.repo import DATA_SUFFIXES, RepoView
from envs.auto_explore.tasks import Task, optimal_path, save_tasks
from experiment_args import AutoExploreArguments, BackendArguments, LLMTaskArguments
from llm import make_backend
from run_utils import atomic_write_text, cli, parse_args

DOC_SUFFIXES = frozenset({".md", ".rst", ".txt"})
PAIR = re.compile(r"(QUERY|ANSWER)\s*(\d+)\s*[:.]\s*(.+)", re.IGNORECASE)
TEMPLATE = (
    "Below is an excerpt of a {what} in a software repository.\n\n"
    "<excerpt>\n{excerpt}\n</excerpt>\n\n"
    "Write {n} questions that a developer exploring the repository could ask and that this excerpt answers, "
    "each with its answer. Do not mention any file name. Use exactly this format:\n"
    "- QUERY1: <question>\n- ANSWER1: <answer>\n- QUERY2: <question>\n- ANSWER2: <answer>"
)
WHAT = {"code": "source code file", "doc": "documentation file", "data": "data file"}


def kind_of(rel: str) -> str:
    suffix = Path(rel).suffix.lower()
    return "data" if suffix in DATA_SUFFIXES else "doc" if suffix in DOC_SUFFIXES else "code"


def eligible_files(view: RepoView, max_depth: int) -> list[str]:
    """The files questions may be asked about: the paper skips ``__init__.py`` and anything under ``test``."""
    return [
        rel
        for rel in view.files(max_depth)
        if Path(rel).name != "__init__.py" and not any("test" in part.lower() for part in Path(rel).parts[:-1])
    ]


def excerpt(text: str, kind: str, max_chars: int, rng: random.Random) -> str:
    """A block of whole lines of at most ``max_chars`` from a random starting line (data files: the first 20)."""
    lines = text.splitlines()
    if kind == "data":
        lines = lines[:20]
    else:
        # the last line a block can start on and still fill max_chars
        total, start_max = 0, len(lines) - 1
        for i in range(len(lines) - 1, -1, -1):
            total += len(lines[i]) + 1
            if total >= max_chars:
                start_max = i
                break
        else:
            start_max = 0
        lines = lines[rng.randint(0, start_max) :]
    block, size = [], 0
    for line in lines:
        if size + len(line) + 1 > max_chars and block:
            break
        block.append(line[:max_chars])
        size += len(line) + 1
    return "\n".join(block)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a ``- QUERYk: ... - ANSWERk: ...`` answer, in k order; a query without its
    answer keeps an empty answer."""
    queries: dict[int, str] = {}
    answers: dict[int, str] = {}
    for kind, number, body in PAIR.findall(text):
        target = queries if kind.upper() == "QUERY" else answers
        target.setdefault(int(number), body.strip().strip("-").strip())
    return [(queries[k], answers.get(k, "")) for k in sorted(queries)]


def _normal(question: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", question.lower()).split())


def names_file(question: str, rel: str) -> bool:
    """Whether ``question`` names the file: its path, its name, or a stem of 4+ characters as a word."""
    q = question.lower()
    name = Path(rel).name.lower()
    stem = Path(rel).stem.lower()
    if rel.lower() in q or name in q:
        return True
    return len(stem) >= 4 and re.search(rf"(?<![a-z0-9_]){re.escape(stem)}(?![a-z0-9_])", q) is not None


def make_tasks(repo: str, files: list[str], outputs: list[str], model: str, counts: dict) -> list[Task]:
    """The kept tasks of one repository from each file's model output; ``counts`` gains rejections by reason."""
    tasks, seen = [], set()
    for rel, text in zip(files, outputs):
        pairs = parse_pairs(text)
        if not pairs:
            counts["unparsed_answers"] = counts.get("unparsed_answers", 0) + 1
            continue
        for question, answer in pairs:
            reason = None
            if not 10 <= len(question) <= 300:
                reason = "length"
            elif names_file(question, rel):
                reason = "names_file"
            elif _normal(question) in seen:
                reason = "duplicate"
            if reason:
                counts[reason] = counts.get(reason, 0) + 1
                continue
            seen.add(_normal(question))
            tasks.append(
                Task(
                    question=question,
                    answers=[rel],
                    repo=repo,
                    depth=rel.count("/"),
                    optimal_path=optimal_path(rel),
                    kind=f"llm_{kind_of(rel)}",
                    extra={"answer_text": answer, "model": model},
                )
            )
    return tasks


def _rng(seed: int, *parts: str) -> random.Random:
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def generate(args: LLMTaskArguments, env_args: AutoExploreArguments, backend, model: str) -> tuple[list[Task], dict]:
    """Every repository's tasks and the counts (files asked, tasks kept, rejections by reason)."""
    tasks: list[Task] = []
    counts: dict = {"files_asked": 0}
    repos = env_args.repo_dirs()
    for repo in tqdm(repos, desc="repositories", unit="repo"):
        view = RepoView(repo)
        files = eligible_files(view, env_args.auto_explore_max_depth)
        files = sorted(_rng(args.seed, view.root.name).sample(files, min(args.max_files, len(files))))
        prompts, asked = [], []
        for rel in files:
            try:
                text = view.read(rel)
            except (OSError, ValueError):
                counts["unreadable"] = counts.get("unreadable", 0) + 1
                continue
            if len(text) < args.min_chars:
                counts["too_short_files"] = counts.get("too_short_files", 0) + 1
                continue
            block = excerpt(text, kind_of(rel), args.excerpt_chars, _rng(args.seed, view.root.name, rel))
            content = TEMPLATE.format(what=WHAT[kind_of(rel)], excerpt=block, n=args.questions_per_file)
            prompts.append([{"role": "user", "content": content}])
            asked.append(rel)
        counts["files_asked"] += len(asked)
        if not asked:
            continue
        seeds = None if args.temperature == 0 else [_rng(args.seed, view.root.name, r).randrange(2**31) for r in asked]
        if backend.name == "local" and seeds is not None:
            seeds = args.seed  # the local backend samples a batch from one seed
        gens = backend.generate(prompts, max_tokens=args.max_tokens, temperature=args.temperature, seed=seeds)
        tasks += make_tasks(str(view.root), asked, [g.text for g in gens], model, counts)
    counts["tasks"] = len(tasks)
    return tasks, counts


@cli
def main(argv: list[str] | None = None) -> dict:
    args, env_args, backend_args = parse_args((LLMTaskArguments, AutoExploreArguments, BackendArguments), argv)
    backend = make_backend(backend_args)
    tasks, counts = generate(args, env_args, backend, backend_args.model)
    save_tasks(tasks, args.output_file)
    counts["usage"] = backend.usage.to_dict()
    atomic_write_text(Path(str(args.output_file) + ".summary.json"), json.dumps(counts, indent=2) + "\n")
    rejected = {k: v for k, v in counts.items() if k not in ("files_asked", "tasks", "usage")}
    print(f"wrote {counts['tasks']} tasks from {counts['files_asked']} files to {args.output_file}")
    print(f"rejected: {rejected}")
    return counts


if __name__ == "__main__":
    main()
