#!/usr/bin/env bash
# The demo with several seeds (data, SFT and RL seeds; the evaluation starts stay the same), then one
# table of the mean, standard deviation and range of each run's success over the seeds.
# Usage: scripts/demo_seeds.sh [RUN_PREFIX]   (make demo-seeds: runs/demo_seed0, _seed1, _seed2)
#        SEEDS="0 1 2 3 4" scripts/demo_seeds.sh runs/demo
set -euo pipefail
PREFIX=${1:-runs/demo}
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0 1 2}
dirs_sampled=() dirs_greedy=()
for seed in $SEEDS; do
  run="${PREFIX}_seed$seed"
  SEED=$seed bash "$(dirname "$0")/demo.sh" "$run"
  dirs_sampled+=("$run/eval_sampled") dirs_greedy+=("$run/eval_greedy")
done
echo "== over seeds: $SEEDS"
$PY -m evaluation.compare "${dirs_sampled[@]}" "${dirs_greedy[@]}" --over_seeds
