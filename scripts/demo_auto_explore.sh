#!/usr/bin/env bash
# AutoExplore on the CPU: data (held-out repositories for test) -> SFT reflector -> (policy SFT -> Reflect-RL |
# plain SFT -> RL without reflection, side by side) -> evaluation on the held-out repositories, success by
# depth and by repository -> table.
# Usage: scripts/demo_auto_explore.sh [RUN_DIR]   (make demo ENV=auto_explore runs it in runs/demo_auto_explore)
set -euo pipefail
RUN=${1:-runs/demo_auto_explore}
PY=${PYTHON:-python}
SEED=${SEED:-0}
# GPT-2's tokenizer: code and file names encode compactly (tiny-gpt2-compact's vocabulary is Taxi's).
MODEL=${MODEL:-tiny-gpt2}
REFLECTOR_STEPS=${REFLECTOR_STEPS:-250}
SFT_STEPS=${SFT_STEPS:-200}
RL_ITERS=${RL_ITERS:-12}
# Full fine-tunes: 1e-3 / 3e-4 suit the random tiny models; a pretrained model (MODEL=smollm2-135m) wants ~1e-4 / 1e-5.
SFT_LR=${SFT_LR:-1e-3}
RL_LR=${RL_LR:-3e-4}
# Episode i plays test task i (mod their number): 146 is every held-out task once, so the depths are the test
# set's (a block of 80 had 20 / 50 / 10 at depths 0 / 1 / 2).
EVAL_EPISODES=${EVAL_EPISODES:-146}
# The default repositories (installed packages); click and gymnasium are held out: every test task comes from
# them (26 at depth 0, 65 at depth 1, 55 at depth 2), and no training episode sees them. cat shows 400
# characters so prompts stay near 400 tokens.
AE=${AE_FLAGS:-"--auto_explore_holdout_repos click,gymnasium --auto_explore_max_cat_chars 400"}
DATA="--num_episodes 300 --num_test_episodes 40 --seed $SEED"
SFT="--use_peft false --learning_rate $SFT_LR --per_device_train_batch_size 8 --seed $SEED --report_to none"
SFT="$SFT --logging_steps 25 --max_eval_samples 100"
REFLECT="--reflection_max_tokens 24 --reflection_temperature 0"
RL="--algo grpo --group_size 4 --group_by_state --num_envs 32 --iterations $RL_ITERS --learning_rate $RL_LR"
RL="$RL --minibatch_size 64 --update_epochs 2 --save_steps 10 --seed $SEED $REFLECT --report_to none"
EVAL="--num_episodes $EVAL_EPISODES $REFLECT"
start=$(date +%s)
stamp() { echo "[demo_auto_explore $(( $(date +%s) - start ))s] $*"; }

stamp "1/4 data (seed $SEED)"
$PY -m data_gen.gen_sft --env auto_explore --output_dir "$RUN/data" $AE $DATA
stamp "2/4 SFT reflector"
$PY -m training.sft --role reflector --data_dir "$RUN/data" --output_dir "$RUN/sft_reflector" --max_steps "$REFLECTOR_STEPS" \
  --model_name_or_path "$MODEL" $SFT
POLICY_SFT="--max_steps $SFT_STEPS --model_name_or_path $RUN/sft_reflector $SFT"
export OMP_NUM_THREADS=${ARM_THREADS:-1}  # two arms side by side: one torch thread each
stamp "3/4 in parallel: policy SFT -> Reflect-RL | plain SFT -> RL without reflection; each then evaluated"
(
  $PY -m training.sft --role plain --data_dir "$RUN/data" --output_dir "$RUN/sft_plain" $POLICY_SFT
  $PY -m training.rl_finetune --policy_path "$RUN/sft_plain" --output_dir "$RUN/rl_noreflect" $RL
  $PY -m evaluation.evaluate --run_dir "$RUN/rl_noreflect" --output_dir "$RUN/eval/rl_noreflect" \
    --name "SFT+RL w/o reflection" $EVAL
  $PY -m evaluation.evaluate --run_dir "$RUN/sft_plain" --output_dir "$RUN/eval/sft_plain" \
    --name "SFT-only w/o reflection" $EVAL
) > "$RUN/no_reflection.log" 2>&1 &
no_reflection=$!
$PY -m training.sft --role policy --data_dir "$RUN/data" --output_dir "$RUN/sft_policy" $POLICY_SFT
$PY -m training.rl_finetune --policy_path "$RUN/sft_policy" --reflector_path "$RUN/sft_reflector" --output_dir "$RUN/reflect_rl" $RL
$PY -m evaluation.evaluate --run_dir "$RUN/reflect_rl" --output_dir "$RUN/eval/reflect_rl" --name Reflect-RL $EVAL
$PY -m evaluation.evaluate --run_dir "$RUN/sft_policy" --reflector_path "$RUN/sft_reflector" \
  --output_dir "$RUN/eval/sft_only" --name SFT-only $EVAL
$PY -m evaluation.evaluate --agent oracle --output_dir "$RUN/eval/oracle" --name oracle --num_episodes "$EVAL_EPISODES" \
  --env auto_explore $AE
$PY -m evaluation.evaluate --agent random --output_dir "$RUN/eval/random" --name random --num_episodes "$EVAL_EPISODES" \
  --env auto_explore $AE
if ! wait "$no_reflection"; then
  tail -n 30 "$RUN/no_reflection.log"
  echo "the arm without reflection failed; its log: $RUN/no_reflection.log" >&2
  exit 1
fi
grep -E ": success [0-9]|  by " "$RUN/no_reflection.log" || true
stamp "4/4 comparison (held-out repositories; success by depth and repository in each eval/*/summary.json)"
$PY -m evaluation.compare "$RUN"/eval/*
stamp "done"
