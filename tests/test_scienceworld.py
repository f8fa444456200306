"""ScienceWorld through its Java simulator: the observation and the capped action list, invalid and typed actions,
the gold path winning a short task with reward annotations, faults, and evaluation through ``--env scienceworld``.
One JVM serves the whole module (a start is ~3 s)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

pytest.importorskip("scienceworld", reason="ScienceWorld needs the scienceworld package (pyproject.toml pins it)")
if shutil.which("java") is None:
    pytest.skip("ScienceWorld's simulator needs Java 17+ on PATH", allow_module_level=True)

from envs.scienceworld_env import SPLIT_VARIATIONS, ScienceWorldEnv, cap_actions, task_names, template_of  # noqa: E402
from experiment_args import SCIENCEWORLD_TASKS, ScienceWorldArguments, UsageError  # noqa: E402

TASK = "find-non-living-thing"  # gold paths of 5-7 steps


@pytest.fixture(scope="module")
def env():
    env = ScienceWorldEnv([TASK], split="train")
    yield env
    env.close()


def test_reset_shows_the_task_and_a_capped_sorted_action_list(env):
    obs = env.reset(0)
    assert obs.text.startswith("Task Description:\nYour task is to find a(n) non-living thing.")
    assert "\n\nCurrent observation:\nThis room is called the " in obs.text and "previous path" not in obs.text
    assert len(obs.actions) == 40 == len(set(obs.actions)) and obs.actions == sorted(obs.actions)
    assert len(set(env.valid)) > 40 and set(obs.actions) <= set(env.valid) and "reset task" not in obs.actions
    assert "look around" in obs.actions and any(a.startswith("focus on ") for a in obs.actions)
    assert obs.extra["tags"] == {"task": TASK} and env.variation == SPLIT_VARIATIONS[TASK, "train"][0]
    assert env.reset(0).actions == obs.actions  # the same seed, the same episode and list
    assert task_names() == SCIENCEWORLD_TASKS
    with pytest.raises(UsageError, match="--scienceworld_task 'nope'"):
        ScienceWorldArguments(scienceworld_task="nope")
    with pytest.raises(UsageError, match="--scienceworld_max_actions must be in"):
        ScienceWorldArguments(scienceworld_max_actions=63)


def test_the_cap_is_a_seeded_round_robin_over_templates():
    templates = ["connect OBJ to OBJ", "look around", "look at OBJ", "go OBJ", "focus on OBJ"]
    actions = [f"connect a{i} to b{j}" for i in range(10) for j in range(10)]
    actions += ["look around", "go to kitchen", "go to hallway", "focus on cup"]
    kept = cap_actions(actions, 6, 1, lambda a: template_of(a, templates))
    # round 0: one connect, look around, one go, focus on cup; round 1: a second connect and the other go
    assert kept == sorted(kept) and {"look around", "go to kitchen", "go to hallway", "focus on cup"} < set(kept)
    assert sum(a.startswith("connect ") for a in kept) == 2
    assert cap_actions(actions, 6, 2, lambda a: template_of(a, templates)) != kept  # the seed picks the connects
    assert [template_of(a, templates) for a in ("look around", "look at cup", "go to kitchen")] == [
        "look around",
        "look at",
        "go",
    ]


def test_invalid_and_typed_actions(env):
    obs = env.reset(0)
    for invalid in (lambda: env.step(None), lambda: env.step(40), lambda: env.step_text("dance with the moon")):
        after, reward, terminated, truncated, info = invalid()
        assert info["invalid_action"] and reward == 0.0 and not (terminated or truncated)
        assert after.text == obs.text and after.actions == obs.actions
    assert env.step_text("reset task")[4]["invalid_action"] and env.steps == 4
    after, reward, _, _, info = env.step_text("  open door   to kitchen ")  # typed: ScienceWorld's parser reads it
    assert not info["invalid_action"] and reward == pytest.approx(0.08) and info["score"] == 8
    assert "Action: open door to kitchen\nObservation: The door is now open. (Reward: 8)" in after.text


def test_the_gold_path_wins_a_short_variation_with_rewards_annotated(env):
    env.keep_gold = True
    try:
        obs = env.reset(1)
        total = 0.0
        while not env.done:
            assert env.gold[env.gold_index] in obs.actions
            obs, reward, terminated, truncated, info = env.step(env.oracle_action())
            total += reward
    finally:
        env.keep_gold = False
    assert info["success"] and terminated and not truncated and info["score"] == 100
    assert total == pytest.approx(1.0) and env.steps == len(env.gold) <= 7
    rewards = [int(x) for x in re.findall(r"\(Reward: (-?\d+)\)", obs.text)]
    assert len(rewards) == 4 and sum(rewards) > 0  # the last history=4 steps, each annotated


def test_evaluate_random_and_oracle(env, tmp_path, monkeypatch):
    from evaluation import evaluate

    shared = env._simulator()  # the module's JVM serves the evaluation's environments too

    def close(self):
        self._executor.shutdown()
        self._sw = self._executor = None

    monkeypatch.setattr(ScienceWorldEnv, "_start", lambda self: shared)
    monkeypatch.setattr(ScienceWorldEnv, "close", close)
    common = ["--env", "scienceworld", "--scienceworld_task", TASK, "--num_episodes", "2", "--batch_size", "1"]
    evaluate.main(
        ["--agent", "random", "--output_dir", str(tmp_path / "random"), *common, "--scienceworld_horizon", "3"]
    )
    evaluate.main(
        ["--agent", "oracle", "--output_dir", str(tmp_path / "oracle"), *common, "--scienceworld_keep_gold", "true"]
    )
    stages = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("random", "oracle")}
    for summary in stages.values():
        stage = summary["stages"][TASK]
        assert summary["split"] == "test" and stage["episodes"] == 2 and stage["engine_faults"] == {}
        assert stage["success_by"]["task"][TASK]["episodes"] == 2
    assert stages["random"]["stages"][TASK]["length_mean"] <= 3
    assert stages["oracle"]["stages"][TASK]["success_by"]["task"][TASK]["success_rate"] == 1.0


def test_faults_end_the_episode_and_are_counted(env):  # last: it kills the module's JVM
    env.reset(0)
    env._sw._gateway.java_process.kill()
    _, reward, terminated, truncated, info = env.step(0)
    assert info["fault"] == "crash" and truncated and not terminated and reward == 0.0 and not info["success"]
    env.reset(0)  # on a fresh JVM
    env.step_timeout = 1e-3
    _, _, _, truncated, info = env.step(0)
    assert info["fault"] == "timeout" and truncated and env.faults == {"crash": 1, "timeout": 1} and env._sw is None
