# Helpers shared by the recipes/*.sh pipelines. Sourced, not run: `source recipes/_common.sh`.
#
# Every training or evaluation step is one `tune run ...` or `python -m distillm_tune.scripts.*`
# command, printed before it runs. Steps are resumable: a training step whose hf_model/ exists is
# skipped, one with a checkpoint (checkpoints/latest) continues with resume_from_checkpoint=true,
# an evaluation whose results.md exists is skipped. Delete a step's folder to redo it.
#
# Variables read here (set by the pipeline or the environment):
#   NPROC   processes (GPUs) per training run; > 1 launches `tune run --nproc_per_node $NPROC`
#   TUNE    the tune command (default: tune)
#   PYTHON  the python that has distillm_tune installed (default: python)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KD_RECIPE=distillm_tune/recipes/kd_offpolicy
EVAL_RECIPE=distillm_tune/recipes/evaluate
TUNE=${TUNE:-tune}
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}

log() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Print a command (shell-quoted) and run it.
run_cmd() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  "$@"
}

need_dir() { [[ -d $1 ]] || die "$2: directory '$1' does not exist"; }
need_file() { [[ -f $1 ]] || die "$2: file '$1' does not exist"; }

# per_rank_batch GLOBAL: the per-rank batch_size that keeps the global batch GLOBAL on NPROC ranks.
per_rank_batch() {
  local global=$1
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
  (( global % NPROC == 0 )) || die "the global batch $global is not divisible by NPROC=$NPROC"
  echo $(( global / NPROC ))
}

# has_word WORD LIST...: true when WORD is one of the LIST words.
has_word() {
  local w=$1; shift
  local x
  for x in "$@"; do [[ $x == "$w" ]] && return 0; done
  return 1
}

# train_step OUT_DIR CONFIG [key=value ...]: one kd_offpolicy run writing to OUT_DIR.
train_step() {
  local out=$1 config=$2; shift 2
  if [[ -f $out/hf_model/config.json ]]; then
    log "skip: $out/hf_model exists"
    return 0
  fi
  local extra=()
  if [[ -f $out/checkpoints/latest ]]; then
    log "resuming $out from its latest checkpoint"
    extra+=(resume_from_checkpoint=true)
  elif [[ -e $out/metrics.jsonl ]]; then
    # stopped before its first checkpoint: nothing to resume, start it again
    log "restarting $out (no checkpoint to resume from)"
    extra+=(overwrite=true)
  fi
  local launcher=("$TUNE" run)
  if (( NPROC > 1 )); then
    launcher+=(--nproc_per_node "$NPROC")
  fi
  log "train -> $out"
  mkdir -p "$out"
  run_cmd "${launcher[@]}" "$KD_RECIPE" --config "$config" output_dir="$out" "$@" ${extra[@]+"${extra[@]}"}
  [[ -f $out/hf_model/config.json ]] || die "$out: the run finished without writing hf_model/"
}

# eval_step OUT_DIR MODEL_DIR CONFIG DATASETS [key=value ...]: one evaluate run (single process).
# DATASETS is a YAML list as made by dataset_list.
eval_step() {
  local out=$1 model=$2 config=$3 datasets=$4; shift 4
  if [[ -f $out/results.md ]]; then
    log "skip: $out/results.md exists"
    return 0
  fi
  need_dir "$model" "model to evaluate"
  log "evaluate $model -> $out"
  run_cmd "$TUNE" run "$EVAL_RECIPE" --config "$config" model_dir="$model" output_dir="$out" \
    datasets="$datasets" "$@"
}

