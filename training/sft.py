"""Supervised fine-tuning of the reflector or the policy with TRL's SFTTrainer.

    python -m training.sft --role reflector --data_dir data/taxi --output_dir runs/sft_reflector
    python -m training.sft --role policy    --data_dir data/taxi --output_dir runs/sft_policy
    accelerate launch --num_processes 2 -m training.sft --role policy ...      # several GPUs/processes

The data is prompt/completion JSONL from ``data_gen`` and the loss is on the completion only: the
reflection for the reflector, the action label for the policy (the paper's completion-only
collator, section 5). After training the run is scored on the held-out split: completion loss for
every role, and for the action roles the accuracy of the argmax over the admissible labels, computed
by the same ``action_logprobs`` that RL and evaluation use. The run folder holds the adapter (or full
weights with ``--use_peft false``), the tokenizer, ``config.yaml``, ``metrics.jsonl``, TensorBoard
events, ``checkpoint-N/`` and ``eval_results.json`` (written last: its presence marks a finished run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from envs.prompt import action_labels, label_token_ids, prompt_labels
from experiment_args import ModelArguments, SFTScriptArguments, SFTTrainingArguments, UsageError
from run_utils import (
    atomic_write_text,
    check_output_dir,
    cli,
    latest_checkpoint,
    parse_args,
    resolve_resume,
    resolved_config,
    save_config,
)
from training.models import action_logprobs, load_model, load_tokenizer

# Options that define a run; the rest (logging, resume, batch sizes for eval...) may change between
# the first launch and a resumed one.
RUN_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "weight_decay",
    "max_length",
    "bf16",
)


def read_jsonl(path: str, flag: str) -> list[dict]:
    """Rows of a prompt/completion JSONL file; a missing or malformed file is a UsageError."""
    if not Path(path).is_file():
        raise UsageError(f"{path} does not exist; run python -m data_gen.gen_sft --env ENV first or fix {flag}")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path} line {number} is not valid JSON; regenerate it or fix {flag}") from None
            if not (
                isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
            ):
                raise UsageError(f"{path} line {number} needs string 'prompt' and 'completion' fields; fix {flag}")
            rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no examples; fix {flag}")
    return rows


class JsonlLogger(TrainerCallback):
    """Appends every Trainer log (loss, lr, grad norm, eval loss) to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is trained on (union over the batch), shape (K,)."""
    return ((labels[:, 1:] != -100).any(dim=0)).nonzero().squeeze(-1)


def make_trainer_class():
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):
        """SFTTrainer whose LM head runs only where the loss is.

        A Taxi policy example is ~250 prompt tokens and 2 completion tokens (label + EOS); projecting
        every position onto a 50k vocabulary dominated the step time (2.5 s a step of 8 on 2 cores).
        ``logits_to_keep`` with the positions of the completion tokens gives the same loss.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"]  # (B, T), -100 outside the completion
            keep = completion_positions(labels)  # (K,)
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                use_cache=False,
                logits_to_keep=keep,
            )
            logits = outputs.logits.float()  # (B, K, V)
            targets = labels[:, keep + 1]  # (B, K)
            valid = targets != -100
            per_token = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
            )
            num_tokens = valid.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            # as Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages grads
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                n_valid = self.accelerator.gather_for_metrics(valid.sum()).sum()
                hits = ((logits.argmax(-1) == targets) & valid).sum()
                n_hits = self.accelerator.gather_for_metrics(hits).sum()
                self._metrics[mode]["mean_token_accuracy"].append((n_hits / n_valid.clamp(min=1)).item())
            return (loss, outputs) if return_outputs else loss

    return CompletionSFTTrainer


@torch.no_grad()
def action_accuracy(model, tokenizer, rows: list[dict], batch_size: int, max_length: int | None) -> dict:
    """Argmax-over-admissible-labels accuracy on rows whose completion is an action label."""
    model.eval()
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        labels = [prompt_labels(r["prompt"]) for r in batch]
        width = max(len(lab) for lab in labels)
        widest = next(lab for lab in labels if len(lab) == width)
        ids = torch.tensor(label_token_ids(tokenizer, widest))
        logprobs, _ = action_logprobs(
            model, tokenizer, [r["prompt"] for r in batch], [len(lab) for lab in labels], ids, max_length
        )
        predicted = logprobs.argmax(dim=-1).tolist()  # (B,)
        for row, lab, pred in zip(batch, labels, predicted):
            hit = lab.index(row["completion"].strip()) == pred
            correct.setdefault("all", []).append(hit)
            correct.setdefault(row.get("kind", "all"), []).append(hit)
    return {f"action_accuracy_{k}" if k != "all" else "action_accuracy": sum(v) / len(v) for k, v in correct.items()}


