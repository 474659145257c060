# The instruction-following pipeline of the paper (dolly-15k), shared by recipes/gpt2_xl_to_gpt2.sh,
# recipes/opt_2.7b_to_125m.sh and recipes/openllama_7b_to_3b_lora.sh. Sourced after those set the
# pair's defaults (CONFIG, TEACHER, STUDENT, RUN_DIR, BATCH, TEACHER_LR, TEACHER_EPOCHS,
# TEACHER_BATCH, optionally TEACHER_ARGS); needs recipes/_common.sh sourced first.
#
# Steps (each one `tune run` or `python -m distillm_tune.scripts.*` command, skipped when done):
#   1. SFT of the teacher: method=sft with student.checkpoint_dir=$CKPT_DIR/$TEACHER
#                                                        -> RUN_DIR/teacher_sft/hf_model
#   2. SFT of the student (its initialisation)          -> RUN_DIR/student_sft/hf_model
#   3. distillation from 1 into 2, one run per METHODS word -> RUN_DIR/distill_<method>/hf_model
#      (seqkd first writes the teacher's responses: generate_seqkd -> RUN_DIR/seqkd/train.jsonl)
#   4. evaluation of teacher, SFT student and every distilled student on Dolly test, Self-Instruct,
#      Vicuna, S-NI and UnNI (5 sampling seeds, ROUGE-L)  -> RUN_DIR/<step>/eval/results.md
#   5. RUN_DIR/summary.md: every results.md, to compare with the paper's numbers (config headers)
#
# Variables (environment; the pair's script documents its defaults):
#   CKPT_DIR       folder with the HF checkpoints $TEACHER and $STUDENT (required)
#   DATA_DIR       data folder, layout in recipes/README.md (required)
#   METHODS        distillation runs, any of: kd seqkd imitkd gkd distillm (default: distillm);
#                  "sft" names the student SFT of step 2, which is evaluated anyway
#   NPROC          GPUs per training run (default 1): batch sizes are divided by it so that the
#                  global batch stays the paper's; evaluation and generate_seqkd use one GPU
#   TEACHER_SFT_DIR, STUDENT_SFT_DIR  existing fine-tuned HF checkpoints: skip step 1 / 2
#   TEACHER_ARGS   extra key=value overrides (space-separated) of the teacher SFT only
#   DOLLY          dolly-15k jsonl the train / valid splits are cut from
#                  (default $DATA_DIR/dolly/databricks-dolly-15k.jsonl)
#   DOLLY_TEST, SELF_INST, VICUNA, SNI, UNNI  evaluation jsonl files (default $DATA_DIR/dolly/test.jsonl,
#                  self_inst/test.jsonl, vicuna/test.jsonl, sinst/test.jsonl, uinst/test.jsonl; a
#                  missing one is left out with a warning)
#   LM_CORPUS      optional pretraining text for the paper's LM term (lm.coef 1.0) in step 3
#   EVAL_BATCH     generation batch of the evaluation (default 32)
#   EVAL_CONFIG    evaluation config (default: configs/evaluate_instruction.yaml)
#   TRAIN_ARGS, EVAL_ARGS  extra key=value overrides (space-separated) appended to every training /
#                  evaluation command, e.g. TRAIN_ARGS="dtype=fp32 gradient_accumulation_steps=2"
#   SEQKD_ARGS     extra options of generate_seqkd (space-separated), e.g. "--batch-size 16"
#   TUNE, PYTHON   commands (default: tune, python)

: "${RUN_DIR:?}" "${CONFIG:?}" "${TEACHER:?}" "${STUDENT:?}" "${BATCH:?}" "${TEACHER_LR:?}" \
  "${TEACHER_EPOCHS:?}" "${TEACHER_BATCH:?}"  # set by the pair's script
CKPT_DIR=${CKPT_DIR:?set CKPT_DIR to the folder holding the HF checkpoints $TEACHER and $STUDENT}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the data folder (layout: recipes/README.md)}
METHODS=${METHODS:-distillm}
TEACHER_SFT_DIR=${TEACHER_SFT_DIR:-}
STUDENT_SFT_DIR=${STUDENT_SFT_DIR:-}
DOLLY=${DOLLY:-$DATA_DIR/dolly/databricks-dolly-15k.jsonl}
DOLLY_TEST=${DOLLY_TEST:-$DATA_DIR/dolly/test.jsonl}
SELF_INST=${SELF_INST:-$DATA_DIR/self_inst/test.jsonl}
VICUNA=${VICUNA:-$DATA_DIR/vicuna/test.jsonl}
SNI=${SNI:-$DATA_DIR/sinst/test.jsonl}
UNNI=${UNNI:-$DATA_DIR/uinst/test.jsonl}
LM_CORPUS=${LM_CORPUS:-}
EVAL_BATCH=${EVAL_BATCH:-32}
EVAL_CONFIG=${EVAL_CONFIG:-$REPO_ROOT/configs/evaluate_instruction.yaml}
read -ra train_args <<< "${TRAIN_ARGS:-}"
read -ra eval_args <<< "${EVAL_ARGS:-}"
read -ra seqkd_args <<< "${SEQKD_ARGS:-}"
read -ra teacher_args <<< "${TEACHER_ARGS:-}"

