//! `POST /v1/key-value/batch` and `POST /v1/key-value/batch-get` (API.md, "Key-value
//! additions"): up to [`MAX_ITEMS`] puts and deletes, or reads, in one request, each with its
//! own result. Not atomic across keys: each item is an ordinary (conditional, idempotent)
//! write, delete or read, run concurrently with the others, and some may succeed while others
//! fail.
//!
//! Rules (docs/gateway.md, "Batches"): the whole batch is checked before any item runs, and a
//! bad item (a bad key, a put without a value, a delete with one, a key twice, values over
//! [`MAX_BATCH_VALUE_BYTES`] together) makes the whole request 400/413 with nothing written. A
//! batch takes one request per item from the tenant's rate budget, all or none. An
//! `Idempotency-Key` on a batch gives item `i` the key `<key>#<i>`, so a retried batch replays
//! the items that were done and does the rest.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::limits::check_value_len;
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
use super::kv::{
    admit, check_key, consistency, header_tenant, idempotency_key, ttl_seconds, with_limits,
};
use super::rate_limit::Kind;

/// Items (or keys) per batch, at most.
pub const MAX_ITEMS: usize = 100;
/// The values of one batch together, at most (encoded JSON).
pub const MAX_BATCH_VALUE_BYTES: usize = 10 * 1024 * 1024;
/// Longest `Idempotency-Key` of a batch: `#<index>` is appended per item, and an item's key
/// may be at most 256 characters.
const MAX_BATCH_IDEMPOTENCY_KEY: usize = 250;

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    #[default]
    Put,
    Delete,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    #[serde(default)]
    op: Op,
    key: String,
    /// Present (JSON `null` included) or absent.
    #[serde(default, deserialize_with = "present")]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    if_match: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    if_absent: bool,
    #[serde(default)]
    ttl_seconds: Option<Value>,
}

/// A field that is there, whatever its JSON value (`null` is a value, not an absence).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBatch {
    items: Vec<Item>,
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBatch {
    keys: Vec<String>,
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
}

/// One item's result: `status` "success" with its version, or "error" with its code.
#[derive(Serialize)]
struct ItemResult {
    key: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector_clock: Option<BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replica_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(flatten)]
    error: Option<ItemError>,
}

/// One read's result: the value and version, or the error.
#[derive(Serialize)]
struct ReadResult {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector_clock: Option<BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(flatten)]
    error: Option<ItemError>,
}

#[derive(Serialize)]
struct ItemError {
    error_code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_vector_clock: Option<Value>,
}

impl From<ApiError> for ItemError {
    fn from(e: ApiError) -> Self {
        let current_vector_clock = e
            .fields
            .into_iter()
            .find(|(name, _)| *name == "current_vector_clock")
            .map(|(_, v)| v);
        ItemError {
            error_code: e.code,
            message: e.message,
            current_vector_clock,
        }
    }
}

/// The checks every item passes before any runs.
fn check_items(items: &[Item]) -> Result<(), ApiError> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(ApiError::invalid(format!(
            "a batch holds 1..={MAX_ITEMS} items, not {}",
            items.len()
        )));
    }
    let mut keys = HashSet::with_capacity(items.len());
    let mut value_bytes = 0;
    for (i, item) in items.iter().enumerate() {
        let at = |e: ApiError| ApiError {
            message: format!("item {i}: {}", e.message),
            ..e
        };
        check_key(&item.key).map_err(at)?;
        ttl_seconds(item.ttl_seconds.as_ref()).map_err(at)?;
        if !keys.insert(item.key.as_str()) {
            return Err(at(ApiError::invalid(
                "the key is already in this batch (one item per key: their order is not defined)",
            )));
        }
        match (item.op, &item.value) {
            (Op::Put, None) => return Err(at(ApiError::invalid("a put needs a value"))),
            (Op::Put, Some(v)) => {
                check_value_len(v.get().len())
                    .map_err(|e| at(ApiError::value_too_large(format!("{e} (of JSON)"))))?;
                value_bytes += v.get().len();
            }
            (Op::Delete, Some(_)) => return Err(at(ApiError::invalid("a delete takes no value"))),
            (Op::Delete, None) if item.if_absent => {
                return Err(at(ApiError::invalid("a delete takes no if_absent")));
            }
            (Op::Delete, None) if item.ttl_seconds.is_some() => {
                return Err(at(ApiError::invalid("a delete takes no ttl_seconds")));
            }
            (Op::Delete, None) => {}
        }
    }
    if value_bytes > MAX_BATCH_VALUE_BYTES {
        return Err(ApiError::value_too_large(format!(
            "the values of a batch are {value_bytes} bytes together; the limit is \
             {MAX_BATCH_VALUE_BYTES}"
        )));
    }
    Ok(())
}

