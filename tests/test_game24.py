"""Game of 24 (evaluation/game24.py): the data loader, the exact verifier with hostile inputs, answer extraction
and rewards. The data are small fixture files in 24.csv's format, written here; nothing is downloaded."""

from __future__ import annotations

import builtins
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest

from evaluation import game24
from evaluation.game24 import Verdict, check, extract_expression, reward, score_response
from experiment_args import UsageError

HEADER = "Rank,Puzzles,AMT (s),Solved rate,1-sigma Mean (s),1-sigma STD (s)\n"


def write_csv(path: Path, puzzles: dict[int, str]) -> Path:
    """A 24.csv with the given ranks and puzzles (the other columns made up, as in the real file's format)."""
    rows = [f"{rank},{text},10.0,90.00%,10.0,4.0\n" for rank, text in sorted(puzzles.items())]
    path.write_text(HEADER + "".join(rows))
    return path


# ---------------------------------------------------------------------------------------------------
# the verifier
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, numbers",
    [
        ("(6 - 4) * (4 + 8)", "4 4 6 8"),
        ("8 / (3 - 8 / 3)", "3 3 8 8"),  # needs exact fractions: 8 / (1/3)
        ("5 * (5 - 1 / 5)", "1 5 5 5"),
        ("(10 - 4) * (13 - 9)", "4 9 10 13"),
        ("((1+2)+3)*4", "1 2 3 4"),
        ("4 × 6 × (2 − 1)", "1 2 4 6"),  # typographic operators read as * and -
    ],
)
def test_valid_solutions_are_solved(expression, numbers):
    verdict = check(expression, [int(n) for n in numbers.split()])
    assert verdict.kind == "solved" and verdict.solved and verdict.value == 24


def test_the_demonstrations_solve_their_puzzles():
    for puzzle_text, steps, answer in game24.DEMOS:
        assert check(answer, [int(n) for n in puzzle_text.split()]).solved
        assert len(steps.split("|")) == 3


def test_wrong_values_are_exact():
    verdict = check("4 * 4 + 6 + 8", [4, 4, 6, 8])
    assert verdict.kind == "wrong_value" and verdict.value == 30
    verdict = check("8 / 3 * 3 * 3", [3, 3, 3, 8])  # 24 in floats and exactly; 8/3*3 is exact in fractions
    assert verdict.solved
    verdict = check("(4 + 4) / 6 + 8", [4, 4, 6, 8])
    assert verdict.kind == "wrong_value" and verdict.value == Fraction(28, 3)


@pytest.mark.parametrize(
    "expression, reason",
    [
        ("4 * 6", "uses 4 6, not 4 4 6 8"),  # missing numbers
        ("(6 - 4) * (4 + 8) * 1", "uses 1 4 4 6 8"),  # an extra number
        ("(6 - 4) * (6 + 8)", "uses 4 6 6 8"),  # one reused, one left out
        ("(6 - 4) * 12", "uses 4 6 12"),  # an intermediate result instead of the numbers
        ("44 - 6 - 8 - 6", "uses 6 6 8 44"),  # digits glued together
    ],
)
def test_number_misuse(expression, reason):
    verdict = check(expression, [4, 4, 6, 8])
    assert verdict.kind == "wrong_numbers" and not verdict.solved
    assert verdict.reason.startswith(reason)


