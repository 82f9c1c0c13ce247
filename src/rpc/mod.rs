//! Generated gRPC code (see `build.rs`) and the conversions between protobuf and domain types.
//!
//! Module nesting mirrors the protobuf packages (`pairdb.<name>.v1`) because the generated
//! code refers to sibling packages by relative paths.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("pairdb.common.v1");
        }
    }
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("pairdb.storage.v1");
        }
    }
    pub mod coordinator {
        pub mod v1 {
            tonic::include_proto!("pairdb.coordinator.v1");
        }
    }
}

pub mod auth;
pub mod detail;
pub mod tls;
pub mod trace;

/// A storage node's `WatchHealth` stream sends the membership at least this often, changed or
/// not, so a watcher can tell a live stream from one a partition silently cut.
pub const WATCH_HEALTH_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest gRPC message between pairdb processes: a 10 MiB value plus its record, or a batch.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of records per `WriteBatch` a coordinator sends of its own (hint deliveries, a
/// cleanup's hand-over), at most (a batch holds at least one record): large values never make
/// a message the target refuses ([`MAX_MESSAGE_BYTES`]).
pub const WRITE_BATCH_BYTES: usize = 4 << 20;

/// `records` in order, cut into batches of at most `max_bytes` encoded bytes each (a record
/// larger than that goes alone).
pub fn byte_batches(records: Vec<storage::Record>, max_bytes: usize) -> Vec<Vec<storage::Record>> {
    let mut batches: Vec<Vec<storage::Record>> = Vec::new();
    let mut bytes = 0;
    for record in records {
        let size = prost::Message::encoded_len(&record);
        match batches.last_mut() {
            Some(last) if bytes + size <= max_bytes => last.push(record),
            _ => {
                batches.push(vec![record]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    batches
}

pub use pb::common::v1 as common;
pub use pb::coordinator::v1 as coordinator;
pub use pb::storage::v1 as storage;

use crate::mux::Tagged;
use crate::quorum::Consistency;
use crate::ring::{HashRange, NodeState};
use crate::vclock::{VectorClock, Version};

impl Tagged for coordinator::KeyValueResult {
    fn tag(&self) -> u64 {
        self.id
    }
}

impl Tagged for storage::BatchResult {
    fn tag(&self) -> u64 {
        self.id
    }
}

/// Clock entries on the wire, sorted by coordinator id.
pub fn clock_to_proto(clock: &VectorClock) -> Vec<common::ClockEntry> {
    clock
        .iter()
        .map(|(id, counter)| common::ClockEntry {
            coordinator_id: id.to_owned(),
            counter,
        })
        .collect()
}

/// Clock entries from the wire (duplicates keep the largest counter; callers validate limits).
pub fn clock_from_proto(entries: &[common::ClockEntry]) -> VectorClock {
    VectorClock::from_entries(
        entries
            .iter()
            .map(|e| (e.coordinator_id.clone(), e.counter)),
    )
}

impl From<&Version> for common::Version {
    fn from(v: &Version) -> Self {
        common::Version {
            clock: clock_to_proto(&v.clock),
            timestamp_ms: v.timestamp_ms(),
        }
    }
}

impl From<&common::Version> for Version {
    /// The wire timestamp is informational: it is derived from the clock (see `vclock`).
    fn from(v: &common::Version) -> Self {
        Version::new(clock_from_proto(&v.clock))
    }
}

impl storage::Record {
    /// The record's version (empty when the field is missing).
    pub fn version(&self) -> Version {
        self.version.as_ref().map(Version::from).unwrap_or_default()
    }
}

impl From<HashRange> for common::HashRange {
    fn from(r: HashRange) -> Self {
        common::HashRange {
            start: r.start,
            end: r.end,
        }
    }
}

impl From<&common::HashRange> for HashRange {
    fn from(r: &common::HashRange) -> Self {
        HashRange::new(r.start, r.end)
    }
}

impl From<Consistency> for common::Consistency {
    fn from(c: Consistency) -> Self {
        match c {
            Consistency::One => common::Consistency::One,
            Consistency::Quorum => common::Consistency::Quorum,
            Consistency::All => common::Consistency::All,
        }
    }
}

impl From<common::Consistency> for Consistency {
    /// Unspecified means the default, QUORUM.
    fn from(c: common::Consistency) -> Self {
        match c {
            common::Consistency::One => Consistency::One,
            common::Consistency::All => Consistency::All,
            common::Consistency::Quorum | common::Consistency::Unspecified => Consistency::Quorum,
        }
    }
}

impl From<NodeState> for common::NodeState {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Active => common::NodeState::Active,
            NodeState::Bootstrapping => common::NodeState::Bootstrapping,
            NodeState::Draining => common::NodeState::Draining,
            NodeState::Down => common::NodeState::Down,
            NodeState::Failed => common::NodeState::Failed,
        }
    }
}

impl TryFrom<common::NodeState> for NodeState {
    type Error = common::NodeState;
    fn try_from(s: common::NodeState) -> Result<Self, Self::Error> {
        match s {
            common::NodeState::Active => Ok(NodeState::Active),
            common::NodeState::Bootstrapping => Ok(NodeState::Bootstrapping),
            common::NodeState::Draining => Ok(NodeState::Draining),
            common::NodeState::Down => Ok(NodeState::Down),
            common::NodeState::Failed => Ok(NodeState::Failed),
            common::NodeState::Unspecified => Err(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_through_proto() {
        let v = Version::new(VectorClock::from_entries([("c1", 5u64 << 12), ("c2", 3)]));
        let wire = common::Version::from(&v);
        assert_eq!(wire.timestamp_ms, v.timestamp_ms());
        assert_eq!(wire.clock[0].coordinator_id, "c1");
        assert_eq!(Version::from(&wire), v);
    }

    #[test]
    fn enums_round_trip_through_proto() {
        for c in [Consistency::One, Consistency::Quorum, Consistency::All] {
            assert_eq!(Consistency::from(common::Consistency::from(c)), c);
        }
        for s in [
            NodeState::Active,
            NodeState::Bootstrapping,
            NodeState::Draining,
            NodeState::Down,
            NodeState::Failed,
        ] {
            assert_eq!(NodeState::try_from(common::NodeState::from(s)), Ok(s));
        }
        let r = HashRange::new(7, 3);
        assert_eq!(HashRange::from(&common::HashRange::from(r)), r);
    }

    fn record(value_bytes: usize) -> storage::Record {
        storage::Record {
            tenant_id: "t".into(),
            key: b"k".to_vec().into(),
            payload: Some(storage::record::Payload::Value(
                vec![0u8; value_bytes].into(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn byte_batches_stay_under_their_budget_and_keep_every_record_in_order() {
        let sizes = [100, 900, 50, 2_000, 10, 10];
        let records: Vec<storage::Record> = sizes.iter().map(|&n| record(n)).collect();
        let encoded: Vec<usize> = records.iter().map(prost::Message::encoded_len).collect();
        let batches = super::byte_batches(records, 1_050);
        let lens: Vec<usize> = batches.iter().map(Vec::len).collect();
        // 100+900 fit (1,017 bytes encoded); 50 would pass 1,050 with them; 2,000 goes alone;
        // 10+10 together.
        assert_eq!(lens, vec![2, 1, 1, 2], "encoded sizes {encoded:?}");
        for batch in &batches {
            let bytes: usize = batch.iter().map(prost::Message::encoded_len).sum();
            assert!(batch.len() == 1 || bytes <= 1_050, "{bytes}");
        }
        let values: Vec<usize> = batches
            .into_iter()
            .flatten()
            .map(|r| match r.payload {
                Some(storage::record::Payload::Value(v)) => v.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(values, sizes);
        assert!(super::byte_batches(Vec::new(), 1_050).is_empty());
    }
}
