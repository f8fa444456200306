"""The classification tasks of in-context RL (Monea et al. 2024, ``../shared/reference/icrl_baselines.md`` A.2).

A task is a list of readable label strings ("card arrival", "numeric date") and two lists of
``(text, label_index)``. The model sees one input line per example (``Query: {text}``) and answers
after a prediction prefix (``Intent:``); the label set is never shown to it.

Data come either from local files in their original release formats (``--data_dir``)::

    banking77     train.csv, test.csv (columns text,category) and optionally categories.json
    clinic150     data_full.json (train/test lists of [text, intent]; out-of-scope "oos" is dropped)
    trec_coarse   train_5500.label, TREC_10.label (one "COARSE:fine question" a line, ISO-8859-1)
    trec_fine     the same files, 50 fine classes
    nlu           the NLU-Evaluation-Data CSV (";"-separated, columns scenario, intent, answer, ...), re-split
                  80/20 as the original; or its cross-validation release, train/ and test/ folders of one
                  ";"-separated CSV per intent (columns answerid, scenario, intent, answer_annotation,
                  answer_from_anno, answer_from_user), whose own train/test split is used

or, without ``--data_dir``, from the Hugging Face hub (the data sets the original code loads). Each
split is then shuffled with its seed (Python's ``random``, as the original) and its first k kept.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiment_args import UsageError

Example = tuple[str, int]  # (text, label index)


@dataclass
class Task:
    name: str
    input_prefix: str  # "Query:": starts the user line of every example
    prediction_prefix: str  # "Intent:": opens the assistant's answer
    labels: list[str]
    train: list[Example]
    test: list[Example]

    def format_input(self, text: str) -> str:
        return f"{self.input_prefix} {text}"


# (input prefix, prediction prefix, default train_k) per task; test_k defaults to 500 everywhere.
TASKS: dict[str, tuple[str, str, int]] = {
    "banking77": ("Query:", "Intent:", 10_000),
    "clinic150": ("Query:", "Intent:", 10_000),
    "trec_coarse": ("Question:", "Type:", 5_000),
    "trec_fine": ("Question:", "Type:", 5_000),
    "nlu": ("Utterance:", "Intent:", 10_000),
}
DEFAULT_TEST_K = 500

# TREC codes made readable, in the order of the hub's class ids (so label indices agree with it).
TREC_COARSE = {
    "ABBR": "abbreviation",
    "ENTY": "entity",
    "DESC": "description",
    "HUM": "human",
    "LOC": "location",
    "NUM": "numeric",
}
TREC_FINE = {
    "ABBR": {"abb": "abbreviation", "exp": "expansion"},
    "ENTY": {
        "animal": "animal",
        "body": "body",
        "color": "color",
        "cremat": "creation",
        "currency": "currency",
        "dismed": "disease",
        "event": "event",
        "food": "food",
        "instru": "instrument",
        "lang": "language",
        "letter": "letter",
        "other": "other",
        "plant": "plant",
        "product": "product",
        "religion": "religion",
        "sport": "sport",
        "substance": "substance",
        "symbol": "symbol",
        "techmeth": "technique",
        "termeq": "term",
        "veh": "vehicle",
        "word": "word",
    },
    "DESC": {"def": "definition", "desc": "description", "manner": "manner", "reason": "reason"},
    "HUM": {"gr": "group", "ind": "individual", "title": "title", "desc": "description"},
    "LOC": {"city": "city", "country": "country", "mount": "mountain", "other": "other", "state": "state"},
    "NUM": {
        "code": "code",
        "count": "count",
        "date": "date",
        "dist": "distance",
        "money": "money",
        "ord": "order",
        "other": "other",
        "period": "period",
        "perc": "percent",
        "speed": "speed",
        "temp": "temperature",
        "volsize": "size",
        "weight": "weight",
    },
}
TREC_FINE_CODES = [f"{coarse}:{fine}" for coarse, fines in TREC_FINE.items() for fine in fines]

HUB_IDS = {
    "banking77": ("PolyAI/banking77", None),
    "clinic150": ("clinc/clinc_oos", "plus"),
    "trec_coarse": ("CogComp/trec", None),
    "trec_fine": ("CogComp/trec", None),
    "nlu": ("xingkunliuxtracta/nlu_evaluation_data", None),
}


def readable(name: str) -> str:
    """``card_arrival`` -> ``card arrival``; ``Refund_not_showing_up`` -> ``refund not showing up``."""
    return name.replace("_", " ").strip().lower()


def trec_label(code: str, fine: bool) -> str:
    """``NUM:date`` -> ``numeric`` (coarse) or ``numeric date`` (fine)."""
    coarse, _, sub = code.partition(":")
    if coarse not in TREC_COARSE or (fine and sub not in TREC_FINE[coarse]):
        raise KeyError(code)
    return f"{TREC_COARSE[coarse]} {TREC_FINE[coarse][sub]}" if fine else TREC_COARSE[coarse]


def _index(pairs: list[tuple[str, str]], labels: list[str], where: str) -> list[Example]:
    """(text, readable label) pairs -> (text, label index); UsageError on a label outside ``labels``."""
    ids = {label: i for i, label in enumerate(labels)}
    out = []
    for text, label in pairs:
        if label not in ids:
            raise UsageError(f"{where}: label {label!r} is not one of the {len(labels)} known labels")
        out.append((text, ids[label]))
    return out


def _need(path: Path, task: str) -> Path:
    if not path.is_file():
        raise UsageError(f"--data_dir: {task} needs {path} (the original release file)")
    return path


# ---------------------------------------------------------------------------------------------------
# 1. local files in their release formats -> (labels, train, test), full splits
# ---------------------------------------------------------------------------------------------------


def load_banking77(data_dir: Path) -> tuple[list[str], list[Example], list[Example]]:
    splits = {}
    for split in ("train", "test"):
        path = _need(data_dir / f"{split}.csv", "banking77")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"text", "category"} <= set(rows[0]):
            raise UsageError(f"--data_dir: {path} needs the columns text,category")
        splits[split] = [(row["text"], readable(row["category"])) for row in rows]
    categories = data_dir / "categories.json"
    if categories.is_file():
        names = {readable(c) for c in json.loads(categories.read_text(encoding="utf-8"))}
    else:
        names = {label for pairs in splits.values() for _, label in pairs}
    labels = sorted(names)  # the hub's class ids are the alphabetical order
    return labels, _index(splits["train"], labels, "train.csv"), _index(splits["test"], labels, "test.csv")


def load_clinic150(data_dir: Path) -> tuple[list[str], list[Example], list[Example]]:
    path = _need(data_dir / "data_full.json", "clinic150")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not {"train", "test"} <= set(data):
        raise UsageError(f"--data_dir: {path} needs the keys train and test")
    # Out-of-scope queries are not a class of the task: drop them (they live in oos_* keys, and "oos" is
    # filtered as well in case a file merges them in), then number the 150 intents alphabetically.
    splits = {s: [(text, readable(intent)) for text, intent in data[s] if intent != "oos"] for s in ("train", "test")}
    labels = sorted({label for pairs in splits.values() for _, label in pairs})
    return labels, _index(splits["train"], labels, path.name), _index(splits["test"], labels, path.name)


def _read_trec(path: Path, fine: bool) -> list[tuple[str, str]]:
    pairs = []
    # The release is ISO-8859-1 (a few accented names); reading it as UTF-8 would fail on them.
    for number, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), 1):
        if not line.strip():
            continue
        code, _, text = line.partition(" ")
        try:
            pairs.append((text.strip(), trec_label(code, fine)))
        except KeyError:
            raise UsageError(
                f"--data_dir: {path} line {number} starts with {code!r}, not a TREC COARSE:fine code"
            ) from None
    return pairs


def trec_labels(fine: bool) -> list[str]:
    """All 50 fine or 6 coarse labels in the hub's class order, whatever a file happens to contain."""
    return [trec_label(code, True) for code in TREC_FINE_CODES] if fine else list(TREC_COARSE.values())


