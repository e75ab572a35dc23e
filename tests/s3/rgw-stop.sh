#!/bin/bash
# rgw-stop.sh DIR -- stops the daemons rgw-start.sh DIR started, found only by
# the pid files under DIR/run and checked against DIR's config (never by
# name), then deletes DIR unless KEEP=1. FAST=1 sends SIGKILL at once.
# SIGNAL=STOP or SIGNAL=CONT only pauses or resumes radosgw (outage tests).
DIR=$(realpath -m "${1:?usage: rgw-stop.sh DIR}")
SIG=TERM
[ "${FAST:-0}" = 1 ] && SIG=KILL
ours() {  # pid of daemon $1 if it still runs with DIR's config
  local p
  p=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
  grep -qa -- "$DIR/ceph.conf" "/proc/$p/cmdline" 2>/dev/null || return 1
  echo "$p"
}
if [ -n "${SIGNAL:-}" ]; then
  p=$(ours client.rgw) && kill -"$SIGNAL" "$p"
  exit
fi
stop() {
  local pids=() p n alive
  for n in "$@"; do
    p=$(ours "$n") && kill -$SIG "$p" && pids+=("$p")
  done
  [ ${#pids[@]} = 0 ] && return
  for _ in $(seq 1 100); do
    alive=0
    # A zombie (state Z) has exited; only its parent has not reaped it yet.
    for p in "${pids[@]}"; do
      [[ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" =~ ^[^Z] ]] && alive=1
    done
    [ $alive = 0 ] && return
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null
}
# Reverse start order: the OSD tells the monitor it is leaving.
stop client.rgw
stop osd.0
stop mon.a
[ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
