"""Taxi SFT data generation: files, formats, negative examples, reflectors, bad input."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
import yaml

from data_gen.taxi import gen_sft
from data_gen.taxi.reflection import rule_reflection
from envs.prompt import ACTION_HEAD, ANALYZE_HEAD
from envs.taxi import LOCS, TaxiEnv, encode, optimal_actions

NORTH, WEST = 1, 3


def generate(tmp_path, *flags):
    out = tmp_path / "data"
    gen_sft.main(["--output_dir", str(out), "--num_episodes", "12", "--num_test_episodes", "4", *flags])
    return out


def read(path):
    return [json.loads(line) for line in open(path)]


def test_files_round_trip_through_datasets(tmp_path):
    out = generate(tmp_path)
    names = ["sft", "sft_reflection", "sft_policy"]
    for split in ("train", "test"):
        for name in names + [f"{n}_positive" for n in names]:
            ds = datasets.load_dataset("json", data_files=str(out / split / f"{name}.jsonl"), split="train")
            assert {"prompt", "completion", "kind"} <= set(ds.column_names) and len(ds) > 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["files"]["sft"] == len(read(out / "train" / "sft.jsonl"))
    assert yaml.safe_load((out / "config.yaml").read_text())["env"] == "taxi"  # what RL and evaluation inherit
    assert stats["action_labels"] == ["0", "1", "2", "3", "4", "5"]


def test_labels_beyond_the_single_characters_are_a_clear_error():
    from data_gen.writer import to_records
    from envs.base import Observation
    from experiment_args import UsageError

    wide = Observation("a state", [f"action {i}" for i in range(70)])
    with pytest.raises(UsageError, match="70 actions, more than the 62"):
        to_records([dict(obs=wide, reflection="r", label=0, kind="positive", step=0)], episode=0)


def test_sft_refuses_labels_its_tokenizer_would_render_otherwise():
    from envs.base import Observation
    from envs.prompt import policy_prompt
    from experiment_args import UsageError
    from training.models import load_tokenizer
    from training.sft import check_labels

    tokenizer = load_tokenizer("tiny-gpt2")
    obs = Observation("a state", ["go left", "go right", "stay"])
    check_labels([{"prompt": policy_prompt(obs, ["0", "1", "2"])}], tokenizer)  # the canonical labels
    with pytest.raises(UsageError, match="labels its actions 0 2 1"):
        check_labels([{"prompt": policy_prompt(obs, ["0", "2", "1"])}], tokenizer)


def test_views_are_aligned_and_formats_match(tmp_path):
    out = generate(tmp_path)
    plain, refl, policy = (read(out / "train" / f"{n}.jsonl") for n in ("sft", "sft_reflection", "sft_policy"))
    assert len(plain) == len(refl) == len(policy)
    for p, r, q in zip(plain, refl, policy):
        assert p["prompt"].endswith(ACTION_HEAD) and ANALYZE_HEAD not in p["prompt"]
        assert r["prompt"].endswith(ANALYZE_HEAD) and r["completion"]
        # the policy prompt is the reflection prompt + the reflection + the plain prompt's action list
        assert q["prompt"] == r["prompt"] + r["completion"] + p["prompt"][len(r["prompt"]) - len(ANALYZE_HEAD) - 2 :]
        assert p["completion"] == q["completion"] and p["completion"] in "012345"


def test_negative_examples_and_positive_files(tmp_path):
    out = generate(tmp_path, "--negative_rate", "1.0")
    rows = read(out / "train" / "sft_reflection.jsonl")
    negatives = [r for r in rows if r["kind"] == "negative"]
    assert negatives and all("mistake" in r["completion"] for r in negatives)
    positive = read(out / "train" / "sft_reflection_positive.jsonl")
    assert len(positive) == len(rows) - len(negatives) and all(r["kind"] == "positive" for r in positive)
    none = generate(tmp_path / "b", "--negative_rate", "0")
    assert all(r["kind"] == "positive" for r in read(none / "train" / "sft.jsonl"))


def test_swapped_examples_name_another_move_and_stay_in_the_policy_data(tmp_path, capsys):
    flags = ("--negative_rate", "1.0", "--taxi_history", "false")
    plain = generate(tmp_path / "p", *flags)
    out = generate(tmp_path / "s", *flags, "--swap_rate", "1.0")
    policy = read(out / "train" / "sft_policy.jsonl")
    swapped = [r for r in policy if r["kind"] == "swapped"]
    negatives = [r for r in policy if r["kind"] == "negative"]
    assert swapped and len(swapped) <= len(negatives)
    for row in swapped:
        # the label follows the reflection's plan, which is not the oracle's move in that state
        assert f"Best next action: {row['action']}." in row["prompt"]
        fix = next(r for r in negatives if r["prompt"].split(ANALYZE_HEAD)[0] == row["prompt"].split(ANALYZE_HEAD)[0])
        assert fix["action"] != row["action"]
    for name in ("sft", "sft_reflection", "sft_policy_positive"):
        assert all(r["kind"] != "swapped" for r in read(out / "train" / f"{name}.jsonl"))
    assert json.loads((out / "stats.json").read_text())["train"]["steps"]["swapped"] == len(swapped)
    # without swaps the data is the paper's: no swapped rows, and none of the random draws they take
    assert all(r["kind"] != "swapped" for r in read(plain / "train" / "sft_policy.jsonl"))
    with pytest.raises(SystemExit):
        generate(tmp_path / "api", "--swap_rate", "0.5", "--reflector", "api", "--reflector_model", "m")
    assert "--swap_rate needs --reflector rule" in capsys.readouterr().err


def test_labels_are_oracle_actions_even_with_random_moves(tmp_path):
    out = generate(tmp_path, "--random_action_rate", "1.0", "--negative_rate", "0")
    for row in read(out / "train" / "sft_policy.jsonl"):
        assert f"Best next action: {row['action']}." in row["prompt"]


def test_executed_labels_are_the_actions_taken(tmp_path):
    flags = ("--random_action_rate", "0.5", "--negative_rate", "0")
    oracle = read(generate(tmp_path / "o", *flags) / "train" / "sft_policy.jsonl")
    executed = read(generate(tmp_path / "e", *flags, "--label_source", "executed") / "train" / "sft_policy.jsonl")
    # the same trajectories; only the labels of the random steps change
    assert [r["prompt"] for r in oracle] == [r["prompt"] for r in executed]
    changed = sum(a["action"] != b["action"] for a, b in zip(oracle, executed))
    assert 0.2 * len(oracle) < changed < 0.5 * len(oracle)


def test_same_seed_same_data_and_rerun_is_a_noop(tmp_path, capsys):
    out = generate(tmp_path)
    first = (out / "train" / "sft_policy.jsonl").read_text()
    generate(tmp_path)
    assert "nothing to do" in capsys.readouterr().out
    other = generate(tmp_path / "c")
    assert (other / "train" / "sft_policy.jsonl").read_text() == first


def test_rule_reflection_texts():
    env = TaxiEnv(stage="full")
    env.reset(seed=0)
    start = encode(2, 2, 0, 1)  # passenger at R (0, 0); a wall blocks (1, 2) -> (1, 1), so west first
    assert optimal_actions(start) == [WEST]
    assert rule_reflection(env, None, None, start) == (
        "Start. Best next action: move west. The pick-up at (0, 0) is 5 steps away."
    )
    good = rule_reflection(env, start, WEST, encode(2, 1, 0, 1))
    assert good.startswith("'move west' was good: it got closer. Best next action:")
    assert good.endswith("The pick-up at (0, 0) is 4 steps away.")
    bad = rule_reflection(env, start, NORTH, encode(1, 2, 0, 1))
    assert bad.startswith("'move north' was a mistake") and "Best next action: move south." in bad
    picked = rule_reflection(env, encode(*LOCS[0], 0, 1), 4, encode(*LOCS[0], 4, 1))
    assert "picked up the passenger" in picked and "drop-off at (0, 4)" in picked
    # Without history the prompt does not show the last action, so the reflection is the plan alone.
    blind = TaxiEnv(stage="full", history=False)
    assert rule_reflection(blind, start, NORTH, encode(1, 2, 0, 1)) == (
        "Best next action: move south. The pick-up at (0, 0) is 6 steps away."
    )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--taxi_stage", "nowhere"], "--taxi_stage"),
        (["--negative_rate", "1.5"], "--negative_rate"),
        (["--swap_rate", "-0.1"], "--swap_rate"),
        (["--reflector", "gpt"], "--reflector"),
        (["--no_such_flag", "1"], "unknown flag"),
    ],
)
def test_bad_flags_fail_with_one_line(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        gen_sft.main(["--output_dir", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_different_run_in_output_dir_is_refused(tmp_path, capsys):
    out = generate(tmp_path)
    before = (out / "train" / "sft.jsonl").read_text()
    with pytest.raises(SystemExit):
        generate(tmp_path, "--seed", "5")
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "train" / "sft.jsonl").read_text() == before
    generate(tmp_path, "--seed", "5", "--overwrite_output_dir")
    assert (out / "train" / "sft.jsonl").read_text() != before


class FakeChatServer:
    """A loopback OpenAI-compatible chat endpoint that answers 429, then 500, then succeeds."""

    def __init__(self, failures=(429, 500), delay=0.0):
        self.calls, self.failures = 0, list(failures)
        self.in_flight, self.most_in_flight, self.lock = 0, 0, threading.Lock()
        self.seeds = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls += 1
                    outer.in_flight += 1
                    outer.most_in_flight = max(outer.most_in_flight, outer.in_flight)
                    outer.seeds.append(body.get("seed"))
                time.sleep(delay)
                with outer.lock:
                    outer.in_flight -= 1
                if outer.failures:
                    code = outer.failures.pop(0)
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": "try later"}}).encode())
                    return
                spoiler = body["messages"][1]["content"].split("best action you should take next is ")[1]
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"Plan: {spoiler.split(' ---')[0]}."},
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_api_reflector_retries_caches_and_reruns_for_free(tmp_path):
    server = FakeChatServer()
    flags = [
        "--reflector",
        "api",
        "--reflector_api_base",
        server.url,
        "--reflector_model",
        "fake-1",
        "--reflector_cache_dir",
        str(tmp_path / "cache"),
        "--num_episodes",
        "2",
        "--num_test_episodes",
        "0",
    ]
    try:
        out = tmp_path / "api"
        gen_sft.main(["--output_dir", str(out), *flags])
        calls = server.calls
        rows = read(out / "train" / "sft_reflection.jsonl")
        assert rows and all(r["completion"].startswith("Plan: ") for r in rows)
        stats = json.loads((out / "stats.json").read_text())["api"]
        assert stats["retries"] == 2 and stats["completion_tokens"] > 0
        # the same requests again, in a fresh output dir: all from the cache, no server call
        gen_sft.main(["--output_dir", str(tmp_path / "api2"), *flags])
        assert server.calls == calls
    finally:
        server.close()


def test_api_reflector_gives_up_with_a_clear_error(tmp_path, capsys):
    server = FakeChatServer(failures=[503] * 10)
    try:
        with pytest.raises(SystemExit):
            gen_sft.main(
                [
                    "--output_dir",
                    str(tmp_path / "o"),
                    "--reflector",
                    "api",
                    "--reflector_api_base",
                    server.url,
                    "--reflector_max_retries",
                    "1",
                    "--reflector_cache_dir",
                    str(tmp_path / "c"),
                ]
            )
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "failed 2 times" in err and "--reflector_api_base" in err
    assert not (tmp_path / "o").exists()


def test_concurrent_api_reflections_give_the_sequential_data(tmp_path):
    """All of a split's requests go out together, --reflector_concurrency at a time, each with a seed fixed by
    (data seed, split, episode, step); the files equal a one-at-a-time run's byte for byte."""
    server = FakeChatServer(failures=[], delay=0.02)
    flags = ["--reflector", "api", "--reflector_api_base", server.url, "--reflector_model", "fake-1"]
    flags += ["--num_episodes", "4", "--num_test_episodes", "1", "--negative_rate", "0.5"]
    try:
        for n in ("1", "6"):
            gen_sft.main(
                ["--output_dir", str(tmp_path / n), "--reflector_cache_dir", str(tmp_path / f"cache{n}"), *flags]
                + ["--reflector_concurrency", n]
            )
            if n == "1":
                assert server.most_in_flight == 1
                sequential_seeds, server.seeds = server.seeds, []
    finally:
        server.close()
    assert server.most_in_flight > 1
    assert sorted(server.seeds) == sorted(sequential_seeds) and len(set(sequential_seeds)) == len(sequential_seeds)
    for split in ("train", "test"):
        for name in ("sft_reflection", "sft_policy", "sft"):
            one, many = (tmp_path / n / split / f"{name}.jsonl" for n in ("1", "6"))
            assert one.read_bytes() == many.read_bytes()


