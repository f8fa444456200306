"""SFT and RL at 2 processes vs 1 (``--scaling``): data-parallel throughput over accelerate.

Every run is a fresh subprocess with ``OMP_NUM_THREADS`` set to the benchmark's ``--threads``, so one
process uses that many threads and two processes twice as many (on a 2-core CPU: one core vs two).
Two processes start with ``accelerate launch --multi_gpu --num_processes 2`` (the flags of
``tests/conftest.py``'s ``accelerate_launch``): torchrun, and without CUDA each process on the CPU over gloo.
With fewer than 2 GPUs every run of this part is on the CPU (``CUDA_VISIBLE_DEVICES=""``): two processes
cannot share one GPU under NCCL, and 1 vs 2 processes must run on the same kind of device.

- SFT: ``training.sft`` (role policy, the issue's flags) through ``python -m benchmarks.sft``, which records
  each optimizer step's end; samples/s over the steps after the warm-up, counting the per-process batch
  times the number of processes.
- RL: ``training.rl_finetune`` (defaults: PPO with the KL term, reflections sampled at T=1) from the
  1-process SFT policy above and a tiny SFT reflector; env steps/s from its ``metrics.jsonl`` as
  sum(``env/steps``) / sum(``timing/rollout_s`` + ``timing/update_s``) over the iterations after the first.
  ``env/steps`` counts the gathered batch, all processes' episodes.

The ratio is 2 processes / 1 (2.0 would be perfect scaling); no target was set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import Figure, log
from benchmarks.sft import STEP_ENDS_FILE, make_data, sft_argv, timed_sft, window_rate

ROOT = Path(__file__).resolve().parents[1]


def accelerate_launch(num_processes: int) -> list[str]:
    """The command prefix that starts ``num_processes`` processes with accelerate (as tests/conftest.py's).
    --multi_gpu launches torchrun; without CUDA each process runs on the CPU over gloo."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip


def scaling_device() -> str:
    """cuda with at least 2 GPUs (one per process), else cpu: the 1- and 2-process runs use the same kind."""
    import torch

    return "cuda" if torch.cuda.device_count() >= 2 else "cpu"


def launch(module_args: list[str], processes: int, threads: int, log_file: Path, timeout: float = 900) -> None:
    """``python -m MODULE ARGS`` in 1 process, or under accelerate in several; output to ``log_file``."""
    prefix = [sys.executable] if processes == 1 else accelerate_launch(processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if scaling_device() == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # two processes cannot share one GPU under NCCL
    with open(log_file, "w") as out:
        proc = subprocess.run(
            [*prefix, "-m", *module_args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{module_args[0]} with {processes} process(es) failed (log {log_file}):\n{tail}")


def rl_rate(metrics_file: Path) -> dict:
    """env steps/s over the iterations after the first, from an RL run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    timed = rows[1:]
    steps = sum(r["env/steps"] for r in timed)
    seconds = sum(r["timing/rollout_s"] + r["timing/update_s"] for r in timed)
    return {
        "iterations_timed": len(timed),
        "env_steps": steps,
        "rollout_s": sum(r["timing/rollout_s"] for r in timed),
        "update_s": sum(r["timing/update_s"] for r in timed),
        "env_steps_per_s": steps / seconds,
    }


def run(
    work_dir: Path,
    threads: int = 1,
    sft_warmup: int = 2,
    sft_steps: int = 6,
    batch_size: int = 16,
    rl_iterations: int = 4,
    num_envs: int = 16,
    model_name: str = "tiny-gpt2",
) -> list[Figure]:
    """Rows ``scaling/sft_policy`` (samples/s) and ``scaling/rl`` (env steps/s): 2 processes / 1."""
    total = sft_warmup + sft_steps
    data_dir = make_data(work_dir / "data", 2 * total * batch_size)
    sft_runs, sft_raw = {}, {}
    for processes in (1, 2):
        out = work_dir / f"sft_policy_{processes}p"
        log(f"scaling: training.sft policy, {processes} process(es), {sft_warmup} warm-up + {sft_steps} timed steps")
        argv = sft_argv("policy", data_dir, out, total, batch_size, model_name)
        launch(["benchmarks.sft", *argv], processes, threads, work_dir / f"sft_{processes}p.log")
        ends = json.loads((out / STEP_ENDS_FILE).read_text())
        rate, seconds = window_rate(ends, sft_warmup, sft_steps, batch_size * processes)
        sft_runs[processes] = out
        sft_raw[f"{processes}_process"] = {"samples_per_s": rate, "seconds": seconds, "processes": processes}

    log("scaling: a tiny SFT reflector for the RL runs")
    reflector = work_dir / "sft_reflector"
    timed_sft(sft_argv("reflector", data_dir, reflector, 2, batch_size, model_name))
    rl_raw = {}
    for processes in (1, 2):
        out = work_dir / f"rl_{processes}p"
        log(f"scaling: training.rl_finetune, {processes} process(es), {rl_iterations} iterations of {num_envs} envs")
        argv = [
            "--policy_path", str(sft_runs[1]), "--reflector_path", str(reflector), "--output_dir", str(out),
            "--num_envs", str(num_envs), "--iterations", str(rl_iterations), "--reflection_max_tokens", "32",
            "--report_to", "none", "--save_steps", str(rl_iterations),
        ]  # fmt: skip
        launch(["training.rl_finetune", *argv], processes, threads, work_dir / f"rl_{processes}p.log")
        rl_raw[f"{processes}_process"] = rl_rate(out / "metrics.jsonl") | {"processes": processes}

    common = {
        "device": scaling_device(),
        "threads_per_process": threads,
        "model": model_name,
        "batch_size_per_process": batch_size,
    }
    figures = [
        Figure(
            "scaling/sft_policy",
            "SFT policy, 2 processes",
            "samples/s",
            sft_raw["2_process"]["samples_per_s"],
            sft_raw["1_process"]["samples_per_s"],
            "1 process",
            raw=common | {"warmup_steps": sft_warmup, "timed_steps": sft_steps, **sft_raw},
        ),
        Figure(
            "scaling/rl",
            "RL (PPO), 2 processes",
            "env steps/s",
            rl_raw["2_process"]["env_steps_per_s"],
            rl_raw["1_process"]["env_steps_per_s"],
            "1 process",
            raw=common | {"num_envs": num_envs, "iterations": rl_iterations, **rl_raw},
        ),
    ]
    for f in figures:
        log(f"{f.label}: {f.value:.1f} {f.unit} vs {f.baseline:.1f} with 1 process: {f.ratio:.2f}x")
    return figures
