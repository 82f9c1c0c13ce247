#!/usr/bin/env bash
# Anti-entropy benchmark (docs/benchmarks.md, "Anti-entropy"): a tenant at RF 2 on the 3-node
# cluster of scripts/cluster.sh (each range has two replicas), KEYS keys of VALUE bytes.
#   1. identical replicas: one repair; its time and the bytes it exchanged;
#   2. s3 paused (SIGSTOP, hints off) while DIVERGE keys are written at ONE (those whose
#      replicas include s3 differ, about 1% of KEYS by default), resumed: one repair; time,
#      keys fixed, bytes exchanged;
#   3. s3 stopped, its data deleted, restarted empty: one repair refills it. The records it
#      writes (`bytes_written`) are what any full copy of s3's data sends; its time is the
#      full copy's.
# Each repair runs unpaced (repair_rate_limit = 0). Output: a markdown table on stdout.
# With LOAD_RATE set, each repair instead runs paced (the default repair_rate_limit, or
# REPAIR_RATE_LIMIT bytes/s) under a paced mixed load of LOAD_RATE req/s that runs from IDLE
# seconds before the repair to its end; the table adds the load's p99 in the IDLE seconds
# before and during the repair (scripts/p99_window.py), and each phase leaves a timeline
# (CPU per process, flushes and compactions each second, p99 per 5 s) in
# $CLUSTER_DIR/timeline-NAME.txt. Loaded, phases 1 and 2 alternate CYCLES (4) idle windows
# of IDLE seconds with CYCLES repair windows, and the p99s are of each kind of window pooled
# (one idle-then-repair pair is at the mercy of this machine's stalls): in phase 1 repairs of
# agreeing replicas run back to back for WINDOW seconds (30) per window; in phase 2 each
# window repairs one of CYCLES equal arcs of the ring. The refill is one window, cancelled
# after REFILL_WINDOW seconds (60).
# LOAD_RATE=auto is half the capacity of a 60 s closed-loop mixed run (its last 30 s) made
# after loading.
# Env: KEYS (1000000), VALUE (100), DIVERGE (15000), PAIRDB_BIN (built when unset), LOAD_RATE,
# REPAIR_RATE_LIMIT, IDLE (20), WINDOW (30), CYCLES (4), CONCURRENCY (32, of the load), PHASES ("1 2 3": which of the
# three repairs run; the others' rows are empty).
# Everything binds to 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${KEYS:-1000000}"
VALUE="${VALUE:-100}"
DIVERGE="${DIVERGE:-15000}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/pairdb-bench-repair}"
export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18190}"
export BASE_PORT="${BASE_PORT:-17500}"
export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
export PAIRDB_COORDINATOR_HINTS_ENABLED=false PAIRDB_COORDINATOR_READ_REPAIR_CHANCE=0
export PAIRDB_COORDINATOR_AUTO_REPAIR=false
LOAD_RATE="${LOAD_RATE:-0}"
PHASES="${PHASES:-1 2 3}"
has_phase() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
IDLE="${IDLE:-20}"
WINDOW="${WINDOW:-30}"
CYCLES="${CYCLES:-4}"
REFILL_WINDOW="${REFILL_WINDOW:-60}"
CONCURRENCY="${CONCURRENCY:-32}"
if [ "$LOAD_RATE" = 0 ]; then
  export PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT=0
elif [ -n "${REPAIR_RATE_LIMIT:-}" ]; then
  export PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT="$REPAIR_RATE_LIMIT"
fi
URL="http://$GATEWAY_ADDR"
BIN="${PAIRDB_BIN:-target/release/pairdb}"
export PAIRDB_BIN="$BIN"
if [ "$BIN" = target/release/pairdb ]; then cargo build --release --locked; fi
rm -rf "$CLUSTER_DIR"
trap 'kill -CONT "$(cat "$CLUSTER_DIR/pids/s3.pid" 2>/dev/null)" 2>/dev/null || true; scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT

