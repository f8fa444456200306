"""Online RL of the policy with a frozen reflection model (Reflect-RL, section 4).

    python -m training.rl_finetune --policy_path runs/sft_policy --reflector_path runs/sft_reflector \
        --output_dir runs/reflect_rl --algo ppo
    python -m training.rl_finetune --policy_path runs/sft_plain --output_dir runs/rl_noreflect   # no reflection
    accelerate launch --num_processes 2 -m training.rl_finetune ...                             # data-parallel

Read top to bottom: 1. setup, 2. rollout, 3. advantages and returns, 4. update, 5. logging,
6. checkpoint. ``--algo ppo`` (default) is PPO-clip with a value head on the policy, GAE, the exact
KL to the frozen SFT policy over the action labels and an entropy bonus; ``--algo reinforce`` is the
paper's update (discounted cost-to-go, optionally minus a baseline); ``--algo rloo`` and ``--algo grpo``
sample ``--group_size`` episodes of each task and use the group as the baseline (no critic), with
``--group_by_state`` adding GiGPO's step-level groups. The reflector never receives gradients.

Data-parallel: each of N processes (``accelerate launch``) steps ``num_envs / N`` environments; the
episodes are gathered so every process holds the whole batch, and each minibatch is split across the
processes, whose gradients are summed by an all-reduce before the (identical) optimizer step. There
is no DDP wrapper: the reflector and reference adapters share the policy's module and run outside
backward. Only the main process logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiment_args import ReflectorAPIArguments, RLArguments, UsageError
from run_utils import check_output_dir, cli, parse_with_env, resolve_resume, resolved_config, save_config
from training.players import load_players
from training.rollout import (
    Episode,
    LMPolicy,
    Reflector,
    ServedReflector,
    Step,
    episode_stats,
    prompts_cut,
    rollout,
)

# Settings a resumed run may change: its length (extend a run with a larger --iterations; a curriculum's
# stage boundaries move with it), how often it checkpoints and logs episodes, and where it lives (a run
# folder copied or moved elsewhere resumes there).
RESUME_MAY_CHANGE = ("iterations", "save_steps", "log_episodes", "output_dir")

# ---------------------------------------------------------------------------------------------------
# pure functions (unit-tested)
# ---------------------------------------------------------------------------------------------------


def discounted_returns(rewards: list[float], gamma: float, bootstrap: float = 0.0) -> list[float]:
    """G_t = r_t + gamma * G_{t+1} over one episode; ``bootstrap`` is V of the state after the last step
    (0 when the episode terminated)."""
    out, running = [0.0] * len(rewards), bootstrap
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def gae(
    rewards: list[float], values: list[float], gamma: float, lam: float, bootstrap: float = 0.0
) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one episode; ``bootstrap`` is V(s_T) after a truncation
    (0 after a terminal step)."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else bootstrap
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


def group_centred(scores: list[float], loo: bool, scale: bool) -> list[float]:
    """Each score minus its group's baseline: the mean of the others (``loo``, RLOO) or the group mean,
    optionally divided by the group's standard deviation (GRPO). A group of one has no baseline: 0."""
    n = len(scores)
    if n < 2:
        return [0.0] * n
    x = np.asarray(scores, dtype=np.float64)
    if loo:
        return list((x - (x.sum() - x) / (n - 1)).tolist())
    centred = x - x.mean()
    if scale:
        centred = centred / (x.std(ddof=1) + 1e-6)
    return list(centred.tolist())


