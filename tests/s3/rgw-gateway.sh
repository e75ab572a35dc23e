#!/bin/bash
# rgw-gateway.sh DIR stop|start -- stops or starts only the radosgw of the
# cluster rgw-start.sh DIR made, leaving its monitor and OSD (and so every
# stored object) running: an S3 outage and its recovery, for tests.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: rgw-gateway.sh DIR stop|start}")
CONF=$DIR/ceph.conf
[ -e "$CONF" ] || { echo "rgw-gateway: no cluster in $DIR" >&2; exit 1; }
PORT=$(sed -n 's/^rgw frontends = beast endpoint=127.0.0.1:\([0-9]*\)$/\1/p' "$CONF")
case "${2:?usage: rgw-gateway.sh DIR stop|start}" in
  stop)
    p=$(cat "$DIR/run/client.rgw.pid" 2>/dev/null) || exit 0
    grep -qa -- "$CONF" "/proc/$p/cmdline" 2>/dev/null || exit 0
    kill -KILL "$p"
    # Gone once the port refuses connections (a zombie has closed it too).
    for _ in $(seq 1 100); do
      curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/" || exit 0
      sleep 0.1
    done
    echo "rgw-gateway: radosgw still answers on $PORT" >&2
    exit 1
    ;;
  start)
    radosgw -c "$CONF" -n client.rgw 2>>"$DIR/log/stderr.log"
    for _ in $(seq 1 240); do
      curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/" && exit 0
      sleep 0.25
    done
    echo "rgw-gateway: radosgw did not come back on $PORT; logs in $DIR/log" >&2
    exit 1
    ;;
  *)
    echo "usage: rgw-gateway.sh DIR stop|start" >&2
    exit 2
    ;;
esac
