"""visualization.plot and evaluation.compare on hand-written run and evaluation folders."""

import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from evaluation import compare
from visualization import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, algo: str, n: int = 30, kl: bool = True, partial_last_line: bool = False) -> None:
    """A metrics.jsonl as training.rl_finetune writes it: one row per iteration, some keys optional."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"algo: {algo}\nreflector_path: ''\npolicy_path: runs/sft_plain\n")
    rows = []
    for i in range(1, n + 1):
        row = {
            "iteration": i,
            "env_steps": 32 * 9 * i,
            "curriculum/stage": "pickup" if i <= n // 2 else "full",
            "env/success_rate": min(1.0, 0.2 + 0.02 * i + 0.05 * math.sin(i)),
            "env/return": -0.5 + 0.03 * i,
            "env/episode_length": 9.0,
            "env/invalid_action_rate": 0.0,
            "policy/entropy": 1.6 - 0.03 * i,
            "policy/approx_kl": 0.01,
            "objective/rollout_kl": 0.002 * i,
            "value/explained_variance": float("nan"),
            "timing/rollout_s": 1.0,
            "timing/update_s": 0.5,
        }
        if kl:
            row["objective/kl"] = 0.003 * i
        if algo == "ppo":
            row["policy/clipfrac"] = 0.1
        rows.append(json.dumps(row) + "\n")
    text = "".join(rows) + ('{"iteration": ' if partial_last_line else "")
    (folder / "metrics.jsonl").write_text(text)


def stage(rate: float, low: float, high: float, ret: float = 0.31, length: float = 9.1) -> dict:
    return {
        "episodes": 100,
        "success_rate": rate,
        "success_ci95": [low, high],
        "return_mean": ret,
        "return_std": 0.4,
        "length_mean": length,
        "invalid_action_rate": 0.0,
    }


def write_summary(folder, name: str, stages: dict) -> None:
    folder.mkdir(parents=True)
    summary = {
        "name": name,
        "agent": "model",
        "run_dir": str(folder.parent),
        "reflection": True,
        "greedy": False,
        "stages": stages,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


@pytest.fixture
def runs(tmp_path):
    """runs/demo/{reflect_rl,rl_noreflect} with eval/ inside (both named "eval", evaluate's default) and
    runs/eval/oracle; reflect_rl has every stage, the others only full."""
    demo = tmp_path / "runs" / "demo"
    write_run(demo / "reflect_rl", "ppo")
    write_run(demo / "rl_noreflect", "reinforce", kl=False, partial_last_line=True)
    every_stage = {
        "pickup": stage(0.95, 0.89, 0.98),
        "dropoff": stage(0.81, 0.72, 0.87),
        "full": stage(0.62, 0.52, 0.71),
    }
    write_summary(demo / "reflect_rl" / "eval", "eval", every_stage)
    write_summary(demo / "rl_noreflect" / "eval", "eval", {"full": stage(0.41, 0.32, 0.51, ret=-0.12, length=11.4)})
    oracle = {"full": stage(1.0, 0.96, 1.0, ret=0.87, length=7.0)}
    write_summary(tmp_path / "runs" / "eval" / "oracle", "oracle", oracle)
    return tmp_path / "runs"


def assert_png(path, min_size: int = 300) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] >= min_size and image.shape[1] >= min_size
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_plot_writes_both_figures_to_the_common_parent(runs, capsys):
    demo = runs / "demo"
    written = plot.main([str(demo / "reflect_rl"), str(demo / "rl_noreflect"), "--smooth", "5"])
    assert sorted(p.name for p in written) == ["comparison.png", "learning_curves.png"]
    for path in written:
        assert path.parent.resolve() == demo.resolve()
        assert_png(path)
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert not [p for p in demo.iterdir() if p.name.endswith(".tmp")]


def test_plot_summary_only_goes_to_the_folder_itself(runs, tmp_path):
    oracle = runs / "eval" / "oracle"
    written = plot.main([str(oracle), "--output_dir", str(tmp_path / "figs"), "--smooth", "0"])
    assert [p.name for p in written] == ["comparison.png"]
    assert_png(tmp_path / "figs" / "comparison.png", min_size=200)
    assert [p.name for p in plot.main([str(oracle)])] == ["comparison.png"]
    assert (oracle / "comparison.png").exists()


def test_moving_average_and_kl_fallback(runs):
    np.testing.assert_allclose(plot.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(plot.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 3), [1.5, 2.0, 3.0, 3.5])
    np.testing.assert_allclose(plot.moving_average(np.array([1.0, 2.0, 3.0]), 5), [2.0, 2.0, 2.0])
    kl_keys = dict(plot.PANELS)["KL to SFT policy"]
    rows = plot.read_metrics(runs / "demo" / "rl_noreflect" / "metrics.jsonl")
    assert len(rows) == 30  # the half-written last line of a live run is left out
    x, y = plot.curve(rows, kl_keys)
    assert x[0] == 288 and y[-1] == pytest.approx(0.06)  # objective/rollout_kl
    assert plot.curve([{"env_steps": 1, "objective/kl": float("nan")}], kl_keys) is None
    assert plot.curve([{"env_steps": 1, "env/return": 0.5}], kl_keys) is None


def test_compare_table(runs, capsys):
    demo = runs / "demo"
    rows = compare.main([str(runs / "eval" / "oracle"), str(demo / "reflect_rl"), str(demo / "rl_noreflect")])
    assert [r["run"] for r in rows] == ["oracle", "reflect_rl/eval", "rl_noreflect/eval"]
    assert list(rows[0]) == ["run", "pickup", "dropoff", "full", "ret (full)", "len (full)"]
    assert rows[1]["full"] == "0.62 [0.52, 0.71]" and rows[1]["pickup"] == "0.95 [0.89, 0.98]"
    assert rows[0]["pickup"] == "-" and rows[2]["dropoff"] == "-"
    assert (rows[2]["ret (full)"], rows[2]["len (full)"]) == ("-0.12", "11.4")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].startswith("run") and set(out[1]) <= {"-", " "}
    assert "0.62 [0.52, 0.71]" in out[3] and max(map(len, out)) <= 100


def test_compare_markdown(runs, capsys):
    compare.main([str(runs / "demo" / "reflect_rl" / "eval"), str(runs / "eval" / "oracle"), "--markdown"])
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in out)
    assert out[0] == "| run | pickup | dropoff | full | ret (full) | len (full) |"
    assert out[1].startswith("|:---|---:")
    assert out[3] == "| oracle | - | - | 1.00 [0.96, 1.00] | 0.87 | 7.0 |"


def bad_inputs(root):
    root.mkdir()
    (root / "empty").mkdir()
    write_run(root / "broken", "ppo", n=3)
    lines = (root / "broken" / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"iteration": 2, "env_steps": 576,\n'
    (root / "broken" / "metrics.jsonl").write_text("".join(lines))
    return {
        "plot_missing": (plot.main, [str(root / "nope")], "nope is not a folder"),
        "plot_nothing": (plot.main, [str(root / "empty")], "holds an RL metrics.jsonl or a summary.json"),
        "plot_bad_line": (plot.main, [str(root / "broken"), str(root / "empty")], "metrics.jsonl line 2"),
        "compare_missing": (compare.main, [str(root / "empty")], "empty has no summary.json"),
    }


@pytest.mark.parametrize("case", ["plot_missing", "plot_nothing", "plot_bad_line", "compare_missing"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    main, argv, message = bad_inputs(tmp_path / "in")[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "pass " in err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))


def test_compare_over_seeds(tmp_path, capsys):
    for seed, (rl, sft) in enumerate([(0.9, 0.5), (0.8, 0.4), (1.0, 0.6)]):
        write_summary(tmp_path / f"seed{seed}" / "rl", "Reflect-RL", {"dropoff": {"success_rate": rl}})
        write_summary(tmp_path / f"seed{seed}" / "sft", "SFT-only", {"dropoff": {"success_rate": sft}})
    write_summary(tmp_path / "seed0" / "oracle", "oracle", {"dropoff": {"success_rate": 1.0}})
    rows = compare.main([str(tmp_path / f"seed{i}") for i in range(3)] + ["--over_seeds"])
    assert [(r["run"], r["seeds"]) for r in rows] == [("oracle", "1"), ("Reflect-RL", "3"), ("SFT-only", "3")]
    assert rows[1]["dropoff"] == "0.90 ± 0.10 (0.80-1.00)" and rows[0]["dropoff"] == "1.00 ± 0.00 (1.00-1.00)"
    assert "0.50 ± 0.10 (0.40-0.60)" in capsys.readouterr().out
