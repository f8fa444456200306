#!/usr/bin/env bash
# Monea et al. ICRL with the embedded SmolLM2-135M-Instruct on TREC (coarse, 6 types) from ../shared/data:
# Naive (its step 0 is the zero-shot point), Explorative, Approximate, and the supervised ICL upper bound,
# then one plot. A budget that fits a 2-core CPU; raise TRAIN_K / TEST_K / WINDOW on a GPU.
# Usage: scripts/icrl_trec.sh [RUN_DIR]   (rerunning continues unfinished runs)
set -euo pipefail
RUN=${1:-runs/icrl_trec}
PY=${PYTHON:-python}
DATA=${DATA:-../shared/data/trec}
TRAIN_K=${TRAIN_K:-200}
TEST_K=${TEST_K:-100}
TEST_EVERY=${TEST_EVERY:-50}
WINDOW=${WINDOW:-1024}
COMMON="--task trec_coarse --data_dir $DATA --backend local --model smollm2-135m --train_k $TRAIN_K --test_k $TEST_K --test_every $TEST_EVERY --context_window $WINDOW"
$PY -m evaluation.icrl $COMMON --strategy random_biased_end --temperature 1.0 --output_dir "$RUN/naive"
$PY -m evaluation.icrl $COMMON --strategy random_unbiased_only_positive --context_p_keep 0.1 --output_dir "$RUN/explorative"
$PY -m evaluation.icrl $COMMON --strategy approximate_only_positive --context_p_keep 0.1 --max_contexts 8 \
    --approximate_context_sampling_method uniform --output_dir "$RUN/approximate"
$PY -m evaluation.icrl $COMMON --strategy random_unbiased --no_icrl --output_dir "$RUN/icl_upper_bound"
$PY -m visualization.plot_icrl "$RUN"/naive "$RUN"/explorative "$RUN"/approximate "$RUN"/icl_upper_bound --output_dir "$RUN/plots"
