#!/usr/bin/env bash
# Cluster benchmark (../shared/BENCHMARKS.md, section 1): pairdb as separate processes
# (3 storage nodes with fsync'd group-commit logs, 1 coordinator, 1 gateway, RF 3, rate limits
# out of the way) driven by ../shared/bench/pairdb.sh, then a 3-member etcd by
# ../shared/bench/etcd3.sh, in one run; prints pairdb/etcd ratios.
#
#   scripts/bench-cluster.sh                     # REPEAT=2 DURATION=20 (about 12 min)
#   REPEAT=1 DURATION=10 scripts/bench-cluster.sh
#
# Needs etcd, wrk, curl, python3 (../shared/bench/install.sh). Everything binds to 127.0.0.1
# and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="${BENCH_DIR:-../shared/bench}"
export REPEAT="${REPEAT:-2}" DURATION="${DURATION:-20}"
export RESULTS_DIR="${RESULTS_DIR:-/tmp/pairdb-bench-results}"
mkdir -p "$RESULTS_DIR"

source scripts/bench-common.sh
bench_cluster_env /tmp/pairdb-bench-cluster

cargo build --release --locked
rm -rf "$CLUSTER_DIR"
trap 'scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT
scripts/cluster.sh start
curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
PIDS="$(scripts/cluster.sh pids)"

export PAIRDB_TENANT=bench SERVER_PIDS="$PIDS"
marker="$(date +%s)"
CONSISTENCY=quorum WORKLOADS="put get" "$BENCH/pairdb.sh" "$URL"
CONSISTENCY=one WORKLOADS="get" PRELOAD=0 "$BENCH/pairdb.sh" "$URL"
scripts/cluster.sh stop
trap - EXIT

"$BENCH/etcd3.sh"

python3 - "$RESULTS_DIR" "$marker" <<'PY'
import glob, os, re, statistics, sys
results, since = sys.argv[1], float(sys.argv[2])
rows = {}
for path in glob.glob(os.path.join(results, "*.txt")):
    if os.path.getmtime(path) < since:
        continue
    for line in open(path):
        if not line.startswith("WRK_RESULT"):
            continue
        kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
        tag = re.sub(r"_r\d+$", "", kv["tag"])
        rows.setdefault(tag, []).append(kv)
def med(tag, field):
    vals = [float(r[field]) for r in rows.get(tag, [])]
    return statistics.median(vals) if vals else float("nan")
pairs = [("PUT quorum vs etcd PUT", "pairdb_put_quorum", "etcd_put"),
         ("GET quorum vs etcd linearizable", "pairdb_get_quorum", "etcd_range_lin"),
         ("GET one vs etcd serializable", "pairdb_get_one", "etcd_range_ser")]
print("\n| workload | conns | pairdb rps | etcd rps | ratio | pairdb p50 / p99 ms | etcd p50 / p99 ms |")
print("|---|---|---|---|---|---|---|")
for name, p, e in pairs:
    for c in (16, 64):
        pt, et = f"{p}_c{c}", f"{e}_c{c}"
        prps, erps = med(pt, "rps"), med(et, "rps")
        print(f"| {name} | {c} | {prps:,.0f} | {erps:,.0f} | {prps/erps:.2f}x | "
              f"{med(pt,'lat_us_p50')/1000:.2f} / {med(pt,'lat_us_p99')/1000:.2f} | "
              f"{med(et,'lat_us_p50')/1000:.2f} / {med(et,'lat_us_p99')/1000:.2f} |")
PY
