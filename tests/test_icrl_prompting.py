"""ICRL prompting and its baselines on Game of 24 (evaluation/icrl_prompting.py): the explore/exploit schedule, the
prompt of each ablation, the multi-round loop on a scripted backend (solving on the scripted round, rewards,
every method's budget), resume, the context budget, the comparison table, and one CLI run with tiny-gpt2.

The puzzles are a fixture 24.csv written here (ranks 901-904, as in the hard test set)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evaluation import compare, game24
from evaluation import icrl_prompting as ip
from evaluation.icrl_prompting import ICRLPromptingArguments, Problem, run
from experiment_args import BackendArguments, UsageError
from llm.base import Backend, Generation

SOLUTIONS = {  # the fixture puzzles and one solution of each
    "4 4 6 8": "(6 - 4) * (4 + 8)",
    "3 3 8 8": "8 / (3 - 8 / 3)",
    "1 5 5 5": "5 * (5 - 1 / 5)",
    "1 2 3 4": "1 * 2 * 3 * 4",
}
QUESTION = re.compile(r"\*\*Prompt\*\*: Input: ([\d ]+)\n$")


@pytest.fixture
def data_path(tmp_path) -> str:
    path = tmp_path / "24.csv"
    rows = [f"{901 + i},{text},10.0,90.00%,10.0,4.0\n" for i, text in enumerate(SOLUTIONS)]
    path.write_text("Rank,Puzzles,AMT (s),Solved rate,1-sigma Mean (s),1-sigma STD (s)\n" + "".join(rows))
    return str(path)


def answer(expression: str) -> str:
    """A response in the asked format, cut at the stop string as the backends return it."""
    return f"<answer>**Response** Step1: ... (left: ...) **Answer**: {expression} = 24"


class ScriptedBackend(Backend):
    """A test double: ``script(puzzle, kind, n, seed)`` gives the text of the n-th call of ``kind`` ("answer" or
    "note") for ``puzzle`` (deterministic). Records every prompt; token counts are word counts. Raises after
    ``fail_after_calls`` generate calls."""

    name = "scripted"

    def __init__(self, script, fail_after_calls: int | None = None, max_positions: int | None = None):
        super().__init__()
        self.script = script
        self.fail_after_calls = fail_after_calls
        self.max_positions = max_positions
        self.calls: list[dict] = []  # one per prompt
        self.generate_calls = 0
        self.counts: dict[tuple[str, str], int] = {}

    def encode(self, messages, prefill=""):  # only read when max_positions is set (the local backend has both)
        return messages[-1]["content"].split()

    def _generate(self, prompts, *, max_tokens, temperature, top_p, stop, choices, seed, prefill):
        if self.fail_after_calls is not None and self.generate_calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.generate_calls += 1
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            match = QUESTION.search(text)
            kind = "answer" if match else "note"
            puzzle = match.group(1) if match else re.findall(r"\*\*Prompt\*\*: Input: ([\d ]+)", text)[-1]
            n = self.counts.get((puzzle, kind), 0)
            self.counts[(puzzle, kind)] = n + 1
            self.calls.append({"kind": kind, "puzzle": puzzle, "prompt": text, "seed": seed, "max_tokens": max_tokens})
            reply = self.script(puzzle, kind, n, seed)
            out.append(Generation(reply, prompt_tokens=len(text.split()), completion_tokens=len(reply.split())))
        self._count(requests=len(out))
        return out

    def prompts(self, puzzle: str, kind: str = "answer") -> list[str]:
        return [c["prompt"] for c in self.calls if c["puzzle"] == puzzle and c["kind"] == kind]


def solve_on(rounds_by_puzzle: dict[str, int]):
    """A script whose answer to puzzle p is right on (0-based) round rounds_by_puzzle[p], wrong before, and
    whose wrong answers and notes depend on the call's seed."""

    def script(puzzle, kind, n, seed):
        if kind == "note":
            return f"The numbers were wrong. Plan: try again ({n}, seed {seed}). <feedback>check step {n}</feedback>"
        if n == rounds_by_puzzle.get(puzzle):
            return answer(SOLUTIONS[puzzle])
        return answer(f"{n + 1} + {seed % 5}") if n % 3 else "I do not know."

    return script


