"""SFT throughput: ``training.sft`` vs a minimal hand-written training loop of the same model and data.

Both sides train the ``--model`` (tiny-gpt2-compact by default) in full (``--use_peft false``), batch 16,
on the same Taxi SFT file written by ``data_gen.taxi.gen_sft`` into a temp dir, for the role ``policy``
(prompt + reflection -> one label token) and the role ``reflector`` (prompt -> a reflection of a few dozen tokens):

- ``training.sft.main`` runs in this process with the issue's flags and ``--max_steps warmup + steps``.
  Its ``JsonlLogger`` callback is swapped for a subclass that also records when each optimizer step ends
  (``on_step_end``), so the timed window is steps ``warmup+1 .. warmup+steps``: model loading, dataset
  tokenization, the first (warm-up) steps and the final checkpoint and save are all outside it, and the
  trainer's own per-step work (collation, scheduler, gradient clipping, logging) is inside.
- the minimal loop: the trainer's own tokenized rows (``input_ids`` and ``labels`` with -100 on the
  prompt, taken from an SFTTrainer built with the same arguments), right-padded batches in a seeded
  random order, AdamW, and the same loss as ``training.sft``'s trainer: cross-entropy on the completion
  tokens, with the LM head run only at the completion positions (``logits_to_keep``), so the ratio
  measures the framework's overhead, not a different amount of arithmetic. It is timed over the same
  step window.

The figure is samples/s (steps x batch / seconds) and the ratio SFT / minimal loop (target >= 0.7).

``python -m benchmarks.sft ARGS`` runs ``training.sft.main(ARGS)`` with the step clock and writes the
step end times to ``<output_dir>/bench_step_ends.json`` (the scaling part launches it with accelerate).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.common import Figure, log, synchronize
from data_gen.taxi import gen_sft
from experiment_args import ModelArguments, SFTScriptArguments
from training import sft
from training.models import load_model, load_tokenizer

TARGET_RATIO = 0.7  # the trainer keeps at least 70% of a bare loop's throughput
STEP_ENDS_FILE = "bench_step_ends.json"
ROWS_PER_EPISODE = 8  # fewer than any role's rows per Taxi episode (about 18 for the policy files)


def make_data(data_dir: Path, rows_needed: int, seed: int = 0) -> Path:
    """Taxi SFT data (data_gen.taxi.gen_sft defaults) with at least ``rows_needed`` training rows per role."""
    episodes = max(4, -(-rows_needed // ROWS_PER_EPISODE))
    gen_sft.main(
        ["--output_dir", str(data_dir), "--num_episodes", str(episodes), "--num_test_episodes", "1"]
        + ["--seed", str(seed)]
    )
    return data_dir


def sft_argv(role: str, data_dir: Path, output_dir: Path, max_steps: int, batch_size: int, model_name: str) -> list:
    """The issue's training.sft flags."""
    return [
        "--role", role, "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--model_name_or_path", model_name, "--use_peft", "false",
        "--per_device_train_batch_size", str(batch_size), "--max_steps", str(max_steps),
        "--report_to", "none", "--max_eval_samples", "0",
    ]  # fmt: skip


def timed_sft(argv: list[str]) -> list[float]:
    """Run ``training.sft.main(argv)`` in this process; returns perf_counter times at each optimizer step's end."""
    ends: list[float] = []

    class StepClockLogger(sft.JsonlLogger):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())

    # training.sft.main takes no extra callbacks; its logger class is looked up at call time
    with mock.patch.object(sft, "JsonlLogger", StepClockLogger):
        sft.main(argv)
    return ends


def window_rate(ends: list[float], warmup: int, steps: int, samples_per_step: int) -> tuple[float, float]:
    """(samples/s, seconds) over steps warmup+1 .. warmup+steps, from the step end times."""
    if len(ends) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} steps, the clock saw {len(ends)}")
    seconds = ends[warmup + steps - 1] - ends[warmup - 1]
    return steps * samples_per_step / seconds, seconds


