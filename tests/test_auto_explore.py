"""AutoExplore: the read-only view's escapes, the episode rules, the task generator, splits and a short
data -> SFT -> RL -> evaluation run through ``--env auto_explore``."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from envs.auto_explore import AutoExploreEnv, PathError, RepoView, generate_tasks, load_tasks, save_tasks, split_tasks
from envs.auto_explore.tasks import Task
from experiment_args import AutoExploreArguments, UsageError


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def make_repo(root: Path) -> Path:
    """A small package: answers at depths 0, 1 and 2, a document, and entries the filter drops."""
    write(root / "main.py", 'def run_server(port):\n    """Start the HTTP server on the given port."""\n')
    write(
        root / "pkg" / "core.py",
        'def parse_config(path):\n    """Read a configuration file into a dict."""\n\n\n'
        'class Engine:\n    """The engine that runs scheduled jobs."""\n',
    )
    write(root / "pkg" / "sub" / "helpers.py", 'def slugify(text):\n    """Turn a title into a url slug."""\n')
    write(root / "docs" / "guide.md", "# Guide\n\n## Installing the package\n\nUse pip.\n")
    write(root / "tests" / "test_core.py", 'def test_it():\n    """A test is never listed."""\n')
    write(root / ".hidden.py", 'def secret():\n    """Hidden files are never listed."""\n')
    write(root / "LICENSE.txt", "MIT licence text, never listed.\n")
    return root


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo")


def test_view_refuses_every_escape(repo, tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret.py", 'SECRET = "outside the repository"\n')
    os.symlink(outside, repo / "linkdir")  # a directory link pointing out
    os.symlink(outside / "secret.py", repo / "link.py")  # a file link pointing out
    os.symlink(repo / "main.py", repo / "inside.py")  # a link inside the root is fine
    write(repo / "with space.py", "x = 1  # a name with a space\n")
    write(repo / "quote'd.py", "x = 1  # a name with a quote\n")
    write(repo / "new\nline.py", "x = 1  # a name with a newline\n")
    write(repo / "blob.py", b"\x00\x01\x02binary" * 10)
    write(repo / "huge.py", "x = 1\n" * 100)
    view = RepoView(repo, max_file_bytes=300)
    dirs, files = view.listdir("")
    assert dirs == ["docs", "pkg"]
    assert files == ["huge.py", "inside.py", "main.py"]  # no link out, odd name, binary, hidden, licence
    for bad in ("/etc/passwd", "../outside/secret.py", "pkg/../../outside", "pkg//core.py", "./main.py", "a\\b"):
        with pytest.raises(PathError):
            view.check(bad)
    for unlisted in ("linkdir/secret.py", "link.py", "with space.py", "blob.py", ".hidden.py", "tests/test_core.py"):
        with pytest.raises(PathError):
            view.read(unlisted)
    with pytest.raises(PathError, match="larger"):
        view.read("huge.py")
    assert view.read("inside.py").startswith("def run_server")
    # the environment offers only listed entries, no `cd ..` at the root, and a huge file gives a note
    task = Task("Which file?", ["main.py"], str(repo), 0, ["cat main.py", "id main.py"])
    env = AutoExploreEnv([task])
    env._views[task.repo] = view
    obs = env.reset(0)
    files = ("huge.py", "inside.py", "main.py")
    assert obs.actions == ["cd docs", "cd pkg"] + [f"cat {f}" for f in files] + [f"id {f}" for f in files]
    obs, reward, terminated, _, info = env.step(obs.actions.index("cat huge.py"))
    assert "not shown" in obs.text and not info["error"] and not terminated
    assert "cat huge.py" not in obs.actions  # each file is shown once


def test_episode_rules_and_rewards(repo):
    task = Task("Which file slugs titles?", ["pkg/sub/helpers.py"], str(repo), 2, [])
    env = AutoExploreEnv([task], horizon=4)
    obs = env.reset(0)
    assert obs.text.startswith("# Task\nWhich file slugs titles?\n\n# Current working directory\n./")
    assert obs.extra["tags"] == {"depth": 2, "repo": "repo"}
    obs, reward, terminated, truncated, info = env.step(None)  # no command: a warning and a cost
    assert info["invalid_action"] and reward == pytest.approx(-2 / 15) and not (terminated or truncated)
    obs, reward, *_ = env.step(obs.actions.index("cd pkg"))
    assert reward == pytest.approx(-1 / 15) and "# Current working directory\npkg/\n" in obs.text
    assert obs.actions[0] == "cd .."
    obs, *_ = env.step(obs.actions.index("cd sub"))
    obs, reward, terminated, truncated, info = env.step(obs.actions.index("id helpers.py"))
    assert terminated and info["success"] and reward == pytest.approx(1 - 1 / 15)
    # a wrong id ends the episode with -1; the horizon without an id also costs -1
    env.reset(0)
    obs, reward, terminated, _, info = env.step(env.current_actions().index("id main.py"))
    assert terminated and not info["success"] and reward == pytest.approx(-1 - 1 / 15)
    env.reset(0)
    for _ in range(4):
        command = "cd .." if env.cwd else "cd docs"
        obs, reward, terminated, truncated, info = env.step(env.current_actions().index(command))
    assert truncated and not terminated and reward == pytest.approx(-1 - 1 / 15)
    with pytest.raises(RuntimeError):
        env.step(0)


def test_generated_tasks_are_verified_against_the_code_and_the_expert_solves_them(repo):
    tasks = generate_tasks(repo)
    assert {t.answers[0] for t in tasks} == {"main.py", "pkg/core.py", "pkg/sub/helpers.py", "docs/guide.md"}
    assert {t.depth for t in tasks} == {0, 1, 2}
    for task in tasks:
        for answer in task.answers:
            assert Path(answer).name not in task.question  # a question never names its file
            text = (repo / answer).read_text()
            if task.kind == "code":
                name = task.question.split("`")[1]
                defined = {
                    n.name: ast.get_docstring(n) or ""
                    for n in ast.parse(text).body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                }
                assert name in defined and defined[name].split(".")[0] in task.question
            else:
                assert task.question.split('"')[1] in text
        env = AutoExploreEnv([task])
        env.reset(0)
        done, commands = False, []
        while not done:
            action = env.oracle_action()
            commands.append(env.current_actions()[action])
            _, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        assert info["success"] and commands == task.optimal_path


def test_the_expert_solves_every_task_of_the_default_repositories():
    args = AutoExploreArguments()
    for split in ("train", "test"):
        env = args.make_env(split=split)
        assert env.leave_out == (0.5 if split == "train" else 0.0)
        for seed in range(len(env.tasks)):
            env.reset(seed)
            while not env.done:
                _, _, _, _, info = env.step(env.oracle_action())
            assert info["success"], env.task


def test_leave_out_hides_only_entries_off_the_answer_path(repo):
    task = Task("Which file slugs titles?", ["pkg/sub/helpers.py"], str(repo), 2, [])
    env = AutoExploreEnv([task], leave_out=0.9)
    hidden = set()
    for seed in range(20):
        env.reset(seed)
        hidden |= env.view.hidden
        assert not {"pkg", "pkg/sub", "pkg/sub/helpers.py"} & env.view.hidden
    assert {"main.py", "docs"} <= hidden


def test_splits_and_held_out_repositories(repo, tmp_path):
    other = make_repo(tmp_path / "other")
    tasks = generate_tasks(repo) + generate_tasks(other)
    test = split_tasks(tasks, "test", holdout_repos=("other",))
    train = split_tasks(tasks, "train", holdout_repos=("other",))
    assert test and {t.repo_name for t in test} == {"other"} and train and {t.repo_name for t in train} == {"repo"}
    parts = [split_tasks(tasks, s, seed=3) for s in ("train", "validation", "test")]
    assert sum(map(len, parts)) == len(tasks) and split_tasks(tasks, "train", seed=3) == parts[0]
    with pytest.raises(UsageError, match="no test tasks"):  # a held-out name that matches no repository
        args = AutoExploreArguments(auto_explore_repo_dirs=str(repo), auto_explore_holdout_repos="nope")
        args.make_env(split="test")
    with pytest.raises(UsageError, match="auto_explore_repo_dirs"):
        AutoExploreArguments(auto_explore_repo_dirs=str(tmp_path / "missing"))
    saved = tmp_path / "tasks.jsonl"
    save_tasks(tasks[:2], saved)
    assert load_tasks(saved) == tasks[:2]
    saved.write_text(saved.read_text() + '{"question": "no answers"}\nnot json\n')
    with pytest.raises(UsageError, match="tasks.jsonl:3 is not a task record"):
        load_tasks(saved)


def test_data_sft_rl_and_evaluation_with_env_auto_explore(repo, tmp_path):
    from conftest import tiny_sft_and_rl

    from data_gen import gen_sft
    from evaluation import evaluate

    held_out = make_repo(tmp_path / "held")
    data = tmp_path / "data"
    gen_sft.main(
        ["--env", "auto_explore", "--output_dir", str(data), "--num_episodes", "12", "--num_test_episodes", "3"]
        + ["--auto_explore_repo_dirs", f"{repo},{held_out}", "--auto_explore_holdout_repos", "held"]
        + ["--auto_explore_max_cat_chars", "120"]
    )
    config = (data / "config.yaml").read_text()
    assert "env: auto_explore" in config
    rows = [json.loads(line) for line in open(data / "train" / "sft_policy.jsonl")]
    assert {r["kind"] for r in rows} <= {"positive", "negative"}
    assert all("Best next command:" in r["prompt"] for r in rows)
    assert {r["repo"] for r in rows} == {"repo"}  # the held-out repository is never trained on
    history = tiny_sft_and_rl(data, tmp_path)
    assert len(history) == 1 and history[0]["env/prompts_cut"] == 0
    summary = evaluate.main(
        ["--run_dir", str(tmp_path / "rl"), "--output_dir", str(tmp_path / "eval"), "--num_episodes", "3"]
    )
    assert summary["env"] == "auto_explore" and summary["split"] == "test"
    by = summary["stages"]["all"]["success_by"]
    assert set(by["repo"]) == {"held"} and sum(v["episodes"] for v in by["depth"].values()) == 3


def test_llm_written_tasks_are_filtered_and_the_expert_solves_them(repo, tmp_path, monkeypatch):
    from data_gen.auto_explore import llm_tasks
    from llm.base import Backend, Generation

    answers = {  # by a phrase of each file's excerpt: what the scripted model writes about it
        "run_server": "- QUERY1: Which function starts the HTTP server?\n- ANSWER1: run_server\n"
        "- QUERY2: What does main.py define?\n- ANSWER2: run_server",  # names its file: rejected
        "parse_config": "- QUERY1: How is a configuration file read into a dict?\n- ANSWER1: parse_config\n"
        "- QUERY2: which function starts the HTTP server\n- ANSWER2: none",  # the first question again
        "slugify": "I cannot help with that.",  # no pairs
        "Installing": "- QUERY1: How do I install the package?\n- ANSWER1: with pip\n- QUERY2: Pip?\n- ANSWER2: y",
    }
    prompts_seen = []

    class Scripted(Backend):
        name = "scripted"

        def _generate(self, prompts, **kwargs):
            prompts_seen.extend(p[0]["content"] for p in prompts)
            return [Generation(text=next(a for k, a in answers.items() if k in p[0]["content"])) for p in prompts]

    monkeypatch.setattr(llm_tasks, "make_backend", lambda args: Scripted())
    out = tmp_path / "llm_tasks.jsonl"
    counts = llm_tasks.main(
        ["--output_file", str(out), "--auto_explore_repo_dirs", str(repo), "--min_chars", "10", "--model", "m"]
    )
    assert all(name not in p for p in prompts_seen for name in ("main.py", "core.py", "helpers.py", "guide.md"))
    assert counts["files_asked"] == 4  # tests/, hidden and licence files are never asked about
    assert {k: counts[k] for k in ("names_file", "duplicate", "unparsed_answers", "length")} == dict.fromkeys(
        ("names_file", "duplicate", "unparsed_answers", "length"), 1
    )
    tasks = load_tasks(out)
    assert {(t.answers[0], t.depth) for t in tasks} == {("main.py", 0), ("pkg/core.py", 1), ("docs/guide.md", 1)}
    assert json.loads(Path(f"{out}.summary.json").read_text())["tasks"] == 3
    for task in tasks:
        env = AutoExploreEnv([task])
        env.reset(0)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(env.oracle_action())
            done = terminated or truncated
        assert info["success"] and task.extra["model"] == "m"