def compute_advantages(
    episodes: list[Episode],
    algo: str,
    gamma: float,
    gae_lambda: float = 0.95,
    reinforce_baseline: str = "none",
    scale_group_std: bool = True,
    group_by_state: bool = False,
    step_advantage_weight: float = 1.0,
) -> tuple[list[list[float]], list[list[float]]]:
    """(advantages, returns), one list per episode and step, for a batch of finished episodes.

    Values come from ``step.value`` and ``episode.bootstrap`` (V of the state a truncated episode
    stopped in; without one the episode's end is terminal). ``returns`` are the value targets.
    - ppo: GAE(gamma, lambda).
    - reinforce: discounted return; baseline ``mean`` is the leave-one-out mean of the other episodes'
      returns at the same timestep (0 where no other episode got that far), ``value`` is V(s_t).
    - rloo / grpo: episodes with the same (seed, stage) are one group; every step gets its episode's
      total reward minus the group baseline (leave-one-out, or group mean / std for grpo).
      ``group_by_state`` adds ``step_advantage_weight`` times a step-level term: the discounted
      return of each step, centred among the group's steps taken from the same state (GiGPO).
    """
    returns = [
        discounted_returns([s.reward for s in ep.steps], gamma, ep.bootstrap.value if ep.bootstrap else 0.0)
        for ep in episodes
    ]
    if algo == "ppo":
        out = [
            gae(
                [s.reward for s in ep.steps],
                [s.value for s in ep.steps],
                gamma,
                gae_lambda,
                ep.bootstrap.value if ep.bootstrap else 0.0,
            )
            for ep in episodes
        ]
        return [a for a, _ in out], [r for _, r in out]
    if algo == "reinforce":
        if reinforce_baseline == "value":
            return [[g - s.value for g, s in zip(ret, ep.steps)] for ret, ep in zip(returns, episodes)], returns
        if reinforce_baseline == "none":
            return [list(ret) for ret in returns], returns
        by_t: dict[int, list[float]] = {}
        for ret in returns:
            for t, g in enumerate(ret):
                by_t.setdefault(t, []).append(g)
        advantages = []
        for ret in returns:
            row = []
            for t, g in enumerate(ret):
                others = len(by_t[t]) - 1
                row.append(g - (sum(by_t[t]) - g) / others if others else g)
            advantages.append(row)
        return advantages, returns
    if algo not in ("rloo", "grpo"):
        raise ValueError(f"unknown algo {algo!r}")
    loo, scale = algo == "rloo", algo == "grpo" and scale_group_std
    groups: dict[tuple, list[int]] = {}
    for i, ep in enumerate(episodes):
        groups.setdefault((ep.seed, ep.stage), []).append(i)
    advantages = [[0.0] * len(ep.steps) for ep in episodes]
    for members in groups.values():
        scores = group_centred([episodes[i].ret for i in members], loo, scale)
        for i, a in zip(members, scores):
            advantages[i] = [a] * len(episodes[i].steps)
        if not group_by_state:
            continue
        by_state: dict = {}
        for i in members:
            for t, step in enumerate(episodes[i].steps):
                if step.state_key is not None:
                    by_state.setdefault(step.state_key, []).append((i, t))
        for where in by_state.values():
            step_scores = group_centred([returns[i][t] for i, t in where], loo, scale)
            for (i, t), a in zip(where, step_scores):
                advantages[i][t] += step_advantage_weight * a
    return advantages, returns


