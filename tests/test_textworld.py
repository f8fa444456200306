"""TextWorld: locally generated games (seeded, disjoint splits) won by the replanned walkthrough, the episode rules,
and data generation through ``--env textworld``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("textworld", reason="TextWorld needs textworld and jericho (make venv installs them)")

from experiment_args import TextWorldArguments, UsageError  # noqa: E402

SMALL = ["--textworld_train_games", "2", "--textworld_eval_games", "1"]


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> TextWorldArguments:
    folder = tmp_path_factory.mktemp("textworld_games")
    return TextWorldArguments(textworld_games_dir=str(folder), textworld_train_games=2, textworld_eval_games=1)


def test_generated_games_are_disjoint_and_won_by_the_walkthrough(args):
    worlds = {}
    for split in ("train", "validation", "test"):
        files = args.games(split)
        assert len(files) == (2 if split == "train" else 1) and all(f.suffix == ".z8" for f in files)
        games = [json.loads(f.with_suffix(".json").read_text()) for f in files]  # the game as TextWorld saved it
        worlds[split] = {json.dumps([sorted(json.dumps(x) for x in g["world"]), g["objective"]]) for g in games}
    assert not worlds["train"] & (worlds["validation"] | worlds["test"])
    for split in ("train", "test"):
        env = args.make_env(split=split)
        for seed in range(len(env.games)):
            obs = env.reset(seed)
            assert obs.text.startswith("Your task: ") and obs.actions == sorted(obs.actions)
            total = 0.0
            while not env.done:
                obs, reward, terminated, truncated, info = env.step(env.oracle_action())
                total += reward
            assert info["success"] and terminated and total == 1.0
        env.close()


def test_invalid_labels_cost_a_step_and_change_nothing(args):
    env = TextWorldArguments(**{**vars(args), "textworld_horizon": 2}).make_env(split="train")
    obs = env.reset(0)
    after, reward, terminated, truncated, info = env.step(None)
    assert info["invalid_action"] and reward == 0.0 and after.text == obs.text and not (terminated or truncated)
    after, reward, terminated, truncated, info = env.step(len(obs.actions))
    assert info["invalid_action"] and truncated and not info["success"]
    env.close()
    with pytest.raises(UsageError, match="--textworld_quest_length must be positive"):
        TextWorldArguments(textworld_quest_length=0)


def test_data_sft_rl_and_evaluation_with_env_textworld(args, tmp_path):
    from conftest import tiny_sft_and_rl

    from data_gen import gen_sft
    from evaluation import evaluate

    data = tmp_path / "data"
    gen_sft.main(
        ["--env", "textworld", "--output_dir", str(data), "--num_episodes", "2", "--num_test_episodes", "1"]
        + ["--textworld_games_dir", args.textworld_games_dir, *SMALL, "--negative_rate", "0.5"]
    )
    assert "env: textworld" in (data / "config.yaml").read_text()
    rows = [json.loads(line) for line in open(Path(data) / "train" / "sft_policy.jsonl")]
    assert rows and all("Best next command:" in r["prompt"] for r in rows)
    history = tiny_sft_and_rl(data, tmp_path, "--textworld_horizon", "4")
    assert len(history) == 1 and history[0]["env/steps"] > 0
    summary = evaluate.main(
        ["--run_dir", str(tmp_path / "rl"), "--output_dir", str(tmp_path / "eval"), "--num_episodes", "2"]
    )
    assert summary["env"] == "textworld" and summary["split"] == "test" and summary["stages"]
    episodes = [json.loads(line) for line in open(tmp_path / "eval" / "episodes.jsonl")]
    assert len(episodes) == 2 and all(e["steps"] and e["steps"][0]["reflection"] is not None for e in episodes)
