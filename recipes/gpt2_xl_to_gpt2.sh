#!/usr/bin/env bash
# GPT-2 XL (1.5B) -> GPT-2 (0.1B) on databricks-dolly-15k, the paper's whole pipeline on GPUs:
# teacher SFT -> student SFT -> distillation (METHODS) -> evaluation on Dolly test, Self-Instruct,
# Vicuna, S-NI, UnNI -> RUN_DIR/summary.md. Steps and variables: recipes/_instruction_pipeline.sh;
# data layout and paper numbers: recipes/README.md, configs/gpt2_xl_to_gpt2.yaml.
#
# Usage (from the repository root):
#   CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/gpt2_xl_to_gpt2.sh [RUN_DIR]
#   NPROC=4 METHODS="kd seqkd imitkd gkd distillm" CKPT_DIR=/ckpt DATA_DIR=/data \
#       bash recipes/gpt2_xl_to_gpt2.sh runs/gpt2_all
#   # the other GPT-2 students (their configs carry lr / epochs; BATCH is the global batch):
#   CONFIG=configs/gpt2_xl_to_gpt2_medium.yaml STUDENT=gpt2-medium ... bash recipes/gpt2_xl_to_gpt2.sh
#   CONFIG=configs/gpt2_xl_to_gpt2_large.yaml STUDENT=gpt2-large BATCH=4 ... bash recipes/gpt2_xl_to_gpt2.sh
#
# Defaults of this pair (override in the environment):
#   CKPT_DIR/gpt2-xl (TEACHER), CKPT_DIR/gpt2 (STUDENT) HF checkpoints; RUN_DIR runs/gpt2_xl_to_gpt2
#   CONFIG configs/gpt2_xl_to_gpt2.yaml; BATCH 8 (global batch of the student runs, the paper's)
#   teacher SFT: TEACHER_LR 5e-5, TEACHER_EPOCHS 10, TEACHER_BATCH 8 (the paper's grid for models
#   over 1B, App. D; the paper does not state the values it chose)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

RUN_DIR=${RUN_DIR:-${1:-runs/gpt2_xl_to_gpt2}}
CONFIG=${CONFIG:-$REPO_ROOT/configs/gpt2_xl_to_gpt2.yaml}
TEACHER=${TEACHER:-gpt2-xl}
STUDENT=${STUDENT:-gpt2}
BATCH=${BATCH:-8}
TEACHER_LR=${TEACHER_LR:-5e-5}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
TEACHER_BATCH=${TEACHER_BATCH:-8}

source "$(dirname "${BASH_SOURCE[0]}")/_instruction_pipeline.sh"
