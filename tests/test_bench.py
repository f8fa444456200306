"""Benchmarks (benchmarks/): the pure helpers by hand, then every part of the quick run at tiny sizes."""

import json

import pytest
import torch

from benchmarks.common import Figure, Target
from benchmarks.memory import tensor_bytes
from benchmarks.run import BenchArguments, table
from benchmarks.run import main as bench_main
from benchmarks.scaling import rl_rate
from benchmarks.sft import window_rate
from experiment_args import UsageError


def test_ratio_and_targets():
    figure = (
        Figure("k", "label", "env steps/s", 30.0, 3.0, "sequential").ratio_target(">=", 10).value_target(">=", 100)
    )
    assert figure.ratio == 10.0
    assert [t.passed for t in figure.targets] == [True, False]
    assert Target("ratio", 1.2, "<=", 1.15).describe() == "<=1.15x FAIL"
    line = table([figure]).splitlines()[2]
    assert "10x" in line and ">=10x PASS" in line and ">=100 env steps/s FAIL" in line


def test_window_rate_skips_the_warmup_steps():
    ends = [10.0, 11.0, 11.5, 12.0, 13.0]  # step 1 ends at 10 s (warm-up), steps 2..5 take 3 s
    assert window_rate(ends, warmup=1, steps=4, samples_per_step=16) == (64 / 3.0, 3.0)
    with pytest.raises(RuntimeError, match="expected 6 steps"):
        window_rate(ends, warmup=1, steps=5, samples_per_step=16)


def test_rl_rate_leaves_out_the_first_iteration(tmp_path):
    rows = [
        {"env/steps": 50, "timing/rollout_s": 100.0, "timing/update_s": 100.0},  # warm-up: not counted
        {"env/steps": 30, "timing/rollout_s": 2.0, "timing/update_s": 1.0},
        {"env/steps": 10, "timing/rollout_s": 1.0, "timing/update_s": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = rl_rate(tmp_path / "metrics.jsonl")
    assert got["env_steps_per_s"] == 40 / 5.0 and got["iterations_timed"] == 2


def test_tensor_bytes_counts_a_shared_storage_once():
    a = torch.nn.Linear(4, 4, bias=False)  # 16 floats
    b = torch.nn.Linear(4, 4, bias=False)
    b.weight = a.weight  # tied, as GPT-2's embedding and LM head
    b.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
    assert tensor_bytes([a, b]) == (16 * 4 + 2 * 8, 16)


def test_bad_flags():
    with pytest.raises(UsageError, match="--parts"):
        BenchArguments(parts="rollout,speed")
    with pytest.raises(UsageError, match="--rollout_envs"):
        BenchArguments(rollout_envs="8,x")
    assert BenchArguments(quick=True, rollout_envs="2").rollout_envs == "2"  # flags given win over --quick


def test_quick_run_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--quick", "--threads", "1", "--output", str(out), "--rollout_envs", "2,3", "--reflection_tokens", "4"]
    flags += ["--sft_warmup", "1", "--sft_steps", "1", "--sft_batch_size", "4", "--icrl_steps", "6"]
    flags += ["--icrl_test_k", "3", "--work_dir", str(tmp_path / "work")]
    flags += ["--rollout_threads", "1", "--rollout_episodes_per_env", "2"]
    flags += ["--parts", "rollout,memory,sft,icrl"]  # peer has its own test (tests/test_bench_peer.py)
    threads = torch.get_num_threads()
    report = bench_main(flags)
    assert torch.get_num_threads() == threads  # restored
    saved = json.loads(out.read_text())
    assert saved["figures"].keys() == report["figures"].keys()
    expected = {f"rollout/{kind}/n{n}" for kind in ("sampled", "greedy_memo") for n in (2, 3)}
    expected |= {"memory/two_player_lora", "memory/two_full_copies", "sft/policy", "sft/reflector"}
    expected |= {"icrl/prefill_tokens", "icrl/step_time"}
    if torch.cuda.is_available():
        expected.add("memory/two_player_lora_cuda_peak")
    assert set(saved["figures"]) == expected
    for key, figure in saved["figures"].items():
        assert figure["value"] > 0 and figure["baseline"] > 0, key
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"]), key
    rollout = saved["figures"]["rollout/sampled/n3"]
    assert rollout["raw"]["episodes"] == 6 and rollout["raw"]["drain_episodes"] == 3  # 3 envs over 6 seeds, and 3
    assert rollout["raw"]["torch_threads"] == 1
    # the targets are for sampled reflections at the largest N
    targeted = {key for key, figure in saved["figures"].items() if key.startswith("rollout/") and figure["targets"]}
    assert targeted == {"rollout/sampled/n3"} and len(rollout["targets"]) == 2
    assert saved["figures"]["memory/two_player_lora"]["ratio"] < 1.15  # three adapters cost little on one base
    assert saved["figures"]["memory/two_full_copies"]["ratio"] == pytest.approx(2.0)
    icrl = saved["figures"]["icrl/prefill_tokens"]["raw"]
    assert icrl["reuse"]["prompt_tokens"] == icrl["no_reuse"]["prompt_tokens"]  # the same prompts either way
    machine = saved["machine"]
    assert machine["cpu_cores"] >= 1 and machine["torch_threads"] == 1 and machine["device"] in ("cpu", "cuda")
    assert set(saved["packages"]) == {"torch", "transformers", "peft", "trl", "accelerate"}
    assert all(saved["packages"].values()) and "commit" in saved["git"]
    assert all("error" not in part for part in saved["parts"].values())


@pytest.mark.slow
def test_scaling_two_processes(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--quick", "--parts", "", "--scaling", "--output", str(out), "--sft_batch_size", "4"]
    bench_main(flags)
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"scaling/sft_policy", "scaling/rl"}
    assert all(f["value"] > 0 and f["baseline"] > 0 for f in figures.values())
