//! Admission of a storage node to the registry, with its tokens (SEMANTICS.md, "Placement").
//!
//! Invariants: a node's tokens are chosen once, here, against the registry it joins, and stored
//! in its record; every coordinator reads them from there and they never change while the node
//! is in the ring. Admissions are serialized through the store: the record is inserted only if
//! the registry still holds the node ids the tokens were chosen against
//! ([`MetadataStore::admit_node`]), otherwise the registry is read again and the tokens chosen
//! again, so two concurrent additions never pick tokens blind to each other. The same
//! comparison (ids and states) keeps topology changes one at a time ([`plan::may_start`]): a
//! change accepted on a registry that another change altered meanwhile is retried and then
//! refused. RF changes live in another table; a node change and an RF change each record
//! themselves before checking for the other ([`still_alone`]), so two that race never both run.

use std::collections::BTreeSet;

use crate::meta::{MetaError, MetadataStore, MigrationKind, NodeRecord, registry_view};
use crate::ring::allocation::{TokenAllocation, choose_tokens};
use crate::ring::plan::{self, Proposed};
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

/// Tenants whose replication-factor change is in progress, as the metadata store says.
pub async fn rf_changes_in_progress(meta: &dyn MetadataStore) -> Result<Vec<String>, MetaError> {
    Ok(meta
        .active_migrations()
        .await?
        .into_iter()
        .filter(|m| m.kind == MigrationKind::ReplicationFactorChange)
        .map(|m| m.subject)
        .collect())
}

/// Whether `next` may start against the registry `registered` and the RF changes in progress
/// ([`plan::may_start`]); `Busy` with the reason when not.
pub async fn may_start(
    meta: &dyn MetadataStore,
    registered: &[NodeRecord],
    next: Proposed<'_>,
) -> Result<(), AdmitError> {
    let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
    let rf_changes = rf_changes_in_progress(meta).await?;
    Ok(plan::may_start(&ring, &rf_changes, next)?)
}

/// The second half of starting a change that another kind of change could race (a node change
/// against an RF change, or the reverse): each side records itself first and checks for the
/// other after, so of two that overlap at least one sees the other and backs out.
pub async fn still_alone(meta: &dyn MetadataStore, next: Proposed<'_>) -> Result<(), AdmitError> {
    let registered = meta.list_nodes().await?;
    let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
    let rf_changes = rf_changes_in_progress(meta).await?;
    match next {
        // The node change itself is in the registry now: only RF changes can conflict.
        Proposed::NodeChange => match rf_changes.into_iter().next() {
            Some(tenant) => Err(plan::Refusal::RfChangeInProgress { tenant }.into()),
            None => Ok(()),
        },
        // The RF change itself is recorded now: only node changes can conflict.
        Proposed::RfChange { .. } => Ok(plan::may_start(&ring, &[], next)?),
    }
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
        if let Err(busy) = still_alone(meta, Proposed::NodeChange).await {
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
