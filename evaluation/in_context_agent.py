"""An LLM that plays any environment in context: the in-context side of the comparison with trained policies.

    python -m evaluation.evaluate --agent llm --agent_model smollm2-135m --output_dir runs/eval/smollm2
    python -m evaluation.evaluate --agent llm --agent_backend openai --agent_api_base http://127.0.0.1:8000/v1 \
        --agent_model served --agent_context stochastic --batch_size 4 --output_dir runs/eval/served

The agent reads what the trained policy reads (the state, the labelled admissible actions, ``# Action:``) and
answers with one label. A local model decodes over the labels only (llm.local's constrained choice); an API
model's free answer is parsed (``3``, ``3. move east``, ``Action: 3``, else the action's own text) and an answer
that names no action steps the environment with ``None``: an invalid action, which the environment prices and
the rollout counts. A step's log-prob is the local model's own log-prob of its answer (label and end token,
not renormalised over the labels; NaN for API answers). It runs through ``training.rollout.rollout`` like every
agent, so evaluation writes the same ``episodes.jsonl`` and ``summary.json`` and ``evaluation.compare`` tables it
beside the trained policies.

In-context RL over episodes (``--agent_context``): after each batch of episodes evaluation calls
:meth:`InContextAgent.observe`, and the next prompts open with past episodes, each as its states, the action
taken in each and its reward, and the outcome. Which episodes: Monea et al.'s strategies
(``experiment_args.AGENT_CONTEXTS``, evaluation/icrl/context.py), an episode's feedback being its success. The
episodes of one lockstep batch share one context, placed first in the prompt, so a local model computes its
KV cache once for the batch; the history grows between batches only, so ``--batch_size`` sets how often the
agent can learn (1: after every episode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from envs.prompt import ACTION_HEAD, ACTIONS_HEAD, ANALYZE_HEAD, action_labels, parse_label
from evaluation.icrl.context import ApproximateContexts, random_context, step_rng
from experiment_args import AGENT_CONTEXTS
from llm.base import Backend, parse_choice
from training.rollout import Decision

SYSTEM_PROMPT = (
    "You are an agent acting in a text environment. Each turn shows the current state and the admissible "
    "actions, each behind a label. Answer with the label of one action and nothing else. Act so that the "
    "episode succeeds with the highest total reward."
)
CONTEXT_SENTENCE = " Earlier episodes are shown first, with the reward of every action and the outcome: use them."
ANSWER_PREFIX = "Action:"
ANSWER_IN_TEXT = re.compile(r"\baction\s*:\s*(\S+)", re.IGNORECASE)


@dataclass
class PastEpisode:
    """What the prompt shows of a finished episode: (state, action text, reward) per step, and the outcome."""

    steps: list[tuple[str, str, float]]
    success: bool
    ret: float


def split_policy_prompt(prompt: str) -> tuple[str, dict[str, str]]:
    """(the state text, {label: action text}) of a rendered policy prompt (envs.prompt.policy_prompt)."""
    head, _, block = prompt.rpartition("\n\n" + ACTIONS_HEAD)
    state = head.split("\n\n" + ANALYZE_HEAD, 1)[0]
    block = block.split("\n\n" + ACTION_HEAD, 1)[0]
    actions = dict(line.split(". ", 1) for line in block.split("\n") if ". " in line)
    return state, actions


def past_episode(episode) -> PastEpisode:
    """The part of a ``training.rollout.Episode`` that goes back into a prompt."""
    steps = []
    for step in episode.steps:
        state, actions = split_policy_prompt(step.prompt)
        label = step.labels[step.action] if step.action is not None and step.labels else None
        steps.append((state, actions.get(label, "(no valid action)"), step.reward))
    return PastEpisode(steps, bool(episode.success), float(episode.ret))


def render_episode(number: int, episode: PastEpisode, skip: int = 0) -> str:
    outcome = "success" if episode.success else "failure"
    lines = [f"Episode {number}: {outcome}, return {episode.ret:.2f}"]
    if skip:
        lines.append(f"(its first {skip} steps are not shown)")
    for state, action, reward in episode.steps[skip:]:
        lines.append(f"{state}\nAction taken: {action}. Reward: {reward:.2f}")
    return "\n".join(lines)


class InContextAgent:
    """``act(envs, observations, prompts, greedy, generator, labels) -> Decision`` by a language model backend."""

    def __init__(
        self,
        backend: Backend,
        context: str = "none",
        max_episodes: int = 4,
        context_tokens: int = 1024,
        p_keep: float = 0.1,
        max_contexts: int = 8,
        temperature: float = 1.0,
        max_tokens: int = 16,
        seed: int = 0,
    ):
        if context not in AGENT_CONTEXTS:
            raise ValueError(f"context {context!r} is not one of {', '.join(AGENT_CONTEXTS)}")
        self.backend, self.context, self.max_episodes = backend, context, max_episodes
        self.context_tokens, self.p_keep, self.max_contexts = context_tokens, p_keep, max_contexts
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.constrained = backend.token_level  # a local model: decoding runs over the labels only
        self.too_long = 0  # prompts longer than a local model's window: stepped as invalid actions, counted
        self.unparsed = 0  # API answers that named no action
        self.context_shown: list[int] = []  # past episodes in the prompt, at each lockstep step
        self.reset()

    def reset(self) -> None:
        """Forget the past episodes (evaluation starts every stage afresh)."""
        self.history: list[PastEpisode] = []
        self._approximate = ApproximateContexts(self.max_contexts, self.max_episodes, self.p_keep)
        self._chosen: list[int] = []
        self._context_text = ""
        self._shown = 0

    def labels(self, n: int) -> list[str]:
        return action_labels(n)  # the digit and letter labels, as the reference agents (no tokenizer to check)

    # -- the context ------------------------------------------------------------------------------

    def observe(self, episodes) -> None:
        """Add finished episodes to the history and pick the context of the next batch."""
        start = len(self.history)
        self.history += [past_episode(e) for e in episodes]
        strategy = AGENT_CONTEXTS[self.context]
        feedbacks = [int(e.success) for e in self.history]
        t = len(self.history)
        if strategy is None or self.max_episodes == 0:
            self._chosen = []
        elif strategy == "approximate_only_positive":
            for j in range(start + 1, t + 1):  # each new episode is offered once, in order
                _, self._chosen = self._approximate.step(j, feedbacks[:j], step_rng(self.seed, j))
        else:
            p_keep = self.p_keep if strategy == "random_unbiased_only_positive" else 1.0
            self._chosen = random_context(feedbacks, step_rng(self.seed, t), strategy, self.max_episodes, p_keep)
        self._context_text = self._render_context(self._chosen)

    def _count_tokens(self, text: str) -> int:
        tokenizer = getattr(self.backend, "tokenizer", None)
        if tokenizer is None:
            return len(text) // 4 + 1  # an API model's tokenizer is not known here: ~4 characters a token
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render_context(self, chosen: list[int]) -> str:
        """The chosen episodes that fit ``context_tokens``, newest kept first, shown oldest first. Only the newest
        is cut to fit (its oldest steps left out); an older one that does not fit ends the context."""
        parts, used = [], 0
        for i in reversed(chosen):
            episode = self.history[i]
            for skip in range(len(episode.steps) + 1) if not parts else [0]:
                text = render_episode(i + 1, episode, skip)
                cost = self._count_tokens(text)
                if used + cost <= self.context_tokens:
                    break
            else:
                break
            parts.append(text)
            used += cost
        self._shown = len(parts)
        return "\n\n".join(reversed(parts))

    def messages(self, prompt: str) -> list[dict]:
        """The chat prompt of one state: the context first (shared by the batch), then the policy's prompt."""
        system = SYSTEM_PROMPT + (CONTEXT_SENTENCE if self._context_text else "")
        body = prompt.rstrip()
        if self._context_text:
            body = f"Earlier episodes:\n\n{self._context_text}\n\nThe current episode:\n\n{body}"
        return [{"role": "system", "content": system}, {"role": "user", "content": body}]

    # -- acting -----------------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, envs, observations, prompts, greedy: bool, generator: torch.Generator, labels=None) -> Decision:
        labels = labels or [self.labels(len(o.actions)) for o in observations]
        self.context_shown.append(self._shown)
        n = len(prompts)
        actions: list[int | None] = [None] * n
        logprobs = [float("nan")] * n
        temperature = 0.0 if greedy else self.temperature
        groups: dict[tuple[str, ...], list[int]] = {}
        for b, row in enumerate(labels):
            groups.setdefault(tuple(row), []).append(b)
        for row, members in groups.items():
            chats = [self.messages(prompts[b]) for b in members]
            fits = [self._fits(chat) for chat in chats]
            members = [b for b, ok in zip(members, fits) if ok]
            chats = [chat for chat, ok in zip(chats, fits) if ok]
            self.too_long += len(fits) - len(members)
            if not members:
                continue
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            if self.constrained:
                gens = self.backend.generate(
                    chats, temperature=temperature, choices=list(row), seed=seed, prefill=ANSWER_PREFIX
                )
                picked = [g.choice for g in gens]
            else:
                seeds = [seed + k for k in range(len(chats))]
                gens = self.backend.generate(
                    chats, max_tokens=self.max_tokens, temperature=temperature, seed=seeds, stop=["\n\n"]
                )
                picked = [self._parse(g.text, list(row), prompts[b]) for g, b in zip(gens, members)]
            for b, gen, a in zip(members, gens, picked):
                actions[b] = a
                if a is not None and gen.logprob is not None:
                    logprobs[b] = gen.logprob
        zeros = [0.0] * n
        return Decision(actions, logprobs, zeros, zeros)

    def _fits(self, chat: list[dict]) -> bool:
        """Whether a local model's window holds the prompt and its answer (API models: always assumed)."""
        limit = getattr(self.backend, "max_positions", None)
        if not self.constrained or limit is None:
            return True
        return len(self.backend.encode(chat, ANSWER_PREFIX)) + 8 <= limit

    def _parse(self, text: str, labels: list[str], prompt: str) -> int | None:
        """The action a free answer names: its label (``3``, ``Action: 3``, also ``Action: 3`` inside a sentence),
        else the action's text."""
        answer = text.strip()
        if answer.lower().startswith(ANSWER_PREFIX.lower()):
            answer = answer[len(ANSWER_PREFIX) :]
        index = parse_label(answer, labels)
        if index is None:  # "... so my answer is Action: 3." (small chat models rarely answer tersely)
            named = ANSWER_IN_TEXT.search(answer)
            index = parse_label(named.group(1), labels) if named else None
        if index is None:
            _, actions = split_policy_prompt(prompt)
            texts = [actions.get(label, "") for label in labels]
            if all(texts):
                index = parse_choice(answer, texts)
        if index is None:
            self.unparsed += 1
        return index

    def stats(self) -> dict:
        """What the summary records of the agent: usage, unparsed answers, the context it saw."""
        shown = self.context_shown
        return {
            "usage": self.backend.usage.to_dict(),
            "unparsed_answers": self.unparsed,
            "prompts_too_long": self.too_long,
            "context_episodes_mean": sum(shown) / len(shown) if shown else 0.0,
        }


def make_agent(args, seed: int) -> InContextAgent:
    """The agent the ``--agent_*`` flags (experiment_args.InContextAgentArguments) describe."""
    from llm import make_backend

    backend = make_backend(args.backend_arguments(), flag_prefix="agent_")
    return InContextAgent(
        backend,
        context=args.agent_context,
        max_episodes=args.agent_context_episodes,
        context_tokens=args.agent_context_tokens,
        p_keep=args.agent_p_keep,
        max_contexts=args.agent_max_contexts,
        temperature=args.agent_temperature,
        max_tokens=args.agent_max_tokens,
        seed=seed,
    )
