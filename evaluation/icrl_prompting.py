"""ICRL prompting (Song et al. 2025, "Reward Is Enough: LLMs Are In-Context RL Learners") on Game of 24, with
the Reflexion, Self-Refine and Best-of-N baselines (reference ``../shared/reference/icrl_baselines.md`` B).

    python -m evaluation.icrl_prompting --method icrl_preset --task game24 --data_path data/tot \
        --model_name_or_path smollm2-135m --rounds 50 --output_dir runs/icrl_prompting/preset
    python -m evaluation.icrl_prompting --method best_of_n --backend openai --model gpt-4.1-2025-04-14 ...
    python -m evaluation.compare runs/icrl_prompting/*        # success@k with 95% intervals, one row a run

Every method gets the same budget: ``--rounds`` scored attempts per puzzle (the paper's trials). A round:

    icrl_preset      prompt = demos + every past attempt with its reward + the exploration instruction on even
                     rounds (round 0 included), the exploitation one on odd rounds; one call
    icrl_autonomous  the same with one instruction that offers both and asks the model to pick; one call
    reflexion        after a failed attempt the model writes a reflection ending in a plan (one extra call);
                     the next prompt holds every plan so far, not the attempts
    self_refine      the model writes feedback on its last attempt, no reward (one extra call), then answers
                     with every past attempt and its feedback in the prompt
    best_of_n        independent samples of the plain demo prompt

The reward is the exact verifier's (``evaluation.game24``): 1 solved / 0 otherwise, or the graded
``--reward distance``. A puzzle counts as solved at round k when any of its first k attempts solves it
(success@k; ``--stop_on_success`` ends a puzzle there, which changes no success@k). ICRL ablations:
``--icrl_rewards hidden|zero|random``, ``--icrl_last_k K``, ``--icrl_instruction none|explore|exploit``.

Puzzles run in groups of ``--batch_problems``, one batched model call per group and round. The run folder
holds ``config.yaml``, ``problems.jsonl`` (one row per finished puzzle: every attempt with its response,
expression, verdict, reward and parse failure; reflections or feedback; calls and tokens) and
``summary.json``. A group's rows are appended together when it ends, so rerunning the command continues with
the first unfinished group (whose puzzles are replayed whole, with the same seeds).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from evaluation import game24
from evaluation.icrl.run import RUNTIME_ONLY_FLAGS, add_usage, read_jsonl
from experiment_args import BackendArguments, UsageError
from llm import make_backend
from llm.base import Backend, Generation
from run_utils import atomic_write_text, check_output_dir, cli, parse_args, resolved_config, save_config

METHODS = ("icrl_preset", "icrl_autonomous", "reflexion", "self_refine", "best_of_n")
TASKS = ("game24",)
SHOWN_REWARDS = ("shown", "hidden", "zero", "random")
INSTRUCTION_CHOICES = ("method", "none", "explore", "exploit")

# ---------------------------------------------------------------------------------------------------
# 1. options
# ---------------------------------------------------------------------------------------------------


@dataclass
class ICRLPromptingArguments:
    """ICRL prompting and its baselines on Game of 24 (evaluation/icrl_prompting.py)."""

    method: str = field(default="icrl_preset", metadata={"help": f"One of {', '.join(METHODS)}."})
    task: str = field(default="game24", metadata={"help": "The task: game24."})
    data_path: str = field(
        default="",
        metadata={
            "help": "ToT's 24.csv, the tree_of_thoughts_llm wheel holding it, or a folder with either "
            "(pip download --no-deps tree-of-thoughts-llm -d DIR). Empty: the installed tot package's."
        },
    )
    ranks: str = field(
        default=game24.HARD_TEST_RANKS,
        metadata={"help": "Puzzle ranks (1-based, as in 24.csv): 901-1000 is the hard test set; e.g. 1-5,1361."},
    )
    max_puzzles: int | None = field(default=None, metadata={"help": "Only the first N puzzles of --ranks."})
    rounds: int = field(default=50, metadata={"help": "Attempts per puzzle, the same for every method (paper: 50)."})
    output_dir: str = field(
        default="runs/icrl_prompting", metadata={"help": "Run folder (rerun the command to resume)."}
    )
    reward: str = field(
        default="binary",
        metadata={"help": "binary (1 solved, else 0) or distance (-min(|value-24|, 24), -30 for misused numbers)."},
    )
    icrl_rewards: str = field(
        default="shown",
        metadata={
            "help": "ICRL ablation: shown, hidden (no reward lines; instructions without rewards), zero "
            "(every reward shown as 0) or random."
        },
    )
    icrl_last_k: int = field(default=0, metadata={"help": "ICRL ablation: show only the last K attempts (0: all)."})
    icrl_instruction: str = field(
        default="method",
        metadata={"help": "ICRL ablation: method (its schedule), none, explore or exploit (every round)."},
    )
    demos: bool = field(default=True, metadata={"help": "Show the paper's five solved demonstrations."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (the paper's code: 0.6)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling (the paper's code: 0.95)."})
    max_tokens: int = field(default=256, metadata={"help": "Token cap of one attempt (the paper's code: 1000)."})
    note_max_tokens: int = field(default=128, metadata={"help": "Token cap of a reflection or a feedback."})
    context_window: int = field(
        default=0,
        metadata={
            "help": "Local backend: prompt + answer tokens allowed (0: the model's positions); the oldest attempts "
            "are left out of a prompt that would not fit."
        },
    )
    batch_problems: int = field(default=8, metadata={"help": "Puzzles run together (one model call a round)."})
    stop_on_success: bool = field(default=True, metadata={"help": "End a puzzle at its first solving attempt."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of --icrl_rewards random."})
    save_prompts: bool = field(default=False, metadata={"help": "Write each attempt's prompt into problems.jsonl."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete an existing run folder first."})

    def __post_init__(self):
        for flag, value, choices in (
            ("method", self.method, METHODS),
            ("task", self.task, TASKS),
            ("reward", self.reward, game24.REWARDS),
            ("icrl_rewards", self.icrl_rewards, SHOWN_REWARDS),
            ("icrl_instruction", self.icrl_instruction, INSTRUCTION_CHOICES),
        ):
            if value not in choices:
                raise UsageError(f"--{flag} {value!r} is not one of {', '.join(choices)}")
        game24.parse_ranks(self.ranks)
        for flag in ("rounds", "max_tokens", "note_max_tokens", "batch_problems"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1")
        if self.max_puzzles is not None and self.max_puzzles < 1:
            raise UsageError("--max_puzzles must be >= 1")
        if self.icrl_last_k < 0 or self.context_window < 0:
            raise UsageError("--icrl_last_k and --context_window must be >= 0 (0: no limit)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("need --temperature >= 0 and 0 < --top_p <= 1")
        ablated = self.icrl_rewards != "shown" or self.icrl_last_k or self.icrl_instruction != "method"
        if ablated and not self.method.startswith("icrl_"):
            raise UsageError(f"--icrl_rewards/--icrl_last_k/--icrl_instruction are ICRL ablations, not {self.method}")
        if self.method == "best_of_n" and self.temperature == 0:
            raise UsageError("--method best_of_n needs --temperature > 0 (greedy samples are all the same)")

    @property
    def run_name(self) -> str:
        """The method with its ablations, as the comparison table shows it."""
        parts = []
        if self.icrl_rewards != "shown":
            parts.append(f"rewards {self.icrl_rewards}")
        if self.icrl_last_k:
            parts.append(f"last {self.icrl_last_k}")
        if self.icrl_instruction != "method":
            parts.append(f"instruction {self.icrl_instruction}")
        return self.method + (f" ({', '.join(parts)})" if parts else "")


# ---------------------------------------------------------------------------------------------------
# 2. prompts (reference B.2: instructions abridged there, completed here; the answer format is game24's)
# ---------------------------------------------------------------------------------------------------

SHOWN = "each showing a candidate Response and the Reward it received"
INSTRUCTIONS = {
    "explore": (
        f"Examine all the <attempt>...</attempt> examples, {SHOWN}. Provide a response that is completely "
        "different for any steps from every single one of the previous attempts, while making sure it correctly "
        "follows the task instruction."
    ),
    "exploit": (
        f"You will be given multiple <attempt>...</attempt> examples, {SHOWN}. Your task: Based on the previous "
        "attempts, try your best to produce a response that can achieve higher rewards."
    ),
    "autonomous": (
        f"You will be given multiple <attempt>...</attempt> examples, {SHOWN}. You have two options. Explore: "
        "provide a response that is completely different for any steps from every single one of the previous "
        "attempts. Exploit: based on the previous attempts, produce a response that can achieve higher rewards. "
        "Pick one option to follow."
    ),
}
# --icrl_rewards hidden: the same instructions with no mention of rewards (the paper's no-reward exploration).
INSTRUCTIONS_NO_REWARD = {
    "explore": (
        "Examine all the <attempt>...</attempt> examples, each showing a candidate Response. Provide a response "
        "that is different from every single one of the previous attempts, while making sure it correctly follows "
        "the task instruction."
    ),
    "exploit": (
        "You will be given multiple <attempt>...</attempt> examples, each showing a candidate Response. Your task: "
        "Based on the previous attempts, try your best to produce a better response."
    ),
    "autonomous": (
        "You will be given multiple <attempt>...</attempt> examples, each showing a candidate Response. You have "
        "two options. Explore: provide a response that is completely different for any steps from every single one "
        "of the previous attempts. Exploit: based on the previous attempts, produce a better response. Pick one "
        "option to follow."
    ),
}
REFLEXION_INSTRUCTION = (
    "Each <reflection> was written after one of your earlier attempts at this input failed. Follow their plans."
)
REFLECT = (
    "The attempt above did not solve the task (its Reward is shown). In a few sentences, diagnose a possible "
    "reason for the failure and devise a concise, revised plan that aims to avoid it. Write the plan after the "
    "keyword 'Plan:'."
)
SELF_REFINE_INSTRUCTION = (
    "Each <attempt> shows an earlier Response to this input and feedback on it. Write an improved Response that "
    "fixes the problems the feedback points out."
)
FEEDBACK = (
    "Give feedback on the Response above: check that each step combines two of the numbers left with correct "
    "arithmetic, and that the Answer uses each of the 4 input numbers exactly once and equals 24. Do not write a "
    "new answer. Put your feedback in <feedback>...</feedback> format."
)
NOTE_CHARS = 1000  # a reflection or feedback longer than this is cut before it goes into prompts


def instruction_kind(args: ICRLPromptingArguments, round_idx: int) -> str | None:
    """Which instruction round ``round_idx`` (0-based) gets; None: no instruction."""
    if not args.method.startswith("icrl_") or args.icrl_instruction == "none":
        return None
    if args.icrl_instruction in ("explore", "exploit"):
        return args.icrl_instruction
    if args.method == "icrl_autonomous":
        return "autonomous"
    return "explore" if round_idx % 2 == 0 else "exploit"  # preset: round 0 explores (paper: round_idx % 2)


def attempt_block(puzzle_text: str, response: str, shown_reward: float | None, feedback: str | None = None) -> str:
    lines = ["<attempt>", game24.question(puzzle_text), f"**Response**: {response}"]
    if feedback is not None:
        lines.append(f"<feedback>{feedback}</feedback>")
    if shown_reward is not None:
        lines.append(f"**Reward**: {game24.format_reward(shown_reward)}")
    return "\n".join(lines + ["</attempt>"])


def answer_prompt(puzzle_text: str, demos: str, blocks: list[str], instruction: str | None) -> str:
    """demos, the method's blocks (past attempts, plans), the instruction with the answer format, the question."""
    parts = ([demos] if demos else []) + blocks
    parts.append(f"<instructions>\n{instruction + ' ' if instruction else ''}{game24.ANSWER_FORMAT}\n</instructions>")
    parts.append(f"<attempt>\n{game24.TASK_LINE}\n{game24.question(puzzle_text)}\n")
    return "\n".join(parts)


