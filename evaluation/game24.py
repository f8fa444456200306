"""Game of 24: the puzzles, an exact verifier, and the text the in-context methods show a model.

The data are the 1,362 puzzles of Tree of Thoughts (``tot/data/24/24.csv`` in the ``tree-of-thoughts-llm``
wheel; columns ``Rank,Puzzles,...``, ranked from easiest to hardest by human solve time). Ranks 901-1000 are
the standard hard test set (ToT's ``get_input(900 + i)``, ``../shared/reference/icrl_baselines.md`` B.2).
Get the file once with::

    pip download --no-deps tree-of-thoughts-llm -d data/tot     # then --data_path data/tot

The verifier never calls ``eval``: an answer is tokenized and parsed by a small grammar of integers,
``+ - * /`` and parentheses (no unary minus, no powers, no decimals), evaluated with ``fractions.Fraction``,
and solves the puzzle when it uses the four numbers exactly once each and equals 24. Anything else (code,
``**`` or ``^``, division by zero, extra or missing numbers, over-long or deeply nested input) is rejected
with a reason before any arithmetic runs on it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from experiment_args import UsageError

CSV_IN_WHEEL = "tot/data/24/24.csv"
HARD_TEST_RANKS = "901-1000"
GET_THE_DATA = (
    "get ToT's 24.csv with `pip download --no-deps tree-of-thoughts-llm -d DIR` and pass --data_path DIR "
    "(the wheel, or the 24.csv inside it)"
)

# ---------------------------------------------------------------------------------------------------
# 1. puzzles
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Puzzle:
    rank: int  # 1-based difficulty rank, as in the CSV (901-1000: the hard test set)
    text: str  # "4 9 10 13", as the model sees it

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.text.split())


def _csv_text(data_path: str) -> tuple[str, str]:
    """(text of 24.csv, where it came from): a .csv, a .whl/.zip holding it, or a folder with either."""
    if not data_path:
        spec = importlib.util.find_spec("tot")  # installed with pip install --no-deps tree-of-thoughts-llm
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"--data_path is not set and the tot package is not installed; {GET_THE_DATA}")
        data_path = str(Path(spec.submodule_search_locations[0]) / "data" / "24" / "24.csv")
    path = Path(data_path)
    if path.is_dir():
        found = sorted(path.glob("24.csv")) + sorted(path.glob("tree_of_thoughts_llm-*.whl"))
        if not found:
            raise UsageError(f"--data_path {data_path} holds no 24.csv nor tree_of_thoughts_llm wheel; {GET_THE_DATA}")
        path = found[0]
    if not path.is_file():
        raise UsageError(f"--data_path {data_path} does not exist; {GET_THE_DATA}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if CSV_IN_WHEEL not in wheel.namelist():
                raise UsageError(f"--data_path {path} has no {CSV_IN_WHEEL} inside; {GET_THE_DATA}")
            return wheel.read(CSV_IN_WHEEL).decode("utf-8"), f"{path}:{CSV_IN_WHEEL}"
    return path.read_text(encoding="utf-8"), str(path)


def load_puzzles(data_path: str) -> list[Puzzle]:
    """Every puzzle of the file, in rank order; a malformed row names the file and line."""
    text, where = _csv_text(data_path)
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"Rank", "Puzzles"} <= set(reader.fieldnames):
        raise UsageError(f"--data_path {where} is not ToT's 24.csv (needs columns Rank and Puzzles)")
    puzzles = []
    for line, row in enumerate(reader, start=2):
        numbers = (row["Puzzles"] or "").split()
        if len(numbers) != 4 or not all(n.isdigit() for n in numbers) or not (row["Rank"] or "").isdigit():
            raise UsageError(f"--data_path {where} line {line}: expected a rank and four integers, got {row}")
        puzzles.append(Puzzle(int(row["Rank"]), " ".join(numbers)))
    return sorted(puzzles, key=lambda p: p.rank)


def parse_ranks(spec: str) -> list[int]:
    """``"901-1000"`` or ``"1-5,900,1361-1362"`` -> the ranks in that order (duplicates dropped)."""
    ranks: list[int] = []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise UsageError(f"--ranks {spec!r}: expected ranks or ranges like 901-1000 or 1-5,900")
        first = int(match.group(1))
        ranks += range(first, int(match.group(2) or first) + 1)
    return list(dict.fromkeys(ranks))


def select_puzzles(puzzles: list[Puzzle], ranks: str, max_puzzles: int | None = None) -> list[Puzzle]:
    """The puzzles of ``ranks`` (1-based, as in the CSV), the first ``max_puzzles`` of them."""
    by_rank = {p.rank: p for p in puzzles}
    wanted = parse_ranks(ranks)
    missing = [r for r in wanted if r not in by_rank]
    if missing:
        raise UsageError(f"--ranks {ranks}: rank {missing[0]} is not in the data (it has 1-{max(by_rank, default=0)})")
    return [by_rank[r] for r in wanted][:max_puzzles]


# ---------------------------------------------------------------------------------------------------
# 2. the verifier: tokenizer, recursive descent, exact arithmetic
# ---------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_NESTING = 16
TARGET = 24
# Typographic operators that models write; mapped before tokenizing.
_SAME_AS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})


class Rejected(ValueError):
    """An expression the grammar does not accept (the reason is shown in the run's JSONL)."""


def tokenize(expression: str) -> list[str]:
    """Integers and the characters ``+ - * / ( )``; anything else is rejected, ``**`` with its own reason."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise Rejected(f"longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    i, text = 0, expression.translate(_SAME_AS)
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            tokens.append(text[i:j])
            i = j
        elif char in "+-*/()":
            if char == "*" and text[i + 1 : i + 2] == "*":
                raise Rejected("'**' (power) is not a Game of 24 operation")
            tokens.append(char)
            i += 1
        else:
            raise Rejected(f"unexpected character {char!r} (only integers, + - * / and parentheses)")
    if not tokens:
        raise Rejected("empty expression")
    return tokens


class _Parser:
    """expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ; factor := INT | '(' expr ')'.

    The tree is nested tuples: ``int`` leaves and ``(op, left, right)`` nodes."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expr(self):
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term())
        return node

    def term(self):
        node = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = (op, node, self.factor())
        return node

    def factor(self):
        token = self.peek()
        if token is None:
            raise Rejected("expression ends early")
        if token.isdigit():
            return int(self.take())
        if token == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise Rejected(f"nested deeper than {MAX_NESTING} parentheses")
            self.take()
            node = self.expr()
            if self.peek() != ")":
                raise Rejected("unbalanced parentheses")
            self.take()
            self.depth -= 1
            return node
        if token in "+-":
            raise Rejected(f"unary {token!r} is not a Game of 24 operation")
        raise Rejected(f"unexpected {token!r}")


