//! Hints follow the data. A hint is a write its target missed, so what the target streams out
//! lacks it. When changes become final, every hint whose target stops owning its key is stored
//! again for the nodes that inherit the key: a leaving node's hints, and those of a node that
//! gives ranges to a joining one. A failed addition's hints are dropped with it.
//!
//! Invariants:
//! - Copies are stored before the registry commit, and originals are deleted only after it
//!   succeeded: a commit that loses a race (nothing changes) loses no hint; a copy then only
//!   delivers a write to a node that may not need it, which storage takes like any repair.
//! - A hint whose target keeps its key is left alone (the target still needs it), as is one
//!   whose key nobody inherits.

use prost::Message;

use crate::meta::Hint;
use crate::ring::plan::final_ring;
use crate::ring::{Ring, key_position};
use crate::rpc::storage as spb;

use crate::coordinator::Coordinator;
use crate::coordinator::errors::CoordError;

/// What [`Coordinator::hand_off_hints`] did for one node.
#[derive(Debug, Default)]
pub(super) struct HandedOff {
    /// Copies stored for heirs.
    pub copies: u64,
    /// The node's own hints that were copied: delete them once the change is final.
    pub originals: Vec<i64>,
}

impl Coordinator {
    /// Stores each hint of `node` whose key `node` does not own once the changes in progress
    /// in `before` (the registry they are made final against) complete again for the nodes
    /// that inherit the key there (final owners that are not owners in `before`). The
    /// originals are kept: a leaving node's are dropped ([`Coordinator::drop_hints_for`]) once
    /// it left; a staying node's by the caller, after the commit. A hint whose tenant no
    /// longer exists is not handed on.
    pub(super) async fn hand_off_hints(
        &self,
        node: &str,
        before: &Ring,
    ) -> Result<HandedOff, CoordError> {
        let after = final_ring(before);
        let mut handed = HandedOff::default();
        let mut last_id = i64::MIN;
        loop {
            let hints = self.meta.hints_after(node, last_id, 1000).await?;
            let Some(last) = hints.last() else {
                return Ok(handed);
            };
            last_id = last.id;
            let mut inherited = Vec::new();
            for hint in &hints {
                let Ok(record) = spb::Record::decode(hint.record.as_slice()) else {
                    continue;
                };
                let Some(tenant) = self.tenant_of_namespace(&hint.tenant_id).await? else {
                    continue;
                };
                let rf = self.pending_rf.write_rf(&tenant) as usize;
                let position = key_position(&hint.tenant_id, &record.key);
                let final_owners = after.natural_owners(position, rf);
                if final_owners.iter().any(|n| n.as_str() == node) {
                    continue;
                }
                let old = before.natural_owners(position, rf);
                let heirs: Vec<_> = final_owners
                    .into_iter()
                    .filter(|n| !old.contains(n))
                    .collect();
                if heirs.is_empty() {
                    continue;
                }
                handed.originals.push(hint.id);
                for heir in heirs {
                    inherited.push(Hint {
                        id: 0,
                        target_node: heir.as_str().to_owned(),
                        attempts: 0,
                        ..hint.clone()
                    });
                }
            }
            handed.copies += inherited.len() as u64;
            self.meta.store_hints(&inherited).await?;
        }
    }

    /// A node that left loses its hints: those it had were copied to its heirs before, and
    /// those written after were written to its heirs directly (pending owners then).
    pub(super) async fn drop_hints_for(&self, node: &str) -> Result<(), CoordError> {
        loop {
            let hints = self.meta.hints_for(node, 1000).await?;
            if hints.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = hints.iter().map(|h| h.id).collect();
            self.meta.delete_hints(&ids).await?;
        }
    }
}
