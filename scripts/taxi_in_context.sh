#!/usr/bin/env bash
# In-context agents on the demo's Taxi setting, beside its trained policies: one table.
# Usage: scripts/taxi_in_context.sh [RUN_DIR]   (after scripts/demo.sh RUN_DIR; default runs/demo)
#   - MODEL (default smollm2-135m) zero-shot, decoding constrained to the action labels, sampled and greedy;
#   - the same model shown its two most recent episodes (--agent_context naive), learning between batches of 10;
#   - the same model behind the local OpenAI-compatible server (evaluation.serve), answering in free text that
#     is parsed (unparsed answers are invalid actions, counted in summary.json's agent_stats).
# Rows go to RUN_DIR/eval_sampled/icl_* and RUN_DIR/eval_greedy/icl_*, then evaluation.compare prints the table.
set -euo pipefail
RUN=${1:-runs/demo}
PY=${PYTHON:-python}
MODEL=${MODEL:-smollm2-135m}
PORT=${PORT:-8642}
EVAL_EPISODES=${EVAL_EPISODES:-300}
# The demo's environment (scripts/demo.sh) and evaluation episodes (evaluate's default --seed).
TAXI=${TAXI:-"--taxi_stage dropoff --taxi_dropoff_start anywhere --taxi_history false --taxi_reward progress"}
EVAL="--agent llm --agent_model $MODEL --num_episodes $EVAL_EPISODES $TAXI"
if [ ! -d "$RUN/eval_sampled" ]; then
  echo "error: $RUN/eval_sampled not found; run scripts/demo.sh $RUN (make demo) first" >&2
  exit 2
fi
start=$(date +%s)
stamp() { echo "[in-context $(( $(date +%s) - start ))s] $*"; }

stamp "1/3 $MODEL zero-shot, sampled and greedy"
$PY -m evaluation.evaluate $EVAL --output_dir "$RUN/eval_sampled/icl_zero_shot" --name "$MODEL zero-shot"
$PY -m evaluation.evaluate $EVAL --greedy --output_dir "$RUN/eval_greedy/icl_zero_shot" --name "$MODEL zero-shot (greedy)"
stamp "2/3 $MODEL with its last two episodes in context (batches of 10)"
$PY -m evaluation.evaluate $EVAL --agent_context naive --agent_context_episodes 2 --batch_size 10 \
  --output_dir "$RUN/eval_sampled/icl_naive" --name "$MODEL + 2 past episodes"
stamp "3/3 $MODEL behind evaluation.serve (free answers, parsed)"
$PY -m evaluation.serve --model "$MODEL" --served_name "$MODEL" --port "$PORT" > "$RUN/serve_in_context.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  if $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=2)" 2>/dev/null; then
    break
  fi
  sleep 1
done
$PY -m evaluation.evaluate $EVAL --agent_backend openai --agent_api_base "http://127.0.0.1:$PORT/v1" \
  --agent_cache_dir none --output_dir "$RUN/eval_sampled/icl_served" --name "$MODEL via evaluation.serve"
kill "$server" && wait "$server" 2>/dev/null || true
stamp "done"
$PY -m evaluation.compare "$RUN"/eval_sampled/* "$RUN"/eval_greedy/*