def note_prompt(puzzle_text: str, attempt: dict, method: str) -> str:
    """The reflection (reflexion: the attempt with its reward) or feedback (self_refine: no reward) request."""
    if method == "reflexion":
        block, instruction = attempt_block(puzzle_text, attempt["shown_response"], attempt["reward"]), REFLECT
    else:
        block, instruction = attempt_block(puzzle_text, attempt["shown_response"], None), FEEDBACK
    return f"{game24.TASK_LINE}\n{block}\n<instructions>\n{instruction}\n</instructions>\n"


def read_note(text: str, method: str) -> str:
    """The plan after the last 'Plan:' (reflexion) or the <feedback> body (self_refine), else the whole text."""
    note = text.strip()
    if method == "reflexion":
        at = note.lower().rfind("plan:")
        note = note[at + len("plan:") :] if at >= 0 else note
    else:
        start = note.lower().find("<feedback>")
        note = note[start + len("<feedback>") :] if start >= 0 else note
        note = note.split("</feedback>")[0]
    return note.strip()[:NOTE_CHARS]


def shown_reward(args: ICRLPromptingArguments, true_reward: float, rank: int, round_idx: int) -> float | None:
    """What the prompt shows for an attempt: its reward, or the --icrl_rewards ablation's value."""
    if args.icrl_rewards == "hidden":
        return None
    if args.icrl_rewards == "zero":
        return 0.0
    if args.icrl_rewards == "random":
        rng = random.Random(f"{args.seed}/{rank}/{round_idx}")  # a draw per attempt, whatever ran before
        return float(rng.randint(0, 1)) if args.reward == "binary" else round(rng.uniform(-54.0, 0.0), 2)
    return true_reward


