//! Range hash trees for anti-entropy (STORAGE.md, "Anti-entropy"; docs/anti-entropy.md).
//!
//! The ring's hash space is cut into [`SEGMENTS`] fixed *segments* (the top [`SEGMENT_BITS`]
//! bits of a key's ring hash). For every tenant, every segment holds the XOR of the *entry
//! hashes* of the tenant's keys in it, one per key: [`entry_hash`] of (tenant, key, digest of
//! the key's winning version, tombstones included). A node of the tree is the XOR of its
//! segments, so any subtree of any range is computed on demand from the leaves, and two
//! replicas hold the same winners in a set of segments when (with probability 1 - 2^-64 per
//! comparison) the XORs are equal. Tokens of the balanced allocation lie on segment
//! boundaries, so a ring range is a whole number of segments.
//!
//! Kept current incrementally, the way Riak's AAE trees follow writes: XOR is its own
//! inverse, so replacing a key's winner `old` by `new` toggles both entry hashes.
//!
//! # Invariant
//! For every tenant and segment, the stored XOR equals the XOR of the entry hashes of the
//! winners a full scan of the engine would return. The engine keeps it by toggling
//! - on every applied record, under the key's stripe lock, with the winner it replaced (the
//!   same one the winner rule was checked against);
//! - when a compaction removes a key's winner (a tombstone past gc_grace, or a record of a
//!   dropped range), once the result is installed, with every stripe lock held, and only when
//!   no newer version of the key remains (one applied meanwhile already replaced it);
//! - at open, from a full scan (the trees are not persisted).
//!
//! The tree is per tenant, not per replica set: tenants of different replication factors have
//! different replica sets, and a repair compares each tenant only with its own replicas.

use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

use crate::vclock::Version;

pub use crate::ring::{SEGMENT_BITS, SEGMENT_WIDTH};
/// Segments of the hash space (about one key per segment at a million keys per range, so a
/// repair lists few keys besides those that differ).
pub const SEGMENTS: u32 = 1 << SEGMENT_BITS;

/// Groups one `SegmentHashes` call may ask for (storage nodes refuse more; repairers split).
pub const MAX_GROUPS: usize = 1 << 16;
/// Segments one `ListSegments` call may list.
pub const MAX_LISTED_SEGMENTS: usize = 1 << 18;

/// Consecutive segments per lock: a subtree query takes few locks, and writers to different
/// parts of the ring do not contend.
const SHARD_BITS: u32 = 14;
const SHARD_SEGMENTS: usize = 1 << SHARD_BITS;
const SHARDS: usize = 1 << (SEGMENT_BITS - SHARD_BITS);
/// A tenant's shard holding more segments than this becomes an array (8 bytes a segment,
/// 128 KiB a shard) instead of a map (about 24 bytes an entry).
const DENSE_AT: usize = SHARD_SEGMENTS / 4;

/// The segment of a ring position.
pub fn segment_of(ring_hash: u64) -> u32 {
    (ring_hash >> (64 - SEGMENT_BITS)) as u32
}

/// The first ring position of a segment.
pub fn segment_start(segment: u32) -> u64 {
    u64::from(segment) << (64 - SEGMENT_BITS)
}

/// Digest of a version as it is stored: its clock and whether it is a tombstone. Two replicas
/// holding the same write hold the same clock (a clock names one write of one coordinator).
pub fn version_digest(version: &Version, tombstone: bool) -> u64 {
    let mut h = Xxh3::new();
    h.update(&[u8::from(tombstone)]);
    for (id, counter) in version.clock.iter() {
        h.update(id.as_bytes());
        h.update(&[0]);
        h.update(&counter.to_le_bytes());
    }
    h.digest()
}

/// One key's contribution to its segment: its internal key hashed with its version's digest.
pub fn entry_hash(ikey: &[u8], version_digest: u64) -> u64 {
    xxh3_64_with_seed(ikey, version_digest)
}

