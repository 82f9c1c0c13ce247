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
scripts/bench-engine.sh --build-only
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
  printf("THROTTLED %s/%d at %d ms slept %d us\n", comm, tid, nsecs / 1000000, args->usec_delayed);
}
END { clear(@off); clear(@stk); }'
bpftrace -e "$program" > "$out" 2>/dev/null &
tracer=$!
trap 'kill "$tracer" 2>/dev/null || true' EXIT
sleep 3
(cd benchmarks/engine && ./target/release/pairdb-engine-bench --only large --stores pairdb "$@") \
  2>&1 >/dev/null | grep -E '^(pairdb:|Error)' || true
kill "$tracer" 2>/dev/null || true
wait "$tracer" 2>/dev/null || true
python3 - "$out" <<'PY'
import collections, re, sys
text = open(sys.argv[1]).read()
throttled = collections.Counter(m.group(1) for m in re.finditer(r"^THROTTLED (\S+?)/", text, re.M))
print("reclaim throttles by thread:", dict(throttled) or "none")
waits = collections.defaultdict(list)
for block in re.split(r"\n(?=OFF |THROTTLED )", text):
    if not block.startswith("OFF "):
        continue
    head, *stack = block.split("\n")
    frames = [f.strip().split("+")[0] for f in stack if f.strip()][3:9]
    waits[" < ".join(frames) or "(no stack)"].append(int(head.split()[1]))
for stack, ms in sorted(waits.items(), key=lambda kv: -max(kv[1]))[:12]:
    print(f"{len(ms):5} waits, longest {max(ms):4} ms: {stack}")
print("trace:", sys.argv[1])
PY
