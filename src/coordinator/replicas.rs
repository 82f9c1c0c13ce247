//! One storage call against one replica, shaped for [`crate::quorum::run`]: each call is a
//! `'static` future resolving to the replica's answer or a [`ReplicaError`] that says whether
//! the replica refused the request itself (no point in a hint) or could not serve it. Calls go
//! through the node's [`super::batcher::NodeBatcher`], which coalesces concurrent ones.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::rpc::storage as pb;

use super::batcher::NodeBatcher;
pub use super::batcher::WriteAck;
pub use super::replica_error::ReplicaError;
use super::storage_pool::StoragePool;
use super::tenant_confirm::Confirmations;

/// Writes (or tombstones) a record on one replica, placed with the ring of `ring_digest`
/// (`WriteBatchRequest.ring_digest`; 0: unknown). A replica that refuses it for not knowing
/// the deleted tenants yet (it just started) is told them (`tenant_confirm`) and the write is
/// resent, once.
pub fn write(
    pool: &StoragePool,
    confirmations: &Arc<Confirmations>,
    node: &str,
    address: Option<&str>,
    (record, ring_digest): (pb::Record, u64),
) -> impl Future<Output = Result<WriteAck, ReplicaError>> + Send + 'static + use<> {
    let batcher = batcher(pool, node, address);
    let confirmations = confirmations.clone();
    let address = address.map(str::to_owned);
    let node = node.to_owned();
    async move {
        let batcher = batcher?;
        match batcher.write(&node, record.clone(), ring_digest).await {
            Err(e) if e.unconfirmed => {
                confirm(&confirmations, &node, address.as_deref()).await?;
                batcher.write(&node, record, ring_digest).await
            }
            answer => answer,
        }
    }
}

/// Reads a key's stored version (tombstones included) from one replica; confirmed and
/// asked again, once, like [`write`].
pub fn read(
    pool: &StoragePool,
    confirmations: &Arc<Confirmations>,
    node: &str,
    address: Option<&str>,
    tenant: String,
    key: bytes::Bytes,
) -> impl Future<Output = Result<Option<pb::Record>, ReplicaError>> + Send + 'static + use<> {
    let batcher = batcher(pool, node, address);
    let confirmations = confirmations.clone();
    let address = address.map(str::to_owned);
    let node = node.to_owned();
    let request = pb::ReadRequest {
        tenant_id: tenant,
        key,
    };
    async move {
        let batcher = batcher?;
        match batcher.read(&node, request.clone()).await {
            Err(e) if e.unconfirmed => {
                confirm(&confirmations, &node, address.as_deref()).await?;
                batcher.read(&node, request).await
            }
            answer => answer,
        }
    }
}

/// Tells `node`, which refused a call just now for not knowing the deleted tenants, what they
/// are.
async fn confirm(
    confirmations: &Confirmations,
    node: &str,
    address: Option<&str>,
) -> Result<(), ReplicaError> {
    let refused_at = Instant::now();
    let address = address.ok_or_else(|| ReplicaError::new(node, "not in the node registry"))?;
    confirmations.confirm(node, address, refused_at).await
}

fn batcher(
    pool: &StoragePool,
    node: &str,
    address: Option<&str>,
) -> Result<std::sync::Arc<NodeBatcher>, ReplicaError> {
    let address = address.ok_or_else(|| ReplicaError::new(node, "not in the node registry"))?;
    pool.batcher(node, address)
        .map_err(|e| ReplicaError::new(node, e.to_string()))
}