def check_labels(rows: list[dict], tokenizer) -> None:
    """The data's action labels must be the ones RL and evaluation will show this tokenizer's model (the
    first n of ``envs.prompt.action_labels(n, tokenizer)``, each a single token); else a clear error."""
    widest = max((prompt_labels(r["prompt"]) for r in rows), key=len, default=[])
    try:
        expected = action_labels(len(widest), tokenizer)
    except ValueError as err:
        raise UsageError(f"--model_name_or_path: {err}") from None
    if widest != expected:
        raise UsageError(
            f"--data_dir labels its actions {' '.join(widest)}, but for this tokenizer RL and evaluation would "
            f"use {' '.join(expected)} (some labels are not single tokens); pick another --model_name_or_path"
        )


@cli
def main(argv: list[str] | None = None) -> dict:
    from accelerate import PartialState
    from datasets import Dataset

    script_args, model_args, train_args = parse_args(
        (SFTScriptArguments, ModelArguments, SFTTrainingArguments), argv, scope="sft"
    )
    state = PartialState()
    output_dir = Path(train_args.output_dir)
    train_rows = read_jsonl(script_args.data_file("train"), "--data_dir")
    test_path = script_args.data_file("test")
    test_rows = read_jsonl(test_path, "--data_dir")[: script_args.max_eval_samples] if Path(test_path).exists() else []

    config = resolved_config(script_args, model_args, ignore=()) | {k: getattr(train_args, k) for k in RUN_KEYS}
    config["world_size"] = state.num_processes
    resume = resolve_resume(output_dir, train_args.resume_from_checkpoint)
    # Every process checks (so all fail alike on bad input); only the main one deletes or writes.
    same_run = (
        check_output_dir(output_dir, config, compare_ignore=("training_args",))
        if not train_args.overwrite_output_dir
        else False
    )
    if same_run and (output_dir / "eval_results.json").exists() and not resume:
        print(f"{output_dir} already holds this finished run; nothing to do (--overwrite_output_dir to redo it)")
        return json.loads((output_dir / "eval_results.json").read_text())
    if same_run and latest_checkpoint(output_dir) and not resume:
        raise UsageError(
            f"{output_dir} holds checkpoints of this run; pass --resume_from_checkpoint latest to continue "
            "or --overwrite_output_dir to start over"
        )
    # Load before writing anything: an unknown or unreachable model must leave no run folder behind.
    set_seed(train_args.seed)  # before the model: a new LoRA's initial weights come from the global RNG
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.cache_dir)
    if script_args.role != "reflector":
        check_labels(train_rows, tokenizer)
    model = load_model(model_args, trainable=True, activation_checkpointing=train_args.activation_checkpointing)
    with state.main_process_first():
        if state.is_main_process:
            check_output_dir(
                output_dir,
                config,
                overwrite=train_args.overwrite_output_dir and not resume,
                compare_ignore=("training_args",),
            )
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(output_dir, config | {"training_args": train_args.to_dict()})

    columns = ("prompt", "completion")
    train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    eval_ds = Dataset.from_list([{k: r[k] for k in columns} for r in test_rows]) if test_rows else None
    trainer = make_trainer_class()(
        model=model,
        args=train_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[JsonlLogger(output_dir / "metrics.jsonl")],
    )
    train_output = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(str(output_dir))

    results: dict = {"train_examples": len(train_rows), "eval_examples": len(test_rows)}
    results["train_loss_mean"] = train_output.training_loss
    results["train_loss_last"] = next(
        (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), train_output.training_loss
    )
    if eval_ds is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
        results |= {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))}
        if script_args.role != "reflector" and state.is_main_process:
            results |= action_accuracy(
                trainer.model, tokenizer, test_rows, train_args.per_device_eval_batch_size, train_args.max_length
            )
    if state.is_main_process:
        atomic_write_text(output_dir / "eval_results.json", json.dumps(results, indent=2))
        print(
            f"saved {output_dir}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
        )
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
