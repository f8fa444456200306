"""One batched rollout, shared by RL and evaluation, so what is evaluated is exactly what was trained.

N environments step in lockstep. At each step the frozen reflector (if any) writes a reflection for
every live environment, the agent reads state + reflection + labelled actions and picks one label,
and every environment steps. Each step keeps what an update needs: the prompt, the action, its
log-prob under the behaviour policy, the value estimate, the reference log-prob, the entropy, the
reward and the done flags (the paper's ``batched_answer``).

Agents share one small interface, ``act(envs, observations, prompts) -> Decision``: the LM policy,
and the random and oracle reference agents.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from envs.base import Observation, TextEnv
from envs.prompt import action_labels, label_token_ids, policy_prompt, reflection_prompt
from training.models import action_logprobs, generate_text, use_adapter


@dataclass
class Step:
    prompt: str
    n_actions: int
    action: int | None  # index into the admissible actions; None = invalid
    logprob: float
    entropy: float
    value: float
    ref_logprob: float
    reward: float
    terminated: bool
    truncated: bool
    invalid: bool
    reflection: str | None = None
    labels: list[str] = field(default_factory=list)
    # (A,) the frozen reference's log-probs over this step's labels (-inf past n_actions): the exact
    # KL(pi || ref) over the label distribution needs the whole row, not the sampled action's entry
    ref_logprobs: list[float] | None = None
    state_key: Hashable | None = None  # the env's state before the step (GiGPO's step groups)
    probs: list[float] | None = None  # (n_actions,) the policy's distribution over the labels (for viewers)


@dataclass
class Bootstrap:
    """The policy prompt of the state an episode was truncated in, and V of it (for GAE)."""

    prompt: str
    n_actions: int
    labels: list[str]
    value: float = 0.0


@dataclass
class Episode:
    seed: int
    stage: str
    steps: list[Step] = field(default_factory=list)
    success: bool = False
    # set when the horizon cut the episode and the agent has a value head: the return does not end
    # there unless the observation shows the time left (Taxi without history, ALFWorld)
    bootstrap: Bootstrap | None = None
    # what the environment's first observation tags the episode with (``Observation.extra["tags"]``, e.g.
    # AutoExplore's depth and repository): evaluation reports success per tag value
    tags: dict = field(default_factory=dict)

    @property
    def ret(self) -> float:
        return sum(s.reward for s in self.steps)

    def transcript(self) -> dict:
        """A JSON-ready record: every prompt, reflection, action and reward."""
        return {
            "seed": self.seed,
            "stage": self.stage,
            "tags": self.tags,
            "success": self.success,
            "return": self.ret,
            "length": len(self.steps),
            "steps": [
                {
                    "prompt": s.prompt,
                    "reflection": s.reflection,
                    "action": s.action,
                    "label": s.labels[s.action] if s.action is not None and s.labels else None,
                    "prob": math.exp(s.logprob) if math.isfinite(s.logprob) else None,
                    "reward": s.reward,
                    "invalid": s.invalid,
                    "probs": s.probs,
                }
                for s in self.steps
            ],
        }


@dataclass
class Decision:
    """An agent's choice for each live environment: action index (None = invalid) and statistics."""

    actions: list[int | None]
    logprobs: list[float]
    entropies: list[float]
    values: list[float]
    # per live env, the probabilities over its admissible actions (None: the agent has none, or the row
    # was not finite)
    probs: list[list[float] | None] | None = None


def _adapter_scope(model, adapter: str | None):
    return use_adapter(model, adapter) if adapter else contextlib.nullcontext()


