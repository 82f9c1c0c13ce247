//! Hints follow the data: a leaving node's queued hints go to the nodes that inherit its
//! keys; a failed addition's hints are dropped with it.

use prost::Message;

use crate::meta::Hint;
use crate::ring::{NodeId, Ring, key_position};
use crate::rpc::storage as spb;

use crate::coordinator::Coordinator;
use crate::coordinator::errors::CoordError;

impl Coordinator {
    /// A leaving node's hints are writes it missed, so the data it streamed out lacks them:
    /// each is stored again for the nodes that inherit its key (natural owners once the node
    /// is gone that were not before), then deleted. Returns how many hints were handed on.
    /// Stored before deleted: a crash in between only delivers a write twice, which storage
    /// ignores. A hint whose tenant no longer exists, or whose key nobody inherits, is dropped.
    pub(super) async fn hand_off_hints(&self, node: &str) -> Result<u64, CoordError> {
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
