"""Online RL of the policy with a frozen reflection model (Reflect-RL, section 4).

    python -m training.rl_finetune --policy_path runs/sft_policy --reflector_path runs/sft_reflector \
        --output_dir runs/reflect_rl --algo ppo
    python -m training.rl_finetune --policy_path runs/sft_plain --output_dir runs/rl_noreflect   # no reflection

Read top to bottom: 1. setup, 2. rollout, 3. advantages and returns, 4. update, 5. logging,
6. checkpoint. ``--algo ppo`` (default) is PPO-clip with a value head on the policy, GAE, a k3 KL
penalty to the frozen SFT policy and an entropy bonus; ``--algo reinforce`` is the paper's update
(discounted cost-to-go, optionally minus a baseline). The reflector never receives gradients.
"""

from __future__ import annotations

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

from experiment_args import (
    RLArguments,
    TaxiArguments,
    UsageError,
    check_output_dir,
    cli,
    inherited_env_flags,
    parse_args,
    resolve_resume,
    resolved_config,
    save_config,
)
from training.players import load_players
from training.rollout import Episode, LMPolicy, Reflector, episode_stats, rollout

# ---------------------------------------------------------------------------------------------------
# pure functions (unit-tested)
# ---------------------------------------------------------------------------------------------------


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1} over one finished episode."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one episode, which ends at its last step.

    Truncation is treated as terminal: the Taxi observation lists the actions taken so far, so the
    time left is part of the state and the horizon is part of the task.
    """
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


def ppo_losses(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss (scalar) and its diagnostics, all over (N,) tensors."""
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    with torch.no_grad():
        stats = {
            "policy/approx_kl": float(((ratio - 1) - logratio).mean()),  # k3: unbiased, >= 0
            "policy/clipfrac": float(((ratio - 1).abs() > clip_coef).float().mean()),
        }
    return pg_loss, stats


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(pi || ref) from samples of pi: unbiased and always >= 0."""
    log_r = ref_logprobs - logprobs
    return log_r.exp() - log_r - 1


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
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def save_checkpoint(path: Path, players, value_head, optimizer, state: dict, generator, replay) -> None:
    """Everything needed to continue exactly: written to a temp name, then renamed."""
    tmp = path.parent / f".{path.name}.tmp"
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
            "rng": rng_state(generator),
            "replay": pickle.dumps(list(replay)),
            "state": state,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_policy_weights(path: Path, players) -> None:
    """Put a checkpoint's policy weights (adapter or full model) into the loaded policy."""
    from safetensors.torch import load_file

    policy_dir = path / "policy"
    model = players.policy_model
    if players.policy_adapter:
        from peft import set_peft_model_state_dict

        # peft saves a non-default adapter name into a subfolder of that name
        sub = policy_dir / players.policy_adapter if (policy_dir / players.policy_adapter).is_dir() else policy_dir
        set_peft_model_state_dict(
            model, load_file(sub / "adapter_model.safetensors"), adapter_name=players.policy_adapter
        )
    else:
        missing, unexpected = model.load_state_dict(load_file(policy_dir / "model.safetensors"), strict=False)
        # tied weights (GPT-2's lm_head = wte) are stored once; anything else missing is an error
        if unexpected or any("lm_head" not in k for k in missing):
            raise UsageError(f"{policy_dir} does not match the policy model (missing {missing[:3]})")


def load_checkpoint(path: Path, players, value_head, optimizer, generator) -> tuple[dict, list]:
    load_policy_weights(path, players)
    blob = torch.load(path / "trainer_state.pt", weights_only=False)
    if value_head is not None:
        if blob["value_head"] is None:
            raise UsageError(f"{path} has no value head; resume it with the --algo it was trained with")
        value_head.load_state_dict(blob["value_head"])
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"], generator)
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
# the run
# ---------------------------------------------------------------------------------------------------


