"""The GPU path: SFT -> RL -> evaluation of tiny-gpt2 on CUDA, in full precision and on an 8-bit base.

Skipped where CUDA is absent (CI and the CPU machines); run on a GPU machine with ``pytest -m gpu``.
"""

import json

import pytest
import torch

from data_gen.taxi import gen_sft
from evaluation import evaluate
from training import rl_finetune, sft

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "data"
    gen_sft.main(["--output_dir", str(out), "--num_episodes", "10", "--num_test_episodes", "2"])
    return out


def _sft(data, out, role, *flags):
    common = ["--data_dir", str(data), "--max_steps", "3", "--per_device_train_batch_size", "4"]
    sft.main(
        ["--role", role, "--output_dir", str(out), *common, *flags, "--report_to", "none", "--max_eval_samples", "8"]
    )
    return out


@pytest.mark.parametrize("quantised", [False, True], ids=["bf16", "8bit"])
def test_sft_rl_eval_on_cuda(data, tmp_path, monkeypatch, quantised):
    flags = ["--load_in_8bit"] if quantised else []
    policy = _sft(data, tmp_path / "policy", "policy", *flags)
    reflector = _sft(data, tmp_path / "reflector", "reflector", *flags)
    devices = {}
    load = rl_finetune.load_players

    def spy(*a, **k):
        players = load(*a, **k)
        devices["load"] = players
        return players

    monkeypatch.setattr(rl_finetune, "load_players", spy)
    out = tmp_path / "rl"
    history = rl_finetune.main(
        [
            "--policy_path", str(policy), "--reflector_path", str(reflector), "--output_dir", str(out),
            "--num_envs", "4", "--iterations", "2", "--save_steps", "1", "--reflection_max_tokens", "8",
            "--report_to", "none", "--minibatch_size", "8",
        ]
    )  # fmt: skip
    params = list(devices["load"].policy_model.parameters())
    assert all(p.device.type == "cuda" for p in params)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in history)
    rl_finetune.main(
        [
            "--policy_path", str(policy), "--reflector_path", str(reflector), "--output_dir", str(out),
            "--num_envs", "4", "--iterations", "3", "--save_steps", "1", "--reflection_max_tokens", "8",
            "--report_to", "none", "--minibatch_size", "8", "--resume_from_checkpoint", "latest",
        ]
    )  # fmt: skip
    assert "cuda" in torch.load(out / "checkpoint-3" / "rng_0.pt", weights_only=False)
    summary = evaluate.main(["--run_dir", str(out), "--output_dir", str(tmp_path / "eval"), "--num_episodes", "4"])
    assert summary["checkpoint"].endswith("checkpoint-3")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
