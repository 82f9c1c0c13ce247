//! Row cache of hot keys: quick_cache's S3-FIFO (adaptive recency/frequency), sized in bytes.
//!
//! Never stale: writers replace the entry under the key's stripe lock after the memtable
//! insert; readers fill it only under the same lock and only if no write to the stripe happened
//! since their lookup began (see `Engine::get`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::types::Record;

#[derive(Clone)]
struct RecordWeighter;

/// Memory of one cache entry besides its key's buffer and its record: the key's `Vec`, the
/// `Arc`, and the cache's own bookkeeping, rounded up.
const ENTRY_BYTES: usize = 64;

impl Weighter<Vec<u8>, Arc<Record>> for RecordWeighter {
    fn weight(&self, key: &Vec<u8>, record: &Arc<Record>) -> u64 {
        (ENTRY_BYTES + key.capacity() + record.memory_bytes()) as u64
    }
}

pub struct RowCache {
    cache: Option<Cache<Vec<u8>, Arc<Record>, RecordWeighter>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl RowCache {
    /// A cache of at most `bytes` (0 disables it).
    pub fn new(bytes: u64) -> Self {
        let cache = (bytes > 0).then(|| {
            let estimated_items = (bytes / 256).clamp(16, 1 << 24) as usize;
            Cache::with_weighter(estimated_items, bytes, RecordWeighter)
        });
        Self {
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn get(&self, ikey: &[u8]) -> Option<Arc<Record>> {
        let cache = self.cache.as_ref()?;
        let found = cache.get(ikey);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Looks without counting a hit or miss (the write path's read-before-write).
    pub fn peek(&self, ikey: &[u8]) -> Option<Arc<Record>> {
        self.cache.as_ref()?.get(ikey)
    }

    pub fn insert(&self, ikey: Vec<u8>, record: Arc<Record>) {
        if let Some(cache) = &self.cache {
            cache.insert(ikey, record);
        }
    }

    pub fn remove(&self, ikey: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.remove(ikey);
        }
    }

    /// Removes every entry `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&Record) -> bool) {
        if let Some(cache) = &self.cache {
            cache.retain(|_, record| keep(record));
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }
}
