#!/usr/bin/env bash
# The cluster benchmark with a large key set ("Performance round 3", item 3, second half): the
# workloads of scripts/bench-cluster.sh (wrk through ../shared/bench, PUT quorum, GET quorum,
# GET one against etcd's PUT, linearizable and serializable range) with KEYS keys of 100 bytes
# written first, pairdb then a 3-member etcd with its default quota (2 GiB), in one run.
#
# pairdb is loaded with `pairdb bench --workload load` (batches of 100 puts at quorum), etcd
# with ../shared/bench/preload.py (transactions of 100 puts), each until every key is written
# or the store refuses; the report says how many keys each took, how fast, the disk and memory
# it then used, and what each workload got over the keys it holds (a PUT refused by etcd's
# quota counts as an error, not a request served).
#
#   scripts/bench-cluster-large.sh                       # KEYS=10000000, about 40 minutes
#   KEYS=200000 DURATION=3 scripts/bench-cluster-large.sh  # a check of the script, 3 minutes
#
# Env: KEYS (10000000), DURATION (10 s per workload and connection count), CONNS ("16 64"),
# LOAD_CONCURRENCY (32 batch requests in flight), SETTLE (600: at most this long for the
# load's compactions to finish before the workloads; QUIET 10), ETCD_LOAD_SECONDS (3600),
# ETCD_SETTLE (60: seconds etcd gets after its load before the workloads, as pairdb gets its
# compactions), STORES ("pairdb etcd"; one of them alone skips the ratio table), PAIRDB_BIN (a
# prebuilt binary; without it the release build). Needs etcd, etcdctl, wrk,
# curl, python3 (../shared/bench/install.sh). Everything binds to 127.0.0.1 and is stopped on
# exit; data goes under /tmp and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="$(cd "${BENCH_DIR:-../shared/bench}" && pwd)"
export KEYS="${KEYS:-10000000}" DURATION="${DURATION:-10}" CONNS="${CONNS:-16 64}"
export REPEAT=1 THREADS=2 WRK_TIMEOUT=10 VALUE_SIZE=100
export RESULTS_DIR="${RESULTS_DIR:-/tmp/pairdb-bench-results}"
LOAD_CONCURRENCY="${LOAD_CONCURRENCY:-32}"
export SETTLE="${SETTLE:-600}"
ETCD_LOAD_SECONDS="${ETCD_LOAD_SECONDS:-3600}"
ETCD_SETTLE="${ETCD_SETTLE:-60}"
STORES="${STORES:-pairdb etcd}"
ETCD_DATA=/tmp/etcd-bench-large
ETCD_PORT=23890
mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/large-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$OUT"

source scripts/bench-common.sh
source "$BENCH/lib.sh"
bench_cluster_env /tmp/pairdb-bench-large
BIN="${PAIRDB_BIN:-target/release/pairdb}"
export PAIRDB_BIN="$BIN"
if [ "$BIN" = target/release/pairdb ]; then cargo build --release --locked; fi

