#!/usr/bin/env bash
# Few-shot: GRPO on the few-shot target questions only (paper Table 1).
# FEWSHOT_TRAIN: written by `heal mix --target ... --k 32 --repeat 4 --general-per-batch 0` (README, Data):
# the 32 questions, each 4 times, make one 128-prompt batch (verl drops batches smaller than its batch size).
# Usage: FEWSHOT_TRAIN=... VAL_FILES=... bash recipes/verl/fewshot.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_grpo FEWSHOT_TRAIN "$HEAL_MIX_FEWSHOT" "$@"
