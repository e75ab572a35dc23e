#!/usr/bin/env bash
# Runs every benchmark (registry, inference, trainer, tuning), each of which
# measures Kennel beside a baseline in the same run and prints the ratio, and
# writes one Markdown report: bench/REPORT.md (figures, ratios, the machine).
#
#   scripts/bench.sh [BUILD_DIR]            (make bench runs it after building)
#
# KENNEL_BENCH_QUICK=1 runs smaller sizes (minutes instead of most of an hour on
# two cores); KENNEL_BENCH_ONLY="registry inference" runs a subset.
set -uo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=/usr/bin/python3
OUT=$ROOT/var/bench
mkdir -p "$OUT"
ONLY=${KENNEL_BENCH_ONLY:-registry inference trainer tune}

if [ "${KENNEL_BENCH_QUICK:-0}" = 1 ]; then
  registry_args=(--size-mb 30 --reps 2)
  inference_args=(--seconds 8 --warmup 2 --forward-seconds 4)
  trainer_args=(--train 400 --valid 60 --test 60 --classes 20 --raw-images 32 --finetune-images 32)
  tune_args=(--scale 0.05)
else
  registry_args=()
  inference_args=()
  trainer_args=()
  tune_args=()
fi

declare -A commands=(
  [registry]="$PY bench/registry_bench.py --build-dir $BUILD --report $OUT/registry.json ${registry_args[*]}"
  [inference]="$PY bench/inference_bench.py --build-dir $BUILD --out $OUT/inference.json ${inference_args[*]}"
  [trainer]="$PY bench/trainer_bench.py --build-dir $BUILD --work $OUT/trainer-work --out $OUT/trainer.json ${trainer_args[*]}"
  [tune]="$PY bench/tune_bench.py --build $BUILD --workdir $OUT/tune-work ${tune_args[*]}"
)

status=0
for name in $ONLY; do
  cmd=${commands[$name]:-}
  if [ -z "$cmd" ]; then echo "unknown benchmark $name" >&2; status=2; continue; fi
  echo "== $name: $cmd"
  start=$(date +%s)
  load=$(cut -d' ' -f1 /proc/loadavg)
  $cmd 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "{\"command\": \"$cmd\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start)), \"load_before\": \"$load\"}" >"$OUT/$name.meta.json"
  [ "$rc" = 0 ] || status=1
done

$PY bench/report.py --dir "$OUT" --out bench/REPORT.md $ONLY
echo "report: bench/REPORT.md"
exit $status
