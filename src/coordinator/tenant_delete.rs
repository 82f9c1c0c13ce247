//! Tenant deletion (API.md, `DELETE /v1/tenants/{tenant_id}`) and the purge of deleted tenants'
//! records from the storage nodes.
//!
//! A tenant's records, placement, hints and idempotency keys live in its incarnation's storage
//! namespace (`meta::Tenant::storage_id`: the id for the first incarnation, `id:N` for the
//! N-th). Deleting a tenant removes its row and hints and records the namespace as deleted;
//! creating the id again makes a new incarnation with a new namespace. So nothing of a
//! predecessor is ever served (reads of the new incarnation look in another namespace), nor
//! repaired (repairs, RF changes and cleanup go by live namespaces; repair markers and handed
//! hints of a dead namespace are dropped), however late a node that held it comes back.
//!
//! Invariants and choices:
//! - The deleting coordinator stops serving the tenant at once; the others within
//!   `metadata_refresh` (each refresh drops the cached tenants whose incarnation is among the
//!   deleted ones: no clock is compared). Until then a write they accept lands in the deleted namespace: it is
//!   acknowledged and then purged, like the writes of the instant before the delete.
//! - Re-creating the id is refused (503 UNAVAILABLE, retry) until `2 × metadata_refresh` after
//!   the delete, measured by the metadata store's clock, so no coordinator that refreshes
//!   still writes the old incarnation when the new one starts. A coordinator that misses its
//!   refreshes for longer (paused, cut from the store) is stopped by the storage nodes: each
//!   node the delete (or a purge pass) reached fenced the namespace (`storage::dropped_tenants`)
//!   and refuses its writes with `TENANT_DELETED`, so the write is not acknowledged and the
//!   coordinator drops its cached tenant (`write.rs`). A node down at the delete learns of it
//!   before it takes any client write after its start: it refuses them until a coordinator
//!   sends it the complete list of deleted tenants read from the store (`tenant_confirm`).
//!   Only a node that ran through the delete without the delete reaching it (a cut network)
//!   can take such a write, until the next purge pass reaches it.
//! - Records go by a range delete per namespace (`DropTenants`: no tombstone per key), from
//!   every node that answers at once, and from every node by the purge loop after (a node that
//!   was down at the delete is purged once it is back). Storage nodes skip namespaces they
//!   hold nothing of (their range trees tell), so the loop costs one RPC per node per pass.
//! - Idempotency responses of the namespace are deleted with the tenant (a store that cannot
//!   be reached then keeps them until their 24 h TTL; they are never matched again anyway: the
//!   store key holds the namespace).
//! - Hints of the namespace are deleted with the tenant; one stored by a coordinator in the
//!   instant of the delete is dropped by the replay (`hints.rs`), and refused by a fenced node.
//! - Streams skip dead namespaces: a sender is told the deleted ones this coordinator knows
//!   (`StartStreaming.dropped_tenants`) and fences them, a fenced receiver refuses them.

use std::sync::Arc;
use std::time::Duration;

use crate::meta::MetaError;
use crate::rpc::coordinator as pb;

use super::Coordinator;
use super::admin::{check_tenant_id, tenant_to_proto};
use super::errors::CoordError;
use super::tenant_confirm::send_deleted;

/// How long one node may take to drop the namespaces it holds (a rewrite of its tables).
const PURGE_TIMEOUT: Duration = Duration::from_secs(300);

