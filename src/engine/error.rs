//! Engine errors. The storage node maps each to its STORAGE.md code (`storage::errors`).

use std::path::PathBuf;

use crate::limits::LimitError;

/// Everything the engine can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tenant id, key or value outside the limits of STORAGE.md.
    #[error(transparent)]
    Limit(#[from] LimitError),
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
    /// The range trees could not be built at open (a damaged table): anti-entropy cannot
    /// compare this node until it restarts with the damage repaired.
    #[error("range hash trees incomplete: {0}")]
    TreesIncomplete(String),
}

impl EngineError {
    /// True for damage found in stored data (a checksum or a structure that does not hold).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupted { .. } | Self::ChecksumFailed { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
