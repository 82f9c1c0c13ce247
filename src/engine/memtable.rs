//! The memtable: an ordered, lock-free skiplist of the newest record per internal key.
//!
//! Invariants: at most one record per key (an insert replaces; the engine only inserts winners,
//! see `engine/mod.rs`); `max_seq` is the highest commit-log sequence inserted, so once this
//! memtable is in an SSTable every log record up to `max_seq` is too.
//!
//! Each memtable is frozen at its own size, `memtable_bytes` less a random part of up to a
//! quarter ([`flush_size`]). Replicas receive the same writes; with one fixed size they would
//! flush, and then compact, in the same second, so every replica of a key would be slow at
//! once and a quorum could not go around the slow one (on one machine: three nodes' flushes at
//! once took the CPU to 100%, docs/benchmarks.md "Streaming"). With the jitter their flushes
//! drift apart from the first one on.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_skiplist::SkipMap;

use super::types::Record;

/// Memory of one skiplist entry besides its key's buffer and its record: the node (reference
/// count, height, the key's `Vec` and the record's `Arc`) and its tower of next pointers
/// (1.33 on average, up to 32), rounded up.
const SKIPLIST_NODE_BYTES: usize = 80;

pub struct Memtable {
    map: SkipMap<Vec<u8>, Arc<Record>>,
    bytes: AtomicUsize,
    max_seq: AtomicU64,
    /// Size from which it is full (to be frozen and flushed).
    full_at: usize,
}

/// The size at which a new memtable is frozen: `limit` less a random part of up to a quarter.
pub fn flush_size(limit: usize) -> usize {
    limit - fastrand::usize(0..=limit / 4)
}

impl Memtable {
    /// A memtable that is full at `full_at` bytes.
    pub fn new(full_at: usize) -> Self {
        Self {
            map: SkipMap::new(),
            bytes: AtomicUsize::new(0),
            max_seq: AtomicU64::new(0),
            full_at,
        }
    }

    /// Whether it reached the size at which it is frozen.
    pub fn is_full(&self) -> bool {
        self.size_bytes() >= self.full_at
    }

    pub fn insert(&self, ikey: Vec<u8>, record: Arc<Record>, seq: u64) {
        self.bytes.fetch_add(
            SKIPLIST_NODE_BYTES + ikey.capacity() + record.memory_bytes(),
            Ordering::Relaxed,
        );
        self.map.insert(ikey, record);
        self.max_seq.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn get(&self, ikey: &[u8]) -> Option<Arc<Record>> {
        self.map.get(ikey).map(|e| e.value().clone())
    }

    /// Approximate memory of what was inserted (replaced records included).
    pub fn size_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn max_seq(&self) -> u64 {
        self.max_seq.load(Ordering::Acquire)
    }

    /// Appends to `out` the entries after `after` (or from `from` when `after` is `None`), in
    /// key order, for cursors that must not borrow the map: one search, then a walk along the
    /// bottom level, over at most `visit` entries. Only entries `keep` admits are appended.
    /// Returns the key of the last entry visited (the next call starts after it), `None` when
    /// the walk reached the end.
    pub fn fill_after(
        &self,
        after: Option<&[u8]>,
        from: &[u8],
        visit: usize,
        keep: &dyn Fn(&Record) -> bool,
        out: &mut std::collections::VecDeque<(Vec<u8>, Arc<Record>)>,
    ) -> Option<Vec<u8>> {
        let mut entry = match after {
            Some(k) => self.map.lower_bound(Bound::Excluded(k)),
            None => self.map.lower_bound(Bound::Included(from)),
        }?;
        for _ in 1..visit {
            if keep(entry.value()) {
                out.push_back((entry.key().clone(), entry.value().clone()));
            }
            entry = entry.next()?;
        }
        if keep(entry.value()) {
            out.push_back((entry.key().clone(), entry.value().clone()));
        }
        Some(entry.key().clone())
    }

    /// Every record in key order.
    pub fn iter(&self) -> impl Iterator<Item = (Vec<u8>, Arc<Record>)> + '_ {
        self.map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_sizes_lie_in_the_last_quarter_and_differ() {
        let limit = 64 << 20;
        let sizes: Vec<usize> = (0..200).map(|_| flush_size(limit)).collect();
        assert!(
            sizes
                .iter()
                .all(|s| (limit - limit / 4..=limit).contains(s))
        );
        let spread = sizes.iter().max().unwrap() - sizes.iter().min().unwrap();
        // 200 uniform draws over 16 MiB span far more than a tenth of it (a failure here has
        // a probability far below 2^-60).
        assert!(spread > limit / 40, "{spread}");
    }

    #[test]
    fn a_memtable_is_full_at_its_own_size() {
        let table = Memtable::new(300);
        let record = |i: u8| {
            Arc::new(Record::put(
                "t",
                vec![i],
                crate::vclock::Version::new(crate::vclock::VectorClock::from_entries([("c", 1)])),
                "v",
            ))
        };
        let mut i = 0;
        while table.size_bytes() < 300 {
            assert!(!table.is_full());
            table.insert(vec![i], record(i), u64::from(i) + 1);
            i += 1;
        }
        assert!(table.is_full());
    }
}