/// A record's entry hash (what a scan-built tree adds for it).
pub fn record_entry(record: &super::Record) -> u64 {
    entry_hash(
        &record.internal_key(),
        version_digest(&record.version, record.is_tombstone()),
    )
}

/// A run of consecutive segments whose XOR is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentGroup {
    pub first: u32,
    /// At least 1; the group ends at the last segment at most.
    pub count: u32,
}

/// One tenant's segments of one shard, keyed by segment.
enum Segments {
    Sparse(BTreeMap<u32, u64>),
    /// Indexed by segment minus the shard's first segment.
    Dense(Box<[u64]>),
}

impl Segments {
    fn toggle(&mut self, segment: u32, entry: u64) {
        match self {
            Segments::Sparse(map) => {
                let slot = map.entry(segment).or_insert(0);
                *slot ^= entry;
                if *slot == 0 {
                    map.remove(&segment);
                } else if map.len() > DENSE_AT {
                    let mut dense = vec![0u64; SHARD_SEGMENTS].into_boxed_slice();
                    for (s, h) in map.iter() {
                        if let Some(slot) = dense.get_mut(*s as usize % SHARD_SEGMENTS) {
                            *slot = *h;
                        }
                    }
                    *self = Segments::Dense(dense);
                }
            }
            Segments::Dense(array) => {
                if let Some(slot) = array.get_mut(segment as usize % SHARD_SEGMENTS) {
                    *slot ^= entry;
                }
            }
        }
    }

    /// XOR of the segments `first..=last` (both in this shard).
    fn xor(&self, first: u32, last: u32) -> u64 {
        match self {
            Segments::Sparse(map) => map.range(first..=last).fold(0, |acc, (_, h)| acc ^ h),
            Segments::Dense(array) => {
                let (a, b) = (
                    first as usize % SHARD_SEGMENTS,
                    last as usize % SHARD_SEGMENTS,
                );
                array
                    .get(a..=b)
                    .map_or(0, |s| s.iter().fold(0, |acc, h| acc ^ h))
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Segments::Sparse(map) => map.is_empty(),
            // A dense shard stays dense: it had many keys and likely will again.
            Segments::Dense(_) => false,
        }
    }

    /// Non-empty segments, as (segment, XOR), `base` being the shard's first segment.
    fn non_empty(&self, base: u32) -> Vec<(u32, u64)> {
        match self {
            Segments::Sparse(map) => map.iter().map(|(s, h)| (*s, *h)).collect(),
            Segments::Dense(array) => (0u32..)
                .zip(array.iter())
                .filter(|(_, h)| **h != 0)
                .map(|(i, h)| (base + i, *h))
                .collect(),
        }
    }
}

type Shard = HashMap<String, Segments>;

/// The per-tenant segment XORs of one engine.
pub struct RangeTrees {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for RangeTrees {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl RangeTrees {
    /// Toggles `entry` in the segment of `ring_hash` for `tenant`: adds it when absent,
    /// removes it when present.
    pub fn toggle(&self, tenant: &str, ring_hash: u64, entry: u64) {
        let segment = segment_of(ring_hash);
        let mut shard = self.shard(segment).lock();
        let segments = match shard.get_mut(tenant) {
            Some(s) => s,
            None => shard
                .entry(tenant.to_owned())
                .or_insert_with(|| Segments::Sparse(BTreeMap::new())),
        };
        segments.toggle(segment, entry);
        if segments.is_empty() {
            // A tenant's map stays as small as its data.
            shard.remove(tenant);
        }
    }

    /// Forgets every tenant (before a rebuild).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().clear();
        }
    }

