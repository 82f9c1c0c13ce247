//! Telling storage nodes every deleted tenant: the complete `DropTenants` a node needs after
//! it starts before it takes client writes (`storage::dropped_tenants`).
//!
//! A node that was down when a tenant was deleted learns of it only from a complete list read
//! from the metadata store; until then it refuses client writes with `TENANTS_UNCONFIRMED`, so
//! a coordinator whose tenant cache is stale cannot acknowledge a write into the dead
//! incarnation through it. This module sends that list (the purge loop sends it to every node
//! each pass; a write refused for it sends it to that node at once and resends the write).
//!
//! Invariants:
//! - The list is read from the store for each confirmation, never from the tenant cache (a
//!   stale cache is the very thing the node guards against); if the store cannot be read, the
//!   node stays unconfirmed and the write counts as failed on it (a hint, like a down node).
//! - `complete` is set only on the last call of a list sent in order, after the calls before
//!   it succeeded, so a node confirmed holds every namespace of the list fenced.
//! - Concurrent writes refused by one node confirm it once: a refusal that an earlier
//!   confirmation of the same node already answered (it ended after the refusal arrived) just
//!   resends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::meta::MetadataStore;
use crate::rpc::auth::InternalChannel;
use crate::rpc::storage as spb;
use crate::rpc::storage::storage_node_client::StorageNodeClient;

use super::replica_error::ReplicaError;
use super::storage_pool::StoragePool;

/// At most this many namespaces per `DropTenants` call (the node's bound is larger).
pub const NAMESPACES_PER_CALL: usize = 10_000;

/// How long a confirmation may take on behalf of a waiting call: the store read and the
/// `DropTenants` calls. The node confirms itself before it drops the records it holds of the
/// namespaces it did not know, so a confirmation cut short by a long drop still took effect.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `deleted` to one node in calls of at most [`NAMESPACES_PER_CALL`], in order; the last
/// (also when `deleted` is empty) carries `complete` when asked. Returns the records dropped.
pub async fn send_deleted(
    mut client: StorageNodeClient<InternalChannel>,
    deleted: &[String],
    complete: bool,
) -> Result<u64, tonic::Status> {
    let mut chunks: Vec<&[String]> = deleted.chunks(NAMESPACES_PER_CALL).collect();
    if chunks.is_empty() {
        if !complete {
            return Ok(0);
        }
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    let mut dropped = 0;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let answer = client
            .drop_tenants(spb::DropTenantsRequest {
                tenant_ids: chunk.to_vec(),
                complete: complete && i == last,
            })
            .await?;
        dropped += answer.into_inner().records_dropped;
    }
    Ok(dropped)
}

/// Confirms nodes that refused a client write for want of the deleted-tenant list.
pub struct Confirmations {
    meta: Arc<dyn MetadataStore>,
    pool: Arc<StoragePool>,
    /// Per node: when its last confirmation by this coordinator ended.
    done: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

impl Confirmations {
    pub fn new(meta: Arc<dyn MetadataStore>, pool: Arc<StoragePool>) -> Arc<Self> {
        Arc::new(Self {
            meta,
            pool,
            done: Mutex::new(HashMap::new()),
        })
    }

    /// Confirms `node` (at `address`), whose refusal arrived at `refused_at`: sends it the
    /// deleted tenants the store holds now, unless a confirmation that ended after the refusal
    /// already did.
    pub async fn confirm(
        &self,
        node: &str,
        address: &str,
        refused_at: Instant,
    ) -> Result<(), ReplicaError> {
        let slot = self.done.lock().entry(node.to_owned()).or_default().clone();
        let mut last = slot.lock().await;
        if last.is_some_and(|ended| ended > refused_at) {
            return Ok(());
        }
        let unconfirmed = |why: String| {
            ReplicaError::unavailable(node, format!("cannot confirm the deleted tenants: {why}"))
        };
        let client = self
            .pool
            .client(node, address)
            .map_err(|e| unconfirmed(e.to_string()))?;
        let meta = self.meta.clone();
        // The store read is bounded too: a store that hangs must not hold the write.
        let confirm = async move {
            let deleted: Vec<String> = meta
                .deleted_tenants()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|d| d.storage_id)
                .collect();
            send_deleted(client, &deleted, true)
                .await
                .map_err(|status| status.message().to_owned())?;
            Ok::<usize, String>(deleted.len())
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(deleted)) => {
                metrics::counter!("pairdb_storage_nodes_confirmed_total").increment(1);
                tracing::info!(node, deleted, "storage node told the deleted tenants");
                *last = Some(Instant::now());
                Ok(())
            }
            Ok(Err(why)) => Err(unconfirmed(why)),
            Err(_) => Err(unconfirmed("no answer in time".to_owned())),
        }
    }
}
