//! One storage call against one replica, shaped for [`crate::quorum::run`]: each call is a
//! `'static` future resolving to the replica's answer or a [`ReplicaError`] that says whether
//! the replica refused the request itself (no point in a hint) or could not serve it. Calls go
//! through the node's [`super::batcher::NodeBatcher`], which coalesces concurrent ones.

use std::future::Future;

use crate::rpc::storage as pb;
use crate::storage::errors::code_in;

use super::batcher::NodeBatcher;
pub use super::batcher::WriteAck;
use super::storage_pool::StoragePool;

/// Why one replica did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{node}: {message}")]
pub struct ReplicaError {
    pub node: String,
    pub message: String,
    /// The replica rejected the request as invalid (a 1xxx code): retrying it cannot succeed.
    pub rejected: bool,
}

impl ReplicaError {
    pub fn unavailable(node: &str, message: impl Into<String>) -> Self {
        Self::new(node, message)
    }

    fn new(node: &str, message: impl Into<String>) -> Self {
        Self {
            node: node.to_owned(),
            message: message.into(),
            rejected: false,
        }
    }

    pub fn from_status(node: &str, status: &tonic::Status) -> Self {
        let code = code_in(status) as i32;
        Self {
            node: node.to_owned(),
            message: format!("{:?}: {}", status.code(), status.message()),
            rejected: is_rejection(code),
        }
    }

    /// The error a node answered on its batch stream.
    pub fn from_detail(node: &str, detail: &pb::ErrorDetail) -> Self {
        Self {
            node: node.to_owned(),
            message: format!("{:?}: {}", detail.code(), detail.message),
            rejected: is_rejection(detail.code),
        }
    }
}

/// 1xxx codes: the request is wrong, retrying it cannot succeed.
fn is_rejection(code: i32) -> bool {
    (1000..2000).contains(&code)
}

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
    key: Vec<u8>,
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
        .map_err(|e| ReplicaError::new(node, e))
}
