//! One storage call against one replica, shaped for [`crate::quorum::run`]: each call is a
//! `'static` future resolving to the replica's answer or a [`ReplicaError`] that says whether
//! the replica refused the request itself (no point in a hint) or could not serve it. Calls go
//! through the node's [`super::batcher::NodeBatcher`], which coalesces concurrent ones.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::quorum::{ReplicaOutcome, ReplicaResult};
use crate::ring::NodeId;
use crate::rpc::storage as pb;

use super::batcher::NodeBatcher;
use super::batcher::RingTag;
pub use super::batcher::WriteAck;
use super::errors::CoordError;
pub use super::replica_error::ReplicaError;
use super::storage_pool::StoragePool;
use super::tenant_confirm::Confirmations;

/// Writes (or tombstones) a record on one replica, placed on the ring `ring`
/// (`WriteBatchRequest.ring_digest` and `ring_epoch`). A replica that refuses it for not knowing
/// the deleted tenants yet (it just started) is told them (`tenant_confirm`) and the write is
/// resent, once.
pub fn write(
    pool: &StoragePool,
    confirmations: &Arc<Confirmations>,
    node: &str,
    address: Option<&str>,
    (record, ring): (pb::Record, RingTag),
) -> impl Future<Output = Result<WriteAck, ReplicaError>> + Send + 'static + use<> {
    let batcher = batcher(pool, node, address);
    let confirmations = confirmations.clone();
    let address = address.map(str::to_owned);
    let node = node.to_owned();
    async move {
        let batcher = batcher?;
        match batcher.write(&node, record.clone(), ring).await {
            Err(e) if e.unconfirmed => {
                confirm(&confirmations, &node, address.as_deref()).await?;
                batcher.write(&node, record, ring).await
            }
            answer => answer,
        }
    }
}

/// Reads a key's stored version (tombstones included) from one replica, placed on the ring
/// of `ring_epoch`; confirmed and asked again, once, like [`write`].
pub fn read(
    pool: &StoragePool,
    confirmations: &Arc<Confirmations>,
    node: &str,
    address: Option<&str>,
    (tenant, key): (String, bytes::Bytes),
    ring_epoch: u64,
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
        match batcher.read(&node, request.clone(), ring_epoch).await {
            Err(e) if e.unconfirmed => {
                confirm(&confirmations, &node, address.as_deref()).await?;
                batcher.read(&node, request, ring_epoch).await
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

/// One attempt of a request on one ring.
pub enum OnRing<T> {
    Served(T),
    /// A replica refused a call as placed on a stale ring (`STALE_RING`); the ring view was
    /// told, so the next placement reads the registry again.
    Stale,
}

/// Whether a replica refused its call as placed on a stale ring.
pub fn refused_as_stale<T>(results: &[ReplicaResult<NodeId, T, ReplicaError>]) -> bool {
    results
        .iter()
        .any(|r| matches!(&r.outcome, ReplicaOutcome::Err(e) if e.stale_ring))
}

/// The error of a request refused as placed on a stale ring on two rings in a row (the
/// registry could not be read again, or changed again in between).
pub fn stale_twice(op: &str) -> CoordError {
    CoordError::Unavailable(format!(
        "a storage node refused this {op} twice as placed on a stale ring; retry"
    ))
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
