//! Engine errors, each with the machine-readable code of STORAGE.md.

use std::path::PathBuf;

/// Everything the engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("key of {len} bytes exceeds the {max}-byte limit")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the {max}-byte limit")]
    ValueTooLarge { len: usize, max: usize },
    #[error("invalid tenant id: {0}")]
    InvalidTenantId(String),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("disk {percent:.1}% full: writes rejected")]
    DiskFull { percent: f64 },
    #[error("disk {percent:.1}% full: writes over {limit} bytes rejected")]
    DiskThrottled { percent: f64, limit: usize },
    #[error("commit log {path}: {source}")]
    CommitLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupted data in {path} at offset {offset}: {reason}")]
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("checksum mismatch in {path} at offset {offset}")]
    ChecksumFailed { path: PathBuf, offset: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the engine is closed")]
    Closed,
}

impl EngineError {
    /// The STORAGE.md error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::KeyTooLarge { .. } => "KEY_TOO_LARGE",
            Self::ValueTooLarge { .. } => "VALUE_TOO_LARGE",
            Self::InvalidTenantId(_) => "INVALID_TENANT_ID",
            Self::InvalidKey(_) => "INVALID_KEY",
            Self::DiskFull { .. } => "DISK_FULL",
            Self::DiskThrottled { .. } => "DISK_THROTTLED",
            Self::CommitLog { .. } => "COMMIT_LOG_FAILED",
            Self::Corrupted { .. } => "CORRUPTED_DATA",
            Self::ChecksumFailed { .. } => "CHECKSUM_FAILED",
            Self::Io { .. } => "INTERNAL",
            Self::Closed => "UNAVAILABLE",
        }
    }

    /// True for damage found in stored data (a checksum or a structure that does not hold).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupted { .. } | Self::ChecksumFailed { .. })
    }

    /// True for errors caused by the request itself (1xxx codes).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidArgument(_)
                | Self::KeyTooLarge { .. }
                | Self::ValueTooLarge { .. }
                | Self::InvalidTenantId(_)
                | Self::InvalidKey(_)
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
