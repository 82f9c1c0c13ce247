//! Admission of a storage node to the registry, with its tokens (SEMANTICS.md, "Placement").
//!
//! Invariants: a node's tokens are chosen once, here, against the registry it joins, and stored
//! in its record; every coordinator reads them from there and they never change while the node
//! is in the ring. Admissions are serialized through the store: the record is inserted only if
//! the registry still holds the node ids the tokens were chosen against
//! ([`MetadataStore::admit_node`]), otherwise the registry is read again and the tokens chosen
//! again, so two concurrent additions never pick tokens blind to each other. The same
//! comparison (ids and states) makes every acceptance see the changes accepted before it
//! ([`plan::may_start`]): a change accepted on a registry that another change altered
//! meanwhile is checked again on the new registry. RF changes live in another table; a node change and an RF change each record
//! themselves before checking for the other ([`still_alone`]), so two that race never both run.

use std::collections::BTreeSet;

use crate::meta::{MetaError, MetadataStore, Migration, MigrationKind, NodeRecord, registry_view};
use crate::ring::allocation::{TokenAllocation, choose_tokens};
use crate::ring::plan::{self, Proposed, Running};
use crate::ring::{NodeId, Ring};

/// Tries before giving up when other admissions keep changing the registry.
const ATTEMPTS: usize = 16;

/// The replication factor tokens are balanced for when no tenant exists yet: the API's default.
pub const DEFAULT_BALANCED_RF: usize = 3;

/// The replication factors a joining node's tokens are balanced for: those in use, or the
/// default tenant RF when there is no tenant yet.
pub fn balanced_for(in_use: &BTreeSet<usize>) -> Vec<usize> {
    if in_use.is_empty() {
        vec![DEFAULT_BALANCED_RF]
    } else {
        in_use.iter().copied().collect()
    }
}

/// Why a node was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Another change is in progress (see [`plan::may_start`]).
    #[error(transparent)]
    Busy(#[from] plan::Refusal),
}

/// A migration as the planner sees it, unless it is a node change (those are in the registry).
fn running(m: &Migration) -> Option<Running> {
    match m.kind {
        MigrationKind::ReplicationFactorChange => Some(Running::RfChange {
            tenant: m.subject.clone(),
        }),
        MigrationKind::Cleanup => Some(Running::Cleanup {
            id: m.migration_id.clone(),
        }),
        // A repair yields to changes: it ends when the registry changes under it.
        MigrationKind::NodeAddition | MigrationKind::NodeRemoval | MigrationKind::Repair => None,
    }
}

/// Whether `next` may start against the registry `registered` and the migrations in progress
/// ([`plan::may_start`]); `Busy` with the reason when not.
pub async fn may_start(
    meta: &dyn MetadataStore,
    registered: &[NodeRecord],
    next: Proposed<'_>,
) -> Result<(), AdmitError> {
    let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
    let active: Vec<Running> = meta
        .active_migrations()
        .await?
        .iter()
        .filter_map(running)
        .collect();
    Ok(plan::may_start(&ring, &active, next)?)
}

/// The second half of starting a change that a change recorded elsewhere could race (a node
/// change in the registry against an RF change or cleanup in the migrations, or two of the
/// latter): each side records itself first (`me`, the migration just created; `None` for a node
/// change, already in the registry) and checks for the others after, so of two that overlap at
/// least one sees the other and backs out. Of two of the same kind the older one stays.
pub async fn still_alone(
    meta: &dyn MetadataStore,
    me: Option<&Migration>,
    next: Proposed<'_>,
) -> Result<(), AdmitError> {
    let registered = meta.list_nodes().await?;
    // A node change is itself in the registry; node changes exclude each other there.
    let ring = match next {
        Proposed::NodeChange => Ring::default(),
        _ => Ring::new(registered.iter().map(NodeRecord::ring_node)),
    };
    let younger = |m: &Migration, me: &Migration| {
        m.kind == me.kind
            && (m.started_at_ms, &m.migration_id) > (me.started_at_ms, &me.migration_id)
    };
    let others: Vec<Running> = meta
        .active_migrations()
        .await?
        .iter()
        .filter(|m| me.is_none_or(|me| m.migration_id != me.migration_id && !younger(m, me)))
        .filter_map(running)
        .collect();
    Ok(plan::may_start(&ring, &others, next)?)
}

/// Inserts `record` with tokens chosen by `policy` for the replication factors `rfs`; returns the
/// record as stored. `Exists` when the id is taken; `Busy` while another change is in progress.
pub async fn admit(
    meta: &dyn MetadataStore,
    mut record: NodeRecord,
    policy: TokenAllocation,
    rfs: &[usize],
) -> Result<NodeRecord, AdmitError> {
    for _ in 0..ATTEMPTS {
        let registered = meta.list_nodes().await?;
        if registered.iter().any(|n| n.node_id == record.node_id) {
            return Err(MetaError::Exists {
                what: "storage node",
                id: record.node_id,
            }
            .into());
        }
        may_start(meta, &registered, Proposed::NodeChange).await?;
        let seen = registry_view(&registered);
        let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
        let id = NodeId::new(record.node_id.clone());
        record.tokens = choose_tokens(&ring, &id, policy, record.virtual_nodes, rfs);
        if let Some(tokens) = &record.tokens {
            // The allocator places fewer only if no range is wide enough to split.
            record.virtual_nodes = tokens.len() as u32;
        }
        match meta.admit_node(&record, &seen).await {
            Err(MetaError::Changed(_)) => continue,
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        if let Err(busy) = still_alone(meta, None, Proposed::NodeChange).await {
            // Nobody streams to a node this young: forgetting it is the whole roll-back.
            if let Err(e) = meta.remove_node(&record.node_id).await {
                tracing::error!(node = %record.node_id, error = %e, "cannot take back a refused admission");
            }
            return Err(busy);
        }
        return Ok(record);
    }
    Err(MetaError::Changed("the node registry").into())
}

/// The first registry, from `--storage-nodes`: every record gets its tokens (chosen in turn, as
/// admissions one by one would) and all are stored in one transaction if the registry is still
/// empty. False when another coordinator seeded it first.
pub async fn seed(
    meta: &dyn MetadataStore,
    mut records: Vec<NodeRecord>,
    policy: TokenAllocation,
    rfs: &[usize],
) -> Result<bool, MetaError> {
    let mut placed: Vec<NodeRecord> = Vec::with_capacity(records.len());
    for record in &mut records {
        let ring = Ring::new(placed.iter().map(NodeRecord::ring_node));
        let id = NodeId::new(record.node_id.clone());
        record.tokens = choose_tokens(&ring, &id, policy, record.virtual_nodes, rfs);
        if let Some(tokens) = &record.tokens {
            record.virtual_nodes = tokens.len() as u32;
        }
        placed.push(record.clone());
    }
    match meta.seed_nodes(&records).await {
        Ok(()) => Ok(true),
        Err(MetaError::Changed(_) | MetaError::Exists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}
