//! The storage node's side of anti-entropy (STORAGE.md, "Anti-entropy"): the XORs of a
//! tenant's range-tree segments, and the listing of the keys in chosen segments with their
//! versions' digests. Both answer from the engine's incremental trees and one scan of the
//! tenant; a repair coordinator walks the trees with them and fixes only the keys that differ.
//!
//! Every request is bounded before any work (group and segment counts), and every segment
//! number is checked against the tree's size: a peer's bytes are not trusted. A listing's scan
//! is paced by the node's `repair_scan_rate_limit` (bytes of records read per second), so a
//! repair's scans leave the disk and CPU to foreground requests (Cassandra throttles its
//! validation compactions the same way).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::engine::trees::{
    MAX_GROUPS, MAX_LISTED_SEGMENTS, SEGMENTS, SegmentGroup, segment_of, version_digest,
};
use crate::engine::{Engine, EngineError};
use crate::limits::check_storage_tenant;
use crate::ring::HashRange;
use crate::rpc::storage as pb;

use crate::shutdown::Tasks;

use super::background::BackgroundPool;
use super::errors::{StorageError, invalid};
use super::repaired_ranges::RepairedRanges;
use super::throttle::Throttle;

/// Entries per `ListSegments` message.
const LIST_BATCH: usize = 4096;
/// Bytes of records a listing scans between two waits for its pace.
const PACE_STEP: u64 = 256 << 10;
/// Ranges one `MarkRepaired` call may record.
pub const MAX_MARKS: usize = 1 << 16;

/// The XOR of each requested group of the tenant's segments.
pub async fn segment_hashes(
    engine: Arc<Engine>,
    req: pb::SegmentHashesRequest,
) -> Result<pb::SegmentHashesResponse, StorageError> {
    check_storage_tenant(&req.tenant_id).map_err(|e| invalid(e.to_string()))?;
    if req.groups.len() > MAX_GROUPS {
        return Err(invalid(format!(
            "{} groups asked, at most {MAX_GROUPS} per call",
            req.groups.len()
        )));
    }
    let groups = req
        .groups
        .iter()
        .map(|g| {
            if g.first >= SEGMENTS || g.count == 0 {
                return Err(invalid(format!(
                    "segment group {}+{} outside the {SEGMENTS} segments or empty",
                    g.first, g.count
                )));
            }
            Ok(SegmentGroup {
                first: g.first,
                count: g.count,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hashes =
        tokio::task::spawn_blocking(move || engine.segment_hashes(&req.tenant_id, &groups))
            .await
            .map_err(|e| StorageError::Internal(format!("tree task failed: {e}")))??;
    Ok(pb::SegmentHashesResponse { hashes })
}

/// Streams (key, version digest) of every key of the tenant in the requested segments, in
/// key order, from one scan of the tenant.
pub fn list_segments(
    engine: Arc<Engine>,
    req: pb::ListSegmentsRequest,
    pace: Option<Arc<Throttle>>,
    background: &BackgroundPool,
    tasks: &Tasks,
) -> Result<mpsc::Receiver<Result<pb::ListSegmentsBatch, StorageError>>, StorageError> {
    check_storage_tenant(&req.tenant_id).map_err(|e| invalid(e.to_string()))?;
    if req.segments.len() > MAX_LISTED_SEGMENTS {
        return Err(invalid(format!(
            "{} segments asked, at most {MAX_LISTED_SEGMENTS} per call",
            req.segments.len()
        )));
    }
    if let Some(bad) = req.segments.iter().find(|s| **s >= SEGMENTS) {
        return Err(invalid(format!(
            "segment {bad} outside the {SEGMENTS} segments"
        )));
    }
    // The trees must be whole for a listing to mean anything next to them.
    engine.segment_hashes(&req.tenant_id, &[])?;
    let wanted: HashSet<u32> = req.segments.into_iter().collect();
    let (tx, rx) = mpsc::channel(4);
    background.spawn(tasks, move || {
        let send_err = |e: EngineError| {
            let _ = tx.blocking_send(Err(StorageError::from(e)));
        };
        let scan = match engine.scan_tenant(&req.tenant_id) {
            Ok(scan) => scan,
            Err(e) => return send_err(e),
        };
        let mut entries = Vec::with_capacity(LIST_BATCH);
        let mut scanned = 0u64;
        for item in scan {
            let record = match item {
                Ok(r) => r,
                Err(e) => return send_err(e),
            };
            if let Some(pace) = &pace {
                scanned += record.size_estimate() as u64;
                if scanned >= PACE_STEP {
                    futures::executor::block_on(pace.take(scanned));
                    scanned = 0;
                }
            }
            // A tombstone this node may purge is left out: a repair must not send it back to a
            // replica that already collected it (both sides list neither).
            if !wanted.contains(&segment_of(record.ring_hash)) || engine.purgeable(&record) {
                continue;
            }
            entries.push(pb::SegmentEntry {
                key: record.key.clone(),
                digest: version_digest(&record.version, record.is_tombstone()),
                version: Some((&record.version).into()),
            });
            if entries.len() == LIST_BATCH {
                let batch = std::mem::replace(&mut entries, Vec::with_capacity(LIST_BATCH));
                if tx
                    .blocking_send(Ok(pb::ListSegmentsBatch { entries: batch }))
                    .is_err()
                {
                    return;
                }
            }
        }
        if !entries.is_empty() {
            let _ = tx.blocking_send(Ok(pb::ListSegmentsBatch { entries }));
        }
    });
    Ok(rx)
}

/// Records the repaired ranges of a `MarkRepaired` call, durably.
pub async fn mark_repaired(
    repaired: Arc<RepairedRanges>,
    req: pb::MarkRepairedRequest,
) -> Result<pb::MarkRepairedResponse, StorageError> {
    if req.ranges.len() > MAX_MARKS {
        return Err(invalid(format!(
            "{} ranges, at most {MAX_MARKS} per call",
            req.ranges.len()
        )));
    }
    let now = crate::wallclock::now_ms();
    let marks = req
        .ranges
        .iter()
        .map(|r| {
            check_storage_tenant(&r.tenant_id).map_err(|e| invalid(e.to_string()))?;
            let range = r
                .range
                .as_ref()
                .map(HashRange::from)
                .ok_or_else(|| invalid("a repaired range without its range"))?;
            if r.repaired_as_of_ms > now {
                // A repair "as of" the future would let tombstones written from now on go.
                return Err(invalid(format!(
                    "repaired as of {} ms, after this node's clock ({now} ms)",
                    r.repaired_as_of_ms
                )));
            }
            Ok((r.tenant_id.clone(), range, r.repaired_as_of_ms))
        })
        .collect::<Result<Vec<_>, _>>()?;
    tokio::task::spawn_blocking(move || repaired.mark(&marks))
        .await
        .map_err(|e| StorageError::Internal(format!("mark task failed: {e}")))?
        .map_err(|e| StorageError::Internal(format!("cannot record repaired ranges: {e}")))?;
    Ok(pb::MarkRepairedResponse {})
}
