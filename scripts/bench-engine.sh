#!/usr/bin/env bash
# Engine benchmark: pairdb's engine vs RocksDB and fjall, side by side in one run
# (../shared/BENCHMARKS.md section 2). Builds RocksDB from source the first time (needs Debian's
# clang and libclang-dev; several minutes on 2 cores). Output: a markdown report on stdout.
# Extra arguments go to the harness: --seconds N --keys N --replay-mib N --only writes|reads|scan|replay
# Data larger than memory (not in the default run; about 30 minutes, needs root for the cgroup):
#   scripts/bench-engine.sh --only large [--keys 10000000] [--writers 16] [--memory-limit-mib N]
#                           [--pairdb-bin target/release/pairdb] [--seconds 10] [--stores pairdb,rocksdb]
#                           [--frozen-memtables N]
# --build-only builds the harness and runs nothing (for scripts that run it themselves).
# PAIRDB_TABLE_FORMAT=N (1, 2 or 3) has pairdb write SSTables in format N (3 is the default).
# PAIRDB_L0_BYTES=N, PAIRDB_L0_TRIGGER=N and PAIRDB_MEMTABLE_BYTES=N override pairdb's level-0 merge size (bytes, tables) and
# memtable size; PAIRDB_WRITES_SYNC=never runs pairdb's writes phase without fsync (an
# experiment: those rows are then not durable writes).
set -euo pipefail
cd "$(dirname "$0")/../benchmarks/engine"
if ! command -v clang >/dev/null || ! dpkg -s libclang-dev >/dev/null 2>&1; then
  echo "installing clang + libclang-dev (needed to build RocksDB)" >&2
  apt-get update -q && apt-get install -y -q clang libclang-dev >&2
fi
cargo build --release --locked 2>&1 | tail -1 >&2 || cargo build --release >&2
[ "${1:-}" = "--build-only" ] && exit 0
exec ./target/release/pairdb-engine-bench "$@"
