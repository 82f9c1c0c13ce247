//! Cleanup (SEMANTICS.md, "Topology changes"; Cassandra's `nodetool cleanup`): old owners
//! delete the ranges they no longer own, once a quorum of the new owners is verified to hold
//! every key there.
//!
//! How, per node N (every member, or the one asked for): tenants are grouped by replication
//! factor; N's records are scanned keys-only; every record whose key N does not own at its
//! tenant's RF is checked against its natural owners (`HeldVersions`: the same version or one
//! that takes precedence), and must be held by a majority of them; one held by fewer is handed
//! over first (N's record written to the owners that lack it, as a repair placed on the
//! cleanup's ring) and checked again. Only when every such key is, N drops, per group, the
//! ranges it does not own (`DropRanges`: one major compaction, no tombstones). `force` skips
//! the verification, never the rest. The record is a migration of kind `cleanup` (keys
//! checked, records dropped, bytes reclaimed); it runs automatically once `cleanup_grace`
//! passed after the last completed change ([`spawn_auto_cleanup`]).
//!
//! Invariants:
//! - A record is dropped only from a node that is not among its natural owners in the ring the
//!   cleanup verified against, and the ring is read again before each drop: a registry that
//!   changed meanwhile drops nothing.
//! - A cleanup runs alone ([`crate::ring::plan::may_start`]): no node change, RF change or
//!   other cleanup overlaps it, so no range a node is about to gain or still serves is dropped.
//! - It starts only once every coordinator has switched to the ring of the last change
//!   (`settle_time` after it completed, by the change record's wall clock and by how long this
//!   coordinator has held that ring on its own monotonic clock, so a skewed clock cannot
//!   shorten it), so no coordinator that is not stalled still writes to an old owner and
//!   counts its ack; and not while any member is down unless forced (a down node is then
//!   skipped).
//! - Before a node is verified (or, forced, before it drops), its ring fence is raised to the
//!   registry epoch of the cleanup's ring (`FenceRing`, `storage::ring_fence`): a client call
//!   placed on an older ring, from a stalled coordinator or delayed by the network, is refused
//!   with `STALE_RING` (its coordinator places it again) instead of landing in a range the
//!   node drops; every one the node took before is applied and so seen by the verification.
//!   The settle wait above only makes such refusals rare.
//! - Tenants unknown to the metadata store are never dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::meta::{Migration, MigrationKind, MigrationState, NodeRecord};
use crate::quorum::Consistency;
use crate::ring::plan::Proposed;
use crate::ring::{NodeId, NodeState, Ring, key_position};
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;
use crate::rpc::{self, common};

use super::Coordinator;
use super::admission::{self, AdmitError};
use super::errors::CoordError;
use super::lease::{Interrupted, LeaseGuard};

/// Keys per scan batch, and so per `HeldVersions` call.
const BATCH: u32 = 1000;
/// Keys per read of a hand-over: values may be 10 MiB each, an answer must stay under
/// `rpc::MAX_MESSAGE_BYTES` (64 MiB).
const HAND_OVER_READS: usize = 4;
/// The most of `cleanup_grace` an automatic cleanup also waits on this coordinator's monotonic
/// clock (see [`cleanup_due`]).
const OWN_CLOCK_GRACE: Duration = Duration::from_secs(60);
/// The subject of a cleanup of every member.
const EVERY_NODE: &str = "*";

/// What a cleanup did on one node, or on all.
#[derive(Debug, Clone, Copy, Default)]
struct Cleaned {
    /// Records checked against their new owners (or counted, when forced).
    checked: u64,
    dropped: u64,
    bytes_reclaimed: u64,
}

impl Cleaned {
    fn add(&mut self, other: Cleaned) {
        self.checked += other.checked;
        self.dropped += other.dropped;
        self.bytes_reclaimed += other.bytes_reclaimed;
    }
}

