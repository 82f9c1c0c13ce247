//! `POST/GET/DELETE /v1/key-value` (API.md, "Key-value").
//!
//! Order of a request: authenticate, read the body, resolve the tenant (token `sub`; with auth
//! `none`: body `tenant_id`, query `tenant_id`, `X-Tenant-ID`), take one request from the
//! tenant's rate budget (so every response from here on carries `X-RateLimit-*`), check the
//! input, forward. `value` is kept as the exact JSON text the client sent (`serde_json`'s
//! `RawValue`), so every JSON type round-trips unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::limits::{LimitError, MAX_TTL_SECONDS, check_client_key, check_value_len};
use crate::quorum::Consistency;
use crate::rpc::common;
use crate::rpc::coordinator as pb;
use crate::rpc::coordinator::key_value_call::Call;
use crate::rpc::coordinator::key_value_result::Result as Answer;

use super::Gateway;
use super::body;
use super::errors::ApiError;
use super::errors::mismatched_answer;
use super::fields::{clock_entries, clock_json, expires_at};
use super::rate_limit::{Decision, Kind};

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Deserialize)]
struct PutBody {
    key: String,
    value: Box<RawValue>,
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    context: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    if_match: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    if_absent: bool,
    /// Checked by [`ttl_seconds`] (any JSON, so a bad one gets a precise message).
    #[serde(default)]
    ttl_seconds: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
pub struct KeyQuery {
    key: Option<String>,
    consistency: Option<String>,
    tenant_id: Option<String>,
    /// Listing (`prefix` or `cursor` without `key`): see `gateway::listing`.
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
    values: Option<bool>,
}

#[derive(Deserialize, Default)]
struct DeleteBody {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    if_match: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
}

#[derive(Serialize)]
struct PutResponse {
    status: &'static str,
    key: String,
    idempotency_key: String,
    vector_clock: BTreeMap<String, u64>,
    replica_count: u32,
    consistency: &'static str,
    is_duplicate: bool,
    /// The idempotency store was unavailable: served without it, a repeat writes again.
    idempotency_skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<WriteReplicas>,
    /// RFC 3339; absent when the value never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

#[derive(Serialize)]
struct GetResponse {
    status: &'static str,
    key: String,
    value: Box<RawValue>,
    vector_clock: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<ReadReplicas>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

#[derive(Serialize)]
struct DeleteResponse {
    status: &'static str,
    key: String,
    vector_clock: BTreeMap<String, u64>,
    replica_count: u32,
    consistency: &'static str,
    is_duplicate: bool,
    idempotency_skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<WriteReplicas>,
}

/// What the replicas did with a write, as of the reply (opt-in: [`REPLICA_DETAIL_HEADER`]).
#[derive(Serialize)]
struct WriteReplicas {
    asked: u32,
    acked: u32,
    hinted: u32,
    pending: u32,
    /// Every replica had applied it by the reply (none relies on a hint or is still working).
    on_all_replicas: bool,
}

/// What the replicas said to a read (opt-in: [`REPLICA_DETAIL_HEADER`]).
#[derive(Serialize)]
struct ReadReplicas {
    asked: u32,
    answered: u32,
    agreed: u32,
    /// Some replica answered an older version (or nothing) and was sent the winner.
    read_repair: bool,
    repaired: u32,
}

/// The request header that asks for the replica detail in the answer (`true` or `1`).
pub const REPLICA_DETAIL_HEADER: &str = "x-replica-detail";

fn wants_detail(headers: &HeaderMap) -> bool {
    headers
        .get(REPLICA_DETAIL_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn write_replicas(wanted: bool, detail: Option<&pb::WriteDetail>) -> Option<WriteReplicas> {
    let d = detail.filter(|_| wanted)?;
    Some(WriteReplicas {
        asked: d.asked,
        acked: d.acked,
        hinted: d.hinted,
        pending: d.pending,
        on_all_replicas: d.acked == d.asked,
    })
}

fn read_replicas(wanted: bool, detail: Option<&pb::ReadDetail>) -> Option<ReadReplicas> {
    let d = detail.filter(|_| wanted)?;
    Some(ReadReplicas {
        asked: d.asked,
        answered: d.answered,
        agreed: d.agreed,
        read_repair: d.repaired > 0,
        repaired: d.repaired,
    })
}

/// The `ttl_seconds` of a write: absent (or `null`) is 0, "never expires"; otherwise an
/// integer 1..=[`MAX_TTL_SECONDS`] (a negative, zero, fractional, string or oversized one is
/// 400 and nothing is written).
pub(super) fn ttl_seconds(ttl: Option<&serde_json::Value>) -> Result<u64, ApiError> {
    let Some(ttl) = ttl else {
        return Ok(0);
    };
    match ttl.as_u64() {
        Some(n @ 1..=MAX_TTL_SECONDS) => Ok(n),
        _ => Err(ApiError::invalid(format!(
            "ttl_seconds must be an integer 1..={MAX_TTL_SECONDS} (ten years), not {ttl}"
        ))),
    }
}

pub(super) fn consistency(raw: Option<&str>) -> Result<Consistency, ApiError> {
    match raw {
        None => Ok(Consistency::Quorum),
        Some(s) => s
            .parse()
            .map_err(|e: crate::quorum::UnknownConsistency| ApiError::invalid(e.to_string())),
    }
}

pub(super) fn check_key(key: &str) -> Result<(), ApiError> {
    check_client_key(key.as_bytes()).map_err(|e| match e {
        LimitError::KeyTooLarge { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "KEY_TOO_LARGE", e.to_string())
        }
        _ => ApiError::invalid(e.to_string()),
    })
}

/// The `Idempotency-Key` header (empty when absent).
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(String::new());
    };
    let k = v
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII"))?;
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(k.to_owned())
}

pub(super) fn header_tenant(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-tenant-id").and_then(|v| v.to_str().ok())
}

/// Rate-limit headers for one decision.
fn limit_headers(d: &Decision) -> Vec<(HeaderName, HeaderValue)> {
    let mut h = vec![
        (
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderValue::from(d.limit),
        ),
        (
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderValue::from(d.remaining),
        ),
        (
            HeaderName::from_static("x-ratelimit-reset"),
            HeaderValue::from(d.reset_unix),
        ),
    ];
    if !d.allowed {
        let secs = d.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        h.push((axum::http::header::RETRY_AFTER, HeaderValue::from(secs)));
    }
    h
}

/// Adds the rate-limit headers to whatever the handler answered.
pub(super) fn with_limits(decision: &Decision, result: Result<Response, ApiError>) -> Response {
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    for (name, value) in limit_headers(decision) {
        response.headers_mut().insert(name, value);
    }
    response
}

/// Authenticates, resolves the tenant and takes one request of `kind` from its budget; the
/// error is the response to send (401/403/400, or 429 with the rate-limit headers). An
/// authentication failure wins over `input` (the request's own error); a missing tenant loses
/// to it (a body that did not parse cannot name its tenant).
pub(super) fn admit(
    gw: &Gateway,
    headers: &HeaderMap,
    named: Option<&str>,
    (kind, requests): (Kind, u32),
    input: Option<&ApiError>,
) -> Result<(String, Decision), Box<Response>> {
    let caller = gw
        .auth
        .caller(headers)
        .map_err(|e| Box::new(e.into_response()))?;
    let tenant = gw
        .auth
        .tenant(&caller, named)
        .map_err(|e| match input {
            Some(input) if e.status == StatusCode::BAD_REQUEST => input.clone(),
            _ => e,
        })
        .map_err(|e| Box::new(e.into_response()))?;
    super::console::note_tenant(&tenant);
    let decision = gw.limits.check_n(&tenant, kind, requests);
    if !decision.allowed {
        metrics::counter!("pairdb_gateway_rate_limited_total").increment(1);
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMIT_EXCEEDED",
            format!(
                "more than {} requests per minute (this one counts {requests})",
                decision.limit
            ),
        );
        return Err(Box::new(with_limits(&decision, Err(error))));
    }
    Ok((tenant, decision))
}

pub async fn put(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed: Result<PutBody, ApiError> = body::json(raw);
    // In auth `none` the tenant may be in the body, so a body that does not parse still needs
    // a tenant from the header before the limit applies.
    let named = match &parsed {
        Ok(b) => b.tenant_id.as_deref().or_else(|| header_tenant(&headers)),
        Err(_) => header_tenant(&headers),
    };
    let (tenant, decision) = match admit(
        &gw,
        &headers,
        named,
        (Kind::Write, 1),
        parsed.as_ref().err(),
    ) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let result = async {
        let body = parsed?;
        check_key(&body.key)?;
        let ttl_seconds = ttl_seconds(body.ttl_seconds.as_ref())?;
        let level = consistency(body.consistency.as_deref())?;
        let value = body.value.get();
        check_value_len(value.len())
            .map_err(|e| ApiError::value_too_large(format!("{e} (of JSON)")))?;
        let idempotency_key = idempotency_key(&headers)?;
        let (has_context, context) = clock_entries(body.context.as_ref());
        let (has_if_match, if_match) = clock_entries(body.if_match.as_ref());
        let request = pb::WriteKeyValueRequest {
            tenant_id: tenant,
            key: Bytes::copy_from_slice(body.key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            consistency: common::Consistency::from(level) as i32,
            idempotency_key,
            context,
            has_context,
            if_match,
            has_if_match,
            if_absent: body.if_absent,
            ttl_seconds,
        };
        let Answer::Write(answer) = gw.key_value(Call::Write(request)).await? else {
            return Err(mismatched_answer());
        };
        Ok(Json(PutResponse {
            status: "success",
            key: body.key,
            idempotency_key: answer.idempotency_key,
            vector_clock: clock_json(answer.version.as_ref()),
            replica_count: answer.replica_count,
            consistency: level.as_str(),
            is_duplicate: answer.is_duplicate,
            idempotency_skipped: answer.idempotency_skipped,
            replicas: write_replicas(wants_detail(&headers), answer.detail.as_ref()),
            expires_at: expires_at(&answer.expires_at),
        })
        .into_response())
    }
    .await;
    with_limits(&decision, result)
}

pub async fn get(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<KeyQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = query
        .map(|q| q.0)
        .map_err(|e| ApiError::invalid(e.to_string()));
    let named = match &query {
        Ok(q) => q.tenant_id.as_deref().or_else(|| header_tenant(&headers)),
        Err(_) => header_tenant(&headers),
    };
    let (tenant, decision) =
        match admit(&gw, &headers, named, (Kind::Read, 1), query.as_ref().err()) {
            Ok(t) => t,
            Err(r) => return *r,
        };
    let result = async {
        let query = query?;
        let listing = query.prefix.is_some() || query.cursor.is_some();
        let key = match query.key {
            Some(_) if listing => {
                return Err(ApiError::invalid(
                    "key reads one key; prefix and cursor list keys: not both",
                ));
            }
            None if listing => {
                let level = consistency(query.consistency.as_deref())?;
                let page = super::listing::PageQuery {
                    prefix: query.prefix,
                    cursor: query.cursor,
                    limit: query.limit,
                    values: query.values,
                };
                return super::listing::list(&gw, tenant, &page, level).await;
            }
            None => {
                return Err(ApiError::invalid(
                    "missing query parameter key (or prefix, to list keys)",
                ));
            }
            Some(key) => key,
        };
        check_key(&key)?;
        let level = consistency(query.consistency.as_deref())?;
        let request = pb::ReadKeyValueRequest {
            tenant_id: tenant,
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: common::Consistency::from(level) as i32,
        };
        let Answer::Read(answer) = gw.key_value(Call::Read(request)).await? else {
            return Err(mismatched_answer());
        };
        let text = std::str::from_utf8(&answer.value)
            .map_err(|_| ApiError::internal("stored value is not UTF-8 JSON"))?;
        let value = RawValue::from_string(text.to_owned())
            .map_err(|_| ApiError::internal("stored value is not JSON"))?;
        Ok(Json(GetResponse {
            status: "success",
            key,
            value,
            vector_clock: clock_json(answer.version.as_ref()),
            replicas: read_replicas(wants_detail(&headers), answer.detail.as_ref()),
            expires_at: expires_at(&answer.expires_at),
        })
        .into_response())
    }
    .await;
    with_limits(&decision, result)
}

pub async fn delete(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<KeyQuery>, axum::extract::rejection::QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let query = query.map(|q| q.0).unwrap_or_default();
    let parsed: Result<DeleteBody, ApiError> = body::json_or_default(raw);
    let named = match &parsed {
        Ok(b) => b.tenant_id.as_deref(),
        Err(_) => None,
    }
    .or(query.tenant_id.as_deref())
    .or_else(|| header_tenant(&headers));
    let (tenant, decision) = match admit(
        &gw,
        &headers,
        named,
        (Kind::Write, 1),
        parsed.as_ref().err(),
    ) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let result = async {
        let body = parsed?;
        let key = body
            .key
            .or(query.key)
            .ok_or_else(|| ApiError::invalid("missing key (in the body or ?key=)"))?;
        check_key(&key)?;
        let level = consistency(body.consistency.as_deref().or(query.consistency.as_deref()))?;
        let (has_if_match, if_match) = clock_entries(body.if_match.as_ref());
        let request = pb::DeleteKeyValueRequest {
            tenant_id: tenant,
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: common::Consistency::from(level) as i32,
            idempotency_key: idempotency_key(&headers)?,
            if_match,
            has_if_match,
        };
        let Answer::Delete(answer) = gw.key_value(Call::Delete(request)).await? else {
            return Err(mismatched_answer());
        };
        Ok(Json(DeleteResponse {
            status: "success",
            key,
            vector_clock: clock_json(answer.version.as_ref()),
            replica_count: answer.replica_count,
            consistency: level.as_str(),
            is_duplicate: answer.is_duplicate,
            idempotency_skipped: answer.idempotency_skipped,
            replicas: write_replicas(wants_detail(&headers), answer.detail.as_ref()),
        })
        .into_response())
    }
    .await;
    with_limits(&decision, result)
}