def parse(expression: str):
    """The expression's tree; ``Rejected`` with a reason if the grammar does not accept all of it."""
    parser = _Parser(tokenize(expression))
    tree = parser.expr()
    if parser.peek() is not None:
        raise Rejected(f"unexpected {parser.peek()!r} after a complete expression")
    return tree


def leaves(tree) -> list[int]:
    if isinstance(tree, int):
        return [tree]
    return leaves(tree[1]) + leaves(tree[2])


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def evaluate(tree) -> Fraction:
    """Exact value of a parsed tree; ``Rejected`` on division by zero. Iterative: no recursion limit to hit."""
    stack, values = [(tree, False)], []
    while stack:
        node, expanded = stack.pop()
        if isinstance(node, int):
            values.append(Fraction(node))
        elif not expanded:
            stack += [(node, True), (node[2], False), (node[1], False)]
        else:
            right, left = values.pop(), values.pop()
            if node[0] == "/" and right == 0:
                raise Rejected("division by zero")
            values.append(_APPLY[node[0]](left, right))
    return values[0]


@dataclass(frozen=True)
class Verdict:
    """What the verifier says of one answer."""

    kind: str  # solved | wrong_value | wrong_numbers | invalid (division by zero) | unparseable | no_answer
    expression: str | None = None  # what was checked (None: nothing found in the response)
    value: Fraction | None = None
    reason: str = ""

    @property
    def solved(self) -> bool:
        return self.kind == "solved"

    @property
    def parse_failure(self) -> bool:
        return self.kind in ("unparseable", "no_answer")

    def to_dict(self) -> dict:
        value = None if self.value is None else str(self.value)
        return {"verdict": self.kind, "expression": self.expression, "value": value, "reason": self.reason}