impl Coordinator {
    /// Starts a cleanup of `node_id` (every member when `None`); `force` skips the verification.
    pub async fn start_cleanup(
        self: &Arc<Self>,
        node_id: Option<&str>,
        force: bool,
    ) -> Result<pb::CleanupAccepted, CoordError> {
        let registered = self.meta.list_nodes().await?;
        if let Some(id) = node_id {
            registered
                .iter()
                .find(|n| n.node_id == id && n.state != NodeState::Failed)
                .ok_or_else(|| CoordError::NodeNotFound(id.to_owned()))?;
        }
        admission::may_start(self.meta.as_ref(), &registered, Proposed::Cleanup)
            .await
            .map_err(busy)?;
        let targets = self.cleanup_targets(&registered, node_id, force).await?;
        self.check_settled().await?;
        let migration = Migration::begin(
            format!("cleanup-{}", uuid::Uuid::new_v4()),
            MigrationKind::Cleanup,
            node_id.unwrap_or(EVERY_NODE),
            MigrationState::InProgress,
        );
        self.meta.create_migration(&migration).await?;
        let alone =
            admission::still_alone(self.meta.as_ref(), Some(&migration), Proposed::Cleanup).await;
        if let Err(e) = alone {
            let e = busy(e);
            self.meta
                .fail_migration(&migration.migration_id, &e.to_string())
                .await?;
            return Err(e);
        }
        let cleanup_id = migration.migration_id.clone();
        tracing::info!(cleanup = %cleanup_id, nodes = ?targets, force, "cleanup accepted");
        self.clone().spawn_cleanup(migration, force);
        Ok(pb::CleanupAccepted {
            cleanup_id,
            message: format!(
                "nodes {} drop the ranges they no longer own{}",
                targets.join(", "),
                if force {
                    " (forced: without verifying their new owners)"
                } else {
                    ", once a quorum of each key's owners is verified to hold it"
                }
            ),
            node_ids: targets,
        })
    }

    /// Carries on a cleanup left in progress by a coordinator that stopped (verifying again).
    pub(super) fn resume_cleanup(self: &Arc<Self>, m: Migration) {
        tracing::info!(cleanup = %m.migration_id, "resuming a cleanup");
        self.clone().spawn_cleanup(m, false);
    }

    /// Refused while the last change is younger than the time every coordinator needs to
    /// switch rings: one that has not may still write to an old owner and count its ack. Two
    /// clocks must both say so: the change's record (wall clock, written by whichever
    /// coordinator ended it, so a skewed one could make it look older than it is), and how long
    /// this coordinator has held its registry (its own monotonic clock, after reading the
    /// registry now: the node change it holds was committed before it read it).
    async fn check_settled(&self) -> Result<(), CoordError> {
        let settle = self.options.metadata_refresh * 2 + Duration::from_secs(1);
        self.ring.refresh().await?;
        let held = self.ring.unchanged_for();
        if held < settle {
            return Err(CoordError::NodeInUse(format!(
                "this coordinator's ring changed {} ms ago; coordinators switch rings within \
                 {} ms: retry in {} ms",
                held.as_millis(),
                settle.as_millis(),
                (settle - held).as_millis()
            )));
        }
        let now = crate::wallclock::now_ms() as i64;
        let last = self
            .meta
            .recent_migrations(100)
            .await?
            .into_iter()
            .filter(|m| m.kind.changes_placement())
            .map(|m| m.updated_at_ms)
            .max();
        if let Some(at) = last {
            let wait = at + settle.as_millis() as i64 - now;
            if wait > 0 {
                return Err(CoordError::NodeInUse(format!(
                    "the last topology change ended {} ms ago; coordinators switch rings within \
                     {} ms: retry in {} ms",
                    now - at,
                    settle.as_millis(),
                    wait
                )));
            }
        }
        Ok(())
    }

