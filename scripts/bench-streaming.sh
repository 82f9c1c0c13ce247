#!/usr/bin/env bash
# Streaming benchmark (docs/benchmarks.md, "Streaming"): a 3-node cluster (scripts/cluster.sh:
# separate processes, fsync'd logs, RF 3) holding KEYS x VALUE bytes of keys and values
# (2 GiB by default) gains a fourth node three times:
#   1. unthrottled, no foreground load: streaming MB/s and time to active;
#   2. unthrottled, under a steady mixed PUT/GET load at half the cluster's sustained capacity;
#   3. with the senders' stream_rate_limit = THROTTLE, under the same load.
# Between phases the node is removed again and its data deleted, and the cluster settles (no
# node flushed or compacted for QUIET seconds, at most SETTLE). A loaded phase runs one
# continuous paced load (`pairdb bench --rate --latency-log`) from IDLE seconds before the
# change to its end, and compares the p99 of the requests due during the change with the p99
# of those due in the IDLE seconds before it. Each change leaves a timeline (scripts/
# timeline.py: CPU per process, flushes and compactions per node each second, and the load's
# p99 per 5 s) in $CLUSTER_DIR/timeline-PHASE.txt.
#
#   scripts/bench-streaming.sh                   # about 20 min, 2 GiB
#   KEYS=65536 scripts/bench-streaming.sh         # 512 MiB
#
# Env: PAIRDB_BIN (a prebuilt binary; without it the release build), KEYS (262144), VALUE
# (8192 bytes), THROTTLE (the default stream_rate_limit, bytes/s), IDLE (60), CAPACITY_SECONDS
# (180: the closed-loop run whose last minute's rate, halved, is the load), PHASES ("1 2 3";
# "0" adds the control: the same load for CONTROL seconds, 300, and no change), PHASE3_BINS
# (binaries to run phase 3 with, one run each, alternating on the same data), AFTER (0: seconds
# the load goes on once a loaded change is over, its p99 printed after the during one), SETTLE (300),
# QUIET (10), CONCURRENCY (32); ONLY_PHASE1=1 runs phase 1 PHASE1_RUNS times (default 1) and
# stops (no capacity or loaded phases), with the joining node's binary taken in turn from
# PHASE1_BINS when set, and prints what the joining node spent (CPU, bytes written to disk). Everything binds to 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${KEYS:-262144}"
VALUE="${VALUE:-8192}"
THROTTLE="${THROTTLE:-8388608}"
SETTLE="${SETTLE:-300}"
IDLE="${IDLE:-60}"
CAPACITY_SECONDS="${CAPACITY_SECONDS:-180}"
PHASES="${PHASES:-1 2 3}"
CONCURRENCY="${CONCURRENCY:-32}"
ONLY_PHASE1="${ONLY_PHASE1:-0}"
PHASE1_RUNS="${PHASE1_RUNS:-1}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/pairdb-bench-streaming}"
export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18090}"
export BASE_PORT="${BASE_PORT:-17300}"
export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
URL="http://$GATEWAY_ADDR"
BIN="${PAIRDB_BIN:-target/release/pairdb}"
export PAIRDB_BIN="$BIN"
S4_PORT=$((BASE_PORT + 4))
S4_GOSSIP=$((BASE_PORT + 204))
SEEDS="127.0.0.1:$((BASE_PORT + 201)),127.0.0.1:$((BASE_PORT + 202)),127.0.0.1:$((BASE_PORT + 203))"

if [ "$BIN" = target/release/pairdb ]; then cargo build --release --locked; fi
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
  "${S4_BIN:-$BIN}" --role=storage --node-id=s4 --listen="127.0.0.1:$S4_PORT" --data-dir="$CLUSTER_DIR/s4" \
    --gossip="127.0.0.1:$S4_GOSSIP" --seeds="$SEEDS" --sync=always \
    --cluster-secret-file="${CLUSTER_SECRET_FILE:-$CLUSTER_DIR/cluster-secret}" \
    >>"$CLUSTER_DIR/logs/s4.log" 2>&1 &
  S4_PID=$!
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$((S4_PORT + 1000))/healthz" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "s4 did not start" >&2; return 1
}

