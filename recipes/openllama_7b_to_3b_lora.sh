#!/usr/bin/env bash
# OpenLLaMA2-7B -> OpenLLaMA2-3B with LoRA on databricks-dolly-15k, the paper's whole pipeline on
# GPUs: teacher SFT (LoRA, merged) -> student SFT (LoRA, merged) -> distillation (LoRA on q, v,
# rank 16; METHODS) -> evaluation on Dolly test, Self-Instruct, Vicuna, S-NI, UnNI ->
# RUN_DIR/summary.md. Steps and variables: recipes/_instruction_pipeline.sh; data layout and paper
# numbers: recipes/README.md, configs/openllama_3b_lora.yaml.
#
# Usage (from the repository root):
#   CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/openllama_7b_to_3b_lora.sh [RUN_DIR]
#   NPROC=4 METHODS="kd gkd distillm" CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/openllama_7b_to_3b_lora.sh
#
# Defaults of this pair (override in the environment):
#   CKPT_DIR/open_llama_7b_v2 (TEACHER), CKPT_DIR/open_llama_3b_v2 (STUDENT) HF checkpoints
#   (openlm-research/open_llama_*_v2); RUN_DIR runs/openllama_7b_to_3b_lora;
#   CONFIG configs/openllama_3b_lora.yaml; BATCH 8 (global batch of the student runs, the paper's)
#   teacher SFT: the config's LoRA (q, v, rank 16, alpha 32) on the 7B, exported merged;
#   TEACHER_LR 5e-4, TEACHER_EPOCHS 10, TEACHER_BATCH 8 (the paper does not state them);
#   TEACHER_ARGS="student.lora=null" fine-tunes the whole teacher instead (needs FSDP over GPUs).
#   EVAL_BATCH 16 (the 7B teacher's KV cache).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

RUN_DIR=${RUN_DIR:-${1:-runs/openllama_7b_to_3b_lora}}
CONFIG=${CONFIG:-$REPO_ROOT/configs/openllama_3b_lora.yaml}
TEACHER=${TEACHER:-open_llama_7b_v2}
STUDENT=${STUDENT:-open_llama_3b_v2}
BATCH=${BATCH:-8}
TEACHER_LR=${TEACHER_LR:-5e-4}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
TEACHER_BATCH=${TEACHER_BATCH:-8}
EVAL_BATCH=${EVAL_BATCH:-16}

source "$(dirname "${BASH_SOURCE[0]}")/_instruction_pipeline.sh"