def ppo_losses(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample clipped surrogate loss (N,) and per-sample diagnostics, over (N,) tensors."""
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():
        stats = {
            "policy/approx_kl": (ratio - 1) - logratio,  # k3: unbiased, >= 0
            "policy/clipfrac": ((ratio - 1).abs() > clip_coef).float(),
        }
    return pg_loss, stats


def exact_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) per row (B,) over the admissible labels, from (B, A) log-probs (-inf = not admissible).

    The action set is a few dozen labels at most and both distributions are computed anyway, so the
    KL is exact: no sampled estimator, and its gradient is that of KL(pi || ref), not KL(ref || pi).
    """
    admissible = torch.isfinite(logprobs)
    diff = torch.where(admissible, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    return (logprobs.exp() * diff).sum(-1)


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    var = np.var(returns)
    return float("nan") if var == 0 else float(1 - np.var(returns - values) / var)


# ---------------------------------------------------------------------------------------------------
# run state
# ---------------------------------------------------------------------------------------------------


class Curriculum:
    """Stages in order; switch evenly by iteration, or when the success rate reaches a threshold."""

    def __init__(self, stages: list[str], iterations: int, threshold: float):
        self.stages, self.iterations, self.threshold = stages, iterations, threshold
        self.index = 0

    @property
    def stage(self) -> str:
        return self.stages[self.index]

    def update(self, iteration: int, success_rate: float) -> bool:
        """Move on after ``iteration`` (0-based, just finished); True when the stage changed."""
        before = self.index
        if self.threshold > 0:
            if success_rate >= self.threshold and self.index + 1 < len(self.stages):
                self.index += 1
        else:
            self.index = min(len(self.stages) - 1, (iteration + 1) * len(self.stages) // self.iterations)
        return self.index != before


def rng_state(generator: torch.Generator) -> dict:
    """This process's RNGs: Python, NumPy, torch (CPU and every CUDA device) and the sampling generator."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path, accelerator, players, value_head, optimizer, state: dict, shared_gen, sample_gen, replay
) -> None:
    """Everything needed to continue exactly, written to a temp name and renamed by the main process.

    The main process writes the policy, value head, optimizer, replay buffer, counters and the shared
    generator (identical on every process); each process adds its own RNG states (``rng_<rank>.pt``).
    """
    tmp = path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = players.policy_model
        if players.policy_adapter:
            model.save_pretrained(str(tmp / "policy"), selected_adapters=[players.policy_adapter])
        else:
            model.save_pretrained(str(tmp / "policy"))
        players.tokenizer.save_pretrained(str(tmp / "policy"))
        torch.save(
            {
                "value_head": value_head.state_dict() if value_head is not None else None,
                "optimizer": optimizer.state_dict(),
                "shared_generator": shared_gen.get_state(),
                "replay": pickle.dumps(list(replay)),
                "state": state,
                "num_processes": accelerator.num_processes,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    torch.save(rng_state(sample_gen), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()


def load_policy_weights(path: Path, players) -> None:
    """Put a checkpoint's policy weights (adapter or full model) into the loaded policy."""
    from safetensors.torch import load_file

    policy_dir = path / "policy"
    model = players.policy_model
    if players.policy_adapter:
        from peft import set_peft_model_state_dict

        # peft saves a non-default adapter name into a subfolder of that name
        sub = policy_dir / players.policy_adapter if (policy_dir / players.policy_adapter).is_dir() else policy_dir
        if not (sub / "adapter_model.safetensors").exists():
            raise UsageError(f"{policy_dir} holds no LoRA adapter; it does not match the policy in its run's config")
        set_peft_model_state_dict(
            model, load_file(sub / "adapter_model.safetensors"), adapter_name=players.policy_adapter
        )
    else:
        if not (policy_dir / "model.safetensors").exists():
            raise UsageError(f"{policy_dir} holds no full model; it does not match the policy in its run's config")
        missing, unexpected = model.load_state_dict(load_file(policy_dir / "model.safetensors"), strict=False)
        # tied weights (GPT-2's lm_head = wte) are stored once; anything else missing is an error
        if unexpected or any("lm_head" not in k for k in missing):
            raise UsageError(f"{policy_dir} does not match the policy model (missing {missing[:3]})")


def load_checkpoint(path: Path, accelerator, players, value_head, optimizer, shared_gen, sample_gen) -> tuple:
    """(state, replay list) of a checkpoint, with the weights, optimizer and RNGs restored in place."""
    load_policy_weights(path, players)
    blob = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    if value_head is not None:
        if blob["value_head"] is None:
            raise UsageError(f"{path} has no value head; resume it with the --algo it was trained with")
        value_head.load_state_dict(blob["value_head"])
    optimizer.load_state_dict(blob["optimizer"])
    shared_gen.set_state(blob["shared_generator"])
    own = path / f"rng_{accelerator.process_index}.pt"
    if own.exists():
        set_rng_state(torch.load(own, weights_only=False), sample_gen)
    if blob.get("num_processes", 1) != accelerator.num_processes and accelerator.is_main_process:
        print(
            f"warning: {path} was written by {blob.get('num_processes', 1)} processes and is resumed by "
            f"{accelerator.num_processes}: the weights and optimizer continue, the sampling does not replay exactly"
        )
    return blob["state"], pickle.loads(blob["replay"])


class Loggers:
    """metrics.jsonl always, TensorBoard unless report_to is none, W&B or trackio when asked."""

    def __init__(self, output_dir: Path, report_to: str, config: dict):
        self.path = output_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        if report_to in ("wandb", "trackio"):
            try:
                module = __import__(report_to)
            except ImportError:
                raise UsageError(f"--report_to {report_to} needs `pip install {report_to}`") from None
            self.wandb = module
            module.init(project="reflect-rl", name=output_dir.name, config=config)

    def log(self, row: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_jsonl(path: Path, iteration: int) -> None:
    """Drop rows logged after ``iteration``, so a resumed run's files read as one run."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
        path.write_text("".join(r + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------
# data-parallel and replay helpers
# ---------------------------------------------------------------------------------------------------


def refresh_replayed(episodes: list[Episode], policy: LMPolicy, batch_size: int = 64) -> list[Episode]:
    """Copies of replayed episodes with log-probs and values (bootstrap included) recomputed under the
    current policy, so PPO's ratios start at 1 and GAE uses today's critic, not the stale ones."""
    steps = [s for ep in episodes for s in ep.steps if s.action is not None]
    boots = [ep.bootstrap for ep in episodes if ep.bootstrap is not None]
    rows = steps + boots  # Step and Bootstrap both carry prompt, n_actions, labels
    logprobs, values = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            lp, _, v = policy.score([r.prompt for r in chunk], [r.n_actions for r in chunk], [r.labels for r in chunk])
            logprobs += [float(lp[b, r.action]) if isinstance(r, Step) else 0.0 for b, r in enumerate(chunk)]
            values += v.float().cpu().tolist() if v is not None else [r.value for r in chunk]
    fresh_steps = iter(zip(logprobs[: len(steps)], values[: len(steps)]))
    fresh_boots = iter(values[len(steps) :])
    out = []
    for ep in episodes:
        new_steps = []
        for s in ep.steps:
            if s.action is not None:
                lp, v = next(fresh_steps)
                s = dataclasses.replace(s, logprob=lp, value=v)
            new_steps.append(s)
        boot = dataclasses.replace(ep.bootstrap, value=next(fresh_boots)) if ep.bootstrap is not None else None
        out.append(dataclasses.replace(ep, steps=new_steps, bootstrap=boot))
    return out


def all_reduce_(tensors: list[torch.Tensor], accelerator) -> None:
    """Sum each tensor over the processes in place (a no-op for one process)."""
    if accelerator.num_processes > 1:
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def check_in_sync(params: list[torch.Tensor], accelerator) -> None:
    """Raise if the processes' trainable weights differ (they take identical steps, so they never should)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().abs().sum() for p in params)])
    gathered = [torch.zeros_like(local) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the processes' policy weights diverged; please report this with the command you ran")


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


@cli
def main(argv: list[str] | None = None) -> list[dict]:
    from accelerate import Accelerator

    # The environment (and its flags) the SFT data was made with, unless the command line says otherwise.
    args, env_args = parse_with_env((RLArguments,), argv, "policy_path", scope="rl")
    if args.curriculum:
        env_args.check_stages("--curriculum", args.curriculum)

    # 1. setup: processes, seeding, run folder, players, value head, optimizer -------------------------
    # cpu=True where there is no CUDA: accelerate then runs several processes over gloo (else it would
    # treat each launched process as a lone one)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.bf16 else "no")
    rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if args.num_envs % world:
        raise UsageError(f"--num_envs {args.num_envs} must be divisible by the number of processes ({world})")
    # Sampling (actions, reflections, shuffled labels) differs per process; the shared generator
    # (minibatch order, replay picks) is the same on all of them, as is the batch they update on.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    sample_gen = torch.Generator().manual_seed(args.seed + rank)
    shared_gen = torch.Generator().manual_seed(args.seed + 7919)
    output_dir = Path(args.output_dir)
    config = resolved_config(args, env_args, ignore=("resume_from_checkpoint", "overwrite_output_dir", "report_to"))
    config["num_processes"] = world
    # A run may resume on another number of processes (with a warning that its sampling differs), and
    # resuming may extend it (--iterations) or change how often it checkpoints and logs episodes.
    ignore = ("num_processes",) + (RESUME_MAY_CHANGE if args.resume_from_checkpoint else ())
    # runs saved before the served reflector existed had its fields at their defaults
    served = {f.name: f.default for f in dataclasses.fields(ReflectorAPIArguments)}
    same_run = (
        check_output_dir(output_dir, config, compare_ignore=ignore, added_defaults=served)
        if not args.overwrite_output_dir
        else False
    )
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if same_run and not resume and (output_dir / "metrics.jsonl").exists():
        raise UsageError(
            f"{output_dir} already holds this run; pass --resume_from_checkpoint latest or --overwrite_output_dir"
        )

    players = load_players(args.policy_path, args.reflector_path, with_reference=args.kl_coef > 0)
    players.to(accelerator.device)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes it
    if main_process:
        check_output_dir(
            output_dir,
            config,
            overwrite=args.overwrite_output_dir and not resume,
            compare_ignore=ignore,
            added_defaults=served,
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(output_dir, config)

    needs_value = args.algo == "ppo" or (args.algo == "reinforce" and args.reinforce_baseline == "value")
    hidden = players.policy_model.config.get_text_config().hidden_size
    value_head = torch.nn.Linear(hidden, 1).to(accelerator.device) if needs_value else None
    if value_head is not None:
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    policy = LMPolicy(
        players.policy_model, players.tokenizer, value_head, players.policy_adapter, shuffle_labels=args.shuffle_labels
    )
    reference = (
        LMPolicy(players.reference_model, players.tokenizer, None, players.reference_adapter)
        if players.reference_model is not None
        else None
    )
    reflector = None
    if players.reflector_model is not None:
        reflector = Reflector(
            players.reflector_model,
            players.tokenizer,
            players.reflector_adapter,
            args.reflection_max_tokens,
            args.reflection_temperature,
        )
    elif args.reflector_api_base:
        reflector = ServedReflector(args.reflector_backend(), args.reflection_max_tokens, args.reflection_temperature)
    params = [p for p in players.policy_model.parameters() if p.requires_grad]
    if value_head is not None:
        params += list(value_head.parameters())
    for p in params:  # gradients exist from the start, so every process all-reduces the same tensors
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    stages = args.curriculum.split(",") if args.curriculum else [env_args.stage]
    curriculum = Curriculum(stages, args.iterations, args.curriculum_switch)
    replay: deque[Episode] = deque(maxlen=max(args.replay_buffer_size, 1))
    state = {"iteration": 0, "env_steps": 0, "stage_index": 0, "bad_updates": 0, "skipped_updates": 0}
    if resume:
        state, replay_list = load_checkpoint(
            Path(resume), accelerator, players, value_head, optimizer, shared_gen, sample_gen
        )
        replay.extend(replay_list)
        curriculum.index = state["stage_index"]
        if main_process:
            truncate_jsonl(output_dir / "metrics.jsonl", state["iteration"] - 1)
            truncate_jsonl(output_dir / "episodes.jsonl", state["iteration"] - 1)
            print(f"resumed from {resume} at iteration {state['iteration']}")
    loggers = Loggers(output_dir, args.report_to, config) if main_process else None
    history: list[dict] = []
    local_envs = args.num_envs // world
    envs_by_stage: dict[str, list] = {}  # created once per stage and reused

    bar = tqdm(
        total=args.iterations,
        initial=state["iteration"],
        desc="rl",
        unit="it",
        dynamic_ncols=True,
        disable=not main_process,
    )
    while state["iteration"] < args.iterations:
        iteration = state["iteration"]
        if args.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * (1 - iteration / args.iterations)
        # 2. rollout: this process's share of num_envs episodes in lockstep, then the whole batch ------
        # Seeds follow the iteration (the env cursor); a group of group_size episodes shares one seed.
        t0 = time.time()
        memo_before = (reflector.calls, reflector.hits) if reflector is not None else (0, 0)
        rows_before = (policy.rows_scored, policy.rows_computed)
        cut_before = prompts_cut(policy, reflector)
        if curriculum.stage not in envs_by_stage:
            envs_by_stage[curriculum.stage] = [env_args.make_env(curriculum.stage) for _ in range(local_envs)]
        envs = envs_by_stage[curriculum.stage]
        n_tasks = args.num_envs // args.group_size
        seeds = [args.seed * 1_000_003 + iteration * n_tasks + j // args.group_size for j in range(args.num_envs)]
        my_seeds = seeds[rank * local_envs : (rank + 1) * local_envs]
        with accelerator.autocast():
            episodes = rollout(
                envs,
                my_seeds,
                policy,
                reflector,
                reference,
                greedy=False,
                generator=sample_gen,
                bootstrap=value_head is not None,
            )
        cut = [prompts_cut(policy, reflector) - cut_before]  # prompts longer than the window, cut from the left
        # games an engine failed on (ALFWorld: crash, timeout, broken file), marked bad and skipped; 0 elsewhere
        faults = [sum(sum(getattr(env, "faults", {}).values()) for group in envs_by_stage.values() for env in group)]
        if world > 1:
            from accelerate.utils import gather_object

            episodes = gather_object(episodes)  # in process order: the same list on every process
            cut = gather_object(cut)
            faults = gather_object(faults)
        rollout_s = time.time() - t0
        stats = episode_stats(episodes)
        batch = list(episodes)
        if args.replay_buffer_size > 0:
            if replay:
                picks = torch.randint(len(replay), (args.replay_episodes,), generator=shared_gen).tolist()
                replayed = [replay[i] for i in picks]
                if value_head is not None:  # stale log-probs and values would make PPO silently off-policy
                    with accelerator.autocast():
                        replayed = refresh_replayed(replayed, policy)
                batch += replayed
            replay.extend(e for e in episodes if e.success)

        # 3. advantages and returns -------------------------------------------------------------------
        advantages, returns = compute_advantages(
            batch,
            args.algo,
            args.gamma,
            args.gae_lambda,
            args.reinforce_baseline,
            args.scale_group_std,
            args.group_by_state,
            args.step_advantage_weight,
        )
        steps = [s for ep in batch for s in ep.steps]
        advantages = [a for row in advantages for a in row]
        returns = [g for row in returns for g in row]
        keep = [i for i, s in enumerate(steps) if s.action is not None]  # invalid steps carry no gradient
        device = accelerator.device
        b_prompts = [steps[i].prompt for i in keep]
        b_n = [steps[i].n_actions for i in keep]
        b_labels = [steps[i].labels for i in keep]
        b_actions = torch.tensor([steps[i].action for i in keep], dtype=torch.long, device=device)  # (N,)
        b_logprobs = torch.tensor([steps[i].logprob for i in keep], device=device)  # (N,)
        b_adv = torch.tensor([advantages[i] for i in keep], device=device)  # (N,)
        b_returns = torch.tensor([returns[i] for i in keep], device=device)  # (N,)
        b_values = np.array([steps[i].value for i in keep])
        if reference is not None:
            width = max([len(steps[i].ref_logprobs) for i in keep], default=1)
            b_ref = torch.full((len(keep), width), float("-inf"), device=device)  # (N, A)
            for row, i in enumerate(keep):
                b_ref[row, : len(steps[i].ref_logprobs)] = torch.tensor(steps[i].ref_logprobs)

        # 4. update: epochs of shuffled minibatches, each split across the processes -------------------
        t1 = time.time()
        metrics: dict[str, list[float]] = {}
        n = len(keep)
        stop = False
        names = ["loss/policy", "policy/entropy"]
        names += ["loss/value"] if value_head is not None else []
        names += ["objective/kl"] if reference is not None else []
        names += ["policy/approx_kl", "policy/clipfrac"] if args.algo != "reinforce" else []
        for _epoch in range(args.update_epochs if n else 0):
            order = torch.randperm(n, generator=shared_gen)
            for start in range(0, n, args.minibatch_size):
                mb = order[start : start + args.minibatch_size]
                mb_adv = b_adv[mb]
                if args.algo == "ppo" and len(mb) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                shard = torch.arange(rank, len(mb), world)  # this process's part of the minibatch
                sums = torch.zeros(len(names) + 1, device=device)  # per-sample sums, then a bad-loss flag
                for p in params:
                    p.grad.zero_()
                if len(shard):
                    idx = mb[shard]
                    with accelerator.autocast():
                        logprobs, entropy, values = policy.score(
                            [b_prompts[i] for i in idx], [b_n[i] for i in idx], [b_labels[i] for i in idx]
                        )
                    logprobs = logprobs.float()
                    new_logprob = logprobs.gather(1, b_actions[idx, None]).squeeze(1)  # (m,)
                    adv = mb_adv[shard]
                    if args.algo == "reinforce":
                        pg_loss = -(adv * new_logprob)
                        pg_stats = {}
                    else:
                        pg_loss, pg_stats = ppo_losses(new_logprob, b_logprobs[idx], adv, args.clip_coef)
                    per_sample = pg_loss - args.ent_coef * entropy
                    parts = {"loss/policy": pg_loss, "policy/entropy": entropy, **pg_stats}
                    if values is not None:
                        v_loss = 0.5 * (values.float() - b_returns[idx]) ** 2
                        per_sample = per_sample + args.vf_coef * v_loss
                        parts["loss/value"] = v_loss
                    if reference is not None:
                        kl = exact_kl(logprobs, b_ref[idx, : logprobs.shape[1]])
                        per_sample = per_sample + args.kl_coef * kl
                        parts["objective/kl"] = kl
                    loss = per_sample.sum() / len(mb)  # summed over processes: the minibatch mean
                    for j, name in enumerate(names):
                        sums[j] = parts[name].detach().float().sum()
                    if torch.isfinite(loss):
                        accelerator.backward(loss)
                    else:
                        sums[-1] = 1
                all_reduce_([*(p.grad for p in params), sums], accelerator)
                bad_loss = bool(sums[-1] > 0)
                grad_norm = None if bad_loss else torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if bad_loss or not torch.isfinite(grad_norm):
                    state["skipped_updates"] += 1
                    state["bad_updates"] += 1
                    continue
                state["bad_updates"] = 0
                optimizer.step()
                mb_stats = {name: float(sums[j]) / len(mb) for j, name in enumerate(names)}
                mb_stats["policy/grad_norm"] = float(grad_norm)
                for k, v in mb_stats.items():
                    metrics.setdefault(k, []).append(v)
                if args.target_kl > 0 and mb_stats.get("policy/approx_kl", 0.0) > args.target_kl:
                    stop = True
                    break
            if stop:
                break
        update_s = time.time() - t1

        # 5. logging (main process) ---------------------------------------------------------------------
        state["env_steps"] += int(stats["env/steps"])
        state["iteration"] = iteration + 1
        row = {"iteration": iteration, "env_steps": state["env_steps"], "curriculum/stage": curriculum.stage}
        row["train/learning_rate"] = optimizer.param_groups[0]["lr"]
        row |= stats | {k: sum(v) / len(v) for k, v in metrics.items()}
        rollout_kl = [s.logprob - s.ref_logprob for s in steps if s.action is not None] if reference else []
        if rollout_kl:
            row["objective/rollout_kl"] = sum(rollout_kl) / len(rollout_kl)
        if value_head is not None and n:
            row["value/explained_variance"] = explained_variance(b_values, b_returns.cpu().numpy())
        row |= {
            "train/skipped_updates": state["skipped_updates"],
            "timing/rollout_s": rollout_s,
            "timing/update_s": update_s,
            "env/steps_per_s": stats["env/steps"] / max(rollout_s, 1e-9),
            "env/prompts_cut": sum(cut),
            "env/engine_faults": sum(faults),  # so far in the run
        }
        scored, computed = policy.rows_scored - rows_before[0], policy.rows_computed - rows_before[1]
        row["timing/policy_rows_deduplicated"] = 1 - computed / max(scored, 1)  # identical prompts run once
        if reflector is not None and reflector.greedy:  # timing: a resumed run starts with an empty memo
            calls, hits = reflector.calls - memo_before[0], reflector.hits - memo_before[1]
            row["timing/reflection_memo_hit_rate"] = hits / max(calls, 1)
        if main_process:
            loggers.log(row, state["env_steps"])
            with open(output_dir / "episodes.jsonl", "a") as f:
                for ep in episodes[: args.log_episodes]:
                    f.write(json.dumps({"iteration": iteration, **ep.transcript()}) + "\n")
        history.append(row)
        bar.update(1)
        bar.set_postfix(
            success=f"{stats['env/success_rate']:.2f}",
            ret=f"{stats['env/return']:.2f}",
            eps_per_s=f"{args.num_envs / max(rollout_s + update_s, 1e-9):.1f}",
        )
        if curriculum.update(iteration, stats["env/success_rate"]):
            replay.clear()  # the paper clears the buffer at each stage switch
        state["stage_index"] = curriculum.index

        # 6. checkpoint ------------------------------------------------------------------------------
        bad = state["bad_updates"] >= args.max_bad_updates
        if state["iteration"] % args.save_steps == 0 or state["iteration"] == args.iterations or bad:
            check_in_sync(params, accelerator)
            save_checkpoint(
                output_dir / f"checkpoint-{state['iteration']}",
                accelerator,
                players,
                value_head,
                optimizer,
                dict(state),
                shared_gen,
                sample_gen,
                replay,
            )
        if bad:
            if loggers is not None:
                loggers.close()
            raise UsageError(
                f"{state['bad_updates']} updates in a row had non-finite loss or gradients; stopped with a "
                f"checkpoint in {output_dir}. lower --learning_rate or --max_grad_norm"
            )
    bar.close()
    if loggers is not None:
        loggers.close()
    for env_list in envs_by_stage.values():
        for env in env_list:
            env.close()
    return history


if __name__ == "__main__":
    main()
