"""Shared fixtures: a private model cache for the whole session, tiny-gpt2 built once, ``--runslow``."""

import os
import sys

import pytest


def accelerate_launch(num_processes: int) -> list[str]:
    """The command prefix that starts ``num_processes`` processes with accelerate. --multi_gpu launches
    torchrun; without CUDA each process runs on the CPU over gloo (--cpu would start a single one)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip


def launch_env() -> dict[str, str]:
    """The environment for ``accelerate_launch`` subprocesses: one torch thread each, and on a machine with
    fewer than two GPUs no GPU at all, so both processes run on the CPU over gloo (two ranks on one GPU fail
    with 'invalid device ordinal', seen on a 1-GPU H100)."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of CPU or a large model; run with --runslow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped where it is absent (run with -m gpu on a GPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Point REFLECT_RL_CACHE at a temp dir for every test (and subprocess), so ~/.cache is never written."""
    cache = tmp_path_factory.mktemp("model_cache")
    previous = os.environ.get("REFLECT_RL_CACHE")
    os.environ["REFLECT_RL_CACHE"] = str(cache)
    yield str(cache)
    if previous is None:
        os.environ.pop("REFLECT_RL_CACHE", None)
    else:
        os.environ["REFLECT_RL_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache):
    """The tiny-gpt2 folder, built once per session in the session cache."""
    from training.models import resolve_model_path

    return resolve_model_path("tiny-gpt2")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that load models in a test process: a 128-wide model gains nothing from two torch threads,
    and on a busy machine their barrier waits cost 20x. Use with ``pytest.mark.usefixtures``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_sft_and_rl(data, tmp_path, *rl_flags: str) -> list[dict]:
    """One SFT step of a tiny-gpt2 policy and reflector on ``data``, then one RL iteration of 2 episodes from them
    (in ``tmp_path``/policy, /reflector, /rl); returns RL's metrics. The environment comes from the data."""
    from training import rl_finetune, sft

    common = ["--data_dir", str(data), "--model_name_or_path", "tiny-gpt2", "--use_peft", "false", "--max_steps", "1"]
    common += ["--per_device_train_batch_size", "2", "--report_to", "none", "--max_eval_samples", "2"]
    sft.main(["--role", "policy", "--output_dir", str(tmp_path / "policy"), *common])
    sft.main(["--role", "reflector", "--output_dir", str(tmp_path / "reflector"), *common])
    return rl_finetune.main(
        ["--policy_path", str(tmp_path / "policy"), "--reflector_path", str(tmp_path / "reflector")]
        + ["--output_dir", str(tmp_path / "rl"), "--iterations", "1", "--num_envs", "2", "--report_to", "none"]
        + ["--reflection_max_tokens", "3", *rl_flags]
    )
