# Shell functions the cluster benchmarks share (sourced, not run). They need CLUSTER_DIR (the
# scripts/cluster.sh directory) and BASE_PORT (bench_cluster_env sets both).

# The benchmark cluster's settings, which scripts/cluster.sh reads: its directory (the caller's
# CLUSTER_DIR, else $1), a gateway address and ports away from cluster.sh's defaults, fsync'd
# commit logs, no auth, rate limits out of the way. Sets URL (the gateway's).
bench_cluster_env() { # default_cluster_dir
  export CLUSTER_DIR="${CLUSTER_DIR:-$1}"
  export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18080}"
  export BASE_PORT="${BASE_PORT:-17100}"
  export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
  URL="http://$GATEWAY_ADDR"
}

# Samples every process of the cluster (and the extra "name=pid[:metrics_url]" arguments) once
# a second into $CLUSTER_DIR/timeline-NAME.txt (scripts/timeline.py: CPU per process, the
# storage engines' flushes and compactions); prints the sampler's pid.
start_timeline() { # name [extra ...]
  local args=() name f out="$CLUSTER_DIR/timeline-$1.txt"
  shift
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    name="$(basename "$f" .pid)"
    case "$name" in
      s[1-3]) args+=("$name=$(cat "$f"):http://127.0.0.1:$((BASE_PORT + ${name#s} + 1000))/metrics") ;;
      *) args+=("$name=$(cat "$f")") ;;
    esac
  done
  python3 scripts/timeline.py "$out" "${args[@]}" "$@" >/dev/null 2>&1 &
  echo $!
}

# Waits until no storage node (s1..s4 of BASE_PORT) flushed or compacted for QUIET seconds (at
# most SETTLE), so a phase starts without the previous one's compaction debt.
settle() {
  python3 - "$SETTLE" "${QUIET:-10}" "$BASE_PORT" <<'PY'
import re, sys, time, urllib.request
limit, quiet, base = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def work():
    total = 0.0
    for i in (1, 2, 3, 4):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{base + i + 1000}/metrics", timeout=1).read().decode()
        except OSError:
            continue
        for m in re.finditer(r'^pairdb_engine_(?:flushes|compaction_bytes_written)\{[^}]*\} ([0-9.eE+-]+)$', text, re.M):
            total += float(m.group(1))
    return total
start = time.monotonic(); last = work(); still = time.monotonic()
while time.monotonic() - start < limit:
    time.sleep(1)
    now = work()
    if now != last:
        last, still = now, time.monotonic()
    elif time.monotonic() - still >= quiet:
        break
print(f"settled after {time.monotonic() - start:.0f} s", file=sys.stderr)
PY
}