def load_trec(data_dir: Path, fine: bool) -> tuple[list[str], list[Example], list[Example]]:
    name = "trec_fine" if fine else "trec_coarse"
    labels = trec_labels(fine)
    train = _read_trec(_need(data_dir / "train_5500.label", name), fine)
    test = _read_trec(_need(data_dir / "TREC_10.label", name), fine)
    return labels, _index(train, labels, "train_5500.label"), _index(test, labels, "TREC_10.label")


def split_80_20(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of a 80/20 split: a seeded permutation whose first ceil(20%) rows are the
    test set. This is what ``datasets.Dataset.train_test_split(test_size=0.2, seed=0)`` does, so the NLU
    split is the original's when the rows come in the hub's order."""
    permutation = np.random.default_rng(seed).permutation(n)
    n_test = int(np.ceil(0.2 * n))
    return permutation[n_test:], permutation[:n_test]


NLU_CSV = "NLU-Data-Home-Domain-Annotated-All.csv"
NLU_TEXT_COLUMNS = ("answer", "answer_normalised", "answer_from_user", "answer_from_anno")  # first non-empty wins


def _nlu_rows(path: Path) -> list[tuple[str, str]]:
    """(text, readable "scenario intent") of each row of one ';'-separated NLU file (rows without a text,
    scenario or intent are skipped). A row with too few or too many fields is a UsageError naming the file
    and line."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=";", skipinitialspace=True)
        columns = set(reader.fieldnames or ())
        if not {"scenario", "intent"} <= columns or not columns & set(NLU_TEXT_COLUMNS):
            raise UsageError(
                f"--data_dir: {path} needs the ';'-separated columns scenario, intent and one of "
                f"{', '.join(NLU_TEXT_COLUMNS)}"
            )
        pairs = []
        for row in reader:
            line = reader.line_num
            if None in row or any(row[c] is None for c in reader.fieldnames):
                raise UsageError(
                    f"--data_dir: {path} line {line} does not have the header's {len(reader.fieldnames)} "
                    "';'-separated fields"
                )
            text = next((row[c].strip() for c in NLU_TEXT_COLUMNS if (row.get(c) or "").strip()), "")
            if text and row["scenario"].strip() and row["intent"].strip():  # the release has a few empty rows
                pairs.append((text, readable(f"{row['scenario'].strip()}_{row['intent'].strip()}")))
    return pairs


def load_nlu(data_dir: Path) -> tuple[list[str], list[Example], list[Example]]:
    """The annotated CSV (``data_dir`` itself, or the one CSV in it) re-split 80/20; or the cross-validation
    layout (``data_dir/train`` and ``data_dir/test``, one CSV per intent) with its own split."""
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        splits = {}
        for split in ("train", "test"):
            files = sorted((data_dir / split).glob("*.csv"))
            if not files:
                raise UsageError(f"--data_dir: {data_dir / split} holds no .csv files (one per intent expected)")
            splits[split] = [pair for path in files for pair in _nlu_rows(path)]
        labels = sorted({label for pairs in splits.values() for _, label in pairs})
        return labels, _index(splits["train"], labels, "train/"), _index(splits["test"], labels, "test/")
    if data_dir.is_file():
        path = data_dir
    elif (data_dir / NLU_CSV).is_file():
        path = data_dir / NLU_CSV
    else:
        found = sorted(data_dir.glob("*.csv"))
        if len(found) != 1:
            raise UsageError(
                f"--data_dir: nlu needs {NLU_CSV} (or one .csv file), or train/ and test/ folders of per-intent "
                f".csv files (the cross-validation release), in {data_dir}"
            )
        path = found[0]
    pairs = _nlu_rows(path)
    labels = sorted({label for _, label in pairs})
    examples = _index(pairs, labels, path.name)
    train_ids, test_ids = split_80_20(len(examples))
    return labels, [examples[i] for i in train_ids], [examples[i] for i in test_ids]


# ---------------------------------------------------------------------------------------------------
# 2. the hub (needs network)
# ---------------------------------------------------------------------------------------------------


def _hub_split(split, text_key: str, label_key: str, to_label: Callable[[str], str]) -> list[tuple[str, str]]:
    names = split.features[label_key].names
    return [(row[text_key], to_label(names[row[label_key]])) for row in split]


def load_from_hub(name: str) -> tuple[list[str], list[Example], list[Example]]:
    import datasets

    repo, subset = HUB_IDS[name]
    try:
        data = datasets.load_dataset(repo, subset)
    except Exception as err:  # offline, a moved repository, a script the installed datasets refuses, ...
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UsageError(
            f"cannot load {name} from the hub ({repo}: {first.strip()[:200]}); pass --data_dir with the "
            "local release files (see evaluation/icrl/tasks.py)"
        ) from None
    if name == "banking77":
        splits = {s: _hub_split(data[s], "text", "label", readable) for s in ("train", "test")}
    elif name == "clinic150":
        splits = {s: _hub_split(data[s], "text", "intent", readable) for s in ("train", "test")}
        splits = {s: [(text, label) for text, label in pairs if label != "oos"] for s, pairs in splits.items()}
    elif name in ("trec_coarse", "trec_fine"):
        fine = name == "trec_fine"
        key = "fine_label" if fine else "coarse_label"
        splits = {s: _hub_split(data[s], "text", key, lambda code: trec_label(code, fine)) for s in ("train", "test")}
    else:  # nlu: one split on the hub, re-split 80/20 as the original
        pairs = _hub_split(data["train"], "text", "label", readable)
        train_ids, test_ids = split_80_20(len(pairs))
        splits = {"train": [pairs[i] for i in train_ids], "test": [pairs[i] for i in test_ids]}
    if name.startswith("trec"):
        labels = trec_labels(name == "trec_fine")
    else:
        labels = sorted({label for pairs in splits.values() for _, label in pairs})
    return labels, _index(splits["train"], labels, repo), _index(splits["test"], labels, repo)


# ---------------------------------------------------------------------------------------------------
# 3. the task, subsampled
# ---------------------------------------------------------------------------------------------------


def subsample(examples: list[Example], k: int | None, default: int, seed: int, flag: str) -> list[Example]:
    """Shuffle with ``random.Random(seed)`` (the original's ``random.seed``; ``random.shuffle``) and keep k.

    ``k`` None takes ``default``, or the whole split when it is smaller; an explicit k must fit."""
    k = min(default, len(examples)) if k is None else k
    if k > len(examples):
        raise UsageError(f"{flag} {k} is larger than the split ({len(examples)} examples)")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:k]


