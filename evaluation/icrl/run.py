"""In-context RL on a classification task (Monea et al. 2024, reference ``../shared/reference/icrl_baselines.md`` A).

    python -m evaluation.icrl --task banking77 --data_dir ../shared/data/banking77 \
        --strategy random_unbiased_only_positive --context_p_keep 0.1 --temperature 1.0 \
        --backend local --model smollm2-135m --train_k 200 --test_every 50 --test_k 100 \
        --output_dir runs/icrl/b77_explorative

The online loop (A.3): at step t, build a context from the episodes so far with the chosen strategy and
a generator seeded ``seed + t``, predict training example t (sampling seed ``seed + t``, decoding over the
labels), reward 1 iff the prediction is the gold label, and store the episode. At step 0, after every
``test_every`` steps and at the last step, the whole test set is predicted with the same step-t context
in one backend call. ``--no_icrl`` is the supervised upper bound: contexts show gold labels, nothing is
predicted on the training examples, and the run stops at the first test step >= max_context_examples.

The run folder holds ``config.yaml``, ``history.jsonl`` (one episode a step, with its context),
``metrics.jsonl`` (per step: train reward, cumulative regret; per test step: test accuracy) and
``summary.json``. Both JSONL files are appended once per step, so rerunning the same command continues
after the last finished step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from evaluation.icrl.context import (
    RANDOM_STRATEGIES,
    SAMPLING_METHODS,
    STRATEGIES,
    ApproximateContexts,
    random_context,
    step_rng,
)
from evaluation.icrl.prompts import build_messages, max_context_examples, shown_feedback
from evaluation.icrl.tasks import TASKS, Task, load_task
from experiment_args import BackendArguments, UsageError
from llm import make_backend
from llm.base import Backend
from run_utils import atomic_write_text, check_output_dir, cli, parse_args, resolved_config, save_config

# Constrained decoding stops at the end of a label, so this is only a cap for a backend that cannot
# constrain (the longest label of the five tasks is about a dozen tokens).
MAX_LABEL_TOKENS = 32
# Flags that cannot change a run's numbers: a resumed run may set them differently.
RUNTIME_ONLY_FLAGS = ("overwrite_output_dir", "concurrency", "timeout", "max_retries", "api_key_env", "cache_dir")


@dataclass
class ICRLArguments:
    """In-context RL on a classification task (evaluation/icrl)."""

    task: str = field(default="banking77", metadata={"help": f"One of {', '.join(TASKS)}."})
    data_dir: str = field(
        default="",
        metadata={"help": "Folder with the data set's release files; empty: load it from the HF hub (network)."},
    )
    output_dir: str = field(default="runs/icrl", metadata={"help": "Run folder (rerun the command to resume)."})
    strategy: str = field(
        default="random_unbiased_only_positive",
        metadata={
            "help": "Context strategy: random_biased_end (Naive), random_biased_end_only_positive (Naive+), "
            "random_unbiased_only_positive (Explorative/Stochastic), random_unbiased (with --no_icrl: upper "
            "bound), approximate_only_positive (Approximate), random_biased_start[_only_positive], ..."
        },
    )
    context_p_keep: float = field(
        default=1.0, metadata={"help": "Probability of keeping each candidate episode (Explorative: 0.1)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature over the labels (Naive+: 2.0)."})
    icrl: bool = field(
        default=True, metadata={"help": "Contexts of predictions and rewards; --no_icrl: gold labels (supervised)."}
    )
    icrl_omit_feedback: bool = field(default=False, metadata={"help": "Show predictions without the feedback."})
    icrl_flip_feedback: bool = field(default=False, metadata={"help": "Invert shown feedback at random."})
    icrl_flip_feedback_prob: float = field(default=0.0, metadata={"help": "Probability of inverting a feedback."})
    max_context_examples: int | None = field(
        default=None,
        metadata={
            "help": "Most episodes in a context (0: zero-shot). Default: what fits --context_window tokens "
            "(local backend; the openai backend needs it given)."
        },
    )
    context_window: int = field(
        default=2048, metadata={"help": "Token window the default max_context_examples is computed for."}
    )
    max_contexts: int = field(default=8, metadata={"help": "Contexts kept by approximate_only_positive."})
    approximate_context_sampling_method: str = field(
        default="uniform", metadata={"help": "How approximate_only_positive picks a context: uniform or exact."}
    )
    train_k: int | None = field(
        default=None, metadata={"help": "Training steps (default 10000; 5000 for trec; at most the split)."}
    )
    test_k: int | None = field(default=None, metadata={"help": "Test examples (default 500)."})
    test_every: int = field(default=500, metadata={"help": "Test after every this many steps (and at 0 and the end)."})
    seed: int = field(default=100, metadata={"help": "Seed of the contexts and of sampling (seed + step)."})
    training_seed: int = field(default=100, metadata={"help": "Seed of the training examples' order."})
    test_seed: int = field(default=100, metadata={"help": "Seed of the test subset."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete an existing run folder first."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise UsageError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not 0.0 <= self.context_p_keep <= 1.0:
            raise UsageError("--context_p_keep must be in [0, 1]")
        if self.temperature < 0:
            raise UsageError("--temperature must be >= 0")
        if self.icrl_flip_feedback and not 0.0 < self.icrl_flip_feedback_prob <= 1.0:
            raise UsageError("--icrl_flip_feedback needs --icrl_flip_feedback_prob in (0, 1]")
        if not self.icrl and RANDOM_STRATEGIES.get(self.strategy, ("", 1))[1] is not None:
            raise UsageError(
                f"--no_icrl has no rewards to filter on; use --strategy random_unbiased (not {self.strategy})"
            )
        if self.max_context_examples is not None and self.max_context_examples < 0:
            raise UsageError("--max_context_examples must be >= 0 (0: zero-shot)")
        if self.context_window <= 0:
            raise UsageError("--context_window must be positive")
        if self.strategy == "approximate_only_positive" and self.max_contexts <= 0:
            raise UsageError("--max_contexts must be positive for approximate_only_positive")
        if self.approximate_context_sampling_method not in SAMPLING_METHODS:
            raise UsageError(f"--approximate_context_sampling_method must be one of {', '.join(SAMPLING_METHODS)}")
        for flag in ("train_k", "test_k", "test_every"):
            value = getattr(self, flag)
            if value is not None and value <= 0:
                raise UsageError(f"--{flag} must be positive")


# ---------------------------------------------------------------------------------------------------
# run folder: append-only JSONL, reloaded on resume
# ---------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The whole rows of a JSONL file; a half-written last line (a crash mid-append) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().split("\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def load_progress(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """(history, metrics) of the finished steps. A step is finished when both files hold its row; a row
    that only one of them holds (a crash between the two appends) is cut, and both files are rewritten
    to the common prefix so the next append lands on a clean line."""
    history = read_jsonl(output_dir / "history.jsonl")
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    n = 0
    while n < min(len(history), len(metrics)) and history[n]["step"] == metrics[n]["step"] == n:
        n += 1
    for name, rows in (("history.jsonl", history), ("metrics.jsonl", metrics)):
        if (output_dir / name).exists():
            atomic_write_text(output_dir / name, "".join(json.dumps(r) + "\n" for r in rows[:n]))
    return history[:n], metrics[:n]


# ---------------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------------


class ContextBuilder:
    """The step-t context under the chosen strategy (random ones are stateless; approximate is replayed)."""

    def __init__(self, args: ICRLArguments, max_examples: int):
        self.args = args
        self.max_examples = max_examples
        self.approximate = None
        if args.strategy == "approximate_only_positive":
            self.approximate = ApproximateContexts(
                args.max_contexts, max_examples, args.context_p_keep, args.approximate_context_sampling_method
            )

    def __call__(self, t: int, feedbacks: list[int | None]) -> tuple[list[int], int | None]:
        """(history indices, picked approximate context or None); ``feedbacks`` holds steps 0..t-1."""
        rng = step_rng(self.args.seed, t)
        if self.approximate is not None:
            index, context = self.approximate.step(t, feedbacks, rng)
            return context, index
        return random_context(feedbacks, rng, self.args.strategy, self.max_examples, self.args.context_p_keep), None


def predict(backend: Backend, task: Task, messages: list[list[dict]], args: ICRLArguments, t: int) -> list[int | None]:
    """Label indices predicted for each prompt (None: the backend could not map the answer to a label)."""
    generations = backend.generate(
        messages,
        max_tokens=MAX_LABEL_TOKENS,
        temperature=args.temperature,
        choices=task.labels,
        seed=args.seed + t,
        prefill=task.prediction_prefix,
    )
    return [g.choice for g in generations]


def steps_to_test(steps: int, test_every: int) -> set[int]:
    return {0, steps - 1} | {t for t in range(steps) if (t + 1) % test_every == 0}


def summarize(args: ICRLArguments, task: Task, history: list[dict], metrics: list[dict], steps: int, extra: dict):
    tests = [m for m in metrics if "test/accuracy" in m]
    rewards = [h["reward"] for h in history if h["reward"] is not None]
    return {
        "name": args.strategy + ("" if args.icrl else " (supervised ICL)"),
        "task": task.name,
        "strategy": args.strategy,
        "icrl": args.icrl,
        "steps_done": len(history),
        "steps_total": steps,
        "finished": len(history) == steps,
        "zero_shot_accuracy": tests[0]["test/accuracy"] if tests and tests[0]["step"] == 0 else None,
        "final_test_accuracy": tests[-1]["test/accuracy"] if tests else None,
        "best_test_accuracy": max((m["test/accuracy"] for m in tests), default=None),
        "test_curve": [[m["step"], m["test/accuracy"]] for m in tests],
        "train_accuracy": sum(rewards) / len(rewards) if rewards else None,
        "regret": sum(1 - r for r in rewards) if args.icrl else None,
        "train_unparsed": sum(h["pred_index"] is None for h in history) if args.icrl else 0,
        "test_unparsed": sum(m.get("test/unparsed", 0) for m in tests),
        **extra,
    }


def add_usage(previous: dict, current: dict) -> dict:
    """Backend usage summed over the sessions of a resumed run (numbers add; anything else is the latest)."""
    out = dict(previous)
    for key, value in current.items():
        old = out.get(key)
        both_numbers = isinstance(value, (int, float)) and isinstance(old, (int, float))
        out[key] = old + value if both_numbers and not isinstance(value, bool) else value
    return out


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def resolve_max_examples(args: ICRLArguments, backend: Backend, task: Task) -> int:
    """``--max_context_examples``, or what fits ``--context_window`` (capped at the model's positions)."""
    if args.max_context_examples is not None:
        return args.max_context_examples
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("--max_context_examples is needed with a remote backend (no local tokenizer to count)")
    window = min(args.context_window, getattr(backend, "max_positions", None) or args.context_window)
    return max_context_examples(tokenizer, task, window, icrl=args.icrl)


def run(args: ICRLArguments, backend_args: BackendArguments, backend: Backend | None = None) -> dict:
    """Run (or continue) the experiment; returns the summary. ``backend`` replaces ``make_backend`` (tests)."""
    # 1. task, run folder, resume
    task = load_task(args.task, args.data_dir, args.train_k, args.test_k, args.training_seed, args.test_seed)
    output_dir = Path(args.output_dir)
    config = resolved_config(args, backend_args)
    check_output_dir(output_dir, config, overwrite=args.overwrite_output_dir, compare_ignore=RUNTIME_ONLY_FLAGS)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(output_dir, config)
    history, metrics = load_progress(output_dir)
    summary_path = output_dir / "summary.json"
    previous_usage = json.loads(summary_path.read_text()).get("backend_usage", {}) if summary_path.exists() else {}

    # 2. backend, context size and schedule
    if backend is None:
        backend = make_backend(backend_args)
    max_examples = resolve_max_examples(args, backend, task)
    zero_shot = max_examples == 0
    steps = 1 if zero_shot else len(task.train)  # zero-shot: one test, no training (as the original)
    tests = steps_to_test(steps, args.test_every)
    if not args.icrl and not zero_shot:  # supervised ICL stops once a context can be full
        steps = min([t for t in sorted(tests) if t >= max_examples], default=steps - 1) + 1
        tests = {t for t in tests if t < steps}
    prompt_options = {"icrl": args.icrl, "omit_feedback": args.icrl_omit_feedback, "zero_shot": zero_shot}
    build_context = ContextBuilder(args, max_examples)
    feedbacks = [h["feedback"] for h in history]
    if build_context.approximate is not None and not zero_shot:  # rebuild its contexts; random ones are stateless
        for t, row in enumerate(history):
            context, _ = build_context(t, feedbacks)
            if context != row["context"]:
                raise UsageError(f"{output_dir}/history.jsonl step {t} does not replay; pass --overwrite_output_dir")

    extra = {"max_context_examples": max_examples, "train_k": len(task.train), "test_k": len(task.test)}

    def write_summary() -> dict:
        usage = backend.usage.to_dict()
        if hasattr(backend, "prefix_tokens_reused"):  # local: prompt tokens served from its prefix KV cache
            usage["prefix_tokens_reused"] = backend.prefix_tokens_reused
            # tokens run to build those caches: prefilled = prompt_tokens - reused + computed
            usage["prefix_tokens_computed"] = backend.prefix_tokens_computed
        usage = add_usage(previous_usage, usage)
        summary = summarize(args, task, history, metrics, steps, {**extra, "backend_usage": usage})
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        return summary

    # 3. the online loop
    regret = sum(1 - h["reward"] for h in history if h["reward"] is not None)
    unparsed = sum(h["pred_index"] is None for h in history) if args.icrl else 0
    test_accuracy = next((m["test/accuracy"] for m in reversed(metrics) if "test/accuracy" in m), math.nan)
    bar = tqdm(total=steps, initial=len(history), desc=f"icrl {task.name}", unit="step", dynamic_ncols=True)
    try:
        for t in range(len(history), steps):
            start = time.perf_counter()
            context, approx_index = ([], None) if zero_shot else build_context(t, feedbacks)
            episodes = [history[i] for i in context]
            text, gold = task.train[t]
            row = {"step": t, "text": text, "gold": task.labels[gold], "gold_index": gold, "context": context}
            if approx_index is not None:
                row["approx_index"] = approx_index
            if args.icrl and not zero_shot:
                [choice] = predict(backend, task, [build_messages(task, episodes, text, **prompt_options)], args, t)
                reward = int(choice == gold)
                flip, flip_prob = args.icrl_flip_feedback, args.icrl_flip_feedback_prob
                feedback, flipped = shown_feedback(reward, args.seed, t, flip, flip_prob)
                # An answer that is no label (rare with constrained decoding) is wrong; the prompt shows "None".
                pred = task.labels[choice] if choice is not None else "None"
                row.update(pred=pred, pred_index=choice, reward=reward, feedback=feedback, flipped=flipped)
                regret += 1 - reward
                unparsed += choice is None
            else:
                row.update(pred=None, pred_index=None, reward=None, feedback=None, flipped=False)
            step_metrics = {"step": t, "context/size": len(context)}
            if args.icrl and not zero_shot:
                step_metrics.update(
                    {"train/reward": row["reward"], "train/regret": regret, "train/unparsed": unparsed}
                )
            if approx_index is not None:
                step_metrics["context/approx_index"] = approx_index
            if t in tests:  # the whole test set with the step-t context, in one call (one shared prefix)
                prompts = [build_messages(task, episodes, x, **prompt_options) for x, _ in task.test]
                choices = predict(backend, task, prompts, args, t)
                step_metrics["test/accuracy"] = sum(c == y for c, (_, y) in zip(choices, task.test)) / len(task.test)
                step_metrics["test/unparsed"] = sum(c is None for c in choices)
            step_metrics["timing/step_s"] = round(time.perf_counter() - start, 4)
            append_jsonl(output_dir / "history.jsonl", row)
            append_jsonl(output_dir / "metrics.jsonl", step_metrics)
            history.append(row)
            metrics.append(step_metrics)
            feedbacks.append(row["feedback"])
            bar.update(1)
            if "test/accuracy" in step_metrics:
                write_summary()
                test_accuracy = step_metrics["test/accuracy"]
            bar.set_postfix(test_acc=f"{test_accuracy:.3f}", regret=regret)
    finally:  # a crash still records what the backend was paid for
        bar.close()
        summary = write_summary()
    return summary


@cli
def main(argv: list[str] | None = None) -> dict:
    args, backend_args = parse_args((ICRLArguments, BackendArguments), argv)
    summary = run(args, backend_args)
    accuracy = summary["final_test_accuracy"]
    print(
        f"{summary['name']} on {summary['task']}: final test accuracy "
        f"{'n/a' if accuracy is None or math.isnan(accuracy) else f'{accuracy:.3f}'}, "
        f"zero-shot {summary['zero_shot_accuracy']}, regret {summary['regret']} -> {args.output_dir}"
    )
    return summary
