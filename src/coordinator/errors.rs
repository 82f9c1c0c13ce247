//! The coordinator's errors and how they travel to the gateway: a gRPC status whose details hold
//! an `ErrorDetail` with the API.md code (and, for QUORUM_NOT_REACHED, the acks needed and
//! received), so the gateway maps codes to HTTP without parsing messages.

use tonic::{Code, Status};

use crate::limits::LimitError;
use crate::meta::MetaError;
use crate::rpc::coordinator::{ErrorCode, ErrorDetail};
use crate::rpc::detail;
use crate::vclock::Version;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CoordError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("replication factor {0} is outside 1..=10")]
    InvalidReplicationFactor(u32),
    #[error("idempotency key {0:?} was used for a different request")]
    IdempotencyConflict(String),
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("key not found")]
    KeyNotFound,
    #[error("storage node {0:?} not found")]
    NodeNotFound(String),
    #[error("storage node {0:?} already exists")]
    NodeExists(String),
    #[error("{0}")]
    NodeInUse(String),
    #[error("{0}")]
    InvalidNodeConfig(String),
    #[error("migration {0:?} not found")]
    MigrationNotFound(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("quorum not reached: {received} of {required} required replicas answered ({detail})")]
    QuorumNotReached {
        required: usize,
        received: usize,
        detail: String,
    },
    /// A conditional write's condition did not hold; `current` is the key's live version
    /// (none when it has none), or the concurrent version that beat the write.
    #[error("the condition did not hold: {}", describe_current(.current.as_ref()))]
    VersionConflict { current: Option<Version> },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe_current(current: Option<&Version>) -> String {
    match current {
        None => "the key has no live version".to_owned(),
        Some(v) => format!("the current version is {:?}", v.clock),
    }
}

impl From<LimitError> for CoordError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::KeyTooLarge { len, max } => CoordError::KeyTooLarge { len, max },
            LimitError::ValueTooLarge { len, max } => CoordError::ValueTooLarge { len, max },
            LimitError::TenantId | LimitError::EmptyKey | LimitError::KeyHasNul => {
                CoordError::InvalidRequest(e.to_string())
            }
        }
    }
}

impl CoordError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CoordError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            CoordError::InvalidReplicationFactor(_) => ErrorCode::InvalidReplicationFactor,
            CoordError::IdempotencyConflict(_) => ErrorCode::IdempotencyKeyConflict,
            CoordError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
            CoordError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
            CoordError::TenantNotFound(_) => ErrorCode::TenantNotFound,
            CoordError::TenantExists(_) => ErrorCode::TenantExists,
            CoordError::KeyNotFound => ErrorCode::KeyNotFound,
            CoordError::NodeNotFound(_) => ErrorCode::NodeNotFound,
            CoordError::NodeExists(_) => ErrorCode::NodeExists,
            CoordError::NodeInUse(_) => ErrorCode::NodeInUse,
            CoordError::InvalidNodeConfig(_) => ErrorCode::InvalidNodeConfig,
            CoordError::MigrationNotFound(_) => ErrorCode::MigrationNotFound,
            CoordError::SnapshotNotFound(_) => ErrorCode::SnapshotNotFound,
            CoordError::SnapshotExists(_) => ErrorCode::SnapshotExists,
            CoordError::QuorumNotReached { .. } => ErrorCode::QuorumNotReached,
            CoordError::VersionConflict { .. } => ErrorCode::VersionConflict,
            CoordError::Unavailable(_) => ErrorCode::Unavailable,
            CoordError::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// The code's name as in API.md (also the metrics label).
    pub fn code_name(&self) -> &'static str {
        self.code().as_str_name()
    }

    fn grpc_code(&self) -> Code {
        match self {
            CoordError::InvalidRequest(_)
            | CoordError::InvalidReplicationFactor(_)
            | CoordError::IdempotencyConflict(_)
            | CoordError::KeyTooLarge { .. }
            | CoordError::ValueTooLarge { .. }
            | CoordError::NodeInUse(_)
            | CoordError::InvalidNodeConfig(_) => Code::InvalidArgument,
            CoordError::TenantNotFound(_)
            | CoordError::KeyNotFound
            | CoordError::NodeNotFound(_)
            | CoordError::MigrationNotFound(_)
            | CoordError::SnapshotNotFound(_) => Code::NotFound,
            CoordError::TenantExists(_)
            | CoordError::NodeExists(_)
            | CoordError::SnapshotExists(_) => Code::AlreadyExists,
            CoordError::VersionConflict { .. } => Code::FailedPrecondition,
            CoordError::QuorumNotReached { .. } | CoordError::Unavailable(_) => Code::Unavailable,
            CoordError::Internal(_) => Code::Internal,
        }
    }

    /// The `ErrorDetail` this error travels as (in a status, or as a stream answer).
    pub fn detail(&self) -> ErrorDetail {
        let (required, received) = match self {
            CoordError::QuorumNotReached {
                required, received, ..
            } => (*required as u32, *received as u32),
            _ => (0, 0),
        };
        let current = match self {
            CoordError::VersionConflict {
                current: Some(version),
            } => Some(version.into()),
            _ => None,
        };
        ErrorDetail {
            code: self.code() as i32,
            message: self.to_string(),
            required,
            received,
            current,
        }
    }

    pub fn into_status(self) -> Status {
        let detail = self.detail();
        detail::with_detail(self.grpc_code(), detail.message.clone(), &detail)
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Self {
        e.into_status()
    }
}

impl From<MetaError> for CoordError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Unavailable(m) => CoordError::Unavailable(format!("metadata store: {m}")),
            MetaError::Changed(what) => {
                CoordError::Unavailable(format!("{what} kept changing concurrently; retry"))
            }
            other => CoordError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_errors_carry_their_counts() {
        let status = CoordError::QuorumNotReached {
            required: 3,
            received: 2,
            detail: "s3: unavailable".into(),
        }
        .into_status();
        assert_eq!(status.code(), Code::Unavailable);
        let detail = detail::coordinator_detail(&status).expect("detail");
        assert_eq!(detail.code(), ErrorCode::QuorumNotReached);
        assert_eq!((detail.required, detail.received), (3, 2));
        assert_eq!(CoordError::KeyNotFound.code_name(), "KEY_NOT_FOUND");
    }
}