bench() { "$BIN" bench --url "$URL" --tenant bench --value-size "$VALUE" --concurrency 32 --json "$@"; }
metric() { # port, name: the value of one metric line of a process's /metrics
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'
}
coordinator_http=$((BASE_PORT + 101 + 1000))
gossip_says() { # count of nodes down to wait for
  for _ in $(seq 1 300); do
    [ "$(metric "$coordinator_http" pairdb_storage_nodes_down)" = "$1" ] && return 0
    sleep 0.2
  done
  echo "gossip never reported $1 node(s) down" >&2; return 1
}

# The harness stays off the CPU while it measures (2 cores; a python3 start per poll took
# 20% of the machine in earlier runs and showed as the repair's cost): bash arithmetic on
# $EPOCHREALTIME and sed, and polls every 0.5 s, as `pairdb admin repair --wait` does.
now_us() { local t="$EPOCHREALTIME"; echo "${t/./}"; }
seconds_since() { # start (us): elapsed seconds with two decimals
  local d=$(($(now_us) - $1))
  printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000))
}
field_of() { sed -nE "s/.*\"$1\":\"?([^\",}]*)\"?.*/\1/p"; } # one JSON field, flat objects

# One repair: prints "seconds keys_compared keys_fixed bytes bytes_written". With a limit
# ($1 seconds), a repair still running then is cancelled and its counts so far are printed
# (bytes_written "-").
repair() {
  local started id state limit_us=$((${1:-0} * 1000000)) answer
  started="$(now_us)"
  id="$(curl -fsS -X POST "$URL/v1/admin/repair" -H 'content-type: application/json' \
    -d "${REPAIR_BODY:-{\}}" | field_of repair_id)"
  while :; do
    answer="$(curl -fsS "$URL/v1/admin/repair/$id")"
    state="$(field_of state <<<"$answer")"
    case "$state" in
      completed|cancelled) break ;;
      failed) echo "repair $id failed" >&2; return 1 ;;
    esac
    if [ "$limit_us" != 0 ] && [ $(($(now_us) - started)) -ge "$limit_us" ]; then
      curl -fsS -X DELETE "$URL/v1/admin/migrations/$id" >/dev/null
      limit_us=0
    fi
    sleep 0.5
  done
  local took line
  took="$(seconds_since "$started")"
  if [ "$state" = completed ]; then
    line="$(grep "repair completed" "$CLUSTER_DIR/logs/c1.log" | grep "$id" | tail -1)"
    field() { sed -E "s/.*$1=([0-9]+).*/\1/" <<<"$line"; }
    echo "$took $(field keys_compared) $(field keys_fixed) $(field ' bytes') $(field bytes_written)"
  else
    echo "$took $(field_of keys_compared <<<"$answer") $(field_of keys_fixed <<<"$answer")" \
      "$(field_of bytes_exchanged <<<"$answer") -"
  fi
}

# Repairs back to back for $1 seconds (replicas that agree: each is short); prints the last
# one's line with the time of them all.
repeated_repairs() {
  local started line n=0
  started="$(now_us)"
  while [ $(($(now_us) - started)) -lt $(($1 * 1000000)) ]; do
    line="$(repair)"
    n=$((n + 1))
  done
  echo "$n" >>"$CLUSTER_DIR/repairs-in-window"
  echo "$(seconds_since "$started") $(cut -d' ' -f2- <<<"$line")"
}

# start_timeline: scripts/bench-common.sh.
. scripts/bench-common.sh

