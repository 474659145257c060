#!/usr/bin/env bash
# T5-XL -> T5-small on SAMSum (TASK=samsum, default), or mT5-XL -> mT5-small on IWSLT 2017 en-de
# (TASK=iwslt): the paper's task-specific pipeline (Sec. 4.2, Tab. 3) on GPUs.
#   1. SFT of the teacher with LoRA on q, k, v, o (rank 16, alpha 32), exported merged
#                                                        -> RUN_DIR/teacher_sft/hf_model
#   2. SFT of the student (its initialisation)          -> RUN_DIR/student_sft/hf_model
#   3. distillation from 1 into 2, one run per METHODS word -> RUN_DIR/distill_<method>/hf_model
#   4. evaluation of teacher, SFT student and every distilled student on the test set (greedy,
#      128 new tokens; SAMSum ROUGE-L, IWSLT BLEU and ROUGE-L) -> RUN_DIR/<step>/eval/results.md
#   5. RUN_DIR/summary.md: every results.md, to compare with the paper's Tab. 3 (config headers)
# Each step is one `tune run` command, skipped when done and resumed from its last checkpoint
# (recipes/_common.sh).
#
# Usage (from the repository root):
#   CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/t5_xl_to_small_samsum.sh [RUN_DIR]
#   TASK=iwslt CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/t5_xl_to_small_samsum.sh
#   NPROC=4 METHODS="kd imitkd gkd distillm" CKPT_DIR=/ckpt DATA_DIR=/data bash recipes/t5_xl_to_small_samsum.sh
#
# Variables (environment):
#   CKPT_DIR       folder with the HF checkpoints $TEACHER and $STUDENT (required)
#   DATA_DIR       data folder, layout in recipes/README.md (required)
#   TASK           samsum (default) | iwslt
#   RUN_DIR        outputs (default: first argument, else runs/t5_xl_to_small_$TASK)
#   CONFIG         distillation config (default: configs/t5_xl_to_small_samsum.yaml,
#                  TASK=iwslt: configs/mt5_xl_to_small_iwslt.yaml)
#   TEACHER, STUDENT  checkpoint folder names under CKPT_DIR (default t5-v1_1-xl, t5-v1_1-small;
#                  TASK=iwslt: mt5-xl, mt5-small)
#   METHODS        distillation runs, any of: kd imitkd gkd distillm (default: distillm); "sft"
#                  names the student SFT of step 2. seqkd is not offered: generate_seqkd writes
#                  dolly rows for decoder-only teachers only.
#   NPROC          GPUs per training run (default 1): batch sizes are divided by it so that the
#                  global batch stays 32; evaluation uses one GPU
#   BATCH          global batch of the student runs (default 32, of the paper's {8, 32, 64})
#   TEACHER_LR, TEACHER_EPOCHS, TEACHER_BATCH  teacher SFT (default 1e-4 (the paper's lr for all
#                  task-specific runs), 10 (IWSLT 2), 32)
#   TEACHER_ARGS   key=value overrides of the teacher SFT only (space-separated; default: the LoRA
#                  above as student.lora.* keys; "student.lora=null" fine-tunes the whole teacher)
#   TEACHER_SFT_DIR, STUDENT_SFT_DIR  existing fine-tuned HF checkpoints: skip step 1 / 2
#   TRAIN_FILE, VALID_FILE, TEST_FILE  data (default $DATA_DIR/samsum/{train,validation,test}.jsonl,
#                  TASK=iwslt: $DATA_DIR/iwslt2017_en_de/...)
#   EVAL_BATCH     generation batch of the evaluation (default 64)
#   EVAL_CONFIG    evaluation config (default configs/evaluate_samsum.yaml / evaluate_iwslt.yaml)
#   TRAIN_ARGS, EVAL_ARGS  extra key=value overrides (space-separated) appended to every training /
#                  evaluation command
#   TUNE           the tune command (default: tune)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

TASK=${TASK:-samsum}
case $TASK in
  samsum)
    DEF_CONFIG=t5_xl_to_small_samsum.yaml DEF_EVAL=evaluate_samsum.yaml
    DEF_TEACHER=t5-v1_1-xl DEF_STUDENT=t5-v1_1-small DEF_DATA=samsum DEF_EPOCHS=10
    EVAL_NAME=samsum EVAL_KIND=summarization ;;
  iwslt)
    DEF_CONFIG=mt5_xl_to_small_iwslt.yaml DEF_EVAL=evaluate_iwslt.yaml
    DEF_TEACHER=mt5-xl DEF_STUDENT=mt5-small DEF_DATA=iwslt2017_en_de DEF_EPOCHS=2
    EVAL_NAME=iwslt_en_de EVAL_KIND="translation, src_lang: en, tgt_lang: de" ;;
  *) die "TASK must be samsum or iwslt, got '$TASK'" ;;