# ---------------------------------------------------------------- check inputs before any work
read -ra methods <<< "$METHODS"
for m in ${methods[@]+"${methods[@]}"}; do
  has_word "$m" sft kd seqkd imitkd gkd distillm || die "METHODS: unknown method '$m'"
done
need_file "$CONFIG" CONFIG
need_file "$EVAL_CONFIG" EVAL_CONFIG
need_file "$DOLLY" DOLLY
if [[ -n $TEACHER_SFT_DIR ]]; then need_dir "$TEACHER_SFT_DIR" TEACHER_SFT_DIR; else need_dir "$CKPT_DIR/$TEACHER" "teacher checkpoint"; fi
if [[ -n $STUDENT_SFT_DIR ]]; then need_dir "$STUDENT_SFT_DIR" STUDENT_SFT_DIR; else need_dir "$CKPT_DIR/$STUDENT" "student checkpoint"; fi
if [[ -n $LM_CORPUS && ! -e $LM_CORPUS ]]; then die "LM_CORPUS: '$LM_CORPUS' does not exist"; fi
if [[ ! -f $DOLLY_TEST ]]; then warn "DOLLY_TEST '$DOLLY_TEST' is missing: cut it from $DOLLY as recipes/README.md shows"; fi
TEACHER_RANK_BATCH=$(per_rank_batch "$TEACHER_BATCH")
RANK_BATCH=$(per_rank_batch "$BATCH")
EVAL_SETS=$(dataset_list instruction dolly="$DOLLY_TEST" self_inst="$SELF_INST" vicuna="$VICUNA" \
  sinst="$SNI" uinst="$UNNI")
mkdir -p "$RUN_DIR"

# Settings every training run shares: paths, and the dolly file the splits are cut from.
common=(checkpoints_dir="$CKPT_DIR" data_dir="$DATA_DIR" dataset.source="$DOLLY")
lm=()
if [[ -n $LM_CORPUS ]]; then
  lm=("lm.dataset={_component_: distillm_tune.data.pretrain_dataset, source: \"$LM_CORPUS\", max_seq_len: \"\${max_seq_len}\"}")
fi

# ---------------------------------------------------------------- 1-2. teacher SFT, student SFT (initialisation)
sft_teacher_and_student

# ---------------------------------------------------------------- 3. distillation
steps=(teacher_sft student_sft)
for m in ${methods[@]+"${methods[@]}"}; do
  [[ $m == sft ]] && continue
  extra=()
  if [[ $m == seqkd ]]; then
    if [[ ! -f $RUN_DIR/seqkd/train.jsonl ]]; then
      log "teacher responses for seqkd -> $RUN_DIR/seqkd/train.jsonl"
      mkdir -p "$RUN_DIR/seqkd"
      run_cmd "$PYTHON" -m distillm_tune.scripts.generate_seqkd --model-dir "$TEACHER_SFT_DIR" \
        --data "$DOLLY" --split train --out "$RUN_DIR/seqkd/train.jsonl" --max-prompt-len 256 \
        --max-seq-len 512 --batch-size 32 --dtype bf16 --device cuda ${seqkd_args[@]+"${seqkd_args[@]}"}
    fi
    # the file already is the train split: read all of it (validation still cuts dolly's valid split)
    extra=(seqkd_data="$RUN_DIR/seqkd/train.jsonl" dataset.split=all)
  fi
  train_step "$RUN_DIR/distill_$m" "$CONFIG" "${common[@]}" method="$m" \
    student.checkpoint_dir="$STUDENT_SFT_DIR" teacher.checkpoint_dir="$TEACHER_SFT_DIR" \
    batch_size="$RANK_BATCH" ${lm[@]+"${lm[@]}"} ${extra[@]+"${extra[@]}"} ${train_args[@]+"${train_args[@]}"}
  steps+=("distill_$m")
done

# ---------------------------------------------------------------- 4. evaluation, 5. summary
evaluate_and_collect "${steps[@]}"
