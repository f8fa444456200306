"""Load on ``evaluation.serve``: N concurrent clients, requests/s, latency, and every answer matched back.

    python -m benchmarks.serve_load                      # 1, 8 and 32 clients, 96 requests each, tiny-gpt2-compact
    python -m benchmarks.serve_load --clients 1,4 --requests 16 --output load.json

The server runs in its own process, as a user starts it (``python -m evaluation.serve --model M --port 0
--verbose false --max_queue 1024``, torch on ``--threads`` threads), so its event loop and model worker do
not share this process's interpreter with the clients. Each client is a thread with one keep-alive HTTP
connection that sends ``/v1/completions`` requests one after another (greedy, ``--max_tokens``) until the
level's ``--requests`` are sent; request i's prompt carries its id (``ticket 00042``). Before the levels,
each prompt's answer is computed in this process by a ``LocalBackend`` of the same model, one prompt a call.
The untrained tiny models give every prompt the same greedy text, so an answer is identified by its text and
its tokens' log-probs (``logprobs: 0``), which depend on the whole prompt, id included: the reference
answers' log-prob sequences are told apart at 1e-4 (``distinct_reference_answers`` counts them).
Each answer the server sends back is matched to its request's id and checked: ``lost`` (no 200 answer),
``duplicated`` (an id answered twice), ``wrong`` (text or log-probs, within ``TOLERANCE``, not the reference
answer of its id: another request's, or changed by batching). Figures: requests/s at N clients against
1 client (what the queue's batching of concurrent requests buys; the model runs on one worker), with
p50/p99 latency in the raw numbers and the target of zero lost, duplicated or wrong answers.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.common import Figure, Target, fmt, log
from experiment_args import UsageError
from run_utils import atomic_write_text, cli, parse_args

SERVER_PACKAGES = ("fastapi", "starlette", "uvicorn")
TOLERANCE = 1e-4  # log-probs of one answer decoded alone or in a batch differ by float rounding only (~1e-6)


def prompts_for(count: int) -> list[str]:
    """Distinct prompts, each carrying its request id near the end (what the answer depends on most)."""
    return [f"My card was declined at the shop, ticket {i:05d}:" for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def matches(answer: tuple[str, list[float]], reference: tuple[str, list[float]]) -> bool:
    (text, logprobs), (ref_text, ref_logprobs) = answer, reference
    return (
        text == ref_text
        and len(logprobs) == len(ref_logprobs)
        and all(abs(a - b) <= TOLERANCE for a, b in zip(logprobs, ref_logprobs))
    )


def reference_answers(model: str, prompts: list[str], max_tokens: int) -> list[tuple[str, list[float]]]:
    """Each prompt's greedy text and token log-probs, decoded alone; the end token is not in an answer's list."""
    from llm.local import LocalBackend

    backend = LocalBackend(model, batch_size=1, device="cpu")
    out = []
    for prompt in prompts:
        (gen,) = backend.generate([prompt], max_tokens=max_tokens, top_logprobs=0)
        ended = gen.finish_reason == "stop"  # by the end token, the last one (no stop strings are sent)
        out.append((gen.text, gen.token_logprobs[:-1] if ended else gen.token_logprobs))
    return out


def measure(
    url: str,
    model: str,
    prompts: list[str],
    references: list[tuple[str, list[float]]],
    clients: int,
    max_tokens: int,
) -> dict:
    """Send every prompt once through ``clients`` concurrent connections; rates, latencies and the answer check."""
    parsed = urlparse(url)
    path = parsed.path.rstrip("/") + "/completions"
    ids = iter(range(len(prompts)))
    ids_lock = threading.Lock()
    answers: dict[int, list[tuple[str, list[float]]]] = {}
    latencies: list[float] = []
    errors: list[str] = []
    record_lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
        while True:
            with ids_lock:
                i = next(ids, None)
            if i is None:
                break
            body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
            start = time.perf_counter()
            try:
                connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = json.loads(response.read())
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                connection.close()  # reconnects on the next request
                with record_lock:
                    errors.append(f"{i}: {type(err).__name__}: {err}")
                continue
            seconds = time.perf_counter() - start
            with record_lock:
                if response.status == 200:
                    choice = payload["choices"][0]
                    answers.setdefault(i, []).append((choice["text"], choice["logprobs"]["token_logprobs"]))
                    latencies.append(seconds)
                else:
                    errors.append(f"{i}: {response.status} {payload}")
        connection.close()

    threads = [threading.Thread(target=client, name=f"load-client-{c}") for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    wrong = [i for i, got in answers.items() if not all(matches(answer, references[i]) for answer in got)]
    gaps = [
        abs(a - b) for i, got in answers.items() for text, logprobs in got for a, b in zip(logprobs, references[i][1])
    ]
    return {
        "clients": clients,
        "requests": len(prompts),
        "answered": len(answers),
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else float("nan"),
        "lost": len(prompts) - len(answers),
        "duplicated": sum(len(got) > 1 for got in answers.values()),
        "wrong": len(wrong),
        "wrong_ids": wrong[:10],
        "max_logprob_gap": max(gaps, default=0.0),  # answer vs reference, same token
        "errors": errors[:10],
    }


def distinct(references: list[tuple[str, list[float]]]) -> int:
    """How many references no other one matches (a swapped answer between two of them would be caught)."""
    return sum(not any(matches(r, o) for j, o in enumerate(references) if j != i) for i, r in enumerate(references))


def start_server(model: str, threads: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    """``python -m evaluation.serve`` on a free port; the process and its base URL once it serves."""
    command = [sys.executable, "-m", "evaluation.serve", "--model", model, "--served_name", "load", "--port", "0"]
    command += ["--verbose", "false", "--max_queue", str(max_queue)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        found = re.search(r" at (http://\S+/v1) ", line)
        if found:
            return process, found.group(1)
    process.wait()
    raise RuntimeError(f"the server exited ({process.returncode}) before serving; its stderr is above")


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl-C: the server finishes what is in flight and exits."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run(
    clients: tuple[int, ...] = (1, 8, 32),
    requests: int = 96,
    max_tokens: int = 16,
    model: str = "tiny-gpt2-compact",
    threads: int = 1,
) -> list[Figure]:
    """Rows ``serve/n{N}``: requests/s at N concurrent clients against 1 client (or the fewest asked for)."""
    import torch

    prompts = prompts_for(requests)
    log(f"serve: reference answers of {requests} prompts, one at a time in this process")
    references = reference_answers(model, prompts, max_tokens)
    process, url = start_server(model, threads, max_queue=max(1024, 2 * max(clients)))
    try:
        measure(url, "load", prompts[:4], references[:4], 1, max_tokens)  # warm-up, untimed
        levels = {}
        for n in clients:
            level = measure(url, "load", prompts, references, n, max_tokens)
            levels[n] = level
            log(
                f"serve N={n}: {level['requests_per_s']:.1f} req/s, p50 {1000 * level['p50_latency_s']:.0f} ms, "
                f"p99 {1000 * level['p99_latency_s']:.0f} ms; lost {level['lost']}, duplicated "
                f"{level['duplicated']}, wrong {level['wrong']}"
            )
    finally:
        stop_server(process)
    base = min(clients)
    raw_common = {
        "model": model,
        "max_tokens": max_tokens,
        "server_threads": threads,
        "distinct_reference_answers": distinct(references),
        "client_torch_threads": torch.get_num_threads(),
        "server_packages": {name: metadata.version(name) for name in SERVER_PACKAGES},
    }
    figures = []
    for n, level in levels.items():
        bad = level["lost"] + level["duplicated"] + level["wrong"]
        figure = Figure(
            f"serve/n{n}",
            f"serve load, {n} client{'s' if n > 1 else ''}",
            "req/s",
            level["requests_per_s"],
            levels[base]["requests_per_s"],
            f"{base} client{'s' if base > 1 else ''}",
            raw=raw_common | level,
        )
        figure.targets.append(Target("bad answers", bad, "<=", 0))
        figures.append(figure)
    return figures


@dataclass
class ServeLoadArguments:
    """Flags of ``python -m benchmarks.serve_load``."""

    clients: str = field(default="1,8,32", metadata={"help": "Comma-separated numbers of concurrent clients."})
    requests: int = field(default=96, metadata={"help": "Requests sent at each number of clients."})
    max_tokens: int = field(default=16, metadata={"help": "Tokens generated per request (greedy)."})
    model: str = field(default="tiny-gpt2-compact", metadata={"help": "Model the server serves."})
    threads: int = field(default=1, metadata={"help": "Torch threads of the server (its OMP_NUM_THREADS)."})
    output: str = field(default="", metadata={"help": "JSON to write; default benchmarks/results/serve_load-<time>."})

    def __post_init__(self):
        try:
            counts = self.client_counts
        except ValueError:
            raise UsageError(f"--clients {self.clients!r} must be comma-separated integers") from None
        if not counts or min(counts) < 1:
            raise UsageError("--clients needs at least one positive number")
        for name in ("requests", "max_tokens", "threads"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be positive")

    @property
    def client_counts(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.clients.split(",") if n.strip())


@cli
def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import ROOT, git_info, load_average, machine_info, package_versions, table

    (args,) = parse_args((ServeLoadArguments,), argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"serve_load-{stamp}.json"
    report = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": asdict(args),
        "machine": machine_info("cpu"),
        "packages": package_versions() | {name: metadata.version(name) for name in SERVER_PACKAGES},
        "git": git_info(),
        "load_average_before": load_average(),
    }
    start = time.perf_counter()
    figures = run(args.client_counts, args.requests, args.max_tokens, args.model, args.threads)
    report |= {"wall_s": time.perf_counter() - start, "load_average_after": load_average()}
    report["figures"] = {f.key: f.to_dict() for f in figures}
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    print()
    print(table(figures))
    for f in figures:
        print(f"{f.label}: p50 {fmt(1000 * f.raw['p50_latency_s'])} ms, p99 {fmt(1000 * f.raw['p99_latency_s'])} ms")
    log(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