class LMPolicy:
    """The policy model: samples (or takes the argmax of) one label over the admissible actions.

    ``value_head`` maps the last prompt token's hidden state to a value (PPO); ``adapter`` names the
    policy's LoRA adapter when several share one base.
    """

    def __init__(
        self,
        model,
        tokenizer,
        value_head=None,
        adapter: str | None = None,
        max_length: int | None = None,
        shuffle_labels: bool = False,
    ):
        self.model, self.tokenizer, self.value_head = model, tokenizer, value_head
        self.adapter, self.max_length = adapter, max_length
        self.shuffle_labels = shuffle_labels
        self.rows_scored = self.rows_computed = 0  # rows asked for and rows run (identical rows run once)
        self.prompt_counts = {"prompts": 0, "cut": 0}  # prompts run, and those cut to fit the window
        self._labels: list[str] = []
        self._ids: dict[str, int] = {}

    def labels(self, n: int) -> list[str]:
        """Labels for ``n`` actions: ``0, 1, 2, ...``, or with ``shuffle_labels`` a fresh random draw
        from the first max(n, 10) labels each step (the paper's ``shuffle_action``)."""
        if len(self._labels) < max(n, 10):
            self._labels = action_labels(max(n, 10), self.tokenizer)
            self._ids = dict(zip(self._labels, label_token_ids(self.tokenizer, self._labels)))
        if self.shuffle_labels:
            # the global RNG, which RL checkpoints save, so a resumed run draws the same labels
            return random.sample(self._labels[: max(n, 10)], n)
        return self._labels[:n]

    def label_ids(self, labels: list[list[str]]) -> torch.Tensor:
        """(B, A) token ids of each row's labels, padded with the row's first label (masked later)."""
        width = max(len(row) for row in labels)
        self.labels(width)
        return torch.tensor(
            [[self._ids[lab] for lab in row] + [self._ids[row[0]]] * (width - len(row)) for row in labels]
        )

    def score(self, prompts: list[str], n_actions: list[int], labels: list[list[str]] | None = None):
        """(logprobs (B, A), entropy (B,), values (B,) or None); differentiable. ``labels`` are each
        prompt's labels (default: the unshuffled ones).

        Identical rows (same prompt, same labels) get one forward pass whose outputs are repeated: the
        same numbers, and in backward the repeated rows' gradients add up, exactly as separate rows'
        would. Taxi without history has at most 500 prompts, so most of a batch repeats.
        """
        if labels is None:
            labels = [self.labels(max(n_actions))] * len(prompts)
        first: dict[tuple, int] = {}
        inverse = [first.setdefault((p, n, tuple(lab)), len(first)) for p, n, lab in zip(prompts, n_actions, labels)]
        self.rows_scored += len(prompts)
        self.rows_computed += len(first)
        if len(first) == len(prompts):
            return self._score(prompts, n_actions, labels)
        unique = list(first)
        logprobs, entropy, values = self._score(
            [u[0] for u in unique], [u[1] for u in unique], [list(u[2]) for u in unique]
        )
        index = torch.tensor(inverse, device=logprobs.device)
        return logprobs[index], entropy[index], values[index] if values is not None else None

    def _score(self, prompts: list[str], n_actions: list[int], labels: list[list[str]]):
        ids = self.label_ids(labels)
        with _adapter_scope(self.model, self.adapter):
            if self.value_head is None:
                logprobs, entropy = action_logprobs(
                    self.model, self.tokenizer, prompts, n_actions, ids, self.max_length, counts=self.prompt_counts
                )
                return logprobs, entropy, None
            logprobs, entropy, hidden = action_logprobs(
                self.model,
                self.tokenizer,
                prompts,
                n_actions,
                ids,
                self.max_length,
                return_hidden=True,
                counts=self.prompt_counts,
            )
        values = self.value_head(hidden.to(next(self.value_head.parameters()).dtype)).squeeze(-1)  # (B,)
        return logprobs, entropy, values

    @torch.no_grad()
    def act(self, envs, observations, prompts, greedy: bool, generator: torch.Generator, labels=None) -> Decision:
        n_actions = [len(o.actions) for o in observations]
        logprobs, entropy, values = self.score(prompts, n_actions, labels)
        logprobs = logprobs.float().cpu()
        actions: list[int | None] = []
        chosen: list[float] = []
        probs: list[list[float] | None] = []
        for b in range(len(prompts)):
            row = logprobs[b, : n_actions[b]]
            if not torch.isfinite(row.exp().sum()) or not bool(torch.isfinite(row).any()):
                actions.append(None)  # non-finite logits: an invalid action, counted by the env
                chosen.append(float("nan"))
                probs.append(None)
                continue
            a = int(row.argmax()) if greedy else int(torch.multinomial(row.exp(), 1, generator=generator))
            actions.append(a)
            chosen.append(float(row[a]))
            probs.append(row.exp().tolist())
        vals = values.float().cpu().tolist() if values is not None else [0.0] * len(prompts)
        return Decision(actions, chosen, entropy.float().cpu().tolist(), vals, probs)


# A reflection ends where the policy prompt's next section would begin.
STOP_STRINGS = ("\n\n#", "# Action")