migration() { curl -fsS "$URL/v1/admin/migrations/$1"; }

# start_timeline: scripts/bench-common.sh.
. scripts/bench-common.sh
wait_done() { # migration id
  while :; do
    state="$(migration "$1" | json 'd["state"]')"
    case "$state" in completed) return 0 ;; failed|cancelled) echo "migration $1 $state" >&2; return 1 ;; esac
    sleep 0.5
  done
}

# Polls migration $1 every 0.2 s until it ends; prints "first_byte_time end_time" (epoch s).
# One Python process polls (not a curl and a Python start per poll: five of those a second
# cost the 2-core machine about a twentieth of its CPU during the change, and none before it).
watch_stream() {
  python3 - "$URL/v1/admin/migrations/$1" <<'PY'
import json, sys, time, urllib.request
url, first = sys.argv[1], None
while True:
    now = time.time()
    m = json.load(urllib.request.urlopen(url, timeout=5))
    if first is None and m["progress"]["bytes_migrated"] > 0:
        first = now
    if m["state"] not in ("in_progress", "pending"):
        print(f"{first or now} {now}")
        break
    time.sleep(0.2)
PY
}

# One addition of s4, followed to its end. Prints "seconds_to_active bytes mb_per_s"; MB/s over
# the streaming itself (first byte to completion, not the settle time before it). Leaves a
# timeline in $CLUSTER_DIR/timeline-$TIMELINE_NAME.txt.
add_s4() {
  local started id watch="$CLUSTER_DIR/watch"
  started="$(date +%s.%N)"
  id="$(curl -fsS -X POST "$URL/v1/admin/storage-nodes" -H 'Content-Type: application/json' \
    -d "{\"node_id\":\"s4\",\"host\":\"127.0.0.1\",\"port\":$S4_PORT}" | json 'd["migration_id"]')"
  # `load` (the paced load of loaded_add, when one runs) is sampled too.
  local sampler; sampler="$(start_timeline "$TIMELINE_NAME" "s4=$S4_PID:http://127.0.0.1:$((S4_PORT + 1000))/metrics" ${load:+"load=$load"})"
  watch_stream "$id" >"$watch"
  # What the joining node spent by the time it is active (s4_cost: below).
  s4_cost >"$CLUSTER_DIR/s4-cost-$TIMELINE_NAME"
  kill -TERM "$sampler" 2>/dev/null || true
  wait_done "$id"
  local first ended; read -r first ended <"$watch"
  migration "$id" | python3 -c "
import json, sys
m = json.load(sys.stdin)
streamed = m['progress']['bytes_migrated']
mbs = streamed / max($ended - $first, 0.001) / 1e6
print(f'{$ended - $started:.1f} {streamed} {mbs:.1f}')"
}

# One addition of s4 under a paced mixed load at $1 req/s that runs without a break from IDLE
# seconds before the change (after a 5 s warm-up) to its end. Prints "seconds_to_active bytes
# mb_per_s idle_p99_ms during_p99_ms": the p99 of the requests due in the IDLE seconds before
# the change, and of those due while it ran (request to `active`), both from one latency log
# (`pairdb bench --latency-log`). The timeline gets the p99 of every 5 s.
loaded_add() { # rate
  local log="$CLUSTER_DIR/latencies-$TIMELINE_NAME.txt" idle_from change_at ended result
  # `load` is not local: the EXIT trap below reads it after this function returned.
  # The binary itself in the background (not through the `bench` function, whose subshell
  # would take the signal and leave the load running).
  "$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
    --concurrency "$CONCURRENCY" --no-preload --json --workload mixed --rate "$1" \
    --duration 1h --latency-log "$log" >/dev/null &
  load=$!
  # This function runs in a command substitution's subshell: its own EXIT trap stops the load
  # if the phase fails half-way.
  trap 'kill -TERM "$load" 2>/dev/null || true' EXIT
  sleep 5
  idle_from="$(date +%s.%N)"
  sleep "$IDLE"
  change_at="$(date +%s.%N)"
  if [ -n "${NO_CHANGE:-}" ]; then
    # The control: the same load for as long, with no change.
    local sampler; sampler="$(start_timeline "$TIMELINE_NAME" "load=$load")"
    sleep "$NO_CHANGE"; kill -TERM "$sampler" 2>/dev/null || true
    result="$NO_CHANGE 0 0"
  else
    result="$(add_s4)"
  fi
  ended="$(date +%s.%N)"
  # The load goes on for AFTER seconds once the change is over: what the joining node does
  # once its streams ended (the merge of the runs they stacked) is paid for there.
  local windows="$CLUSTER_DIR/windows-$TIMELINE_NAME.txt"
  printf 'idle %s %s\nduring %s %s\n' "$idle_from" "$change_at" "$change_at" "$ended" >"$windows"
  if [ "${AFTER:-0}" -gt 0 ]; then
    sleep "$AFTER"
    printf 'after %s %s\n' "$ended" "$(date +%s.%N)" >>"$windows"
  fi
  # SIGTERM, not SIGINT: a background job of a script starts with SIGINT ignored.
  kill -TERM "$load"; wait "$load"
  scripts/p99_window.py "$log" --windows "$windows" "$CLUSTER_DIR/timeline-$TIMELINE_NAME.txt" \
    | { read -r p; echo "$result $p"; }
}

