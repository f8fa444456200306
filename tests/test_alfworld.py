"""ALFWorld on the real engine: generated games of every task type won by the expert, disjoint splits, the episode
rules, each injected fault (crash, hang, broken file), 100 resets without leaks, official data layout, and a short
data -> SFT -> RL -> evaluation run through ``--env alfworld``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("textworld", reason="ALFWorld needs textworld (make venv installs it)")
pytest.importorskip("fast_downward", reason="ALFWorld needs fast-downward-textworld (make venv installs it)")

from envs.alfworld import BAD_GAMES, TASK_TYPES, AlfWorldEnv, generated_games  # noqa: E402
from envs.alfworld.generator import floor_plan_split, problem_hash, wheel  # noqa: E402
from experiment_args import ALFWORLD_TASK_TYPES, AlfWorldArguments, UsageError  # noqa: E402

SMALL = ["--alfworld_train_games", "1", "--alfworld_eval_games", "1"]


def small_args(games_dir: Path, **kwargs) -> AlfWorldArguments:
    return AlfWorldArguments(
        alfworld_games_dir=str(games_dir), alfworld_train_games=1, alfworld_eval_games=1, **kwargs
    )


@pytest.fixture(scope="session")
def games_dir(tmp_path_factory) -> Path:
    """One generated game per task type and split (18), written once for the session."""
    folder = tmp_path_factory.mktemp("alfworld_games")
    small_args(folder).games(split="train")
    return folder


def play_expert(env: AlfWorldEnv, seed: int) -> tuple[float, dict]:
    env.reset(seed)
    total, info = 0.0, {}
    while not env.done:
        _, reward, _, _, info = env.step(env.oracle_action())
        total += reward
    return total, info


def test_generated_games_of_every_task_type_are_won_by_the_expert(games_dir):
    assert ALFWORLD_TASK_TYPES == TASK_TYPES and AlfWorldArguments.stages == ("all", *TASK_TYPES)
    manifest = json.loads((games_dir / "manifest.json").read_text())
    hashes, plans = {}, {}
    for split, paths in manifest["games"].items():
        data = [json.loads((games_dir / p).read_text()) for p in paths]
        assert sorted(d["goal"]["task_type"] for d in data) == sorted(TASK_TYPES)
        for d in data:  # the official file format, the wheel's domain, a verified walkthrough
            assert d["solvable"] and d["walkthrough"] and d["pddl_domain"] == wheel()["domain"]
            assert "UNKNOWN GOAL" not in d["grammar"]
        hashes[split] = {problem_hash(d["pddl_problem"]) for d in data}
        plans[split] = {int(d["layout"].removeprefix("FloorPlan")) for d in data}
    assert not hashes["train"] & hashes["validation"] and not hashes["train"] & hashes["test"]
    assert {floor_plan_split(n) for n in plans["test"]} == {"test"}  # floor plans never trained on
    assert {floor_plan_split(n) for n in plans["train"] | plans["validation"]} == {"train"}
    env = small_args(games_dir).make_env(split="test")
    won = set()
    for seed in range(len(env.games)):
        total, info = play_expert(env, seed)
        assert info["success"] and total == 1.0 and env.steps <= 15, env.game
        won.add(info["task_type"])
    env.close()
    assert won == set(TASK_TYPES)


def test_observation_invalid_labels_and_horizon(games_dir):
    env = small_args(games_dir, alfworld_stage="pick_two_obj_and_place", alfworld_horizon=3).make_env(split="train")
    obs = env.reset(0)
    assert obs.text.startswith("-= Welcome to TextWorld, ALFRED! =-") and "Your task is to: " in obs.text
    assert "help" not in obs.actions and "look" in obs.actions and obs.actions == sorted(obs.actions)
    assert obs.extra["tags"] == {"task_type": "pick_two_obj_and_place"}
    after, reward, terminated, truncated, info = env.step(None)  # no label: a step, reward 0, nothing changes
    assert info["invalid_action"] and reward == 0.0 and not (terminated or truncated)
    assert after.text == obs.text and after.actions == obs.actions and env.steps == 1
    command = obs.actions[env.oracle_action()]
    after, reward, terminated, truncated, info = env.step(obs.actions.index(command))
    assert f"Here is the previous path:\n--- Step: 1 ---\nAction: {command}\nObservation: You arrive" in after.text
    _, reward, terminated, truncated, info = env.step(len(after.actions))  # one past the list: invalid too
    assert info["invalid_action"] and truncated and not terminated and reward == 0.0 and not info["success"]
    with pytest.raises(RuntimeError):
        env.step(0)
    env.close()
    for bad, message in (
        ({"alfworld_stage": "pick"}, "--alfworld_stage 'pick' is not one of"),
        ({"alfworld_data": "/nonexistent"}, "--alfworld_data /nonexistent has no json_2.1.1"),
        ({"alfworld_horizon": 0}, "--alfworld_horizon must be positive"),
    ):
        with pytest.raises(UsageError, match=message):
            AlfWorldArguments(**bad)


def test_each_injected_fault_marks_the_game_bad_and_is_skipped(games_dir, tmp_path):
    good = generated_games(sorted(games_dir.glob("train/pick_and_place_simple/*/game.tw-pddl")))[0]
    data = json.loads(Path(good.path).read_text())
    paths = {}
    for kind in ("crash", "hang", "crash_on_load", "broken"):
        path = tmp_path / kind / "game.tw-pddl"
        path.parent.mkdir()
        path.write_text("{not json" if kind == "broken" else json.dumps({**data, "fault_injection": kind}))
        paths[kind] = str(path)
    games = generated_games([paths["broken"], paths["crash_on_load"], paths["crash"], paths["hang"], good.path])
    env = AlfWorldEnv(games, step_timeout=3.0)
    env.reset(0)  # a broken file, then a worker that dies while loading: both skipped, the crash game plays
    assert env.game.path == paths["crash"] and env.faults == {"broken": 1, "crash": 1}
    assert BAD_GAMES[paths["broken"]] == "broken" and BAD_GAMES[paths["crash_on_load"]] == "crash"
    _, reward, terminated, truncated, info = env.step(env.oracle_action())  # the worker dies: the episode ends
    assert info["fault"] == "crash" and truncated and not terminated and reward == 0.0 and not info["success"]
    env.reset(2)  # the crashed game is bad now: the hang game comes next
    assert env.game.path == paths["hang"]
    _, _, _, truncated, info = env.step(env.oracle_action())  # no answer within 3 s: killed, marked bad
    assert info["fault"] == "timeout" and truncated and BAD_GAMES[paths["hang"]] == "timeout"
    total, info = play_expert(env, 0)  # every bad game skipped: the good one is played to a win
    assert env.game.path == good.path and total == 1.0 and info["success"]
    assert env.faults == {"broken": 1, "crash": 2, "timeout": 1} and env.engine.starts == 4
    env.close()
    with pytest.raises(RuntimeError, match="every one of the 2 ALFWorld games failed"):
        AlfWorldEnv(generated_games([paths["broken"], paths["crash"]])).reset(0)


def _rss_kb(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_100_resets_reuse_one_engine_without_growing_memory_or_open_files(games_dir):
    env = small_args(games_dir).make_env(split="train")

    def usage() -> tuple[int, int, int, int]:
        pid = env.engine.process.pid
        return len(os.listdir("/proc/self/fd")), len(os.listdir(f"/proc/{pid}/fd")), _rss_kb("self"), _rss_kb(pid)

    for i in range(100):  # 10 games in turn, each reset 10 times (as groups of one task do), with a step
        env.reset(i // 10)
        if i % 10 == 9:
            env.step(env.oracle_action())
        if i == 9:
            pid, before = env.engine.process.pid, usage()
    after = usage()
    assert env.engine.process.pid == pid and env.engine.starts == 1  # created once, reused
    assert after[:2] == before[:2]  # open files of this process and of the worker
    assert after[2] - before[2] < 20_000 and after[3] - before[3] < 20_000  # RSS in kB
    env.close()
    assert env.engine.process is None


def test_official_data_layout_is_played_when_alfworld_data_is_set(games_dir, tmp_path, monkeypatch):
    """A folder in the layout alfworld-download leaves (json_2.1.1/<split>/<task>/<trial>/): game.tw-pddl beside
    traj_data.json, whose pddl_params give the goal; movable and unsolvable games are skipped."""
    root = tmp_path / "alfworld_data"
    for split, official in (("train", "train"), ("test", "valid_unseen"), ("validation", "valid_seen")):
        for i, game in enumerate(generated_games(sorted(games_dir.glob(f"{split}/*/*/game.tw-pddl")))):
            for variant in ("", "movable", "unsolvable"):
                trial = root / "json_2.1.1" / official / f"{game.task_type}-{variant}{i}" / "trial_T0"
                trial.mkdir(parents=True)
                data = json.loads(Path(game.path).read_text())
                data.pop("goal")
                data["solvable"] = variant != "unsolvable"
                (trial / "game.tw-pddl").write_text(json.dumps(data))
                params = {k: v for k, v in game.goal().items() if k != "task_type"}
                traj = {"task_type": game.task_type, "pddl_params": {**params, "object_sliced": False}}
                (trial / "traj_data.json").write_text(json.dumps(traj))
    monkeypatch.setenv("ALFWORLD_DATA", str(root))
    args = AlfWorldArguments(alfworld_stage="pick_heat_then_place_in_recep")
    assert args.alfworld_data == str(root) and args.official
    env = args.make_env(split="test")
    assert len(env.games) == 1 and "valid_unseen" in env.games[0].path
    total, info = play_expert(env, 0)
    assert total == 1.0 and info["task_type"] == "pick_heat_then_place_in_recep"
    env.close()
    assert len(AlfWorldArguments().games(split="train")) == 6
    assert not small_args(games_dir, alfworld_data="generated").official
    shutil.rmtree(root / "json_2.1.1")  # the variable alone, without the files, means generated games
    assert not AlfWorldArguments().official


def test_data_sft_rl_and_evaluation_with_env_alfworld(games_dir, tmp_path):
    from conftest import tiny_sft_and_rl

    from data_gen import gen_sft
    from evaluation import evaluate

    data = tmp_path / "data"
    gen_sft.main(
        ["--env", "alfworld", "--output_dir", str(data), "--num_episodes", "3", "--num_test_episodes", "1"]
        + ["--alfworld_games_dir", str(games_dir), *SMALL, "--negative_rate", "0.5", "--alfworld_horizon", "6"]
    )
    assert "env: alfworld" in (data / "config.yaml").read_text()
    rows = [json.loads(line) for line in open(data / "train" / "sft_policy.jsonl")]
    assert {r["kind"] for r in rows} == {"positive", "negative"}
    assert all("Best next command:" in r["prompt"] for r in rows)
    history = tiny_sft_and_rl(data, tmp_path)
    assert len(history) == 1 and history[0]["env/prompts_cut"] == 0 and history[0]["env/engine_faults"] == 0
    summary = evaluate.main(
        ["--run_dir", str(tmp_path / "rl"), "--output_dir", str(tmp_path / "eval"), "--num_episodes", "2"]
    )
    assert summary["env"] == "alfworld" and summary["split"] == "test"
    by = summary["stages"]["all"]["success_by"]["task_type"]
    assert sum(v["episodes"] for v in by.values()) == 2 and set(by) <= set(TASK_TYPES)
    assert summary["stages"]["all"]["engine_faults"] == {}
    # a broken test game does not stop an evaluation: it is skipped and counted
    games = tmp_path / "games"
    shutil.copytree(games_dir, games)
    broken = json.loads((games / "manifest.json").read_text())["games"]["test"][0]
    (games / broken).write_text("{not json")
    summary = evaluate.main(
        ["--agent", "oracle", "--env", "alfworld", "--alfworld_games_dir", str(games), *SMALL]
        + ["--output_dir", str(tmp_path / "oracle"), "--num_episodes", "2", "--batch_size", "1"]
    )
    stage = summary["stages"]["all"]
    assert stage["engine_faults"] == {"broken": 1} and stage["success_rate"] == 1.0
