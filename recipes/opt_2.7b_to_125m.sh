#!/usr/bin/env bash
# OPT-2.7B -> OPT-125M on databricks-dolly-15k, the paper's whole pipeline on GPUs:
# teacher SFT -> student SFT -> distillation (METHODS) -> evaluation on Dolly test, Self-Instruct,
# Vicuna, S-NI, UnNI -> RUN_DIR/summary.md. Steps and variables: recipes/_instruction_pipeline.sh;
# data layout and paper numbers: recipes/README.md, configs/opt_2.7b_to_125m.yaml.
#
# Usage (from the repository root):
#   CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/opt_2.7b_to_125m.sh [RUN_DIR]
#   NPROC=4 METHODS="kd gkd distillm" CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/opt_2.7b_to_125m.sh
#   # the other OPT students (their configs carry the epochs):
#   CONFIG=configs/opt_2.7b_to_350m.yaml STUDENT=opt-350m ... bash recipes/opt_2.7b_to_125m.sh runs/opt350m
#   CONFIG=configs/opt_2.7b_to_1.3b.yaml STUDENT=opt-1.3b ... bash recipes/opt_2.7b_to_125m.sh runs/opt1.3b
#
# Defaults of this pair (override in the environment):
#   CKPT_DIR/opt-2.7b (TEACHER), CKPT_DIR/opt-125m (STUDENT) HF checkpoints (facebook/opt-*);
#   RUN_DIR runs/opt_2.7b_to_125m; CONFIG configs/opt_2.7b_to_125m.yaml (activation checkpointing
#   on, also for the teacher SFT); BATCH 8 (global batch of the student runs, the paper's)
#   teacher SFT: TEACHER_LR 5e-5, TEACHER_EPOCHS 10, TEACHER_BATCH 8 (the paper's grid for models
#   over 1B, App. D; the paper does not state the values it chose)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

RUN_DIR=${RUN_DIR:-${1:-runs/opt_2.7b_to_125m}}
CONFIG=${CONFIG:-$REPO_ROOT/configs/opt_2.7b_to_125m.yaml}
TEACHER=${TEACHER:-opt-2.7b}
STUDENT=${STUDENT:-opt-125m}
BATCH=${BATCH:-8}
TEACHER_LR=${TEACHER_LR:-5e-5}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
TEACHER_BATCH=${TEACHER_BATCH:-8}

source "$(dirname "${BASH_SOURCE[0]}")/_instruction_pipeline.sh"