impl Coordinator {
    /// Deletes a tenant: 404 TENANT_NOT_FOUND when there is none. Returns it as it was.
    pub async fn delete_tenant(&self, tenant_id: &str) -> Result<pb::Tenant, CoordError> {
        check_tenant_id(tenant_id)?;
        let gone = self
            .meta
            .delete_tenant(tenant_id)
            .await
            .map_err(|e| match e {
                MetaError::NotFound { .. } => CoordError::TenantNotFound(tenant_id.to_owned()),
                other => other.into(),
            })?;
        self.tenants.invalidate(tenant_id);
        metrics::counter!("pairdb_tenants_deleted_total").increment(1);
        tracing::info!(
            tenant = tenant_id,
            incarnation = gone.incarnation,
            "tenant deleted; purging its records"
        );
        match self.idempotency.forget_namespace(&gone.storage_id()).await {
            Ok(n) => tracing::debug!(
                tenant = tenant_id,
                responses = n,
                "idempotency keys dropped"
            ),
            // Never matched again (the store key holds the namespace); they expire in 24 h.
            Err(e) => {
                tracing::warn!(tenant = tenant_id, error = %e, "idempotency keys not dropped; they expire with their TTL")
            }
        }
        // Best effort now; the purge loop finishes what this does not.
        self.purge(&[gone.storage_id()], false).await;
        Ok(tenant_to_proto(&gone))
    }

    /// Refuses to re-create a tenant deleted less than `2 × metadata_refresh` ago (see the
    /// module doc).
    pub(super) async fn check_not_just_deleted(&self, tenant_id: &str) -> Result<(), CoordError> {
        let settle = (self.options.metadata_refresh * 2).as_millis() as i64;
        // Measured by the store's clock, which stamped the deletion: coordinators' clocks may
        // be seconds apart.
        let wait_ms = self
            .meta
            .ms_since_deleted(tenant_id)
            .await?
            .map(|ago| settle - ago)
            .filter(|wait| *wait > 0);
        match wait_ms {
            Some(wait_ms) => Err(CoordError::Unavailable(format!(
                "tenant {tenant_id:?} was deleted moments ago; it can be created again in {wait_ms} \
                 ms, once every coordinator stopped serving it"
            ))),
            None => Ok(()),
        }
    }

    /// Asks every registered node to drop the namespaces `deleted` (in parallel); returns how
    /// many records went. A node that fails is purged by a later pass. `complete`: `deleted`
    /// was read from the store just now and is every deleted namespace, so the nodes may take
    /// client writes from now on (`tenant_confirm`).
    async fn purge(&self, deleted: &[String], complete: bool) -> u64 {
        if deleted.is_empty() && !complete {
            return 0;
        }
        let nodes = self.ring.snapshot().nodes.clone();
        let answers = self
            .each_node(&nodes, PURGE_TIMEOUT, |client| async move {
                send_deleted(client, deleted, complete)
                    .await
                    .map(tonic::Response::new)
            })
            .await;
        let mut dropped = 0;
        for (node, result) in answers {
            match result {
                Ok(records) => dropped += records,
                Err(e) if self.ring.is_down(&node.node_id) => {
                    tracing::debug!(node = %node.node_id, error = %e.message(), "purge of deleted tenants deferred: node down");
                }
                Err(e) => {
                    tracing::warn!(node = %node.node_id, error = %e.message(), "purge of deleted tenants failed; retried next pass");
                }
            }
        }
        if dropped > 0 {
            metrics::counter!("pairdb_tenant_records_purged_total").increment(dropped);
            tracing::info!(records = dropped, "records of deleted tenants purged");
        }
        dropped
    }

    /// One pass of the purge loop: every deleted namespace, every node; it also confirms the
    /// nodes (the list is complete).
    async fn purge_pass(&self) -> Result<u64, CoordError> {
        let deleted: Vec<String> = self
            .meta
            .deleted_tenants()
            .await?
            .into_iter()
            .map(|d| d.storage_id)
            .collect();
        Ok(self.purge(&deleted, true).await)
    }
}

/// Purges deleted tenants' records from every node every `every`, until the role stops.
pub fn spawn_purge(core: Arc<Coordinator>, every: Duration) {
    let tasks = core.tasks.clone();
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            if let Err(e) = core.purge_pass().await {
                tracing::debug!(error = %e, "cannot read the deleted tenants");
            }
        }
    });
}
