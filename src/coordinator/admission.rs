//! Admission of a storage node to the registry, with its tokens (SEMANTICS.md, "Placement").
//!
//! Invariants: a node's tokens are chosen once, here, against the registry it joins, and stored
//! in its record; every coordinator reads them from there and they never change while the node
//! is in the ring. Admissions are serialized through the store: the record is inserted only if
//! the registry still holds the node ids the tokens were chosen against
//! ([`MetadataStore::admit_node`]), otherwise the registry is read again and the tokens chosen
//! again, so two concurrent additions never pick tokens blind to each other.

use std::collections::BTreeSet;

use crate::meta::{MetaError, MetadataStore, NodeRecord};
use crate::ring::allocation::{TokenAllocation, choose_tokens};
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

/// Inserts `record` with tokens chosen by `policy` for the replication factors `rfs`; returns the
/// record as stored. `Exists` when the id is taken.
pub async fn admit(
    meta: &dyn MetadataStore,
    mut record: NodeRecord,
    policy: TokenAllocation,
    rfs: &[usize],
) -> Result<NodeRecord, MetaError> {
    for _ in 0..ATTEMPTS {
        let registered = meta.list_nodes().await?;
        if registered.iter().any(|n| n.node_id == record.node_id) {
            return Err(MetaError::Exists {
                what: "storage node",
                id: record.node_id,
            });
        }
        let seen: Vec<String> = registered.iter().map(|n| n.node_id.clone()).collect();
        let ring = Ring::new(registered.iter().map(NodeRecord::ring_node));
        let id = NodeId::new(record.node_id.clone());
        record.tokens = choose_tokens(&ring, &id, policy, record.virtual_nodes, rfs);
        if let Some(tokens) = &record.tokens {
            // The allocator places fewer only if no range is wide enough to split.
            record.virtual_nodes = tokens.len() as u32;
        }
        match meta.admit_node(&record, &seen).await {
            Err(MetaError::Changed(_)) => continue,
            Err(e) => return Err(e),
            Ok(()) => return Ok(record),
        }
    }
    Err(MetaError::Changed("the node registry"))
}
