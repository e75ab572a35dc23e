#!/bin/bash
# rgw-start.sh DIR PORT -- starts a throwaway single-node Ceph cluster (one
# monitor, one OSD on memstore, one radosgw) with every file under DIR, S3 on
# http://127.0.0.1:PORT and a user with fixed keys. Prints KEY=VALUE lines
# (S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) on success.
# The monitor takes PORT+1 (MONPORT overrides it); the OSD picks ports in
# 6800-7300. Stop with rgw-stop.sh DIR. Needs ceph-mon ceph-osd radosgw.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: rgw-start.sh DIR PORT}")
PORT=${2:?usage: rgw-start.sh DIR PORT}
MONPORT=${MONPORT:-$((PORT + 1))}
ACCESS=${ACCESS:-kennelaccess}
SECRET=${SECRET:-kennelsecret}
for tool in monmaptool ceph-mon ceph-osd radosgw radosgw-admin ceph uuidgen curl; do
  command -v "$tool" >/dev/null || { echo "rgw-start: $tool is not installed" >&2; exit 3; }
done
if [ -e "$DIR/ceph.conf" ]; then
  echo "rgw-start: $DIR already holds a cluster" >&2
  exit 1
fi
mkdir -p "$DIR"/{mon/a,osd/0,run,log,rgw}
FSID=$(uuidgen)
CONF=$DIR/ceph.conf
cat >"$CONF" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MONPORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
# No cephx: a test cluster on loopback has no keys to manage.
auth cluster required = none
auth service required = none
auth client required = none
# radosgw asks for "secure" mode by default, which needs cephx.
ms mon client mode = crc
auth allow insecure global id reclaim = false
# A nearly full CI disk must not stop the monitor.
mon data avail warn = 2
mon data avail crit = 1
# Each monitor commit waits 1 s by default; radosgw makes about nine at start.
paxos propose interval = 0.05
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
mon data = $DIR/mon/\$id
osd data = $DIR/osd/\$id
keyring = /dev/null
# One OSD: one replica, few placement groups, nothing that waits for more.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
# Objects live in RAM and vanish on stop.
osd objectstore = memstore
memstore device bytes = 4294967296
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
# Deleted objects would stay in RAM for two hours by default.
rgw gc obj min wait = 10
rgw gc processor period = 10
CONF
C=(-c "$CONF")
# A monitor named from "mon host" alone is "noname-a" and clients hang: name it.
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MONPORT]" "$DIR/monmap" >/dev/null
ceph-mon "${C[@]}" -i a --mkfs --monmap "$DIR/monmap" >"$DIR/log/mkfs-mon.log" 2>&1
ceph-mon "${C[@]}" -i a 2>>"$DIR/log/stderr.log"
OSD_UUID=$(uuidgen)
ID=$(timeout 60 ceph "${C[@]}" --connect-timeout 30 osd new "$OSD_UUID")
ceph-osd "${C[@]}" -i "$ID" --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/mkfs-osd.log" 2>&1
ceph-osd "${C[@]}" -i "$ID" 2>>"$DIR/log/stderr.log"
radosgw "${C[@]}" -n client.rgw 2>>"$DIR/log/stderr.log"
# An anonymous ListBuckets answers 200 once the gateway serves.
for i in $(seq 1 240); do
  curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/" && break
  if [ "$i" = 240 ]; then
    echo "rgw-start: radosgw did not answer on port $PORT; logs in $DIR/log" >&2
    exit 1
  fi
  sleep 0.25
done
timeout 60 radosgw-admin "${C[@]}" user create --uid=kennel --display-name=kennel \
  --access-key="$ACCESS" --secret-key="$SECRET" >"$DIR/log/user.json"
echo "S3_ENDPOINT=http://127.0.0.1:$PORT"
echo "AWS_ACCESS_KEY_ID=$ACCESS"
echo "AWS_SECRET_ACCESS_KEY=$SECRET"