def make_args(tmp_path, data_path, **flags) -> ICRLPromptingArguments:
    defaults = {"data_path": data_path, "ranks": "901-904", "output_dir": str(tmp_path / "run"), "rounds": 4}
    return ICRLPromptingArguments(**{**defaults, **flags})


def rows_of(args: ICRLPromptingArguments) -> list[dict]:
    return [json.loads(line) for line in (Path(args.output_dir) / "problems.jsonl").read_text().splitlines()]


def prompt_for(args: ICRLPromptingArguments, attempts: list[dict], puzzle: str = "4 4 6 8") -> str:
    """The next answer prompt of a puzzle with these past attempts (no demos: the blocks are what is tested)."""
    blocks, instruction = ip.history_blocks(args, Problem(game24.Puzzle(901, puzzle), 0, attempts))
    return ip.answer_prompt(puzzle, "", blocks, instruction)


def past(n: int, reward: float = 0.0, **extra) -> list[dict]:
    return [{"shown_response": f"response {i}", "reward": reward, "shown_reward": reward, **extra} for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# schedule and prompts
# ---------------------------------------------------------------------------------------------------


def test_explore_exploit_schedule(tmp_path, data_path):
    preset = make_args(tmp_path, data_path, method="icrl_preset")
    assert [ip.instruction_kind(preset, r) for r in range(6)] == ["explore", "exploit"] * 3  # round 0 explores
    autonomous = make_args(tmp_path, data_path, method="icrl_autonomous")
    assert {ip.instruction_kind(autonomous, r) for r in range(6)} == {"autonomous"}
    for fixed in ("explore", "exploit"):
        args = make_args(tmp_path, data_path, method="icrl_preset", icrl_instruction=fixed)
        assert {ip.instruction_kind(args, r) for r in range(6)} == {fixed}
    assert ip.instruction_kind(make_args(tmp_path, data_path, icrl_instruction="none"), 0) is None
    for method in ("reflexion", "self_refine", "best_of_n"):
        assert ip.instruction_kind(make_args(tmp_path, data_path, method=method), 0) is None


def test_icrl_prompt_holds_every_attempt_with_its_reward(tmp_path, data_path):
    args = make_args(tmp_path, data_path, method="icrl_preset")
    prompt = prompt_for(args, past(2) + past(1, reward=1.0))
    assert prompt == (
        "<attempt>\n**Prompt**: Input: 4 4 6 8\n**Response**: response 0\n**Reward**: 0\n</attempt>\n"
        "<attempt>\n**Prompt**: Input: 4 4 6 8\n**Response**: response 1\n**Reward**: 0\n</attempt>\n"
        "<attempt>\n**Prompt**: Input: 4 4 6 8\n**Response**: response 0\n**Reward**: 1\n</attempt>\n"
        f"<instructions>\n{ip.INSTRUCTIONS['exploit']} {game24.ANSWER_FORMAT}\n</instructions>\n"  # round 3: odd
        f"<attempt>\n{game24.TASK_LINE}\n**Prompt**: Input: 4 4 6 8\n"
    )
    assert f"<instructions>\n{ip.INSTRUCTIONS['explore']} " in prompt_for(args, past(2))
    autonomous = prompt_for(make_args(tmp_path, data_path, method="icrl_autonomous"), past(2))
    assert ip.INSTRUCTIONS["autonomous"] in autonomous and autonomous.count("**Reward**: 0") == 2


def test_each_ablation_changes_the_prompt_as_specified(tmp_path, data_path):
    full = prompt_for(make_args(tmp_path, data_path), past(5))
    assert full.count("<attempt>\n**Prompt**") == 5 and full.count("**Reward**:") == 5

    hidden = prompt_for(make_args(tmp_path, data_path, icrl_rewards="hidden"), past(5, shown_reward=None))
    assert "Reward" not in hidden and ip.INSTRUCTIONS_NO_REWARD["exploit"] in hidden  # round 5: exploit
    assert "**Reward**" not in game24.demos_text("binary", show_rewards=False)

    last_two = prompt_for(make_args(tmp_path, data_path, icrl_last_k=2), past(5))
    assert last_two.count("<attempt>\n**Prompt**") == 2
    assert "response 3" in last_two and "response 4" in last_two and "response 2" not in last_two

    bare = prompt_for(make_args(tmp_path, data_path, icrl_instruction="none"), past(2))
    assert bare.count("**Reward**: 0") == 2
    assert f"<instructions>\n{game24.ANSWER_FORMAT}\n</instructions>" in bare
    assert not any(text in bare for text in ip.INSTRUCTIONS.values())


def test_shown_rewards_of_the_ablations(tmp_path, data_path):
    shown = ip.shown_reward
    assert shown(make_args(tmp_path, data_path), -3.5, 901, 0) == -3.5
    assert shown(make_args(tmp_path, data_path, icrl_rewards="hidden"), 1.0, 901, 0) is None
    assert shown(make_args(tmp_path, data_path, icrl_rewards="zero", reward="distance"), -3.5, 901, 0) == 0.0
    noisy = make_args(tmp_path, data_path, icrl_rewards="random")
    draws = [shown(noisy, 0.0, 901, r) for r in range(20)]
    assert set(draws) == {0.0, 1.0} and draws == [shown(noisy, 0.0, 901, r) for r in range(20)]
    assert draws != [
        shown(make_args(tmp_path, data_path, icrl_rewards="random", seed=1), 0.0, 901, r) for r in range(20)
    ]


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------


def test_loop_solves_on_the_scripted_round_and_records_rewards(tmp_path, data_path):
    args = make_args(tmp_path, data_path, rounds=5, batch_problems=2)
    backend = ScriptedBackend(solve_on({"4 4 6 8": 2, "1 5 5 5": 0}))
    summary = run(args, BackendArguments(), backend=backend)
    rows = {r["puzzle"]: r for r in rows_of(args)}
    assert rows["4 4 6 8"]["solved_at"] == 3 and rows["4 4 6 8"]["rewards"] == [0.0, 0.0, 1.0]
    assert rows["1 5 5 5"]["solved_at"] == 1 and rows["1 5 5 5"]["rewards"] == [1.0]
    assert rows["3 3 8 8"]["solved_at"] is None and rows["3 3 8 8"]["rewards"] == [0.0] * 5
    attempts = rows["4 4 6 8"]["attempts"]
    assert [a["verdict"] for a in attempts] == ["no_answer", "wrong_numbers", "solved"]
    assert [a["instruction"] for a in attempts] == ["explore", "exploit", "explore"]
    assert rows["4 4 6 8"]["parse_failures"] == 1 and rows["4 4 6 8"]["calls"] == 3
    # every past attempt, with its reward, is in the next prompt; a solved puzzle gets no more calls
    prompts = backend.prompts("4 4 6 8")
    assert len(prompts) == 3
    for r, prompt in enumerate(prompts):
        assert prompt.count("<attempt>\n**Prompt**: Input: 4 4 6 8\n**Response**") == r
    assert "**Response**: I do not know.\n**Reward**: 0\n</attempt>" in prompts[1]
    assert summary["success_at"][1]["solved"] == 1 and summary["success_at"][2]["solved"] == 2
    assert summary["stages"]["success@4"]["success_rate"] == 0.5 and summary["stages"]["success@5"]["solved"] == 2
    assert list(summary["stages"]) == ["success@1", "success@2", "success@4", "success@5"]
    assert summary["attempts"] == 3 + 1 + 5 + 5 and summary["calls"] == 14 and summary["finished"]
    assert summary["parse_failures"] == sum(r["parse_failures"] for r in rows.values())


def test_without_stop_on_success_every_round_runs(tmp_path, data_path):
    args = make_args(tmp_path, data_path, rounds=5, stop_on_success=False)
    run(args, BackendArguments(), backend=ScriptedBackend(solve_on({"4 4 6 8": 2})))
    row = next(r for r in rows_of(args) if r["puzzle"] == "4 4 6 8")
    assert row["solved_at"] == 3 and row["rewards"] == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "method, calls_per_puzzle",
    [("icrl_preset", 4), ("icrl_autonomous", 4), ("best_of_n", 4), ("reflexion", 4 + 3), ("self_refine", 4 + 3)],
)
def test_every_method_gets_the_same_attempts(tmp_path, data_path, method, calls_per_puzzle):
    args = make_args(tmp_path, data_path, method=method, rounds=4)
    summary = run(args, BackendArguments(), backend=ScriptedBackend(solve_on({})))
    assert [len(r["attempts"]) for r in rows_of(args)] == [4] * 4
    assert summary["calls"] == 4 * calls_per_puzzle and summary["success_rate"] == 0.0


