#!/usr/bin/env bash
# HEAL: hybrid data + the EDA reward (trainer mode heal_sync; paper Table 1).
# Usage: TARGET_TRAIN=... GENERAL_TRAIN=... VAL_FILES=... bash recipes/verl/heal.sh [hydra overrides]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TARGET_TRAIN
need GENERAL_TRAIN
heal_run paper_heal "$TARGET_TRAIN,$GENERAL_TRAIN" "heal.general_sources=$(_heal_list "${GENERAL_SOURCES:-commonsense_qa}")" "$@"
