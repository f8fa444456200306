"""A local HF causal LM as a backend: chat rendering, constrained choice, batched decoding with a shared-prefix
KV cache.

Constrained choice (``choices`` given), as in Monea et al.'s ICRL (see ../shared/reference/icrl_baselines.md A.4):
decoding runs over a token trie of ``" " + choice`` followed by the end token (the chat end-of-turn token for
chat prompts, else EOS): each step keeps only the tokens that continue some choice, so the output is always one
of the strings and sampling at T=1 is the method's exploration. Greedy is token by token (the argmax of the
first token, then of the next...), not the argmax of whole-sequence log-probs. ``logprob`` is the model's own
sequence log-prob of the chosen string (unmasked log-softmax at temperature 1, end token included), so it is
comparable across choices and runs.

The KV cache of a long token prefix shared by the prompts of one call is computed once (ICRL scores 500 test
queries against one context), and a small LRU of such prefixes is kept across calls (Approximate ICRL's
contexts are append-only, so the next step's prompt extends a cached prefix).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from experiment_args import ModelArguments, UsageError
from llm.base import Backend, Generation, Prompt


def render_prompt(tokenizer, prompt: Prompt, prefill: str = "") -> str:
    """The text the model continues: a str as is; messages through the chat template, then ``prefill``.

    A tokenizer without a chat template gets a plain ``role: content`` line per message and ``assistant:``.
    """
    if isinstance(prompt, str):
        return prompt + prefill
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
    return text + prefill


def end_of_turn_id(tokenizer) -> int:
    """The special token that closes an assistant turn in the chat template (``<|im_end|>``...), else EOS."""
    marker = "\u2603choice\u2603"
    if getattr(tokenizer, "chat_template", None):
        try:
            conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            if after and after[0] in tokenizer.all_special_ids:
                return after[0]
        except Exception:  # a template that rejects this conversation: fall back to EOS
            pass
    return tokenizer.eos_token_id


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    choice: int | None = None  # set on the node after a choice's last token


def build_choice_trie(sequences: list[list[int]]) -> _TrieNode:
    """A trie over token id sequences; the node after sequence i's last token has ``choice == i``.

    Duplicated sequences keep the first index. Every sequence ends in the end token, so no choice is a
    proper prefix of another and decoding stops exactly when a node with a choice is reached.
    """
    root = _TrieNode()
    for i, seq in enumerate(sequences):
        node = root
        for token in seq:
            node = node.children.setdefault(token, _TrieNode())
        if node.choice is None:
            node.choice = i
    return root


def _pick(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from scores (B, V): argmax at T=0, else a sample at ``temperature`` within ``top_p``."""
    if temperature == 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(row) for row in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