def check(expression: str, numbers: tuple[int, ...] | list[int]) -> Verdict:
    """Verdict on one expression (the part before any ``=``) for a puzzle's numbers."""
    try:
        tree = parse(expression)
    except Rejected as err:
        return Verdict("unparseable", expression, reason=str(err))
    used = leaves(tree)
    try:  # cheap at any input: 200 characters bound every number and fraction to a few hundred digits
        value = evaluate(tree)
    except Rejected as err:
        return Verdict("invalid", expression, reason=str(err))
    if Counter(used) != Counter(numbers):
        reason = f"uses {' '.join(map(str, sorted(used)))}, not {' '.join(map(str, sorted(numbers)))}"
        return Verdict("wrong_numbers", expression, value, reason)
    if value != TARGET:
        return Verdict("wrong_value", expression, value, f"equals {value}, not {TARGET}")
    return Verdict("solved", expression, value)


# ---------------------------------------------------------------------------------------------------
# 3. reading a model's answer
# ---------------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_ANSWER_MARK = re.compile(r"\**\s*answer\s*\**\s*:", re.I)
_ARITHMETIC_RUN = re.compile(r"[\d\s+\-*/()×÷−–]+")


def answer_body(text: str) -> str:
    """The first ``<answer>...</answer>`` (or an unclosed one: the stop string cut it), else the whole text."""
    match = _ANSWER_TAG.search(text)
    return (match.group(1) if match else text).strip()


def extract_expression(text: str) -> str | None:
    """The expression a free-form response answers with, or None.

    As the original: inside the first ``<answer>`` block, the text after the last ``**Answer**:``; without
    that marker, the last non-empty line. Only the left side of an ``=`` counts, and of what is left the
    longest stretch of arithmetic characters holding a digit ("The answer is (6 - 4) * (4 + 8)." ->
    "(6 - 4) * (4 + 8)"). Whatever comes back still has to pass ``check``.
    """
    body = answer_body(text)
    marks = list(_ANSWER_MARK.finditer(body))
    if marks:
        after = body[marks[-1].end() :].strip()
        line = after.splitlines()[0] if after else ""
    else:
        lines = [line for line in body.splitlines() if line.strip()]
        line = lines[-1] if lines else ""
    line = line.split("=")[0]
    runs = [run.strip() for run in _ARITHMETIC_RUN.findall(line) if any(c.isdigit() for c in run)]
    if not runs:
        return None
    return max(runs, key=len).strip("* ")


def score_response(text: str, numbers: tuple[int, ...] | list[int]) -> Verdict:
    expression = extract_expression(text)
    if expression is None:
        return Verdict("no_answer", reason="no arithmetic expression found")
    return check(expression, numbers)


REWARDS = ("binary", "distance")
# distance: the reference's ground-truth reward (B.2: -|lhs - 24|, and -30 unless the numbers are the
# puzzle's), with |lhs - 24| capped at 24 so the reward stays in [-54, 0]; no value at all scores the floor.
FORMAT_PENALTY, DISTANCE_CAP = 30.0, 24.0


