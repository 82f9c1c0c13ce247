//! Engine errors to gRPC statuses. The machine-readable code travels as an `ErrorDetail` in the
//! status details; the gRPC code is chosen so generic clients retry the right things.

use prost::Message;
use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::rpc::storage::{ErrorCode, ErrorDetail};

/// The STORAGE.md code of an engine error.
pub fn code_of(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        EngineError::KeyTooLarge { .. } => ErrorCode::KeyTooLarge,
        EngineError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
        EngineError::InvalidTenantId(_) => ErrorCode::InvalidTenantId,
        EngineError::InvalidKey(_) => ErrorCode::InvalidKey,
        EngineError::DiskFull { .. } => ErrorCode::DiskFull,
        EngineError::DiskThrottled { .. } => ErrorCode::DiskThrottled,
        EngineError::CommitLog { .. } => ErrorCode::CommitLogFailed,
        EngineError::Corrupted { .. } => ErrorCode::CorruptedData,
        EngineError::ChecksumFailed { .. } => ErrorCode::ChecksumFailed,
        EngineError::Closed => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
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
    Status::with_details(grpc_code(code), message, detail.encode_to_vec().into())
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

/// The `ErrorDetail` of a status made here (an internal error for any other status).
pub fn detail_of(status: &Status) -> ErrorDetail {
    match ErrorDetail::decode(status.details()) {
        Ok(detail) if !status.details().is_empty() => detail,
        _ => ErrorDetail {
            code: ErrorCode::Internal as i32,
            message: status.message().to_owned(),
        },
    }
}

/// The pairdb code carried by a status from a storage node (`Unspecified` if none).
pub fn code_in(status: &Status) -> ErrorCode {
    ErrorDetail::decode(status.details())
        .ok()
        .and_then(|d| ErrorCode::try_from(d.code).ok())
        .unwrap_or(ErrorCode::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_status() {
        let s = from_engine(&EngineError::KeyTooLarge {
            len: 2000,
            max: 1024,
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(code_in(&s), ErrorCode::KeyTooLarge);
        let s = from_engine(&EngineError::DiskFull { percent: 96.0 });
        assert_eq!(
            (s.code(), code_in(&s)),
            (Code::ResourceExhausted, ErrorCode::DiskFull)
        );
        assert_eq!(code_in(&Status::internal("plain")), ErrorCode::Unspecified);
    }
}
