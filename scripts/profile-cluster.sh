#!/usr/bin/env bash
# Where the time goes, per role: the cluster of scripts/bench-cluster.sh (3 storage nodes with
# fsync'd logs, 1 coordinator, 1 gateway, RF 3) under one wrk workload, sampled by
# `perf record -a` (every CPU, every process) while the load runs; prints each role's share of
# the machine, how much of it is kernel time, its busiest threads and its top functions.
#
#   scripts/profile-cluster.sh                          # PUT quorum, 16 connections, 15 s
#   WORKLOAD=get CONSISTENCY=one CONNS=64 scripts/profile-cluster.sh
#
# Env: WORKLOAD (put|get) CONSISTENCY (quorum) CONNS (16) SECONDS_PROFILED (15) FREQ (999)
#      KEYSPACE (100000) TOP (12) PROFILE_DIR (/tmp/pairdb-profile: perf.data and the report)
# Needs perf (linux-perf), wrk, curl, python3; root or perf_event_paranoid <= 0 for -a.
# Everything binds to 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in perf wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (../shared/bench/install.sh, apt-get install linux-perf)" >&2; exit 1; }
done
BENCH="${BENCH_DIR:-../shared/bench}"
WORKLOAD="${WORKLOAD:-put}"
CONSISTENCY="${CONSISTENCY:-quorum}"
CONNS="${CONNS:-16}"
SECONDS_PROFILED="${SECONDS_PROFILED:-15}"
FREQ="${FREQ:-999}"
TOP="${TOP:-12}"
export KEYSPACE="${KEYSPACE:-100000}" VALUE_SIZE="${VALUE_SIZE:-100}"
export CONSISTENCY PAIRDB_PATH=/v1/key-value
OUT="${PROFILE_DIR:-/tmp/pairdb-profile}"
mkdir -p "$OUT"

source scripts/bench-common.sh
bench_cluster_env /tmp/pairdb-profile-cluster
case "$WORKLOAD" in put|get) ;; *) echo "WORKLOAD must be put or get" >&2; exit 2 ;; esac

cargo build --release --locked
rm -rf "$CLUSTER_DIR"
WRK_PID=""
cleanup() {
  if [ -n "$WRK_PID" ]; then kill "$WRK_PID" 2>/dev/null || true; fi
  scripts/cluster.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
scripts/cluster.sh start
curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
PAIRDB_TENANT=bench python3 "$BENCH/preload.py" pairdb "$URL" --keyspace "$KEYSPACE" \
  --value-size "$VALUE_SIZE" --consistency "$CONSISTENCY" --path "$PAIRDB_PATH" \
  --concurrency 16 --max-seconds 300

# The load runs 3 s before and 2 s after the sampled window, so the profile sees steady state.
PAIRDB_TENANT=bench wrk -t2 -c"$CONNS" -d"$((SECONDS_PROFILED + 5))s" --timeout 10s --latency \
  -s "$BENCH/wrk/pairdb_${WORKLOAD}.lua" "$URL" >"$OUT/wrk.txt" 2>&1 &
WRK_PID=$!
sleep 3
perf record -a -F "$FREQ" -o "$OUT/perf.data" -- sleep "$SECONDS_PROFILED" 2>"$OUT/perf-record.log"
wait "$WRK_PID" || true
WRK_PID=""

# Which pid plays which role, from the cluster's pid files.
: >"$OUT/roles.txt"
for f in "$CLUSTER_DIR"/pids/*.pid; do
  name="$(basename "$f" .pid)"
  case "$name" in s*) role="storage" ;; c*) role="coordinator" ;; gw*) role="gateway" ;; *) role="$name" ;; esac
  echo "$(cat "$f") $role $name" >>"$OUT/roles.txt"
done
perf script -i "$OUT/perf.data" -F pid,tid,comm,ip,sym,dso 2>/dev/null >"$OUT/samples.txt"

python3 - "$OUT/roles.txt" "$OUT/samples.txt" "$OUT/wrk.txt" "$TOP" \
  "$WORKLOAD" "$CONSISTENCY" "$CONNS" "$SECONDS_PROFILED" <<'PY' | tee "$OUT/report.md"
import collections, os, re, sys
roles_path, samples_path, wrk_path, top = sys.argv[1:5]
workload, consistency, conns, seconds = sys.argv[5:9]
top = int(top)
roles = {}
for line in open(roles_path):
    pid, role, _name = line.split()
    roles[int(pid)] = role

# perf script lines: "comm  pid/tid  ip sym (dso)" with -F pid,tid,comm,ip,sym,dso.
pat = re.compile(r"^\s*(\S.*?)\s+(\d+)/(\d+)\s+(.*)$")
total = 0
by_group = collections.Counter()
kernel = collections.Counter()
threads = collections.defaultdict(collections.Counter)
syms = collections.defaultdict(collections.Counter)
for line in open(samples_path, errors="replace"):
    m = pat.match(line.rstrip("\n"))
    if not m:
        continue
    comm, pid, rest = m.group(1), int(m.group(2)), m.group(4).strip()
    rest = re.sub(r"^[0-9a-f]+\s*", "", rest)
    total += 1
    if pid in roles:
        group = roles[pid]
    elif pid == 0:
        group = "idle"
    elif comm.startswith("wrk"):
        group = "wrk (load generator)"
    elif comm.startswith("kworker") or comm.startswith("jbd2") or comm.startswith("ksoftirq"):
        group = "kernel workers (" + re.sub(r"[/:].*", "", comm) + ")"
    else:
        group = "other (" + comm + ")"
    by_group[group] += 1
    dm = re.search(r"\(([^()]*)\)\s*$", rest)
    dso = dm.group(1) if dm else "?"
    sym = rest[: dm.start()].strip() if dm else rest
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
    if sym in ("", "[unknown]"):
        sym = "[unknown in " + dso.rsplit("/", 1)[-1] + "]"
    if "kernel" in dso or dso.startswith("[") and dso != "[unknown]":
        kernel[group] += 1
        sym = "k:" + sym
    threads[group][re.sub(r"[-_]?\d+$", "", comm)] += 1
    syms[group][sym] += 1

wrk = open(wrk_path).read()
rps = re.search(r"Requests/sec:\s*([\d.]+)", wrk)
p99 = re.search(r"^\s*99%\s+(\S+)", wrk, re.M)
print(f"### Profile: {workload.upper()} {consistency}, {conns} connections, {seconds} s sampled")
print()
print(f"wrk: {float(rps.group(1)) if rps else float('nan'):,.0f} req/s, p99 {p99.group(1) if p99 else '?'} "
      f"(over the whole {int(seconds) + 5} s run); {total:,} samples on {os.cpu_count()} CPUs")
print()
print("| who | share of all CPU | of it kernel | busiest threads |")
print("|---|---|---|---|")
for group, n in by_group.most_common():
    th = ", ".join(f"{t} {c / n:.0%}" for t, c in threads[group].most_common(3))
    print(f"| {group} | {n / total:.1%} | {kernel[group] / n:.0%} | {th} |")
for role in ("storage", "coordinator", "gateway"):
    n = by_group.get(role, 0)
    if not n:
        continue
    print()
    print(f"Top functions of the {role} role ({n / total:.1%} of all CPU; k: = kernel), share of the role:")
    print()
    print("| function | share |")
    print("|---|---|")
    for sym, c in syms[role].most_common(top):
        print(f"| `{sym[:90]}` | {c / n:.1%} |")
PY
echo "perf data and report in $OUT"