class Reflector:
    """The frozen reflection model: writes the text after ``# Analyze:``, up to EOS or a token cap.

    ``temperature=0`` decodes greedily. A frozen model decoding greedily is a function of its prompt, so
    those reflections are memoised by prompt text: when prompts repeat (Taxi without history has at
    most 500 states) rollouts soon stop paying for generation at all. ``hits``/``calls`` count it.
    """

    MEMO_LIMIT = 200_000

    def __init__(self, model, tokenizer, adapter: str | None = None, max_new_tokens: int = 48, temperature=1.0):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.memo: dict[str, str] = {}
        self.hits = self.calls = 0
        self.prompt_counts = {"prompts": 0, "cut": 0}  # prompts generated from, and those cut to fit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @torch.no_grad()
    def reflect(self, observations: list[Observation]) -> list[str]:
        prompts = [reflection_prompt(o) for o in observations]
        self.calls += len(prompts)
        if not self.greedy:
            return self._generate(prompts)
        known = {p: self.memo[p] for p in prompts if p in self.memo}
        self.hits += sum(p in known for p in prompts)
        todo = sorted(set(prompts) - known.keys())
        fresh = dict(zip(todo, self._generate(todo))) if todo else {}
        if len(self.memo) + len(fresh) > self.MEMO_LIMIT:
            self.memo.clear()
        self.memo.update(fresh)
        return [known[p] if p in known else fresh[p] for p in prompts]

    def _generate(self, prompts: list[str]) -> list[str]:
        with _adapter_scope(self.model, self.adapter):
            texts = generate_text(
                self.model,
                self.tokenizer,
                prompts,
                self.max_new_tokens,
                self.temperature or 1.0,
                greedy=self.greedy,
                stop_strings=list(STOP_STRINGS),
                counts=self.prompt_counts,
            )
        return [t.strip() for t in texts]


class ServedReflector(Reflector):
    """The frozen reflector behind an OpenAI-compatible server (``--reflector_api_base``): the same prompts,
    token cap, temperature, stop strings and greedy memo as :class:`Reflector`, one lockstep step's requests
    sent concurrently by ``backend`` (an :class:`llm.openai_api.OpenAIBackend`). Sampled requests carry seeds
    drawn from the global generator (which RL checkpoints), so a server that honours seeds answers a resumed
    run as the uninterrupted one. Greedy, it gives what the same model gives locally."""

    def __init__(self, backend, max_new_tokens: int = 48, temperature=1.0):
        super().__init__(None, None, None, max_new_tokens, temperature)
        self.backend = backend

    def _generate(self, prompts: list[str]) -> list[str]:
        seeds = None if self.greedy else torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        answers = self.backend.generate(
            prompts,
            max_tokens=max(1, self.max_new_tokens),
            temperature=self.temperature,
            stop=list(STOP_STRINGS),
            seed=seeds,
        )
        return [a.text.strip() for a in answers]


class RandomAgent:
    """Uniform over the admissible actions (a reference point in evaluation)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def labels(self, n: int) -> list[str]:
        return action_labels(n)

    def act(self, envs, observations, prompts, greedy, generator, labels=None) -> Decision:
        actions = [self.rng.randrange(len(o.actions)) for o in observations]
        lps = [-math.log(len(o.actions)) for o in observations]
        ents = [math.log(len(o.actions)) for o in observations]
        return Decision(actions, lps, ents, [0.0] * len(observations))


class OracleAgent:
    """The environment's expert (``TextEnv.oracle_action``, where ``has_expert``); an upper reference."""

    def labels(self, n: int) -> list[str]:
        return action_labels(n)

    def act(self, envs, observations, prompts, greedy, generator, labels=None) -> Decision:
        n = len(observations)
        return Decision([env.oracle_action() for env in envs], [0.0] * n, [0.0] * n, [0.0] * n)


