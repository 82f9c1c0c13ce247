//! Repaired ranges: what a storage node knows about the repairs of the data it holds, for
//! zombie-proof tombstone collection (SEMANTICS.md, "Anti-entropy"; docs/anti-entropy.md).
//!
//! A repair coordinator that compared a tenant's range on every replica and fixed every
//! difference tells each replica "this tenant's range was repaired as of time T": every
//! tombstone written before T was then held by every replica (or replaced by something newer).
//! Compaction may purge a tombstone only when it is older than `gc_grace` AND a repair of its
//! range as of a time after the tombstone was written is recorded here; a tombstone in a
//! range never repaired stays. So a replica that missed a delete cannot bring the value back
//! after the others collected the tombstone: they collect it only once every replica held it.
//!
//! Stored in `<data dir>/repaired-ranges.json`, rewritten whole (temp file, fsync, rename,
//! fsync of the directory) on every change, so a crash leaves the old or the new set. Per
//! tenant, a range recorded again replaces the entries it covers with an older time; the set
//! stays as small as the ring's ranges.
//!
//! Invariant: `may_purge` answers true only for a time strictly before a recorded repair of a
//! range containing the position (never for a tenant or range not recorded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::engine::TombstoneGate;
use crate::ring::HashRange;

pub const FILE_NAME: &str = "repaired-ranges.json";

/// One recorded repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Repaired {
    start: u64,
    end: u64,
    /// Milliseconds since the Unix epoch: tombstones written before it were on every replica.
    as_of_ms: u64,
}

#[derive(Debug)]
pub struct RepairedRanges {
    path: PathBuf,
    tenants: RwLock<HashMap<String, Vec<Repaired>>>,
    /// Held by [`RepairedRanges::mark`] across its file rewrite: one change at a time, while
    /// readers (compactions asking `may_purge`) keep reading the set in force, never waiting
    /// on the rewrite's fsyncs.
    writer: Mutex<()>,
}

impl RepairedRanges {
    /// Opens (or starts) the set in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<RepairedRanges> {
        let path = dir.join(FILE_NAME);
        let tenants = super::json_file::load(&path)?;
        Ok(RepairedRanges {
            path,
            tenants: RwLock::new(tenants),
            writer: Mutex::new(()),
        })
    }

    /// Records that `tenant`'s `range` was repaired as of `as_of_ms`; durable on return.
    pub fn mark(&self, marks: &[(String, HashRange, u64)]) -> std::io::Result<()> {
        let _one_change_at_a_time = self.writer.lock();
        let mut next = self.tenants.read().clone();
        for (tenant, range, as_of_ms) in marks {
            let entries = next.entry(tenant.clone()).or_default();
            let new = Repaired {
                start: range.start,
                end: range.end,
                as_of_ms: *as_of_ms,
            };
            // Entries the new one covers and outdates go; the rest (other topologies'
            // ranges, later repairs) stay.
            entries.retain(|e| !(covers(range, e) && e.as_of_ms <= new.as_of_ms));
            if !entries.iter().any(|e| {
                covers(&HashRange::new(e.start, e.end), &new) && e.as_of_ms >= new.as_of_ms
            }) {
                entries.push(new);
            }
        }
        self.store(&next)?;
        *self.tenants.write() = next;
        Ok(())
    }

    /// The latest repair recorded for a range containing `ring_hash` of `tenant`.
    pub fn repaired_as_of(&self, tenant: &str, ring_hash: u64) -> Option<u64> {
        self.tenants
            .read()
            .get(tenant)?
            .iter()
            .filter(|e| HashRange::new(e.start, e.end).contains(ring_hash))
            .map(|e| e.as_of_ms)
            .max()
    }

    fn store(&self, tenants: &HashMap<String, Vec<Repaired>>) -> std::io::Result<()> {
        super::json_file::store(&self.path, tenants)
    }
}

/// Whether `outer` contains every position of `inner`.
fn covers(outer: &HashRange, inner: &Repaired) -> bool {
    let inner = HashRange::new(inner.start, inner.end);
    if outer.start == outer.end {
        return true;
    }
    if inner.start == inner.end {
        return false;
    }
    // Every position of `inner` is in `outer` when its first and last are and `outer` does
    // not end strictly inside it.
    let last = inner.end.wrapping_sub(1);
    outer.contains(inner.start)
        && outer.contains(last)
        && (inner.start == outer.start || !inner.contains(outer.start))
}

impl TombstoneGate for RepairedRanges {
    fn may_purge(&self, tenant: &str, ring_hash: u64, written_ms: u64) -> bool {
        self.repaired_as_of(tenant, ring_hash)
            .is_some_and(|as_of| written_ms < as_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tombstones_older_than_a_recorded_repair_of_their_range_may_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = RepairedRanges::open(dir.path()).expect("open");
        assert!(
            !set.may_purge("t", 5, 0),
            "nothing recorded: nothing purged"
        );
        set.mark(&[("t".to_owned(), HashRange::new(0, 100), 1_000)])
            .expect("mark");
        assert!(set.may_purge("t", 5, 999));
        assert!(!set.may_purge("t", 5, 1_000), "written at the repair: kept");
        assert!(!set.may_purge("t", 100, 1), "outside the range: kept");
        assert!(!set.may_purge("u", 5, 1), "another tenant: kept");
        // A later repair of the same range replaces the entry; the set survives a reopen.
        set.mark(&[("t".to_owned(), HashRange::new(0, 100), 2_000)])
            .expect("mark");
        let reopened = RepairedRanges::open(dir.path()).expect("reopen");
        assert!(reopened.may_purge("t", 5, 1_999));
        assert_eq!(reopened.tenants.read().get("t").map(Vec::len), Some(1));
    }

    #[test]
    fn covering_handles_wrapping_ranges() {
        let r = |start, end| Repaired {
            start,
            end,
            as_of_ms: 0,
        };
        assert!(covers(&HashRange::new(10, 5), &r(20, 3)));
        assert!(covers(&HashRange::new(10, 5), &r(u64::MAX - 1, 2)));
        assert!(!covers(&HashRange::new(10, 5), &r(4, 12)));
        assert!(!covers(&HashRange::new(0, 100), &r(50, 150)));
        assert!(covers(&HashRange::FULL, &r(50, 150)));
        assert!(!covers(&HashRange::new(0, 100), &r(7, 7)));
        assert!(!covers(&HashRange::new(20, 30), &r(10, 40)));
    }
}