# Runs "$2..." (a repair command), under the paced load when LOAD_RATE is set: prints its
# line, then (loaded) "idle_p99_ms during_p99_ms". $1 names the latency log and timeline.
# Loaded, the command runs CYCLES_OF_PHASE times (CYCLE=1..CYCLES_NOW in its environment), each after an
# idle window of IDLE seconds; the p99s are of the idle windows pooled and of the command's
# windows pooled (scripts/p99_window.py --windows), and the line printed sums the runs'
# fields.
measured() {
  local name="$1"; shift
  if [ "$LOAD_RATE" = 0 ]; then "$@"; return; fi
  local log="$CLUSTER_DIR/latencies-$name.txt" windows="$CLUSTER_DIR/windows-$name.txt"
  local cycles="${CYCLES_OF_PHASE:-1}" a b e results=()
  # The binary itself in the background (a function's subshell would take the signal).
  "$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
    --concurrency "$CONCURRENCY" --no-preload --json --workload mixed --rate "$LOAD_RATE" \
    --duration 1h --latency-log "$log" >/dev/null &
  load=$!
  # `load` and `sampler` are not local: the EXIT trap reads them after this function returned.
  sampler="$(start_timeline "$name")"
  trap 'kill -TERM "$load" "$sampler" 2>/dev/null || true' EXIT
  : >"$windows"
  sleep 5
  for c in $(seq 1 "$cycles"); do
    a="$EPOCHREALTIME"
    sleep "$IDLE"
    b="$EPOCHREALTIME"
    results+=("$(CYCLE="$c" CYCLES_NOW="$cycles" "$@")")
    e="$EPOCHREALTIME"
    echo "idle $a $b" >>"$windows"
    echo "during $b $e" >>"$windows"
  done
  # The sampler is not this shell's child (started in a command substitution): no wait.
  kill -TERM "$load" "$sampler"; wait "$load" || true
  local p
  p="$(scripts/p99_window.py "$log" --windows "$windows" "$CLUSTER_DIR/timeline-$name.txt")"
  echo "$(printf '%s\n' "${results[@]}" | sum_fields) $p"
}

# Sums lines of space-separated fields column by column ("-" where any line has one).
sum_fields() {
  python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
out = []
for col in zip(*rows):
    if "-" in col:
        out.append("-")
    else:
        total = sum(float(x) for x in col)
        out.append(f"{total:.2f}" if any("." in x for x in col) else str(int(total)))
print(" ".join(out))'
}