def test_reflexion_reflects_after_failures_and_carries_the_plans(tmp_path, data_path):
    args = make_args(tmp_path, data_path, method="reflexion", rounds=3, seed=7)
    backend = ScriptedBackend(solve_on({"1 5 5 5": 0}))
    run(args, BackendArguments(), backend=backend)
    assert backend.prompts("1 5 5 5", "note") == []  # solved at once: nothing to reflect on
    notes = backend.prompts("4 4 6 8", "note")
    assert len(notes) == 2 and "**Response**: I do not know.\n**Reward**: 0\n</attempt>" in notes[0]
    assert ip.REFLECT in notes[0]
    answers = backend.prompts("4 4 6 8")
    assert "<reflection>" not in answers[0] and ip.REFLEXION_INSTRUCTION not in answers[0]
    plans = [a.get("reflection") for a in next(r for r in rows_of(args) if r["puzzle"] == "4 4 6 8")["attempts"]]
    assert plans[0].startswith("try again (0, seed") and plans[2] is None  # no reflection after the last round
    assert f"<reflection>\n**Plan**: {plans[0]}\n</reflection>" in answers[1]
    assert answers[2].count("<reflection>\n**Plan**") == 2
    assert "<attempt>\n**Prompt**: Input: 4 4 6 8\n**Response**" not in answers[2]  # plans only, not attempts
    assert "**Reward**" not in answers[2]  # the baselines' demos are plain solved examples


