//! Records and internal keys. A record is checked against `crate::limits` before it is logged.
//!
//! Internal key = tenant id bytes, 0x00, user key bytes. Tenant ids never contain NUL, so
//! byte order of internal keys is order by (tenant, key): one tenant's keys are contiguous and
//! sorted, which is what tenant scans rely on.

use bytes::Bytes;

use crate::limits::{check_key, check_storage_tenant, check_value_len};
use crate::ring::{HashRange, key_position};
use crate::vclock::{MAX_WIRE_ENTRIES, Version};

use super::error::EngineError;

/// One stored version of one key: a value, or a tombstone (`value == None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub tenant: String,
    pub key: Bytes,
    pub version: Version,
    /// `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Ring position of (tenant, key); always [`key_position`] of them.
    pub ring_hash: u64,
    /// When the value expires (milliseconds since the Unix epoch), for a put written with a
    /// time to live; `None` for values that never expire and for tombstones. Chosen once by
    /// the coordinator that minted the version and stored with it unchanged everywhere, so
    /// every replica holding a version agrees on its expiry. The engine never hides an
    /// expired value (readers decide by their own clock); compaction purges it like a
    /// tombstone written at the expiry ([`Record::purge_after_ms`]).
    pub expires_at_ms: Option<u64>,
}

impl Record {
    pub fn put(
        tenant: impl Into<String>,
        key: impl Into<Bytes>,
        version: Version,
        value: impl Into<Bytes>,
    ) -> Self {
        Self::new(tenant.into(), key.into(), version, Some(value.into()))
    }

    pub fn tombstone(tenant: impl Into<String>, key: impl Into<Bytes>, version: Version) -> Self {
        Self::new(tenant.into(), key.into(), version, None)
    }

    /// The same record expiring at `expires_at_ms` (`None`: never).
    pub fn expiring(mut self, expires_at_ms: Option<u64>) -> Self {
        self.expires_at_ms = expires_at_ms;
        self
    }

    fn new(tenant: String, key: Bytes, version: Version, value: Option<Bytes>) -> Self {
        let ring_hash = key_position(&tenant, &key);
        Self {
            tenant,
            key,
            version,
            value,
            ring_hash,
            expires_at_ms: None,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// From when on (ms since the Unix epoch) the record stands for "no value": a tombstone
    /// from its write, an expiring value from its expiry, a value without expiry never.
    /// Compaction may purge it `gc_grace` after that point (and only once its range was
    /// repaired after the version was written: see `TombstoneGate`).
    pub fn purge_after_ms(&self) -> Option<u64> {
        match (&self.value, self.expires_at_ms) {
            (None, _) => Some(self.version.timestamp_ms()),
            (Some(_), expiry) => expiry,
        }
    }

    /// The internal key of this record.
    pub fn internal_key(&self) -> Vec<u8> {
        internal_key(&self.tenant, &self.key)
    }

    /// Bytes of memory this record holds once in an `Arc` (the struct, its heap buffers,
    /// and about 16 bytes of allocator rounding per buffer), for the memtable's and the row
    /// cache's budgets. Counts the key and value by length, so it holds for records whose
    /// buffers are their own ([`Record::with_own_buffers`]).
    pub fn memory_bytes(&self) -> usize {
        const ARC_COUNTS: usize = 16;
        const PER_BUFFER: usize = 16;
        let buffers = 3 + self.version.clock.len() + usize::from(self.value.is_some());
        std::mem::size_of::<Record>()
            + ARC_COUNTS
            + self.tenant.capacity()
            + self.key.len()
            + self.value.as_ref().map_or(0, Bytes::len)
            + self.version.clock.heap_bytes()
            + buffers * PER_BUFFER
    }

    /// The record with its key and value copied into buffers of their own. A record decoded
    /// from a request shares the request's receive buffer; kept in the memtable or the row
    /// cache as it is, one small record would pin that whole buffer, memory no budget counts.
    pub fn with_own_buffers(mut self) -> Self {
        self.key = Bytes::copy_from_slice(&self.key);
        self.value = self.value.as_deref().map(Bytes::copy_from_slice);
        self
    }

    /// Approximate bytes this record occupies on disk (and on the wire).
    pub fn size_estimate(&self) -> usize {
        let clock: usize = self.version.clock.iter().map(|(id, _)| id.len() + 9).sum();
        let expiry = if self.expires_at_ms.is_some() { 8 } else { 0 };
        self.tenant.len()
            + self.key.len()
            + self.value.as_ref().map_or(0, Bytes::len)
            + clock
            + expiry
            + 24
    }

    /// Checks the limits of STORAGE.md; called before anything touches the log.
    pub fn validate(&self) -> Result<(), EngineError> {
        check_storage_tenant(&self.tenant)?;
        check_key(&self.key)?;
        check_value_len(self.value.as_ref().map_or(0, Bytes::len))?;
        self.version
            .clock
            .validate(MAX_WIRE_ENTRIES)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        if self.version.clock.is_empty() {
            return Err(EngineError::InvalidArgument(
                "a record needs a non-empty vector clock".to_owned(),
            ));
        }
        if self.value.is_none() && self.expires_at_ms.is_some() {
            return Err(EngineError::InvalidArgument(
                "a tombstone cannot expire".to_owned(),
            ));
        }
        Ok(())
    }
}

/// `tenant ++ 0x00 ++ key`.
pub fn internal_key(tenant: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + key.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// The ring position of the record stored under `ikey`: [`key_position`] of its tenant and
/// key, which hashes exactly the internal key's bytes (tables of format 2 recompute it).
pub fn ring_position_of_internal_key(ikey: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(ikey)
}

/// Splits an internal key back into (tenant, key).
pub fn split_internal_key(ikey: &[u8]) -> Option<(&str, &[u8])> {
    let nul = ikey.iter().position(|b| *b == 0)?;
    let tenant = std::str::from_utf8(ikey.get(..nul)?).ok()?;
    Some((tenant, ikey.get(nul + 1..)?))
}

/// What `apply` did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The record is now the stored version.
    Applied,
    /// The stored version dominates or equals it (or wins last-write-wins); nothing changed.
    /// `stored` is that version (durable by the time the outcome is returned), so a coordinator
    /// can tell a concurrent version that beat its write from one that dominates it.
    Ignored { stored: Version },
}

impl ApplyOutcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, ApplyOutcome::Applied)
    }
}

