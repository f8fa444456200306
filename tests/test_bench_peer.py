"""benchmarks/peer.py: the clock, TRL's per-decision groups and position fix by hand, then the part end to end."""

import json
import math

import pytest
import torch

from benchmarks.peer import Clock, Race, StepGroups, positions_from_mask
from benchmarks.run import BenchArguments
from benchmarks.run import main as bench_main
from experiment_args import ModelArguments, UsageError
from training.models import load_model, load_tokenizer
from training.rollout import LMPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def race(**kwargs) -> Race:
    return Race(policy_path="", output_dir="", learning_rate=1e-4, **kwargs)


def test_clock_reaches_the_target_on_the_moving_average():
    clock = Clock(race(target=0.5, window=4, budget_s=1e9))
    clock.add([False, False], env_steps=10, act_rows=10, samples=10)
    assert not clock.update_done()  # 2 episodes: the window of 4 is not full yet
    clock.add([True, True], env_steps=6, act_rows=6, samples=6)
    assert clock.update_done()  # 2 of the last 4
    result = clock.result()
    assert result["reached"] and result["updates"] == 2 and result["episodes"] == 4 and result["env_steps"] == 16
    assert result["seconds"] == clock.curve[-1]["seconds"]


def test_clock_out_of_time_reports_the_budget():
    clock = Clock(race(target=0.9, window=1, budget_s=0.0))
    clock.add([False], env_steps=3, act_rows=3, samples=3)
    assert clock.update_done()
    result = clock.result()
    assert not result["reached"] and result["seconds"] == 0.0 and result["final_moving_success"] == 0.0


@pytest.fixture(scope="module")
def tiny(model_cache):
    model = load_model(ModelArguments(model_name_or_path="tiny-gpt2", use_peft=False), trainable=False)
    return model, load_tokenizer("tiny-gpt2")


def test_left_padding_keeps_the_positions_of_the_prompt_alone(tiny):
    model, tokenizer = tiny
    short, longer = tokenizer("# Action:\n")["input_ids"], tokenizer("# Actions:\n0. move south\n")["input_ids"]
    pad = len(longer) - len(short)
    ids = torch.tensor([[tokenizer.eos_token_id] * pad + short, longer])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(longer)])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]
        shifted = model(input_ids=ids, attention_mask=mask).logits[0, -1]
        hook = model.base_model.register_forward_pre_hook(positions_from_mask, with_kwargs=True)
        fixed = model(input_ids=ids, attention_mask=mask).logits[0, -1]
        hook.remove()
    assert not torch.allclose(shifted, alone, atol=1e-4)  # GPT-2 counts the pads without the hook
    torch.testing.assert_close(fixed, alone, atol=1e-4, rtol=1e-4)


def test_step_groups_give_one_decision_per_sample_in_groups_at_one_state(tiny):
    model, tokenizer = tiny
    settings = race(num_envs=3, group_size=2, window=1)
    clock = Clock(settings)
    groups = StepGroups(LMPolicy(model, tokenizer), settings, clock)
    out = groups(["placeholder"] * 6, trainer=None)
    assert all(len(out[k]) == 6 for k in ("prompt_ids", "completion_ids", "logprobs", "returns"))
    label_ids = set(LMPolicy(model, tokenizer).label_ids([[str(i) for i in range(6)]])[0].tolist())
    for g in range(3):
        assert out["prompt_ids"][2 * g] == out["prompt_ids"][2 * g + 1]  # a group shares its state
    for prompt_ids, completion, logprob, ret in zip(
        *(out[k] for k in ("prompt_ids", "completion_ids", "logprobs", "returns"))
    ):
        prompt = tokenizer.decode(prompt_ids)
        assert "# Analyze:\nBest next action:" in prompt and prompt.endswith("# Action:\n")  # the SFT layout
        assert len(completion) == 1 and completion[0] in label_ids and logprob[0] <= 0
        assert 0.0 <= ret <= 1.0
    assert len(clock.successes) == 3  # the fresh episodes only; continuations are not training episodes
    assert clock.samples == 6 and clock.act_rows > 0
    assert clock.env_steps >= 3 + 3  # each episode's steps, plus at least the one step of each other action


def test_bad_peer_flags():
    with pytest.raises(UsageError, match="--peer_group_size"):
        BenchArguments(parts="peer", peer_num_envs=6, peer_group_size=4)
    with pytest.raises(UsageError, match="--peer_lrs_trl"):
        BenchArguments(parts="peer", peer_lrs_trl="fast")
    assert "peer" in BenchArguments().part_list  # make bench prints every ratio, the peer race included


def test_peer_part_races_both_trainers(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--parts", "peer", "--threads", "1", "--output", str(out), "--work_dir", str(tmp_path / "work")]
    flags += ["--peer_sft_steps", "4", "--peer_budget_s", "1", "--peer_num_envs", "4", "--peer_group_size", "2"]
    flags += ["--peer_window", "4", "--peer_lrs_ours", "1e-4", "--peer_lrs_trl", "1e-4", "--peer_eval_episodes", "4"]
    flags += ["--peer_target", "1.0"]
    bench_main(flags)
    saved = json.loads(out.read_text())
    assert "error" not in saved["parts"]["peer"]
    names = ("time_to_target", "env_steps_to_target", "samples_to_target", "final_sampled_success")
    assert set(saved["figures"]) == {f"peer/{n}" for n in (*names, "final_greedy_success")}
    figure = saved["figures"]["peer/time_to_target"]
    raw = figure["raw"]
    for side in ("ours", "trl"):
        result = raw[side]
        assert len(raw["runs"][side]) == 1 and result["learning_rate"] == 1e-4
        assert result["updates"] >= 1 and result["optimizer_steps"] >= 1  # each trainer took its update steps
        assert result["episodes"] >= 4 and result["env_steps"] >= result["episodes"] and result["samples"] > 0
        assert result["act_rows"] > 0 and math.isfinite(result["weight_change"])
        assert set(result["evaluation"]) == {"sampled", "greedy", "label_mass"}
        if not result["reached"]:
            assert result["seconds"] == 1.0  # out of budget: reported at the budget
    assert figure["value"] == raw["trl"]["seconds"] and figure["baseline"] == raw["ours"]["seconds"]
    # TRL's samples are N x G decisions per generation; its env steps include the continuations
    assert raw["trl"]["samples"] == 8 * raw["trl"]["updates"]
    assert raw["trl"]["env_steps"] > raw["trl"]["episodes"]
    assert raw["trl"]["prompt_token_lengths"] and raw["sft"]["steps"] == 4