ETCD_PIDS=()
stop_etcd() {
  if [ "${#ETCD_PIDS[@]}" -gt 0 ]; then kill_pids "${ETCD_PIDS[@]}"; ETCD_PIDS=(); fi
  rm -rf "$ETCD_DATA"
}
cleanup() {
  scripts/cluster.sh stop >/dev/null 2>&1 || true
  stop_etcd
  rm -rf "$CLUSTER_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Resident memory of each pid given, as "name=ANON+FILE" words in MiB: the process's own
# memory, and the mapped file pages it touched (pairdb maps its tables; the kernel can drop
# those pages under pressure).
rss() { # name=pid ...
  local pair
  for pair in "$@"; do
    printf '%s=%s ' "${pair%%=*}" "$(awk '/^RssAnon/ {a = $2} /^RssFile/ {f = $2}
      END {printf "%.0f+%.0f", a / 1024, f / 1024}' "/proc/${pair#*=}/status" 2>/dev/null || echo gone)"
  done
  echo
}
mib() { du -sm "$1" | cut -f1; }

run_pairdb() {
  rm -rf "$CLUSTER_DIR"
  scripts/cluster.sh start
  curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
    -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null
  NODES=()
  for f in "$CLUSTER_DIR"/pids/*.pid; do NODES+=("$(basename "$f" .pid)=$(cat "$f")"); done

  echo "== pairdb: loading $KEYS keys"
  "$BIN" bench --url "$URL" --tenant bench --workload load --keys "$KEYS" --value-size "$VALUE_SIZE" \
    --concurrency "$LOAD_CONCURRENCY" --json | tee "$OUT/pairdb-load.json"
  echo "disk after the load (MiB): s1=$(mib "$CLUSTER_DIR/s1") s2=$(mib "$CLUSTER_DIR/s2") s3=$(mib "$CLUSTER_DIR/s3")" | tee "$OUT/pairdb-disk.txt"
  settle 2>&1 | tee -a "$OUT/pairdb-disk.txt"
  echo "disk after compaction (MiB): s1=$(mib "$CLUSTER_DIR/s1") s2=$(mib "$CLUSTER_DIR/s2") s3=$(mib "$CLUSTER_DIR/s3")" | tee -a "$OUT/pairdb-disk.txt"
  echo "rss before the workloads (MiB): $(rss "${NODES[@]}")" | tee "$OUT/pairdb-rss.txt"

  export PAIRDB_TENANT=bench SERVER_PIDS="$(scripts/cluster.sh pids)" KEYSPACE="$KEYS"
  RESULTS_DIR="$OUT" CONSISTENCY=quorum WORKLOADS="put get" PRELOAD=0 "$BENCH/pairdb.sh" "$URL"
  RESULTS_DIR="$OUT" CONSISTENCY=one WORKLOADS="get" PRELOAD=0 "$BENCH/pairdb.sh" "$URL"
  echo "rss after the workloads (MiB): $(rss "${NODES[@]}")" | tee -a "$OUT/pairdb-rss.txt"
  scripts/cluster.sh stop
  rm -rf "$CLUSTER_DIR"
}

# etcd: 3 members on loopback, default quota.
run_etcd() {
  need etcd etcdctl
  rm -rf "$ETCD_DATA"; mkdir -p "$ETCD_DATA"
  client_url() { echo "http://127.0.0.1:$((ETCD_PORT + $1))"; }
  peer_url() { echo "http://127.0.0.1:$((ETCD_PORT + 10 + $1))"; }
  members="m1=$(peer_url 1),m2=$(peer_url 2),m3=$(peer_url 3)"
  endpoints="$(client_url 1),$(client_url 2),$(client_url 3)"
  for i in 1 2 3; do
    etcd --name "m$i" --data-dir "$ETCD_DATA/m$i" \
      --listen-client-urls "$(client_url "$i")" --advertise-client-urls "$(client_url "$i")" \
      --listen-peer-urls "$(peer_url "$i")" --initial-advertise-peer-urls "$(peer_url "$i")" \
      --initial-cluster "$members" --initial-cluster-state new --initial-cluster-token etcd-large \
      --logger zap --log-outputs "$ETCD_DATA/m$i.log" --log-level warn >"$ETCD_DATA/m$i.stdout" 2>&1 &
    ETCD_PIDS+=($!)
  done
  for _ in $(seq 1 60); do
    etcdctl --endpoints="$endpoints" endpoint health >/dev/null 2>&1 && break
    sleep 0.5
  done
  etcd_status() { etcdctl --endpoints="$endpoints" endpoint status -w table; etcdctl --endpoints="$endpoints" alarm list; }
  leader="$(etcdctl --endpoints="$endpoints" endpoint status -w json | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["Status"]["header"]["member_id"] == e["Status"]["leader"]:
        print(e["Endpoint"]); break')"
  MEMBERS=(m1="${ETCD_PIDS[0]}" m2="${ETCD_PIDS[1]}" m3="${ETCD_PIDS[2]}")

  echo "== etcd: loading $KEYS keys (leader $leader)"
  python3 "$BENCH/preload.py" etcd "$leader" --keyspace "$KEYS" --value-size "$VALUE_SIZE" \
    --concurrency 16 --max-seconds "$ETCD_LOAD_SECONDS" 2>&1 | tee "$OUT/etcd-load.txt" || true
  # preload.py's workers each stop at their first refused batch, so the keys written are about the
  # first ETCD_KEYS (a few batches just below may be missing: etcd answers those reads with an
  # empty range); the reads draw from those.
  ETCD_KEYS="$(sed -n 's/^preload etcd: \([0-9]*\)\/.*/\1/p' "$OUT/etcd-load.txt")"
  [ -n "$ETCD_KEYS" ] && [ "$ETCD_KEYS" -gt 0 ] || { echo "etcd took no keys" >&2; exit 1; }
  sleep "$ETCD_SETTLE"
  etcd_status 2>&1 | tee "$OUT/etcd-status.txt"
  echo "disk (MiB): m1=$(mib "$ETCD_DATA/m1") m2=$(mib "$ETCD_DATA/m2") m3=$(mib "$ETCD_DATA/m3")" | tee -a "$OUT/etcd-status.txt"
  echo "rss before the workloads (MiB): $(rss "${MEMBERS[@]}")" | tee "$OUT/etcd-rss.txt"

  SERVER_PIDS="${ETCD_PIDS[*]}"
  {
    echo "# etcd with $ETCD_KEYS of $KEYS keys loaded, target $leader"
    for c in $CONNS; do run_wrk "etcd_put_c${c}_r1" "$c" "$BENCH/wrk/etcd_put.lua" "$leader"; done
    for c in $CONNS; do KEYSPACE="$ETCD_KEYS" run_wrk "etcd_range_ser_c${c}_r1" "$c" "$BENCH/wrk/etcd_range.lua" "$leader" SERIALIZABLE=1; done
    for c in $CONNS; do KEYSPACE="$ETCD_KEYS" run_wrk "etcd_range_lin_c${c}_r1" "$c" "$BENCH/wrk/etcd_range.lua" "$leader" SERIALIZABLE=0; done
  } 2>&1 | tee "$OUT/etcd3-wrk.txt"
  echo "rss after the workloads (MiB): $(rss "${MEMBERS[@]}")" | tee -a "$OUT/etcd-rss.txt"
  etcd_status 2>&1 | tee -a "$OUT/etcd-status.txt"
  stop_etcd
}

case " $STORES " in *" pairdb "*) run_pairdb ;; esac
case " $STORES " in *" etcd "*) run_etcd ;; esac
if [ "$STORES" != "pairdb etcd" ]; then wrk_table <(cat "$OUT"/*.txt); exit 0; fi

python3 - "$OUT" "$KEYS" "$ETCD_KEYS" <<'PY'
import glob, json, os, re, sys
out, keys, etcd_keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = {}
for path in glob.glob(os.path.join(out, "*.txt")):
    for line in open(path):
        if line.startswith("WRK_RESULT"):
            kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            rows[re.sub(r"_r\d+$", "", kv["tag"])] = kv
load = json.load(open(os.path.join(out, "pairdb-load.json")))
etcd_line = open(os.path.join(out, "etcd-load.txt")).read().strip().splitlines()
print(f"\npairdb load: {load['keys_written']:,} of {keys:,} keys in {load['seconds']:.0f} s "
      f"({load['keys_per_second']:,.0f} keys/s), {load['errors']} refused batches")
print("etcd load:", next((l for l in etcd_line if l.startswith("preload")), "?"))
for l in etcd_line:
    if l.strip().startswith("error:"):
        print("  first etcd refusal:", l.strip()); break
def errors(r):
    return sum(int(r.get(k, 0)) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
def ok_rps(r):
    # rps counts every answer; only the requests that succeeded count as served.
    served = int(r["requests"]) - errors(r)
    return served / float(r["duration_s"]) if served > 0 else float("nan")
pairs = [("PUT quorum vs etcd PUT", "pairdb_put_quorum", "etcd_put"),
         ("GET quorum vs etcd linearizable", "pairdb_get_quorum", "etcd_range_lin"),
         ("GET one vs etcd serializable", "pairdb_get_one", "etcd_range_ser")]
print(f"\n| workload | conns | pairdb rps ({keys:,} keys) | etcd rps ({etcd_keys:,} keys) | ratio | pairdb p50 / p99 ms | etcd p50 / p99 ms | errors pairdb / etcd |")
print("|---|---|---|---|---|---|---|---|")
for name, p, e in pairs:
    for c in os.environ.get("CONNS", "16 64").split():
        pr, er = rows.get(f"{p}_c{c}"), rows.get(f"{e}_c{c}")
        if not pr or not er:
            print(f"| {name} | {c} | missing | | | | | |"); continue
        prps, erps = ok_rps(pr), ok_rps(er)
        ratio = f"{prps / erps:.2f}x" if erps == erps and prps == prps and erps > 0 else "-"
        fmt = lambda x: "refused" if x != x else f"{x:,.0f}"
        print(f"| {name} | {c} | {fmt(prps)} | {fmt(erps)} | {ratio} | "
              f"{float(pr['lat_us_p50'])/1000:.2f} / {float(pr['lat_us_p99'])/1000:.2f} | "
              f"{float(er['lat_us_p50'])/1000:.2f} / {float(er['lat_us_p99'])/1000:.2f} | "
              f"{errors(pr)} / {errors(er)} |")
PY
