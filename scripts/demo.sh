#!/usr/bin/env bash
# The CPU demo: data -> SFT (reflector, policy, plain) -> Reflect-RL and RL without reflection ->
# evaluation of all of them with SFT-only, random and oracle -> comparison table and plots.
# Usage: scripts/demo.sh [RUN_DIR]   (make demo runs it in runs/demo with the project's .venv)
set -euo pipefail
RUN=${1:-runs/demo}
PY=${PYTHON:-python}
STAGE=${STAGE:-dropoff}
REFLECTOR_STEPS=${REFLECTOR_STEPS:-400}
SFT_STEPS=${SFT_STEPS:-300}
RL_ITERS=${RL_ITERS:-30}
EVAL_EPISODES=${EVAL_EPISODES:-200}
# No action history (prompts are a function of the state, so greedy reflections are memoised) and a
# success-only reward (the paper's shaping taught early crashes here; see the README).
TAXI_EXTRA=${TAXI_EXTRA-"--taxi_history false --taxi_reward success"}
TAXI="--taxi_stage $STAGE $TAXI_EXTRA"
# The paper's noisy labels (the executed action, 30% random detours): the SFT policy mostly follows the
# reflection's plan but not always, which leaves room for RL.
DATA="--num_episodes 400 --num_test_episodes 50 --label_source executed"
SFT="--model_name_or_path tiny-gpt2 --use_peft false --learning_rate 1e-3 --per_device_train_batch_size 16 --report_to tensorboard --logging_steps 10 --max_eval_samples 200"
REFLECT="--reflection_max_tokens 32 --reflection_temperature 0"
RL="--algo reinforce --num_envs 32 --iterations $RL_ITERS --save_steps 5 --learning_rate 3e-4 --minibatch_size 64 $REFLECT"
EVAL="--num_episodes $EVAL_EPISODES $REFLECT"
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/6 data"
$PY -m data_gen.gen_sft --env taxi --output_dir "$RUN/data" $TAXI $DATA
stamp "2/6 SFT: reflector, policy, no-reflection policy"
$PY -m training.sft --role reflector --data_dir "$RUN/data" --output_dir "$RUN/sft_reflector" --max_steps "$REFLECTOR_STEPS" $SFT
$PY -m training.sft --role policy --data_dir "$RUN/data" --output_dir "$RUN/sft_policy" --max_steps "$SFT_STEPS" $SFT
$PY -m training.sft --role plain --data_dir "$RUN/data" --output_dir "$RUN/sft_plain" --max_steps "$SFT_STEPS" $SFT
stamp "3/6 Reflect-RL"
$PY -m training.rl_finetune --policy_path "$RUN/sft_policy" --reflector_path "$RUN/sft_reflector" --output_dir "$RUN/reflect_rl" $RL
stamp "4/6 RL without reflection"
$PY -m training.rl_finetune --policy_path "$RUN/sft_plain" --output_dir "$RUN/rl_noreflect" $RL
stamp "5/6 evaluation"
$PY -m evaluation.evaluate --run_dir "$RUN/reflect_rl" --output_dir "$RUN/eval/reflect_rl" --name Reflect-RL $EVAL
$PY -m evaluation.evaluate --run_dir "$RUN/rl_noreflect" --output_dir "$RUN/eval/rl_noreflect" --name "SFT+RL w/o reflection" $EVAL
$PY -m evaluation.evaluate --run_dir "$RUN/sft_policy" --reflector_path "$RUN/sft_reflector" --output_dir "$RUN/eval/sft_only" --name SFT-only $EVAL
$PY -m evaluation.evaluate --run_dir "$RUN/sft_plain" --output_dir "$RUN/eval/sft_plain" --name "SFT-only w/o reflection" $EVAL
$PY -m evaluation.evaluate --agent random --output_dir "$RUN/eval/random" --name random $EVAL $TAXI
$PY -m evaluation.evaluate --agent oracle --output_dir "$RUN/eval/oracle" --name oracle $EVAL $TAXI
stamp "6/6 comparison and plots"
$PY -m evaluation.compare "$RUN"/eval/*
$PY -m visualization.plot "$RUN/reflect_rl" "$RUN/rl_noreflect" "$RUN"/eval/* --output_dir "$RUN/plots"
$PY -m visualization.episodes "$RUN/eval/sft_only" "$RUN/eval/reflect_rl" --output "$RUN/plots/episodes.html"
stamp "done: table above, plots and episodes.html (SFT-only vs Reflect-RL, side by side) in $RUN/plots"
