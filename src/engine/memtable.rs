//! The memtable: an ordered, lock-free skiplist of the newest record per internal key.
//!
//! Invariants: at most one record per key (an insert replaces; the engine only inserts winners,
//! see `engine/mod.rs`); `max_seq` is the highest commit-log sequence inserted, so once this
//! memtable is in an SSTable every log record up to `max_seq` is too.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_skiplist::SkipMap;

use super::types::Record;

/// Memory of one skiplist entry besides its key's buffer and its record: the node (reference
/// count, height, the key's `Vec` and the record's `Arc`) and its tower of next pointers
/// (1.33 on average, up to 32), rounded up.
const SKIPLIST_NODE_BYTES: usize = 80;

#[derive(Default)]
pub struct Memtable {
    map: SkipMap<Vec<u8>, Arc<Record>>,
    bytes: AtomicUsize,
    max_seq: AtomicU64,
}

impl Memtable {
    pub fn new() -> Self {
        Self::default()
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

    /// The first entry with key > `after` (or >= `from` when `after` is `None`), for cursors
    /// that must not borrow the map.
    pub fn next_after(&self, after: Option<&[u8]>, from: &[u8]) -> Option<(Vec<u8>, Arc<Record>)> {
        let entry = match after {
            Some(k) => self.map.lower_bound(Bound::Excluded(k)),
            None => self.map.lower_bound(Bound::Included(from)),
        }?;
        Some((entry.key().clone(), entry.value().clone()))
    }

    /// Every record in key order.
    pub fn iter(&self) -> impl Iterator<Item = (Vec<u8>, Arc<Record>)> + '_ {
        self.map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
    }
}