def load_full(name: str, data_dir: str = "") -> tuple[list[str], list[Example], list[Example]]:
    """(labels, train, test) of a task, whole splits, from ``data_dir`` or else the hub."""
    if name not in TASKS:
        raise UsageError(f"--task {name!r} is not one of {', '.join(TASKS)}")
    if not data_dir:
        return load_from_hub(name)
    path = Path(data_dir)
    if not path.exists():
        raise UsageError(f"--data_dir {data_dir} does not exist")
    if name == "banking77":
        return load_banking77(path)
    if name == "clinic150":
        return load_clinic150(path)
    if name == "nlu":
        return load_nlu(path)
    return load_trec(path, fine=name == "trec_fine")


def load_task(
    name: str,
    data_dir: str = "",
    train_k: int | None = None,
    test_k: int | None = None,
    train_seed: int = 100,
    test_seed: int = 100,
) -> Task:
    """The task with ``train_k`` training and ``test_k`` test examples (defaults as the original's commands)."""
    labels, train, test = load_full(name, data_dir)
    input_prefix, prediction_prefix, default_train_k = TASKS[name]
    train = subsample(train, train_k, default_train_k, train_seed, "--train_k")
    test = subsample(test, test_k, DEFAULT_TEST_K, test_seed, "--test_k")
    return Task(name, input_prefix, prediction_prefix, labels, train, test)