/// The idempotency key of item `index`, when the batch has one.
fn item_idempotency_key(batch_key: &str, index: usize) -> String {
    if batch_key.is_empty() {
        String::new()
    } else {
        format!("{batch_key}#{index}")
    }
}

/// The coordinator call of one checked item.
fn item_call(
    tenant: &str,
    item: &Item,
    level: Consistency,
    idempotency_key: String,
) -> Result<Call, ApiError> {
    let key = Bytes::copy_from_slice(item.key.as_bytes());
    let consistency = common::Consistency::from(level) as i32;
    let (has_if_match, if_match) = clock_entries(item.if_match.as_ref());
    Ok(match item.op {
        Op::Put => {
            let value = item.value.as_ref().ok_or_else(mismatched_answer)?;
            Call::Write(pb::WriteKeyValueRequest {
                tenant_id: tenant.to_owned(),
                key,
                value: Bytes::copy_from_slice(value.get().as_bytes()),
                consistency,
                idempotency_key,
                if_match,
                has_if_match,
                if_absent: item.if_absent,
                ttl_seconds: ttl_seconds(item.ttl_seconds.as_ref())?,
                ..Default::default()
            })
        }
        Op::Delete => Call::Delete(pb::DeleteKeyValueRequest {
            tenant_id: tenant.to_owned(),
            key,
            consistency,
            idempotency_key,
            if_match,
            has_if_match,
        }),
    })
}

fn item_result(key: String, answer: Result<Answer, ApiError>) -> ItemResult {
    let ok = |version: Option<&common::Version>, replicas: u32, duplicate: bool| ItemResult {
        key: key.clone(),
        status: "success",
        vector_clock: Some(clock_json(version)),
        replica_count: Some(replicas),
        is_duplicate: Some(duplicate),
        expires_at: None,
        error: None,
    };
    match answer {
        Ok(Answer::Write(w)) => ItemResult {
            expires_at: expires_at(&w.expires_at),
            ..ok(w.version.as_ref(), w.replica_count, w.is_duplicate)
        },
        Ok(Answer::Delete(d)) => ok(d.version.as_ref(), d.replica_count, d.is_duplicate),
        Ok(_) => item_error(key, mismatched_answer()),
        Err(e) => item_error(key, e),
    }
}

fn item_error(key: String, e: ApiError) -> ItemResult {
    ItemResult {
        key,
        status: "error",
        vector_clock: None,
        replica_count: None,
        is_duplicate: None,
        expires_at: None,
        error: Some(e.into()),
    }
}

/// The tenant a batch names (body first, then the header), as the single-key routes do.
fn named<'a, T>(
    parsed: &'a Result<T, ApiError>,
    tenant_of: impl Fn(&T) -> Option<&str>,
    headers: &'a HeaderMap,
) -> Option<&'a str> {
    match parsed {
        Ok(b) => tenant_of(b).or_else(|| header_tenant(headers)),
        Err(_) => header_tenant(headers),
    }
}

