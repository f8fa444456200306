"""Online RL: returns/GAE and the PPO loss by hand, which weights train, resume, non-finite updates."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from data_gen.taxi import gen_sft
from training import rl_finetune, sft
from training.rl_finetune import (
    Curriculum,
    compute_advantages,
    discounted_returns,
    exact_kl,
    gae,
    group_centred,
    ppo_losses,
)
from training.rollout import Bootstrap, Episode, Step


def test_discounted_returns_three_steps():
    assert discounted_returns([1.0, 0.0, 2.0], 0.5) == pytest.approx([1.5, 1.0, 2.0])


def test_gae_three_steps_by_hand():
    rewards, values, gamma, lam = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5], 0.9, 0.8
    # deltas: r_t + gamma * V_{t+1} - V_t, with V after the last step = 0
    d2 = 2.0 - 1.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    adv, ret = gae(rewards, values, gamma, lam)
    assert adv == pytest.approx([a0, a1, a2])
    assert ret == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])
    # lambda = 1 gives Monte-Carlo returns
    _, mc = gae(rewards, values, gamma, 1.0)
    assert mc == pytest.approx(discounted_returns(rewards, gamma))


def test_ppo_loss_hand_made_batch():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.25, 0.5]))  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = ppo_losses(new, old, adv, clip_coef=0.2)
    # per sample max(-A r, -A clip(r)): -min(1.5, 1.2) = -1.2; -min(0.5, 0.8) = -0.5; max(1.0, 1.0) = 1.0
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.0])
    assert float(stats["policy/clipfrac"].mean()) == pytest.approx(2 / 3)
    assert float(stats["policy/approx_kl"].mean()) > 0


def test_exact_kl_is_kl_pi_ref_over_admissible_labels_with_its_gradient():
    # pi = (0.7, 0.2, 0.1), ref = (0.2, 0.2, 0.6), a 4th label not admissible (-inf in both)
    pi_logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).requires_grad_(True)
    logprobs = torch.cat([torch.log_softmax(pi_logits, -1), torch.tensor([[float("-inf")]])], -1)
    ref = torch.log(torch.tensor([[0.2, 0.2, 0.6, 0.0]]))
    kl = exact_kl(logprobs, ref)
    by_hand = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(1.0) + 0.1 * math.log(0.1 / 0.6)
    reverse = 0.2 * math.log(0.2 / 0.7) + 0.2 * math.log(1.0) + 0.6 * math.log(0.6 / 0.1)  # KL(ref || pi)
    assert float(kl.detach()) == pytest.approx(by_hand, rel=1e-5) and abs(by_hand - reverse) > 0.1
    kl.sum().backward()
    # d KL(pi||ref) / d logit_a = pi_a * (log pi_a/ref_a - KL)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.2, 0.6])
    torch.testing.assert_close(pi_logits.grad[0], p * ((p / q).log() - by_hand))
    assert torch.isfinite(pi_logits.grad).all()
    assert float(exact_kl(logprobs.detach(), logprobs.detach())) == pytest.approx(0.0, abs=1e-7)


def _step(reward, value=0.0, key=None):
    return Step("p", 2, 0, -0.5, 0.5, value, -0.5, reward, False, False, False, state_key=key)


def _episode(rewards, seed=0, values=None, keys=None, bootstrap=None):
    values = values or [0.0] * len(rewards)
    keys = keys or [None] * len(rewards)
    boot = Bootstrap("p", 2, ["0", "1"], bootstrap) if bootstrap is not None else None
    return Episode(seed, "full", [_step(r, v, k) for r, v, k in zip(rewards, values, keys)], bootstrap=boot)


def test_truncated_episode_bootstraps_from_the_value_of_its_last_state():
    ep = _episode([0.0, 1.0], values=[0.5, 0.25], bootstrap=2.0)
    adv, ret = compute_advantages([ep], "ppo", gamma=0.9, gae_lambda=1.0)
    # lambda 1: returns are Monte-Carlo with the tail V(s_T) = 2: G_1 = 1 + 0.9 * 2, G_0 = 0.9 * G_1
    assert ret[0] == pytest.approx([0.9 * 2.8, 2.8])
    assert adv[0] == pytest.approx([0.9 * 2.8 - 0.5, 2.8 - 0.25])
    terminal = _episode([0.0, 1.0], values=[0.5, 0.25])
    assert compute_advantages([terminal], "ppo", 0.9, 1.0)[1][0] == pytest.approx([0.9, 1.0])
    assert discounted_returns([0.0, 1.0], 0.5, bootstrap=4.0) == pytest.approx([1.5, 3.0])


def test_reinforce_mean_baseline_leaves_the_episode_out():
    # returns at t=0: 3, 1, 2 (gamma 1); only the third episode reaches t=1 (return 2 there)
    batch = [_episode([3.0]), _episode([1.0]), _episode([0.0, 2.0])]
    adv, _ = compute_advantages(batch, "reinforce", gamma=1.0, reinforce_baseline="mean")
    assert adv[0] == pytest.approx([3 - (1 + 2) / 2])
    assert adv[1] == pytest.approx([1 - (3 + 2) / 2])
    # t=0: 2 - (3 + 1) / 2; t=1: no other episode got there, so no baseline (not an advantage of 0)
    assert adv[2] == pytest.approx([2 - 2.0, 2.0])


def test_rloo_and_grpo_group_baselines():
    batch = [_episode([1.0], seed=7), _episode([0.0], seed=7), _episode([0.0, 0.0], seed=7), _episode([5.0], seed=8)]
    adv, _ = compute_advantages(batch, "rloo", gamma=1.0)
    assert adv[0] == pytest.approx([1.0]) and adv[1] == pytest.approx([-0.5])
    assert adv[2] == pytest.approx([-0.5, -0.5]) and adv[3] == pytest.approx([0.0])  # a group of one
    adv, _ = compute_advantages(batch, "grpo", gamma=1.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv[0] == pytest.approx([(2 / 3) / std], rel=1e-5) and adv[1] == pytest.approx([(-1 / 3) / std], rel=1e-5)
    adv, _ = compute_advantages(batch, "grpo", gamma=1.0, scale_group_std=False)
    assert adv[0] == pytest.approx([2 / 3])
    assert group_centred([2.0], loo=True, scale=False) == [0.0]


def test_group_by_state_adds_a_step_level_baseline_per_shared_state():
    # one group of 2 episodes: both start in state "s" and reach "t"; the first then wins
    a = _episode([0.0, 1.0], seed=1, keys=["s", "t"])
    b = _episode([0.0, 0.0, 0.0], seed=1, keys=["s", "t", "u"])
    adv, ret = compute_advantages([a, b], "rloo", gamma=0.5, group_by_state=True, step_advantage_weight=2.0)
    episode_term = [1.0, -1.0]  # total rewards 1 and 0, leave-one-out
    # step returns: a = (0.5, 1.0), b = (0, 0, 0); per state, leave-one-out: s: 0.5 - 0, t: 1 - 0; u alone: 0
    assert adv[0] == pytest.approx([episode_term[0] + 2 * 0.5, episode_term[0] + 2 * 1.0])
    assert adv[1] == pytest.approx([episode_term[1] - 2 * 0.5, episode_term[1] - 2 * 1.0, episode_term[1]])


def test_curriculum_switches_by_iteration_and_by_success():
    c = Curriculum(["pickup", "dropoff", "full"], iterations=6, threshold=0)
    seen = []
    for it in range(6):
        seen.append(c.stage)
        c.update(it, 0.0)
    assert seen == ["pickup", "pickup", "dropoff", "dropoff", "full", "full"]
    c = Curriculum(["pickup", "full"], iterations=100, threshold=0.8)
    assert not c.update(0, 0.5) and c.stage == "pickup"
    assert c.update(1, 0.9) and c.stage == "full"


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("rl_sft")
    data = root / "data"
    gen_sft.main(["--output_dir", str(data), "--num_episodes", "10", "--num_test_episodes", "2"])
    runs = {}
    for role in ("reflector", "policy", "plain"):
        runs[role] = root / role
        sft.main(
            [
                "--role",
                role,
                "--data_dir",
                str(data),
                "--output_dir",
                str(runs[role]),
                "--max_steps",
                "3",
                "--per_device_train_batch_size",
                "4",
                "--report_to",
                "none",
                "--max_eval_samples",
                "0",
                "--learning_rate",
                "1e-2",
            ]
        )
    return runs


# the small run every RL test starts from
RL_FLAGS = ["--num_envs", "4", "--reflection_max_tokens", "8", "--report_to", "none"]
RL_FLAGS += ["--taxi_stage", "pickup", "--minibatch_size", "8"]


def rl(out, runs, *flags, reflect=True):
    base = ["--policy_path", str(runs["policy" if reflect else "plain"]), "--output_dir", str(out), *RL_FLAGS]
    if reflect:
        base += ["--reflector_path", str(runs["reflector"])]
    return rl_finetune.main(base + list(flags))


def test_rl_trains_policy_adapter_only(sft_runs, tmp_path):
    out = tmp_path / "rl"
    history = rl(out, sft_runs, "--iterations", "2", "--save_steps", "2", "--learning_rate", "1e-2", "--anneal_lr")
    assert len(history) == 2 and {"env/success_rate", "policy/clipfrac", "objective/kl"} <= set(history[-1])
    assert [r["train/learning_rate"] for r in history] == pytest.approx([1e-2, 5e-3])  # linear decay to 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["env/prompts_cut"] for r in rows] == [0, 0]  # Taxi prompts fit the window
    before = load_file(sft_runs["policy"] / "adapter_model.safetensors")
    after_dir = out / "checkpoint-2" / "policy"
    after_file = next(after_dir.rglob("adapter_model.safetensors"))
    after = load_file(after_file)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the reflector and the base are frozen: the shared model's reflector weights are the SFT ones
    from training.players import load_players

    players = load_players(str(sft_runs["policy"]), str(sft_runs["reflector"]))
    trainable = {n for n, p in players.policy_model.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n for n in trainable)
    episodes = [json.loads(line) for line in open(out / "episodes.jsonl")]
    assert episodes and episodes[0]["steps"][0]["reflection"] is not None


def test_rl_without_reflection_and_reinforce(sft_runs, tmp_path):
    history = rl(
        tmp_path / "plain", sft_runs, "--iterations", "1", "--algo", "reinforce", "--kl_coef", "0", reflect=False
    )
    assert "policy/clipfrac" not in history[0] and "loss/policy" in history[0]
    episodes = [json.loads(line) for line in open(tmp_path / "plain" / "episodes.jsonl")]
    assert episodes[0]["steps"][0]["reflection"] is None


def test_resume_gives_identical_metrics(sft_runs, tmp_path):
    flags = [
        "--iterations",
        "4",
        "--save_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--replay_buffer_size",
        "5",
        "--shuffle_labels",
    ]
    full = rl(tmp_path / "full", sft_runs, *flags)
    part = tmp_path / "part"
    rl(part, sft_runs, *flags)
    import shutil

    shutil.rmtree(part / "checkpoint-4")  # as if the run died after iteration 2's checkpoint
    resumed = rl(part, sft_runs, *flags, "--resume_from_checkpoint", "latest")
    assert len(resumed) == 2
    timing = ("timing/", "env/steps_per_s")
    for a, b in zip(full[2:], resumed):
        for key in a:
            if isinstance(a[key], str):
                assert a[key] == b[key]
            elif not key.startswith(timing):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7, nan_ok=True), key
    rows = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]


def test_resume_extends_a_finished_run_but_refuses_other_changes(sft_runs, tmp_path, capsys):
    out = tmp_path / "rl"
    rl(out, sft_runs, "--iterations", "1", "--save_steps", "1", reflect=False)
    resume = ("--resume_from_checkpoint", "latest", "--iterations", "2")
    with pytest.raises(SystemExit):
        rl(out, sft_runs, *resume, "--learning_rate", "1e-2", reflect=False)
    assert "differs in learning_rate" in capsys.readouterr().err
    # a run saved before the served-reflector settings existed resumes too (they were at their defaults)
    served = ("reflector_api_base", "reflector_model", "reflector_api_key_env", "reflector_concurrency")
    served += ("reflector_timeout", "reflector_max_retries")
    config = [line for line in (out / "config.yaml").read_text().splitlines() if not line.startswith(served)]
    (out / "config.yaml").write_text("\n".join(config) + "\n")
    more = rl(out, sft_runs, *resume, "--save_steps", "1", reflect=False)
    assert [r["iteration"] for r in more] == [1]
    assert (out / "checkpoint-2").is_dir() and "iterations: 2" in (out / "config.yaml").read_text()


def test_non_finite_updates_are_skipped_then_stop(sft_runs, tmp_path, monkeypatch, capsys):
    def nan_losses(new, old, adv, clip):
        zeros = torch.zeros_like(new).detach()
        return new * float("nan"), {"policy/approx_kl": zeros, "policy/clipfrac": zeros}

    monkeypatch.setattr(rl_finetune, "ppo_losses", nan_losses)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit):
        rl(out, sft_runs, "--iterations", "3", "--max_bad_updates", "2")
    assert "non-finite" in capsys.readouterr().err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[0]["train/skipped_updates"] >= 1
    assert list(out.glob("checkpoint-*"))


def test_bad_rl_flags(sft_runs, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: 1e-4\nalgo: [ppo\n")
    for flags, needle in (
        (["--algo", "a2c"], "--algo"),
        (["--policy_path", str(tmp_path / "none")], "--policy_path"),
        (["--curriculum", "pickup,fly"], "--curriculum"),
        (["--learning_rate", "-1"], "--learning_rate"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--gamma", "1.5"], "--gamma"),
        (["--kl_coef", "inf"], "--kl_coef"),
        (["--algo", "grpo"], "--group_size"),
        (["--algo", "rloo", "--group_size", "3"], "--num_envs"),
        (["--algo", "grpo", "--group_size", "2", "--replay_buffer_size", "4"], "--replay_buffer_size"),
        (["--group_by_state"], "--algo rloo or grpo"),
        (["--config", str(recipe)], "line 3, column 1"),
    ):
        with pytest.raises(SystemExit):
            rl_finetune.main(["--policy_path", str(sft_runs["policy"]), "--output_dir", str(tmp_path / "x"), *flags])
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_shuffled_labels_score_their_own_tokens(tiny_model_dir):
    import random

    from transformers import AutoModelForCausalLM

    from envs.prompt import label_token_ids, policy_prompt
    from envs.taxi import TaxiEnv
    from training.models import action_logprobs, load_tokenizer
    from training.rollout import LMPolicy

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = LMPolicy(model, tokenizer, shuffle_labels=True)
    random.seed(0)
    rows = [policy.labels(6) for _ in range(3)]
    assert all(len(set(r)) == 6 and set(r) <= set("0123456789") for r in rows) and rows[0] != rows[1]
    obs = TaxiEnv().reset(seed=0)
    prompts = [policy_prompt(obs, r) for r in rows]
    logprobs, _, _ = policy.score(prompts, [6, 6, 6], rows)
    for b, r in enumerate(rows):  # each row equals scoring it alone with its own label ids
        alone, _ = action_logprobs(model, tokenizer, [prompts[b]], [6], torch.tensor(label_token_ids(tokenizer, r)))
        torch.testing.assert_close(logprobs[b], alone[0])


def test_greedy_reflections_are_memoised_and_match_direct_decoding(sft_runs):
    from envs.prompt import reflection_prompt
    from envs.taxi import TaxiEnv
    from training.models import generate_text
    from training.players import load_players
    from training.rollout import Reflector

    players = load_players(str(sft_runs["policy"]), str(sft_runs["reflector"]), with_reference=False)
    reflector = Reflector(players.reflector_model, players.tokenizer, players.reflector_adapter, 8, temperature=0)
    observations = [TaxiEnv(stage="pickup").reset(seed=s) for s in (0, 1, 0)]
    first = reflector.reflect(observations)
    assert first[0] == first[2] and (reflector.calls, reflector.hits) == (3, 0)
    assert reflector.reflect(observations[:2]) == first[:2] and reflector.hits == 2
    from training.rollout import _adapter_scope

    with _adapter_scope(players.reflector_model, players.reflector_adapter):
        direct = generate_text(
            players.reflector_model,
            players.tokenizer,
            [reflection_prompt(observations[1])],
            8,
            greedy=True,
            stop_strings=["\n\n#", "# Action"],
        )
    assert first[1] == direct[0].strip()
    sampled = Reflector(players.reflector_model, players.tokenizer, players.reflector_adapter, 8, temperature=1.0)
    sampled.reflect(observations)
    assert not sampled.memo and sampled.hits == 0


def test_lora_policy_without_a_shared_base_resumes_and_evaluates(sft_runs, tmp_path):
    # the README's "RL without reflection" ablation: a LoRA policy on its own base
    from evaluation import evaluate

    flags = ["--iterations", "2", "--save_steps", "1", "--learning_rate", "1e-2"]
    out = tmp_path / "plain"
    rl(out, sft_runs, *flags, reflect=False)
    assert (out / "checkpoint-2" / "policy" / "adapter_model.safetensors").exists()
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    resumed = rl(out, sft_runs, *flags, "--resume_from_checkpoint", "latest", reflect=False)
    assert [r["iteration"] for r in resumed] == [1]
    summary = evaluate.main(
        ["--run_dir", str(out), "--output_dir", str(tmp_path / "eval"), "--num_episodes", "2", "--batch_size", "2"]
    )
    assert summary["checkpoint"].endswith("checkpoint-2") and summary["stages"]


def test_rl_leaves_the_reflector_and_the_base_untouched(sft_runs, tmp_path, monkeypatch):
    from training import players as players_module

    captured = {}

    def capture(*a, **k):
        captured["players"] = players_module.load_players(*a, **k)
        model = captured["players"].policy_model
        captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return captured["players"]

    monkeypatch.setattr(rl_finetune, "load_players", capture)
    rl(tmp_path / "rl", sft_runs, "--iterations", "2", "--learning_rate", "1e-2")
    after = dict(captured["players"].policy_model.named_parameters())  # on the GPU where there is one
    changed = {n for n, p in captured["before"].items() if not torch.equal(p, after[n].detach().to(p.device))}
    assert changed and all(".policy." in n for n in changed)  # only the policy adapter moved
    assert any(".reflector." in n for n in captured["before"]) and any(".reference." in n for n in captured["before"])


def test_replayed_episodes_get_fresh_logprobs_and_values(sft_runs):
    import dataclasses

    from envs.taxi import TaxiEnv
    from training.players import load_players
    from training.rl_finetune import refresh_replayed
    from training.rollout import LMPolicy, rollout

    players = load_players(str(sft_runs["plain"]), with_reference=False)
    head = torch.nn.Linear(players.policy_model.config.hidden_size, 1)
    policy = LMPolicy(players.policy_model, players.tokenizer, head, players.policy_adapter)
    envs = [TaxiEnv(stage="pickup", horizon=2) for _ in range(3)]
    episodes = rollout(envs, [0, 1, 2], policy, bootstrap=True)
    stale = [
        dataclasses.replace(
            ep,
            steps=[dataclasses.replace(s, logprob=-9.0, value=9.0) for s in ep.steps],
            bootstrap=dataclasses.replace(ep.bootstrap, value=9.0) if ep.bootstrap else None,
        )
        for ep in episodes
    ]
    fresh = refresh_replayed(stale, policy)
    # A batch of other prompts changes bf16 rounding (the default dtype where CUDA has bf16), not float32's.
    tol = 1e-5 if players.policy_model.dtype == torch.float32 else 1e-2
    for old, new in zip(episodes, fresh):
        for a, b in zip(old.steps, new.steps):
            if a.action is not None:
                assert b.logprob == pytest.approx(a.logprob, abs=tol) and b.value == pytest.approx(a.value, abs=tol)
        if old.bootstrap is not None:
            assert new.bootstrap.value == pytest.approx(old.bootstrap.value, abs=tol)
    assert stale[0].steps[0].logprob == -9.0  # the replay buffer's own copy is not modified


def test_rollout_records_the_truncated_state_for_bootstrapping(sft_runs):
    from envs.prompt import policy_prompt
    from envs.taxi import TaxiEnv
    from training.players import load_players
    from training.rollout import LMPolicy, rollout

    players = load_players(str(sft_runs["plain"]), with_reference=False)
    head = torch.nn.Linear(players.policy_model.config.hidden_size, 1)
    policy = LMPolicy(players.policy_model, players.tokenizer, head, players.policy_adapter)
    envs = [TaxiEnv(stage="pickup", horizon=1, danger=False) for _ in range(4)]
    episodes = rollout(envs, [0, 1, 2, 3], policy, bootstrap=True)
    cut = [ep for ep in episodes if ep.steps[-1].truncated and not ep.steps[-1].terminated]
    assert cut and all(ep.bootstrap is not None for ep in cut)
    for ep, env in zip(episodes, envs):
        if ep.bootstrap is not None:
            assert ep.bootstrap.prompt == policy_prompt(env.observation(), ep.bootstrap.labels)
            _, _, v = policy.score([ep.bootstrap.prompt], [ep.bootstrap.n_actions])
            assert ep.bootstrap.value == pytest.approx(float(v[0].detach()), abs=1e-5)
    assert all(ep.bootstrap is None for ep in rollout(envs, [0, 1, 2, 3], policy))  # off unless asked


def test_rollout_with_fewer_envs_than_seeds_starts_the_next_episode_in_a_freed_env(sft_runs):
    from envs.prompt import policy_prompt
    from envs.taxi import TaxiEnv
    from training.players import load_players
    from training.rollout import LMPolicy, OracleAgent, rollout

    seeds = [5, 1, 7, 2, 9]
    one_each = [rollout([TaxiEnv(stage="pickup")], [s], OracleAgent())[0] for s in seeds]
    ended = []
    pooled = rollout([TaxiEnv(stage="pickup") for _ in range(2)], seeds, OracleAgent(), on_episode=ended.append)
    assert [ep.seed for ep in pooled] == seeds  # in the order of the seeds, whichever env played them
    for alone, shared in zip(one_each, pooled):  # the oracle is deterministic: the very same episodes
        assert [st.action for st in shared.steps] == [st.action for st in alone.steps]
        assert shared.success == alone.success and shared.ret == alone.ret
    assert sorted(id(ep) for ep in ended) == sorted(id(ep) for ep in pooled)  # each reported once, as it ended
    # an env that is reset mid-rollout still bootstraps the episode it cut, from the state it was cut in
    players = load_players(str(sft_runs["plain"]), with_reference=False)
    head = torch.nn.Linear(players.policy_model.config.hidden_size, 1)
    policy = LMPolicy(players.policy_model, players.tokenizer, head, players.policy_adapter)
    cut = rollout([TaxiEnv(stage="pickup", horizon=1, danger=False)], [0, 1, 2], policy, bootstrap=True)
    assert any(ep.bootstrap is not None for ep in cut)
    for ep in cut:
        if ep.bootstrap is not None:  # replayed alone, the step leads to the state the bootstrap prompt shows
            replay = TaxiEnv(stage="pickup", horizon=1, danger=False)
            replay.reset(seed=ep.seed)
            after, *_ = replay.step(ep.steps[0].action)
            assert ep.bootstrap.prompt == policy_prompt(after, ep.bootstrap.labels)
    with pytest.raises(ValueError, match="3 environments for 2 seeds"):
        rollout([TaxiEnv(stage="pickup") for _ in range(3)], [0, 1], OracleAgent())


def test_checkpoint_rng_includes_cuda_when_present(monkeypatch):
    from training.rl_finetune import rng_state, set_rng_state

    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1, 2, 3], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.setdefault("cuda", states))
    gen = torch.Generator().manual_seed(1)
    state = rng_state(gen)
    assert state["cuda"][0].tolist() == [1, 2, 3]
    set_rng_state(state, gen)
    assert calls["cuda"][0].tolist() == [1, 2, 3]


def test_evaluation_inherits_the_runs_reflection_and_label_settings(sft_runs, tmp_path):
    from evaluation import evaluate

    out = tmp_path / "rl"
    rl(
        out,
        sft_runs,
        "--iterations",
        "1",
        "--reflection_temperature",
        "0",
        "--reflection_max_tokens",
        "5",
        "--shuffle_labels",
    )
    common = ["--run_dir", str(out), "--num_episodes", "2", "--batch_size", "2"]
    summary = evaluate.main([*common, "--output_dir", str(tmp_path / "e1")])
    assert (summary["reflection_temperature"], summary["reflection_max_tokens"], summary["shuffle_labels"]) == (
        0.0,
        5,
        True,
    )
    summary = evaluate.main([*common, "--output_dir", str(tmp_path / "e2"), "--reflection_temperature", "0.5"])
    assert summary["reflection_temperature"] == 0.5  # the command line still wins


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_algorithms_run_on_taxi(sft_runs, tmp_path, algo):
    flags = ["--iterations", "1", "--algo", algo, "--group_size", "2", "--group_by_state", "--kl_coef", "0.1"]
    history = rl(tmp_path / algo, sft_runs, *flags)
    assert "loss/value" not in history[0] and "policy/clipfrac" in history[0] and "objective/kl" in history[0]
    episodes = [json.loads(line) for line in open(tmp_path / algo / "episodes.jsonl")]
    assert episodes[0]["seed"] == episodes[1]["seed"]  # a group: two episodes of one task


def _launch_two(out, runs, *flags, wait=True):
    import subprocess
    from pathlib import Path

    from conftest import accelerate_launch, launch_env

    cmd = [*accelerate_launch(2), "-m", "training.rl_finetune", "--policy_path", str(runs["policy"])]
    cmd += ["--reflector_path", str(runs["reflector"]), "--output_dir", str(out), *RL_FLAGS, *flags]
    env = launch_env()
    root = Path(__file__).resolve().parents[1]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_rl_matches_shape_and_resumes_after_a_kill(sft_runs, tmp_path):
    import os
    import shutil
    import signal
    import time

    flags = ["--iterations", "4", "--save_steps", "2", "--learning_rate", "1e-2", "--replay_buffer_size", "4"]
    single = rl(tmp_path / "single", sft_runs, *flags)
    _launch_two(tmp_path / "full", sft_runs, *flags)
    full = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["iteration"] for r in full] == [0, 1, 2, 3] and set(full[0]) == set(single[0])
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoint-4").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]

    part = tmp_path / "part"
    proc = _launch_two(part, sft_runs, *flags, wait=False)
    deadline = time.time() + 300
    while not (part / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert (part / "checkpoint-2").is_dir(), proc.stderr.read()[-3000:]
    shutil.rmtree(part / "checkpoint-4", ignore_errors=True)  # if it got that far before the kill
    _launch_two(part, sft_runs, *flags, "--resume_from_checkpoint", "latest")
    resumed = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], str):
                assert a[key] == b[key]
            elif not key.startswith(("timing/", "env/steps_per_s")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def test_identical_prompts_are_scored_once_with_the_same_outputs_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from envs.prompt import policy_prompt
    from envs.taxi import TaxiEnv
    from training.models import load_tokenizer
    from training.rollout import LMPolicy

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    policy = LMPolicy(model, tokenizer, head)
    labels = policy.labels(6)
    a, b = (policy_prompt(TaxiEnv().reset(seed=s), labels) for s in (0, 1))
    prompts = [a, b, a, a]

    def run(dedup: bool):
        model.zero_grad()
        head.zero_grad()
        if dedup:
            lp, ent, v = policy.score(prompts, [6] * 4, [labels] * 4)
        else:  # each row alone: no deduplication possible
            rows = [policy.score([p], [6], [labels]) for p in prompts]
            lp, ent, v = (torch.cat([r[i] for r in rows]) for i in range(3))
        weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
        ((lp[:, 2] * weights).sum() + (v * weights).sum() + ent.sum()).backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *head.parameters()] if p.grad is not None]
        return lp.detach(), v.detach(), grads

    before = (policy.rows_scored, policy.rows_computed)
    lp, v, grads = run(dedup=True)
    assert (policy.rows_scored - before[0], policy.rows_computed - before[1]) == (4, 2)
    lp_ref, v_ref, grads_ref = run(dedup=False)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4)  # float noise of other batch shapes


def test_taxi_plans_measures_how_a_policy_acts_on_the_plan(sft_runs, tmp_path, monkeypatch, capsys):
    from evaluation import taxi_plans
    from training.rollout import Reflector

    out = tmp_path / "plans.json"
    flags = ["--reflector_path", str(sft_runs["reflector"]), "--policy_path", str(sft_runs["policy"])]
    flags += ["--taxi_stage", "dropoff", "--reflection_max_tokens", "4", "--batch_size", "37", "--output", str(out)]
    with pytest.raises(SystemExit):  # a missing policy folder is named before any model loads
        taxi_plans.main(["--reflector_path", str(sft_runs["reflector"]), "--policy_path", str(tmp_path / "none")])
    assert "--policy_path" in capsys.readouterr().err
    # a barely trained reflector names no move: said, not a crash
    taxi_plans.main(flags)
    assert "nothing to swap" in capsys.readouterr().out
    assert json.loads(out.read_text())["policy"]["states"] == 0
    # with plans that name a move, every state is scored with its plan and the 3 swapped ones (batches of 37)
    monkeypatch.setattr(Reflector, "reflect", lambda self, obs: ["Best next action: move north."] * len(obs))
    result = taxi_plans.main(flags)
    reading = json.loads(out.read_text())["policy"]
    assert reading["states"] == 100 and reading == result["policy"]
    for key in ("follow", "swapped_follow", "unswapped"):
        assert 0 < reading[key] < 1
    assert reading["swap_shift"] == pytest.approx(reading["swapped_follow"] - reading["unswapped"])
    assert "swap shift" in capsys.readouterr().out


def test_a_full_fine_tune_from_a_relative_base_loads_from_anywhere(sft_runs, tiny_model_dir, tmp_path, monkeypatch):
    """training.sft records --model_name_or_path as given; a full fine-tune must not need it again (the demo's
    policies start from "runs/demo/sft_reflector", and RL or evaluation may run from another folder)."""
    import shutil

    from training.players import load_players

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "base")
    monkeypatch.chdir(work)
    sft.main(
        ["--role", "policy", "--data_dir", str(sft_runs["policy"].parent / "data"), "--output_dir", "run"]
        + ["--model_name_or_path", "base", "--use_peft", "false", "--max_steps", "1", "--report_to", "none"]
        + ["--max_eval_samples", "0", "--per_device_train_batch_size", "2"]
    )
    monkeypatch.chdir(tmp_path)
    players = load_players(str(work / "run"), str(sft_runs["reflector"]), with_reference=False)
    assert players.policy_adapter is None and players.tokenizer.padding_side == "left"
    assert players.tokenizer("move north")["input_ids"]  # the run's saved tokenizer, not the unreachable base's


def test_a_served_reflector_gives_the_local_reflectors_run(sft_runs, tmp_path):
    """--reflector_api_base: the SFT reflector behind evaluation.serve, a third of its requests failing (429 or
    500) and retried; greedy, the run's metrics and reflections equal the in-process reflector's."""
    import threading

    from evaluation.serve import Faults, make_server
    from llm.local import LocalBackend

    server = make_server(
        LocalBackend("tiny-gpt2", adapter=str(sft_runs["reflector"]), batch_size=8),
        served_name="reflector",
        faults=Faults(rate_429=0.2, rate_500=0.1, seed=1),
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    flags = ["--iterations", "2", "--reflection_temperature", "0", "--kl_coef", "0", "--seed", "3"]
    try:
        local = rl(tmp_path / "local", sft_runs, *flags)
        served = rl_finetune.main(
            ["--policy_path", str(sft_runs["policy"]), "--output_dir", str(tmp_path / "served"), *RL_FLAGS, *flags]
            + ["--reflector_api_base", server.url, "--reflector_model", "reflector"]
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    draws = random.Random(1)  # the server's fault draws, one a request: below 0.3 it failed
    assert sum(draws.random() < 0.3 for _ in range(server.requests)) > 0
    for a, b in zip(local, served):
        keys = [k for k in a if not k.startswith("timing/") and k != "env/steps_per_s"]
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, nan_ok=True)

    def reflections(run):
        return [s["reflection"] for line in open(run / "episodes.jsonl") for s in json.loads(line)["steps"]]

    assert reflections(tmp_path / "served") == reflections(tmp_path / "local") and reflections(tmp_path / "local")[0]
    with pytest.raises(SystemExit):
        rl(tmp_path / "both", sft_runs, "--reflector_api_base", server.url, "--reflector_model", "reflector")