esac

CKPT_DIR=${CKPT_DIR:?set CKPT_DIR to the folder holding the HF checkpoints ($DEF_TEACHER, $DEF_STUDENT)}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the data folder (layout: recipes/README.md)}
RUN_DIR=${RUN_DIR:-${1:-runs/t5_xl_to_small_$TASK}}
CONFIG=${CONFIG:-$REPO_ROOT/configs/$DEF_CONFIG}
EVAL_CONFIG=${EVAL_CONFIG:-$REPO_ROOT/configs/$DEF_EVAL}
TEACHER=${TEACHER:-$DEF_TEACHER}
STUDENT=${STUDENT:-$DEF_STUDENT}
METHODS=${METHODS:-distillm}
BATCH=${BATCH:-32}
TEACHER_LR=${TEACHER_LR:-1e-4}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-$DEF_EPOCHS}
TEACHER_BATCH=${TEACHER_BATCH:-32}
TEACHER_ARGS=${TEACHER_ARGS-student.lora.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj] student.lora.lora_rank=16 student.lora.lora_alpha=32}
TEACHER_SFT_DIR=${TEACHER_SFT_DIR:-}
STUDENT_SFT_DIR=${STUDENT_SFT_DIR:-}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/$DEF_DATA/train.jsonl}
VALID_FILE=${VALID_FILE:-$DATA_DIR/$DEF_DATA/validation.jsonl}
TEST_FILE=${TEST_FILE:-$DATA_DIR/$DEF_DATA/test.jsonl}
EVAL_BATCH=${EVAL_BATCH:-64}
read -ra train_args <<< "${TRAIN_ARGS:-}"
read -ra eval_args <<< "${EVAL_ARGS:-}"
read -ra teacher_args <<< "$TEACHER_ARGS"

# ---------------------------------------------------------------- check inputs before any work
read -ra methods <<< "$METHODS"
for m in ${methods[@]+"${methods[@]}"}; do
  [[ $m != seqkd ]] || die "METHODS: seqkd needs teacher outputs in SAMSum/IWSLT rows; generate_seqkd writes dolly rows only"
  has_word "$m" sft kd imitkd gkd distillm || die "METHODS: unknown method '$m'"
done
need_file "$CONFIG" CONFIG
need_file "$EVAL_CONFIG" EVAL_CONFIG
need_file "$TRAIN_FILE" TRAIN_FILE
need_file "$VALID_FILE" VALID_FILE
if [[ -n $TEACHER_SFT_DIR ]]; then need_dir "$TEACHER_SFT_DIR" TEACHER_SFT_DIR; else need_dir "$CKPT_DIR/$TEACHER" "teacher checkpoint"; fi
if [[ -n $STUDENT_SFT_DIR ]]; then need_dir "$STUDENT_SFT_DIR" STUDENT_SFT_DIR; else need_dir "$CKPT_DIR/$STUDENT" "student checkpoint"; fi
EVAL_SETS=$(dataset_list "$EVAL_KIND" "$EVAL_NAME=$TEST_FILE")
TEACHER_RANK_BATCH=$(per_rank_batch "$TEACHER_BATCH")
RANK_BATCH=$(per_rank_batch "$BATCH")
mkdir -p "$RUN_DIR"

# Settings every training run shares: paths and data files.
common=(checkpoints_dir="$CKPT_DIR" data_dir="$DATA_DIR" dataset.source="$TRAIN_FILE"
        validation.dataset.source="$VALID_FILE")

# ---------------------------------------------------------------- 1-2. teacher SFT (LoRA, merged), student SFT (initialisation)
sft_teacher_and_student

# ---------------------------------------------------------------- 3. distillation
steps=(teacher_sft student_sft)
for m in ${methods[@]+"${methods[@]}"}; do
  [[ $m == sft ]] && continue
  train_step "$RUN_DIR/distill_$m" "$CONFIG" "${common[@]}" method="$m" \
    student.checkpoint_dir="$STUDENT_SFT_DIR" teacher.checkpoint_dir="$TEACHER_SFT_DIR" \
    batch_size="$RANK_BATCH" ${train_args[@]+"${train_args[@]}"}
  steps+=("distill_$m")
done

# ---------------------------------------------------------------- 4. evaluation, 5. summary
evaluate_and_collect "${steps[@]}"
