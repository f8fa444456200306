"""Loading the two players (and the frozen reference policy) from SFT run folders.

An SFT run folder records its model options in ``config.yaml``, so RL and evaluation need only the
folder (the original's ``load_script_args`` did the same with ``setting.yml``). When the policy and
the reflector are LoRA adapters on the same base, they share one copy of it: adapters ``policy``
(trainable), ``reflector`` and ``reference`` (both frozen) on one ``PeftModel``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from experiment_args import ModelArguments, UsageError
from training.models import load_model, load_tokenizer


def run_model_args(run_dir: str, flag: str) -> ModelArguments:
    """The ModelArguments an SFT run was trained with (its folder, or a checkpoint-N inside it)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"{flag} {run_dir} is not a folder; pass an SFT run folder from training.sft")
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.exists():
            config = yaml.safe_load(candidate.read_text()) or {}
            names = {f.name for f in dataclasses.fields(ModelArguments)}
            return ModelArguments(**{k: v for k, v in config.items() if k in names})
    raise UsageError(f"{flag} {run_dir} has no config.yaml; pass a folder written by training.sft")


def run_tokenizer(run_dir: str, model_args: ModelArguments):
    """The tokenizer training.sft saved with the run (so a copied run folder or a base given by a relative
    path still loads), else its base model's."""
    saved = (Path(run_dir) / "tokenizer_config.json").exists()
    return load_tokenizer(run_dir if saved else model_args.model_name_or_path, model_args.cache_dir)


def is_adapter(run_dir: str) -> bool:
    return (Path(run_dir) / "adapter_config.json").exists()


@dataclass
class Players:
    tokenizer: object
    policy_model: torch.nn.Module
    policy_adapter: str | None
    reflector_model: torch.nn.Module | None
    reflector_adapter: str | None
    reference_model: torch.nn.Module | None
    reference_adapter: str | None
    model_args: ModelArguments

    def to(self, device: torch.device | str) -> Players:
        """Move every model to ``device``, except quantised ones (bitsandbytes placed them on load)."""
        seen = set()
        for model in (self.policy_model, self.reflector_model, self.reference_model):
            if model is None or id(model) in seen:
                continue
            seen.add(id(model))
            if not getattr(model, "is_quantized", False):
                model.to(device)
        return self


def load_players(policy_path: str, reflector_path: str = "", with_reference: bool = True, trainable: bool = True):
    """The policy (trainable unless told otherwise), the frozen reflector (if a path is given) and
    the frozen reference copy of the SFT policy (for the KL term)."""
    policy_args = run_model_args(policy_path, "--policy_path")
    tokenizer = run_tokenizer(policy_path, policy_args)
    reflector_args = run_model_args(reflector_path, "--reflector_path") if reflector_path else None
    shared = (
        reflector_args is not None
        and is_adapter(policy_path)
        and is_adapter(reflector_path)
        and reflector_args.model_name_or_path == policy_args.model_name_or_path
    )
    if shared:
        from training.models import load_two_player

        model = load_two_player(policy_args, policy_path, reflector_path, trainable_policy=trainable)
        if with_reference:
            model.load_adapter(policy_path, adapter_name="reference", is_trainable=False)
            for name, param in model.named_parameters():
                param.requires_grad_(trainable and ".policy." in name)
        return Players(
            tokenizer,
            model,
            "policy",
            model,
            "reflector",
            model if with_reference else None,
            "reference" if with_reference else None,
            policy_args,
        )

    if is_adapter(policy_path) != policy_args.use_peft:
        raise UsageError(f"--policy_path {policy_path} does not hold the model its config.yaml describes")
    policy = load_model(policy_args, adapter_path=policy_path, trainable=trainable)
    # A LoRA policy on its own base has peft's "default" adapter; naming it lets checkpoints save and
    # load the adapter layout (a None name used to look for a full model.safetensors).
    policy_adapter = policy.active_adapter if policy_args.use_peft else None
    reflector = None
    if reflector_args is not None:
        reflector = load_model(reflector_args, adapter_path=reflector_path, trainable=False)
    reference = load_model(policy_args, adapter_path=policy_path, trainable=False) if with_reference else None
    return Players(tokenizer, policy, policy_adapter, reflector, None, reference, None, policy_args)
