//! Targeted repair: the keys a replica is known to have missed, fixed as soon as it is up,
//! without waiting for the next full repair.
//!
//! Every missed write that no hint will bring (a hint that could not be kept or that expired,
//! a read repair that failed or found its queue full) leaves a repair marker (tenant, key,
//! replica that missed it) on other storage nodes (`hints::mark_missed`, fsynced there). Every
//! `interval` each coordinator asks every node it can reach for its markers; for each marker
//! whose replica gossip reports up, it reads the key from the key's owners that answer (natural
//! and pending, at the tenant's write RF), takes the version that takes precedence, and
//! writes it to every owner that holds something else, as a repair batch (the apply rule:
//! never a rollback). The marked replica is one of them while it owns the key; one that no
//! longer does (a topology or RF change moved the key) gets nothing, since a cleanup would
//! drop it there, and the key's owners now are repaired in its place. Markers
//! are cleared on the node that held them once fixed; those of a replica still down wait.
//! Two coordinators working off the same marker repeat an idempotent repair. The writes carry
//! the epoch of the ring they were placed on; a node whose cleanup fenced a later one refuses
//! them (`STALE_RING`), the marker stays, and the next round reads the registry again first.

use std::sync::Arc;
use std::time::Duration;

use crate::ring::NodeState;
use crate::rpc::detail::storage_code;
use crate::rpc::storage as spb;

use super::super::Coordinator;
use super::super::errors::CoordError;
use super::super::ring_view::Snapshot;

/// Markers asked from one node per round.
const MARKERS_PER_ROUND: u32 = 1000;

/// Runs the targeted repair every `interval` until the role stops.
pub fn spawn_targeted(core: Arc<Coordinator>, interval: Duration) {
    let tasks = core.tasks.clone();
    super::super::periodic::spawn_every(interval, &tasks, move || {
        let core = core.clone();
        async move { round(&core).await }
    });
}

/// One pass over the markers of every reachable node.
async fn round(core: &Coordinator) {
    // Read again when a node refused a repair as placed on a stale ring, or when the ring is
    // older than a request's may be.
    let snapshot = core.ring.fresh(core.options.ring_max_age()).await;
    for holder in snapshot
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Active && !core.ring.is_down(&n.node_id))
    {
        let Some(address) = snapshot.address(&holder.node_id) else {
            continue;
        };
        let Ok(mut client) = core.pool.client(&holder.node_id, address) else {
            continue;
        };
        let listed = client
            .list_repair_markers(spb::ListRepairMarkersRequest {
                limit: MARKERS_PER_ROUND,
            })
            .await;
        let markers = match listed {
            Ok(answer) => answer.into_inner().markers,
            Err(_) => continue,
        };
        if markers.is_empty() {
            continue;
        }
        let mut done = Vec::new();
        for marker in markers {
            let registered = snapshot
                .nodes
                .iter()
                .any(|n| n.node_id == marker.missed_node);
            if registered && core.ring.is_down(&marker.missed_node) {
                continue;
            }
            let fixed = if registered {
                repair_key(core, &snapshot, &marker).await
            } else {
                // The node left the cluster: nothing to send it.
                Ok(false)
            };
            match fixed {
                Ok(applied) => {
                    let result = if applied { "fixed" } else { "nothing_to_fix" };
                    metrics::counter!("pairdb_targeted_repairs_total", "result" => result)
                        .increment(1);
                    done.push(marker);
                }
                Err(e) => {
                    metrics::counter!("pairdb_targeted_repairs_total", "result" => "failed")
                        .increment(1);
                    tracing::debug!(node = %marker.missed_node, error = %e, "targeted repair failed; the marker stays");
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = client
                .clear_repair_markers(spb::RepairMarkersRequest { markers: done })
                .await
            {
                tracing::warn!(node = %holder.node_id, error = %e.message(), "cannot clear repaired markers; they are repaired again");
            }
        }
    }
}

/// Reads the marked key from every node a write of it goes to now, and writes the winner to
/// every one of them that holds something else. Ok(true) when some replica applied it; an
/// error when the marked replica, if it still owns the key, could not be read or written.
/// A marked replica that no longer owns the key (a topology or RF change moved it) is left
/// out: a cleanup would drop the repair there; the key's owners now are repaired instead.
async fn repair_key(
    core: &Coordinator,
    snapshot: &Snapshot,
    marker: &spb::RepairMarker,
) -> Result<bool, CoordError> {
    // A deleted tenant (or a deleted incarnation of it) has nothing to repair.
    let Some(tenant) = core.tenant_of_namespace(&marker.tenant_id).await? else {
        return Ok(false);
    };
    let nodes = core.write_owners_on(snapshot, &tenant, &marker.key);
    let epoch = crate::coordinator::write::placed_epoch(snapshot, &tenant);
    let marked_owns = nodes.contains(&marker.missed_node);
    let mut held: Vec<(String, Option<spb::Record>)> = Vec::new();
    for node in nodes {
        if core.ring.is_down(&node) {
            continue;
        }
        let Some(address) = snapshot.address(&node) else {
            continue;
        };
        let Ok(mut client) = core.pool.client(&node, address) else {
            continue;
        };
        let read = client
            .read(spb::ReadRequest {
                tenant_id: marker.tenant_id.clone(),
                key: marker.key.clone(),
            })
            .await;
        match read {
            Ok(answer) => held.push((node, answer.into_inner().record)),
            Err(s) if node == marker.missed_node => {
                return Err(CoordError::Unavailable(format!("{node}: {}", s.message())));
            }
            Err(_) => {}
        }
    }
    if marked_owns && !held.iter().any(|(n, _)| *n == marker.missed_node) {
        return Err(CoordError::Unavailable(format!(
            "{} did not answer",
            marker.missed_node
        )));
    }
    let Some(winner) = held
        .iter()
        .filter_map(|(_, r)| r.as_ref())
        .max_by(|a, b| a.version().precedence(&b.version()))
        .cloned()
    else {
        return Ok(false);
    };
    let winning = winner.version();
    let mut applied = false;
    for (node, record) in &held {
        if record
            .as_ref()
            .is_some_and(|r| r.version().precedence(&winning) == std::cmp::Ordering::Equal)
        {
            continue;
        }
        let Some(address) = snapshot.address(node) else {
            continue;
        };
        let written = match core.pool.client(node, address) {
            Ok(mut client) => client
                .write_batch(spb::WriteBatchRequest {
                    records: vec![winner.clone()],
                    source: spb::BatchSource::Repair as i32,
                    ring_digest: 0,
                    ring_epoch: epoch,
                })
                .await
                .map(|a| a.into_inner().outcomes)
                .map_err(|s| (storage_code(&s), s.message().to_owned())),
            Err(e) => Err((spb::ErrorCode::Unspecified, e.to_string())),
        };
        match written {
            Ok(outcomes) => {
                applied |= outcomes.first() == Some(&(spb::ApplyOutcome::Applied as i32));
            }
            Err((spb::ErrorCode::StaleRing, e)) => {
                // This coordinator's ring is older than a cleanup on the node, which may have
                // dropped the key's range: the marker stays, and the next round repairs it on
                // the registry read anew.
                core.ring.refused_as_stale(snapshot.epoch);
                return Err(CoordError::Unavailable(format!("{node}: {e}")));
            }
            Err((_, e)) if *node == marker.missed_node => {
                return Err(CoordError::Unavailable(format!("{node}: {e}")));
            }
            Err(_) => {}
        }
    }
    Ok(applied)
}
