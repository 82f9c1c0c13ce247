#!/usr/bin/env bash
# Where the durable-write benchmark's writers wait: the engine benchmark's writes phase (pairdb,
# RocksDB and fjall at 1, 16 and 64 writers, one after the other in one process) under
# `perf sched record`, then `perf sched timehist`, which gives for every time a thread got a CPU
# how long it had slept before ("wait": blocked on a futex or on I/O), how long it then sat
# runnable in a run queue before it ran ("sch delay": waiting for a CPU, not for the store), and
# how long it ran. The harness names each writer thread `{store}-{writers}.{n}`, so each row is
# one store at one writer count. "runnable" is the mean number of that row's writers waiting
# for a CPU at once (sch delay summed over the phase's length); "cpu0 share" is the share of
# that delay spent in CPU 0's run queue (0.5 when both CPUs' queues are alike). Needs root
# (perf) and about 1 GB of temporary space per 2 seconds traced; builds the benchmark
# (scripts/bench-engine.sh --build-only). Output: the benchmark's report, then one table.
#   scripts/sched-delay.sh [--seconds N]    (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
scripts/bench-engine.sh --build-only
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--seconds 2)
perf sched record -o "$out/sched.data" -- \
  benchmarks/engine/target/release/pairdb-engine-bench --only writes "${args[@]}"
perf sched timehist -i "$out/sched.data" >"$out/timehist.txt" 2>/dev/null
python3 - "$out/timehist.txt" <<'EOF'
import collections, sys

# A line: "   12502.193329 [0001]  pairdb-64.3[10462/10349]   0.082   0.035   0.005"
#          time            cpu     task                        wait    sch     run (ms)
rows = collections.defaultdict(list)
for line in open(sys.argv[1], errors="replace"):
    parts = line.split()
    if len(parts) < 6 or "." not in parts[2].split("[")[0]:
        continue
    try:
        t, wait, sch, run = float(parts[0]), float(parts[3]), float(parts[4]), float(parts[5])
    except ValueError:
        continue
    group = parts[2].split("[")[0].split(".")[0]
    if not group.rsplit("-", 1)[-1].isdigit():
        continue
    rows[group].append((t, parts[1], wait, sch, run))


def q(xs, p):
    return xs[min(len(xs) - 1, int(p * len(xs)))]


print("\n### Writers' scheduling (perf sched timehist), by store and writer count\n")
print(
    "| writers | switch-ins | run s | sch delay p50 / p90 / p99 / p99.9 / max ms"
    " | runnable | cpu0 share | wait p99 ms |"
)
print("|---|---|---|---|---|---|---|")
for group in sorted(rows, key=lambda g: (g.split("-")[0], int(g.split("-")[-1]))):
    r = rows[group]
    span = max(x[0] for x in r) - min(x[0] for x in r)
    sch = sorted(x[3] for x in r)
    waits = sorted(x[2] for x in r)
    total_sch = sum(sch)
    cpu0 = sum(x[3] for x in r if x[1] == "[0000]")
    print(
        f"| {group} | {len(r)} | {sum(x[4] for x in r) / 1000:.2f} |"
        f" {q(sch, 0.5):.3f} / {q(sch, 0.9):.3f} / {q(sch, 0.99):.3f} / {q(sch, 0.999):.3f}"
        f" / {sch[-1]:.3f} | {total_sch / 1000 / max(span, 1e-9):.1f} |"
        f" {cpu0 / max(total_sch, 1e-9):.2f} | {q(waits, 0.99):.3f} |"
    )
EOF
