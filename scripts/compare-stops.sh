#!/usr/bin/env bash
# Compares two builds of the engine harness on the writers' reclaim sleeps under the
# larger-than-memory load (docs/benchmarks.md, "Round 3, step 14"): runs
# `scripts/trace-stops.sh` with each harness in turn, PAIRS times (A, B, A, B, ...), and prints
# a line per run. One build's spread is wide (1 to 10 writer sleeps per 5M-key load), so
# compare counts over several pairs, never one run. Needs root and bpftrace, like trace-stops.sh.
#
#   scripts/compare-stops.sh /tmp/bench-old /tmp/bench-new            # 5 pairs, 5M keys, 400 MiB
#   PAIRS=3 scripts/compare-stops.sh A B --keys 10000000 --seconds 3  # other harness arguments
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 HARNESS_A HARNESS_B [harness arguments]" >&2; exit 2; }
a="$1"
b="$2"
shift 2
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--keys 5000000 --memory-limit-mib 400 --seconds 3)
echo "build | writes/s | longest gap ms | longest log fsync ms | writer reclaim sleeps | all-dirty batches (writers / other threads)"
for _ in $(seq 1 "${PAIRS:-5}"); do
  for bin in "$a" "$b"; do
    BENCH_BIN="$bin" scripts/trace-stops.sh "${args[@]}" 2>&1 | python3 -c '
import ast, json, sys
name = sys.argv[1]
lines = sys.stdin.read().splitlines()
result = {}
counts = {"reclaim sleeps": {}, "all-dirty reclaim": {}}
for line in lines:
    if line.startswith("pairdb: {"):
        result = json.loads(line[len("pairdb: "):])
    for key in counts:
        if line.startswith(key) and line.endswith("}"):
            counts[key] = ast.literal_eval(line[line.index("{"):])
# Writer threads carry the harness binary name; the engine names its own threads pairdb-*.
def split(table):
    writers = sum(n for t, n in table.items() if not t.startswith("pairdb-"))
    return writers, sum(table.values()) - writers
sleeps, _ = split(counts["reclaim sleeps"])
dirty_w, dirty_o = split(counts["all-dirty reclaim"])
ops, gap, sync = (result.get(k, 0) for k in ("load_ops", "longest_gap_ms", "longest_log_sync_ms"))
print(f"{name} | {ops:,.0f} | {gap:.1f} | {sync:.1f} | {sleeps} | {dirty_w} / {dirty_o}")
' "$bin"
  done
done