def test_self_refine_writes_feedback_without_rewards(tmp_path, data_path):
    args = make_args(tmp_path, data_path, method="self_refine", rounds=3)
    backend = ScriptedBackend(solve_on({}))
    run(args, BackendArguments(), backend=backend)
    notes, answers = backend.prompts("3 3 8 8", "note"), backend.prompts("3 3 8 8")
    assert len(notes) == 2 and all("Reward" not in p for p in notes + answers)
    assert ip.FEEDBACK in notes[0]
    assert "**Response**: I do not know.\n<feedback>check step 0</feedback>\n</attempt>" in answers[1]
    assert answers[2].count("<feedback>") == 2 and ip.SELF_REFINE_INSTRUCTION in answers[2]


def test_best_of_n_samples_one_prompt_independently(tmp_path, data_path):
    args = make_args(tmp_path, data_path, method="best_of_n", rounds=3)
    backend = ScriptedBackend(solve_on({}))
    run(args, BackendArguments(), backend=backend)
    prompts = backend.prompts("1 2 3 4")
    assert len(prompts) == 3 and len(set(prompts)) == 1 and "**Response**: I do not know" not in prompts[0]
    seeds = [c["seed"] for c in backend.calls if c["puzzle"] == "1 2 3 4"]
    assert len(set(seeds)) == 3


