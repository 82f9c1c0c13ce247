//! Why one replica did not answer a call: refused as invalid (retrying cannot help, no hint)
//! or unable to serve it (down, timed out, disk full: a hint or a retry may).

use crate::rpc::detail::storage_code;
use crate::rpc::storage as pb;

/// Why one replica did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{node}: {message}")]
pub struct ReplicaError {
    pub node: String,
    pub message: String,
    /// The replica rejected the request as invalid (a 1xxx code): retrying it cannot succeed.
    pub rejected: bool,
    /// The replica refused the write (or read) because its tenant was deleted (the namespace
    /// is dropped there): this coordinator's tenant cache is stale.
    pub tenant_deleted: bool,
    /// The replica refused a client write because it has not been told the deleted tenants
    /// since it started (`TENANTS_UNCONFIRMED`): confirming it and resending may succeed.
    pub unconfirmed: bool,
    /// The replica refused a client call placed on a ring older than its fence
    /// (`STALE_RING`): this coordinator's ring is stale. The request is placed again on the
    /// registry read anew; a write also leaves a hint, placed anew when replayed (the node
    /// may have dropped the range), for a refusal that came after the write was acknowledged.
    pub stale_ring: bool,
}

impl ReplicaError {
    pub fn unavailable(node: &str, message: impl Into<String>) -> Self {
        Self::new(node, message)
    }

    pub fn new(node: &str, message: impl Into<String>) -> Self {
        Self {
            node: node.to_owned(),
            message: message.into(),
            rejected: false,
            tenant_deleted: false,
            unconfirmed: false,
            stale_ring: false,
        }
    }

    /// The replica answered `TENANT_DELETED` for the write, or `tenant_deleted` for the read
    /// (rejected: no hint, no retry, no repair).
    pub fn tenant_deleted(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            message: "the tenant was deleted".to_owned(),
            rejected: true,
            tenant_deleted: true,
            unconfirmed: false,
            stale_ring: false,
        }
    }

    pub fn from_status(node: &str, status: &tonic::Status) -> Self {
        let code = storage_code(status) as i32;
        Self {
            node: node.to_owned(),
            message: format!("{:?}: {}", status.code(), status.message()),
            rejected: is_rejection(code),
            tenant_deleted: false,
            unconfirmed: code == pb::ErrorCode::TenantsUnconfirmed as i32,
            stale_ring: code == pb::ErrorCode::StaleRing as i32,
        }
    }

    /// The error a node answered on its batch stream.
    pub fn from_detail(node: &str, detail: &pb::ErrorDetail) -> Self {
        Self {
            node: node.to_owned(),
            message: format!("{:?}: {}", detail.code(), detail.message),
            rejected: is_rejection(detail.code),
            tenant_deleted: false,
            unconfirmed: detail.code == pb::ErrorCode::TenantsUnconfirmed as i32,
            stale_ring: detail.code == pb::ErrorCode::StaleRing as i32,
        }
    }
}

/// 1xxx codes: the request is wrong, retrying it cannot succeed.
fn is_rejection(code: i32) -> bool {
    (1000..2000).contains(&code)
}
