"""``make bench``: run the benchmark parts, print one table, write every number as JSON.

    python -m benchmarks.run                      # every part, CPU (CUDA when present), about 10 min on 2 cores
    python -m benchmarks.run --quick              # a smoke run of every part, about 1 min
    python -m benchmarks.run --scaling            # also SFT and RL at 2 processes vs 1 (+2-3 min)
    python -m benchmarks.run --parts peer         # only rl_finetune vs TRL's GRPOTrainer to a success rate (5-7 min)
    python -m benchmarks.run --parts serve        # only the load test of evaluation.serve (~30 s)
    python -m benchmarks.run --memory_model smollm2-135m --output bench.json

Each row of the table is a ratio of two things measured side by side in this run (see each part's module:
``benchmarks.rollout``, ``.memory``, ``.sft``, ``.icrl``, ``.scaling``, ``.peer``, ``.serve_load``), with the
issue's target where
it set one; ``peer`` takes 5-7 of the run's minutes. The JSON
(``benchmarks/results/<timestamp>.json`` unless ``--output``) holds the machine (CPU model, cores, torch
threads, GPU), package versions, the git commit, the settings, each part's wall time and the load average
around it (other work on a shared CPU shows there), and every figure with its raw numbers.
Torch runs on ``--threads`` threads (default 1: on this project's 2-core machines a 128-wide model gains
nothing from a second thread on one sequence, and one busy core makes two threads far slower), except the
rollout part, which runs both of its sides on ``--rollout_threads`` (default: every core this process may
use). The batched side's large products split across cores (2 threads: 213 env steps/s sampled at N=128,
1 thread 138) where one env's small ones hardly do (17.5 vs 17.0).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from experiment_args import UsageError
from run_utils import atomic_write_text, cli, parse_args

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("rollout", "memory", "sft", "icrl", "peer", "serve")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate")


@dataclass
class BenchArguments:
    """Benchmarks (benchmarks/run.py)."""

    output: str = field(default="", metadata={"help": "JSON file to write; default benchmarks/results/<time>.json."})
    quick: bool = field(default=False, metadata={"help": "Small sizes for a ~1 minute smoke run (flags given win)."})
    scaling: bool = field(default=False, metadata={"help": "Also SFT and RL at 2 processes vs 1 (a few minutes)."})
    parts: str = field(
        default=",".join(PARTS), metadata={"help": f"Comma-separated parts to run: {', '.join(PARTS)}."}
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda."})
    threads: int = field(default=1, metadata={"help": "torch threads and OMP_NUM_THREADS (per process)."})
    seed: int = field(default=0, metadata={"help": "Seed of episode starts and sampling."})
    model: str = field(
        default="tiny-gpt2-compact",
        metadata={
            "help": "Model of the rollout, SFT and scaling parts: tiny-gpt2-compact (the demo's) or tiny-gpt2 "
            "(the same network with GPT-2's 50,257-token vocabulary)."
        },
    )
    rollout_envs: str = field(default="8,32,128", metadata={"help": "Numbers of environments stepped in lockstep."})
    rollout_episodes_per_env: int = field(
        default=4,
        metadata={"help": "Rollout: episodes per env (each env starts its next episode when one ends)."},
    )
    rollout_threads: int = field(
        default=0, metadata={"help": "Rollout: torch threads of both sides (0: every core this process may use)."}
    )
    rollout_stage: str = field(default="dropoff", metadata={"help": "Taxi stage of the rollout part."})
    reflection_tokens: int = field(default=32, metadata={"help": "Reflector max_new_tokens in the rollout part."})
    memory_model: str = field(default="tiny-gpt2", metadata={"help": "Model of the memory part (or smollm2-135m)."})
    sft_warmup: int = field(default=3, metadata={"help": "SFT steps before the timed window."})
    sft_steps: int = field(default=10, metadata={"help": "Timed SFT steps."})
    sft_batch_size: int = field(default=16, metadata={"help": "SFT batch size (per process)."})
    icrl_steps: int = field(default=100, metadata={"help": "Approximate ICRL training steps."})
    icrl_test_k: int = field(default=32, metadata={"help": "ICRL test examples (predicted at 3 test steps)."})
    rl_iterations: int = field(default=4, metadata={"help": "Scaling: RL iterations (the first is not timed)."})
    rl_num_envs: int = field(default=16, metadata={"help": "Scaling: RL episodes per iteration (even)."})
    peer_target: float = field(default=0.7, metadata={"help": "Peer: the training success rate to reach."})
    peer_window: int = field(default=64, metadata={"help": "Peer: training episodes in the success average."})
    peer_budget_s: float = field(default=60.0, metadata={"help": "Peer: seconds each run may take to get there."})
    peer_num_envs: int = field(default=32, metadata={"help": "Peer: episodes per iteration, both sides."})
    peer_group_size: int = field(default=4, metadata={"help": "Peer: GRPO group size, both sides."})
    peer_lrs_ours: str = field(default="1e-4,3e-4", metadata={"help": "Peer: learning rates of rl_finetune."})
    peer_lrs_trl: str = field(default="3e-4,1e-3", metadata={"help": "Peer: learning rates of TRL's GRPO."})
    peer_sft_steps: int = field(default=200, metadata={"help": "Peer: SFT steps of the shared start policy."})
    peer_eval_episodes: int = field(default=96, metadata={"help": "Peer: episodes of the final evaluation."})
    serve_clients: str = field(default="1,8,32", metadata={"help": "Serve: numbers of concurrent clients."})
    serve_requests: int = field(default=96, metadata={"help": "Serve: requests sent at each number of clients."})
    serve_max_tokens: int = field(default=16, metadata={"help": "Serve: tokens generated per request (greedy)."})
    work_dir: str = field(default="", metadata={"help": "Keep the runs here; default a temp dir, removed after."})

    def __post_init__(self):
        if self.quick:  # smaller defaults; flags given on the command line keep their values
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in QUICK.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        unknown = set(self.part_list) - set(PARTS)
        if unknown:
            raise UsageError(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
        try:
            sizes = self.env_sizes
        except ValueError:
            raise UsageError(f"--rollout_envs {self.rollout_envs!r} must be comma-separated integers") from None
        if not sizes or min(sizes) < 1:
            raise UsageError("--rollout_envs needs at least one positive number")
        try:
            clients = self.serve_client_counts
        except ValueError:
            raise UsageError(f"--serve_clients {self.serve_clients!r} must be comma-separated integers") from None
        if not clients or min(clients) < 1 or self.serve_requests < 1 or self.serve_max_tokens < 1:
            raise UsageError("--serve_clients needs positive numbers; --serve_requests, --serve_max_tokens positive")
        for name in (
            "threads",
            "rollout_episodes_per_env",
            "reflection_tokens",
            "sft_warmup",
            "sft_steps",
            "sft_batch_size",
            "icrl_steps",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be positive")
        if self.rollout_threads < 0:
            raise UsageError("--rollout_threads must be >= 0 (0: every available core)")
        if self.icrl_test_k < 1 or self.rl_iterations < 2 or self.rl_num_envs % 2:
            raise UsageError("--icrl_test_k must be positive, --rl_iterations >= 2 and --rl_num_envs even")
        for name in ("peer_window", "peer_sft_steps", "peer_eval_episodes"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be positive")
        if self.peer_group_size < 2 or self.peer_num_envs % self.peer_group_size:
            raise UsageError("--peer_group_size must be >= 2 and divide --peer_num_envs")
        if not 0 <= self.peer_target <= 1 or self.peer_budget_s <= 0:
            raise UsageError("--peer_target must be in [0, 1] and --peer_budget_s positive")
        for name in ("peer_lrs_ours", "peer_lrs_trl"):
            try:
                rates = [float(x) for x in getattr(self, name).split(",") if x.strip()]
            except ValueError:
                rates = []
            if not rates or min(rates) <= 0:
                raise UsageError(f"--{name} must be comma-separated positive learning rates")

    @property
    def part_list(self) -> list[str]:
        return [p.strip() for p in self.parts.split(",") if p.strip()]

    @property
    def serve_client_counts(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.serve_clients.split(",") if n.strip())

    @property
    def env_sizes(self) -> list[int]:
        return [int(n) for n in self.rollout_envs.split(",") if n.strip()]

    def learning_rates(self, name: str) -> tuple[float, ...]:
        return tuple(float(x) for x in getattr(self, name).split(",") if x.strip())


QUICK = {
    "rollout_envs": "4,16",
    "reflection_tokens": 16,
    "sft_warmup": 1,
    "sft_steps": 3,
    "icrl_steps": 20,
    "icrl_test_k": 8,
    "rl_iterations": 2,
    "rl_num_envs": 8,
    "peer_window": 32,
    "peer_budget_s": 8.0,
    "peer_num_envs": 16,
    "peer_lrs_ours": "3e-4",
    "peer_lrs_trl": "1e-3",
    "peer_sft_steps": 20,
    "peer_eval_episodes": 16,
    "serve_clients": "1,4",
    "serve_requests": 16,
    "serve_max_tokens": 8,
}


# ---------------------------------------------------------------------------------------------------
# what the numbers were measured on
# ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return info


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------


def table(figures: list) -> str:
    """One line per figure: measured, baseline, ratio (value / baseline), target checks."""
    from benchmarks.common import fmt

    header = ("figure", "measured", "baseline", "ratio", "target")
    rows = [
        (
            f.label,
            f"{fmt(f.value)} {f.unit}",
            f"{fmt(f.baseline)} ({f.baseline_name})",
            f"{f.ratio:.3g}x",
            "; ".join(t.describe() for t in f.targets) or "-",
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def run_parts(args: BenchArguments, device: str, work_dir: Path, report: dict) -> list:
    """Each part in turn; a failing part is recorded (and the run goes on) rather than losing the others."""
    from benchmarks import icrl, memory, peer, rollout, scaling, serve_load, sft
    from benchmarks.common import log

    calls = {
        "rollout": lambda: rollout.run(
            args.env_sizes,
            args.rollout_stage,
            args.reflection_tokens,
            device,
            args.model,
            args.seed,
            args.rollout_episodes_per_env,
            args.rollout_threads or len(os.sched_getaffinity(0)),
        ),
        "memory": lambda: memory.run(args.memory_model, device),
        "sft": lambda: sft.run(
            work_dir / "sft",
            args.sft_warmup,
            args.sft_steps,
            args.sft_batch_size,
            device=device,
            model_name=args.model,
        ),
        "icrl": lambda: icrl.run(
            work_dir / "icrl", args.icrl_steps, args.icrl_test_k, max(args.icrl_steps // 2, 1), device
        ),
        "peer": lambda: peer.run(
            work_dir / "peer",
            args.peer_target,
            args.peer_window,
            args.peer_budget_s,
            args.peer_num_envs,
            args.peer_group_size,
            args.learning_rates("peer_lrs_ours"),
            args.learning_rates("peer_lrs_trl"),
            args.peer_sft_steps,
            args.peer_eval_episodes,
            args.threads,
            device,
            args.seed,
        ),
        "serve": lambda: serve_load.run(
            args.serve_client_counts, args.serve_requests, args.serve_max_tokens, args.model, args.threads
        ),
        "scaling": lambda: scaling.run(
            work_dir / "scaling",
            args.threads,
            args.sft_warmup,
            args.sft_steps,
            args.sft_batch_size,
            args.rl_iterations,
            args.rl_num_envs,
            args.model,
        ),
    }
    names = args.part_list + (["scaling"] if args.scaling else [])
    figures = []
    for name in names:
        log(f"== {name} ==")
        part = {"load_average_before": load_average()}
        start = time.perf_counter()
        try:
            got = calls[name]()
            figures += got
            part["figures"] = [f.key for f in got]
        except Exception as err:  # recorded in the JSON and the exit code
            traceback.print_exc()
            part["error"] = f"{type(err).__name__}: {err}"
        part |= {"wall_s": time.perf_counter() - start, "load_average_after": load_average()}
        report["parts"][name] = part
    return figures


@cli
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((BenchArguments,), argv)
    # Threads first: OMP_NUM_THREADS reaches subprocesses, set_num_threads this one (restored at the end).
    previous_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from benchmarks.common import log

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA device; use --device cpu")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"{stamp}.json"
    report = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(args),
        "machine": machine_info(device),
        "packages": package_versions(),
        "git": git_info(),
        "parts": {},
    }
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
            work_dir.mkdir(parents=True, exist_ok=True)
            figures = run_parts(args, device, work_dir, report)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_omp
    report["wall_s"] = time.perf_counter() - start
    report["figures"] = {f.key: f.to_dict() for f in figures}
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    machine = report["machine"]
    print()
    print(
        f"{machine['cpu_model']}, {machine['cpus_available']} cores, {machine['torch_threads']} torch thread(s), "
        f"device {device}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}; "
        f"commit {(report['git']['commit'] or '?')[:10]}; {report['wall_s']:.0f} s"
    )
    print(table(figures))
    log(f"wrote {output}")
    failed = [name for name, part in report["parts"].items() if "error" in part]
    if failed:
        raise UsageError(f"part(s) {', '.join(failed)} failed (tracebacks above); the others are in {output}")
    return report


if __name__ == "__main__":
    main()
