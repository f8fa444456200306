"""In-context RL (evaluation/icrl): loaders, context strategies, prompts, the online loop and its resume.

Everything runs on a fake backend (deterministic choices from a hash of the prompt, every prompt
recorded) and on tiny data files written in the release formats; the real files in ../shared/data are
loaded too when they are there.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from evaluation.icrl import context as ctx
from evaluation.icrl.prompts import (
    ICL_SYSTEM_PROMPT,
    ICRL_SYSTEM_PROMPT,
    build_messages,
    count_tokens,
    experiment_token_counts,
    max_context_examples,
    shown_feedback,
)
from evaluation.icrl.run import ICRLArguments, load_progress, run, steps_to_test
from evaluation.icrl.tasks import Task, load_full, load_task, split_80_20, subsample
from experiment_args import BackendArguments, UsageError
from llm.base import Backend, Generation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------------------------------


class FakeBackend(Backend):
    """Picks a label from a hash of (prompt, seed): deterministic, whatever ran before. Records every call."""

    name = "fake"

    def __init__(self, fail_after_calls: int | None = None, unparsed_every: int = 0):
        super().__init__()
        self.calls: list[dict] = []
        self.fail_after_calls = fail_after_calls
        self.unparsed_every = unparsed_every

    def _generate(self, prompts, *, max_tokens, temperature, top_p, stop, choices, seed, prefill):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls.append({"prompts": prompts, "seed": seed, "choices": choices, "prefill": prefill})
        self._count(requests=len(prompts))
        out = []
        for messages in prompts:
            key = hashlib.sha256(f"{json.dumps(messages)}|{seed}".encode()).digest()
            if self.unparsed_every and key[1] % self.unparsed_every == 0:
                out.append(Generation("???", None))
                self._count(unparsed_choices=1)
            else:
                choice = key[0] % len(choices)
                out.append(Generation(choices[choice], choice))
        return out


class WordTokenizer:
    """One token per whitespace-separated word; no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def tiny_task(n_train: int = 12, n_test: int = 6) -> Task:
    labels = ["alpha", "beta", "gamma"]
    train = [(f"train question {i}", i % 3) for i in range(n_train)]
    test = [(f"test question {i}", i % 3) for i in range(n_test)]
    return Task("tiny", "Query:", "Intent:", labels, train, test)


# ---------------------------------------------------------------------------------------------------
# 1. loaders
# ---------------------------------------------------------------------------------------------------


def test_banking77_release_files(tmp_path):
    (tmp_path / "train.csv").write_text(
        'text,category\nwhere is my card?,card_arrival\n"I lost it, help",lost_or_stolen_card\n'
    )
    (tmp_path / "test.csv").write_text("text,category\nrefund?,Refund_not_showing_up\n")
    labels, train, test = load_full("banking77", str(tmp_path))
    assert labels == ["card arrival", "lost or stolen card", "refund not showing up"]
    assert train == [("where is my card?", 0), ("I lost it, help", 1)]
    assert test == [("refund?", 2)]
    # categories.json fixes the label set even when a split misses a class.
    (tmp_path / "categories.json").write_text(
        json.dumps(["card_arrival", "lost_or_stolen_card", "Refund_not_showing_up", "age_limit"])
    )
    labels, _, test = load_full("banking77", str(tmp_path))
    assert labels[0] == "age limit" and test == [("refund?", 3)]


def test_clinic150_drops_out_of_scope(tmp_path):
    data = {
        "train": [["wake me at 7", "alarm"], ["what is the time", "time"]],
        "val": [["set an alarm", "alarm"]],
        "test": [["time please", "time"], ["play jazz", "oos"]],
        "oos_train": [["a show on broadway", "oos"]],
    }
    (tmp_path / "data_full.json").write_text(json.dumps(data))
    labels, train, test = load_full("clinic150", str(tmp_path))
    assert labels == ["alarm", "time"]
    assert train == [("wake me at 7", 0), ("what is the time", 1)]
    assert test == [("time please", 1)]