class LocalBackend(Backend):
    """A local HF causal LM (a built-in name, a folder, optionally a LoRA or full fine-tuned ``adapter``).

    Prompts are decoded in batches of ``batch_size``. When the prompts of one call share at least
    ``prefix_min_tokens`` leading tokens, the prefix is run once and its KV cache is copied into every batch;
    the last ``prefix_cache_size`` prefixes are kept across calls, and a new prefix only runs the tokens after
    the longest part it shares with a kept one. ``reuse_prefix = False`` turns this off (the results are the
    same up to float rounding; a test checks it). ``logprob`` is the sum of the model's log-probs (temperature
    1, no mask) of every generated token, the end token included; stop strings cut the text, not the sum.
    With ``top_logprobs=k`` each of those tokens' log-probs, and the k most likely at its step, come back too
    (the same log-softmax, from the same decode).
    """

    name = "local"
    token_level = True

    def __init__(
        self,
        model_name_or_path: str,
        adapter: str | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
        device: str = "auto",
        prefix_min_tokens: int = 16,
        prefix_cache_size: int = 4,
        reuse_prefix: bool = True,
    ) -> None:
        from training.models import _accepts_logits_to_keep, load_model, load_tokenizer, max_positions

        super().__init__()
        if batch_size < 1:
            raise UsageError("--batch_size must be >= 1")
        self.model_name = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path)
        # An adapter folder with adapter_config.json is LoRA on the base; any other folder is a whole model.
        use_peft = adapter is not None and os.path.isfile(os.path.join(adapter, "adapter_config.json"))
        args = ModelArguments(model_name_or_path=model_name_or_path, dtype=dtype, use_peft=use_peft)
        model = load_model(args, adapter_path=adapter, trainable=False)
        if use_peft:
            model = model.merge_and_unload()  # plain weights: faster decoding, same outputs
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.max_positions = max_positions(model)
        # Only the last position's logits are used: skip the (B, T, V) LM head over the whole prompt.
        self._keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self.batch_size = batch_size
        self.prefix_min_tokens = prefix_min_tokens
        self.prefix_cache_size = prefix_cache_size
        self.reuse_prefix = reuse_prefix
        self.prefix_tokens_computed = 0  # tokens run to build prefix caches
        self.prefix_tokens_reused = 0  # prompt tokens whose keys/values came from a prefix cache
        self._prefixes: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.pad_id = self.tokenizer.pad_token_id
        self.end_of_turn = end_of_turn_id(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._tries: dict[tuple, _TrieNode] = {}

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model_name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    # -- prompts -----------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, prefill: str = "") -> list[int]:
        """Token ids of the rendered prompt; a chat template's text already holds its special tokens."""
        text = render_prompt(self.tokenizer, prompt, prefill)
        return self.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]

    def _trie(self, choices: list[str], chat: bool) -> _TrieNode:
        end = self.end_of_turn if chat else self.tokenizer.eos_token_id
        key = (tuple(choices), end)
        if key not in self._tries:
            # The leading space: after a prefix like "Intent:" the label is a new word (ICRL's tokenisation).
            seqs = [self.tokenizer(" " + c, add_special_tokens=False)["input_ids"] + [end] for c in choices]
            if len(self._tries) >= 8:  # calls repeat one label set; a few are plenty
                self._tries.clear()
            self._tries[key] = build_choice_trie(seqs)
        return self._tries[key]

    # -- the model ---------------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,  # fine-tuned folders may say use_cache=False (a training setting)
            **self._keep_last,
        )
        return out.logits[:, -1, :].float(), out.past_key_values  # (B, V)

    def _prefix_cache(self, prefix: tuple[int, ...]):
        """The KV cache of ``prefix`` (batch 1): from the LRU, or built on the kept prefix sharing most of its tokens.

        A kept prefix that ``prefix`` extends (Approximate ICRL's append-only contexts) is reused whole; one that
        diverges is cropped to the shared part first, when all its layers are plain (croppable) DynamicLayers.
        """
        from transformers.cache_utils import DynamicLayer

        if prefix in self._prefixes:
            self._prefixes.move_to_end(prefix)
            return self._prefixes[prefix]
        base, shared = None, 0
        for key, kept in self._prefixes.items():
            n = _common_prefix_length([key, prefix])
            if n > shared and (n == len(key) or all(type(layer) is DynamicLayer for layer in kept.layers)):
                base, shared = key, n
        cache = None
        if base is not None:
            cache = copy.deepcopy(self._prefixes[base])
            if shared < len(base):
                cache.crop(shared - len(base))  # a negative count removes that many tokens from the end
        if shared < len(prefix):
            self.prefix_tokens_computed += len(prefix) - shared
            new = torch.tensor([prefix[shared:]], dtype=torch.long, device=self.device)  # (1, T)
            positions = torch.arange(shared, len(prefix), device=self.device)[None, :]  # (1, T)
            mask = torch.ones((1, len(prefix)), dtype=torch.long, device=self.device)
            _, cache = self._forward(new, mask, positions, cache)
        if self.prefix_cache_size > 0:
            self._prefixes[prefix] = cache
            while len(self._prefixes) > self.prefix_cache_size:
                self._prefixes.popitem(last=False)
        return cache

    @torch.no_grad()
    def _generate(
        self,
        prompts,
        *,
        max_tokens,
        temperature,
        top_p,
        stop,
        choices,
        seed,
        prefill,
        top_logprobs=None,
        on_token=None,
    ):
        if isinstance(seed, list):
            raise ValueError("the local backend samples a batch from one seed; pass an int")
        rows = [self.encode(p, prefill) for p in prompts]
        if any(not row for row in rows):
            raise ValueError("an empty prompt has nothing to continue")
        tries = [self._trie(choices, not isinstance(p, str)) for p in prompts] if choices else [None] * len(rows)
        if choices:  # a choice must be completed whatever max_tokens says
            max_tokens = max(_depth(trie) for trie in {id(t): t for t in tries}.values())
        if self.max_positions is not None and max(map(len, rows)) + max_tokens > self.max_positions:
            raise ValueError(
                f"a prompt of {max(map(len, rows))} tokens plus {max_tokens} new tokens exceeds the model's "
                f"{self.max_positions} positions; shorten the prompt or lower max_tokens"
            )
        # Every prompt keeps at least its last token out of the prefix: its logits start decoding.
        shared = _common_prefix_length(rows) if self.reuse_prefix else 0
        shared = min(shared, min(map(len, rows)) - 1)
        prefix_cache = self._prefix_cache(tuple(rows[0][:shared])) if shared >= self.prefix_min_tokens else None
        shared = shared if prefix_cache is not None else 0
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(rows), self.batch_size):
            batch = slice(start, start + self.batch_size)
            out += self._decode(
                rows[batch],
                tries[batch],
                shared,
                prefix_cache,
                max_tokens,
                temperature,
                top_p,
                stop,
                choices,
                generator,
                top_logprobs,
                on_token,
                start,
            )
            if prefix_cache is not None:
                self.prefix_tokens_reused += shared * len(rows[batch])
        self._count(
            requests=len(out),
            prompt_tokens=sum(g.prompt_tokens for g in out),
            completion_tokens=sum(g.completion_tokens for g in out),
        )
        return out

    def _decode(
        self,
        rows,
        tries,
        shared,
        prefix_cache,
        max_tokens,
        temperature,
        top_p,
        stop,
        choices,
        generator,
        top_logprobs=None,
        on_token=None,
        first_index=0,
    ):
        """Decode one batch: the suffixes after ``shared`` prefix tokens, left-padded, on a copy of its cache.
        ``on_token`` numbers the rows from ``first_index`` (the batch's place in the call's prompts)."""
        B, device = len(rows), self.device
        suffixes = [row[shared:] for row in rows]
        width = max(map(len, suffixes))
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=device)  # (B, T)
        attention_mask = torch.zeros((B, shared + width), dtype=torch.long, device=device)  # (B, P + T)
        attention_mask[:, :shared] = 1
        for b, suffix in enumerate(suffixes):
            input_ids[b, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long, device=device)
            attention_mask[b, shared + width - len(suffix) :] = 1
        # Positions count real tokens only, so a padded prompt sees the positions it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # (B, T)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
        logits, cache = self._forward(input_ids, attention_mask, position_ids, cache)

        nodes = list(tries)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs = [0.0] * B
        token_logprobs: list[list[float]] = [[] for _ in range(B)]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # (B, V) the model's own log-probs, T=1
            scores = logits
            if choices:
                allowed = torch.full_like(logits, float("-inf"))  # (B, V) -inf off the trie
                for b, node in enumerate(nodes):
                    ids = list(node.children) if not done[b] else [self.pad_id]
                    allowed[b, ids] = 0.0
                scores = logits + allowed
            picked = _pick(scores, temperature, top_p, generator)  # (B,)
            picked_logp = logp.gather(1, picked[:, None]).squeeze(1).tolist()
            picked = picked.tolist()
            top = None
            if top_logprobs:
                top_values, top_ids = logp.topk(min(top_logprobs, logp.shape[-1]), dim=-1)  # (B, k), sorted
                top = [list(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
            for b in range(B):
                if done[b]:
                    continue
                tokens[b].append(picked[b])
                logprobs[b] += picked_logp[b]
                token_logprobs[b].append(picked_logp[b])
                tops[b].append(top[b] if top else [])
                if on_token is not None:
                    on_token(first_index + b, picked[b], picked_logp[b], top[b] if top else None)
                if choices:
                    nodes[b] = nodes[b].children[picked[b]]
                    done[b] = nodes[b].choice is not None
                elif picked[b] in self.eos_ids or picked[b] == self.end_of_turn:
                    done[b] = True
                elif stop and any(s in self.tokenizer.decode(tokens[b], skip_special_tokens=True) for s in stop):
                    done[b] = True
            if all(done):
                break
            next_ids = torch.tensor([[t[-1] if not d else self.pad_id] for t, d in zip(tokens, done)], device=device)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
            logits, cache = self._forward(next_ids, attention_mask, position_ids, cache)

        out = []
        for b in range(B):
            common = {"logprob": logprobs[b], "prompt_tokens": len(rows[b]), "completion_tokens": len(tokens[b])}
            if top_logprobs is not None:
                common |= {"token_ids": tokens[b], "token_logprobs": token_logprobs[b], "top_logprobs": tops[b]}
            if choices:
                out.append(Generation(text=choices[nodes[b].choice], choice=nodes[b].choice, **common))
                continue
            text = self.tokenizer.decode(tokens[b], skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in stop or []) if i >= 0]
            text = text[: min(cuts)] if cuts else text
            out.append(Generation(text=text, finish_reason="stop" if done[b] else "length", **common))
        return out


def _depth(node: _TrieNode) -> int:
    return max((1 + _depth(child) for child in node.children.values()), default=0)