    /// The nodes a cleanup works on: the one asked for, or every member. A node that is down
    /// (gossip says so, or it does not answer a HealthCheck) cannot be cleaned or verify
    /// anything: UNAVAILABLE unless forced, then it is skipped.
    async fn cleanup_targets(
        &self,
        registered: &[NodeRecord],
        node_id: Option<&str>,
        force: bool,
    ) -> Result<Vec<String>, CoordError> {
        let members: Vec<&NodeRecord> = registered
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .collect();
        if members.is_empty() {
            return Err(CoordError::Unavailable("no active node".to_owned()));
        }
        let answering: BTreeSet<String> = self
            .node_health()
            .await
            .into_iter()
            .filter(|(_, health)| health.is_some())
            .map(|(n, _)| n.node_id)
            .collect();
        let down: Vec<&str> = members
            .iter()
            .filter(|n| self.ring.is_down(&n.node_id) || !answering.contains(&n.node_id))
            .map(|n| n.node_id.as_str())
            .collect();
        if !down.is_empty() && !force {
            return Err(CoordError::Unavailable(format!(
                "nodes {} are down: a cleanup verifies that the new owners of every range hold \
                 it; retry when they are up, or use force=true to drop without verifying",
                down.join(", ")
            )));
        }
        let targets: Vec<String> = members
            .iter()
            .filter(|n| {
                node_id.is_none_or(|id| n.node_id == id) && !down.contains(&n.node_id.as_str())
            })
            .map(|n| n.node_id.clone())
            .collect();
        if targets.is_empty() {
            return Err(CoordError::Unavailable(
                "no active, reachable node to clean up".to_owned(),
            ));
        }
        Ok(targets)
    }

