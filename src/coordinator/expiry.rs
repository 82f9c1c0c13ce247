//! Time to live (API.md, "Key-value additions"; docs/coordinator.md, "Time to live").
//!
//! A write may carry `ttl_seconds`. The coordinator turns it into an absolute expiry, the new
//! version's timestamp plus the TTL, and stores it with the value in the record
//! (`Record.expires_at_ms`). The expiry is chosen once per version and travels with it
//! unchanged (replication, hints, read repair, streams, anti-entropy), so every replica that
//! holds a version agrees on when it expires; no node runs a timer.
//!
//! Invariants:
//! - Whether a value is live is decided by the coordinator serving the request, by its clock,
//!   after the winner was chosen: an expired winner reads as absent (KEY_NOT_FOUND), it does
//!   not let an older version through. Expiry never changes which version wins.
//! - A new write after an expired value still follows its version (the expired value is in the
//!   causal context like a tombstone), so it dominates it.
//! - Storage nodes keep expired values until compaction purges them `gc_grace` after the
//!   expiry, under the same zombie-proof gate as tombstones (engine `may_purge`).

use bytes::Bytes;

use crate::rpc::storage;
use crate::vclock::Version;

use super::errors::CoordError;

pub use crate::limits::MAX_TTL_SECONDS;

/// Latest instant RFC 3339 (four-digit years) can show: 9999-12-31T23:59:59.999Z.
const MAX_SHOWN_MS: u64 = 253_402_300_799_999;

/// What a write stores.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// A value; `ttl_seconds` 0: it never expires.
    Value {
        bytes: &'a Bytes,
        ttl_seconds: u64,
    },
    Tombstone,
}

impl<'a> Payload<'a> {
    /// A value that never expires.
    pub fn value(bytes: &'a Bytes) -> Self {
        Payload::Value {
            bytes,
            ttl_seconds: 0,
        }
    }

    /// The record payload and expiry (ms since the Unix epoch, 0: never) under `version`.
    pub fn to_record_parts(self, version: &Version) -> (storage::record::Payload, u64) {
        match self {
            Payload::Value { bytes, ttl_seconds } => (
                storage::record::Payload::Value(bytes.clone()),
                expiry_of(version, ttl_seconds),
            ),
            Payload::Tombstone => (
                storage::record::Payload::Tombstone(storage::Tombstone {}),
                0,
            ),
        }
    }
}

/// Checks a requested time to live (0: none).
pub fn check_ttl(ttl_seconds: u64) -> Result<(), CoordError> {
    if ttl_seconds > MAX_TTL_SECONDS {
        return Err(CoordError::InvalidRequest(format!(
            "ttl_seconds must be 1..={MAX_TTL_SECONDS} (ten years)"
        )));
    }
    Ok(())
}

/// The expiry of a value written under `version` with `ttl_seconds` (0: never).
pub fn expiry_of(version: &Version, ttl_seconds: u64) -> u64 {
    match ttl_seconds {
        0 => 0,
        ttl => version
            .timestamp_ms()
            .saturating_add(ttl.saturating_mul(1000)),
    }
}

/// Whether a stored record has expired at `now_ms`.
pub fn expired(record: &storage::Record, now_ms: u64) -> bool {
    record.expires_at_ms != 0 && record.expires_at_ms <= now_ms
}

/// The value of a winning record if it is live at `now_ms`: not a tombstone, not expired.
pub fn live_value(record: &storage::Record, now_ms: u64) -> Option<&Bytes> {
    match &record.payload {
        Some(storage::record::Payload::Value(v)) if !expired(record, now_ms) => Some(v),
        _ => None,
    }
}

/// An expiry as API.md shows it: RFC 3339 with milliseconds; empty for "never".
pub fn expires_at_text(expires_at_ms: u64) -> String {
    match expires_at_ms {
        0 => String::new(),
        ms => super::admin::rfc3339(ms.min(MAX_SHOWN_MS) as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::{CLOCK_EPOCH_MS, LOGICAL_BITS, VectorClock};

    fn version_at(ms: u64) -> Version {
        Version::new(VectorClock::from_entries([(
            "c1",
            (ms - CLOCK_EPOCH_MS) << LOGICAL_BITS,
        )]))
    }

    fn record(value: Option<&str>, expires_at_ms: u64) -> storage::Record {
        storage::Record {
            payload: Some(match value {
                Some(v) => storage::record::Payload::Value(Bytes::from(v.to_owned())),
                None => storage::record::Payload::Tombstone(storage::Tombstone {}),
            }),
            expires_at_ms,
            ..storage::Record::default()
        }
    }

    #[test]
    fn the_expiry_is_the_versions_timestamp_plus_the_ttl() {
        let v = version_at(1_800_000_000_000);
        assert_eq!(expiry_of(&v, 0), 0);
        assert_eq!(expiry_of(&v, 30), 1_800_000_030_000);
        assert_eq!(
            expiry_of(&v, MAX_TTL_SECONDS),
            1_800_000_000_000 + MAX_TTL_SECONDS * 1000
        );
    }

    #[test]
    fn a_value_is_live_until_its_expiry_and_a_tombstone_never() {
        let v = record(Some("1"), 1_000);
        assert!(live_value(&v, 999).is_some());
        assert!(live_value(&v, 1_000).is_none(), "expired at the instant");
        assert!(live_value(&record(Some("1"), 0), u64::MAX).is_some());
        assert!(live_value(&record(None, 0), 0).is_none());
    }

    #[test]
    fn ttls_beyond_ten_years_are_refused() {
        assert!(check_ttl(0).is_ok());
        assert!(check_ttl(MAX_TTL_SECONDS).is_ok());
        assert!(check_ttl(MAX_TTL_SECONDS + 1).is_err());
    }

    #[test]
    fn any_expiry_shows_as_rfc3339_without_panicking() {
        assert_eq!(expires_at_text(0), "");
        assert_eq!(expires_at_text(1_000), "1970-01-01T00:00:01.000Z");
        assert_eq!(expires_at_text(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