remove_s4() {
  local id; id="$(curl -fsS -X DELETE "$URL/v1/admin/storage-nodes/s4" | json 'd["migration_id"]')"
  wait_done "$id"
  stop_s4
}

# Phase 1 and 2 stream unthrottled (the default stream_rate_limit is 8 MiB/s).
PAIRDB_STORAGE_STREAM_RATE_LIMIT=0 scripts/cluster.sh start
curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
echo "== loading $KEYS keys of $VALUE bytes"
"$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
  --concurrency "$CONCURRENCY" --workload reads --duration 1s --json >/dev/null
# The load's flushes and compactions settle before anything is measured.
settle
# What s4 has spent since it started: "cpu_seconds bytes_written_to_disk".
s4_cost() {
  python3 - "$S4_PID" <<'PY'
import os, sys
pid = sys.argv[1]
fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
io = dict(l.split(": ") for l in open(f"/proc/{pid}/io").read().splitlines())
print(f"{cpu:.1f} {int(io['write_bytes'])}")
PY
}

if [ "$ONLY_PHASE1" = 1 ]; then
  # PHASE1_BINS: the joining node's binary for each run, in turn (alternating builds on the
  # same data); without it every run uses S4_BIN or PAIRDB_BIN.
  read -r -a s4_bins <<<"${PHASE1_BINS:-}"
  for run in $(seq 1 "$PHASE1_RUNS"); do
    if [ "${#s4_bins[@]}" -gt 0 ]; then S4_BIN="${s4_bins[$(( (run - 1) % ${#s4_bins[@]} ))]}"; fi
    start_s4
    read -r t1 b1 m1 <<<"$(TIMELINE_NAME="phase1-run$run" add_s4)"
    read -r cpu_active written_active <<<"$(s4_cost)"
    # The joining node's own compactions go on after it is active: 60 s more of them.
    sleep 60
    read -r cpu_after written_after <<<"$(s4_cost)"
    # And once every node, s4 too, has been idle for QUIET seconds (its compactions done).
    settle >/dev/null
    read -r cpu_settled written_settled <<<"$(s4_cost)"
    echo "run $run (${S4_BIN:-$BIN}): unthrottled, no load: ${m1} MB/s (${b1} bytes), active after ${t1} s;" \
      "s4 CPU ${cpu_active} s and ${written_active} bytes written at active, ${cpu_after} s and ${written_after} bytes 60 s later," \
      "${cpu_settled} s and ${written_settled} bytes once settled"
    curl -fsS "http://127.0.0.1:$((S4_PORT + 1000))/metrics" \
      | grep -E '^pairdb_engine_(ingested_tables|ingested_bytes|flush_bytes_written|compaction_bytes_written)\{' || true
    remove_s4
    settle
  done
  exit 0
fi
has_phase() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
m1=0 idle2=0 p2=0 idle3=0 p3=0

