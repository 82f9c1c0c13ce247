//! One storage call against one replica, shaped for [`crate::quorum::run`]: each call is a
//! `'static` future resolving to the replica's answer or a [`ReplicaError`] that says whether
//! the replica refused the request itself (no point in a hint) or could not serve it. Calls go
//! through the node's [`super::batcher::NodeBatcher`], which coalesces concurrent ones.

use std::future::Future;

use crate::rpc::storage as pb;

use super::batcher::NodeBatcher;
pub use super::batcher::WriteAck;
pub use super::replica_error::ReplicaError;
use super::storage_pool::StoragePool;

/// Writes (or tombstones) a record on one replica.
pub fn write(
    pool: &StoragePool,
    node: &str,
    address: Option<&str>,
    record: pb::Record,
) -> impl Future<Output = Result<WriteAck, ReplicaError>> + Send + 'static + use<> {
    let batcher = batcher(pool, node, address);
    let node = node.to_owned();
    async move { batcher?.write(&node, record).await }
}

/// Reads a key's stored version (tombstones included) from one replica.
pub fn read(
    pool: &StoragePool,
    node: &str,
    address: Option<&str>,
    tenant: String,
    key: bytes::Bytes,
) -> impl Future<Output = Result<Option<pb::Record>, ReplicaError>> + Send + 'static + use<> {
    let batcher = batcher(pool, node, address);
    let node = node.to_owned();
    async move {
        batcher?
            .read(
                &node,
                pb::ReadRequest {
                    tenant_id: tenant,
                    key,
                },
            )
            .await
    }
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
