"""Prompt rendering shared by data generation, SFT, RL and evaluation.

The layout follows Reflect-RL (section 3 of the paper; `nat_lang_envs` of its code): the state, an
optional reflection after ``# Analyze:``, then the admissible actions each behind a label that is a
single token for the model's tokenizer, then ``# Action:``. The policy answers with one label
token, so its "head" is the set of label tokens (the paper's shrunk head). Any task instructions are
part of the observation text, so no caller can forget them.

    <state text>\n\n# Analyze:\n<reflection>\n\n# Actions:\n0. move south\n...\n\n# Action:\n

The reflector is prompted with everything up to and including ``# Analyze:\n``; the reflection it
writes ends with the tokenizer's EOS token (the paper's had none, so it always ran to its cap).
"""

from __future__ import annotations

from envs.base import Observation

ANALYZE_HEAD = "# Analyze:\n"
ACTIONS_HEAD = "# Actions:\n"
ACTION_HEAD = "# Action:\n"

# Canonical label order: digits, then letters, then multi-digit numbers. Digits and ASCII letters are
# single tokens in GPT-2, Llama, SmolLM2 and Qwen vocabularies; numbers past 9 only in some (GPT-2),
# so they are appended only when the tokenizer keeps them whole.
_BASE_LABELS = [str(i) for i in range(10)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
_BASE_LABELS += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_EXTRA_LABELS = [str(i) for i in range(10, 200)]


def label_token_id(tokenizer, label: str) -> int | None:
    """The single token id of ``label`` as it appears right after ``# Action:\\n``, else None."""
    prefix = tokenizer(ACTION_HEAD, add_special_tokens=False)["input_ids"]
    full = tokenizer(ACTION_HEAD + label, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
        return None
    return full[-1]


def action_labels(n: int, tokenizer=None) -> list[str]:
    """The first ``n`` labels. Without a tokenizer only the 62 digit/letter labels exist.

    With a tokenizer every label is checked to be one token, and multi-digit numbers that are one
    token extend the list (GPT-2 reaches 252 labels, as the paper's ``CHOICES``).
    """
    if tokenizer is None:
        if n > len(_BASE_LABELS):
            raise ValueError(f"{n} actions need a tokenizer to find more than {len(_BASE_LABELS)} labels")
        return _BASE_LABELS[:n]
    labels = [lab for lab in _BASE_LABELS + _EXTRA_LABELS if label_token_id(tokenizer, lab) is not None]
    if n > len(labels):
        raise ValueError(f"the tokenizer has only {len(labels)} single-token action labels, {n} are needed")
    return labels[:n]


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """Token ids of ``labels``; raises ValueError naming the first label that is not one token."""
    ids = []
    for label in labels:
        token_id = label_token_id(tokenizer, label)
        if token_id is None:
            raise ValueError(f"action label {label!r} is not a single token for this tokenizer")
        ids.append(token_id)
    return ids


def reflection_prompt(obs: Observation) -> str:
    """What the reflector reads; its completion is the reflection."""
    return f"{obs.text}\n\n{ANALYZE_HEAD}"


def action_list(actions: list[str], labels: list[str]) -> str:
    return "".join(f"{label}. {action}\n" for label, action in zip(labels, actions))


def policy_prompt(obs: Observation, labels: list[str], reflection: str | None = None) -> str:
    """What the policy reads; its completion is one label. ``reflection=None`` is the no-reflection
    ablation (no ``# Analyze:`` section at all)."""
    if len(labels) < len(obs.actions):
        raise ValueError(f"{len(obs.actions)} actions but only {len(labels)} labels")
    head = obs.text
    if reflection is not None:
        head = f"{head}\n\n{ANALYZE_HEAD}{reflection.strip()}"
    return f"{head}\n\n{ACTIONS_HEAD}{action_list(obs.actions, labels)}\n{ACTION_HEAD}"


def parse_label(text: str, labels: list[str]) -> int | None:
    """Index of the label a model wrote, or None. Never raises.

    Accepts ``"3"``, ``" 3"``, ``"3."``, ``"3. move east"`` and ``"Action 3"``; an empty string or an
    unknown label is None (an empty string must never fuzzy-match an action).
    """
    stripped = text.strip()
    if not stripped:
        return None
    first = stripped.split()[0].rstrip(".:)")
    if first.lower() == "action" and len(stripped.split()) > 1:
        first = stripped.split()[1].rstrip(".:)")
    try:
        return labels.index(first)
    except ValueError:
        return None


def prompt_labels(prompt: str) -> list[str]:
    """The labels listed in a rendered policy prompt (its last ``# Actions:`` block).

    SFT evaluation reads them back from stored prompts, so scoring uses exactly the labels the data
    was written with.
    """
    block = prompt[prompt.rindex(ACTIONS_HEAD) + len(ACTIONS_HEAD) :]
    block = block[: block.index("\n\n" + ACTION_HEAD)]
    return [line.split(". ", 1)[0] for line in block.split("\n") if line]
