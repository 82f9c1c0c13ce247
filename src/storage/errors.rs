//! The storage node's errors and their codes. The machine-readable code travels as an
//! `ErrorDetail` (in a status's details, or as a `BatchStream` answer); the gRPC code is chosen
//! so generic clients retry the right things.

use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::limits::LimitError;
use crate::rpc::detail;
use crate::rpc::storage::{ErrorCode, ErrorDetail};

/// The STORAGE.md code of an engine error.
pub fn code_of(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        EngineError::Limit(limit) => match limit {
            LimitError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
            LimitError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            LimitError::TenantId => ErrorCode::InvalidTenantId,
            LimitError::EmptyKey | LimitError::KeyHasNul => ErrorCode::InvalidKey,
        },
        EngineError::DiskFull { .. } => ErrorCode::DiskFull,
        EngineError::DiskThrottled { .. } => ErrorCode::DiskThrottled,
        EngineError::CommitLog { .. } => ErrorCode::CommitLogFailed,
        EngineError::Corrupted { .. } => ErrorCode::CorruptedData,
        EngineError::ChecksumFailed { .. } => ErrorCode::ChecksumFailed,
        EngineError::Closed | EngineError::TreesIncomplete(_) => ErrorCode::Unavailable,
        EngineError::Io { .. } => ErrorCode::Internal,
    }
}

fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument
        | ErrorCode::KeyTooLarge
        | ErrorCode::ValueTooLarge
        | ErrorCode::InvalidTenantId
        | ErrorCode::InvalidKey => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::DiskFull | ErrorCode::DiskThrottled | ErrorCode::ResourceExhausted => {
            Code::ResourceExhausted
        }
        ErrorCode::CorruptedData | ErrorCode::ChecksumFailed => Code::DataLoss,
        ErrorCode::Unavailable | ErrorCode::TenantsUnconfirmed => Code::Unavailable,
        ErrorCode::StaleRing => Code::FailedPrecondition,
        ErrorCode::CommitLogFailed | ErrorCode::Internal | ErrorCode::Unspecified => Code::Internal,
    }
}

/// Everything a storage-node call can fail with. Handlers return it; the unary RPC boundary
/// turns it into a status ([`StorageError::into_status`]), a `BatchStream` answer into its
/// `ErrorDetail` ([`StorageError::detail`]): each error is encoded once, where it leaves.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The request is malformed (a missing field, a bad range, too many items).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Snapshot(#[from] crate::storage::snapshots::SnapshotError),
    /// The node failed in a way that is not the engine's (a task panicked, shutting down).
    #[error("{0}")]
    Internal(String),
    /// A client write or read before the node learned the deleted tenants (`dropped_tenants`).
    #[error(
        "this node has not been told which tenants were deleted since it started; a coordinator confirms it with a complete DropTenants"
    )]
    TenantsUnconfirmed,
    /// A client call placed on a ring older than the node's fence (`ring_fence`).
    #[error(transparent)]
    StaleRing(#[from] crate::storage::ring_fence::StaleRing),
}

impl StorageError {
    /// The STORAGE.md code.
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::Engine(e) => code_of(e),
            StorageError::Invalid(_) => ErrorCode::InvalidArgument,
            StorageError::Snapshot(e) => {
                use crate::storage::snapshots::SnapshotError as S;
                match e {
                    S::InvalidName(_) | S::TooOld { .. } => ErrorCode::InvalidArgument,
                    S::Exists(_) => ErrorCode::AlreadyExists,
                    S::NotFound(_) => ErrorCode::NotFound,
                    S::Engine(e) => code_of(e),
                    S::Io { .. } => ErrorCode::Internal,
                }
            }
            StorageError::Internal(_) => ErrorCode::Internal,
            StorageError::TenantsUnconfirmed => ErrorCode::TenantsUnconfirmed,
            StorageError::StaleRing(_) => ErrorCode::StaleRing,
        }
    }

    /// The `ErrorDetail` a `BatchStream` answer carries.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }

    pub fn into_status(self) -> Status {
        let detail = self.detail();
        detail::with_detail(grpc_code(self.code()), detail.message.clone(), &detail)
    }
}

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Self {
        e.into_status()
    }
}

impl From<LimitError> for StorageError {
    fn from(e: LimitError) -> Self {
        StorageError::Engine(EngineError::Limit(e))
    }
}

pub fn invalid(message: impl Into<String>) -> StorageError {
    StorageError::Invalid(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_status() {
        let s = StorageError::from(LimitError::KeyTooLarge {
            len: 2000,
            max: 1024,
        })
        .into_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(detail::storage_code(&s), ErrorCode::KeyTooLarge);
        let s = StorageError::from(EngineError::DiskFull { percent: 96.0 }).into_status();
        assert_eq!(
            (s.code(), detail::storage_code(&s)),
            (Code::ResourceExhausted, ErrorCode::DiskFull)
        );
    }
}
