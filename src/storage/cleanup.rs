//! A storage node's part of cleanup (SEMANTICS.md, "Topology changes"): answering whether it
//! holds given versions (the new owners' side of the verification), and dropping the ranges it
//! no longer owns (the old owner's side). The coordinator decides what to verify and drop.
//!
//! Invariants: "held" means the stored version equals the asked one or takes precedence over
//! it (the same order writes are applied in), so a key overwritten since counts as held. A drop
//! only ever removes what its request names, per group of tenants, and writes no tombstones:
//! the records leave in one major compaction, atomically across crashes
//! ([`Engine::drop_ranges`]).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

use super::errors::StorageError;

use bytes::Bytes;

use crate::engine::{Engine, EngineError, RangeDrop};
use crate::limits::{check_key, check_storage_tenant};
use crate::ring::HashRange;
use crate::rpc::storage as pb;
use crate::vclock::Version;

use super::errors::invalid;

/// Most entries one `HeldVersions` call may ask about.
pub const MAX_HELD_ENTRIES: usize = 10_000;
/// Most tenants or ranges one `DropRanges` call may name.
pub const MAX_DROP_ITEMS: usize = 100_000;

/// The checked entries of a `HeldVersions` request.
pub fn parse_held(
    req: pb::HeldVersionsRequest,
) -> Result<Vec<(String, Bytes, Version)>, StorageError> {
    if req.entries.len() > MAX_HELD_ENTRIES {
        return Err(invalid(format!(
            "at most {MAX_HELD_ENTRIES} entries per HeldVersions call"
        )));
    }
    req.entries
        .into_iter()
        .map(|e| {
            check_storage_tenant(&e.tenant_id).map_err(|err| invalid(err.to_string()))?;
            check_key(&e.key).map_err(|err| invalid(err.to_string()))?;
            let version = e
                .version
                .as_ref()
                .map(Version::from)
                .ok_or_else(|| invalid("entry without a version"))?;
            Ok((e.tenant_id, e.key, version))
        })
        .collect()
}

/// Whether the engine holds each version or one that takes precedence over it.
pub fn held(
    engine: &Engine,
    entries: &[(String, Bytes, Version)],
) -> Result<Vec<bool>, EngineError> {
    entries
        .iter()
        .map(|(tenant, key, version)| {
            Ok(engine
                .get(tenant, key)?
                .is_some_and(|stored| stored.version.precedence(version) != Ordering::Less))
        })
        .collect()
}

/// The checked drops of a `DropRanges` request.
pub fn parse_drops(req: pb::DropRangesRequest) -> Result<Vec<RangeDrop>, StorageError> {
    let items: usize = req
        .drops
        .iter()
        .map(|d| d.tenant_ids.len() + d.ranges.len())
        .sum();
    if items > MAX_DROP_ITEMS {
        return Err(invalid(format!(
            "at most {MAX_DROP_ITEMS} tenants and ranges per DropRanges call"
        )));
    }
    req.drops
        .into_iter()
        .map(|d| {
            // Every tenant named: an empty list would drop every tenant's records.
            if d.tenant_ids.is_empty() {
                return Err(invalid("a drop names no tenant"));
            }
            for t in &d.tenant_ids {
                check_storage_tenant(t).map_err(|err| invalid(err.to_string()))?;
            }
            let ranges: Vec<HashRange> = d.ranges.iter().map(HashRange::from).collect();
            // start == end is the whole ring: never what a cleanup means.
            if ranges.iter().any(|r| r.start == r.end) {
                return Err(invalid("a drop range is empty or the whole ring"));
            }
            Ok(RangeDrop {
                tenants: Some(d.tenant_ids.into_iter().collect::<BTreeSet<String>>()),
                ranges,
            })
        })
        .collect()
}

/// Drops `drops`; returns (records dropped, bytes before, bytes after).
/// Drops every record of the namespaces `tenants` (deleted tenants) that this node holds. The
/// range trees say which tenants have records, so a namespace held nowhere costs no rewrite;
/// when the trees are incomplete (a damaged table at open), every named one is dropped.
pub fn drop_tenants(
    engine: &Arc<Engine>,
    tenants: Vec<String>,
) -> Result<pb::DropRangesResponse, EngineError> {
    let held: BTreeSet<String> = engine.tenants().into_iter().collect();
    let trees_complete = engine.trees_complete();
    let present: BTreeSet<String> = tenants
        .into_iter()
        .filter(|t| !trees_complete || held.contains(t))
        .collect();
    if present.is_empty() {
        return Ok(pb::DropRangesResponse::default());
    }
    tracing::info!(tenants = ?present, "dropping the records of deleted tenants");
    drop_ranges(
        engine,
        &[RangeDrop {
            tenants: Some(present),
            ranges: vec![HashRange::FULL],
        }],
    )
}

pub fn drop_ranges(
    engine: &Arc<Engine>,
    drops: &[RangeDrop],
) -> Result<pb::DropRangesResponse, EngineError> {
    let bytes = |e: &Engine| {
        let stats = e.stats();
        stats.sstable_bytes + stats.memtable_bytes
    };
    let before = bytes(engine);
    let dropped = engine.drop_ranges(drops)?;
    let after = bytes(engine);
    metrics::counter!("pairdb_cleanup_records_dropped_total").increment(dropped);
    metrics::counter!("pairdb_cleanup_bytes_reclaimed_total")
        .increment(before.saturating_sub(after));
    tracing::info!(
        records = dropped,
        bytes_before = before,
        bytes_after = after,
        "cleanup dropped ranges this node no longer owns"
    );
    Ok(pb::DropRangesResponse {
        records_dropped: dropped,
        bytes_before: before,
        bytes_after: after,
    })
}
