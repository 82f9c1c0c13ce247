#!/usr/bin/env bash
# The cost of mutual TLS between roles (docs/security.md): the cluster benchmark's pairdb half
# (../shared/bench/pairdb.sh: PUT and GET at quorum, RF 3, c16/c64) run twice in one go, on
# the same machine, against `scripts/cluster.sh` without TLS and with TLS=1 (every internal
# hop over mTLS; the gateway stays plain HTTP, which wrk drives), alternating ROUNDS times
# (plain, mTLS, plain, mTLS, ...: run-to-run noise on this machine is +-30%). Prints the
# medians and the TLS/plain ratios.
#
#   scripts/bench-tls.sh                      # ROUNDS=2 REPEAT=1 DURATION=20 (about 14 min)
#   ROUNDS=2 DURATION=10 scripts/bench-tls.sh
#
# Needs wrk, curl, python3 (../shared/bench/install.sh). Everything binds to 127.0.0.1 and is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="${BENCH_DIR:-../shared/bench}"
export REPEAT="${REPEAT:-1}" DURATION="${DURATION:-20}"
ROUNDS="${ROUNDS:-2}"
OUT="${RESULTS_DIR:-/tmp/pairdb-bench-tls}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/pairdb-bench-tls-cluster}"
export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18080}"
export BASE_PORT="${BASE_PORT:-17100}"
export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
URL="http://$GATEWAY_ADDR"

cargo build --release --locked
trap 'scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT
rm -rf "$OUT/plain" "$OUT/tls"
for round in $(seq 1 "$ROUNDS"); do
for variant in plain tls; do
  echo "== round $round: $variant"
  rm -rf "$CLUSTER_DIR"
  mkdir -p "$OUT/$variant"
  TLS=0
  [ "$variant" = tls ] && TLS=1
  TLS="$TLS" scripts/cluster.sh start
  curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
    -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
  PAIRDB_TENANT=bench SERVER_PIDS="$(scripts/cluster.sh pids)" RESULTS_DIR="$OUT/$variant" \
    CONSISTENCY=quorum WORKLOADS="put get" "$BENCH/pairdb.sh" "$URL"
  scripts/cluster.sh stop
done
done
trap - EXIT

python3 - "$OUT" <<'PY'
import glob, os, re, statistics, sys
out = sys.argv[1]
def rows(variant):
    r = {}
    for path in glob.glob(os.path.join(out, variant, "*.txt")):
        for line in open(path):
            if line.startswith("WRK_RESULT"):
                kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
                r.setdefault(re.sub(r"_r\d+$", "", kv["tag"]), []).append(kv)
    return r
plain, tls = rows("plain"), rows("tls")
def med(r, tag, field):
    vals = [float(x[field]) for x in r.get(tag, [])]
    return statistics.median(vals) if vals else float("nan")
print("\n| workload | conns | plain rps | mTLS rps | mTLS/plain | plain p50 / p99 ms | mTLS p50 / p99 ms |")
print("|---|---|---|---|---|---|---|")
for name, tag in (("PUT quorum", "pairdb_put_quorum"), ("GET quorum", "pairdb_get_quorum")):
    for c in (16, 64):
        t = f"{tag}_c{c}"
        p, m = med(plain, t, "rps"), med(tls, t, "rps")
        print(f"| {name} | {c} | {p:,.0f} | {m:,.0f} | {m/p:.2f}x | "
              f"{med(plain,t,'lat_us_p50')/1000:.2f} / {med(plain,t,'lat_us_p99')/1000:.2f} | "
              f"{med(tls,t,'lat_us_p50')/1000:.2f} / {med(tls,t,'lat_us_p99')/1000:.2f} |")
PY