def test_trec_coarse_and_fine_labels(tmp_path):
    (tmp_path / "train_5500.label").write_bytes(
        "NUM:date When was Ren\xe9 born ?\nENTY:cremat What films featured Popeye ?\n".encode("iso-8859-1")
    )
    (tmp_path / "TREC_10.label").write_bytes(b"HUM:desc Who is Colin Powell ?\n\n")
    labels, train, test = load_full("trec_coarse", str(tmp_path))
    assert labels == ["abbreviation", "entity", "description", "human", "location", "numeric"]
    assert train == [("When was Ren\xe9 born ?", 5), ("What films featured Popeye ?", 1)]
    labels, train, test = load_full("trec_fine", str(tmp_path))
    assert len(labels) == 50 and labels[0] == "abbreviation abbreviation"
    assert [labels[y] for _, y in train + test] == ["numeric date", "entity creation", "human description"]
    (tmp_path / "TREC_10.label").write_text("XYZ:abc What ?\n")
    with pytest.raises(UsageError, match="TREC_10.label line 1"):
        load_full("trec_fine", str(tmp_path))


def test_nlu_release_csv_is_resplit_80_20(tmp_path):
    header = (
        "userid;answerid;scenario;intent;status;answer_annotation;notes;suggested_entities;answer_normalised;"
        "answer;question"
    )
    rows = [
        f'1;{i};"{s}";"{it}";;"x";;;"norm {i}";"utterance {i}";"q"'
        for i, (s, it) in enumerate([("alarm", "set"), ("iot", "hue_lightchange"), ("alarm", "query")] * 4)
    ]
    (tmp_path / "NLU-Data-Home-Domain-Annotated-All.csv").write_text("\n".join([header, *rows]) + "\n")
    labels, train, test = load_full("nlu", str(tmp_path))
    assert labels == ["alarm query", "alarm set", "iot hue lightchange"]
    assert len(train) == 9 and len(test) == 3  # ceil(20% of 12) = 3
    train_ids, test_ids = split_80_20(12)
    assert [t for t, _ in test] == [f"utterance {i}" for i in test_ids]
    assert dict(train)["utterance 1"] == 2


