//! `GET /v1/key-value?prefix=P&limit=L&cursor=C[&values=true][&consistency=]` (API.md, "Key-value
//! additions"): one page of the tenant's keys in key order, and the cursor of the next page
//! (`null` after the last). The coordinator merges the storage nodes' pages and issues the
//! cursors (docs/coordinator.md, "Listing"); the gateway checks the input and shapes the answer.
//! A page counts as one read against the tenant's rate limit.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::quorum::Consistency;
use crate::rpc::common;
use crate::rpc::coordinator as pb;
use crate::rpc::coordinator::key_value_call::Call;
use crate::rpc::coordinator::key_value_result::Result as Answer;

use super::Gateway;
use super::errors::{ApiError, mismatched_answer};
use super::fields::clock_json;

/// Keys per page by default, and at most (API.md).
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Serialize)]
struct Listed {
    key: String,
    vector_clock: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

/// What a listing request asks for (the `prefix`, `cursor`, `limit` and `values` query
/// parameters of `GET /v1/key-value`).
#[derive(Debug, Default)]
pub struct PageQuery {
    pub prefix: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
    pub values: Option<bool>,
}

#[derive(Serialize)]
struct Page {
    status: &'static str,
    keys: Vec<Listed>,
    cursor: Option<String>,
}

/// One page for `tenant`.
pub async fn list(
    gw: &Gateway,
    tenant: String,
    query: &PageQuery,
    level: Consistency,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be 1..={MAX_LIMIT}, not {limit}"
        )));
    }
    let prefix = query.prefix.clone().unwrap_or_default();
    if prefix.len() > crate::limits::MAX_KEY_BYTES || prefix.contains('\0') {
        return Err(ApiError::invalid(
            "prefix must be at most 1024 bytes without NUL",
        ));
    }
    let values = query.values.unwrap_or(false);
    let request = pb::ListKeysRequest {
        tenant_id: tenant,
        prefix: Bytes::from(prefix.into_bytes()),
        limit,
        cursor: query.cursor.clone().unwrap_or_default(),
        values,
        consistency: common::Consistency::from(level) as i32,
    };
    let Answer::List(answer) = gw.key_value(Call::List(request)).await? else {
        return Err(mismatched_answer());
    };
    let keys = answer
        .keys
        .into_iter()
        .map(|k| listed(k, values))
        .collect::<Result<Vec<Listed>, ApiError>>()?;
    let cursor = (!answer.cursor.is_empty()).then_some(answer.cursor);
    Ok(Json(Page {
        status: "success",
        keys,
        cursor,
    })
    .into_response())
}

fn listed(k: pb::ListedKey, values: bool) -> Result<Listed, ApiError> {
    let value = if values {
        let text = String::from_utf8(k.value.to_vec())
            .map_err(|_| ApiError::internal("stored value is not UTF-8 JSON"))?;
        Some(
            RawValue::from_string(text)
                .map_err(|_| ApiError::internal("stored value is not JSON"))?,
        )
    } else {
        None
    };
    Ok(Listed {
        // Keys come from JSON strings; anything else was written around the API.
        key: String::from_utf8_lossy(&k.key).into_owned(),
        vector_clock: clock_json(k.version.as_ref()),
        value,
        expires_at: super::fields::expires_at(&k.expires_at),
    })
}
