//! Row cache of hot keys: quick_cache's S3-FIFO (adaptive recency/frequency), sized in bytes.
//!
//! Compact: an entry holds the record's table body (format 2: kind, expiry, clock, value) in
//! one allocation under its internal key, and a hit decodes it. Cached decoded, a record with
//! a 12-byte key and a 100-byte value was charged 568 bytes (a 136-byte struct, five heap
//! buffers, the cache's bookkeeping); compact, 234. So the same budget holds 2.4x the keys
//! (docs/benchmarks.md, "Round 3, item 1: rerun"); a hit costs a decode instead of an `Arc`
//! clone.
//!
//! Never stale: writers replace the entry under the key's stripe lock after the memtable
//! insert; readers fill it only under the same lock and only if no write to the stripe happened
//! since their lookup began (see `Engine::get`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::codec::{body_v2_len, decode_table_body_v2, encode_body_v2};
use super::types::{Record, ring_position_of_internal_key, split_internal_key};

#[derive(Clone)]
struct BodyWeighter;

/// Memory of one cache entry besides its key's and body's bytes: the key's `Vec`, the body's
/// box, the allocator's rounding of both, and the cache's own bookkeeping, rounded up.
const ENTRY_BYTES: usize = 96;

impl Weighter<Vec<u8>, Box<[u8]>> for BodyWeighter {
    fn weight(&self, key: &Vec<u8>, body: &Box<[u8]>) -> u64 {
        (ENTRY_BYTES + key.capacity() + body.len()) as u64
    }
}

pub struct RowCache {
    cache: Option<Cache<Vec<u8>, Box<[u8]>, BodyWeighter>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl RowCache {
    /// A cache of at most `bytes` (0 disables it).
    pub fn new(bytes: u64) -> Self {
        let cache = (bytes > 0).then(|| {
            let estimated_items = (bytes / 256).clamp(16, 1 << 24) as usize;
            Cache::with_weighter(estimated_items, bytes, BodyWeighter)
        });
        Self {
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn get(&self, ikey: &[u8]) -> Option<Arc<Record>> {
        let found = self.peek(ikey);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Looks without counting a hit or miss (the write path's read-before-write). An entry
    /// that does not decode (only a bug could write one) is dropped and reads as a miss, so the
    /// caller goes to the memtables and tables.
    pub fn peek(&self, ikey: &[u8]) -> Option<Arc<Record>> {
        let cache = self.cache.as_ref()?;
        let body = cache.get(ikey)?;
        match decode_table_body_v2(ikey, &body) {
            Ok(record) => Some(Arc::new(record)),
            Err(_) => {
                cache.remove(ikey);
                None
            }
        }
    }

    pub fn insert(&self, ikey: Vec<u8>, record: Arc<Record>) {
        if let Some(cache) = &self.cache {
            let mut body = Vec::with_capacity(body_v2_len(&record));
            encode_body_v2(&record, &mut body);
            cache.insert(ikey, body.into_boxed_slice());
        }
    }

    pub fn remove(&self, ikey: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.remove(ikey);
        }
    }

    /// Removes every entry for which `keep(tenant, ring hash)` says no.
    pub fn retain(&self, keep: impl Fn(&str, u64) -> bool) {
        if let Some(cache) = &self.cache {
            cache.retain(|ikey, _| {
                split_internal_key(ikey)
                    .is_some_and(|(tenant, _)| keep(tenant, ring_position_of_internal_key(ikey)))
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::{VectorClock, Version};

    fn version(entries: &[(&str, u64)]) -> Version {
        Version::new(VectorClock::from_entries(entries.iter().copied()))
    }

    fn cached(cache: &RowCache, record: Record) -> Arc<Record> {
        cache.insert(record.internal_key(), Arc::new(record.clone()));
        cache
            .get(&record.internal_key())
            .expect("just inserted into a cache with room")
    }

    #[test]
    fn a_cached_record_reads_back_exactly_as_it_was_put() {
        let cache = RowCache::new(1 << 20);
        for record in [
            Record::put(
                "t1",
                &b"plain"[..],
                version(&[("c1", 7), ("c2", 3)]),
                &b"v"[..],
            ),
            Record::put(
                "t1",
                &b"expiring"[..],
                version(&[("c1", 9)]),
                vec![0u8; 300],
            )
            .expiring(Some(1_900_000_000_000)),
            Record::put("t2", &b"empty value"[..], version(&[("c3", 1)]), &b""[..]),
            Record::tombstone("t2", &b"gone"[..], version(&[("c1", 10), ("c9", 2)])),
        ] {
            assert_eq!(*cached(&cache, record.clone()), record);
        }
        assert_eq!(cache.hits(), 4);
        assert!(
            cache
                .get(&crate::engine::internal_key("t1", b"never"))
                .is_none()
        );
        assert_eq!(cache.misses(), 1);
    }

    #[test]
    fn retain_keeps_exactly_the_entries_it_is_told_to() {
        let cache = RowCache::new(1 << 20);
        let a = cached(
            &cache,
            Record::put("a", &b"k1"[..], version(&[("c", 1)]), &b"1"[..]),
        );
        let a2 = cached(
            &cache,
            Record::put("a", &b"k2"[..], version(&[("c", 1)]), &b"2"[..]),
        );
        let b = cached(
            &cache,
            Record::put("b", &b"k1"[..], version(&[("c", 1)]), &b"3"[..]),
        );
        cache.retain(|tenant, ring_hash| tenant == "a" && ring_hash != a2.ring_hash);
        assert!(cache.peek(&a.internal_key()).is_some());
        assert!(cache.peek(&a2.internal_key()).is_none());
        assert!(cache.peek(&b.internal_key()).is_none());
    }

    /// What a 100-byte value costs the budget: its encoded size and a fixed overhead (234
    /// bytes here), not the decoded record's (568 bytes with its buffers).
    #[test]
    fn an_entry_is_charged_about_its_encoded_size() {
        let cache = RowCache::new(1 << 30);
        let n = 1000;
        for i in 0..n {
            let key = format!("key-{i:08}");
            cached(
                &cache,
                Record::put(
                    "tenant",
                    key.into_bytes(),
                    version(&[("coord-1", 5)]),
                    vec![7u8; 100],
                ),
            );
        }
        let per_entry = cache.bytes() / n;
        assert!(per_entry <= 256, "{per_entry} bytes per entry");
    }
}
