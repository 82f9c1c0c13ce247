//! Hints follow the data: a leaving node's queued hints go to the nodes that inherit its
//! keys; a failed addition's hints are dropped with it.

use prost::Message;

use crate::meta::Hint;
use crate::ring::plan::final_ring;
use crate::ring::{Ring, key_position};
use crate::rpc::storage as spb;

use crate::coordinator::Coordinator;
use crate::coordinator::errors::CoordError;

impl Coordinator {
    /// A leaving node's hints are writes it missed, so the data it streamed out lacks them:
    /// each is stored again for the nodes that inherit its key (final owners once the changes
    /// in progress in `before`, the registry they are made final against, complete, that are
    /// not owners in `before`). Returns how many hints were handed on. The node's own hints
    /// are kept: they are dropped ([`Coordinator::drop_hints_for`]) only once it left, so a
    /// commit that loses a race (the node stays) loses none; a copy then only delivers a write
    /// to a node that may not need it, which storage takes like any repair. A hint whose
    /// tenant no longer exists, or whose key nobody inherits, is not handed on.
    pub(super) async fn hand_off_hints(
        &self,
        node: &str,
        before: &Ring,
    ) -> Result<u64, CoordError> {
        let after = final_ring(before);
        let mut handed = 0u64;
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
