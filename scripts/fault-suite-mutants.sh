#!/usr/bin/env bash
# Shows that the fault suite's checker can fail: builds deliberately broken copies of pairdb
# (each a one-line change, in a scratch worktree of HEAD) and runs the suite against each with
# PAIRDB_FAULT_SUITE_BIN. Every mutant must be caught (the suite exits non-zero with an
# anomaly). Not part of CI (each mutant is a build plus a run); docs/reliability.md has the
# last results.
#
#   scripts/fault-suite-mutants.sh [SECONDS] [SEED]      (defaults: 60, 7)
#   MUTANT=anti-entropy scripts/fault-suite-mutants.sh   # only mutants whose name contains it
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
seed="${2:-7}"
root="$(pwd)"
scratch="$(mktemp -d /tmp/pairdb-mutants.XXXXXX)"
trap 'git -C "$root" worktree remove --force "$scratch/tree" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT

# name | file | sed expression (must change the file)
mutants=(
  "quorum reads answer after one replica (R = 1)|src/coordinator/read.rs|s/let required = plan.required(consistency);/let required = 1;/"
  "quorum writes acknowledged after one replica (W = 1)|src/coordinator/write.rs|s/let required = plan.required(consistency);/let required = 1;/"
  "anti-entropy repairs send replicas nothing|src/coordinator/anti_entropy/compare.rs|s/if records.is_empty() {/if true {/"
)

git worktree add --detach "$scratch/tree" HEAD >/dev/null
status=0
for m in "${mutants[@]}"; do
  IFS='|' read -r name file expr <<<"$m"
  [[ "$name" == *"${MUTANT:-}"* ]] || continue
  git -C "$scratch/tree" checkout -- .
  sed -i "$expr" "$scratch/tree/$file"
  if git -C "$scratch/tree" diff --quiet; then
    echo "mutant '$name': the change did not apply to $file" >&2
    exit 2
  fi
  echo "== mutant: $name"
  CARGO_TARGET_DIR="$root/target/mutants" cargo build --quiet --manifest-path "$scratch/tree/Cargo.toml" --bin pairdb
  if PAIRDB_FAULT_SUITE_BIN="$root/target/mutants/debug/pairdb" \
      cargo test --quiet --test fault_suite -- --seed "$seed" --soak "${seconds}s" 2>&1 | tee "$scratch/run.log" | grep -E "^fault suite: seed|^ANOMALY" | head -5; \
     grep -q "^ANOMALY" "$scratch/run.log"; then
    echo "   caught"
  else
    echo "   NOT CAUGHT"
    status=1
  fi
done
exit $status
