"""Memory of the two players: three LoRA adapters on one base vs one model, and two full copies vs one model.

Three setups of the same model (``--memory_model``; tiny-gpt2 by default), each loaded on its own:

- one model: ``load_model(use_peft=False, trainable=False)``, the base alone;
- two players on one base: ``training.models.load_two_player`` (adapters ``policy``, trainable, and
  ``reflector``) plus ``model.load_adapter(..., "reference")``, exactly what ``training.players`` does for
  LoRA runs; the adapters are fresh LoRA adapters of ``ModelArguments``' defaults (r 16, all linear layers)
  saved to a temp dir first;
- two full copies: a policy model and a reflector model loaded separately (the original code's layout).

Measured: bytes of every parameter and buffer, counting each storage once (GPT-2's tied embedding and LM
head share one), after moving to the device; on CUDA also ``torch.cuda.max_memory_allocated`` over the
loading, from a reset peak. Optimizer state and activations are not counted: they depend on the
training run, not on how the players are held.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import Figure, log
from experiment_args import ModelArguments
from training.models import load_model, load_two_player, resolve_dtype

TARGET_TWO_PLAYER = 1.15  # two players (three adapters) within 15% of one model


def tensor_bytes(models: list[torch.nn.Module]) -> tuple[int, int]:
    """(bytes, parameter count) over the unique storages of the models' parameters and buffers."""
    storages: dict[tuple[str, int], int] = {}
    params: dict[tuple[str, int], int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            storages[key] = storage.nbytes()
        for param in model.parameters():
            params[(str(param.device), param.untyped_storage().data_ptr())] = param.numel()
    return sum(storages.values()), sum(params.values())


def measure(build: Callable[[], list[torch.nn.Module]], device: str) -> dict:
    """Load the models ``build`` returns onto ``device``: their tensor bytes (and CUDA peak), then free them."""
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    models = [m.to(device) for m in build()]
    n_bytes, n_params = tensor_bytes(models)
    out = {"bytes": n_bytes, "parameters": n_params}
    if cuda:
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated() - before
    del models
    gc.collect()
    return out


def run(model_name: str = "tiny-gpt2", device: str = "cpu") -> list[Figure]:
    """Rows ``memory/two_player_lora`` and ``memory/two_full_copies`` (and CUDA peaks on a GPU)."""
    base_args = ModelArguments(model_name_or_path=model_name, use_peft=False)
    lora_args = ModelArguments(model_name_or_path=model_name, use_peft=True)
    log(f"memory: one {model_name}")
    one = measure(lambda: [load_model(base_args, trainable=False)], device)
    log("memory: two full copies (policy + reflector)")
    full = measure(lambda: [load_model(base_args, trainable=True), load_model(base_args, trainable=False)], device)
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        paths = {}
        for seed, name in enumerate(("policy", "reflector")):
            torch.manual_seed(seed)
            paths[name] = str(Path(tmp) / name)
            load_model(lora_args, trainable=True).save_pretrained(paths[name])

        def two_player() -> list[torch.nn.Module]:
            model = load_two_player(lora_args, paths["policy"], paths["reflector"], trainable_policy=True)
            model.load_adapter(paths["policy"], adapter_name="reference", is_trainable=False)
            return [model]

        log("memory: policy + reflector + reference as LoRA adapters on one base")
        shared = measure(two_player, device)

    raw = {
        "model": model_name,
        "dtype": str(resolve_dtype(lora_args.dtype)).replace("torch.", ""),
        "lora_r": lora_args.lora_r,
        "lora_target_modules": lora_args.lora_target_modules,
        "one_model": one,
        "two_player_lora": shared,
        "two_full_copies": full,
    }
    mib = 2**20
    figures = [
        Figure(
            "memory/two_player_lora",
            "memory 3 adapters on 1 base",
            "MiB",
            shared["bytes"] / mib,
            one["bytes"] / mib,
            "one model alone",
            raw=raw,
        ).ratio_target("<=", TARGET_TWO_PLAYER),
        Figure(
            "memory/two_full_copies",
            "memory 2 full copies",
            "MiB",
            full["bytes"] / mib,
            one["bytes"] / mib,
            "one model alone",
            raw=raw,
        ),
    ]
    if device.startswith("cuda"):
        figures.append(
            Figure(
                "memory/two_player_lora_cuda_peak",
                "CUDA peak 3 adapters on 1 base",
                "MiB",
                shared["cuda_max_allocated_bytes"] / mib,
                one["cuda_max_allocated_bytes"] / mib,
                "one model alone",
                raw=raw,
            ).ratio_target("<=", TARGET_TWO_PLAYER)
        )
    for f in figures:
        log(f"{f.label}: {f.value:.2f} MiB vs {f.baseline:.2f} MiB: {f.ratio:.3f}x")
    return figures
