#!/usr/bin/env bash
# Where the writers of the larger-than-memory load stop (docs/benchmarks.md, "Round 3, step 10"):
# runs pairdb's load alone under the benchmark's memory limit while bpftrace records every
# off-CPU wait over 40 ms of pairdb's threads (with the kernel stack where it slept) and every
# memory-reclaim throttle. The trace goes to /dev/shm (tmpfs): nothing is written to the disk
# being measured. Needs root and bpftrace (`apt-get install bpftrace`).
#
#   scripts/trace-stops.sh                          # the 10M-key load (about 5 minutes)
#   scripts/trace-stops.sh --keys 5000000 --memory-limit-mib 400 --seconds 3   # about 2 minutes
#
# Prints the harness's result line, then the waits grouped by kernel stack, longest first.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bpftrace >/dev/null || { echo "needs bpftrace (apt-get install bpftrace)" >&2; exit 1; }
# BENCH_BIN: a prebuilt harness to trace instead (to compare builds).
bench="${BENCH_BIN:-}"
if [ -z "$bench" ]; then
  scripts/bench-engine.sh --build-only
  bench="$PWD/benchmarks/engine/target/release/pairdb-engine-bench"
fi
out="${TRACE_OUT:-/dev/shm/pairdb-stops.txt}"
program='
tracepoint:sched:sched_switch /strncmp(args->prev_comm, "pairdb-", 7) == 0/ {
  @off[args->prev_pid] = nsecs; @stk[args->prev_pid] = kstack(14);
}
tracepoint:sched:sched_wakeup /@off[args->pid]/ {
  $ms = (nsecs - @off[args->pid]) / 1000000;
  if ($ms > 40 && $ms < 900) {
    printf("OFF %d ms tid %d woken by %s at %d ms\n%s\n", $ms, args->pid, comm, nsecs / 1000000, @stk[args->pid]);
  }
  delete(@off[args->pid]); delete(@stk[args->pid]);
}
tracepoint:vmscan:mm_vmscan_throttled {
  printf("THROTTLED %s/%d at %d ms slept %d us reason %d\n", comm, tid, nsecs / 1000000, args->usec_delayed, args->reason);
}
tracepoint:vmscan:mm_vmscan_lru_shrink_inactive /args->nr_dirty > 0 && args->nr_dirty == args->nr_scanned/ {
  printf("ALLDIRTY %s scanned %d\n", comm, args->nr_scanned);
}
END { clear(@off); clear(@stk); }'
bpftrace -e "$program" > "$out" 2>/dev/null &
tracer=$!
trap 'kill "$tracer" 2>/dev/null || true' EXIT
sleep 3
result=$( (cd benchmarks/engine && "$bench" --only large --stores pairdb "$@") \
  2>&1 >/dev/null | grep -E '^(pairdb:|Error)' || true)
echo "$result"
kill "$tracer" 2>/dev/null || true
wait "$tracer" 2>/dev/null || true
python3 - "$out" "$result" <<'PY'
import collections, json, re, sys
text = open(sys.argv[1]).read()
# The reasons of `mm_vmscan_throttled`: one bit per enum vmscan_throttle_state.
reasons = {1: "writeback", 2: "isolated", 4: "noprogress", 8: "congested"}
throttled = collections.Counter()
for m in re.finditer(r"^THROTTLED (\S+?)/\d+ at \d+ ms slept (\d+) us reason (\d+)", text, re.M):
    if int(m.group(2)) > 0:
        reason = int(m.group(3))
        throttled[(m.group(1), reasons.get(reason, reason))] += 1
print("reclaim sleeps by thread and reason:", {f"{t} {r}": n for (t, r), n in throttled.items()} or "none")
# Reclaim batches whose every page was dirty: on cgroup v1 each such batch (of any size, often
# one page) puts its thread to sleep up to 100 ms (docs/benchmarks.md, "Round 3, step 14").
alldirty = collections.Counter(m.group(1) for m in re.finditer(r"^ALLDIRTY (\S+) scanned", text, re.M))
print("all-dirty reclaim batches by thread:", dict(alldirty) or "none")
waits = collections.defaultdict(list)
offs = []
for block in re.split(r"\n(?=OFF |THROTTLED |ALLDIRTY )", text):
    if not block.startswith("OFF "):
        continue
    head, *stack = block.split("\n")
    frames = [f.strip().split("+")[0] for f in stack if f.strip()][3:9]
    ms = int(head.split()[1])
    woken_at = int(head.split(" at ")[1].split()[0])
    waits[" < ".join(frames) or "(no stack)"].append(ms)
    offs.append((woken_at, ms, head, frames))
for stack, ms in sorted(waits.items(), key=lambda kv: -max(kv[1]))[:12]:
    print(f"{len(ms):5} waits, longest {max(ms):4} ms: {stack}")
# The waits that overlap the load's longest gap (the harness reports when it ended).
line = sys.argv[2]
if line.startswith("pairdb: "):
    result = json.loads(line[len("pairdb: "):])
    end = result.get("longest_gap_end_monotonic_ms")
    gap = result.get("longest_gap_ms", 0)
    if end:
        print(f"waits overlapping the longest gap ({gap:.1f} ms, ended at {end:.0f} ms):")
        for woken_at, ms, head, frames in sorted(offs):
            if woken_at >= end - gap - 20 and woken_at - ms <= end + 20 and "futex" not in " ".join(frames):
                print(f"  {head}: {' < '.join(frames)}")
print("trace:", sys.argv[1])
PY
