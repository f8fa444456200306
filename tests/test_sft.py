"""training.sft on tiny-gpt2: learning, outputs, resume, 8-bit, multi-process, bad input."""

import json
import os
import subprocess

import pytest
import torch
from conftest import accelerate_launch, launch_env
from safetensors.torch import load_file

from data_gen.taxi import gen_sft
from training import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sftdata") / "taxi"
    gen_sft.main(["--output_dir", str(out), "--num_episodes", "40", "--num_test_episodes", "8"])
    return out


def run_sft(data_dir, out, *flags):
    base = [
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "2",
        "--save_steps",
        "1000",
        "--report_to",
        "none",
        "--max_eval_samples",
        "64",
    ]
    return sft.main(base + list(flags))


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_lora_sft_lowers_loss_and_changes_adapter(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "policy"
    results = run_sft(
        data_dir, out, "--role", "policy", "--max_steps", "30", "--learning_rate", "1e-2", "--lora_r", "8"
    )
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    # The random base starts near ln(50257) = 10.8 nats; LoRA alone brings it to ~9.5 within 30 steps.
    assert len(losses) >= 10 and losses[0] > 10.5 and sum(losses[-3:]) / 3 < losses[0] - 0.5
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: any change shows
    for name in ("adapter_config.json", "tokenizer_config.json", "config.yaml", "eval_results.json"):
        assert (out / name).exists(), name
    assert 0.0 <= results["action_accuracy"] <= 1.0 and results["eval_loss"] > 0
    assert {"action_accuracy_positive", "action_accuracy_negative"} <= set(results)


def test_reflector_full_finetune_learns_reflections(data_dir, tmp_path):
    out = tmp_path / "reflector"
    results = run_sft(
        data_dir, out, "--role", "reflector", "--use_peft", "false", "--max_steps", "25", "--learning_rate", "1e-3"
    )
    assert "action_accuracy" not in results
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < losses[0] and results["eval_loss"] < losses[0]
    assert (out / "model.safetensors").exists()


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    flags = [
        "--role",
        "plain",
        "--max_steps",
        "8",
        "--save_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--max_eval_samples",
        "0",
    ]
    full = tmp_path / "full"
    run_sft(data_dir, full, *flags)
    part = tmp_path / "part"
    run_sft(data_dir, part, *flags)
    # simulate a crash after step 4: drop everything written later
    import shutil

    shutil.rmtree(part / "checkpoint-8")
    (part / "eval_results.json").unlink()
    with pytest.raises(SystemExit):  # refusing to silently restart over existing checkpoints
        run_sft(data_dir, part, *flags)
    run_sft(data_dir, part, *flags, "--resume_from_checkpoint", "latest")
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_8bit_lora_sft_runs_on_cpu(data_dir, tmp_path):
    out = tmp_path / "q8"
    results = run_sft(
        data_dir, out, "--role", "plain", "--max_steps", "4", "--load_in_8bit", "--max_eval_samples", "16"
    )
    assert (out / "adapter_model.safetensors").exists() and "action_accuracy" in results


def test_accelerate_launch_two_processes(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        *accelerate_launch(2),
        "-m",
        "training.sft",
        "--role",
        "plain",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--max_eval_samples",
        "16",
        "--logging_steps",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "eval_results.json").read_text())["eval_examples"] == 16


def bad(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        sft.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_bad_inputs(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--output_dir", str(out), "--report_to", "none", "--max_steps", "1"]
    assert "--data_dir" in bad(capsys, ["--data_dir", str(tmp_path / "missing"), *common])
    broken = tmp_path / "broken" / "train"
    broken.mkdir(parents=True)
    (broken / "sft_policy.jsonl").write_text('{"prompt": "a", "completion": "1"}\n{not json\n')
    assert "line 2" in bad(capsys, ["--data_dir", str(broken.parent), *common])
    (broken / "sft_policy.jsonl").write_text('{"prompt": "a"}\n')
    assert "'completion'" in bad(capsys, ["--data_dir", str(broken.parent), *common])
    assert "--model_name_or_path" in bad(
        capsys, ["--data_dir", str(data_dir), "--model_name_or_path", "no-such-model", *common]
    )
    assert "--role" in bad(capsys, ["--data_dir", str(data_dir), "--role", "critic", *common])
    assert not out.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    msg = bad(capsys, ["--data_dir", str(data_dir), "--output_dir", str(other), "--report_to", "none"])
    assert "--output_dir" in msg and (other / "notes.txt").read_text() == "mine"
