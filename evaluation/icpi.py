"""In-context policy iteration (Brooks et al., "Large Language Models Can Implement Policy Iteration", NeurIPS
2023) and its baselines on the six ICPI environments (``envs/icpi.py``; reference
``../shared/reference/icrl_baselines.md`` C).

    python -m evaluation.icpi --icpi_stage chain --method icpi --backend local --model smollm2-135m \
        --total_steps 60 --prompt_tokens 400 --output_dir runs/icpi/chain
    python -m evaluation.icpi --icpi_stage maze --method tabular_q --total_steps 300 --output_dir runs/icpi/maze_q

ICPI learns with no weight update. Every trajectory goes into a buffer; at each step, with a probability that
rises with the number of stored trajectories (a sigmoid around ``--min_successes``), the agent acts with the
model, otherwise at random. To act, it estimates Q(s, a) for every action by a rollout of the language model
used both as the world model and as the rollout policy, each query a few-shot prompt of buffer transitions:

    for u < max_q_steps:  done ~ LM(done examples of a + S + A)        "assert done" | "assert not done"
                          r    ~ LM(reward examples of a, done + S + A)  G += gamma^u r; stop if done
                          S    ~ LM(next-state examples of a + S + A)
                          A    ~ LM(sub-trajectories of the last c trajectories + initial + S)

and takes the argmax (random tie-break). The rollouts of all actions of a state advance in lockstep: each query
is one batched ``backend.generate`` over the actions still rolling out. A completion that does not parse is
resampled with a fresh shuffle (``--max_resamples`` tries); a world-model prediction that never parses ends
that rollout with the return so far, an action that never parses is drawn at random; both are counted
(``model/unparsed/*`` in the summary), never raised.

Methods: ``icpi``; ``no_argmax`` (the LLM policy prompted with the trajectories acts directly, greedily, as the
original's Pi); ``matching`` (ICPI with the buffer's most recent identical state-action pair answering each
world-model query and the most recent identical state answering the policy: no match ends the rollout / gives a
random action); ``tabular_q`` (Q-learning, lr 1, optimistic Q0 = 1); ``random``.

The run folder holds ``config.yaml``, ``episodes.jsonl`` (one row per episode: start, every step with whether
the model chose it and its Q estimates, discounted and undiscounted return, optimal return, regret) and
``summary.json`` (mean return, total regret, the regret curve, model calls, tokens and unparsed counts, wall
time). **Resume**: rerunning the command in the same folder continues after the last whole episode; each
episode draws from its own generator (seeded by ``--seed`` and its index), so a resumed run takes the same
steps as one that was never stopped, and ``--total_steps`` may be raised to extend a finished run. Other
changed settings are refused unless ``--overwrite_output_dir`` starts over.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from envs.icpi import IcpiEnv, TimeStep, as_state
from evaluation.icrl.run import RUNTIME_ONLY_FLAGS, add_usage, read_jsonl
from experiment_args import ICPIArguments, IcpiArguments, UsageError
from llm import make_backend
from llm.base import Backend
from run_utils import atomic_write_text, check_output_dir, cli, parse_args, resolved_config, save_config

Buffer = Sequence[list[TimeStep]]
KINDS = ("done", "reward", "state", "action")

# ---------------------------------------------------------------------------------------------------
# 1. prompts (C.3): shuffled examples, then the query; no instructions
# ---------------------------------------------------------------------------------------------------


def extend(items: list, length: int, rng: np.random.Generator) -> list:
    """``items`` upsampled to ``length`` by random duplication: shuffle, cycle, shuffle (the original's extend)."""
    items = list(items)
    rng.shuffle(items)
    out = [items[k % len(items)] for k in range(length)]
    rng.shuffle(out)
    return out


def balanced(groups: list[list], rng: np.random.Generator, balance: bool = True) -> list:
    """The groups' items interleaved after upsampling each to the largest group's size, then shuffled.
    Empty groups are dropped; without ``balance`` the items are just pooled and shuffled."""
    groups = [g for g in groups if g]
    if balance and len(groups) > 1:
        size = max(len(g) for g in groups)
        groups = [extend(g, size, rng) for g in groups]
        items = [item for row in zip(*groups) for item in row]
    else:
        items = [item for g in groups for item in g]
    rng.shuffle(items)
    return items


def _steps(buffer: Buffer, keep: Callable[[TimeStep], bool]) -> list[TimeStep]:
    return [ts for trajectory in buffer for ts in trajectory if keep(ts)]


def done_examples(
    env: IcpiEnv, buffer: Buffer, action: int, rng: np.random.Generator,
    hint: bool = True, balance: bool = True, constrain: bool = True,
) -> list[str]:  # fmt: skip
    """Steps that took ``action`` (all steps unconstrained), balanced between done and not done."""
    steps = _steps(buffer, lambda ts: not constrain or ts.action == action)
    groups = [[ts for ts in steps if ts.done], [ts for ts in steps if not ts.done]]
    return [
        env.state_str(ts.state, hint) + env.action_str(ts.action) + env.done_str(ts.done) + "\n" + "\n"
        for ts in balanced(groups, rng, balance)
    ]


def reward_examples(
    env: IcpiEnv, buffer: Buffer, action: int, done: bool, rng: np.random.Generator,
    hint: bool = True, balance: bool = True, constrain: bool = True,
) -> list[str]:  # fmt: skip
    """Steps that took ``action`` and whose done is the predicted one, balanced across reward values."""
    steps = _steps(buffer, lambda ts: not constrain or (ts.action == action and ts.done == done))
    by_reward: dict[float, list[TimeStep]] = {}
    for ts in steps:
        by_reward.setdefault(ts.reward, []).append(ts)
    return [
        env.state_str(ts.state, hint) + env.action_str(ts.action) + env.reward_str(ts.reward) + env.reward_stop + "\n"
        for ts in balanced(list(by_reward.values()), rng, balance)
    ]


def next_state_examples(
    env: IcpiEnv, buffer: Buffer, action: int, rng: np.random.Generator,
    hint: bool = True, balance: bool = True, constrain: bool = True,
) -> list[str]:  # fmt: skip
    """Steps that took ``action`` and did not end the episode. The original balances successful against
    unsuccessful trajectories; with sil = false (the paper's setting) every trajectory counts as successful,
    so that balance is a no-op and the steps are only shuffled."""
    steps = _steps(buffer, lambda ts: not constrain or (ts.action == action and not ts.done))
    rng.shuffle(steps)
    return [
        env.state_str(ts.state, hint) + env.action_str(ts.action) + env.state_str(ts.next_state, hint) + "\n"
        for ts in steps
    ]


def policy_examples(env: IcpiEnv, success_buffer: Buffer, rng: np.random.Generator, hint: bool = True) -> list[str]:
    """Every contiguous sub-trajectory [i:j] of every trajectory in the success buffer, rendered from the reset
    line, shuffled."""
    examples = [
        env.initial_str + "".join(env.ts_to_string(ts, hint) for ts in trajectory[i:j])
        for trajectory in success_buffer
        for i in range(len(trajectory))
        for j in range(i + 1, len(trajectory) + 1)
    ]
    rng.shuffle(examples)
    return examples


def clip_left(examples: list[str], query: str, budget: int, count_tokens: Callable[[str], int]) -> str:
    """The examples that fit in ``budget`` tokens with the query, dropped from the left: the original clips the
    joined prompt's tokens from the left, so the examples that survive are a random (shuffled) suffix. Whole
    examples are dropped here, so the prompt never starts mid-line."""
    used, kept = count_tokens(query), 0
    for example in reversed(examples):
        used += count_tokens(example)
        if used > budget:
            break
        kept += 1
    return "".join(examples[len(examples) - kept :]) + query


def token_counter(backend: Backend | None) -> Callable[[str], int]:
    """Exact counts with a local model's tokenizer (memoised: examples repeat across calls), else characters / 4."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        return lambda text: math.ceil(len(text) / 4)
    memo: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in memo:
            memo[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return memo[text]

    return count


def buffer_ready(buffer: Buffer, success_buffer: Buffer, n_actions: int, constrain: bool = True) -> bool:
    """The original's ``q.ready()``: done and reward examples for every action, next-state examples for some
    action, and at least one policy sub-trajectory."""
    steps = _steps(buffer, lambda ts: True)
    taken = {ts.action for ts in steps}
    every_action = bool(steps) if not constrain else len(taken) == n_actions
    return every_action and any(not ts.done for ts in steps) and any(len(t) > 0 for t in success_buffer)


# ---------------------------------------------------------------------------------------------------
# 2. the two models behind the rollouts: the language model, and the matching baseline
# ---------------------------------------------------------------------------------------------------


class LanguageModel:
    """World model and rollout policy of few-shot prompts; each ``predict_*`` is one batched call per try."""

    def __init__(
        self, env: IcpiEnv, backend: Backend, buffer: Buffer, success_buffer: Buffer, args: ICPIArguments,
        hint: bool, count_tokens: Callable[[str], int],
    ):  # fmt: skip
        self.env, self.backend, self.args, self.hint = env, backend, args, hint
        self.buffer, self.success_buffer = buffer, success_buffer
        self.count_tokens = count_tokens
        self.counters: Counter = Counter()
        self.bad_completions: deque = deque(maxlen=5)  # the latest unparseable completions, for the summary

    def encode(self, state) -> str:
        return self.env.state_str(state, self.hint)

    def _predict(self, kind, queries, examples, parse, rng, temperature=None) -> list:
        """One parsed value per query, or None after ``max_resamples`` tries. Each try redraws the shuffle,
        up to ``max_prompts`` times to avoid a prompt already tried for that query."""
        args = self.args
        results: list = [None] * len(queries)
        pending, tried = list(range(len(queries))), [set() for _ in queries]
        for _ in range(args.max_resamples):
            if not pending:
                break
            prompts = []
            for i in pending:
                for _ in range(args.max_prompts):
                    prompt = clip_left(examples(i), queries[i], args.prompt_tokens, self.count_tokens)
                    if prompt not in tried[i]:
                        break
                tried[i].add(prompt)
                prompts.append(prompt)
            # Every completion stops at its first newline: each prediction is one line (the original's multi-line
            # stops for catch's action and invaders' reward only add fixed text after the parsed line).
            gens = self.backend.generate(
                prompts, max_tokens=args.max_tokens, stop=["\n"], seed=int(rng.integers(2**31 - 1)),
                temperature=args.temperature if temperature is None else temperature,
            )  # fmt: skip
            self.counters["llm/calls"] += 1
            self.counters["llm/prompts"] += len(prompts)
            still = []
            for i, gen in zip(pending, gens):
                value = parse(gen.text) if gen.finish_reason == "stop" else None
                if value is None:
                    still.append(i)
                    self.counters[f"model/invalid_tries/{kind}"] += 1
                    self.bad_completions.append({"kind": kind, "completion": gen.text[:200]})
                else:
                    results[i] = value
            pending = still
        self.counters[f"model/unparsed/{kind}"] += len(pending)
        return results

    def predict_done(self, queries: list[tuple[str, int]], rng) -> list[bool | None]:
        env, args, hint = self.env, self.args, self.hint

        def examples(i):
            return done_examples(
                env, self.buffer, queries[i][1], rng, hint, args.balance_prompts, args.constrain_prompts
            )

        texts = [s + env.action_str(a) for s, a in queries]
        return self._predict("done", texts, examples, env.parse_done, rng)

    def predict_reward(self, queries: list[tuple[str, int, bool]], rng) -> list[float | None]:
        env, args, hint = self.env, self.args, self.hint

        def examples(i):
            _, a, d = queries[i]
            return reward_examples(env, self.buffer, a, d, rng, hint, args.balance_prompts, args.constrain_prompts)

        texts = [s + env.action_str(a) for s, a, _ in queries]
        return self._predict("reward", texts, examples, env.parse_reward, rng)

    def predict_next_state(self, queries: list[tuple[str, int]], rng) -> list[str | None]:
        env, args, hint = self.env, self.args, self.hint

        def examples(i):
            a = queries[i][1]
            return next_state_examples(env, self.buffer, a, rng, hint, args.balance_prompts, args.constrain_prompts)

        def parse(text: str) -> str | None:
            # the model's own text goes on (as in the original); it only has to describe a state of the env
            return text.strip() + "\n" if env.parse_state(text) is not None else None

        texts = [s + env.action_str(a) for s, a in queries]
        return self._predict("state", texts, examples, parse, rng)

    def predict_action(self, states: list[str], rng, temperature: float | None = None) -> list[int | None]:
        env, policy_hint = self.env, self.args.policy_hint
        texts = [env.initial_str + s for s in states]
        return self._predict(
            "action", texts, lambda i: policy_examples(env, self.success_buffer, rng, policy_hint), env.parse_action,
            rng, temperature,
        )  # fmt: skip


class MatchingModel:
    """The matching baseline (``model_name=None`` in the original): the most recent buffer step with the same
    state (and action) answers; no match is None, which ends a rollout (or gives a random action)."""

    def __init__(self, buffer: Buffer):
        self.buffer = buffer
        self.counters: Counter = Counter()
        self.bad_completions: deque = deque(maxlen=0)

    def encode(self, state):
        return state

    def _latest(self, state, action=None) -> TimeStep | None:
        for trajectory in reversed(self.buffer):
            for ts in reversed(trajectory):
                if ts.state == state and (action is None or ts.action == action):
                    return ts
        return None

    def _answer(self, kind: str, found: list[TimeStep | None], field: str) -> list:
        self.counters[f"model/unparsed/{kind}"] += sum(ts is None for ts in found)
        return [None if ts is None else getattr(ts, field) for ts in found]

    def predict_done(self, queries, rng):
        return self._answer("done", [self._latest(s, a) for s, a in queries], "done")

    def predict_reward(self, queries, rng):
        return self._answer("reward", [self._latest(s, a) for s, a, _ in queries], "reward")

    def predict_next_state(self, queries, rng):
        return self._answer("state", [self._latest(s, a) for s, a in queries], "next_state")

    def predict_action(self, states, rng, temperature=None):
        return self._answer("action", [self._latest(s) for s in states], "action")


# ---------------------------------------------------------------------------------------------------
# 3. Q estimation (C.2): one rollout per action, all actions in lockstep
# ---------------------------------------------------------------------------------------------------


def q_values(env: IcpiEnv, model, state, rng: np.random.Generator) -> list[float]:
    """The discounted return of a model rollout from (state, a), for every action a."""
    n = len(env.actions)
    states, actions, returns = [model.encode(state)] * n, list(range(n)), [0.0] * n
    live = list(range(n))
    model.counters["model/rollouts"] += n
    for u in range(env.max_q_steps):
        # 1. done, then 2. the reward given done; an unparsed prediction ends the rollout with G so far
        dones = model.predict_done([(states[i], actions[i]) for i in live], rng)
        known = [(i, d) for i, d in zip(live, dones) if d is not None]
        rewards = model.predict_reward([(states[i], actions[i], d) for i, d in known], rng)
        live = []
        for (i, done), reward in zip(known, rewards):
            if reward is None:
                continue
            returns[i] += env.gamma**u * reward
            if not done:
                live.append(i)
        if not live or u + 1 == env.max_q_steps:  # nothing after the last reward changes G
            break
        # 3. next state, then 4. the rollout policy's action (random when it never parses)
        nexts = model.predict_next_state([(states[i], actions[i]) for i in live], rng)
        moved = []
        for i, next_state in zip(live, nexts):
            if next_state is not None:
                states[i] = next_state
                moved.append(i)
        live = moved
        picks = model.predict_action([states[i] for i in live], rng)
        for i, a in zip(live, picks):
            actions[i] = a if a is not None else int(rng.integers(n))
    return returns


def argmax_random_tie(values: list[float], rng: np.random.Generator) -> int:
    best = max(values)
    return int(rng.choice([a for a, v in enumerate(values) if v == best]))


# ---------------------------------------------------------------------------------------------------
# 4. the tabular Q baseline (icpi/rl/tabular_q.py)
# ---------------------------------------------------------------------------------------------------


class TabularQ:
    """Q-learning on the true states, lr 1 and optimistic Q0 = 1 (the paper's). Unlike the original, which
    bootstraps on every step (``done=False`` in its update), a terminal step does not bootstrap; a step the
    time limit cut is stored with done False and does."""

    def __init__(self, n_actions: int, gamma: float, learning_rate: float = 1.0, initial_q: float = 1.0):
        self.n_actions, self.gamma, self.learning_rate, self.initial_q = n_actions, gamma, learning_rate, initial_q
        self.q: dict = {}

    def values(self, state) -> list[float]:
        return self.q.setdefault(state, [self.initial_q] * self.n_actions)

    def act(self, state, rng: np.random.Generator) -> int:
        return argmax_random_tie(self.values(state), rng)

    def update(self, ts: TimeStep) -> None:
        target = ts.reward + (0.0 if ts.done else self.gamma * max(self.values(ts.next_state)))
        q = self.values(ts.state)
        q[ts.action] += self.learning_rate * (target - q[ts.action])


# ---------------------------------------------------------------------------------------------------
# 5. the outer loop (C.1), outputs and resume
# ---------------------------------------------------------------------------------------------------


def use_model_probability(successes: int, min_successes: int) -> float:
    """1 / (1 + exp(2 (min_successes - successes))): ~0 with no success, 1/2 at min_successes."""
    return 1.0 / (1.0 + math.exp(2.0 * (min_successes - successes)))


def episode_seed(seed: int, episode: int) -> int:
    """The environment seed of an episode: the same starts for every method of one --seed."""
    return seed * 1_000_003 + episode


def discounted(rewards: list[float], gamma: float) -> float:
    return float(sum(gamma**t * r for t, r in enumerate(rewards)))


def to_json(value):
    return [to_json(v) for v in value] if isinstance(value, tuple | list) else value


def play_episode(args, env: IcpiEnv, episode: int, agent: Callable, ready: Callable[[], bool], success_count: int):
    """One episode of the outer loop; returns (its steps, its JSON row without the running totals)."""
    rng = np.random.default_rng([args.seed, episode])
    prob = use_model_probability(success_count, args.min_successes)
    env.reset(seed=episode_seed(args.seed, episode))
    start, steps, records = env.start, [], []
    terminated = truncated = False
    info: dict = {}
    while not (terminated or truncated):
        state = env.state
        use_model = args.method != "random" and rng.random() < prob and ready()
        q = None
        if use_model:
            action, q = agent(state, rng)
        else:
            action = int(rng.integers(len(env.actions)))
        _, reward, terminated, truncated, info = env.step(action)
        # C.1: a step the time limit cut is stored as not done, so no model learns that the state was terminal
        steps.append(TimeStep(state, action, float(reward), bool(terminated), env.state))
        records.append({
            "state": to_json(state), "action": action, "action_name": env.actions[action], "reward": float(reward),
            "done": bool(terminated), "next_state": to_json(env.state), "model": use_model, "q_values": q,
        })  # fmt: skip
    rewards = [ts.reward for ts in steps]
    logged = discounted(rewards, env.log_gamma)
    row = {
        "episode": episode,
        "seed": episode_seed(args.seed, episode),
        "start": to_json(start),
        "length": len(steps),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "success": bool(info.get("success", False)),
        "return": logged,  # what regret compares: discounted by log_gamma (undiscounted for catch, invaders)
        "return_discounted": discounted(rewards, 0.8),
        "return_undiscounted": float(sum(rewards)),
        "optimal": env.optimal_return(start),
        "regret": env.optimal_return(start) - logged,
        "use_model_prob": prob,
        "model_steps": sum(r["model"] for r in records),
        "steps": records,
    }
    return steps, row


def summarize(args, stage: str, rows: list[dict], counters: Counter, extra: dict) -> dict:
    n = len(rows)

    def mean(xs: list) -> float | None:
        return float(np.mean(xs)) if xs else None

    cumulative = np.cumsum([r["regret"] for r in rows]).tolist()
    steps = sum(r["length"] for r in rows)
    model_steps = sum(r["model_steps"] for r in rows)
    last = rows[-10:]
    return {
        "name": f"{args.method} {stage} seed {args.seed}",
        "method": args.method,
        "stage": stage,
        "seed": args.seed,
        "model": args.model if args.uses_llm else None,
        "total_steps": args.total_steps,
        "steps": steps,
        "episodes": n,
        "finished": steps >= args.total_steps,
        "env/return_mean": mean([r["return"] for r in rows]),
        "env/return_mean_last10": mean([r["return"] for r in last]),
        "env/return_undiscounted_mean": mean([r["return_undiscounted"] for r in rows]),
        "env/optimal_mean": mean([r["optimal"] for r in rows]),
        "env/regret_total": cumulative[-1] if rows else 0.0,
        "env/regret_mean": mean([r["regret"] for r in rows]),
        "env/regret_mean_last10": mean([r["regret"] for r in last]),
        "env/success_rate": mean([float(r["success"]) for r in rows]),
        "agent/model_steps": model_steps,
        "agent/model_step_fraction": model_steps / steps if steps else None,
        # (step at the episode's end, cumulative regret): the paper's regret-vs-steps curve
        "regret_curve": [[sum(r["length"] for r in rows[: k + 1]), c] for k, c in enumerate(cumulative)],
        **{key: counters.get(key, 0) for key in ("llm/calls", "llm/prompts", "model/rollouts")},
        **{f"model/unparsed/{k}": counters.get(f"model/unparsed/{k}", 0) for k in KINDS},
        **{f"model/invalid_tries/{k}": counters.get(f"model/invalid_tries/{k}", 0) for k in KINDS},
        **extra,
    }


def run(args: ICPIArguments, env_args: IcpiArguments, backend: Backend | None = None) -> dict:
    """Run (or continue) one training run; returns the summary. ``backend`` replaces ``make_backend`` (tests)."""
    # 5a. run folder and what a previous session left
    output_dir = Path(args.output_dir)
    config = resolved_config(args, env_args)
    ignore = (*RUNTIME_ONLY_FLAGS, "total_steps", "batch_size", "device")
    check_output_dir(output_dir, config, overwrite=args.overwrite_output_dir, compare_ignore=ignore)
    rows_path, summary_path = output_dir / "episodes.jsonl", output_dir / "summary.json"
    rows = read_jsonl(rows_path)
    previous = json.loads(summary_path.read_text()) if summary_path.exists() and rows else {}

    # 5b. environment, buffers (rebuilt from the stored episodes) and the agent
    stage = env_args.icpi_stage
    env = env_args.make_env(stage)
    n_actions = len(env.actions)
    buffer: list[list[TimeStep]] = []
    # sil = false (the paper's setting): every trajectory enters the success buffer, which keeps the last c
    success_buffer: deque[list[TimeStep]] = deque(maxlen=args.success_buffer_size)
    tabular = TabularQ(n_actions, env.gamma) if args.method == "tabular_q" else None
    for row in rows:
        trajectory = [
            TimeStep(as_state(s["state"]), s["action"], s["reward"], s["done"], as_state(s["next_state"]))
            for s in row["steps"]
        ]
        buffer.append(trajectory)
        success_buffer.append(trajectory)
        for ts in trajectory if tabular is not None else ():
            tabular.update(ts)
    steps_done = sum(r["length"] for r in rows)

    if args.uses_llm and backend is None and steps_done < args.total_steps:
        backend = make_backend(args)
    window = getattr(backend, "max_positions", None)
    if window is not None and args.prompt_tokens + args.max_tokens > window:
        raise UsageError(
            f"--prompt_tokens {args.prompt_tokens} + --max_tokens {args.max_tokens} exceed the model's {window} "
            "positions; lower --prompt_tokens"
        )
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    save_config(output_dir, config)
    if rows_path.exists():  # the whole episodes only: a half-written last line (a crash mid-append) goes
        atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    if args.uses_llm:
        model = LanguageModel(env, backend, buffer, success_buffer, args, env_args.icpi_hint, token_counter(backend))
    else:
        model = MatchingModel(buffer)

    def agent(state, rng) -> tuple[int, list[float] | None]:
        if args.method in ("icpi", "matching"):
            values = q_values(env, model, state, rng)
            return argmax_random_tie(values, rng), values
        if args.method == "no_argmax":  # the original's Pi decodes greedily
            (action,) = model.predict_action([model.encode(state)], rng, temperature=0.0)
            return (action if action is not None else int(rng.integers(n_actions))), None
        return tabular.act(state, rng), list(tabular.values(state))

    def ready() -> bool:
        if args.method == "tabular_q":
            return True
        return buffer_ready(buffer, success_buffer, n_actions, args.constrain_prompts)

    # 5c. the episodes left; a summary after every episode
    # the counts of earlier sessions go on (the token counts come from the backend usage, summed below)
    from_usage = ("llm/prompt_tokens", "llm/completion_tokens")
    counters: Counter = Counter({
        k: v for k, v in previous.items()
        if k.startswith(("llm/", "model/")) and isinstance(v, int) and k not in from_usage
    })  # fmt: skip
    usage_before = previous.get("backend_usage", {})
    wall_before, start = previous.get("timing/wall_s", 0.0), time.perf_counter()

    def write_summary() -> dict:
        usage = add_usage(usage_before, backend.usage.to_dict() if backend is not None else {})
        extra = {
            "llm/prompt_tokens": usage.get("prompt_tokens", 0),
            "llm/completion_tokens": usage.get("completion_tokens", 0),
            "model/bad_completions": list(model.bad_completions),
            "backend_usage": usage,
            "timing/wall_s": round(wall_before + time.perf_counter() - start, 2),
            "timing/session_s": round(time.perf_counter() - start, 2),
        }
        summary = summarize(args, stage, rows, counters + model.counters, extra)
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        return summary

    bar = tqdm(total=args.total_steps, initial=min(steps_done, args.total_steps), desc=f"{args.method} {stage}",
               unit="step")  # fmt: skip
    try:
        while steps_done < args.total_steps:
            trajectory, row = play_episode(args, env, len(rows), agent, ready, len(success_buffer))
            buffer.append(trajectory)
            success_buffer.append(trajectory)
            for ts in trajectory if tabular is not None else ():
                tabular.update(ts)
            steps_done += len(trajectory)
            with open(rows_path, "a") as f:  # one write: the episode is in the file whole or (cut) dropped on resume
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            bar.update(min(len(trajectory), args.total_steps - bar.n))
            last = rows[-10:]
            unparsed = sum(v for k, v in (counters + model.counters).items() if k.startswith("model/unparsed/"))
            bar.set_postfix(ep=len(rows), ret10=f"{np.mean([r['return'] for r in last]):.3f}", unparsed=unparsed)
            write_summary()
    finally:  # a crash still records what the backend was paid for
        bar.close()
        summary = write_summary()
    return summary


# ---------------------------------------------------------------------------------------------------
# 6. main
# ---------------------------------------------------------------------------------------------------


@cli
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, env_args = parse_args((ICPIArguments, IcpiArguments), argv)
    summary = run(args, env_args)
    unparsed = sum(summary[f"model/unparsed/{k}"] for k in KINDS)
    print(
        f"{summary['name']}: mean return {summary['env/return_mean']:.3f} "
        f"(optimal {summary['env/optimal_mean']:.3f}), "
        f"total regret {summary['env/regret_total']:.3f} over {summary['episodes']} episodes / {summary['steps']} "
        f"steps; {summary['llm/calls']} model calls, {unparsed} unparsed predictions -> {args.output_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
