#!/usr/bin/env bash
# Listing benchmark (the API-features issue: "keys/s listed for a 1M-key tenant at one"):
# the scripts/cluster.sh cluster (3 storage nodes with fsync'd commit logs, 1 coordinator,
# 1 gateway), a tenant of KEYS keys at RF 3 written once each by `pairdb bench`, then listed
# from the first key to the last by `pairdb kv list --all --limit 1000` (every page merged from
# the three nodes, the cursor followed), ROUNDS times at `one` and once at `quorum`. Prints
# keys/s per round.
#
#   scripts/bench-list.sh                  # KEYS=1000000 ROUNDS=3
#   KEYS=100000 ROUNDS=1 scripts/bench-list.sh
#
# Everything binds to 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS="${KEYS:-1000000}" ROUNDS="${ROUNDS:-3}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/pairdb-bench-list}"
export GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:18090}"
export BASE_PORT="${BASE_PORT:-17300}"
export SYNC=always AUTH=none WRITE_RATE_LIMIT=1000000000 READ_RATE_LIMIT=1000000000
URL="http://$GATEWAY_ADDR"
BIN=target/release/pairdb

cargo build --release --locked
rm -rf "$CLUSTER_DIR"
trap 'scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT
scripts/cluster.sh start
curl -fsS -X POST "$URL/v1/tenants" -H 'Content-Type: application/json' \
  -d '{"tenant_id":"bench","replication_factor":3}' >/dev/null

started=$(date +%s.%N)
# The reads workload writes every key once first (k0..k<KEYS-1>, 100-byte values).
"$BIN" bench --url "$URL" --tenant bench --workload reads --keys "$KEYS" --value-size 100 \
  --concurrency 64 --duration 1s --json >/dev/null
echo "loaded $KEYS keys in $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s"

list() { # consistency
  local t0 t1 n
  t0=$(date +%s.%N)
  n=$("$BIN" kv list --url "$URL" --tenant bench --limit 1000 --all --consistency "$1" | wc -l)
  t1=$(date +%s.%N)
  python3 -c "print(f'list at $1: $n keys in {$t1 - $t0:.2f} s = {$n / ($t1 - $t0):,.0f} keys/s')"
  [ "$n" -eq "$KEYS" ] || { echo "listed $n keys, expected $KEYS" >&2; exit 1; }
}
for _ in $(seq "$ROUNDS"); do list one; done
list quorum
