"""Evaluation: reference agents, the Wilson interval, outputs and bad input."""

import json

import pytest

from evaluation import evaluate
from evaluation.evaluate import wilson_interval


def test_wilson_interval_by_hand():
    low, high = wilson_interval(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(100, 100)[1] == pytest.approx(1.0)


def test_oracle_succeeds_everywhere_it_can(tmp_path):
    summary = evaluate.main(
        [
            "--agent",
            "oracle",
            "--output_dir",
            str(tmp_path / "oracle"),
            "--num_episodes",
            "40",
            "--stages",
            "pickup,dropoff",
        ]
    )
    for stage in ("pickup", "dropoff"):
        assert summary["stages"][stage]["success_rate"] == 1.0
        assert summary["stages"][stage]["invalid_action_rate"] == 0.0
    # with a horizon long enough for every start, the full task too
    summary = evaluate.main(
        [
            "--agent",
            "oracle",
            "--output_dir",
            str(tmp_path / "o2"),
            "--num_episodes",
            "40",
            "--stages",
            "full",
            "--taxi_horizon",
            "20",
        ]
    )
    assert summary["stages"]["full"]["success_rate"] == 1.0


def test_random_agent_rarely_succeeds_and_outputs_are_written(tmp_path):
    out = tmp_path / "random"
    flags = ["--agent", "random", "--num_episodes", "60", "--stages", "dropoff", "--batch_size", "16"]
    summary = evaluate.main(["--output_dir", str(out), *flags])
    stage = summary["stages"]["dropoff"]
    assert stage["success_rate"] < 0.1 and stage["episodes"] == 60
    assert stage["success_ci95"][0] <= stage["success_rate"] <= stage["success_ci95"][1]
    assert json.loads((out / "summary.json").read_text()) == summary
    episodes = [json.loads(line) for line in open(out / "episodes.jsonl")]
    assert len(episodes) == 60 and all(e["steps"] for e in episodes)
    # the same seeds give the same episodes
    again = evaluate.main(["--output_dir", str(tmp_path / "r2"), *flags])
    assert again["stages"] == summary["stages"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--agent", "expert"], "--agent"),
        (["--agent", "model"], "--run_dir"),
        (["--agent", "oracle", "--stages", "pickup,teleport"], "--stages"),
        (["--run_dir", "/nonexistent/run"], "--run_dir"),
    ],
)
def test_bad_eval_flags(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--output_dir", str(tmp_path / "e"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "e").exists()


def test_start_bootstrap_interval_counts_start_states_not_episodes():
    from evaluation.evaluate import start_bootstrap_interval, wilson_interval

    # 200 episodes from 4 start states: two always won, two always lost
    successes = [True] * 100 + [False] * 100
    starts = [0] * 50 + [1] * 50 + [2] * 50 + [3] * 50
    lo, hi = start_bootstrap_interval(successes, starts)
    w_lo, w_hi = wilson_interval(100, 200)
    assert lo <= 0.5 <= hi and hi - lo > 2 * (w_hi - w_lo)  # 4 independent tests, not 200
    # one episode per start: close to the episode-level interval
    lo1, hi1 = start_bootstrap_interval(successes, list(range(200)))
    assert abs((hi1 - lo1) - (w_hi - w_lo)) < 0.03


def test_taxi_dropoff_can_start_anywhere():
    from envs.taxi import IN_TAXI, LOCS, TaxiEnv, decode

    env = TaxiEnv(stage="dropoff", dropoff_start="anywhere")
    starts = set()
    for seed in range(2000):
        env.reset(seed=seed)
        row, col, passenger, destination = decode(env.state)
        assert passenger == IN_TAXI and (row, col) != LOCS[destination] and env.state_key()[0] == env.state
        starts.add(env.state)
    assert len(starts) == 96


def test_taxi_plan_accuracy_counts_shortest_path_plans():
    from data_gen.taxi.reflection import rule_reflection
    from envs.taxi import TaxiEnv, optimal_actions
    from evaluation.taxi_plans import plan_accuracy, plan_action, stage_states

    assert (len(stage_states("pickup")), len(stage_states("dropoff")), len(stage_states("full"))) == (300, 100, 400)
    env = TaxiEnv(stage="dropoff", history=False, coordinates=True)

    def oracle(observations):  # the rule reflector's plan is the oracle's action
        return [rule_reflection(env, None, None, o.extra["state"]) for o in observations]

    assert plan_accuracy(oracle, env)["accuracy"] == 1.0
    south = plan_accuracy(lambda obs: ["Best next action: move south. Then drive."] * len(obs), env)
    expected = sum(0 in optimal_actions(s, "dropoff") for s in stage_states("dropoff")) / 100
    assert south["accuracy"] == pytest.approx(expected) and 0 < expected < 1
    assert plan_action("no plan here") is None and plan_action("Best next action: fly.") is None


def test_plan_reading_tells_a_policy_that_acts_on_the_plan_from_one_that_does_not():
    import torch

    from data_gen.taxi.reflection import rule_reflection
    from envs.prompt import action_labels
    from envs.taxi import ACTIONS, TaxiEnv
    from evaluation.taxi_plans import plan_action, plan_reading, stage_observations, stage_states, swap_plan

    env = TaxiEnv(stage="dropoff", history=False, coordinates=True)
    observations = stage_observations(env, stage_states("dropoff"))
    reflections = [rule_reflection(env, None, None, o.extra["state"]) for o in observations]
    assert plan_action(swap_plan(reflections[0], 2)) == 2 and swap_plan(reflections[0], 2).endswith("away.")

    def reader(prompts, n_actions):  # puts 0.7 on whatever move the prompt's plan names
        rows = torch.full((len(prompts), 6), 0.06)
        for b, prompt in enumerate(prompts):
            rows[b, plan_action(prompt)] = 0.7
        return rows

    def ignorer(prompts, n_actions):  # the same distribution whatever the plan says
        return torch.full((len(prompts), 6), 1 / 6)

    moves = sum(plan_action(r) is not None and ACTIONS[plan_action(r)].startswith("move") for r in reflections)
    read = plan_reading(reader, observations, reflections, action_labels)
    assert read["states"] == moves > 0
    assert read["follow"] == pytest.approx(0.7) and read["swap_shift"] == pytest.approx(0.64)
    ignored = plan_reading(ignorer, observations, reflections, action_labels)
    assert ignored["follow"] == pytest.approx(1 / 6) and ignored["swap_shift"] == pytest.approx(0.0)