/// How many requests of the rate budget a batch takes: one per item (at least one, so a
/// malformed batch still counts).
fn requests<T>(parsed: &Result<T, ApiError>, len: impl Fn(&T) -> usize) -> u32 {
    parsed
        .as_ref()
        .map_or(1, |b| len(b).clamp(1, MAX_ITEMS) as u32)
}

pub async fn write(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed: Result<WriteBatch, ApiError> = body::json(raw);
    let tenant_named = named(&parsed, |b| b.tenant_id.as_deref(), &headers);
    let cost = requests(&parsed, |b| b.items.len());
    let (tenant, decision) = match admit(
        &gw,
        &headers,
        tenant_named,
        (Kind::Write, cost),
        parsed.as_ref().err(),
    ) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let result = async {
        let batch = parsed?;
        check_items(&batch.items)?;
        let level = consistency(batch.consistency.as_deref())?;
        let batch_key = idempotency_key(&headers)?;
        if batch_key.len() > MAX_BATCH_IDEMPOTENCY_KEY {
            return Err(ApiError::invalid(format!(
                "the Idempotency-Key of a batch is at most {MAX_BATCH_IDEMPOTENCY_KEY} characters"
            )));
        }
        let calls = batch
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| item_call(&tenant, item, level, item_idempotency_key(&batch_key, i)))
            .collect::<Result<Vec<Call>, ApiError>>()?;
        let answers = futures::future::join_all(calls.into_iter().map(|c| gw.key_value(c))).await;
        let results: Vec<ItemResult> = batch
            .items
            .into_iter()
            .zip(answers)
            .map(|(item, answer)| item_result(item.key, answer))
            .collect();
        let failed = results.iter().filter(|r| r.error.is_some()).count();
        metrics::counter!("pairdb_gateway_batch_items_total", "kind" => "write", "result" => "success")
            .increment((results.len() - failed) as u64);
        metrics::counter!("pairdb_gateway_batch_items_total", "kind" => "write", "result" => "error")
            .increment(failed as u64);
        Ok(Json(serde_json::json!({"status": "success", "results": results})).into_response())
    }
    .await;
    with_limits(&decision, result)
}

pub async fn get(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed: Result<GetBatch, ApiError> = body::json(raw);
    let tenant_named = named(&parsed, |b| b.tenant_id.as_deref(), &headers);
    let cost = requests(&parsed, |b| b.keys.len());
    let (tenant, decision) = match admit(
        &gw,
        &headers,
        tenant_named,
        (Kind::Read, cost),
        parsed.as_ref().err(),
    ) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let result = async {
        let batch = parsed?;
        if batch.keys.is_empty() || batch.keys.len() > MAX_ITEMS {
            return Err(ApiError::invalid(format!(
                "a batch-get names 1..={MAX_ITEMS} keys, not {}",
                batch.keys.len()
            )));
        }
        for (i, key) in batch.keys.iter().enumerate() {
            check_key(key).map_err(|e| ApiError {
                message: format!("key {i}: {}", e.message),
                ..e
            })?;
        }
        let level = consistency(batch.consistency.as_deref())?;
        let reads = batch.keys.iter().map(|key| {
            gw.key_value(Call::Read(pb::ReadKeyValueRequest {
                tenant_id: tenant.clone(),
                key: Bytes::copy_from_slice(key.as_bytes()),
                consistency: common::Consistency::from(level) as i32,
            }))
        });
        let answers = futures::future::join_all(reads).await;
        let items: Vec<ReadResult> = batch
            .keys
            .into_iter()
            .zip(answers)
            .map(|(key, answer)| read_result(key, answer))
            .collect();
        Ok(Json(serde_json::json!({"status": "success", "items": items})).into_response())
    }
    .await;
    with_limits(&decision, result)
}