@pytest.mark.parametrize(
    "expression, kind, reason",
    [
        ("2**100", "unparseable", "'**' (power)"),
        ("9**9**9**9", "unparseable", "'**' (power)"),
        ("2^100", "unparseable", "unexpected character '^'"),
        ("4 ^ 4 ^ 6 ^ 8", "unparseable", "unexpected character '^'"),
        ("8 / (4 - 4) + 6", "invalid", "division by zero"),
        ("6 / (8 - 4 - 4)", "invalid", "division by zero"),
        ("__import__('os').system('echo pwned')", "unparseable", "unexpected character '_'"),
        ("(lambda: 24)()", "unparseable", "unexpected character 'l'"),
        ("open('/etc/passwd')", "unparseable", "unexpected character 'o'"),
        ("4.0 * 6", "unparseable", "unexpected character '.'"),
        ("1e100", "unparseable", "unexpected character 'e'"),
        ("-4 * -6", "unparseable", "unary '-'"),
        ("4 * (6", "unparseable", "unbalanced parentheses"),
        ("4 * 6)", "unparseable", "unexpected ')'"),
        ("4 6 4 8", "unparseable", "unexpected '6'"),
        ("", "unparseable", "empty expression"),
        ("4 *", "unparseable", "expression ends early"),
        ("(" * 40 + "4" + ")" * 40, "unparseable", "nested deeper than 16"),
        ("(" * 5000 + "4" + ")" * 5000, "unparseable", "longer than 200"),
        ("9" * 10_000, "unparseable", "longer than 200"),
        ("1+" * 150 + "1", "unparseable", "longer than 200"),
        ("\u0664 * 6", "unparseable", "unexpected character"),  # an Arabic-Indic digit: not ours
    ],
)
def test_hostile_expressions_are_rejected_not_run(expression, kind, reason, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the verifier must not run code")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    start = time.perf_counter()
    verdict = check(expression, [4, 4, 6, 8])
    assert time.perf_counter() - start < 0.1
    assert verdict.kind == kind and reason in verdict.reason and not verdict.solved


def test_the_longest_accepted_expressions_are_cheap():
    start = time.perf_counter()
    product = check("*".join(["99"] * 66), [4, 4, 6, 8])  # 197 characters: a 132-digit product
    quotient = check("/".join(["97"] * 66), [4, 4, 6, 8])  # 97/97/97/..., 197 characters
    nested = check("/(".join(["97"] * 17) + ")" * 16, [4, 4, 6, 8])  # 97/(97/(97/...)), as deep as allowed
    assert time.perf_counter() - start < 0.1
    assert product.kind == "wrong_numbers" and product.value == 99**66
    assert quotient.value == Fraction(1, 97**64) and nested.value == 97


# ---------------------------------------------------------------------------------------------------
# reading a model's answer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expression",
    [
        ("<answer>**Response** Step1: 4 + 8 = 12 (left: 4 6 12) **Answer**: (6 - 4) * (4 + 8) = 24</answer>",
         "(6 - 4) * (4 + 8)"),
        ("<answer>**Response**\nStep 1: 4 + 8 = 12\n**Answer**: (6-4)*(4+8)", "(6-4)*(4+8)"),  # cut by the stop
        ("I think it works.\nAnswer: (6 - 4) * (4 + 8) = 24\nDone!", "(6 - 4) * (4 + 8)"),
        ("Step 1: 4 + 8 = 12\nThe answer is (6 - 4) * (4 + 8).", "(6 - 4) * (4 + 8)"),
        ("**Answer**: **(6 - 4) * (4 + 8)**", "(6 - 4) * (4 + 8)"),
        ("<answer>**Answer**: 2**100</answer> **Answer**: 1+1", "2**100"),  # the first <answer> block counts
        ("Step 1: 4 + 8 = 12 (left: 4 6 12)", "4 + 8"),  # a step line: parsed, but not a solution
        ("no numbers here", None),
        ("<answer></answer>", None),
        ("", None),
    ],
)  # fmt: skip
def test_extract_expression(text, expression):
    assert extract_expression(text) == expression


def test_score_response_counts_parse_failures():
    assert score_response("**Answer**: (6 - 4) * (4 + 8) = 24", [4, 4, 6, 8]).solved
    nothing = score_response("I cannot solve this.", [4, 4, 6, 8])
    assert nothing.kind == "no_answer" and nothing.parse_failure
    power = score_response("**Answer**: 2**4 + 8", [2, 4, 8, 1])
    assert power.kind == "unparseable" and power.parse_failure
    assert not score_response("**Answer**: 4 * 6", [4, 4, 6, 8]).parse_failure


