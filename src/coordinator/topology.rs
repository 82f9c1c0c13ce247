//! Adding and removing storage nodes at runtime (SEMANTICS.md, "Topology changes"; Cassandra's
//! bootstrap and decommission).
//!
//! Add: the node must answer a HealthCheck at the given address with the given id. It is
//! registered `bootstrapping`, which makes it a pending owner in every coordinator's ring within
//! `ring_refresh` (writes reach it; its answers never count). After two refresh intervals the
//! ranges it takes over are computed for every replication factor in use and streamed from
//! their old owners (`StartStreaming` on each sender, which also forwards live writes). When
//! every stream completed, the node's hints are delivered and it is marked `active`.
//!
//! Remove: refused with NODE_IN_USE when fewer active nodes than the largest tenant RF (or
//! `min_storage_nodes`) would remain, unless forced. The node is marked `draining`: still a
//! natural owner, with its inheritors as pending owners, so writes reach both. Its ranges are
//! streamed to the inheritors (by a surviving replica when it does not answer), then it leaves
//! the registry; its hints are handed to the nodes that inherit its keys.
//!
//! Progress is the migration record: keys copied over all streams, and an estimated total
//! (senders' key counts times the share of the ring they send) until the end. A change whose
//! streams make no progress for `topology_timeout` is rolled back: an added node leaves the
//! ring (`failed`, kept for audit; adding the same id again replaces it), a leaving node goes
//! back to `active`; a cancelled one the same way (state `cancelled`). The coordinator running
//! a change holds its lease (`lease`): when it dies another running coordinator takes the
//! change over, and one that restarts resumes its own (stream ids are derived from the
//! migration, so resuming polls the same streams and never copies twice at once).
//!
//! Invariants: a node becomes authoritative only after every range it gains was copied to it,
//! and the copy starts only after every coordinator writes to it; a node leaves the ring only
//! after every range it held reached its inheritors. Changes run one at a time (the planner,
//! [`plan`]): a second node change while a node is bootstrapping or draining, or any node
//! change while an RF change copies, is refused up front with NODE_IN_USE (checked and applied
//! atomically against the registry: `admit_node`, `set_node_state_if`; against RF changes by
//! recording first and checking after, `admission::still_alone`). Old owners keep their
//! copies until a cleanup drops them (`cleanup`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;

use crate::limits::valid_node_id;
use crate::meta::{
    Hint, MetaError, Migration, MigrationKind, MigrationState, NodeRecord, registry_view,
};
use crate::ring::plan::{self, Proposed};
use crate::ring::{HashRange, MAX_VIRTUAL_NODES, NodeId, NodeState, Ring, key_position};
use crate::rpc::common;
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::admin::rfc3339;
use super::admission::{self, AdmitError};
use super::errors::CoordError;
use super::hints;
use super::lease::{Interrupted, LeaseGuard};

/// How often streams are polled and progress is recorded.
const POLL: Duration = Duration::from_millis(500);
/// How long a node to be added has to answer its HealthCheck.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Streaming rate assumed for the first completion estimate (keys per second).
const ASSUMED_KEYS_PER_SECOND: u64 = 10_000;

/// A node to add, as the admin API gives it.
#[derive(Debug, Clone)]
pub struct NewNode {
    pub node_id: String,
    pub host: String,
    pub port: u32,
    /// 0 means the coordinator's default (`virtual_nodes`, 16 under balanced allocation).
    pub virtual_nodes: u32,
}

/// One stream: the ranges one sender pushes to one receiver.
#[derive(Debug, Clone)]
struct Transfer {
    stream_id: String,
    from: String,
    to: String,
    ranges: Vec<HashRange>,
    estimated_keys: u64,
    keys_copied: u64,
    bytes_copied: u64,
    done: bool,
}

/// What a change's streams copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Streamed {
    keys: u64,
    bytes: u64,
}

