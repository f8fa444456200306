"""Flag handling shared by every command: presets, --config precedence, and inherited env flags."""

import pytest
import yaml

from envs import ENVS
from experiment_args import (
    ENV_ARGUMENTS,
    EnvArguments,
    EvalArguments,
    ModelArguments,
    RLArguments,
    SFTScriptArguments,
    TaxiArguments,
    UsageError,
)
from run_utils import inherited_env_flags, parse_args, parse_with_env, run_env


def test_preset_sets_defaults_and_later_sources_win(tmp_path):
    args, _ = parse_args((RLArguments, TaxiArguments), ["--policy_path", "p", "--preset", "paper"], scope="rl")
    assert (args.algo, args.reinforce_baseline, args.gamma, args.replay_buffer_size) == ("reinforce", "none", 1.0, 50)
    assert args.shuffle_labels and args.kl_coef == 0.0 and args.reflection_temperature == 1.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_envs: 8\nlearning_rate: 0.001\n")
    argv = ["--policy_path", "p", "--preset=paper", "--config", str(recipe), "--learning_rate", "5e-5"]
    args, _ = parse_args((RLArguments, TaxiArguments), argv, scope="rl")
    assert (args.algo, args.num_envs, args.learning_rate) == ("reinforce", 8, 5e-5)


def test_sft_presets_fill_the_model_arguments():
    from experiment_args import SFTTrainingArguments

    types = (SFTScriptArguments, ModelArguments, SFTTrainingArguments)
    _, model, train = parse_args(types, ["--preset", "paper", "--output_dir", "x"], scope="sft")
    assert (model.model_name_or_path, model.load_in_8bit, model.lora_r, model.lora_alpha) == ("gpt2-xl", True, 64, 16)
    assert model.lora_target_modules == "c_attn" and train.per_device_train_batch_size == 1
    assert train.max_grad_norm == 0.3 and train.max_steps == 2000
    _, model, _ = parse_args(types, ["--preset", "smollm2", "--output_dir", "x"], scope="sft")
    assert model.model_name_or_path == "smollm2-135m" and model.use_peft


@pytest.mark.parametrize(
    "argv, scope, needle",
    [
        (["--preset", "gpt5"], "eval", "--preset 'gpt5'"),
        (["--preset", "paper"], "", "drop --preset"),
        (["--preset"], "eval", "--preset needs a value"),
    ],
)
def test_bad_presets(argv, scope, needle):
    with pytest.raises(UsageError, match=needle):
        parse_args((EvalArguments, TaxiArguments), ["--agent", "random", *argv], scope=scope)


def test_env_flags_come_from_the_run_then_the_command_line(tmp_path):
    data, sft_run, rl_run = tmp_path / "data", tmp_path / "sft", tmp_path / "rl"
    for folder, config in (
        (data, {"taxi_stage": "dropoff", "taxi_history": False, "num_episodes": 3}),
        (sft_run, {"data_dir": str(data), "role": "policy"}),
        (rl_run, {"policy_path": str(sft_run), "algo": "ppo"}),
    ):
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    expected = ["--taxi_history", "False", "--taxi_stage", "dropoff"]
    assert inherited_env_flags(sft_run, "taxi_") == expected
    assert inherited_env_flags(rl_run, "taxi_") == expected  # through its policy_path
    assert inherited_env_flags(tmp_path / "missing", "taxi_") == [] and inherited_env_flags("", "taxi_") == []
    argv = ["--run_dir", str(sft_run), "--taxi_stage", "full"]
    _, taxi = parse_args((EvalArguments, TaxiArguments), argv, inherited_env_flags(sft_run, "taxi_"), scope="eval")
    assert (taxi.taxi_stage, taxi.taxi_history, taxi.taxi_horizon) == ("full", False, 15)
    # parse_with_env: the env and its flags come from the run (written before --env was recorded: Taxi flags)
    assert run_env(rl_run) == run_env(data) == "taxi" and run_env(tmp_path / "missing") == ""
    args, taxi = parse_with_env((EvalArguments,), argv, "run_dir", scope="eval")
    assert args.env == "taxi" and isinstance(taxi, TaxiArguments)
    assert (taxi.taxi_stage, taxi.taxi_history, taxi.stage) == ("full", False, "full")


def test_env_selection(tmp_path):
    from envs.taxi import STAGES

    assert TaxiArguments.stages == STAGES and set(ENV_ARGUMENTS) == set(ENVS)
    assert all(
        issubclass(ENV_ARGUMENTS[name], EnvArguments) and cls.name == name for name, cls in ENV_ARGUMENTS.items()
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"env": "taxi", "taxi_horizon": 9, "policy_path": "p"}))
    args, taxi = parse_with_env((RLArguments,), ["--policy_path", str(run)], "policy_path", scope="rl")
    assert (args.env, taxi.taxi_horizon) == ("taxi", 9)
    args, _ = parse_with_env((EvalArguments,), ["--agent", "random"], "run_dir", scope="eval")
    assert args.env == "taxi" and args.split == "test"  # nothing to inherit: the default env
    with pytest.raises(UsageError, match="--env 'alfworld2' is not one of taxi"):
        parse_with_env((EvalArguments,), ["--agent", "random", "--env", "alfworld2"], "run_dir", scope="eval")
    (run / "config.yaml").write_text(yaml.safe_dump({"env": "other"}))
    with pytest.raises(UsageError, match="is not one of taxi"):  # a run made with an env this install lacks
        parse_with_env((EvalArguments,), ["--run_dir", str(run)], "run_dir", scope="eval")
    with pytest.raises(UsageError, match="--split 'dev'"):
        EvalArguments(agent="random", split="dev")
    with pytest.raises(UsageError, match="--curriculum has unknown taxi stage"):
        TaxiArguments.check_stages("--curriculum", "pickup,deliver")
    with pytest.raises(SystemExit):  # --help lists the env's flags too (the first pass ignores it)
        parse_with_env((EvalArguments,), ["--help"], "run_dir", scope="eval")
