#!/usr/bin/env bash
# Only-General: GRPO on the general-domain data only, verl's shuffled batches (paper Table 1).
# Usage: GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/only_general.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need GENERAL_TRAIN
heal_run paper_grpo "$GENERAL_TRAIN" "$@"
