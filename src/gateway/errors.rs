//! Errors of the public API (API.md, "Error codes"): every error body is
//! `{"status":"error","error_code","message"[,"details"],"request_id"}` with the documented HTTP
//! status; `request_id` is the request's id (`rpc::trace`), also in the `X-Request-ID` header.
//! Coordinator errors arrive as gRPC statuses carrying an `ErrorDetail`; [`ApiError::from_status`]
//! maps its code, so the gateway never guesses from messages.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::rpc::coordinator::ErrorCode;
use crate::rpc::detail::coordinator_detail;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Fields of the body beside the standard ones (VERSION_CONFLICT's `current_vector_clock`).
    pub fields: Vec<(&'static str, Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            fields: Vec::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    pub fn value_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "VALUE_TOO_LARGE", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", message)
    }

    /// The API error for a coordinator's answer.
    pub fn from_status(status: &tonic::Status) -> Self {
        let Some(detail) = coordinator_detail(status) else {
            return match status.code() {
                tonic::Code::DeadlineExceeded => {
                    Self::unavailable("the coordinator did not answer in time")
                }
                _ => Self::unavailable(format!("no coordinator answered: {}", status.message())),
            };
        };
        let code = detail.code();
        let http = http_status(code);
        let mut error = Self::new(http, api_code(code), detail.message);
        if code == ErrorCode::QuorumNotReached {
            error.details = Some(json!({"required": detail.required, "received": detail.received}));
        }
        if code == ErrorCode::VersionConflict {
            // null when the key has no live version.
            let current = detail
                .current
                .as_ref()
                .map_or(Value::Null, |v| json!(super::fields::clock_json(Some(v))));
            error.fields.push(("current_vector_clock", current));
        }
        error
    }
}

/// HTTP status of each API code. KEY_TOO_LARGE is 400 (the request is malformed), VALUE_TOO_LARGE
/// is 413 (the body is too large), as docs/api.md says.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::InvalidReplicationFactor
        | ErrorCode::IdempotencyKeyConflict
        | ErrorCode::InvalidNodeConfig
        | ErrorCode::NodeInUse
        | ErrorCode::KeyTooLarge => StatusCode::BAD_REQUEST,
        ErrorCode::ValueTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::TenantNotFound
        | ErrorCode::KeyNotFound
        | ErrorCode::NodeNotFound
        | ErrorCode::MigrationNotFound
        | ErrorCode::SnapshotNotFound => StatusCode::NOT_FOUND,
        ErrorCode::TenantExists
        | ErrorCode::NodeExists
        | ErrorCode::SnapshotExists
        | ErrorCode::VersionConflict => StatusCode::CONFLICT,
        ErrorCode::RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::QuorumNotReached | ErrorCode::Unavailable | ErrorCode::OutcomeUnknown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::InternalError | ErrorCode::Unspecified => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn api_code(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unspecified => "INTERNAL_ERROR",
        other => other.as_str_name(),
    }
}

/// A coordinator answered a call with the result of another kind of call.
pub fn mismatched_answer() -> ApiError {
    ApiError::internal("the coordinator answered with a different kind of result")
}

/// The error code an [`ApiError`] response carries, kept in the response's extensions (the
/// body is serialized by then) for the console's traffic history.
#[derive(Debug, Clone, Copy)]
pub struct ApiErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "status": "error",
            "error_code": self.code,
            "message": self.message,
        });
        if let Some(map) = body.as_object_mut() {
            if let Some(details) = self.details {
                map.insert("details".to_owned(), details);
            }
            for (name, value) in self.fields {
                map.insert(name.to_owned(), value);
            }
            // The id the answer's X-Request-ID header carries (every request has one).
            if let Some(id) = crate::rpc::trace::current() {
                map.insert("request_id".to_owned(), Value::String(id));
            }
        }
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(ApiErrorCode(self.code));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::errors::CoordError;

    #[test]
    fn coordinator_codes_map_to_documented_statuses() {
        let quorum = CoordError::QuorumNotReached {
            required: 3,
            received: 1,
            detail: String::new(),
        }
        .into_status();
        let e = ApiError::from_status(&quorum);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "QUORUM_NOT_REACHED")
        );
        assert_eq!(e.details, Some(json!({"required": 3, "received": 1})));
        let e = ApiError::from_status(&CoordError::TenantExists("a".into()).into_status());
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "TENANT_EXISTS"));
        let e = ApiError::from_status(&CoordError::NodeExists("s4".into()).into_status());
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "NODE_EXISTS"));
        let e = ApiError::from_status(&CoordError::NodeInUse("rf".into()).into_status());
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "NODE_IN_USE"));
        let conflict =
            |current| ApiError::from_status(&CoordError::VersionConflict { current }.into_status());
        let e = conflict(None);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "VERSION_CONFLICT")
        );
        assert_eq!(e.fields, vec![("current_vector_clock", Value::Null)]);
        let v = crate::vclock::Version::new(crate::vclock::VectorClock::from_entries([("c1", 9)]));
        assert_eq!(
            conflict(Some(v)).fields,
            vec![("current_vector_clock", json!({"c1": 9}))]
        );
        let e = ApiError::from_status(&tonic::Status::unavailable("connection refused"));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
        );
    }
}
