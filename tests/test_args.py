"""Flag handling shared by every command: presets, --config precedence, and inherited env flags."""

import pytest
import yaml

from experiment_args import (
    EvalArguments,
    ModelArguments,
    RLArguments,
    SFTScriptArguments,
    TaxiArguments,
    UsageError,
    inherited_env_flags,
    parse_args,
)


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
    assert inherited_env_flags(sft_run) == expected
    assert inherited_env_flags(rl_run) == expected  # through its policy_path
    assert inherited_env_flags(tmp_path / "missing") == [] and inherited_env_flags("") == []
    argv = ["--run_dir", str(sft_run), "--taxi_stage", "full"]
    _, taxi = parse_args((EvalArguments, TaxiArguments), argv, inherited_env_flags(sft_run), scope="eval")
    assert (taxi.taxi_stage, taxi.taxi_history, taxi.taxi_horizon) == ("full", False, 15)