def tokenized_rows(rows: list[dict], model_name: str, batch_size: int, work_dir: Path) -> list[dict]:
    """``input_ids`` and ``labels`` of each row exactly as training.sft's trainer tokenizes them."""
    from datasets import Dataset

    from experiment_args import SFTTrainingArguments

    tokenizer = load_tokenizer(model_name)
    model = load_model(ModelArguments(model_name_or_path=model_name, use_peft=False), trainable=True)
    args = SFTTrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=batch_size, report_to="none", disable_tqdm=True
    )
    trainer = sft.make_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
        processing_class=tokenizer,
    )
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def minimal_loop(
    examples: list[dict],
    model_name: str,
    batch_size: int,
    total_steps: int,
    device: str,
    learning_rate: float = 2e-4,
    seed: int = 42,
) -> list[float]:
    """A bare training loop; returns perf_counter times at each optimizer step's end."""
    from transformers import set_seed

    set_seed(seed)
    tokenizer = load_tokenizer(model_name)
    pad_id = tokenizer.pad_token_id
    model = load_model(ModelArguments(model_name_or_path=model_name, use_peft=False), trainable=True).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()  # training.sft's default on a GPU
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    ends = []
    for step in range(total_steps):
        batch = [examples[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        width = max(len(e["input_ids"]) for e in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), right-padded
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T), -100 on prompt and padding
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for b, e in enumerate(batch):
            n = len(e["input_ids"])
            input_ids[b, :n] = torch.tensor(e["input_ids"])
            labels[b, :n] = torch.tensor(e["labels"])
            attention_mask[b, :n] = 1
        input_ids, labels, attention_mask = input_ids.to(device), labels.to(device), attention_mask.to(device)
        keep = sft.completion_positions(labels)  # (K,) positions whose next token is a completion token
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
            ).logits  # (B, K, V)
        targets = labels[:, keep + 1]  # (B, K)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        ends.append(time.perf_counter())
    return ends


def run(
    work_dir: Path,
    warmup: int = 3,
    steps: int = 10,
    batch_size: int = 16,
    roles: tuple[str, ...] = ("policy", "reflector"),
    device: str = "cpu",
    model_name: str = "tiny-gpt2",
) -> list[Figure]:
    """Rows ``sft/{role}``: training.sft samples/s vs the minimal loop's, over the same step window."""
    total = warmup + steps
    log(f"sft: data for {total} steps of {batch_size}")
    data_dir = make_data(work_dir / "data", total * batch_size)
    figures = []
    for role in roles:
        log(f"sft {role}: training.sft, {warmup} warm-up + {steps} timed steps")
        ends = timed_sft(sft_argv(role, data_dir, work_dir / f"sft_{role}", total, batch_size, model_name))
        sft_rate, sft_s = window_rate(ends, warmup, steps, batch_size)
        rows = sft.read_jsonl(SFTScriptArguments(role=role, data_dir=str(data_dir)).data_file("train"), "--data_dir")
        with tempfile.TemporaryDirectory(prefix="bench_tok_", dir=work_dir) as tmp:
            examples = tokenized_rows(rows, model_name, batch_size, Path(tmp))
        log(f"sft {role}: minimal loop, same steps")
        loop_rate, loop_s = window_rate(
            minimal_loop(examples, model_name, batch_size, total, device), warmup, steps, batch_size
        )
        figure = Figure(
            f"sft/{role}",
            f"SFT {role} (training.sft)",
            "samples/s",
            sft_rate,
            loop_rate,
            "minimal AdamW loop",
            raw={
                "role": role,
                "batch_size": batch_size,
                "warmup_steps": warmup,
                "timed_steps": steps,
                "sft_s": sft_s,
                "minimal_loop_s": loop_s,
                "train_rows": len(rows),
                "mean_tokens_per_row": sum(len(e["input_ids"]) for e in examples) / len(examples),
                "mean_completion_tokens_per_row": sum(sum(t != -100 for t in e["labels"]) for e in examples)
                / len(examples),
                "timing": "perf_counter at each optimizer step's end (a trainer callback / the loop itself)",
            },
        ).ratio_target(">=", TARGET_RATIO)
        log(f"sft {role}: {sft_rate:.1f} samples/s vs {loop_rate:.1f} minimal: {figure.ratio:.2f}x")
        figures.append(figure)
    return figures


def main(argv: list[str] | None = None) -> None:
    """``training.sft.main(argv)`` with the step clock; the times go to ``<output_dir>/bench_step_ends.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ends = timed_sft(argv)
    if ends:  # only the main process records them
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        (output_dir / STEP_ENDS_FILE).write_text(json.dumps(ends))


if __name__ == "__main__":
    main()