def test_nlu_cross_validation_layout_keeps_its_split_and_names_a_bad_line(tmp_path):
    header = "answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user"
    for split, rows in {
        "train": {"alarm_set": ["wake me at [time : six]", "set an alarm"], "iot_hue_lightoff": ["lights off"]},
        "test": {"alarm_set": ["alarm for seven"], "iot_hue_lightoff": ["turn the lights off"]},
    }.items():
        (tmp_path / split).mkdir()
        for intent, texts in rows.items():
            scenario, name = intent.split("_", 1)
            lines = [header] + [f'{i};{scenario};{name};"a";"anno {t}";"{t}"' for i, t in enumerate(texts)]
            (tmp_path / split / f"{intent}.csv").write_text("\n".join(lines) + "\n")
    labels, train, test = load_full("nlu", str(tmp_path))
    assert labels == ["alarm set", "iot hue lightoff"]
    assert sorted(train) == [("lights off", 1), ("set an alarm", 0), ("wake me at [time : six]", 0)]
    assert sorted(test) == [("alarm for seven", 0), ("turn the lights off", 1)]  # the release's own split
    with open(tmp_path / "test" / "alarm_set.csv", "a") as f:
        f.write("9;alarm;set;too;few\n")
    with pytest.raises(UsageError, match=r"alarm_set.csv line 3 does not have the header's 6"):
        load_full("nlu", str(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.csv").write_text("x;y\n1;2\n")
    with pytest.raises(UsageError, match="needs the ';'-separated columns scenario, intent"):
        load_full("nlu", str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cross-validation release"):  # an unknown layout lists the expected ones
        load_full("nlu", str(tmp_path / "empty"))


def test_split_80_20_matches_datasets_train_test_split():
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"i": list(range(37))}).train_test_split(test_size=0.2, seed=0)
    train_ids, test_ids = split_80_20(37)
    assert list(train_ids) == split["train"]["i"] and list(test_ids) == split["test"]["i"]


def test_subsample_is_the_originals_shuffle():
    examples = [(str(i), i % 2) for i in range(50)]
    expected = list(examples)
    random.seed(100)
    random.shuffle(expected)
    assert subsample(examples, 7, 10, 100, "--train_k") == expected[:7]
    assert len(subsample(examples, None, 10_000, 100, "--train_k")) == 50  # a default larger than the split
    with pytest.raises(UsageError, match="--train_k 51"):
        subsample(examples, 51, 10, 100, "--train_k")


def test_loader_errors_name_the_flag(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--data_dir.*train.csv"):
        load_full("banking77", str(tmp_path))
    with pytest.raises(UsageError, match="--task"):
        load_full("mnist", str(tmp_path))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="--data_dir"):
        load_full("trec_coarse")


def test_hub_class_names_become_readable_labels(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "coarse_label": datasets.ClassLabel(names=["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]),
            "fine_label": datasets.ClassLabel(names=["ABBR:abb", "NUM:date", "HUM:ind"]),
        }
    )
    split = datasets.Dataset.from_dict(
        {"text": ["When ?", "Who ?"], "coarse_label": [5, 3], "fine_label": [1, 2]}, features=features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"train": split, "test": split})
    labels, train, _ = load_full("trec_fine")
    assert [labels[y] for _, y in train] == ["numeric date", "human individual"]
    labels, train, _ = load_full("trec_coarse")
    assert [labels[y] for _, y in train] == ["numeric", "human"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize(
    "task,folder,n_labels,n_train",
    [
        ("banking77", "banking77", 77, 10_000),
        ("clinic150", "clinc150", 150, 10_000),
        ("trec_coarse", "trec", 6, 5000),
        ("trec_fine", "trec", 50, 5000),
    ],
)
def test_real_release_files(task, folder, n_labels, n_train):
    loaded = load_task(task, str(SHARED / folder))
    assert len(loaded.labels) == n_labels and len(set(loaded.labels)) == n_labels
    assert len(loaded.train) == n_train and len(loaded.test) == 500
    assert {y for _, y in loaded.train} == set(range(n_labels)) or task == "trec_fine"
    assert all(text and " " not in label[:1] for text, _ in loaded.train for label in loaded.labels[:1])


# ---------------------------------------------------------------------------------------------------
# 2. context strategies
# ---------------------------------------------------------------------------------------------------

FEEDBACKS = [1, 0, 1, 1, 0, 1, 0, 1]  # positives at 0, 2, 3, 5, 7


def draw(strategy, max_examples, p_keep=1.0, seed=0, feedbacks=FEEDBACKS):
    return ctx.random_context(feedbacks, np.random.default_rng(seed), strategy, max_examples, p_keep)


def test_biased_strategies_keep_one_end():
    for seed in range(5):  # p_keep 1: no randomness left in which episodes are kept
        assert draw("random_biased_end", 3, seed=seed) == [5, 6, 7]
        assert draw("random_biased_end", 100, seed=seed) == list(range(8))
        assert draw("random_biased_end_only_positive", 3, seed=seed) == [3, 5, 7]
        assert draw("random_biased_end_only_negative", 2, seed=seed) == [4, 6]
        assert draw("random_biased_start", 2, seed=seed) == [0, 1]
        assert draw("random_biased_start_only_positive", 2, seed=seed) == [0, 2]
    for strategy in ctx.RANDOM_STRATEGIES:
        assert draw(strategy, 0) == []  # zero-shot
        assert draw(strategy, 5, feedbacks=[]) == []


def test_unbiased_strategies_draw_chronological_random_subsets():
    seen = set()
    for seed in range(200):
        chosen = draw("random_unbiased", 3, seed=seed)
        assert len(chosen) == 3 and chosen == sorted(chosen) and set(chosen) <= set(range(8))
        seen.add(tuple(chosen))
        positive = draw("random_unbiased_only_positive", 3, p_keep=0.5, seed=seed)
        assert len(positive) <= 3 and positive == sorted(positive) and set(positive) <= {0, 2, 3, 5, 7}
    assert len(seen) > 30  # many different subsets, not one
    # Fresh generator per step: the same seed gives the same draw.
    assert draw("random_unbiased_only_positive", 3, 0.5, seed=7) == draw(
        "random_unbiased_only_positive", 3, 0.5, seed=7
    )
    # p_keep thins the candidates before the cap: about 10% of 1000 positives survive.
    sizes = [len(draw("random_unbiased_only_positive", 10_000, 0.1, s, [1] * 1000)) for s in range(20)]
    assert 80 < np.mean(sizes) < 120


def test_random_context_follows_the_originals_draws():
    # binomial flags over the candidates, then a permutation of the kept ones, then the cap.
    rng = np.random.default_rng(3)
    positives = np.array([0, 2, 3, 5, 7])
    kept = rng.permutation(positives[rng.binomial(1, 0.6, size=5) == 1])
    assert draw("random_unbiased_only_positive", 2, 0.6, seed=3) == sorted(kept[:2].tolist())


def test_approximate_contexts_are_append_only_and_offer_each_positive_once():
    feedbacks = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0]
    approx = ctx.ApproximateContexts(max_contexts=4, max_examples=3, p_keep=0.5)
    before = [[] for _ in range(4)]
    for t in range(len(feedbacks) + 1):
        index, chosen = approx.step(t, feedbacks, ctx.step_rng(100, t))
        assert chosen == approx.contexts[index]
        for old, new in zip(before, approx.contexts):
            assert new[: len(old)] == old  # append-only: a cached prefix stays valid
            assert len(new) - len(old) <= 1
            added = new[len(old) :]
            assert added in ([], [t - 1]) and (not added or feedbacks[t - 1] == 1)  # only the new positive
            assert len(new) <= 3 and len(set(new)) == len(new)  # no duplicates (the original's quirk)
        before = [list(c) for c in approx.contexts]
    assert any(approx.contexts)


def test_approximate_sampling_uniform_and_exact():
    picks = {"uniform": [], "exact": []}
    for method in picks:
        for seed in range(400):
            approx = ctx.ApproximateContexts(max_contexts=4, max_examples=5, p_keep=0.5, sampling=method)
            approx.log_probs = np.log(np.array([0.7, 0.1, 0.1, 0.1]))
            picks[method].append(approx.step(0, [], np.random.default_rng(seed))[0])
    assert abs(np.mean(np.array(picks["uniform"]) == 0) - 0.25) < 0.07
    assert abs(np.mean(np.array(picks["exact"]) == 0) - 0.7) < 0.07
    # exact: a context whose draws were all "keep" with p_keep 0.9 is picked more than one that skipped.
    approx = ctx.ApproximateContexts(max_contexts=2, max_examples=5, p_keep=0.9, sampling="exact")
    approx.step(1, [1], np.random.default_rng(0))
    assert approx.log_probs == pytest.approx([np.log(0.9) if c else np.log(0.1) for c in approx.contexts])


# ---------------------------------------------------------------------------------------------------
# 3. prompts
# ---------------------------------------------------------------------------------------------------

EPISODES = [
    {"text": "where is my card?", "pred": "card arrival", "feedback": 1, "gold": "card arrival"},
    {"text": "I was charged twice", "pred": "exchange rate", "feedback": 0, "gold": "transaction charged twice"},
]


def test_icrl_messages_are_pinned():
    task = Task("banking77", "Query:", "Intent:", ["card arrival"], [], [])
    assert build_messages(task, EPISODES, "can I top up?") == [
        {
            "role": "system",
            "content": "You are an useful assistant. Answer the following questions. Feedback will indicate if you "
            "answered correctly. You must answer correctly, using previous feedback to make better predictions.\n",
        },
        {"role": "user", "content": "Query: where is my card?"},
        {"role": "assistant", "content": "Intent: card arrival"},
        {"role": "user", "content": "'card arrival' is the correct answer! Good job!\n\nQuery: I was charged twice"},
        {"role": "assistant", "content": "Intent: exchange rate"},
        {"role": "user", "content": "The answer 'exchange rate' is wrong! You can do better!\n\nQuery: can I top up?"},
    ]
    assert build_messages(task, EPISODES, "can I top up?", icrl=False) == [
        {"role": "system", "content": "You are an useful assistant. Answer the following questions.\n"},
        {"role": "user", "content": "Query: where is my card?"},
        {"role": "assistant", "content": "Intent: card arrival"},
        {"role": "user", "content": "Query: I was charged twice"},
        {"role": "assistant", "content": "Intent: transaction charged twice"},
        {"role": "user", "content": "Query: can I top up?"},
    ]
    omitted = build_messages(task, EPISODES, "x", omit_feedback=True)
    assert [m["content"] for m in omitted[1:]] == [
        "Query: where is my card?",
        "Intent: card arrival",
        "Query: I was charged twice",
        "Intent: exchange rate",
        "Query: x",
    ]
    assert build_messages(task, [], "x") == [
        {"role": "system", "content": ICRL_SYSTEM_PROMPT},
        {"role": "user", "content": "Query: x"},
    ]
    assert build_messages(task, [], "x", zero_shot=True)[0]["content"] == ICL_SYSTEM_PROMPT


def test_flipped_feedback_uses_the_step_seed():
    assert shown_feedback(1, 100, 5, flip=False, flip_prob=1.0) == (1, False)
    assert shown_feedback(1, 100, 5, flip=True, flip_prob=1.0) == (0, True)
    for t in range(20):
        flips = np.random.default_rng(100 + t).random() < 0.3
        assert shown_feedback(0, 100, t, True, 0.3) == (int(flips), flips)


def test_max_context_examples_is_the_largest_fitting_n_plus_one():
    task = tiny_task()
    task.train.append(("a much longer training question with many many words in it", 0))
    tok = WordTokenizer()
    for budget in (40, 80, 150, 400):
        n = max_context_examples(tok, task, budget)
        # brute force over the same worst-case episodes, longest inputs first
        longest = sorted((t for t, _ in task.train + task.test), key=lambda t: -len(t.split()))
        fits = [
            k
            for k in range(len(longest) + 1)
            if count_tokens(
                tok, build_messages(task, [{"text": x, "pred": "alpha", "feedback": 0} for x in longest[:k]], None)
            )
            <= 0.95 * budget
        ]
        assert n == max(fits) + 1


def test_experiment_token_counts_counts_the_uncached_suffix():
    task = tiny_task()
    history = [
        {"text": "a b", "pred": "alpha", "feedback": 1, "context": []},
        {"text": "c", "pred": "beta", "feedback": 0, "context": [0]},
    ]
    tok = WordTokenizer()
    counts = experiment_token_counts(tok, task, history)
    first = count_tokens(tok, build_messages(task, [], "a b"), "Intent:")
    second = count_tokens(tok, build_messages(task, history[:1], "c"), "Intent:")
    # shared prefix: the system prompt and "user: Query: a b" (the context starts like step 0's prompt)
    system_and_query = len(("system: " + ICRL_SYSTEM_PROMPT + "\n\nuser: Query: a b").split())
    assert counts == {
        "prompt_tokens": first + second,
        "new_prompt_tokens": first + second - system_and_query,
        "steps": 2,
    }


# ---------------------------------------------------------------------------------------------------
# 4. the online loop
# ---------------------------------------------------------------------------------------------------


def write_trec(folder: Path, n_train: int = 14, n_test: int = 5) -> str:
    codes = ["NUM:date", "HUM:ind", "LOC:city", "DESC:def"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_5500.label").write_text("".join(f"{codes[i % 4]} Train question {i} ?\n" for i in range(n_train)))
    (folder / "TREC_10.label").write_text("".join(f"{codes[i % 4]} Test question {i} ?\n" for i in range(n_test)))
    return str(folder)


def icrl_args(tmp_path, **overrides) -> ICRLArguments:
    options = dict(
        task="trec_coarse",
        data_dir=write_trec(tmp_path / "trec"),
        output_dir=str(tmp_path / "run"),
        strategy="random_unbiased_only_positive",
        context_p_keep=0.5,
        max_context_examples=4,
        train_k=12,
        test_k=5,
        test_every=5,
    )
    options.update(overrides)
    return ICRLArguments(**options)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


def test_online_loop_outputs(tmp_path):
    args = icrl_args(tmp_path)
    backend = FakeBackend()
    summary = run(args, BackendArguments(), backend)
    out = Path(args.output_dir)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(12)) and len(history) == 12
    assert [m["step"] for m in metrics if "test/accuracy" in m] == [0, 4, 9, 11] == sorted(steps_to_test(12, 5))
    # one call per training step, plus one call holding all 5 test prompts per test step
    assert len(backend.calls) == 12 + 4 and sorted(len(c["prompts"]) for c in backend.calls)[-4:] == [5] * 4
    assert all(c["prefill"] == "Type:" and c["choices"][0] == "abbreviation" for c in backend.calls)
    test_call = next(c for c in backend.calls[2:] if len(c["prompts"]) == 5)  # after step 0's test
    assert test_call["seed"] == 100 + 4
    # the test prompts share the step's context and end with their own query
    assert len({json.dumps(p[:-1]) for p in test_call["prompts"]}) == 1
    queries = sorted(p[-1]["content"].split("\n\n")[-1] for p in test_call["prompts"])
    assert queries == [f"Question: Test question {i} ?" for i in range(5)]
    # contexts hold only past positive episodes, chronologically, at most 4
    for row in history:
        assert row["context"] == sorted(row["context"]) and len(row["context"]) <= 4
        assert all(i < row["step"] and history[i]["feedback"] == 1 for i in row["context"])
    regret = np.cumsum([1 - h["reward"] for h in history])
    assert [m["train/regret"] for m in metrics] == regret.tolist()
    assert summary["regret"] == regret[-1] and summary["finished"]
    assert summary["zero_shot_accuracy"] == metrics[0]["test/accuracy"]
    assert summary["final_test_accuracy"] == metrics[-1]["test/accuracy"]
    assert summary["backend_usage"]["requests"] == 12 + 4 * 5
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == "random_unbiased_only_positive"
    # rerunning a finished run does nothing new
    again = FakeBackend()
    run(args, BackendArguments(), again)
    assert again.calls == []


@pytest.mark.parametrize("strategy", ["random_unbiased_only_positive", "approximate_only_positive"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, strategy):
    whole = icrl_args(tmp_path, output_dir=str(tmp_path / "whole"), strategy=strategy)
    run(whole, BackendArguments(), FakeBackend())
    parts = icrl_args(tmp_path, output_dir=str(tmp_path / "parts"), strategy=strategy)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(parts, BackendArguments(), FakeBackend(fail_after_calls=9))
    history, _ = load_progress(Path(parts.output_dir))
    assert 0 < len(history) < 12
    # a crash between the two appends leaves a history row without its metrics row: it is redone
    with open(Path(parts.output_dir) / "history.jsonl", "a") as f:
        f.write(json.dumps({**history[-1], "step": len(history)}) + "\n")
    resumed = FakeBackend()
    run(parts, BackendArguments(), resumed)
    assert len(resumed.calls) < 16  # finished steps are not repeated
    for name in ("metrics.jsonl", "history.jsonl"):
        a = strip_timing(json.loads(x) for x in (Path(whole.output_dir) / name).read_text().splitlines())
        b = strip_timing(json.loads(x) for x in (Path(parts.output_dir) / name).read_text().splitlines())
        assert a == b
    summary = json.loads((Path(parts.output_dir) / "summary.json").read_text())
    # usage adds up over the two sessions, the crashed one included
    assert summary["backend_usage"]["requests"] == 7 + 2 * 5 + sum(len(c["prompts"]) for c in resumed.calls)


def test_changed_config_needs_overwrite(tmp_path):
    args = icrl_args(tmp_path, train_k=3)
    run(args, BackendArguments(), FakeBackend())
    with pytest.raises(UsageError, match="--output_dir or --overwrite_output_dir"):
        run(icrl_args(tmp_path, train_k=3, temperature=2.0), BackendArguments(), FakeBackend())
    summary = run(
        icrl_args(tmp_path, train_k=3, temperature=2.0, overwrite_output_dir=True),
        BackendArguments(),
        FakeBackend(),
    )
    assert summary["steps_done"] == 3


def test_supervised_icl_shows_gold_labels_and_stops_early(tmp_path):
    args = icrl_args(tmp_path, icrl=False, strategy="random_unbiased", context_p_keep=1.0, max_context_examples=3)
    backend = FakeBackend()
    summary = run(args, BackendArguments(), backend)
    assert summary["steps_done"] == 5  # the first test step >= 3 is step 4
    assert all(len(c["prompts"]) == 5 for c in backend.calls)  # no predictions on training examples
    history = [json.loads(x) for x in (Path(args.output_dir) / "history.jsonl").read_text().splitlines()]
    last = backend.calls[-1]["prompts"][0]
    assert last[0]["content"] == ICL_SYSTEM_PROMPT
    assert len(history[4]["context"]) == 3
    assert [m["content"] for m in last if m["role"] == "assistant"] == [
        f"Type: {history[i]['gold']}" for i in history[4]["context"]
    ]
    with pytest.raises(UsageError, match="--no_icrl"):
        icrl_args(tmp_path, icrl=False, strategy="random_unbiased_only_positive")


def test_zero_shot_and_unparsed_answers(tmp_path):
    summary = run(icrl_args(tmp_path, max_context_examples=0), BackendArguments(), FakeBackend())
    assert summary["steps_done"] == 1 and summary["zero_shot_accuracy"] is not None
    args = icrl_args(tmp_path, output_dir=str(tmp_path / "unparsed"))
    summary = run(args, BackendArguments(), FakeBackend(unparsed_every=3))
    history = [json.loads(x) for x in (Path(args.output_dir) / "history.jsonl").read_text().splitlines()]
    bad = [h for h in history if h["pred_index"] is None]
    assert bad and all(h["reward"] == 0 and h["pred"] == "None" for h in bad)
    assert summary["train_unparsed"] == len(bad) and summary["test_unparsed"] > 0


@pytest.mark.parametrize(
    "flags,match",
    [
        ({"strategy": "greedy"}, "--strategy"),
        ({"context_p_keep": 1.5}, "--context_p_keep"),
        ({"icrl_flip_feedback": True}, "--icrl_flip_feedback_prob"),
        ({"approximate_context_sampling_method": "best"}, "--approximate_context_sampling_method"),
        ({"test_every": 0}, "--test_every"),
    ],
)
def test_bad_flags(tmp_path, flags, match):
    with pytest.raises(UsageError, match=match):
        icrl_args(tmp_path, **flags)


def test_plot_icrl(tmp_path):
    from visualization.plot_icrl import main as plot_main

    run(icrl_args(tmp_path, output_dir=str(tmp_path / "a")), BackendArguments(), FakeBackend())
    run(
        icrl_args(tmp_path, output_dir=str(tmp_path / "b"), strategy="random_biased_end"),
        BackendArguments(),
        FakeBackend(),
    )
    out = plot_main([str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(tmp_path / "fig")])
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(tmp_path / "trec")])
    assert exit_info.value.code == 2
