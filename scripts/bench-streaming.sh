#!/usr/bin/env bash
# Streaming benchmark (docs/benchmarks.md, "Streaming"): a 3-node cluster (scripts/cluster.sh:
# separate processes, fsync'd logs, RF 3) holding KEYS x VALUE bytes of keys and values
# (2 GiB by default) gains a fourth node three times:
#   1. unthrottled, no foreground load: streaming MB/s and time to active;
#   2. unthrottled, under a steady mixed PUT/GET load at half the cluster's capacity;
#   3. with the senders' stream_rate_limit = THROTTLE, under the same load.
# Between phases the node is removed again and its data deleted. For the loaded phases the
# load runs in WINDOW-second windows while the change runs; the p99 reported is the worst
# window's, against the worst of IDLE_WINDOWS windows of the same load before any change
# (idle), measured SETTLE seconds after loading so the load's compactions are done.
#
#   scripts/bench-streaming.sh                   # about 15 min, 2 GiB
#   KEYS=65536 scripts/bench-streaming.sh         # 512 MiB
#
# Env: KEYS (262144), VALUE (8192 bytes), THROTTLE (the default stream_rate_limit, bytes/s),
# WINDOW (5), IDLE_WINDOWS (6), SETTLE (60), CONCURRENCY (32); ONLY_PHASE1=1 runs phase 1
# PHASE1_RUNS times (default 1) and stops (no capacity or loaded phases). Everything binds to 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${KEYS:-262144}"
VALUE="${VALUE:-8192}"
THROTTLE="${THROTTLE:-8388608}"
WINDOW="${WINDOW:-5}"
SETTLE="${SETTLE:-60}"
IDLE_WINDOWS="${IDLE_WINDOWS:-6}"
CONCURRENCY="${CONCURRENCY:-32}"
ONLY_PHASE1="${ONLY_PHASE1:-0}"
PHASE1_RUNS="${PHASE1_RUNS:-1}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/pairdb-bench-streaming}"
export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18090}"
export BASE_PORT="${BASE_PORT:-17300}"
export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
URL="http://$GATEWAY_ADDR"
BIN=target/release/pairdb
S4_PORT=$((BASE_PORT + 4))
S4_GOSSIP=$((BASE_PORT + 204))
SEEDS="127.0.0.1:$((BASE_PORT + 201)),127.0.0.1:$((BASE_PORT + 202)),127.0.0.1:$((BASE_PORT + 203))"

cargo build --release --locked
rm -rf "$CLUSTER_DIR"
S4_PID=""
stop_s4() {
  if [ -n "$S4_PID" ]; then kill -TERM "$S4_PID" 2>/dev/null || true; wait "$S4_PID" 2>/dev/null || true; fi
  S4_PID=""
}
trap 'stop_s4; scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
bench() { "$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
  --concurrency "$CONCURRENCY" --no-preload --json "$@"; }

start_s4() {
  rm -rf "$CLUSTER_DIR/s4"
  "$BIN" --role=storage --node-id=s4 --listen="127.0.0.1:$S4_PORT" --data-dir="$CLUSTER_DIR/s4" \
    --gossip="127.0.0.1:$S4_GOSSIP" --seeds="$SEEDS" --sync=always \
    >>"$CLUSTER_DIR/logs/s4.log" 2>&1 &
  S4_PID=$!
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$((S4_PORT + 1000))/healthz" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "s4 did not start" >&2; return 1
}

migration() { curl -fsS "$URL/v1/admin/migrations/$1"; }
wait_done() { # migration id
  while :; do
    state="$(migration "$1" | json 'd["state"]')"
    case "$state" in completed) return 0 ;; failed|cancelled) echo "migration $1 $state" >&2; return 1 ;; esac
    sleep 0.5
  done
}

# Polls migration $1 every 0.2 s until it ends; prints "first_byte_time end_time" (epoch s).
watch_stream() {
  local first="" now bytes state
  while :; do
    now="$(date +%s.%N)"
    read -r state bytes <<<"$(migration "$1" | json 'd["state"], d["progress"]["bytes_migrated"]' | tr -d "(),'")"
    if [ -z "$first" ] && [ "${bytes:-0}" -gt 0 ]; then first="$now"; fi
    case "$state" in in_progress|pending) sleep 0.2 ;; *) echo "${first:-$now} $now"; return ;; esac
  done
}

