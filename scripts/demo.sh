#!/usr/bin/env bash
# Kennel end to end on loopback: starts the registry (local folder), trainer
# and inference services, and walks through the job. Every process it starts
# is stopped on exit or Ctrl-C.
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
BIN=$PWD/$BUILD
WORK=${KENNEL_DEMO_DIR:-$PWD/var/demo}
mkdir -p "$WORK/logs"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start() {  # start NAME BINARY ARGS...
  local name=$1; shift
  "$@" >"$WORK/logs/$name.log" 2>&1 &
  pids+=($!)
}

kennel() { "$BIN/services/cli/kennel" "$@"; }

say "1. Starting the registry, trainer and inference services"
start registry "$BIN/services/registry/kennel-registry"
start trainer "$BIN/services/trainer/kennel-trainer"
start inference "$BIN/services/inference/kennel-inference"
for addr in 127.0.0.1:50051 127.0.0.1:50052 127.0.0.1:50053; do
  for _ in $(seq 100); do kennel health --addr "$addr" >/dev/null 2>&1 && break; sleep 0.1; done
  kennel health --addr "$addr" || true
done
echo "logs: $WORK/logs"
echo "The training, serving and tuning steps of the demo are not wired up yet."
