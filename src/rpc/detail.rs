//! Error details in gRPC statuses: every pairdb process puts an `ErrorDetail` (the machine
//! code of API.md / STORAGE.md, and for quorum errors the acks needed and received) into the
//! binary details of the statuses it returns, so the next hop maps codes without parsing
//! messages. This module is the one place that encodes and decodes them; which gRPC code a
//! pairdb code travels under is decided by the role that raises it.

use prost::Message;
use tonic::{Code, Status};

use super::{coordinator, storage};

/// A status with `detail` in its details.
pub fn with_detail(code: Code, message: String, detail: &impl Message) -> Status {
    Status::with_details(code, message, detail.encode_to_vec().into())
}

/// The detail a pairdb process put into `status`; `None` for statuses without one (raised by
/// tonic or the transport: a refused connection, a deadline, a reset stream).
pub fn decode<D: Message + Default>(status: &Status) -> Option<D> {
    if status.details().is_empty() {
        return None;
    }
    D::decode(status.details()).ok()
}

/// The detail of a coordinator's status (`None` if a coordinator did not raise it).
pub fn coordinator_detail(status: &Status) -> Option<coordinator::ErrorDetail> {
    decode(status)
}

/// The detail of a storage node's status; a status without one becomes `Internal` with the
/// status's message.
pub fn storage_detail(status: &Status) -> storage::ErrorDetail {
    decode(status).unwrap_or_else(|| storage::ErrorDetail {
        code: storage::ErrorCode::Internal as i32,
        message: status.message().to_owned(),
    })
}

/// The STORAGE.md code of a storage node's status (`Unspecified` if it carries none).
pub fn storage_code(status: &Status) -> storage::ErrorCode {
    decode::<storage::ErrorDetail>(status)
        .and_then(|d| storage::ErrorCode::try_from(d.code).ok())
        .unwrap_or(storage::ErrorCode::Unspecified)
}

/// Whether a storage node refused a request for good: invalid (`INVALID_ARGUMENT`) or placed on
/// a ring older than the node's fence (`STALE_RING`). Sending the same request again cannot
/// succeed; any other error may pass.
pub fn refused_for_good(status: &Status) -> bool {
    status.code() == Code::InvalidArgument || storage_code(status) == storage::ErrorCode::StaleRing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip_and_plain_statuses_have_none() {
        let detail = storage::ErrorDetail {
            code: storage::ErrorCode::DiskFull as i32,
            message: "full".to_owned(),
        };
        let status = with_detail(Code::ResourceExhausted, "full".to_owned(), &detail);
        assert_eq!(storage_code(&status), storage::ErrorCode::DiskFull);
        assert_eq!(storage_detail(&status), detail);
        let plain = Status::unavailable("connection refused");
        assert_eq!(storage_code(&plain), storage::ErrorCode::Unspecified);
        assert_eq!(
            storage_detail(&plain).code,
            storage::ErrorCode::Internal as i32
        );
        assert!(coordinator_detail(&plain).is_none());
    }
}