def test_resume_continues_unfinished_groups_with_the_same_numbers(tmp_path, data_path):
    script = solve_on({"1 2 3 4": 3})
    whole = make_args(tmp_path / "whole", data_path, batch_problems=2)
    run(whole, BackendArguments(), backend=ScriptedBackend(script))
    resumed = make_args(tmp_path / "resumed", data_path, batch_problems=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # 4 rounds of group 0, then 2 of group 1
        run(resumed, BackendArguments(), backend=ScriptedBackend(script, fail_after_calls=6))
    assert [r["group"] for r in rows_of(resumed)] == [0, 0]
    with open(Path(resumed.output_dir) / "problems.jsonl", "a") as f:
        f.write('{"rank": 903, "group": 1, "puzz')  # a crash in the middle of group 1's write
    backend = ScriptedBackend(script)
    summary = run(resumed, BackendArguments(), backend=backend)
    assert {c["puzzle"] for c in backend.calls} == {"1 5 5 5", "1 2 3 4"}  # group 0 is not replayed
    assert rows_of(resumed) == rows_of(whole)
    assert summary["backend_usage"]["requests"] == (4 + 2) * 2 + 4 * 2  # prompts sent by both sessions
    again = ScriptedBackend(script)
    assert run(resumed, BackendArguments(), backend=again)["success_at"] == summary["success_at"]
    assert again.calls == []


def test_changed_settings_need_overwrite(tmp_path, data_path):
    run(make_args(tmp_path, data_path, rounds=2), BackendArguments(), backend=ScriptedBackend(solve_on({})))
    with pytest.raises(UsageError, match="differs in rounds.*--overwrite_output_dir"):
        run(make_args(tmp_path, data_path, rounds=3), BackendArguments(), backend=ScriptedBackend(solve_on({})))
    other = tmp_path / "other.csv"
    other.write_text(Path(data_path).read_text().replace("4 4 6 8", "4 4 6 9"))
    with pytest.raises(UsageError, match="has puzzle '4 4 6 8' at rank 901, --data_path has '4 4 6 9'"):
        run(make_args(tmp_path, str(other), rounds=2), BackendArguments(), backend=ScriptedBackend(solve_on({})))


def test_old_attempts_leave_a_prompt_that_would_not_fit(tmp_path, data_path):
    long_wrong = lambda puzzle, kind, n, seed: answer("1 + 2") + " filler" * 40  # noqa: E731
    args = make_args(tmp_path, data_path, rounds=6, max_tokens=50, demos=False, ranks="901")
    backend = ScriptedBackend(long_wrong, max_positions=400)  # words stand in for tokens
    summary = run(args, BackendArguments(), backend=backend)
    attempts = rows_of(args)[0]["attempts"]
    assert [a["blocks_shown"] + a["blocks_left_out"] for a in attempts] == list(range(6))
    assert attempts[-1]["blocks_left_out"] > 0 and summary["blocks_left_out"] > 0
    assert all(len(c["prompt"].split()) <= 400 - 50 for c in backend.calls)
    assert summary["context_window"] == 400
    with pytest.raises(UsageError, match="lower --max_tokens"):
        run(
            make_args(tmp_path / "tiny", data_path, ranks="901"),
            BackendArguments(),
            backend=ScriptedBackend(long_wrong, max_positions=300),
        )


def test_compare_reads_the_run_folders(tmp_path, data_path, capsys):
    for method, script in (("icrl_preset", solve_on({"4 4 6 8": 1})), ("best_of_n", solve_on({}))):
        run(
            make_args(tmp_path / method, data_path, method=method), BackendArguments(), backend=ScriptedBackend(script)
        )
    rows = compare.main([str(tmp_path / "icrl_preset" / "run"), str(tmp_path / "best_of_n" / "run")])
    assert [r["run"] for r in rows] == ["icrl_preset", "best_of_n"]
    assert rows[0]["success@1"].startswith("0.00 [") and rows[0]["success@2"].startswith("0.25 [0.")
    assert rows[1]["success@4"].startswith("0.00 [")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--method", "sft"], "--method 'sft' is not one of"),
        (["--task", "chess"], "--task 'chess' is not one of game24"),
        (["--method", "best_of_n", "--icrl_last_k", "3"], "are ICRL ablations, not best_of_n"),
        (["--method", "best_of_n", "--temperature", "0"], "needs --temperature > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--ranks", "9-1"], "--ranks '9-1'"),
        (["--icrl_rewards", "loud"], "--icrl_rewards 'loud' is not one of"),
        (["--data_path", "/nonexistent/24.csv"], "--data_path /nonexistent/24.csv does not exist; get ToT's"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ip.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and re.search(match, err) and "\n" not in err


# ---------------------------------------------------------------------------------------------------
# the CLI with the built-in tiny model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_end_to_end_with_tiny_gpt2(tmp_path, data_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    flags = [
        "--method", "icrl_preset", "--task", "game24", "--data_path", data_path, "--ranks", "901-902",
        "--rounds", "2", "--model_name_or_path", "tiny-gpt2", "--max_tokens", "12", "--output_dir", str(out),
    ]  # fmt: skip
    summary = ip.main(flags)
    assert "icrl_preset on game24: success@2 0.000" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "problems.jsonl", "summary.json"]
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [r["puzzle"] for r in rows] == ["4 4 6 8", "3 3 8 8"] and [len(r["attempts"]) for r in rows] == [2, 2]
    assert all({"response", "verdict", "reward", "parse_failure"} <= set(a) for r in rows for a in r["attempts"])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["calls"] == 4 and summary["backend_usage"]["requests"] == 4
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["parse_failures"] == sum(r["parse_failures"] for r in rows)
    assert summary["context_window"] == 1024
    again = ip.main(flags)  # finished: nothing runs, the model is not even loaded
    assert again["backend_usage"]["requests"] == 4 and again["success_at"] == summary["success_at"]