impl Coordinator {
    /// Registers `node` as bootstrapping and starts streaming its ranges to it.
    pub async fn add_storage_node(
        self: &Arc<Self>,
        node: NewNode,
    ) -> Result<pb::MigrationAccepted, CoordError> {
        let record = check_new_node(&node, self.options.virtual_nodes)?;
        let registered = self.meta.list_nodes().await?;
        for n in registered.iter().filter(|n| n.state != NodeState::Failed) {
            if n.node_id == record.node_id {
                return Err(CoordError::NodeExists(record.node_id));
            }
            if (n.host.as_str(), n.port) == (record.host.as_str(), record.port) {
                return Err(CoordError::InvalidNodeConfig(format!(
                    "{}:{} is already registered as {}",
                    n.host, n.port, n.node_id
                )));
            }
        }
        self.probe(&record).await?;
        if registered
            .iter()
            .any(|n| n.node_id == record.node_id && n.state == NodeState::Failed)
        {
            self.meta.remove_node(&record.node_id).await?;
        }
        let rfs = admission::balanced_for(&self.replication_factors().await?);
        let policy = self.options.token_allocation;
        let record = admission::admit(self.meta.as_ref(), record, policy, &rfs)
            .await
            .map_err(admit_error)?;
        let message = format!(
            "node {} is bootstrapping: its ranges are streamed from their current owners, then it becomes active",
            record.node_id
        );
        self.start_change(MigrationKind::NodeAddition, &record.node_id, message)
            .await
    }

    /// Marks `node_id` draining and starts streaming its ranges to the nodes that inherit them.
    pub async fn remove_storage_node(
        self: &Arc<Self>,
        node_id: &str,
        force: bool,
    ) -> Result<pb::MigrationAccepted, CoordError> {
        // Retried while other changes of the registry race this one (each try re-checks).
        for _ in 0..16 {
            if let Some(accepted) = self.try_remove_storage_node(node_id, force).await? {
                return Ok(accepted);
            }
        }
        Err(MetaError::Changed("the node registry").into())
    }