# The repair of arc CYCLE of CYCLES_NOW equal arcs of the ring (the whole ring unloaded, when
# `measured` runs it once without setting them).
arc_repair() {
  local cycles="${CYCLES_NOW:-1}" c="${CYCLE:-1}"
  if [ "$cycles" = 1 ]; then repair; return; fi
  REPAIR_BODY="$(python3 -c "
n, c = $cycles, $c
print('{\"range_start\":\"%d\",\"range_end\":\"%d\"}' % ((c - 1) * 2**64 // n, (c * 2**64 // n) % 2**64))")" repair
}

scripts/cluster.sh start >&2
curl -fsS -X POST "$URL/v1/tenants" -H 'content-type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":2}' >/dev/null
echo "loading $KEYS keys of $VALUE bytes at RF 2" >&2
bench --workload reads --keys "$KEYS" --duration 1s >/dev/null

if [ "$LOAD_RATE" = auto ]; then
  "$BIN" bench --url "$URL" --tenant bench --keys "$KEYS" --value-size "$VALUE" \
    --concurrency "$CONCURRENCY" --no-preload --json --workload mixed --duration 60s \
    --latency-log "$CLUSTER_DIR/latencies-capacity.txt" >/dev/null
  capacity="$(python3 - "$CLUSTER_DIR/latencies-capacity.txt" <<'PY'
import sys
dues = [int(line.split()[0]) for line in open(sys.argv[1])]
end = max(dues)
print(sum(1 for d in dues if d > end - 30_000_000) / 30)
PY
)"
  LOAD_RATE="$(python3 -c "print(max(1, int($capacity / 2)))")"
  echo "capacity $capacity req/s (mixed, the last 30 s of 60 s); load at $LOAD_RATE req/s" >&2
fi
t1=- c1=- f1=- b1=- w1=- i1=0 d1=0 t2=- c2=- f2=- b2=0 w2=- i2=0 d2=0 t3=- c3=- f3=- b3=- w3=1 i3=0 d3=0
if has_phase 1; then
    if [ "$LOAD_RATE" = 0 ]; then
    read -r t1 c1 f1 b1 w1 i1 d1 <<<"$(repair)"
  else
    # Replicas that agree take a moment to repair: repairs run back to back for WINDOW s.
    read -r t1 c1 f1 b1 w1 i1 d1 <<<"$(CYCLES_OF_PHASE="$CYCLES" measured identical repeated_repairs "$WINDOW")"
  fi
fi

if has_phase 2; then
  kill -STOP "$(cat "$CLUSTER_DIR/pids/s3.pid")"
  gossip_says 1
  bench --workload writes --keys "$DIVERGE" --no-preload --consistency one --duration 10s >/dev/null
  kill -CONT "$(cat "$CLUSTER_DIR/pids/s3.pid")"
  gossip_says 0
  read -r t2 c2 f2 b2 w2 i2 d2 <<<"$(CYCLES_OF_PHASE="$CYCLES" measured divergent arc_repair)"
fi

if has_phase 3; then
  kill -TERM "$(cat "$CLUSTER_DIR/pids/s3.pid")"
  while kill -0 "$(cat "$CLUSTER_DIR/pids/s3.pid")" 2>/dev/null; do sleep 0.2; done
  rm -rf "$CLUSTER_DIR/s3"
  # s3 again, as scripts/cluster.sh starts it, with an empty data directory.
  "$BIN" --role=storage --node-id=s3 --listen="127.0.0.1:$((BASE_PORT + 3))" \
    --data-dir="$CLUSTER_DIR/s3" --gossip="127.0.0.1:$((BASE_PORT + 203))" \
    --seeds="127.0.0.1:$((BASE_PORT + 201)),127.0.0.1:$((BASE_PORT + 202))" --sync=always \
    --cluster-secret-file="${CLUSTER_SECRET_FILE:-$CLUSTER_DIR/cluster-secret}" \
    >>"$CLUSTER_DIR/logs/s3.log" 2>&1 &
  echo $! >"$CLUSTER_DIR/pids/s3.pid"
  until curl -fsS -o /dev/null "http://127.0.0.1:$((BASE_PORT + 1003))/healthz" 2>/dev/null; do sleep 0.2; done
  # Gossip sees it up again, and the coordinator's health checks reach it.
  sleep 5
  gossip_says 0
    if [ "$LOAD_RATE" = 0 ]; then
    read -r t3 c3 f3 b3 w3 i3 d3 <<<"$(repair)"
  else
    # Loaded, the refill is measured for REFILL_WINDOW s at most, then cancelled.
    read -r t3 c3 f3 b3 w3 i3 d3 <<<"$(measured refill repair "$REFILL_WINDOW")"
  fi
fi

ratio() { python3 -c "print(f'{$2 / $1:.2f}x' if $1 > 0 else '-')"; }
if [ "$LOAD_RATE" = 0 ]; then
  cat <<TABLE
| repair | time (s) | keys compared | keys fixed | bytes exchanged | records written |
|---|---|---|---|---|---|
| identical replicas | $t1 | $c1 | $f1 | $b1 | $w1 |
| s3 missed $DIVERGE keys' writes | $t2 | $c2 | $f2 | $b2 | $w2 |
| s3 empty (full copy) | $t3 | $c3 | $f3 | $b3 | $w3 |

Divergent repair against a full copy: $(python3 -c "print(f'{$b2 / $w3 * 100:.2f}% of the bytes, {$t2 / $t3 * 100:.1f}% of the time')").
TABLE
else
  cat <<TABLE
Under a paced mixed load of $LOAD_RATE req/s (concurrency $CONCURRENCY), repair_rate_limit ${PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT:-default}:

| repair | time (s) | keys fixed | bytes exchanged | load p99 idle (ms) | load p99 during (ms) | during / idle |
|---|---|---|---|---|---|---|
| identical replicas ($(awk '{ n += $1 } END { print n + 0 }' "$CLUSTER_DIR/repairs-in-window" 2>/dev/null) back to back in $CYCLES windows of $WINDOW s; the last ones' keys and bytes) | $t1 | $f1 | $b1 | $i1 | $d1 | $(ratio "$i1" "$d1") |
| s3 missed $DIVERGE keys' writes (repaired in $CYCLES arcs, one per window) | $t2 | $f2 | $b2 | $i2 | $d2 | $(ratio "$i2" "$d2") |
| s3 empty (full copy; cancelled after $REFILL_WINDOW s) | $t3 | $f3 | $b3 | $i3 | $d3 | $(ratio "$i3" "$d3") |
TABLE
fi
