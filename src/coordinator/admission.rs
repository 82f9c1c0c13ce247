//! Admission of a storage node to the registry, with its tokens (SEMANTICS.md, "Placement").
//!
//! Invariants: a node's tokens are chosen once, here, against the registry it joins, and stored
//! in its record; every coordinator reads them from there and they never change while the node
//! is in the ring. Admissions are serialized through the store: the record is inserted only if
//! the registry still holds the node ids the tokens were chosen against
//! ([`MetadataStore::admit_node`]), otherwise the registry is read again and the tokens chosen
//! again, so two concurrent additions never pick tokens blind to each other. The same
//! comparison (ids and states) keeps topology changes one at a time ([`change_in_progress`]):
//! a change accepted on a registry that another change altered meanwhile is retried and then
//! refused.

use std::collections::BTreeSet;

use crate::meta::{MetaError, MetadataStore, NodeRecord, registry_view};
use crate::ring::allocation::{TokenAllocation, choose_tokens};
use crate::ring::{NodeId, NodeState, Ring};

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
    /// Another topology change is in progress (see [`change_in_progress`]).
    #[error("{0}")]
    Busy(String),
}

/// The node whose addition or removal is in progress, if any: topology changes run one at a
/// time, because each one's transfers are planned against the ring with only its own node
/// moved. A second change is refused up front (NODE_IN_USE), never accepted and then failed.
pub fn change_in_progress(registered: &[NodeRecord]) -> Option<String> {
    registered
        .iter()
        .find(|n| matches!(n.state, NodeState::Bootstrapping | NodeState::Draining))
        .map(|n| {
            format!(
                "node {} is {}: topology changes run one at a time; wait for its migration to \
                 finish (pairdb admin migrations)",
                n.node_id,
                n.state.as_str()
            )
        })
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
        if let Some(busy) = change_in_progress(&registered) {
            return Err(AdmitError::Busy(busy));
        }
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
            Ok(()) => return Ok(record),
        }
    }
    Err(MetaError::Changed("the node registry").into())
}
