//! Conditional writes and deletes (API.md, "Key-value additions"): `if_match` (the key's
//! current version must have exactly this clock) and `if_absent` (the key must have no live
//! version: never written, or deleted).
//!
//! How it works: the coordinator reads the key at the request's consistency, checks the
//! condition against the newest version among the replicas that answered, and writes a new
//! version that causally follows what it read (the tombstone too, for `if_absent` after a
//! delete). If the replicas answer that they hold a concurrent version that beats the write
//! (last-write-wins), the write is reported as VERSION_CONFLICT with that version: it did not
//! become the key's value.
//!
//! What this does not give (docs/coordinator.md, "Conditional writes"): it is a check and a
//! write, not a consensus round (Cassandra's LWT, etcd's txn). Two conditional writers that
//! read the same version at the same moment can both pass the check; their writes are then
//! concurrent, the one with the later timestamp wins, and the other is acknowledged unless its
//! replicas already held the winner when it arrived (then it gets VERSION_CONFLICT). At
//! `quorum` a check also only sees what a quorum of replicas holds.
//!
//! Invariants: a write whose condition failed at the check writes nothing, and the answer holds
//! the version it was checked against. A write answered VERSION_CONFLICT because a concurrent
//! version beat it may have landed on the replicas that did not yet hold that version; the
//! version that beat it takes precedence and replaces it there (by read repair, hints or
//! anti-entropy), so it never becomes the key's value (the fault suite's `conflict-applied`).

use bytes::Bytes;

use crate::meta::Tenant;
use crate::quorum::Consistency;
use crate::rpc::{clock_from_proto, common};
use crate::vclock::{Causality, VectorClock, Version};

use super::Coordinator;
use super::errors::CoordError;
use super::expiry::{Payload, live_value};
use super::write::Written;

/// What a write requires of the key's current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Nothing: an ordinary write.
    Always,
    /// The current live version's clock equals this one.
    IfMatch(VectorClock),
    /// The key has no live version.
    IfAbsent,
}

impl Condition {
    /// The condition of a write request: at most one of `if_match` and `if_absent`, `if_match`
    /// a valid clock of at most `max_entries` entries.
    pub fn of_write(
        if_match: Option<&[common::ClockEntry]>,
        if_absent: bool,
        max_entries: usize,
    ) -> Result<Condition, CoordError> {
        match (if_match, if_absent) {
            (Some(_), true) => Err(CoordError::InvalidRequest(
                "if_match and if_absent cannot both be given".to_owned(),
            )),
            (Some(entries), false) => {
                let clock = clock_from_proto(entries);
                clock
                    .validate(max_entries)
                    .map_err(|e| CoordError::InvalidRequest(format!("if_match: {e}")))?;
                if clock.iter().next().is_none() {
                    return Err(CoordError::InvalidRequest(
                        "if_match is empty: no version has an empty clock (use if_absent)"
                            .to_owned(),
                    ));
                }
                Ok(Condition::IfMatch(clock))
            }
            (None, true) => Ok(Condition::IfAbsent),
            (None, false) => Ok(Condition::Always),
        }
    }

    /// Whether the key's live version (`None`: none) satisfies the condition.
    pub fn holds(&self, live: Option<&Version>) -> bool {
        match (self, live) {
            (Condition::Always, _) => true,
            (Condition::IfAbsent, live) => live.is_none(),
            (Condition::IfMatch(_), None) => false,
            (Condition::IfMatch(clock), Some(v)) => v.clock.compare(clock) == Causality::Equal,
        }
    }

    /// Bytes that tell conditions apart, for idempotency fingerprints.
    pub fn fingerprint_bytes(&self) -> Vec<u8> {
        match self {
            Condition::Always => b"-".to_vec(),
            Condition::IfAbsent => b"absent".to_vec(),
            Condition::IfMatch(clock) => {
                let mut out = b"match".to_vec();
                for (id, counter) in clock.iter() {
                    out.extend_from_slice(&(id.len() as u64).to_le_bytes());
                    out.extend_from_slice(id.as_bytes());
                    out.extend_from_slice(&counter.to_le_bytes());
                }
                out
            }
        }
    }
}

impl Coordinator {
    /// Writes `payload` under `condition`, read and written at
    /// `level`; an ordinary write for [`Condition::Always`]. See the module doc.
    pub(super) async fn write_if(
        &self,
        tenant: &Tenant,
        key: &Bytes,
        payload: Payload<'_>,
        context: Option<&VectorClock>,
        condition: &Condition,
        level: Consistency,
    ) -> Result<Written, CoordError> {
        if *condition == Condition::Always {
            return self.write(tenant, key, payload, context, level).await;
        }
        let stored = self.read_winner(tenant, key, level).await?;
        let seen = stored
            .as_ref()
            .and_then(|r| r.version.as_ref())
            .map(Version::from);
        // An expired value is absent, like a tombstone.
        let now = crate::wallclock::now_ms();
        let live = stored
            .as_ref()
            .and_then(|r| live_value(r, now))
            .and(seen.clone());
        if !condition.holds(live.as_ref()) {
            metrics::counter!("pairdb_conditional_writes_total", "outcome" => "conflict")
                .increment(1);
            return Err(CoordError::VersionConflict { current: live });
        }
        // The new version follows what was read, a tombstone or an expired value included.
        let after = seen.map(|v| v.clock).unwrap_or_default();
        let written = self
            .write(tenant, key, payload, Some(&after), level)
            .await?;
        if written.superseded {
            metrics::counter!("pairdb_conditional_writes_total", "outcome" => "superseded")
                .increment(1);
            return Err(CoordError::VersionConflict {
                current: Some(written.version),
            });
        }
        metrics::counter!("pairdb_conditional_writes_total", "outcome" => "written").increment(1);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, counter: u64) -> common::ClockEntry {
        common::ClockEntry {
            coordinator_id: id.to_owned(),
            counter,
        }
    }

    #[test]
    fn conditions_are_parsed_and_checked() {
        let v = Version::new(VectorClock::from_entries([("c1", 5u64), ("c2", 7)]));
        let exact = Condition::of_write(Some(&[entry("c2", 7), entry("c1", 5)]), false, 10)
            .expect("if_match");
        assert!(exact.holds(Some(&v)), "order of entries does not matter");
        assert!(!exact.holds(None));
        let older = Condition::of_write(Some(&[entry("c1", 5)]), false, 10).expect("if_match");
        assert!(!older.holds(Some(&v)), "a dominated clock is not a match");
        let absent = Condition::of_write(None, true, 10).expect("if_absent");
        assert!(absent.holds(None) && !absent.holds(Some(&v)));
        assert!(
            Condition::of_write(None, false, 10)
                .expect("none")
                .holds(Some(&v))
        );
        for bad in [
            Condition::of_write(Some(&[entry("c1", 5)]), true, 10),
            Condition::of_write(Some(&[]), false, 10),
            Condition::of_write(Some(&[entry("c1", 1), entry("c2", 1)]), false, 1),
        ] {
            assert!(matches!(bad, Err(CoordError::InvalidRequest(_))), "{bad:?}");
        }
        assert_ne!(exact.fingerprint_bytes(), older.fingerprint_bytes());
        assert_ne!(
            absent.fingerprint_bytes(),
            Condition::Always.fingerprint_bytes()
        );
    }
}