/// Records a range drop removes: those of `tenants` (every tenant when `None`) whose ring hash
/// lies in one of `ranges`. Tenants with different replication factors own different ranges,
/// so a cleanup drops per group of tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDrop {
    pub tenants: Option<std::collections::BTreeSet<String>>,
    pub ranges: Vec<HashRange>,
}

impl RangeDrop {
    pub fn covers(&self, tenant: &str, ring_hash: u64) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
            && HashRange::any_contains(&self.ranges, ring_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{LimitError, MAX_KEY_BYTES, MAX_VALUE_BYTES};
    use crate::vclock::VectorClock;

    fn version() -> Version {
        Version::new(VectorClock::from_entries([("c1", 1u64)]))
    }

    #[test]
    fn an_internal_key_gives_back_the_ring_position_of_its_tenant_and_key() {
        for (tenant, key) in [("t", &b"k"[..]), ("acme:2", b""), ("a", b"\0\xff")] {
            assert_eq!(
                ring_position_of_internal_key(&internal_key(tenant, key)),
                key_position(tenant, key)
            );
        }
    }

    #[test]
    fn internal_keys_sort_by_tenant_then_key() {
        let a = internal_key("a", b"zzz");
        let ab = internal_key("ab", b"");
        let b = internal_key("b", b"a");
        assert!(a < ab && ab < b);
        assert_eq!(split_internal_key(&a), Some(("a", &b"zzz"[..])));
    }

    #[test]
    fn limits_are_enforced() {
        assert!(Record::put("t", "k", version(), "v").validate().is_ok());
        let cases = [
            Record::put("", "k", version(), "v"),
            Record::put("a:b", "k", version(), "v"),
            Record::put("a\0b", "k", version(), "v"),
            Record::put("t", "", version(), "v"),
            Record::put("t", vec![b'k'; MAX_KEY_BYTES + 1], version(), "v"),
            Record::put("t", "k", version(), vec![0u8; MAX_VALUE_BYTES + 1]),
            Record::put("t", "k", Version::default(), "v"),
        ];
        for r in cases {
            assert!(r.validate().is_err(), "{:?} should be rejected", r.tenant);
        }
        assert!(matches!(
            Record::put("t", vec![b'k'; 2000], version(), "v").validate(),
            Err(EngineError::Limit(LimitError::KeyTooLarge { .. }))
        ));
    }
}
