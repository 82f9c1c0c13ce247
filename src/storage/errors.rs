//! Engine errors to gRPC statuses. The machine-readable code travels as an `ErrorDetail` in the
//! status details; the gRPC code is chosen so generic clients retry the right things.

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
        EngineError::Closed => ErrorCode::Unavailable,
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
        ErrorCode::DiskFull | ErrorCode::DiskThrottled | ErrorCode::ResourceExhausted => {
            Code::ResourceExhausted
        }
        ErrorCode::CorruptedData | ErrorCode::ChecksumFailed => Code::DataLoss,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::CommitLogFailed | ErrorCode::Internal | ErrorCode::Unspecified => Code::Internal,
    }
}

/// A status carrying `code` and `message`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    let message = message.into();
    let detail = ErrorDetail {
        code: code as i32,
        message: message.clone(),
    };
    detail::with_detail(grpc_code(code), message, &detail)
}

pub fn from_engine(e: &EngineError) -> Status {
    status(code_of(e), e.to_string())
}

pub fn invalid(message: impl Into<String>) -> Status {
    status(ErrorCode::InvalidArgument, message)
}

pub fn internal(message: impl Into<String>) -> Status {
    status(ErrorCode::Internal, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_status() {
        let s = from_engine(&EngineError::Limit(LimitError::KeyTooLarge {
            len: 2000,
            max: 1024,
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(detail::storage_code(&s), ErrorCode::KeyTooLarge);
        let s = from_engine(&EngineError::DiskFull { percent: 96.0 });
        assert_eq!(
            (s.code(), detail::storage_code(&s)),
            (Code::ResourceExhausted, ErrorCode::DiskFull)
        );
    }
}
