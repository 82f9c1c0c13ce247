#!/usr/bin/env bash
# A real multi-process pairdb cluster on loopback: 3 storage nodes (gossiping, fsync'd commit
# logs), COORDINATORS coordinators (1), 1 gateway in front of them, each its own `pairdb`
# process.
#
#   scripts/cluster.sh start      # build (release) if needed, start, wait until ready
#   scripts/cluster.sh status     # which processes run, /readyz of each
#   scripts/cluster.sh stop       # SIGTERM every process (SIGKILL after 20 s)
#
# Env:
#   CLUSTER_DIR (.pairdb-cluster)  data, logs and pid files
#   PAIRDB_BIN (target/release/pairdb; built when missing)
#   GATEWAY_ADDR (127.0.0.1:8080)  the public HTTP API
#   BASE_PORT (7100)               storage gRPC BASE+1..3, coordinators BASE+101.., gossip BASE+201..203
#   COORDINATORS (1)               coordinators c1..cN (1..=9), sharing METADATA_URL and
#                                  IDEMPOTENCY_URL; give IDEMPOTENCY_URL=redis://... so a retry
#                                  through another coordinator finds the first one's key
#   AUTH (none)                    none | token (then set PAIRDB_GATEWAY_AUTH_SECRET)
#   CLUSTER_SECRET_FILE ($CLUSTER_DIR/cluster-secret)  the secret of every internal call;
#                                  made (random, mode 600) when missing
#   TLS (0)                        1: mutual TLS on every internal hop, with a CA and a
#                                  certificate per process made by `pairdb cert` in $CLUSTER_DIR/certs
#   HTTPS (0)                      1: the gateway serves HTTPS (its certificate from the same CA;
#                                  curl --cacert $CLUSTER_DIR/certs/ca.pem, pairdb --cacert ...)
#   METADATA_URL (sqlite://$CLUSTER_DIR/metadata.db)  or postgres://...
#   IDEMPOTENCY_URL (memory://)    or redis://...
#   SYNC (always)                  storage commit-log sync policy
#   WRITE_RATE_LIMIT (1000) READ_RATE_LIMIT (10000)   per tenant per minute
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${CLUSTER_DIR:-.pairdb-cluster}"
BIN="${PAIRDB_BIN:-target/release/pairdb}"
GATEWAY_ADDR="${GATEWAY_ADDR:-127.0.0.1:8080}"
BASE="${BASE_PORT:-7100}"
AUTH="${AUTH:-none}"
SYNC="${SYNC:-always}"
IDEMPOTENCY_URL="${IDEMPOTENCY_URL:-memory://}"
WRITE_RATE_LIMIT="${WRITE_RATE_LIMIT:-1000}"
READ_RATE_LIMIT="${READ_RATE_LIMIT:-10000}"
TLS="${TLS:-0}"
HTTPS="${HTTPS:-0}"
SCHEME=http CURL_TLS=()
if [ "$HTTPS" = 1 ]; then SCHEME=https CURL_TLS=(--cacert "$DIR/certs/ca.pem"); fi

storage_port() { echo $((BASE + $1)); }
gossip_port() { echo $((BASE + 200 + $1)); }
COORDINATORS="${COORDINATORS:-1}"
case "$COORDINATORS" in [1-9]) ;; *) echo "COORDINATORS must be 1..9" >&2; exit 2 ;; esac
coordinator_port() { echo $((BASE + 100 + ${1:-1})); }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

launch() { # name, args...
  local name="$1"; shift
  if running "$DIR/pids/$name.pid"; then echo "$name already running (pid $(cat "$DIR/pids/$name.pid"))"; return; fi
  local tls=()
  if [ "$TLS" = 1 ]; then
    tls=(--tls-ca-file="$CERTS/ca.pem" --tls-cert-file="$CERTS/$name.pem" --tls-key-file="$CERTS/$name.key")
  fi
  if [ "$HTTPS" = 1 ] && [ "$name" = gw ]; then
    tls+=(--https-cert-file="$CERTS/gw.pem" --https-key-file="$CERTS/gw.key")
  fi
  "$BIN" "$@" --cluster-secret-file="$SECRET_FILE" "${tls[@]}" >>"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
  echo "started $name (pid $!)"
}

listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; } # host:port

wait_http() { # url, name of the process that must answer it
  for _ in $(seq 1 150); do
    if ! running "$DIR/pids/$2.pid"; then
      echo "$2 exited while starting; last lines of $DIR/logs/$2.log:" >&2
      tail -n 5 "$DIR/logs/$2.log" >&2
      return 1
    fi
    if curl -fsS "${CURL_TLS[@]}" -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not become ready ($1); see $DIR/logs/" >&2
  return 1
}