    /// The XOR of each group's segments for `tenant` (0 for a group with no keys).
    pub fn group_hashes(&self, tenant: &str, groups: &[SegmentGroup]) -> Vec<u64> {
        groups
            .iter()
            .map(|g| {
                let last = u64::from(g.first) + u64::from(g.count.max(1)) - 1;
                let last = last.min(u64::from(SEGMENTS - 1)) as u32;
                let mut xor = 0u64;
                let mut segment = g.first;
                while segment <= last {
                    let shard_last = (segment | (SHARD_SEGMENTS as u32 - 1)).min(last);
                    if let Some(segments) = self.shard(segment).lock().get(tenant) {
                        xor ^= segments.xor(segment, shard_last);
                    }
                    segment = shard_last + 1;
                }
                xor
            })
            .collect()
    }

    /// Every non-empty segment of `tenant` (tests and tools).
    pub fn segments(&self, tenant: &str) -> BTreeMap<u32, u64> {
        let mut all = BTreeMap::new();
        for (i, shard) in (0u32..).zip(self.shards.iter()) {
            if let Some(segments) = shard.lock().get(tenant) {
                all.extend(segments.non_empty(i << SHARD_BITS));
            }
        }
        all
    }

    /// Every tenant with a shard in the trees (a tenant whose keys all went may stay listed
    /// with empty dense shards).
    pub fn tenants(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().keys().cloned().collect::<Vec<_>>())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "an index modulo SHARDS, the slice's length"
    )]
    fn shard(&self, segment: u32) -> &Mutex<Shard> {
        &self.shards[(segment >> SHARD_BITS) as usize % SHARDS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::VectorClock;

    fn v(c: u64) -> Version {
        Version::new(VectorClock::from_entries([("c1", c)]))
    }

    #[test]
    fn toggling_twice_leaves_nothing() {
        let trees = RangeTrees::default();
        let e = entry_hash(b"t\0k", version_digest(&v(1), false));
        trees.toggle("t", 5, e);
        assert_eq!(trees.segments("t").len(), 1);
        trees.toggle("t", 5, e);
        assert!(trees.segments("t").is_empty());
        assert!(trees.tenants().is_empty());
    }

    #[test]
    fn a_crowded_shard_turns_dense_and_keeps_its_hashes() {
        let trees = RangeTrees::default();
        let n = (DENSE_AT + 10) as u64;
        let mut expected = 0u64;
        for i in 0..n {
            let entry = i * 0x9E37_79B9 + 1;
            trees.toggle("t", segment_start(i as u32), entry);
            expected ^= entry;
        }
        let whole = SegmentGroup {
            first: 0,
            count: SEGMENTS,
        };
        assert_eq!(trees.group_hashes("t", &[whole]), vec![expected]);
        assert_eq!(trees.segments("t").len(), n as usize);
        let first = SegmentGroup { first: 0, count: 1 };
        assert_eq!(trees.group_hashes("t", &[first]), vec![1]);
    }

    #[test]
    fn digests_tell_tombstones_and_clocks_apart() {
        assert_ne!(version_digest(&v(1), false), version_digest(&v(1), true));
        assert_ne!(version_digest(&v(1), false), version_digest(&v(2), false));
    }

    #[test]
    fn groups_xor_their_segments_across_shards() {
        let trees = RangeTrees::default();
        let a = segment_start(3);
        let b = segment_start(500_000) + 7;
        let c = segment_start(SEGMENTS - 1);
        trees.toggle("t", a, 1);
        trees.toggle("t", b, 2);
        trees.toggle("t", c, 4);
        trees.toggle("u", b, 8);
        let all = SegmentGroup {
            first: 0,
            count: SEGMENTS,
        };
        let low = SegmentGroup {
            first: 0,
            count: 500_000,
        };
        let high = SegmentGroup {
            first: 500_000,
            count: u32::MAX,
        };
        assert_eq!(trees.group_hashes("t", &[all, low, high]), vec![7, 1, 6]);
        assert_eq!(trees.group_hashes("u", &[all]), vec![8]);
        assert_eq!(trees.group_hashes("none", &[all]), vec![0]);
    }
}