@cli
def main(argv: list[str] | None = None) -> list[dict]:
    args, taxi_args = parse_args((RLArguments, TaxiArguments), argv, scope="rl")
    # The environment the SFT data was made with, unless the command line says otherwise.
    args, taxi_args = parse_args((RLArguments, TaxiArguments), argv, inherited_env_flags(args.policy_path), scope="rl")

    # 1. setup: seeding, run folder, players, value head, optimizer ------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    config = resolved_config(args, taxi_args, ignore=("resume_from_checkpoint", "overwrite_output_dir", "report_to"))
    same_run = check_output_dir(output_dir, config) if not args.overwrite_output_dir else False
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if same_run and not resume and (output_dir / "metrics.jsonl").exists():
        raise UsageError(
            f"{output_dir} already holds this run; pass --resume_from_checkpoint latest or --overwrite_output_dir"
        )

    players = load_players(args.policy_path, args.reflector_path, with_reference=args.kl_coef > 0)
    check_output_dir(output_dir, config, overwrite=args.overwrite_output_dir and not resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(output_dir, config)

    needs_value = args.algo == "ppo" or args.reinforce_baseline == "value"
    hidden = players.policy_model.config.get_text_config().hidden_size
    value_head = torch.nn.Linear(hidden, 1) if needs_value else None
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
    reflector = (
        Reflector(
            players.reflector_model,
            players.tokenizer,
            players.reflector_adapter,
            args.reflection_max_tokens,
            args.reflection_temperature,
        )
        if players.reflector_model is not None
        else None
    )
    params = [p for p in players.policy_model.parameters() if p.requires_grad]
    if value_head is not None:
        params += list(value_head.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    stages = args.curriculum.split(",") if args.curriculum else [taxi_args.taxi_stage]
    curriculum = Curriculum(stages, args.iterations, args.curriculum_switch)
    replay: deque[Episode] = deque(maxlen=max(args.replay_buffer_size, 1))
    state = {"iteration": 0, "env_steps": 0, "stage_index": 0, "bad_updates": 0, "skipped_updates": 0}
    if resume:
        state, replay_list = load_checkpoint(Path(resume), players, value_head, optimizer, generator)
        replay.extend(replay_list)
        curriculum.index = state["stage_index"]
        truncate_jsonl(output_dir / "metrics.jsonl", state["iteration"] - 1)
        truncate_jsonl(output_dir / "episodes.jsonl", state["iteration"] - 1)
        print(f"resumed from {resume} at iteration {state['iteration']}")
    loggers = Loggers(output_dir, args.report_to, config)
    history: list[dict] = []

    bar = tqdm(total=args.iterations, initial=state["iteration"], desc="rl", unit="it", dynamic_ncols=True)
    while state["iteration"] < args.iterations:
        iteration = state["iteration"]
        # 2. rollout: num_envs episodes in lockstep; seeds follow the iteration (the env cursor) -------
        t0 = time.time()
        memo_before = (reflector.calls, reflector.hits) if reflector is not None else (0, 0)
        envs = [taxi_args.make_env(curriculum.stage) for _ in range(args.num_envs)]
        seeds = [args.seed * 1_000_003 + iteration * args.num_envs + j for j in range(args.num_envs)]
        episodes = rollout(envs, seeds, policy, reflector, reference, greedy=False, generator=generator)
        rollout_s = time.time() - t0
        stats = episode_stats(episodes)
        batch = list(episodes)
        if args.replay_buffer_size > 0:
            if replay:
                picks = torch.randint(len(replay), (args.replay_episodes,), generator=generator).tolist()
                batch += [replay[i] for i in picks]
            replay.extend(e for e in episodes if e.success)

        # 3. advantages and returns -------------------------------------------------------------------
        steps, advantages, returns = [], [], []
        for ep in batch:
            rewards = [s.reward for s in ep.steps]
            if args.algo == "ppo":
                adv, ret = gae(rewards, [s.value for s in ep.steps], args.gamma, args.gae_lambda)
            else:
                ret = discounted_returns(rewards, args.gamma)
                adv = list(ret)
                if args.reinforce_baseline == "value":
                    adv = [g - s.value for g, s in zip(ret, ep.steps)]
            steps += ep.steps
            advantages += adv
            returns += ret
        if args.algo == "reinforce" and args.reinforce_baseline == "mean":
            # per-timestep mean return over the batch (a baseline that needs no critic)
            timesteps = [t for ep in batch for t in range(len(ep.steps))]
            by_t: dict[int, list[float]] = {}
            for t, g in zip(timesteps, returns):
                by_t.setdefault(t, []).append(g)
            advantages = [g - sum(by_t[t]) / len(by_t[t]) for t, g in zip(timesteps, returns)]
        keep = [i for i, s in enumerate(steps) if s.action is not None]  # invalid steps carry no gradient
        b_prompts = [steps[i].prompt for i in keep]
        b_n = [steps[i].n_actions for i in keep]
        b_labels = [steps[i].labels for i in keep]
        b_actions = torch.tensor([steps[i].action for i in keep], dtype=torch.long)  # (N,)
        b_logprobs = torch.tensor([steps[i].logprob for i in keep])  # (N,)
        b_ref = torch.tensor([steps[i].ref_logprob for i in keep])  # (N,)
        b_adv = torch.tensor([advantages[i] for i in keep])  # (N,)
        b_returns = torch.tensor([returns[i] for i in keep])  # (N,)
        b_values = np.array([steps[i].value for i in keep])

        # 4. update: epochs of shuffled minibatches ----------------------------------------------------
        t1 = time.time()
        metrics: dict[str, list[float]] = {}
        n = len(keep)
        stop = False
        for _epoch in range(args.update_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, args.minibatch_size):
                mb = order[start : start + args.minibatch_size]
                logprobs, entropy, values = policy.score(
                    [b_prompts[i] for i in mb], [b_n[i] for i in mb], [b_labels[i] for i in mb]
                )
                new_logprob = logprobs.gather(1, b_actions[mb, None]).squeeze(1)  # (M,)
                mb_adv = b_adv[mb]
                if args.algo == "ppo":
                    if len(mb) > 1:
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss, pg_stats = ppo_losses(new_logprob, b_logprobs[mb], mb_adv, args.clip_coef)
                else:
                    pg_loss = -(mb_adv * new_logprob).mean()
                    pg_stats = {}
                loss = pg_loss - args.ent_coef * entropy.mean()
                if values is not None:
                    v_loss = 0.5 * ((values.float() - b_returns[mb]) ** 2).mean()
                    loss = loss + args.vf_coef * v_loss
                    pg_stats["loss/value"] = float(v_loss.detach())
                if reference is not None:
                    kl = k3_kl(new_logprob, b_ref[mb]).mean()
                    loss = loss + args.kl_coef * kl
                    pg_stats["objective/kl"] = float(kl.detach())
                optimizer.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    state["skipped_updates"] += 1
                    state["bad_updates"] += 1
                    continue
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    state["skipped_updates"] += 1
                    state["bad_updates"] += 1
                    continue
                state["bad_updates"] = 0
                optimizer.step()
                pg_stats |= {
                    "loss/policy": float(pg_loss.detach()),
                    "policy/entropy": float(entropy.mean().detach()),
                    "policy/grad_norm": float(grad_norm),
                }
                for k, v in pg_stats.items():
                    metrics.setdefault(k, []).append(v)
                if args.target_kl > 0 and pg_stats.get("policy/approx_kl", 0.0) > args.target_kl:
                    stop = True
                    break
            if stop:
                break
        update_s = time.time() - t1

        # 5. logging ---------------------------------------------------------------------------------
        state["env_steps"] += int(stats["env/steps"])
        state["iteration"] = iteration + 1
        row = {"iteration": iteration, "env_steps": state["env_steps"], "curriculum/stage": curriculum.stage}
        row |= stats | {k: sum(v) / len(v) for k, v in metrics.items()}
        rollout_kl = [s.logprob - s.ref_logprob for s in steps if s.action is not None] if reference else []
        if rollout_kl:
            row["objective/rollout_kl"] = sum(rollout_kl) / len(rollout_kl)
        if args.algo == "ppo" or args.reinforce_baseline == "value":
            row["value/explained_variance"] = explained_variance(b_values, b_returns.numpy())
        row |= {
            "train/skipped_updates": state["skipped_updates"],
            "timing/rollout_s": rollout_s,
            "timing/update_s": update_s,
            "env/steps_per_s": stats["env/steps"] / max(rollout_s, 1e-9),
        }
        if reflector is not None and reflector.greedy:  # timing: a resumed run starts with an empty memo
            calls, hits = reflector.calls - memo_before[0], reflector.hits - memo_before[1]
            row["timing/reflection_memo_hit_rate"] = hits / max(calls, 1)
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
            save_checkpoint(
                output_dir / f"checkpoint-{state['iteration']}",
                players,
                value_head,
                optimizer,
                dict(state),
                generator,
                replay,
            )
        if bad:
            loggers.close()
            raise UsageError(
                f"{state['bad_updates']} updates in a row had non-finite loss or gradients; stopped with a "
                f"checkpoint in {output_dir}. lower --learning_rate or --max_grad_norm"
            )
    bar.close()
    loggers.close()
    return history


if __name__ == "__main__":
    main()
