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
//! after every range it held reached its inheritors. Changes of different nodes run together:
//! they are planned against their combined final ring and made final in one registry update
//! (`run`). A change of a node that is already bootstrapping or draining, or any node change
//! while an RF change copies or a cleanup runs, is refused up front with NODE_IN_USE (checked
//! and applied atomically against the registry: `admit_node`, `set_node_state_if`; against RF
//! changes by recording first and checking after, `admission::still_alone`). Old owners keep
//! their copies until a cleanup drops them (`cleanup`).

use std::sync::Arc;
use std::time::Duration;

use crate::limits::valid_node_id;
use crate::meta::{MetaError, Migration, MigrationKind, MigrationState, NodeRecord, registry_view};
use crate::ring::plan::Proposed;
use crate::ring::{MAX_VIRTUAL_NODES, NodeState};
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::admin::rfc3339;
use super::admission::{self, AdmitError};
use super::errors::CoordError;

mod handoff;
mod run;

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
        let health = self.probe(&record).await?;
        let retried = registered
            .iter()
            .any(|n| n.node_id == record.node_id && n.state == NodeState::Failed);
        // A node joins empty: records it kept from an earlier membership (a removed node back
        // with its volume) would be live again, deleted keys among them once their tombstones
        // were purged. So would what a failed addition of it received: tried again after a
        // cleanup, the keys deleted since may have lost their tombstones everywhere else.
        if health.key_estimate > 0 || health.sstable_count > 0 {
            let earlier = if retried {
                "what its failed addition received"
            } else {
                "records kept from an earlier membership"
            };
            return Err(CoordError::InvalidNodeConfig(format!(
                "the storage node at {}:{} holds data (about {} records in {} tables): a node \
                 joins empty, since {earlier} would come back as live once the tombstones of \
                 keys deleted since were purged; wipe its data directory and start it again",
                record.host, record.port, health.key_estimate, health.sstable_count
            )));
        }
        if retried {
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
        let snapshot = self.ring.snapshot();
        let estimated = match self.plan_transfers(&migration_id, &snapshot).await {
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

    /// Puts the registry back as it was before the change was accepted (nothing was streamed
    /// yet, and no other change can have made it final: it has no migration).
    async fn undo_registration(&self, kind: MigrationKind, node_id: &str) {
        if let Err(e) = self.roll_back(kind, node_id).await {
            tracing::error!(node = node_id, error = %e, "cannot roll the node registry back");
        }
    }

    /// Carries on a node addition or removal left in progress by a coordinator that stopped.
    pub(super) fn resume_change(self: &Arc<Self>, m: Migration) {
        tracing::info!(migration = %m.migration_id, node = %m.subject, "resuming a topology change");
        self.clone().spawn_change(m);
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

    /// The node must answer at its address, with its own id; returns what it answered.
    async fn probe(&self, record: &NodeRecord) -> Result<spb::HealthCheckResponse, CoordError> {
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
        Ok(health)
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