    fn spawn_cleanup(self: Arc<Self>, migration: Migration, force: bool) {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let id = migration.migration_id.clone();
            let Some(lease) = self.take_lease(&id).await else {
                return;
            };
            let mut done = Cleaned::default();
            let result = self.run_cleanup(&migration, force, &lease, &mut done).await;
            let recorded = match result {
                Ok(()) => {
                    tracing::info!(cleanup = %id, checked = done.checked, dropped = done.dropped, bytes_reclaimed = done.bytes_reclaimed, "cleanup completed");
                    self.meta
                        .update_migration(
                            &id,
                            MigrationState::Completed,
                            done.dropped,
                            done.checked,
                            done.bytes_reclaimed,
                        )
                        .await
                }
                Err(Interrupted::Lost) => {
                    tracing::warn!(cleanup = %id, "cleanup left to the coordinator that took it over");
                    Ok(())
                }
                Err(Interrupted::Cancelled) => {
                    tracing::warn!(cleanup = %id, "cleanup cancelled; nodes cleaned so far stay cleaned");
                    self.meta
                        .update_migration(
                            &id,
                            MigrationState::Cancelled,
                            done.dropped,
                            done.checked,
                            done.bytes_reclaimed,
                        )
                        .await
                }
                Err(Interrupted::Failed(e) | Interrupted::Transient(e)) => {
                    tracing::error!(cleanup = %id, error = %e, "cleanup failed");
                    self.meta.fail_migration(&id, &e).await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(cleanup = %id, error = %e, "cannot record the end of a cleanup");
            }
        });
    }

    /// Cleans every target node in turn; stops at the first that fails (nodes done before
    /// stay done).
    async fn run_cleanup(
        &self,
        m: &Migration,
        force: bool,
        lease: &LeaseGuard,
        total: &mut Cleaned,
    ) -> Result<(), Interrupted> {
        self.ring.refresh().await.map_err(|e| e.to_string())?;
        let registry = self.meta.registry().await.map_err(|e| e.to_string())?;
        let registered = &registry.nodes;
        let subject = (m.subject != EVERY_NODE).then_some(m.subject.as_str());
        // Checked for liveness when accepted; now a node that gossip briefly calls down is
        // still worked on (without force): its RPCs decide, and one that fails fails the
        // cleanup with its error. Forced, down nodes are skipped as when accepted.
        let targets: Vec<String> = if force {
            self.cleanup_targets(registered, subject, true)
                .await
                .map_err(|e| e.to_string())?
        } else {
            registered
                .iter()
                .filter(|n| n.state == NodeState::Active)
                .filter(|n| subject.is_none_or(|id| n.node_id == id))
                .map(|n| n.node_id.clone())
                .collect()
        };
        let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
        let addresses: HashMap<String, String> = registered
            .iter()
            .map(|n| (n.node_id.clone(), format!("{}:{}", n.host, n.port)))
            .collect();
        // Every tenant was updated after the epoch.
        let tenants = self
            .meta
            .tenants_updated_since(i64::MIN)
            .await
            .map_err(|e| e.to_string())?;
        // By namespace: records of deleted incarnations are the purge's business, not cleanup's.
        let rf_of: HashMap<String, usize> = tenants
            .iter()
            .map(|t| (t.storage_id(), t.replication_factor as usize))
            .collect();
        for node in &targets {
            lease.check()?;
            let ctx = NodeCleanup {
                node: NodeId::new(node.clone()),
                ring: &ring,
                epoch: registry.epoch,
                addresses: &addresses,
                rf_of: &rf_of,
            };
            // From here on the node refuses client calls placed on an older ring, and every
            // one it took before is applied: the verification sees them all.
            self.fence(&ctx, ctx.epoch).await?;
            let verified = if force { 0 } else { self.verify(&ctx).await? };
            // The last look before this node drops anything.
            lease.check()?;
            if self.cancel_requested(&m.migration_id).await {
                return Err(Interrupted::Cancelled);
            }
            // The ring the verification used must still be the registry's.
            let now = self.meta.registry().await.map_err(|e| e.to_string())?;
            if now.epoch != registry.epoch {
                return Err(Interrupted::Failed(format!(
                    "the node registry changed during the cleanup; nothing dropped on {node}"
                )));
            }
            let mut done = self.drop_not_owned(&ctx).await?;
            done.checked = done.checked.max(verified);
            total.add(done);
            self.meta
                .update_migration(
                    &m.migration_id,
                    MigrationState::InProgress,
                    total.dropped,
                    total.checked,
                    total.bytes_reclaimed,
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        // Every member cleaned (none skipped): no node holds records of ranges it gave away
        // up to this ring, so repairs may again let tombstones go (`Leftovers`).
        let every_member = subject.is_none()
            && registered
                .iter()
                .filter(|n| n.state.is_member())
                .all(|n| targets.contains(&n.node_id));
        if every_member {
            self.meta
                .record_cleaned_epoch(registry.epoch)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Raises `ctx.node`'s ring fence to `epoch` (`FenceRing`, see `storage::ring_fence`).
    async fn fence(&self, ctx: &NodeCleanup<'_>, epoch: u64) -> Result<(), CleanupError> {
        let node = ctx.node.as_str();
        let floor = ctx
            .client(self, node)?
            .fence_ring(spb::FenceRingRequest { epoch })
            .await
            .map_err(|s| CleanupError::rpc("fence", node, &s))?
            .into_inner()
            .floor;
        tracing::info!(node, epoch, floor, "ring fence raised before the cleanup");
        Ok(())
    }

    /// Checks that a majority of the natural owners of every key `ctx.node` holds but does not
    /// own hold that version or a newer one; returns how many keys it checked. A key held by
    /// fewer is first handed over: `ctx.node`'s record is written to the owners that lack it
    /// (see [`Self::hand_over`]) and checked again.
    async fn verify(&self, ctx: &NodeCleanup<'_>) -> Result<u64, CleanupError> {
        let node = ctx.node.as_str();
        let mut scan = ctx
            .client(self, node)?
            .scan_range(spb::ScanRangeRequest {
                range: Some(common::HashRange { start: 0, end: 0 }),
                batch_size: BATCH,
                keys_only: true,
            })
            .await
            .map_err(|s| CleanupError::rpc("scan", node, &s))?
            .into_inner();
        let mut checked = 0u64;
        let mut handed = 0u64;
        let mut short = 0u64;
        let mut example = None;
        while let Some(batch) = scan
            .message()
            .await
            .map_err(|s| CleanupError::rpc("scan", node, &s))?
        {
            // Each key this node does not own, with its owners.
            let mut foreign: Vec<(spb::Record, Vec<NodeId>)> = Vec::new();
            for record in batch.records {
                let Some(rf) = ctx.rf_of.get(&record.tenant_id) else {
                    continue;
                };
                let owners = ctx
                    .ring
                    .natural_owners(key_position(&record.tenant_id, &record.key), *rf);
                if !owners.contains(&ctx.node) {
                    foreign.push((record, owners));
                }
            }
            checked += foreign.len() as u64;
            let lacking = self.owners_lacking(ctx, &foreign).await?;
            let (unverified, lacking): (Vec<_>, Vec<_>) = foreign
                .into_iter()
                .zip(lacking)
                .filter(|((_, owners), lacking)| !held_by_quorum(owners, lacking))
                .unzip();
            if unverified.is_empty() {
                continue;
            }
            handed += self.hand_over(ctx, &unverified, lacking).await?;
            let lacking = self.owners_lacking(ctx, &unverified).await?;
            for ((record, owners), lacking) in unverified.iter().zip(lacking) {
                if !held_by_quorum(owners, &lacking) {
                    let count = owners.len() - lacking.len();
                    short += 1;
                    example.get_or_insert_with(|| {
                        format!(
                            "{}/{} is held by {count} of its owners {}",
                            record.tenant_id,
                            String::from_utf8_lossy(&record.key),
                            owners
                                .iter()
                                .map(NodeId::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
            }
        }
        if handed > 0 {
            metrics::counter!("pairdb_cleanup_records_handed_over_total").increment(handed);
            tracing::warn!(
                node,
                records = handed,
                "cleanup handed records its new owners lacked over to them"
            );
        }
        match example {
            Some(example) => Err(CleanupError::NotReplicated {
                node: node.to_owned(),
                short,
                checked,
                example,
            }),
            None => Ok(checked),
        }
    }

    /// For each (record, owners), the owners that hold neither its version nor a newer one.
    async fn owners_lacking(
        &self,
        ctx: &NodeCleanup<'_>,
        foreign: &[(spb::Record, Vec<NodeId>)],
    ) -> Result<Vec<Vec<NodeId>>, CleanupError> {
        let mut asked: BTreeMap<&NodeId, Vec<usize>> = BTreeMap::new();
        for (i, (_, owners)) in foreign.iter().enumerate() {
            for owner in owners {
                asked.entry(owner).or_default().push(i);
            }
        }
        let mut lacking = vec![Vec::new(); foreign.len()];
        for (owner, indexes) in asked {
            let entries = indexes
                .iter()
                .map(|&i| spb::KeyVersion {
                    tenant_id: foreign[i].0.tenant_id.clone(),
                    key: foreign[i].0.key.clone(),
                    version: foreign[i].0.version.clone(),
                })
                .collect();
            let held = ctx
                .client(self, owner.as_str())?
                .held_versions(spb::HeldVersionsRequest { entries })
                .await
                .map_err(|s| CleanupError::rpc("verify", owner.as_str(), &s))?
                .into_inner()
                .held;
            if held.len() != indexes.len() {
                return Err(CleanupError::ShortAnswer {
                    node: owner.to_string(),
                    got: held.len(),
                    asked: indexes.len(),
                });
            }
            for (&i, yes) in indexes.iter().zip(held) {
                if !yes {
                    lacking[i].push(owner.clone());
                }
            }
        }
        Ok(lacking)
    }

    /// Hands the records `ctx.node` holds for `keys` over to the owners that lack each
    /// (`lacking`, in the same order): read from `ctx.node`, written to them as repairs placed on the
    /// cleanup's ring (each applies what wins by the version rules). Such a record is one a
    /// write left on an old owner alone, its hints lost (a coordinator killed, a stale ring):
    /// no repair brings it to the owners, since repairs compare owners only, so without this
    /// the cleanup would fail on it forever. Returns how many records were read to hand over.
    async fn hand_over(
        &self,
        ctx: &NodeCleanup<'_>,
        keys: &[(spb::Record, Vec<NodeId>)],
        lacking: Vec<Vec<NodeId>>,
    ) -> Result<u64, CleanupError> {
        let node = ctx.node.as_str();
        let mut by_owner: BTreeMap<NodeId, Vec<spb::Record>> = BTreeMap::new();
        let mut read = 0u64;
        for (chunk, lacking) in keys
            .chunks(HAND_OVER_READS)
            .zip(lacking.chunks(HAND_OVER_READS))
        {
            let reads = chunk
                .iter()
                .map(|(r, _)| spb::ReadRequest {
                    tenant_id: r.tenant_id.clone(),
                    key: r.key.clone(),
                })
                .collect();
            let results = ctx
                .client(self, node)?
                .read_batch(spb::ReadBatchRequest {
                    reads,
                    source: spb::BatchSource::Unspecified as i32,
                    ring_epoch: 0,
                })
                .await
                .map_err(|s| CleanupError::rpc("hand-over read", node, &s))?
                .into_inner()
                .results;
            if results.len() != chunk.len() {
                return Err(CleanupError::ShortAnswer {
                    node: node.to_owned(),
                    got: results.len(),
                    asked: chunk.len(),
                });
            }
            for (lacking, result) in lacking.iter().zip(results) {
                // Gone since the scan (a tenant deleted): nothing to hand over.
                let Some(record) = result.record else {
                    continue;
                };
                read += 1;
                for owner in lacking {
                    by_owner
                        .entry(owner.clone())
                        .or_default()
                        .push(record.clone());
                }
            }
        }
        for (owner, records) in by_owner {
            let mut client = ctx.client(self, owner.as_str())?;
            for batch in rpc::byte_batches(records, rpc::WRITE_BATCH_BYTES) {
                client
                    .write_batch(spb::WriteBatchRequest {
                        records: batch,
                        source: spb::BatchSource::Repair as i32,
                        ring_digest: 0,
                        ring_epoch: ctx.epoch,
                    })
                    .await
                    .map_err(|s| CleanupError::rpc("hand-over write", owner.as_str(), &s))?;
            }
        }
        Ok(read)
    }

    /// Drops, per replication factor in use, the ranges `ctx.node` does not own.
    async fn drop_not_owned(&self, ctx: &NodeCleanup<'_>) -> Result<Cleaned, CleanupError> {
        let mut groups: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for (tenant, rf) in ctx.rf_of {
            groups.entry(*rf).or_default().insert(tenant.clone());
        }
        let drops: Vec<spb::TenantRanges> = groups
            .into_iter()
            .filter_map(|(rf, tenants)| {
                let ranges = ctx.ring.ranges_not_owned(&ctx.node, rf);
                (!ranges.is_empty()).then(|| spb::TenantRanges {
                    tenant_ids: tenants.into_iter().collect(),
                    ranges: ranges
                        .iter()
                        .map(|r| common::HashRange {
                            start: r.start,
                            end: r.end,
                        })
                        .collect(),
                })
            })
            .collect();
        if drops.is_empty() {
            return Ok(Cleaned::default());
        }
        let node = ctx.node.as_str();
        let done = ctx
            .client(self, node)?
            .drop_ranges(spb::DropRangesRequest {
                drops,
                ring_epoch: ctx.epoch,
            })
            .await
            .map_err(|s| CleanupError::rpc("drop", node, &s))?
            .into_inner();
        tracing::info!(
            node,
            records = done.records_dropped,
            bytes_before = done.bytes_before,
            bytes_after = done.bytes_after,
            "cleanup dropped ranges"
        );
        Ok(Cleaned {
            checked: done.records_dropped,
            dropped: done.records_dropped,
            bytes_reclaimed: done.bytes_before.saturating_sub(done.bytes_after),
        })
    }
}

/// Whether a quorum of `owners` holds a record, `lacking` the owners that do not.
fn held_by_quorum(owners: &[NodeId], lacking: &[NodeId]) -> bool {
    owners.len() - lacking.len() >= Consistency::Quorum.required(owners.len())
}

/// Why one node's cleanup stopped; the message becomes the migration's failure reason.
#[derive(Debug, thiserror::Error)]
enum CleanupError {
    #[error("{0} is not in the registry")]
    NotRegistered(String),
    #[error(transparent)]
    BadAddress(#[from] super::storage_pool::BadAddress),
    #[error("{what} on {node}: {message}")]
    Rpc {
        what: &'static str,
        node: String,
        message: String,
    },
    #[error("{node} answered {got} of {asked} entries")]
    ShortAnswer {
        node: String,
        got: usize,
        asked: usize,
    },
    #[error(
        "{short} of the {checked} keys {node} no longer owns are not held by a quorum of their \
         owners, also after {node} handed them over (e.g. {example}); nothing dropped on {node}"
    )]
    NotReplicated {
        node: String,
        short: u64,
        checked: u64,
        example: String,
    },
}

impl CleanupError {
    fn rpc(what: &'static str, node: &str, status: &tonic::Status) -> Self {
        CleanupError::Rpc {
            what,
            node: node.to_owned(),
            message: status.message().to_owned(),
        }
    }
}

impl From<CleanupError> for Interrupted {
    fn from(e: CleanupError) -> Self {
        Interrupted::Failed(e.to_string())
    }
}

/// One node's cleanup: the node, and the ring and tenants it is verified against.
struct NodeCleanup<'a> {
    node: NodeId,
    ring: &'a Ring,
    /// The registry epoch of `ring` (`DropRangesRequest.ring_epoch`).
    epoch: u64,
    addresses: &'a HashMap<String, String>,
    rf_of: &'a HashMap<String, usize>,
}

impl NodeCleanup<'_> {
    fn client(
        &self,
        core: &Coordinator,
        node: &str,
    ) -> Result<
        crate::rpc::storage::storage_node_client::StorageNodeClient<
            crate::rpc::auth::InternalChannel,
        >,
        CleanupError,
    > {
        let address = self
            .addresses
            .get(node)
            .ok_or_else(|| CleanupError::NotRegistered(node.to_owned()))?;
        Ok(core.pool.client(node, address)?)
    }
}

/// NODE_IN_USE with the reason while another change runs.
fn busy(e: AdmitError) -> CoordError {
    match e {
        AdmitError::Meta(e) => e.into(),
        AdmitError::Busy(why) => CoordError::NodeInUse(why.to_string()),
    }
}

/// Starts a cleanup of every member once `grace` passed after the last completed change that
/// no cleanup followed; checks every `every` until the role stops. A cleanup that cannot start
/// (a change in progress, a node down) is tried again at the next check.
pub fn spawn_auto_cleanup(core: Arc<Coordinator>, grace: Duration, every: Duration) {
    let tasks = core.tasks.clone();
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            match cleanup_due(&core, grace).await {
                Ok(false) => {}
                Ok(true) => match core.start_cleanup(None, false).await {
                    Ok(accepted) => {
                        tracing::info!(cleanup = %accepted.cleanup_id, "automatic cleanup started");
                    }
                    Err(e) => tracing::info!(error = %e, "automatic cleanup cannot start yet"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot tell whether a cleanup is due"),
            }
        }
    });
}

/// Whether a cleanup of every node is due: nodes may hold records of ranges they gave away
/// ([`crate::meta::Leftovers`]: the registry moved since the last complete cleanup, which
/// also keeps repairs from letting tombstones go), the last node or RF change that ended is
/// older than `grace`, and no cleanup is running or failed less than a grace ago (a failed
/// one, a key not verified, needs repair, and an operator sees why in `pairdb admin
/// migrations`; it is tried again only a grace later, not at every check).
async fn cleanup_due(core: &Coordinator, grace: Duration) -> Result<bool, CoordError> {
    // The change's record carries another coordinator's wall clock, which may run behind and
    // make a fresh change look old; so the grace must also have passed on this coordinator's
    // own clock since its registry last changed (up to a minute of it: a grace of hours is not
    // moved by clock errors, and a coordinator that restarts often still cleans up).
    if core.ring.unchanged_for() < grace.min(OWN_CLOCK_GRACE) {
        return Ok(false);
    }
    if !core.meta.leftovers().await?.may_exist() {
        return Ok(false);
    }
    let recent = core.meta.recent_migrations(100).await?;
    let now = crate::wallclock::now_ms() as i64;
    let grace = grace.as_millis() as i64;
    // Ended changes count too: a rolled-back one moved the registry as well.
    let changed = recent
        .iter()
        .filter(|m| m.kind.changes_placement() && m.state != MigrationState::InProgress)
        .map(|m| m.updated_at_ms)
        .max()
        .unwrap_or(i64::MIN);
    let held_back = recent.iter().any(|m| {
        m.kind == MigrationKind::Cleanup
            && m.subject == EVERY_NODE
            && match m.state {
                MigrationState::Failed => now < m.updated_at_ms + grace,
                MigrationState::InProgress | MigrationState::Pending => true,
                _ => false,
            }
    });
    Ok(!held_back && now >= changed.saturating_add(grace))
}
