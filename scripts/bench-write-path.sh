#!/usr/bin/env bash
# The engine's write path at two commits, side by side in one run (docs/benchmarks.md,
# "Anti-entropy": what keeping the range trees costs each write). Builds
# benchmarks/write-path against BASE (a git worktree) and against the working tree, with one
# shared target directory, then runs them alternately ROUNDS times.
#   scripts/bench-write-path.sh                    # BASE=d957cbb^ (before the range trees)
# Env: BASE (d957cbb^), SECONDS_PER_RUN (5), ROUNDS (3). Output: a markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE:-d957cbb^}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-5}"
ROUNDS="${ROUNDS:-3}"
# One target directory for both builds (and the main build's, whose dependencies they share).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
work="$(mktemp -d)"
trap 'git worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

git worktree add --detach "$work/base" "$BASE" >/dev/null 2>&1
mkdir -p "$work/base/benchmarks"
cp -r benchmarks/write-path "$work/base/benchmarks/"
build() { # source tree, output binary
  (cd "$1/benchmarks/write-path" && cargo build --release -q 2>&1 | tail -3 >&2)
  cp "$CARGO_TARGET_DIR/release/pairdb-write-path-bench" "$2"
}
build "$work/base" "$work/before"
build "$PWD" "$work/after"

for _ in $(seq 1 "$ROUNDS"); do
  "$work/before" --seconds "$SECONDS_PER_RUN" | sed 's/^/before /'
  "$work/after" --seconds "$SECONDS_PER_RUN" | sed 's/^/after /'
done >"$work/results.txt"

python3 - "$work/results.txt" "$BASE" "$(git rev-parse --short HEAD)" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    which, sync, writers, ops = line.split()
    runs.setdefault((sync, int(writers), which), []).append(float(ops))
print(f"| sync, writers | before ({sys.argv[2]}) ops/s | after ({sys.argv[3]}) ops/s | after / before |")
print("|---|---|---|---|")
for sync in ("never", "always"):
    for writers in (1, 16):
        b = statistics.median(runs[(sync, writers, "before")])
        a = statistics.median(runs[(sync, writers, "after")])
        print(f"| {sync}, {writers} | {b:,.0f} | {a:,.0f} | {a / b:.3f} |")
print(f"\nMedians of {len(runs[('never', 1, 'before')])} alternating runs of each.")
PY