fn read_result(key: String, answer: Result<Answer, ApiError>) -> ReadResult {
    let found = answer.and_then(|a| match a {
        Answer::Read(r) => {
            let text = String::from_utf8(r.value.to_vec())
                .map_err(|_| ApiError::internal("stored value is not UTF-8 JSON"))?;
            let value = RawValue::from_string(text)
                .map_err(|_| ApiError::internal("stored value is not JSON"))?;
            Ok((
                value,
                clock_json(r.version.as_ref()),
                expires_at(&r.expires_at),
            ))
        }
        _ => Err(mismatched_answer()),
    });
    match found {
        Ok((value, clock, expires_at)) => ReadResult {
            key,
            value: Some(value),
            vector_clock: Some(clock),
            expires_at,
            error: None,
        },
        Err(e) => ReadResult {
            key,
            value: None,
            vector_clock: None,
            expires_at: None,
            error: Some(e.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(json: &str) -> Vec<Item> {
        serde_json::from_str(json).expect("items")
    }

    #[test]
    fn a_batch_is_checked_whole_before_anything_runs() {
        assert!(
            check_items(&items(
                r#"[{"key":"a","value":1},{"op":"delete","key":"b"}]"#
            ))
            .is_ok()
        );
        assert!(
            check_items(&items(r#"[{"key":"a","value":null}]"#)).is_ok(),
            "null is a value"
        );
        for (bad, why) in [
            ("[]", "empty"),
            (r#"[{"key":"a"}]"#, "put without value"),
            (
                r#"[{"op":"delete","key":"a","value":1}]"#,
                "delete with value",
            ),
            (
                r#"[{"op":"delete","key":"a","if_absent":true}]"#,
                "delete if_absent",
            ),
            (
                r#"[{"key":"a","value":1},{"key":"a","value":2}]"#,
                "key twice",
            ),
            (r#"[{"key":"","value":1}]"#, "empty key"),
            (
                r#"[{"key":"a","value":1,"ttl_seconds":-5}]"#,
                "negative ttl",
            ),
            (r#"[{"key":"a","value":1,"ttl_seconds":0}]"#, "zero ttl"),
            (
                r#"[{"key":"a","value":1,"ttl_seconds":1.5}]"#,
                "fractional ttl",
            ),
            (
                r#"[{"key":"a","value":1,"ttl_seconds":"5"}]"#,
                "ttl as a string",
            ),
            (
                r#"[{"key":"a","value":1,"ttl_seconds":315360001}]"#,
                "ttl over ten years",
            ),
            (
                r#"[{"op":"delete","key":"a","ttl_seconds":5}]"#,
                "delete with ttl",
            ),
        ] {
            let e = check_items(&items(bad)).expect_err(why);
            assert_eq!(e.code, "INVALID_REQUEST", "{why}: {}", e.message);
        }
        let many: Vec<String> = (0..=MAX_ITEMS)
            .map(|i| format!(r#"{{"key":"k{i}","value":1}}"#))
            .collect();
        assert!(check_items(&items(&format!("[{}]", many.join(",")))).is_err());
        let big = "x".repeat(4 * 1024 * 1024);
        let three = format!(
            r#"[{{"key":"a","value":"{big}"}},{{"key":"b","value":"{big}"}},{{"key":"c","value":"{big}"}}]"#
        );
        assert_eq!(
            check_items(&items(&three)).expect_err("12 MiB").code,
            "VALUE_TOO_LARGE"
        );
        assert!(
            serde_json::from_str::<Vec<Item>>(r#"[{"key":"a","value":1,"op":"upsert"}]"#).is_err()
        );
        assert!(serde_json::from_str::<Vec<Item>>(r#"[{"key":"a","value":1,"extra":1}]"#).is_err());
    }

    #[test]
    fn items_of_an_idempotent_batch_get_their_own_keys() {
        assert_eq!(item_idempotency_key("", 3), "");
        assert_eq!(item_idempotency_key("b-1", 3), "b-1#3");
    }
}