start() {
  if [ ! -x "$BIN" ]; then
    echo "building $BIN"
    cargo build --release --locked
  fi
  # Another cluster on these ports would answer the readiness checks in place of ours.
  local port addrs=("$GATEWAY_ADDR")
  local coordinator_ports=() c
  for c in $(seq 1 "$COORDINATORS"); do coordinator_ports+=("$(coordinator_port "$c")"); done
  for port in "$(storage_port 1)" "$(storage_port 2)" "$(storage_port 3)" "${coordinator_ports[@]}"; do
    addrs+=("127.0.0.1:$port" "127.0.0.1:$((port + 1000))") # gRPC and its HTTP
  done
  for port in "${addrs[@]}"; do
    if listening "$port"; then
      echo "$port is already in use (a cluster left running? scripts/cluster.sh stop, or set BASE_PORT)" >&2
      return 1
    fi
  done
  mkdir -p "$DIR/pids" "$DIR/logs"
  local abs; abs="$(cd "$DIR" && pwd)"
  SECRET_FILE="${CLUSTER_SECRET_FILE:-$abs/cluster-secret}"
  if [ ! -s "$SECRET_FILE" ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE")
  fi
  CERTS="$abs/certs"
  if [ "$TLS" = 1 ] || [ "$HTTPS" = 1 ]; then
    local names=(s1 s2 s3 gw) missing=() n
    for c in $(seq 1 "$COORDINATORS"); do names+=("c$c"); done
    for n in "${names[@]}"; do [ -f "$CERTS/$n.pem" ] || missing+=("$n"); done
    if [ "${#missing[@]}" -gt 0 ]; then
      "$BIN" cert --out-dir="$CERTS" --node="$(IFS=,; echo "${missing[*]}")" --san=127.0.0.1,localhost >/dev/null
    fi
  fi
  local metadata="${METADATA_URL:-sqlite://$abs/metadata.db}"
  local seeds=() nodes=()
  for i in 1 2 3; do
    seeds+=("127.0.0.1:$(gossip_port "$i")")
    nodes+=("s$i@127.0.0.1:$(storage_port "$i")")
  done
  for i in 1 2 3; do
    local others; others="$(printf '%s\n' "${seeds[@]}" | grep -v ":$(gossip_port "$i")\$" | paste -sd, -)"
    launch "s$i" --role=storage --node-id="s$i" --listen="127.0.0.1:$(storage_port "$i")" \
      --data-dir="$abs/s$i" --gossip="127.0.0.1:$(gossip_port "$i")" --seeds="$others" --sync="$SYNC"
  done
  for i in 1 2 3; do wait_http "http://127.0.0.1:$(( $(storage_port "$i") + 1000 ))/healthz" "s$i"; done
  local coordinators=()
  for c in $(seq 1 "$COORDINATORS"); do
    launch "c$c" --role=coordinator --node-id="c$c" --listen="127.0.0.1:$(coordinator_port "$c")" \
      --metadata-url="$metadata" --idempotency-url="$IDEMPOTENCY_URL" \
      --storage-nodes="$(IFS=,; echo "${nodes[*]}")"
    wait_http "http://127.0.0.1:$(( $(coordinator_port "$c") + 1000 ))/readyz" "c$c"
    coordinators+=("127.0.0.1:$(coordinator_port "$c")")
  done
  launch gw --role=gateway --listen="$GATEWAY_ADDR" --coordinators="$(IFS=,; echo "${coordinators[*]}")" \
    --auth="$AUTH" --write-rate-limit="$WRITE_RATE_LIMIT" --read-rate-limit="$READ_RATE_LIMIT"
  wait_http "$SCHEME://$GATEWAY_ADDR/readyz" gw
  echo "cluster ready: $SCHEME://$GATEWAY_ADDR  (data and logs in $DIR)"
}

status() {
  local any=0
  for f in "$DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    any=1
    local name; name="$(basename "$f" .pid)"
    if running "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
  done
  [ "$any" = 1 ] || { echo "no cluster in $DIR"; return 1; }
  if curl -fsS "${CURL_TLS[@]}" "$SCHEME://$GATEWAY_ADDR/readyz" >/dev/null 2>&1; then echo "gateway $SCHEME://$GATEWAY_ADDR: ready"; else echo "gateway $SCHEME://$GATEWAY_ADDR: not ready"; fi
}

stop() {
  local pids=()
  for f in "$DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    if running "$f"; then pids+=("$(cat "$f")"); kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
    rm -f "$f"
  done
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  # SIGKILL is delivered asynchronously: wait until each is gone (and its data dir's lock with
  # it), so a `start` right after does not find the directories locked.
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  echo "stopped ${#pids[@]} processes"
}

pids() { cat "$DIR"/pids/*.pid 2>/dev/null | paste -sd' ' -; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  pids) pids ;;
  *) echo "usage: $0 start|stop|status|pids" >&2; exit 2 ;;
esac