    /// One try of [`Self::remove_storage_node`]; `None` when the registry changed under it.
    async fn try_remove_storage_node(
        self: &Arc<Self>,
        node_id: &str,
        force: bool,
    ) -> Result<Option<pb::MigrationAccepted>, CoordError> {
        let registered = self.meta.list_nodes().await?;
        let node = registered
            .iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| CoordError::NodeNotFound(node_id.to_owned()))?;
        match node.state {
            NodeState::Active | NodeState::Down => {}
            NodeState::Failed => return self.forget_failed(node_id).await.map(Some),
            busy => {
                return Err(CoordError::NodeInUse(format!(
                    "node {node_id} is {}: wait for its change to finish",
                    busy.as_str()
                )));
            }
        }
        admission::may_start(self.meta.as_ref(), &registered, Proposed::NodeChange)
            .await
            .map_err(admit_error)?;
        let remaining = registered
            .iter()
            .filter(|n| n.node_id != node_id && n.state == NodeState::Active)
            .count();
        let needed = self
            .replication_factors()
            .await?
            .into_iter()
            .max()
            .unwrap_or(0)
            .max(self.options.min_storage_nodes);
        if remaining < needed && !force {
            return Err(CoordError::NodeInUse(format!(
                "removing {node_id} would leave {remaining} active nodes; tenants need {needed} \
                 (largest replication factor or min_storage_nodes); use force=true to remove it anyway"
            )));
        }
        let seen = registry_view(&registered);
        match self
            .meta
            .set_node_state_if(node_id, NodeState::Draining, &seen)
            .await
        {
            Err(MetaError::Changed(_)) => return Ok(None),
            other => other?,
        }
        if let Err(busy) =
            admission::still_alone(self.meta.as_ref(), None, Proposed::NodeChange).await
        {
            // Nothing streamed yet: putting the node back is the whole roll-back.
            self.undo_registration(MigrationKind::NodeRemoval, node_id)
                .await;
            return Err(admit_error(busy));
        }
        let message = format!(
            "node {node_id} is draining: its ranges are streamed to the nodes that inherit them, then it leaves the ring"
        );
        self.start_change(MigrationKind::NodeRemoval, node_id, message)
            .await
            .map(Some)
    }

    /// An aborted addition owns nothing: forgetting its record is the whole removal, recorded
    /// as a migration that is already completed.
    async fn forget_failed(&self, node_id: &str) -> Result<pb::MigrationAccepted, CoordError> {
        self.meta.remove_node(node_id).await?;
        self.ring.refresh().await?;
        let now = crate::wallclock::now_ms() as i64;
        let migration_id = format!("remove-{}", uuid::Uuid::new_v4());
        self.meta
            .create_migration(&Migration::begin(
                migration_id.clone(),
                MigrationKind::NodeRemoval,
                node_id,
                MigrationState::Completed,
            ))
            .await?;
        Ok(pb::MigrationAccepted {
            node_id: node_id.to_owned(),
            migration_id,
            message: format!("node {node_id} was a failed addition and owned nothing: forgotten"),
            estimated_completion: rfc3339(now),
        })
    }

    /// Records the migration of a node whose registry state already says what changes, and
    /// starts carrying it out.
    async fn start_change(
        self: &Arc<Self>,
        kind: MigrationKind,
        node_id: &str,
        message: String,
    ) -> Result<pb::MigrationAccepted, CoordError> {
        self.ring.refresh().await?;
        let now = crate::wallclock::now_ms() as i64;
        let migration_id = match kind {
            MigrationKind::NodeAddition => format!("add-{}", uuid::Uuid::new_v4()),
            _ => format!("remove-{}", uuid::Uuid::new_v4()),
        };
        // A first estimate; the ranges are computed again once every coordinator sees the change.
        let estimated = match self.plan_transfers(&migration_id).await {
            Ok(plan) => plan.iter().map(|t| t.estimated_keys).sum(),
            Err(_) => 0,
        };
        let migration = Migration {
            total_keys: estimated,
            ..Migration::begin(
                migration_id.clone(),
                kind,
                node_id,
                MigrationState::InProgress,
            )
        };
        if let Err(e) = self.meta.create_migration(&migration).await {
            self.undo_registration(kind, node_id).await;
            return Err(e.into());
        }
        let eta_ms = self.settle_time().as_millis() as u64
            + estimated * 1000 / ASSUMED_KEYS_PER_SECOND.max(1);
        tracing::info!(migration = %migration_id, node = node_id, kind = kind.as_str(), estimated_keys = estimated, "topology change accepted");
        self.clone().spawn_change(migration);
        Ok(pb::MigrationAccepted {
            node_id: node_id.to_owned(),
            migration_id,
            message,
            estimated_completion: rfc3339(now + eta_ms as i64),
        })
    }

    /// Puts the registry back as it was before the change was accepted.
    async fn undo_registration(&self, kind: MigrationKind, node_id: &str) {
        let undone = match kind {
            MigrationKind::NodeAddition => self.meta.set_node_state(node_id, NodeState::Failed),
            _ => self.meta.set_node_state(node_id, NodeState::Active),
        }
        .await;
        if let Err(e) = undone {
            tracing::error!(node = node_id, error = %e, "cannot roll the node registry back");
        }
        if let Err(e) = self.ring.refresh().await {
            tracing::warn!(error = %e, "cannot re-read the node registry");
        }
    }

    /// Long enough for every coordinator to have re-read the registry.
    fn settle_time(&self) -> Duration {
        self.options.metadata_refresh * 2 + Duration::from_secs(1)
    }

    /// Carries on a node addition or removal left in progress by a coordinator that stopped.
    pub(super) fn resume_change(self: &Arc<Self>, m: Migration) {
        tracing::info!(migration = %m.migration_id, node = %m.subject, "resuming a topology change");
        self.clone().spawn_change(m);
    }

    fn spawn_change(self: Arc<Self>, migration: Migration) {
        tokio::spawn(async move {
            let id = migration.migration_id.clone();
            let node = migration.subject.clone();
            let Some(lease) = self.take_lease(&id).await else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep(self.settle_time()) => {}
                () = lease.lost_signal() => return,
            }
            let streamed = self.stream_change(&migration, &lease).await;
            if lease.lost() || matches!(streamed, Err(Interrupted::Lost)) {
                tracing::warn!(migration = %id, node = %node, "topology change left to the coordinator that took it over");
                return;
            }
            // The last look at the cancel flag before the change becomes final.
            let cancelled = lease.cancel_requested() || self.cancel_requested(&id).await;
            match streamed {
                Ok(copied) if !cancelled => {
                    if let Err(e) = self.finish_change(&migration, copied).await {
                        tracing::error!(migration = %id, node = %node, error = %e, "cannot record the end of a topology change");
                    }
                }
                Ok(_) | Err(Interrupted::Cancelled) => {
                    tracing::warn!(migration = %id, node = %node, "topology change cancelled; rolling back");
                    self.undo_registration(migration.kind, &node).await;
                    let progress = self
                        .meta
                        .get_migration(&id)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(migration);
                    let recorded = self
                        .meta
                        .update_migration(
                            &id,
                            MigrationState::Cancelled,
                            progress.keys_migrated,
                            progress.total_keys,
                            progress.bytes_migrated,
                        )
                        .await;
                    if let Err(e) = recorded {
                        tracing::error!(migration = %id, error = %e, "cannot record a cancelled topology change");
                    }
                }
                Err(Interrupted::Lost) => {} // handled above
                Err(Interrupted::Failed(e)) => {
                    tracing::error!(migration = %id, node = %node, error = %e, "topology change failed; rolling back");
                    self.undo_registration(migration.kind, &node).await;
                    if let Err(e) = self.meta.fail_migration(&id, &e).await {
                        tracing::error!(migration = %id, error = %e, "cannot record a failed topology change");
                    }
                }
            }
        });
    }

    /// Whether an operator asked to cancel migration `id` (read from the store: the last
    /// check before a change becomes final).
    pub(super) async fn cancel_requested(&self, id: &str) -> bool {
        match self.meta.migration_lease(id).await {
            Ok(lease) => lease.is_some_and(|l| l.cancel_requested),
            Err(e) => {
                tracing::warn!(migration = id, error = %e, "cannot read the migration's cancel flag");
                false
            }
        }
    }

    /// Switches the registry to the new topology and marks the migration completed.
    async fn finish_change(&self, m: &Migration, copied: Streamed) -> Result<(), CoordError> {
        let node = m.subject.as_str();
        match m.kind {
            MigrationKind::NodeAddition => {
                self.ring.refresh().await?;
                hints::replay_target(
                    &*self.meta,
                    &self.ring,
                    &self.pool,
                    node,
                    self.options.hint_limits,
                )
                .await?;
                self.meta.set_node_state(node, NodeState::Active).await?;
            }
            _ => {
                // Before the node leaves the registry: the hand-off needs the ring it leaves.
                self.ring.refresh().await?;
                let handed = self.hand_off_hints(node).await?;
                if handed > 0 {
                    tracing::info!(
                        node,
                        hints = handed,
                        "hints of a leaving node handed to the nodes inheriting its keys"
                    );
                }
                match self.meta.remove_node(node).await {
                    // Already gone: a resumed change whose end was not recorded.
                    Ok(()) | Err(MetaError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.drop_hints_for(node).await?;
            }
        }
        self.meta
            .update_migration(
                &m.migration_id,
                MigrationState::Completed,
                copied.keys,
                copied.keys,
                copied.bytes,
            )
            .await?;
        self.ring.refresh().await?;
        tracing::info!(migration = %m.migration_id, node, kind = m.kind.as_str(), keys = copied.keys, bytes = copied.bytes, "topology change completed");
        Ok(())
    }

    /// A leaving node's hints are writes it missed, so the data it streamed out lacks them:
    /// each is stored again for the nodes that inherit its key (natural owners once the node
    /// is gone that were not before), then deleted. Returns how many hints were handed on.
    /// Stored before deleted: a crash in between only delivers a write twice, which storage
    /// ignores. A hint whose tenant no longer exists, or whose key nobody inherits, is dropped.
    async fn hand_off_hints(&self, node: &str) -> Result<u64, CoordError> {
        let before = self.ring.snapshot().ring.clone();
        if before.node(&NodeId::new(node)).is_none() {
            return Ok(0); // already gone: a resumed change past this step
        }
        let leaving = NodeId::new(node);
        let after = Ring::new(before.nodes().filter(|n| n.id != leaving).cloned());
        let mut handed = 0u64;
        loop {
            let hints = self.meta.hints_for(node, 1000).await?;
            if hints.is_empty() {
                return Ok(handed);
            }
            let mut inherited = Vec::new();
            for hint in &hints {
                let Ok(record) = spb::Record::decode(hint.record.as_slice()) else {
                    continue;
                };
                let Some(tenant) = self.tenants.get(&hint.tenant_id).await? else {
                    continue;
                };
                let rf = self.pending_rf.write_rf(&tenant) as usize;
                let position = key_position(&hint.tenant_id, &record.key);
                let old = before.natural_owners(position, rf);
                for heir in after
                    .natural_owners(position, rf)
                    .into_iter()
                    .filter(|n| !old.contains(n))
                {
                    inherited.push(Hint {
                        id: 0,
                        target_node: heir.as_str().to_owned(),
                        attempts: 0,
                        ..hint.clone()
                    });
                }
            }
            handed += inherited.len() as u64;
            self.meta.store_hints(&inherited).await?;
            let ids: Vec<i64> = hints.iter().map(|h| h.id).collect();
            self.meta.delete_hints(&ids).await?;
        }
    }

    /// Hints written for a node after its hints were handed off: it was still a natural owner
    /// then, and its inheritors got those writes directly as pending owners.
    async fn drop_hints_for(&self, node: &str) -> Result<(), CoordError> {
        loop {
            let hints = self.meta.hints_for(node, 1000).await?;
            if hints.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = hints.iter().map(|h| h.id).collect();
            self.meta.delete_hints(&ids).await?;
        }
    }

    /// Streams every range that changes hands; returns the keys copied. Fails when a stream
    /// fails or no stream makes progress for `topology_timeout` (the streams are stopped).
    async fn stream_change(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
    ) -> Result<Streamed, Interrupted> {
        self.ring.refresh().await.map_err(CoordError::from)?;
        let mut transfers = self.plan_transfers(&m.migration_id).await?;
        let total: u64 = transfers.iter().map(|t| t.estimated_keys).sum();
        let mut last = (Streamed::default(), 0usize);
        let mut last_progress = Instant::now();
        loop {
            if lease.lost() {
                // The coordinator that took over drives the streams now.
                return Err(Interrupted::Lost);
            }
            if lease.cancel_requested() {
                self.stop_transfers(&transfers).await;
                return Err(Interrupted::Cancelled);
            }
            for t in transfers.iter_mut().filter(|t| !t.done) {
                match self.poll_transfer(t).await {
                    Ok(()) => {}
                    Err(PollError::Failed(e)) => {
                        self.stop_transfers(&transfers).await;
                        return Err(Interrupted::Failed(e));
                    }
                    Err(PollError::Unreachable(e)) => {
                        tracing::debug!(from = %t.from, error = %e, "stream status unavailable");
                    }
                }
            }
            let copied = Streamed {
                keys: transfers.iter().map(|t| t.keys_copied).sum(),
                bytes: transfers.iter().map(|t| t.bytes_copied).sum(),
            };
            let done = transfers.iter().filter(|t| t.done).count();
            if done == transfers.len() {
                return Ok(copied);
            }
            if (copied, done) != last {
                last = (copied, done);
                last_progress = Instant::now();
                let recorded = self
                    .meta
                    .update_migration(
                        &m.migration_id,
                        MigrationState::InProgress,
                        copied.keys,
                        total.max(copied.keys),
                        copied.bytes,
                    )
                    .await;
                match recorded {
                    Ok(()) => {}
                    // Ended elsewhere (a coordinator that took over finished it).
                    Err(MetaError::Changed(_)) => return Err(Interrupted::Lost),
                    Err(e) => return Err(e.into()),
                }
            } else if last_progress.elapsed() > self.options.topology_timeout {
                self.stop_transfers(&transfers).await;
                return Err(Interrupted::Failed(format!(
                    "no streaming progress for {:?}",
                    self.options.topology_timeout
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Asks the sender where its stream is. `StartStreaming` is idempotent (a known id returns
    /// its status), so polling with it also restarts a stream that a restarted sender forgot.
    async fn poll_transfer(&self, t: &mut Transfer) -> Result<(), PollError> {
        let snapshot = self.ring.snapshot();
        let address = |node: &str| {
            snapshot
                .address(node)
                .map(str::to_owned)
                .ok_or_else(|| PollError::Failed(format!("{node} left the registry")))
        };
        let (from, to) = (address(&t.from)?, address(&t.to)?);
        let mut client = self
            .pool
            .client(&t.from, &from)
            .map_err(|e| PollError::Unreachable(e.to_string()))?;
        let status = client
            .start_streaming(spb::StartStreamingRequest {
                stream_id: t.stream_id.clone(),
                ranges: t
                    .ranges
                    .iter()
                    .map(|r| common::HashRange {
                        start: r.start,
                        end: r.end,
                    })
                    .collect(),
                target_node_id: t.to.clone(),
                target_address: to,
            })
            .await
            .map_err(|s| PollError::Unreachable(s.message().to_owned()))?
            .into_inner();
        t.keys_copied = status.keys_copied;
        t.bytes_copied = status.bytes_copied;
        match status.state() {
            spb::StreamState::Completed => t.done = true,
            spb::StreamState::Failed | spb::StreamState::Stopped => {
                return Err(PollError::Failed(format!(
                    "stream {} from {} to {}: {}",
                    t.stream_id, t.from, t.to, status.error
                )));
            }
            _ => {}
        }
        Ok(())
    }

    async fn stop_transfers(&self, transfers: &[Transfer]) {
        let snapshot = self.ring.snapshot();
        for t in transfers.iter().filter(|t| !t.done) {
            let Some(address) = snapshot.address(&t.from) else {
                continue;
            };
            if let Ok(mut client) = self.pool.client(&t.from, address) {
                let stop = client.stop_streaming(spb::StreamStatusRequest {
                    stream_id: t.stream_id.clone(),
                });
                if let Err(e) = tokio::time::timeout(PROBE_TIMEOUT, stop).await {
                    tracing::warn!(stream = %t.stream_id, error = %e, "cannot stop a stream");
                }
            }
        }
    }

    /// The streams the change in progress needs, planned ([`plan::plan_node_change`]) on the
    /// ring as this coordinator sees it now, for every replication factor in use; nodes that
    /// are down or do not answer do not send.
    async fn plan_transfers(&self, migration_id: &str) -> Result<Vec<Transfer>, CoordError> {
        let before = self.ring.snapshot().ring.clone();
        let health: HashMap<String, Option<u64>> = self
            .node_health()
            .await
            .into_iter()
            .map(|(n, h)| (n.node_id, h.map(|h| h.key_estimate)))
            .collect();
        let can_send = |n: &NodeId| {
            !self.ring.is_down(n.as_str()) && matches!(health.get(n.as_str()), Some(Some(_)))
        };
        let rfs = self.replication_factors().await?;
        let planned = plan::plan_node_change(&before, &rfs, can_send)
            .map_err(|r| CoordError::NodeInUse(r.to_string()))?;
        // A sender holds about min(rf, n)/n of the ring; its keys spread evenly over it.
        let members = before.member_count().max(1) as u128;
        let share = rfs.iter().max().copied().unwrap_or(1).min(members as usize) as u128;
        Ok(planned
            .transfers
            .into_iter()
            .map(|t| {
                let width: u128 = t.ranges.iter().map(HashRange::width).sum();
                let keys = u128::from(health.get(t.from.as_str()).copied().flatten().unwrap_or(0));
                let estimated_keys = ((keys * width * members / share.max(1)) >> 64) as u64;
                Transfer {
                    stream_id: format!("{migration_id}-{}-{}", t.from, t.to),
                    from: t.from.0,
                    to: t.to.0,
                    ranges: t.ranges,
                    estimated_keys,
                    keys_copied: 0,
                    bytes_copied: 0,
                    done: false,
                }
            })
            .collect())
    }

    /// Every replication factor tenants use or are moving to.
    async fn replication_factors(&self) -> Result<BTreeSet<usize>, CoordError> {
        // Every tenant was updated after the epoch.
        let tenants = self.meta.tenants_updated_since(i64::MIN).await?;
        let mut rfs: BTreeSet<usize> = tenants
            .iter()
            .map(|t| self.pending_rf.write_rf(t) as usize)
            .collect();
        rfs.extend(tenants.iter().map(|t| t.replication_factor as usize));
        Ok(rfs)
    }

    /// The node must answer at its address, with its own id.
    async fn probe(&self, record: &NodeRecord) -> Result<(), CoordError> {
        let address = format!("{}:{}", record.host, record.port);
        let unreachable = |why: String| {
            CoordError::InvalidNodeConfig(format!("no storage node answers at {address}: {why}"))
        };
        let mut client = self
            .pool
            .client(&record.node_id, &address)
            .map_err(|e| unreachable(e.to_string()))?;
        let health = tokio::time::timeout(
            PROBE_TIMEOUT,
            client.health_check(spb::HealthCheckRequest {}),
        )
        .await
        .map_err(|_| unreachable("timed out".to_owned()))?
        .map_err(|s| unreachable(s.message().to_owned()))?
        .into_inner();
        if health.node_id != record.node_id {
            return Err(CoordError::InvalidNodeConfig(format!(
                "the storage node at {address} is {:?}, not {:?}",
                health.node_id, record.node_id
            )));
        }
        Ok(())
    }
}

/// NODE_EXISTS for a taken id, NODE_IN_USE with the reason for a change that must wait.
fn admit_error(e: AdmitError) -> CoordError {
    match e {
        AdmitError::Meta(MetaError::Exists { id, .. }) => CoordError::NodeExists(id),
        AdmitError::Meta(other) => other.into(),
        AdmitError::Busy(why) => CoordError::NodeInUse(why.to_string()),
    }
}

enum PollError {
    /// The stream cannot finish: the change fails.
    Failed(String),
    /// The sender did not answer this time; counts as no progress.
    Unreachable(String),
}

/// Checks an added node's fields (INVALID_NODE_CONFIG) and makes its registry record.
fn check_new_node(node: &NewNode, default_vnodes: u32) -> Result<NodeRecord, CoordError> {
    let invalid = |m: &str| Err(CoordError::InvalidNodeConfig(m.to_owned()));
    if !valid_node_id(&node.node_id) {
        return invalid("node_id must be 1..=128 letters, digits, '-', '_' or '.'");
    }
    if node.host.is_empty() || node.host.len() > 253 || node.host.contains(['/', ' ', '@', ':']) {
        return invalid("host must be a host name or IPv4 address");
    }
    let Ok(port) = u16::try_from(node.port) else {
        return invalid("port must be 1..=65535");
    };
    if port == 0 {
        return invalid("port must be 1..=65535");
    }
    let virtual_nodes = match node.virtual_nodes {
        0 => default_vnodes,
        v @ 1..=MAX_VIRTUAL_NODES => v,
        _ => return invalid("virtual_nodes must be 1..=4096"),
    };
    Ok(NodeRecord {
        node_id: node.node_id.clone(),
        host: node.host.clone(),
        port,
        virtual_nodes,
        tokens: None,
        state: NodeState::Bootstrapping,
    })
}