# ---------------------------------------------------------------------------------------------------
# 3. one puzzle's state, and the prompt of its next attempt
# ---------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    puzzle: game24.Puzzle
    group: int
    attempts: list[dict] = field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def solved_at(self) -> int | None:
        """The 1-based attempt that first solved the puzzle."""
        return next((i + 1 for i, a in enumerate(self.attempts) if a["verdict"] == "solved"), None)

    def count(self, gen: Generation) -> None:
        self.calls += 1
        self.prompt_tokens += gen.prompt_tokens
        self.completion_tokens += gen.completion_tokens

    def row(self, method: str) -> dict:
        return {
            "rank": self.puzzle.rank,
            "puzzle": self.puzzle.text,
            "group": self.group,
            "method": method,
            "solved": self.solved_at is not None,
            "solved_at": self.solved_at,
            "rewards": [a["reward"] for a in self.attempts],
            "parse_failures": sum(a["parse_failure"] for a in self.attempts),
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "attempts": self.attempts,
        }


def history_blocks(args: ICRLPromptingArguments, problem: Problem) -> tuple[list[str], str | None]:
    """(the blocks the method shows from this puzzle's past, oldest first; the instruction text)."""
    text, attempts = problem.puzzle.text, problem.attempts
    if args.method == "best_of_n":
        return [], None
    if args.method == "reflexion":
        plans = [a["reflection"] for a in attempts if a.get("reflection")]
        return [f"<reflection>\n**Plan**: {plan}\n</reflection>" for plan in plans], (
            REFLEXION_INSTRUCTION if plans else None
        )
    if args.method == "self_refine":
        blocks = [attempt_block(text, a["shown_response"], None, a.get("feedback") or "") for a in attempts]
        return blocks, SELF_REFINE_INSTRUCTION if attempts else None
    shown = attempts[-args.icrl_last_k :] if args.icrl_last_k else attempts
    kind = instruction_kind(args, len(attempts))
    table = INSTRUCTIONS_NO_REWARD if args.icrl_rewards == "hidden" else INSTRUCTIONS
    return [attempt_block(text, a["shown_response"], a["shown_reward"]) for a in shown], table.get(kind)


