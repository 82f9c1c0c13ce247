#!/usr/bin/env bash
# How long each store's log syncs take in the durable-write benchmark: the engine benchmark's
# writes phase (pairdb, RocksDB and fjall at 1, 16 and 64 writers, one after the other in one
# process) under `perf trace`, which times every fdatasync/fsync/sync_file_range system call of
# every thread. The harness names each writer thread `{store}-{writers}.{n}`, so calls are
# charged to the store and writer count whose writer made them; the stores' own threads
# (flushes, compactions, pairdb's log syncer) are listed under their thread names, which the
# kernel cuts to 15 characters ("pairdb-engine-"), all writer counts together. The same
# instrument measures every store, outside their code. Needs root (perf) and the benchmark's
# build (scripts/bench-engine.sh --build-only, which this runs). Output: the benchmark's
# report, then one table of sync latencies.
#   scripts/trace-log-syncs.sh [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
scripts/bench-engine.sh --build-only
perf trace -e fdatasync,fsync,sync_file_range -o "$out/trace.txt" -- \
  benchmarks/engine/target/release/pairdb-engine-bench --only writes "$@"
python3 - "$out/trace.txt" <<'EOF'
import collections, re, sys

# A line: "  1234.567 ( 0.845 ms): pairdb-64.3/12345 fdatasync(fd: 7) = 0"
line_re = re.compile(r"\(\s*([0-9.]+) ms\): (.+?)/\d+ (\w+)\(")
calls = collections.defaultdict(list)
for line in open(sys.argv[1], errors="replace"):
    m = line_re.search(line)
    if not m:
        continue
    ms, thread, syscall = float(m.group(1)), m.group(2), m.group(3)
    if ms > 60_000:  # a call still running when the trace ended: perf prints garbage
        continue
    group = thread.split(".")[0] if "." in thread else thread
    calls[(group, syscall)].append(ms)


def q(xs, p):
    return xs[min(len(xs) - 1, int(p * len(xs)))]


print("\n### Sync system calls (perf trace), by the thread that made them\n")
print("| thread | call | calls | p50 ms | p90 ms | p99 ms | max ms | total s |")
print("|---|---|---|---|---|---|---|---|")
for (group, syscall), xs in sorted(calls.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    xs.sort()
    print(
        f"| {group} | {syscall} | {len(xs)} | {q(xs, 0.5):.3f} | {q(xs, 0.9):.3f} |"
        f" {q(xs, 0.99):.3f} | {xs[-1]:.3f} | {sum(xs) / 1000:.2f} |"
    )
EOF