def rollout(
    envs: list[TextEnv],
    seeds: list[int],
    agent,
    reflector: Reflector | None = None,
    reference: LMPolicy | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    bootstrap: bool = False,
    on_episode=None,
) -> list[Episode]:
    """Run one episode per seed, the envs in lockstep; returns the episodes in the order of ``seeds``.

    The envs are slots: with fewer envs than seeds, an env whose episode ends starts the next seed's at
    once (a vector env's auto-reset), so every lockstep step runs a full batch until the seeds run out,
    instead of the batch emptying as episodes end. ``on_episode(episode)`` is called as each one ends.
    ``reflector=None`` is the no-reflection setting: the prompt has no ``# Analyze:`` section.
    ``reference`` (the frozen SFT policy) adds ``ref_logprob`` and ``ref_logprobs`` to each step for
    the KL term. With ``bootstrap`` (an agent with a value head) an episode cut by the horizon gets
    the prompt and value of the state it stopped in (reflected like any other state).
    """
    if not envs or len(envs) > len(seeds):
        raise ValueError(f"{len(envs)} environments for {len(seeds)} seeds: need 1 to one per seed")
    generator = generator or torch.Generator().manual_seed(0)
    episodes: list[Episode | None] = [None] * len(seeds)
    observations: list[Observation | None] = [None] * len(envs)
    running = [0] * len(envs)  # the episode (index into seeds) each env is playing

    def start(i: int, k: int) -> None:
        observations[i] = obs = envs[i].reset(seed=seeds[k])
        episodes[k] = Episode(seed=seeds[k], stage=getattr(envs[i], "stage", ""), tags=dict(obs.extra.get("tags", {})))
        running[i] = k

    for i in range(len(envs)):
        start(i, i)
    upcoming = iter(range(len(envs), len(seeds)))
    live = list(range(len(envs)))
    while live:
        obs = [observations[i] for i in live]
        reflections, labels, prompts = _prompts(agent, reflector, obs)
        decision = agent.act([envs[i] for i in live], obs, prompts, greedy, generator, labels)
        ref_rows: list[list[float] | None] = [None] * len(live)
        if reference is not None:
            with torch.no_grad():
                ref, _, _ = reference.score(prompts, [len(o.actions) for o in obs], labels)
            ref_rows = ref.float().cpu().tolist()
        ref_logprobs = [
            float(ref_rows[b][a]) if a is not None and ref_rows[b] else 0.0 for b, a in enumerate(decision.actions)
        ]
        still_live, ended, cut = [], [], []
        for b, i in enumerate(live):
            action = decision.actions[b]
            key = envs[i].state_key()
            next_obs, reward, terminated, truncated, info = envs[i].step(action)
            episode = episodes[running[i]]
            episode.steps.append(
                Step(
                    prompt=prompts[b],
                    n_actions=len(obs[b].actions),
                    action=action,
                    logprob=decision.logprobs[b],
                    entropy=decision.entropies[b],
                    value=decision.values[b],
                    ref_logprob=ref_logprobs[b],
                    reward=float(reward),
                    terminated=bool(terminated),
                    truncated=bool(truncated),
                    invalid=bool(info.get("invalid_action", action is None)),
                    reflection=reflections[b],
                    labels=labels[b],
                    ref_logprobs=ref_rows[b],
                    state_key=key,
                    probs=decision.probs[b] if decision.probs is not None else None,
                )
            )
            observations[i] = next_obs
            if terminated or truncated:
                episode.success = bool(info.get("success", False))
                if truncated and not terminated:
                    cut.append((next_obs, episode))
                ended.append(i)
            else:
                still_live.append(i)
        if bootstrap and cut:
            _bootstrap(agent, reflector, [o for o, _ in cut], [e for _, e in cut])
        for i in ended:
            if on_episode is not None:
                on_episode(episodes[running[i]])
            k = next(upcoming, None)
            if k is not None:
                start(i, k)
                still_live.append(i)
        live = still_live
    return episodes


def _prompts(agent, reflector, observations: list[Observation]) -> tuple[list, list[list[str]], list[str]]:
    """(reflections, labels, policy prompts) of the observations: the reflector writes first (if any)."""
    reflections = reflector.reflect(observations) if reflector is not None else [None] * len(observations)
    labels = [agent.labels(len(o.actions)) for o in observations]
    prompts = [policy_prompt(o, lab, r) for o, lab, r in zip(observations, labels, reflections)]
    return reflections, labels, prompts


@torch.no_grad()
def _bootstrap(agent, reflector, observations: list[Observation], episodes: list[Episode]) -> None:
    _, labels, prompts = _prompts(agent, reflector, observations)
    n_actions = [len(o.actions) for o in observations]
    _, _, values = agent.score(prompts, n_actions, labels)
    for ep, prompt, n, lab, v in zip(episodes, prompts, n_actions, labels, values.float().cpu().tolist()):
        ep.bootstrap = Bootstrap(prompt, n, lab, v)


def prompts_cut(*parts) -> int:
    """How many prompts so far the given policies and reflectors cut to fit the model's window (agents
    without a model, and None, count 0)."""
    return sum(part.prompt_counts["cut"] for part in parts if hasattr(part, "prompt_counts"))


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """Namespaced environment metrics of a batch of episodes."""
    steps = [s for e in episodes for s in e.steps]
    n = max(len(episodes), 1)
    return {
        "env/success_rate": sum(e.success for e in episodes) / n,
        "env/return": sum(e.ret for e in episodes) / n,
        "env/episode_length": sum(len(e.steps) for e in episodes) / n,
        "env/invalid_action_rate": sum(s.invalid for s in steps) / max(len(steps), 1),
        "env/steps": float(len(steps)),
    }