def test_the_api_key_stays_out_of_errors_data_and_cache(tmp_path, monkeypatch, capsys):
    key = "sk-data-gen-do-not-leak-91f3"
    monkeypatch.setenv("DATA_GEN_TEST_KEY", key)
    flags = ["--reflector", "api", "--reflector_api_key_env", "DATA_GEN_TEST_KEY", "--reflector_model", "fake-1"]
    flags += ["--num_episodes", "1", "--num_test_episodes", "0", "--reflector_cache_dir", str(tmp_path / "cache")]
    server = FakeChatServer(failures=[])
    try:
        gen_sft.main(["--output_dir", str(tmp_path / "ok"), "--reflector_api_base", server.url, *flags])
    finally:
        server.close()
    refused = FakeChatServer(failures=[401])
    try:
        with pytest.raises(SystemExit):
            gen_sft.main(["--output_dir", str(tmp_path / "refused"), "--reflector_api_base", refused.url, *flags])
    finally:
        refused.close()
    err = capsys.readouterr().err
    assert "--reflector_model" in err and "401" in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(key in p.read_text(errors="replace") for p in written)
    assert key not in err


def test_env_dispatch(tmp_path, capsys):
    from data_gen import gen_sft as dispatch

    out = tmp_path / "d"
    dispatch.main(["--env", "taxi", "--output_dir", str(out), "--num_episodes", "2", "--num_test_episodes", "0"])
    assert (out / "train" / "sft.jsonl").exists()
    with pytest.raises(SystemExit):
        dispatch.main(["--env", "frozen_lake", "--output_dir", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert "--env 'frozen_lake'" in err and not (tmp_path / "e").exists()
