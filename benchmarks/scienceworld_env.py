"""How long a ScienceWorld environment takes: its first reset (the JVM's start), a reset, a step, and the JVM's
memory, with random actions on the test split (README, "ScienceWorld").

    OMP_NUM_THREADS=1 python -m benchmarks.scienceworld_env                       # five tasks, 5 episodes each
    python -m benchmarks.scienceworld_env --tasks boil,find-animal --episodes 2

Needs Java and the scienceworld package (make venv installs it). Prints one line per task.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

DEFAULT_TASKS = "find-non-living-thing,find-animal,use-thermometer,power-component,boil"


def jvm_rss_mb(env) -> int:
    pid = env._sw._gateway.java_process.pid
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scienceworld_env", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated ScienceWorld task names")
    parser.add_argument("--episodes", type=int, default=5, help="random-action episodes per task")
    parser.add_argument("--seed", type=int, default=123_456, help="first episode seed (evaluation's default)")
    args = parser.parse_args(argv)
    from envs.scienceworld_env import ScienceWorldEnv

    rng = random.Random(0)
    rows = []
    for task in args.tasks.split(","):
        env = ScienceWorldEnv([task], split="test")
        start = time.perf_counter()
        env.reset(args.seed)
        first = time.perf_counter() - start
        resets, steps = [], []
        for seed in range(args.seed, args.seed + args.episodes):
            start = time.perf_counter()
            obs = env.reset(seed)
            resets.append(time.perf_counter() - start)
            while not env.done:
                start = time.perf_counter()
                obs, *_ = env.step(rng.randrange(len(obs.actions)))
                steps.append(time.perf_counter() - start)
        row = {
            "task": task,
            "first_reset_s": first,
            "reset_median_s": statistics.median(resets),
            "step_median_s": statistics.median(steps),
            "steps": len(steps),
            "jvm_rss_mb": jvm_rss_mb(env),
        }
        env.close()
        rows.append(row)
        print(
            f"{task}: first reset {first:.1f} s, reset median {row['reset_median_s']:.2f} s, step median "
            f"{row['step_median_s']:.3f} s (n={len(steps)}), JVM RSS {row['jvm_rss_mb']} MB",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
