#!/usr/bin/env bash
# HEAL: the hybrid file + the EDA reward (trainer mode heal_sync; paper Table 1).
# HYBRID_TRAIN: written by `heal mix --target ... --general ... --k 32 --general-per-batch 96` (README, Data).
# Usage: HYBRID_TRAIN=... VAL_FILES=... bash recipes/verl/heal.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
heal_run_mixed paper_heal HYBRID_TRAIN "$HEAL_MIX_HYBRID" "heal.general_sources=$(_heal_list "${GENERAL_SOURCES:-commonsense_qa}")" "$@"
