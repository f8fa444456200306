#!/usr/bin/env bash
# The CPU demo: data -> SFT reflector -> (policy SFT -> Reflect-RL | plain SFT -> RL without reflection,
# side by side) -> evaluation of all of them, sampled and greedy, with SFT-only, random and oracle ->
# table and plots.
# Usage: scripts/demo.sh [RUN_DIR]   (make demo runs it in runs/demo with the project's .venv)
#        SEED=1 scripts/demo.sh runs/demo_seed1   (scripts/demo_seeds.sh runs three seeds and the summary)
set -euo pipefail
RUN=${1:-runs/demo}
PY=${PYTHON:-python}
SEED=${SEED:-0}
MODEL=${MODEL:-tiny-gpt2-compact}
REFLECTOR_STEPS=${REFLECTOR_STEPS:-700}
SFT_STEPS=${SFT_STEPS:-1000}
RL_ITERS=${RL_ITERS:-50}
EVAL_EPISODES=${EVAL_EPISODES:-300}
# The drop-off stage with the taxi starting anywhere (96 start states), no action history (prompts are a
# function of the state, so greedy reflections are memoised) and a success-only reward (the paper's shaping
# taught early crashes here; see the README).
TAXI=${TAXI:-"--taxi_stage dropoff --taxi_dropoff_start anywhere --taxi_history false --taxi_reward success"}
# The paper's policy data: the label is the executed action, random (among moves that do not crash) 90% of
# the time and the oracle's otherwise ("oracle + random 0.9"), plus negative examples labelled with the fix.
# The SFT policy learns to prefer the reflection's plan by a thin margin: greedy it follows the plan only
# in part, sampled it mostly wanders. RL has to turn that preference into a policy.
DATA="--num_episodes 400 --num_test_episodes 50 --label_source executed --random_action_rate 0.9 --seed $SEED"
SFT="--model_name_or_path $MODEL --use_peft false --learning_rate 1e-3 --per_device_train_batch_size 16 --seed $SEED"
SFT="$SFT --report_to tensorboard --logging_steps 25 --max_eval_samples 200"
REFLECT="--reflection_max_tokens 32 --reflection_temperature 0"
# PPO (value head, GAE, clipped ratio, KL to the SFT policy) at a small learning rate; REINFORCE (lr 3e-4,
# leave-one-out mean baseline) climbed as fast sampled but stopped lower greedily (README, "Measured").
RL=${RL:-"--algo ppo --num_envs 64 --iterations $RL_ITERS --learning_rate 1e-4 --minibatch_size 128 --update_epochs 2"}
RL="$RL --save_steps 10 --seed $SEED $REFLECT"
# The evaluation starts are the same for every seed (evaluate's own --seed), so seeds differ only in training.
EVAL="--num_episodes $EVAL_EPISODES $REFLECT"
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

evaluate_both() {  # RUN_DIR NAME OUT [flags]: sampled and greedy actions, into eval_sampled/ and eval_greedy/
  local run=$1 name=$2 out=$3; shift 3
  $PY -m evaluation.evaluate --run_dir "$run" --output_dir "$RUN/eval_sampled/$out" --name "$name" $EVAL "$@"
  $PY -m evaluation.evaluate --run_dir "$run" --output_dir "$RUN/eval_greedy/$out" --name "$name (greedy)" $EVAL --greedy "$@"
}

stamp "1/5 data (seed $SEED)"
$PY -m data_gen.gen_sft --env taxi --output_dir "$RUN/data" $TAXI $DATA
stamp "2/5 SFT reflector"
$PY -m training.sft --role reflector --data_dir "$RUN/data" --output_dir "$RUN/sft_reflector" --max_steps "$REFLECTOR_STEPS" $SFT
$PY -m evaluation.taxi_plans --reflector_path "$RUN/sft_reflector" $TAXI --output "$RUN/sft_reflector/plans.json"
# The two arms are independent from here, so they run side by side (one core each on a 2-core machine);
# the arm without reflection logs to $RUN/no_reflection.log, printed when it ends.
stamp "3/5 in parallel: policy SFT -> Reflect-RL -> evaluation | plain SFT -> RL without reflection -> evaluation"
(
  $PY -m training.sft --role plain --data_dir "$RUN/data" --output_dir "$RUN/sft_plain" --max_steps "$SFT_STEPS" $SFT
  $PY -m training.rl_finetune --policy_path "$RUN/sft_plain" --output_dir "$RUN/rl_noreflect" $RL
  evaluate_both "$RUN/rl_noreflect" "SFT+RL w/o reflection" rl_noreflect
  evaluate_both "$RUN/sft_plain" "SFT-only w/o reflection" sft_plain
) > "$RUN/no_reflection.log" 2>&1 &
no_reflection=$!
$PY -m training.sft --role policy --data_dir "$RUN/data" --output_dir "$RUN/sft_policy" --max_steps "$SFT_STEPS" $SFT
stamp "Reflect-RL"
$PY -m training.rl_finetune --policy_path "$RUN/sft_policy" --reflector_path "$RUN/sft_reflector" --output_dir "$RUN/reflect_rl" $RL
stamp "evaluation of Reflect-RL and SFT-only (sampled and greedy actions)"
evaluate_both "$RUN/reflect_rl" Reflect-RL reflect_rl
evaluate_both "$RUN/sft_policy" SFT-only sft_only --reflector_path "$RUN/sft_reflector"
$PY -m evaluation.evaluate --agent random --output_dir "$RUN/eval_sampled/random" --name random $EVAL $TAXI
$PY -m evaluation.evaluate --agent oracle --output_dir "$RUN/eval_sampled/oracle" --name oracle $EVAL $TAXI
stamp "4/5 waiting for the arm without reflection"
if ! wait "$no_reflection"; then
  tail -n 30 "$RUN/no_reflection.log"
  echo "the arm without reflection failed; its log: $RUN/no_reflection.log" >&2
  exit 1
fi
grep -E ": success [0-9]" "$RUN/no_reflection.log" || true  # its evaluation lines
stamp "5/5 comparison and plots"
$PY -m evaluation.compare "$RUN"/eval_sampled/* "$RUN"/eval_greedy/*
$PY -m visualization.plot "$RUN/reflect_rl" "$RUN/rl_noreflect" "$RUN"/eval_sampled/* --output_dir "$RUN/plots"
$PY -m visualization.episodes "$RUN/eval_sampled/sft_only" "$RUN/eval_sampled/reflect_rl" --output "$RUN/plots/episodes.html"
stamp "done: table above, plots and episodes.html (SFT-only vs Reflect-RL, side by side) in $RUN/plots"
