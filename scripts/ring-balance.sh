#!/usr/bin/env bash
# Ring balance (docs/benchmarks.md, "Ring balance"): the ring simulator at 10, 100 and 1,000
# nodes, balanced tokens against random ones, side by side, each grown one node at a time and
# then given 3 more nodes (copies moved per addition, planning time). Pure computation, no
# cluster. Output: the simulator's tables on stdout.
# Usage: scripts/ring-balance.sh [sizes...]   (default: 10 100 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked 2>&1 | tail -1 >&2
bin=./target/release/pairdb
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10 100 1000)
for n in "${sizes[@]}"; do
  for tokens in balanced random; do
    echo "## $n nodes, $tokens tokens"
    /usr/bin/time -f "(%e s wall for the whole run)" \
      "$bin" ring simulate --nodes "$n" --rf 3 --add 3 --tokens "$tokens"
    echo
  done
done
