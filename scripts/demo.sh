#!/usr/bin/env bash
# Kennel end to end on loopback, with the embedded defaults: the registry keeps
# models in a local folder, the trainer reads Fashion-MNIST (Debian's
# dataset-fashion-mnist, written out in the dogImages folder layout), and
# inference follows the registry. Every process it starts is stopped on exit
# or Ctrl-C.
#
#   scripts/demo.sh [BUILD_DIR]     (make demo runs it after building)
#
# Environment: KENNEL_DEMO_DIR (work folder, default var/demo),
# KENNEL_DEMO_PORT (first of six ports, default 50051: gRPC 50051-50053,
# metrics +50: 50101-50103), KENNEL_DEMO_LIMIT (images per class and split,
# default 500), KENNEL_DEMO_KEEP=1 (keep the services up until Ctrl-C).
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/$BUILD/services
PY=/usr/bin/python3
WORK=${KENNEL_DEMO_DIR:-$ROOT/var/demo}
PORT=${KENNEL_DEMO_PORT:-50051}
LIMIT=${KENNEL_DEMO_LIMIT:-500}
REGISTRY=127.0.0.1:$PORT
TRAINER=127.0.0.1:$((PORT + 1))
INFERENCE=127.0.0.1:$((PORT + 2))
DATA=$WORK/data

bold() { printf '\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n'; bold "== $*"; }
run() { printf '$ %s\n' "$*" | sed "s|$BIN/cli/||; s|$ROOT/||g"; "$@"; }
kennel() { "$BIN/cli/kennel" "$@"; }

