"""LLM backends: constrained choice decoding, prefix KV reuse, chat rendering, flags (the API side: test_serve)."""

import copy

import pytest
import torch

from experiment_args import BackendArguments, UsageError
from llm import make_backend
from llm.base import parse_choice
from llm.local import LocalBackend, end_of_turn_id, render_prompt
from llm.openai_api import OpenAIBackend
from run_utils import parse_args

CHOICES = ["card arrival", "card activation", "cash withdrawal", "lost card"]  # two share " card"
CONTEXT = "".join(
    f"Query: how do I {verb} my card?\nIntent: card arrival\nThe answer is wrong! You can do better!\n"
    for verb in ("find", "track", "activate", "block", "renew")
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return LocalBackend("tiny-gpt2", batch_size=3)


def direct_logprob(backend, prompt_ids: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) from one plain forward pass, no cache, no batching."""
    ids = torch.tensor([prompt_ids + continuation], device=backend.model.device)
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    return sum(logp[len(prompt_ids) - 1 + k, tok].item() for k, tok in enumerate(continuation))


def test_constrained_choices_are_always_choices_and_sampling_explores(backend):
    prompt = CONTEXT + "Query: my card has not come yet\n"
    picked = set()
    for seed in range(12):
        (gen,) = backend.generate([prompt], temperature=1.0, seed=seed, choices=CHOICES, prefill="Intent:")
        assert gen.text == CHOICES[gen.choice] and gen.finish_reason == "stop"
        picked.add(gen.choice)
    assert len(picked) > 1
    # the same seed gives the same sample
    again = [backend.generate([prompt], temperature=1.0, seed=s, choices=CHOICES)[0].choice for s in (3, 3)]
    assert again[0] == again[1]
    # chat prompts too (tiny-gpt2 has no template: plain rendering, EOS ends the choice)
    chat = [{"role": "user", "content": "my card has not come"}]
    gens = backend.generate([chat] * 4, temperature=1.0, seed=0, choices=CHOICES, prefill="Intent:")
    assert all(g.text in CHOICES for g in gens)


def test_choice_logprob_equals_a_direct_forward_pass(backend):
    prompt = "Query: my card has not come yet\n"
    gens = backend.generate([prompt, prompt + "Please help.\n"], choices=CHOICES, prefill="Intent:")
    eos = backend.tokenizer.eos_token_id
    for p, gen in zip([prompt, prompt + "Please help.\n"], gens):
        seq = backend.tokenizer(" " + gen.text, add_special_tokens=False)["input_ids"] + [eos]
        expected = direct_logprob(backend, backend.encode(p, "Intent:"), seq)
        assert gen.logprob == pytest.approx(expected, abs=1e-4)
        assert gen.completion_tokens == len(seq)


def test_greedy_single_token_choices_pick_the_most_likely(backend):
    choices = ["yes", "no", "maybe"]
    first = [backend.tokenizer(" " + c)["input_ids"] for c in choices]
    assert all(len(ids) == 1 for ids in first)  # single GPT-2 tokens
    prompts = [f"Question {i}: is the sky green?\nAnswer:" for i in range(5)]
    for prompt, gen in zip(prompts, backend.generate(prompts, choices=choices)):
        ids = backend.encode(prompt)
        scores = [direct_logprob(backend, ids, tok) for tok in first]
        assert gen.choice == max(range(3), key=scores.__getitem__)
        eos = backend.tokenizer.eos_token_id
        assert gen.logprob == pytest.approx(direct_logprob(backend, ids, first[gen.choice] + [eos]), abs=1e-4)


def test_prefix_kv_reuse_gives_the_same_results(backend):
    queries = [f"Query: question {i} about my {w}\n" for i, w in enumerate(["card", "cash", "pin", "app", "fee"])]
    step1 = [CONTEXT + q for q in queries]
    step2 = [CONTEXT + "Query: one more\nIntent: cash withdrawal\n" + q for q in queries]  # append-only context

    def run(reuse: bool):
        backend.reuse_prefix = reuse
        try:
            return [
                backend.generate(step1, max_tokens=6, prefill="Intent:"),
                backend.generate(step1, choices=CHOICES, prefill="Intent:"),
                backend.generate(step2, choices=CHOICES, prefill="Intent:"),
            ]
        finally:
            backend.reuse_prefix = True

    backend._prefixes.clear()
    computed = backend.prefix_tokens_computed
    reused = run(True)
    # step 1's prefix is run once for both calls (the LRU); step 2 runs only the tokens after the shared context
    prefix1, prefix2 = backend._prefixes
    shared = next(i for i, (a, b) in enumerate(zip(prefix1, prefix2)) if a != b)
    assert shared >= len(backend.encode(CONTEXT))
    assert backend.prefix_tokens_computed - computed == len(prefix1) + len(prefix2) - shared
    assert backend.prefix_tokens_reused > 0
    plain = run(False)
    assert backend.prefix_tokens_computed - computed == len(prefix1) + len(prefix2) - shared
    for with_cache, without in zip(reused, plain):
        assert [g.text for g in with_cache] == [g.text for g in without]
        assert [g.logprob for g in with_cache] == pytest.approx([g.logprob for g in without], abs=1e-4)
    # batching (3 per batch, left padding) changes nothing either
    alone = [backend.generate([p], max_tokens=6, prefill="Intent:")[0].text for p in step1]
    assert alone == [g.text for g in reused[0]]


def test_stop_strings_max_tokens_and_usage(backend):
    before = backend.usage.to_dict()
    (full,) = backend.generate(["The bank said"], max_tokens=10)
    assert full.finish_reason == "length" and full.completion_tokens == 10 and full.prompt_tokens == 3
    stop = full.text[4:7]
    (cut,) = backend.generate(["The bank said"], max_tokens=10, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < 10
    after = backend.usage.to_dict()
    assert after["requests"] - before["requests"] == 2 and after["prompt_tokens"] - before["prompt_tokens"] == 6
    with pytest.raises(ValueError, match="positions"):
        backend.generate(["x " * 1020], max_tokens=10)


def test_chat_rendering_fallback_template_and_prefill(backend):
    messages = [{"role": "system", "content": "Be useful."}, {"role": "user", "content": "Query: hi"}]
    tok = backend.tokenizer
    assert render_prompt(tok, messages, "Intent:") == "system: Be useful.\nuser: Query: hi\nassistant:Intent:"
    assert render_prompt(tok, "plain", " more") == "plain more"
    assert end_of_turn_id(tok) == tok.eos_token_id
    templated = copy.deepcopy(tok)
    templated.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    expected = "<system>Be useful.<|endoftext|><user>Query: hi<|endoftext|><assistant>Intent:"
    assert render_prompt(templated, messages, "Intent:") == expected
    assert end_of_turn_id(templated) == tok.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="list of {role, content}"):
        backend.generate(messages)  # one chat passed as the list of prompts
    # the chat prompt's tokens are the rendered text's, prefill last
    assert tok.decode(backend.encode(messages, "Intent:")).endswith("assistant:Intent:")


def test_parse_choice_fallbacks():
    assert parse_choice("  card arrival\n", CHOICES) == 0
    assert parse_choice("Card Arrival", CHOICES) == 0
    assert parse_choice("Intent: lost card", CHOICES, prefill="Intent:") == 3
    assert parse_choice("I think it is card activation, or card arrival", CHOICES) == 1  # longest contained
    assert parse_choice("no idea", CHOICES) is None


def test_backend_arguments_and_make_backend(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--backend"):
        parse_args((BackendArguments,), ["--backend", "vllm"])
    with pytest.raises(UsageError, match="--concurrency"):
        parse_args((BackendArguments,), ["--backend", "openai", "--concurrency", "0"])
    with pytest.raises(UsageError, match="--adapter"):
        parse_args((BackendArguments,), ["--backend", "openai", "--adapter", "x"])
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    (args,) = parse_args(
        (BackendArguments,), ["--backend", "openai", "--model", "m", "--api_key_env", "NO_SUCH_KEY_VAR"]
    )
    with pytest.raises(UsageError, match=r"\$NO_SUCH_KEY_VAR"):
        make_backend(args)
    args.api_base, args.cache_dir = "http://127.0.0.1:9/v1", str(tmp_path / "cache")
    api = make_backend(args)
    assert isinstance(api, OpenAIBackend) and api.cache_dir == tmp_path / "cache"
    (args,) = parse_args((BackendArguments,), ["--model", "tiny-gpt2", "--batch_size", "2", "--device", "cpu"])
    local = make_backend(args)
    assert isinstance(local, LocalBackend) and local.batch_size == 2
    assert local.usage.to_dict()["requests"] == 0


def test_per_token_logprobs_and_on_token(backend):
    prompts = ["The bank said", "My card", "Where is", "Why"]  # 4 prompts, batches of 3: two decodes
    seen = {i: [] for i in range(4)}
    gens = backend.generate(
        prompts, max_tokens=5, top_logprobs=2, on_token=lambda i, token, lp, top: seen[i].append((token, lp, top))
    )
    for i, gen in enumerate(gens):
        assert [s[0] for s in seen[i]] == gen.token_ids and len(gen.token_ids) == gen.completion_tokens
        assert [s[1] for s in seen[i]] == gen.token_logprobs and sum(gen.token_logprobs) == pytest.approx(gen.logprob)
        assert all(len(top) == 2 and top[0][0] == token for top, token in zip(gen.top_logprobs, gen.token_ids))
    plain = backend.generate(prompts, max_tokens=5)
    assert [g.text for g in plain] == [g.text for g in gens] and plain[0].token_ids is None
    with pytest.raises(ValueError, match="top_logprobs"):
        backend.generate(prompts, top_logprobs=-1)
    with pytest.raises(ValueError, match="per-token"):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1").generate(["hi"], top_logprobs=0)
