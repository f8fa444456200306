"""The chat prompt of in-context RL, and the token budget it leaves (Monea et al. 2024, reference A.4).

For a context of past episodes and a query the messages are::

    system     You are an useful assistant. Answer the following questions. Feedback will indicate ...
    user       Query: <x_1>
    assistant  Intent: <prediction_1>
    user       '<prediction_1>' is the correct answer! Good job!      (or: The answer '...' is wrong! ...)
               <blank line>
               Query: <x_2>                                          (an input after feedback joins it)
    ...
    user       ... Query: <x>                                        (the query, joined the same way)

and the backend opens the answer with the bare prefix (``Intent:``) after the generation prompt, then
decodes over the labels. Supervised ICL (``--no_icrl``) shows ``Intent: <gold>`` and no feedback, under
a system prompt without the feedback sentence; ``--icrl_omit_feedback`` shows predictions without
feedback. The labels are never listed. The strings are the released code's (the paper's figures show
slightly different wording).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from evaluation.icrl.tasks import Task
from llm.local import render_prompt

# The original appends "\n" + the task description, which is empty for every task.
ICRL_SYSTEM_PROMPT = (
    "You are an useful assistant. Answer the following questions. Feedback will indicate if you answered "
    "correctly. You must answer correctly, using previous feedback to make better predictions.\n"
)
ICL_SYSTEM_PROMPT = "You are an useful assistant. Answer the following questions.\n"


def feedback_text(pred: str, feedback: int) -> str:
    if feedback:
        return f"'{pred}' is the correct answer! Good job!"
    return f"The answer '{pred}' is wrong! You can do better!"


def shown_feedback(reward: int, seed: int, t: int, flip: bool, flip_prob: float) -> tuple[int, bool]:
    """(the feedback the prompt will show for step t, whether it was flipped).

    With ``--icrl_flip_feedback`` the reward is inverted when ``default_rng(seed + t).random()`` falls below
    ``flip_prob`` (the original's draw); the logged accuracy stays the true reward."""
    flipped = flip and np.random.default_rng(seed + t).random() < flip_prob
    return (1 - reward if flipped else reward), bool(flipped)


def _add_user(messages: list[dict], content: str) -> None:
    """A user turn, joined to the previous one with a blank line when that one is a user turn too."""
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"] += f"\n\n{content}"
    else:
        messages.append({"role": "user", "content": content})


def build_messages(
    task: Task,
    context: Sequence[Mapping],
    query: str | None,
    icrl: bool = True,
    omit_feedback: bool = False,
    zero_shot: bool = False,
) -> list[dict]:
    """The chat messages for ``query`` (raw text; None: the context alone) after the ``context`` episodes.

    An episode is a mapping with ``text`` (raw input), ``pred`` (predicted label, ICRL), ``feedback``
    (0/1 as shown, ICRL) and ``gold`` (label, supervised ICL). ``zero_shot`` (max_context_examples 0)
    takes the plain system prompt, as the original does; a Naive run's step 0 keeps the ICRL one.
    """
    system = ICRL_SYSTEM_PROMPT if icrl and not zero_shot else ICL_SYSTEM_PROMPT
    messages = [{"role": "system", "content": system}]
    for episode in context:
        _add_user(messages, task.format_input(episode["text"]))
        if icrl:
            messages.append({"role": "assistant", "content": f"{task.prediction_prefix} {episode['pred']}"})
            if not omit_feedback:
                messages.append({"role": "user", "content": feedback_text(episode["pred"], episode["feedback"])})
        else:
            messages.append({"role": "assistant", "content": f"{task.prediction_prefix} {episode['gold']}"})
    if query is not None:
        _add_user(messages, task.format_input(query))
    return messages


# ---------------------------------------------------------------------------------------------------
# token counts (need the model's tokenizer)
# ---------------------------------------------------------------------------------------------------


def count_tokens(tokenizer, messages: list[dict], prefill: str = "") -> int:
    """Tokens of the prompt as the local backend renders it (chat template, then ``prefill``)."""
    return len(tokenizer(render_prompt(tokenizer, messages, prefill), add_special_tokens=False)["input_ids"])


def max_context_examples(tokenizer, task: Task, budget_tokens: int, icrl: bool = True) -> int:
    """How many episodes a context may hold so that the prompt fits ``budget_tokens`` (the model's window).

    As the original (``find_maximum_number_examples``): take the task's inputs (train and test) sorted
    longest first, give each the longest label and the longest feedback, and binary-search the largest n
    whose context of the n longest episodes fits in 95% of the window. The original returns n + 1, and so
    does this function: its published numbers (34 Banking77 examples in 4096 Llama-3.1 tokens) are
    computed that way. The spare 5% covers the extra episode and the query in practice, since real
    contexts are never all worst-case episodes.
    """

    def n_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    label_lengths = n_tokens([f"{task.prediction_prefix} {label}" for label in task.labels])
    label = task.labels[label_lengths.index(max(label_lengths))]
    feedback_lengths = n_tokens([feedback_text(label, 0), feedback_text(label, 1)])
    feedback = feedback_lengths.index(max(feedback_lengths))
    texts = [text for text, _ in task.train + task.test]
    lengths = n_tokens([task.format_input(text) for text in texts])
    longest = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]

    def fits(n: int) -> bool:
        context = [{"text": text, "pred": label, "feedback": feedback, "gold": label} for text in longest[:n]]
        messages = build_messages(task, context, None, icrl=icrl)
        return count_tokens(tokenizer, messages) <= 0.95 * budget_tokens

    low, high = 0, len(longest)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low + 1


def experiment_token_counts(tokenizer, task: Task, history: Sequence[Mapping], **prompt_options) -> dict:
    """Prompt tokens of the training predictions of a finished run, as the original's ``run_count_tokens``.

    ``history`` rows hold ``context`` (history indices) next to the episode fields. ``new_prompt_tokens``
    counts only the tokens after the prefix shared with the previous step's prompt: what a backend that
    keeps the last prompt's KV cache computes (append-only contexts, as Approximate ICRL's, share most).
    ``prompt_options`` go to ``build_messages`` (icrl, omit_feedback, zero_shot).
    """
    total = new = 0
    previous: list[int] = []
    for row in history:
        messages = build_messages(task, [history[i] for i in row["context"]], row["text"], **prompt_options)
        text = render_prompt(tokenizer, messages, task.prediction_prefix)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        shared = 0
        for a, b in zip(previous, ids):
            if a != b:
                break
            shared += 1
        total += len(ids)
        new += len(ids) - shared
        previous = ids
    return {"prompt_tokens": total, "new_prompt_tokens": new, "steps": len(history)}