# dataset_list KIND NAME=PATH ...: a YAML flow list of evaluate datasets for the files that exist
# (missing ones are reported and left out). Extra per-dataset keys: KIND may carry them, e.g.
# "translation, src_lang: en, tgt_lang: de".
dataset_list() {
  local kind=$1; shift
  local items=() pair name path
  for pair in "$@"; do
    name=${pair%%=*}
    path=${pair#*=}
    if [[ ! -f $path ]]; then
      warn "evaluation set $name: '$path' does not exist, left out"
      continue
    fi
    [[ $path != *[\"=]* ]] || die "evaluation set $name: the path '$path' must not contain '\"' or '='"
    items+=("{name: $name, path: \"$path\", kind: $kind}")
  done
  (( ${#items[@]} > 0 )) || die "no evaluation set exists (kind $kind)"
  local IFS=,
  echo "[${items[*]}]"
}

# Steps 1-2 of every pipeline: SFT of the teacher (unless TEACHER_SFT_DIR is given) and of the
# student, the initialisation of every distillation run; sets TEACHER_SFT_DIR and STUDENT_SFT_DIR.
# Reads the pipeline's RUN_DIR, CONFIG, CKPT_DIR, TEACHER, STUDENT, TEACHER_LR, TEACHER_EPOCHS,
# TEACHER_RANK_BATCH, RANK_BATCH, common, teacher_args, train_args.
sft_teacher_and_student() {
  if [[ -z $TEACHER_SFT_DIR ]]; then
    train_step "$RUN_DIR/teacher_sft" "$CONFIG" "${common[@]}" method=sft \
      student.checkpoint_dir="$CKPT_DIR/$TEACHER" optimizer.lr="$TEACHER_LR" \
      epochs="$TEACHER_EPOCHS" batch_size="$TEACHER_RANK_BATCH" ${teacher_args[@]+"${teacher_args[@]}"} \
      ${train_args[@]+"${train_args[@]}"}
    TEACHER_SFT_DIR=$RUN_DIR/teacher_sft/hf_model
  fi
  if [[ -z $STUDENT_SFT_DIR ]]; then
    train_step "$RUN_DIR/student_sft" "$CONFIG" "${common[@]}" method=sft \
      student.checkpoint_dir="$CKPT_DIR/$STUDENT" batch_size="$RANK_BATCH" ${train_args[@]+"${train_args[@]}"}
    STUDENT_SFT_DIR=$RUN_DIR/student_sft/hf_model
  fi
}

# collect_results RUN_DIR STEP...: RUN_DIR/summary.md from RUN_DIR/STEP/eval/results.md.
# Steps 4-5 of every pipeline: evaluate the teacher, the SFT student and each distilled student
# named in "$@", then collect their results.md into RUN_DIR/summary.md. Reads the pipeline's
# RUN_DIR, TEACHER_SFT_DIR, STUDENT_SFT_DIR, EVAL_CONFIG, EVAL_SETS, DATA_DIR, EVAL_BATCH, eval_args.
evaluate_and_collect() {
  local step model
  for step in "$@"; do
    case $step in
      teacher_sft) model=$TEACHER_SFT_DIR ;;
      student_sft) model=$STUDENT_SFT_DIR ;;
      *) model=$RUN_DIR/$step/hf_model ;;
    esac
    eval_step "$RUN_DIR/$step/eval" "$model" "$EVAL_CONFIG" "$EVAL_SETS" data_dir="$DATA_DIR" \
      batch_size="$EVAL_BATCH" ${eval_args[@]+"${eval_args[@]}"}
  done
  collect_results "$RUN_DIR" "$@"
}

collect_results() {
  local run_dir=$1; shift
  local summary=$run_dir/summary.md step
  {
    echo "# Results of $(basename "$run_dir")"
    echo
    echo "Generated $(date '+%Y-%m-%d %H:%M') by recipes/$(basename "$0"). Each table is"
    echo "distillm_tune/recipes/evaluate's results.md for the model in <step>/hf_model."
    for step in "$@"; do
      echo
      echo "## $step"
      echo
      if [[ -f $run_dir/$step/eval/results.md ]]; then
        cat "$run_dir/$step/eval/results.md"
      else
        echo "(no results: $run_dir/$step/eval/results.md is missing)"
      fi
    done
  } > "$summary.tmp"
  mv "$summary.tmp" "$summary"
  log "summary: $summary"
  cat "$summary"
}