def test_rewards():
    solved = check("(6 - 4) * (4 + 8)", [4, 4, 6, 8])
    assert reward(solved) == 1.0 and reward(solved, "distance") == 0.0
    near = check("(6 - 4) * (4 + 8) - 4 / 4", [4, 4, 6, 8])  # 23, with two extra numbers
    assert near.kind == "wrong_numbers" and reward(near) == 0.0
    assert reward(near, "distance") == -1 - 30
    wrong = check("4 + 4 + 6 + 8", [4, 4, 6, 8])  # 22
    assert reward(wrong, "distance") == -2.0
    far = check("4 * 4 * 6 * 8", [4, 4, 6, 8])  # 768: the distance is capped at 24
    assert reward(far, "distance") == -24.0
    assert reward(Verdict("no_answer"), "distance") == -54.0
    assert game24.format_reward(1.0) == "1" and game24.format_reward(-2.5) == "-2.50"


# ---------------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------------


def test_load_csv_wheel_and_folder(tmp_path):
    csv_path = write_csv(tmp_path / "24.csv", {2: "1 1 11 11", 1: "1 1 4 6", 901: "4 5 6 10"})
    puzzles = game24.load_puzzles(str(csv_path))
    assert [(p.rank, p.text, p.numbers) for p in puzzles] == [
        (1, "1 1 4 6", (1, 1, 4, 6)),
        (2, "1 1 11 11", (1, 1, 11, 11)),
        (901, "4 5 6 10", (4, 5, 6, 10)),
    ]
    wheel_dir = tmp_path / "tot"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "tree_of_thoughts_llm-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(game24.CSV_IN_WHEEL, csv_path.read_text())
    assert game24.load_puzzles(str(wheel_dir)) == puzzles  # the folder pip download wrote
    assert game24.load_puzzles(str(next(wheel_dir.iterdir()))) == puzzles  # the wheel itself


def test_selection_defaults_to_the_hard_test_set(tmp_path):
    puzzles = game24.load_puzzles(str(write_csv(tmp_path / "24.csv", {r: "1 2 3 4" for r in range(1, 1101)})))
    hard = game24.select_puzzles(puzzles, game24.HARD_TEST_RANKS)
    assert [p.rank for p in hard] == list(range(901, 1001))
    assert [p.rank for p in game24.select_puzzles(puzzles, "1-3, 1000,2", max_puzzles=3)] == [1, 2, 3]
    assert [p.rank for p in game24.select_puzzles(puzzles, "1000,1-2")] == [1000, 1, 2]


@pytest.mark.parametrize("spec", ["901-", "a-b", "10-5", "", "1;2"])
def test_bad_ranks_name_the_flag(spec):
    with pytest.raises(UsageError, match="--ranks"):
        game24.parse_ranks(spec)


def test_data_errors_name_the_flag(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--data_path .* does not exist; get ToT's 24.csv with `pip download"):
        game24.load_puzzles(str(tmp_path / "missing.csv"))
    with pytest.raises(UsageError, match="holds no 24.csv"):
        game24.load_puzzles(str(tmp_path))
    (tmp_path / "bad.csv").write_text(HEADER + "1,1 2 3,1,1,1,1\n")
    with pytest.raises(UsageError, match="line 2: expected a rank and four integers"):
        game24.load_puzzles(str(tmp_path / "bad.csv"))
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="needs columns Rank and Puzzles"):
        game24.load_puzzles(str(tmp_path / "other.csv"))
    with pytest.raises(UsageError, match="--ranks 1-5: rank 2 is not in the data"):
        game24.select_puzzles(game24.load_puzzles(str(write_csv(tmp_path / "24.csv", {1: "1 2 3 4"}))), "1-5")
    monkeypatch.setattr(game24.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="--data_path is not set and the tot package is not installed"):
        game24.load_puzzles("")