pids=()
client_pid=
cleanup() {
  local code=$?
  [ -n "$client_pid" ] && kill "$client_pid" 2>/dev/null
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    echo "stopped the services (logs in ${WORK#$ROOT/}/logs)"
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'echo; echo "interrupted"; exit 130' INT TERM

start() {  # start NAME ARGS...: a service in the background, logging to a file
  local name=$1; shift
  "$@" >"$WORK/logs/$name.log" 2>&1 &
  pids+=($!)
}

wait_healthy() {  # wait_healthy ADDR NAME SECONDS
  for _ in $(seq $(($3 * 10))); do
    if kennel health --addr "$1" --timeout 1s >/dev/null 2>&1; then
      printf '  %-17s %s SERVING\n' "$2" "$1"
      return 0
    fi
    sleep 0.1
  done
  echo "$2 did not become healthy at $1; its log says:" >&2
  tail -5 "$WORK/logs/$2.log" >&2
  return 1
}

rm -rf "$WORK/registry" "$WORK/jobs" "$WORK/cache" "$WORK/inference-cache" "$WORK/report"
mkdir -p "$WORK/logs" "$DATA"
for p in $PORT $((PORT + 1)) $((PORT + 2)) $((PORT + 50)) $((PORT + 51)) $((PORT + 52)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is in use; stop what uses it or set KENNEL_DEMO_PORT" >&2
    exit 1
  fi
done
SECONDS=0

step "1. Start the registry (local folder), the trainer and inference"
start kennel-registry "$BIN/registry/kennel-registry" --listen=$REGISTRY \
  --metrics-listen=127.0.0.1:$((PORT + 50)) --storage="file://$WORK/registry"
start kennel-trainer "$BIN/trainer/kennel-trainer" --listen=$TRAINER \
  --metrics-listen=127.0.0.1:$((PORT + 51)) --registry=$REGISTRY \
  --data-root="$DATA" --cache-dir="$WORK/cache" --jobs-dir="$WORK/jobs"
start kennel-inference "$BIN/inference/kennel-inference" --listen=$INFERENCE \
  --metrics-listen=127.0.0.1:$((PORT + 52)) --registry=$REGISTRY \
  --model=fashion@production --cache-dir="$WORK/inference-cache"
wait_healthy $REGISTRY kennel-registry 30
wait_healthy $TRAINER kennel-trainer 30
echo "  kennel-inference  $INFERENCE follows fashion@production (NOT_SERVING until a model exists)"

step "2. Prepare a real data set and a backbone"
if [ ! -d "$DATA/fashion/test" ]; then
  run kennel dataset fashion-mnist "$DATA/fashion" --limit "$LIMIT"
else
  echo "reusing $DATA/fashion"
fi
run "$PY" tools/export_backbone.py --arch small_cnn --out "$DATA/small_cnn.pt" >/dev/null
echo "small CNN backbone for 28x28 images: $(du -h "$DATA/small_cnn.pt" | cut -f1)"

step "3. Train through the trainer, register fashion:1 and alias it production"
run kennel train --addr $TRAINER --data fashion --backbone small_cnn.pt \
  --mode finetune --lr 0.003 --batch-size 64 --epochs 3 --unaugmented-share 0.5 \
  --register-as fashion --alias production

step "4. Inference picks the model up by itself"
wait_healthy $INFERENCE kennel-inference 60
samples=()
for class_dir in "$DATA"/fashion/test/*/; do
  files=("$class_dir"*.png)
  samples+=("${files[0]#$DATA/fashion/test/}")
done
(cd "$DATA/fashion/test" && run kennel classify --addr $INFERENCE --top-k 1 "${samples[@]}")

echo
echo "Test-set accuracy through the inference service (every test image, one request each):"
mapfile -t tests < <(find "$DATA/fashion/test" -name '*.png' | sort)
kennel classify --addr $INFERENCE --top-k 1 --json "${tests[@]}" >"$WORK/test-v1.json"
score() {
  "$PY" - "$1" <<'PY'
import json, os, sys
rows = json.load(open(sys.argv[1]))
ok = sum(os.path.basename(os.path.dirname(r["image"])).split(".", 1)[1]
         == r["result"]["predictions"][0]["label"] for r in rows)
v = {f'{r["result"]["model_name"]}:{r["result"]["model_version"]}' for r in rows}
print(f"  {ok}/{len(rows)} = {ok / len(rows):.4f} (answered by {', '.join(sorted(v))})")
PY
}
score "$WORK/test-v1.json"

step "5. Tune: heads on fashion:1's backbone, 8 trials, TPE; promote the winner if it is better"
run kennel models pull fashion@production -o "$WORK/fashion-1.pt" --addr $REGISTRY
run "$PY" tools/export_backbone.py --from-classifier "$WORK/fashion-1.pt" \
  --out "$DATA/fashion1_backbone.pt" >/dev/null
run kennel tune --addr $TRAINER --data fashion --backbone fashion1_backbone.pt \
  --mode head --trials 8 --parallel 2 --strategy tpe --lr 0.0003:0.03:log \
  --weight-decay 0:1e-5 --batch-size 32,64,128 --epochs 6 \
  --register-as fashion --report "$WORK/report" | grep -v "^  [ 0-9]\|^  rank\| epoch [0-9]"

acc() { kennel models show "$1" --addr $REGISTRY --json |
  "$PY" -c 'import json,sys; print(json.load(sys.stdin)["metrics"].get("test_accuracy", 0))'; }
v1=$(acc fashion:1)
v2=$(acc fashion:2)
echo
echo "test accuracy: fashion:1 $v1, fashion:2 $v2"

probe="$DATA/fashion/test/${samples[0]}"
(
  n=0
  while :; do
    kennel classify --addr $INFERENCE --top-k 1 --json "$probe" 2>>"$WORK/client.err" |
      "$PY" -c 'import json,sys; r=json.load(sys.stdin)[0]["result"]; print("%s:%s" % (r["model_name"], r["model_version"]))' ||
      echo FAILED
    n=$((n + 1))
  done >"$WORK/client.log"
) &
client_pid=$!
sleep 2
if "$PY" -c "import sys; sys.exit(0 if float('$v2') > float('$v1') else 1)"; then
  run kennel models alias fashion production 2 --addr $REGISTRY
else
  echo "fashion:2 is not better; production stays on fashion:1 (the demo moves it anyway to show the swap)"
  run kennel models alias fashion production 2 --addr $REGISTRY
fi
for _ in $(seq 100); do
  grep -q "fashion:2" "$WORK/client.log" 2>/dev/null && break
  sleep 0.1
done
sleep 2
kill "$client_pid" 2>/dev/null; wait "$client_pid" 2>/dev/null || true
client_pid=
echo "a client classifying in a loop during the swap sent $(wc -l <"$WORK/client.log") requests:"
sort "$WORK/client.log" | uniq -c | sed 's/^/  /'
if grep -q FAILED "$WORK/client.log"; then
  echo "  some requests failed:"; sort -u "$WORK/client.err" | head -5
fi
kennel classify --addr $INFERENCE --top-k 1 --json "${tests[@]}" >"$WORK/test-v2.json"
echo "test-set accuracy through inference now:"
score "$WORK/test-v2.json"
echo "tuning report: ${WORK#$ROOT/}/report/ (loss_vs_parameters.svg, best_trial_loss.svg, timeline.svg, trials.csv)"

step "6. Metrics"
for s in "registry $((PORT + 50))" "trainer $((PORT + 51))" "inference $((PORT + 52))"; do
  set -- $s
  printf '  kennel-%-10s http://127.0.0.1:%s/metrics\n' "$1" "$2"
done
curl -s "http://127.0.0.1:$((PORT + 52))/metrics" | grep -E '^kennel_inference_model_info|^kennel_grpc_server_handled_total.*Classify"' | sed 's/^/  /'
echo
bold "Demo finished in $((SECONDS / 60))m$((SECONDS % 60))s."
if [ "${KENNEL_DEMO_KEEP:-0}" = 1 ]; then
  echo "Services are still up (KENNEL_DEMO_KEEP=1); Ctrl-C stops them."
  wait
fi