def fit(build: Callable[[int], str], n: int, count_tokens: Callable[[str], int] | None, budget: int | None):
    """(the prompt showing the most recent m <= n blocks that fits ``budget`` tokens, m). Without a tokenizer
    or budget every block is kept. The oldest go first: the paper keeps all attempts, but a small model's
    window cannot."""
    if count_tokens is None or budget is None or count_tokens(build(n)) <= budget:
        return build(n), n
    low, high = 0, n - 1  # the largest m whose prompt fits (fewer blocks never make a prompt longer)
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(build(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    prompt = build(low)
    if count_tokens(prompt) > budget:
        raise UsageError(
            f"a prompt with no past attempts is {count_tokens(prompt)} tokens, over the {budget} the window leaves "
            "after --max_tokens; lower --max_tokens, raise --context_window or pass --no_demos"
        )
    return prompt, low


# ---------------------------------------------------------------------------------------------------
# 4. one group of puzzles through all rounds
# ---------------------------------------------------------------------------------------------------


def call_seed(args: ICRLPromptingArguments, group: int, round_idx: int, phase: int) -> int:
    """One seed per (group, round, phase): a replayed group samples the same answers."""
    return args.seed + 1_000_003 * group + 2 * round_idx + phase


def as_chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def play_group(
    args: ICRLPromptingArguments,
    backend: Backend,
    problems: list[Problem],
    demos: str,
    count_tokens: Callable[[str], int] | None,
    window: int | None,
    on_round: Callable[[int], None] = lambda r: None,
) -> None:
    """Every round of every puzzle of the group, in place; one batched call per phase and round."""
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    for round_idx in range(args.rounds):
        active = [p for p in problems if not (args.stop_on_success and p.solved_at is not None)]
        if not active:
            break
        on_round(round_idx)
        # 4a. reflexion / self-refine: a note on the last attempt (reflexion: only a failed one)
        if round_idx > 0 and args.method in ("reflexion", "self_refine"):
            writers = [p for p in active if args.method == "self_refine" or p.attempts[-1]["verdict"] != "solved"]
            prompts = [as_chat(note_prompt(p.puzzle.text, p.attempts[-1], args.method)) for p in writers]
            key = "reflection" if args.method == "reflexion" else "feedback"
            gens = backend.generate(
                prompts, max_tokens=args.note_max_tokens, seed=call_seed(args, problems[0].group, round_idx, 1),
                **sampling,
            )  # fmt: skip
            for problem, gen in zip(writers, gens):
                problem.count(gen)
                problem.attempts[-1][key] = read_note(gen.text, args.method)
                problem.attempts[-1][f"{key}_raw"] = gen.text
        # 4b. the attempt
        prompts, shown_counts, budget = [], [], None if window is None else window - args.max_tokens
        for problem in active:
            blocks, instruction = history_blocks(args, problem)

            def build(m: int, text=problem.puzzle.text, blocks=blocks, instruction=instruction) -> str:
                return answer_prompt(text, demos, blocks[len(blocks) - m :], instruction)

            prompt, shown = fit(build, len(blocks), count_tokens, budget)
            prompts.append(prompt)
            shown_counts.append((shown, len(blocks)))
        gens = backend.generate(
            [as_chat(p) for p in prompts], max_tokens=args.max_tokens, stop=["</answer>"],
            seed=call_seed(args, problems[0].group, round_idx, 0), **sampling,
        )  # fmt: skip
        for problem, prompt, (shown, total), gen in zip(active, prompts, shown_counts, gens):
            problem.count(gen)
            verdict = game24.score_response(gen.text, problem.puzzle.numbers)
            true_reward = game24.reward(verdict, args.reward)
            attempt = {
                "round": round_idx,
                "instruction": instruction_kind(args, round_idx),
                "response": gen.text,
                "finish_reason": gen.finish_reason,
                "shown_response": game24.answer_body(gen.text),
                **verdict.to_dict(),
                "parse_failure": verdict.parse_failure,
                "reward": true_reward,
                "shown_reward": shown_reward(args, true_reward, problem.puzzle.rank, round_idx),
                "blocks_shown": shown,
                "blocks_left_out": total - shown,
            }
            if args.save_prompts:
                attempt["prompt"] = prompt
            problem.attempts.append(attempt)


# ---------------------------------------------------------------------------------------------------
# 5. summary
# ---------------------------------------------------------------------------------------------------


def checkpoints(rounds: int) -> list[int]:
    """The rounds the comparison table shows: 1, 2, 4, 8, ... and the last."""
    ks, k = [], 1
    while k < rounds:
        ks.append(k)
        k *= 2
    return ks + [rounds]


def summarize(args: ICRLPromptingArguments, rows: list[dict], total: int, extra: dict) -> dict:
    from evaluation.evaluate import wilson_interval

    n = len(rows)
    curve = []
    for k in range(1, args.rounds + 1):
        solved = sum(r["solved_at"] is not None and r["solved_at"] <= k for r in rows)
        curve.append({"k": k, "solved": solved, "success_rate": solved / n if n else None,
                      "success_ci95": list(wilson_interval(solved, n)) if n else None})  # fmt: skip
    stages = {f"success@{k}": curve[k - 1] for k in checkpoints(args.rounds)} if n else {}
    attempts = [a for r in rows for a in r["attempts"]]
    by_round: dict[int, list[float]] = {}
    for a in attempts:
        by_round.setdefault(a["round"], []).append(a["reward"])
    final = curve[-1]
    return {
        "name": args.run_name,
        "task": args.task,
        "method": args.method,
        "reward": args.reward,
        "rounds": args.rounds,
        "puzzles_done": n,
        "puzzles_total": total,
        "finished": n == total,
        "success_rate": final["success_rate"],
        "success_ci95": final["success_ci95"],
        "success_at": curve,
        "stages": stages,  # what evaluation.compare tabulates
        "attempts": len(attempts),
        "parse_failures": sum(a["parse_failure"] for a in attempts),
        "verdicts": dict(Counter(a["verdict"] for a in attempts)),
        "reward_mean_by_round": [sum(v) / len(v) for _, v in sorted(by_round.items())],
        "blocks_left_out": sum(a["blocks_left_out"] for a in attempts),
        "calls": sum(r["calls"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        **extra,
    }


# ---------------------------------------------------------------------------------------------------
# 6. main
# ---------------------------------------------------------------------------------------------------


def load_finished(path: Path, groups: list[list[game24.Puzzle]]) -> list[dict]:
    """The rows of whole groups (a crash mid-append leaves a partial one: dropped, its puzzles rerun); the
    file is rewritten to them so the next append starts on a clean line. A row whose puzzle is not the one at
    its rank now (another 24.csv) is an error."""
    rows = read_jsonl(path)
    by_group: dict[int, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    kept = []
    for g, group in enumerate(groups):
        done = by_group.get(g, [])
        if [r["rank"] for r in done] != [p.rank for p in group]:
            continue
        for row, puzzle in zip(done, group):
            if row["puzzle"] != puzzle.text:
                raise UsageError(
                    f"{path} has puzzle {row['puzzle']!r} at rank {row['rank']}, --data_path has {puzzle.text!r}; "
                    "pass the same file or --overwrite_output_dir"
                )
        kept += done
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def run(args: ICRLPromptingArguments, backend_args: BackendArguments, backend: Backend | None = None) -> dict:
    """Run (or continue) the experiment; returns the summary. ``backend`` replaces ``make_backend`` (tests)."""
    # 6a. puzzles, run folder, resume
    puzzles = game24.select_puzzles(game24.load_puzzles(args.data_path), args.ranks, args.max_puzzles)
    groups = [puzzles[i : i + args.batch_problems] for i in range(0, len(puzzles), args.batch_problems)]
    output_dir = Path(args.output_dir)
    config = resolved_config(args, backend_args)
    # data_path may move; the puzzles themselves are checked against problems.jsonl
    ignore = (*RUNTIME_ONLY_FLAGS, "save_prompts", "data_path")
    check_output_dir(output_dir, config, overwrite=args.overwrite_output_dir, compare_ignore=ignore)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(output_dir, config)
    rows_path, summary_path = output_dir / "problems.jsonl", output_dir / "summary.json"
    rows = load_finished(rows_path, groups)
    previous_usage = json.loads(summary_path.read_text()).get("backend_usage", {}) if summary_path.exists() else {}

    done_ranks = {r["rank"] for r in rows}
    todo = [(g, group) for g, group in enumerate(groups) if not all(p.rank in done_ranks for p in group)]

    # 6b. backend (not loaded when nothing is left) and the token budget of a prompt
    if backend is None and todo:
        backend = make_backend(backend_args)
    encode = getattr(backend, "encode", None)  # the local backend: exact token counts
    count_tokens = (lambda text: len(encode(as_chat(text)))) if encode is not None else None
    window = args.context_window or getattr(backend, "max_positions", None) or None
    # Demos show rewards where the method's prompts do (ICRL's); the baselines see plain solved examples.
    show_rewards = args.method.startswith("icrl_") and args.icrl_rewards != "hidden"
    demos = game24.demos_text(args.reward, show_rewards) if args.demos else ""
    # The paper's demo "4 9 10 13" is rank 1000: with demos, its solution is in every prompt.
    demo_ranks = sorted(set(game24.DEMO_RANKS) & {p.rank for p in puzzles}) if args.demos else []
    extra = {"demo_ranks_in_selection": demo_ranks}
    if window is not None and count_tokens is not None:
        extra["context_window"] = window
    start = time.perf_counter()

    def write_summary() -> dict:
        usage = add_usage(previous_usage, backend.usage.to_dict() if backend is not None else {})
        summary = summarize(args, rows, len(puzzles), {**extra, "backend_usage": usage})
        summary["timing/session_s"] = round(time.perf_counter() - start, 2)
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        return summary

    # 6c. the groups not finished yet
    bar = tqdm(total=len(puzzles), initial=len(rows), desc=f"{args.method} {args.task}", unit="puzzle")
    try:
        for g, group in todo:
            problems = [Problem(puzzle, g) for puzzle in group]
            progress = f"{sum(r['solved'] for r in rows)}/{len(rows)}"  # solved so far
            play_group(
                args, backend, problems, demos, count_tokens, window,
                on_round=lambda r, s=progress: bar.set_postfix(round=r + 1, solved=s),
            )  # fmt: skip
            new_rows = [p.row(args.method) for p in problems]
            with open(rows_path, "a") as f:  # one write: the group is in the file whole or (cut) dropped on resume
                f.write("".join(json.dumps(r) + "\n" for r in new_rows))
            rows += new_rows
            bar.update(len(new_rows))
            write_summary()
    finally:  # a crash still records what the backend was paid for
        bar.close()
        summary = write_summary()
    return summary


def _model_name_alias(argv: list[str]) -> list[str]:
    """``--model_name_or_path X`` (the training scripts' name) means ``--model X`` here."""
    return [
        "--model" + arg[len("--model_name_or_path") :] if arg.split("=")[0] == "--model_name_or_path" else arg
        for arg in argv
    ]


@cli
def main(argv: list[str] | None = None) -> dict:
    argv = _model_name_alias(list(sys.argv[1:] if argv is None else argv))
    args, backend_args = parse_args((ICRLPromptingArguments, BackendArguments), argv)
    summary = run(args, backend_args)
    rate, ci = summary["success_rate"], summary["success_ci95"]
    shown = "n/a" if rate is None else f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    print(
        f"{summary['name']} on {args.task}: success@{args.rounds} {shown} over {summary['puzzles_done']} puzzles; "
        f"{summary['parse_failures']} of {summary['attempts']} answers unparseable; {summary['calls']} model calls "
        f"-> {args.output_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