# One addition of s4; with a rate, the load runs in windows until it completed. Prints
# "seconds_to_active bytes mb_per_s worst_window_p99_ms"; MB/s over the streaming itself (first
# byte to completion, not the settle time before it).
add_s4() { # rate (0: no load)
  local rate="$1" started id p99s=() watch="$CLUSTER_DIR/watch"
  started="$(date +%s.%N)"
  id="$(curl -fsS -X POST "$URL/v1/admin/storage-nodes" -H 'Content-Type: application/json' \
    -d "{\"node_id\":\"s4\",\"host\":\"127.0.0.1\",\"port\":$S4_PORT}" | json 'd["migration_id"]')"
  watch_stream "$id" >"$watch" &
  local watcher=$!
  if [ "$rate" -gt 0 ]; then
    while [ "$(migration "$id" | json 'd["state"]')" = in_progress ]; do
      p99s+=("$(bench --workload mixed --rate "$rate" --duration "${WINDOW}s" | json 'd["latency_ms"]["p99"]')")
    done
  fi
  wait "$watcher"
  wait_done "$id"
  local first ended; read -r first ended <"$watch"
  migration "$id" | python3 -c "
import json, sys
m = json.load(sys.stdin)
streamed = m['progress']['bytes_migrated']
mbs = streamed / max($ended - $first, 0.001) / 1e6
p99s = [float(x) for x in '${p99s[*]:-}'.split()]
print(f'{$ended - $started:.1f} {streamed} {mbs:.1f} {max(p99s) if p99s else 0:.2f}')"
}

remove_s4() {
  local id; id="$(curl -fsS -X DELETE "$URL/v1/admin/storage-nodes/s4" | json 'd["migration_id"]')"
  wait_done "$id"
  stop_s4
}

# Phases 1 and 2 stream unthrottled (the default stream_rate_limit is 8 MiB/s).
PAIRDB_STORAGE_STREAM_RATE_LIMIT=0 scripts/cluster.sh start
curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
echo "== loading $KEYS keys of $VALUE bytes"
"$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
  --concurrency "$CONCURRENCY" --workload reads --duration 1s --json >/dev/null
# The load's compactions settle before anything is measured.
sleep "$SETTLE"
if [ "$ONLY_PHASE1" = 1 ]; then
  for run in $(seq 1 "$PHASE1_RUNS"); do
    start_s4
    read -r t1 b1 m1 _ <<<"$(add_s4 0)"
    echo "run $run: unthrottled, no load: ${m1} MB/s (${b1} bytes), active after ${t1} s"
    remove_s4
  done
  exit 0
fi
capacity="$(bench --workload mixed --duration 15s | json 'd["requests_per_second"]')"
half="$(python3 -c "print(max(1, int($capacity / 2)))")"
# Idle is measured the way the changes are: the worst of several windows.
idle=0
for _ in $(seq 1 "$IDLE_WINDOWS"); do
  p="$(bench --workload mixed --rate "$half" --duration "${WINDOW}s" | json 'd["latency_ms"]["p99"]')"
  idle="$(python3 -c "print(max($idle, $p))")"
done
echo "capacity ${capacity} req/s (mixed); load at ${half} req/s: idle p99 ${idle} ms"

start_s4
read -r t1 b1 m1 _ <<<"$(add_s4 0)"
echo "unthrottled, no load: ${m1} MB/s (${b1} bytes), active after ${t1} s"
remove_s4

start_s4
read -r t2 b2 m2 p2 <<<"$(add_s4 "$half")"
echo "unthrottled, under load: ${m2} MB/s, active after ${t2} s, worst-window p99 ${p2} ms (idle ${idle})"
remove_s4

scripts/cluster.sh stop >/dev/null
PAIRDB_STORAGE_STREAM_RATE_LIMIT="$THROTTLE" scripts/cluster.sh start >/dev/null
start_s4
read -r t3 b3 m3 p3 <<<"$(add_s4 "$half")"
echo "throttled at ${THROTTLE} B/s, under load: ${m3} MB/s, active after ${t3} s, worst-window p99 ${p3} ms (idle ${idle})"

python3 - "$idle" "$p2" "$p3" "$m1" <<'PY'
import sys
idle, p_un, p_th, mbs = map(float, sys.argv[1:])
print(f"p99 during/idle: unthrottled {p_un / idle:.2f}x, throttled {p_th / idle:.2f}x; "
      f"unthrottled streaming {mbs:.0f} MB/s (goals: <= 2x throttled, >= 100 MB/s)")
PY