def reward(verdict: Verdict, kind: str = "binary") -> float:
    """1/0 (``binary``) or the graded ``distance`` reward of a verdict; 0 and 1 are both 'solved' maxima."""
    if kind == "binary":
        return 1.0 if verdict.solved else 0.0
    if verdict.value is None:
        return -(DISTANCE_CAP + FORMAT_PENALTY)
    distance = min(abs(float(verdict.value - TARGET)), DISTANCE_CAP)
    return -distance - (FORMAT_PENALTY if verdict.kind == "wrong_numbers" else 0.0)


def format_reward(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------
# 4. what the model is shown (reference B.2; the methods' own instructions are in evaluation.icrl_prompting)
# ---------------------------------------------------------------------------------------------------

TASK_LINE = (
    "**Task**: Use numbers and basic arithmetic operations (+ - * /) to obtain 24. Each step, you are only "
    "allowed to choose two of the remaining numbers to obtain a new number."
)
ANSWER_FORMAT = (
    "Only make one attempt, and put your answer in <answer>**Response** Step1: ... (left: ...) Step2: ... "
    "(left: ...) Step3: ... (left: ...) **Answer**: <math operations of the 4 input numbers, even if it does "
    "not equal 24></answer> format. Whether the Answer is correct or incorrect, do not try again."
)
# The paper's five demonstration inputs (game24_3steps.txt); the steps are written here. Rank 1000 ("4 9 10 13")
# is in the hard test set, so with demos on its solution is in every prompt (as in the paper).
DEMOS = (
    ("4 4 6 8", "4 + 8 = 12 (left: 4 6 12)|6 - 4 = 2 (left: 2 12)|2 * 12 = 24 (left: 24)", "(6 - 4) * (4 + 8)"),
    ("2 9 10 12", "12 * 2 = 24 (left: 9 10 24)|10 - 9 = 1 (left: 1 24)|24 * 1 = 24 (left: 24)", "(12 * 2) * (10 - 9)"),
    ("4 9 10 13", "13 - 10 = 3 (left: 3 4 9)|9 - 3 = 6 (left: 4 6)|4 * 6 = 24 (left: 24)", "4 * (9 - (13 - 10))"),
    ("1 4 8 8", "8 / 4 = 2 (left: 1 2 8)|1 + 2 = 3 (left: 3 8)|3 * 8 = 24 (left: 24)", "(1 + 8 / 4) * 8"),
    ("5 5 5 9", "5 + 5 = 10 (left: 5 9 10)|10 + 5 = 15 (left: 9 15)|15 + 9 = 24 (left: 24)", "((5 + 5) + 5) + 9"),
)  # (input, its three steps separated by "|", answer)
DEMO_RANKS = (1077, 455, 1000, 229, 895)  # where the demo inputs sit in 24.csv


def question(puzzle_text: str) -> str:
    return f"**Prompt**: Input: {puzzle_text}"


def demos_text(reward_kind: str, show_rewards: bool = True) -> str:
    """The five demonstrations as ``<attempt>`` blocks. The paper shows each with Reward 0 on its LLM-judge
    scale; here each shows what the verifier gives it (1 under binary, 0 under distance), so the examples
    never contradict the rewards the attempts get. ``show_rewards=False`` leaves the Reward lines out."""
    blocks = []
    for puzzle_text, steps, answer in DEMOS:
        shown = format_reward(reward(check(answer, [int(n) for n in puzzle_text.split()]), reward_kind))
        lines = "\n".join(f"Step {i}: {step}" for i, step in enumerate(steps.split("|"), start=1))
        reward_line = f"**Reward**: {shown}\n" if show_rewards else ""
        blocks.append(
            f"<attempt>\n{TASK_LINE}\n{question(puzzle_text)}\n**Response**:\n{lines}\n"
            f"**Answer**: {answer} = 24\n{reward_line}</attempt>"
        )
    return "\n".join(blocks)