if has_phase 1; then
  start_s4
  read -r t1 b1 m1 <<<"$(TIMELINE_NAME=phase1 add_s4)"
  echo "unthrottled, no load: ${m1} MB/s (${b1} bytes), active after ${t1} s"
  remove_s4
fi

# Sustained capacity: a closed-loop run of CAPACITY_SECONDS, counting only its last minute, so
# the flushes and compactions the load causes are paid for in the rate (a 15 s run, before
# them, gave a "half" the cluster could not sustain).
settle
bench --workload mixed --duration "${CAPACITY_SECONDS}s" --latency-log "$CLUSTER_DIR/latencies-capacity.txt" >/dev/null
capacity="$(python3 - "$CLUSTER_DIR/latencies-capacity.txt" <<'PY'
import sys
dues = [int(line.split()[0]) for line in open(sys.argv[1])]
end = max(dues)
print(sum(1 for d in dues if d > end - 60_000_000) / 60)
PY
)"
half="$(python3 -c "print(max(1, int($capacity / 2)))")"
echo "capacity ${capacity} req/s (mixed, the last 60 s of ${CAPACITY_SECONDS} s); load at ${half} req/s"

# Each loaded phase is compared with the same load just before it, once the cluster settled.
# Phase 0 is their control: the same load for CONTROL seconds (300) with no change at all, so
# what the load alone does to its p99 once its flushes and compactions start (about a minute
# in) is not taken for the change's cost.
if has_phase 0; then
  settle
  read -r t0 _ _ idle0 p0 <<<"$(TIMELINE_NAME=phase0 NO_CHANGE="${CONTROL:-300}" loaded_add "$half")"
  echo "no change (control), under load: p99 ${p0} ms in the ${t0} s where a change would run, ${idle0} ms in the ${IDLE} s before"
fi
if has_phase 2; then
  settle
  start_s4
  read -r t2 b2 m2 idle2 p2 <<<"$(TIMELINE_NAME=phase2 loaded_add "$half")"
  echo "unthrottled, under load: ${m2} MB/s, active after ${t2} s, p99 ${p2} ms during, ${idle2} ms in the ${IDLE} s before"
  remove_s4
fi

# PHASE3_BINS="a b a b" runs phase 3 once per binary listed, in that order, on the same data
# (the cluster restarts with each; the load generator stays $BIN): alternating two builds in one
# sitting compares them on a machine whose speed drifts. Default: $BIN once.
if has_phase 3; then
  run=0
  for phase3_bin in ${PHASE3_BINS:-$BIN}; do
    run=$((run + 1))
    if [ "$run" -gt 1 ]; then remove_s4; fi
    scripts/cluster.sh stop >/dev/null
    PAIRDB_BIN="$phase3_bin" PAIRDB_STORAGE_STREAM_RATE_LIMIT="$THROTTLE" scripts/cluster.sh start >/dev/null
    settle
    S4_BIN="$phase3_bin" start_s4
    read -r t3 b3 m3 idle3 p3 after3 <<<"$(TIMELINE_NAME="phase3-run$run" loaded_add "$half")"
    read -r cpu3 written3 <"$CLUSTER_DIR/s4-cost-phase3-run$run"
    read -r cpu3a written3a <<<"$(s4_cost)"
    echo "run $run ($phase3_bin): throttled at ${THROTTLE} B/s, under load: ${m3} MB/s, active after ${t3} s, p99 ${p3} ms during, ${idle3} ms in the ${IDLE} s before${after3:+, ${after3} ms in the ${AFTER} s after};" \
      "s4 CPU ${cpu3} s and ${written3} bytes written at active${after3:+, ${cpu3a} s and ${written3a} bytes ${AFTER} s later}"
  done
fi

python3 - "$idle2" "$p2" "$idle3" "$p3" "$m1" <<'PY'
import sys
idle_un, p_un, idle_th, p_th, mbs = map(float, sys.argv[1:])
ratio = lambda during, idle: f"{during / idle:.2f}x" if idle else "not run"
print(f"p99 during/idle: unthrottled {ratio(p_un, idle_un)}, throttled {ratio(p_th, idle_th)}; "
      f"unthrottled streaming {mbs:.0f} MB/s (goals: <= 2x throttled, >= 100 MB/s)")
PY
