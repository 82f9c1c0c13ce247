//! Tenant administration (API.md, "Tenants"): create, change the replication factor, read,
//! list, delete (`coordinator::tenant_delete`). Admin token required in `token` mode. RF must be an integer in 1..=10 (absent = 3).
//! The list is paged in id order: `limit` 1..=1000 (default 100), and `cursor`, an opaque
//! token (base64url of the last id of the previous page) the previous page returned; a cursor
//! that does not decode to a tenant id is 400 INVALID_REQUEST.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::rpc::coordinator as pb;

use super::Gateway;
use super::body;
use super::errors::ApiError;

#[derive(Deserialize)]
struct CreateBody {
    tenant_id: String,
    #[serde(default)]
    replication_factor: Option<Value>,
}

#[derive(Deserialize)]
struct UpdateBody {
    replication_factor: Value,
}

/// A replication factor from JSON: an integer in 1..=10.
fn replication_factor(v: &Value) -> Result<u32, ApiError> {
    match v.as_u64() {
        Some(rf @ 1..=10) => Ok(rf as u32),
        _ => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "INVALID_REPLICATION_FACTOR",
            format!("replication_factor must be an integer in 1..=10, not {v}"),
        )),
    }
}

pub async fn create(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let body: CreateBody = body::json(raw)?;
    let rf = match &body.replication_factor {
        None => 0,
        Some(v) => replication_factor(v)?,
    };
    let t = gw
        .forward(
            pb::CreateTenantRequest {
                tenant_id: body.tenant_id.clone(),
                replication_factor: rf,
            },
            |mut c, r| async move { c.create_tenant(r).await },
        )
        .await?;
    Ok(Json(json!({
        "status": "success",
        "tenant_id": t.tenant_id,
        "replication_factor": t.replication_factor,
        "created_at": t.created_at,
    })))
}

pub async fn update_replication_factor(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(tenant_id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let body: UpdateBody = body::json(raw)?;
    let rf = replication_factor(&body.replication_factor)?;
    let r = gw
        .forward(
            pb::UpdateReplicationFactorRequest {
                tenant_id: tenant_id.clone(),
                replication_factor: rf,
            },
            |mut c, r| async move { c.update_replication_factor(r).await },
        )
        .await?;
    let mut out = json!({
        "status": "success",
        "tenant_id": r.tenant_id,
        "old_replication_factor": r.old_replication_factor,
        "new_replication_factor": r.new_replication_factor,
        "updated_at": r.updated_at,
    });
    if let (false, Some(map)) = (r.migration_id.is_empty(), out.as_object_mut()) {
        map.insert("migration_id".to_owned(), json!(r.migration_id));
    }
    Ok(Json(out))
}

pub async fn get(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(tenant_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let t = gw
        .forward(
            pb::GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            |mut c, r| async move { c.get_tenant(r).await },
        )
        .await?;
    Ok(Json(json!({
        "status": "success",
        "tenant_id": t.tenant_id,
        "replication_factor": t.replication_factor,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    })))
}

pub async fn delete(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(tenant_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let t = gw
        .forward(
            pb::GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            |mut c, r| async move { c.delete_tenant(r).await },
        )
        .await?;
    Ok(Json(json!({
        "status": "success",
        "tenant_id": t.tenant_id,
        "deleted": true,
    })))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

fn encode_cursor(last_id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
}

fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    use base64::Engine;
    let bad = || ApiError::invalid(format!("cursor {cursor:?} was not issued by this API"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    crate::limits::check_tenant(&id).map_err(|_| bad())?;
    Ok(id)
}

pub async fn list(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n @ 1..=1000) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit must be an integer in 1..=1000, not {raw:?}"
                )));
            }
        },
    };
    let after = match query.cursor.as_deref() {
        None | Some("") => String::new(),
        Some(c) => decode_cursor(c)?,
    };
    let page = gw
        .forward(
            pb::ListTenantsRequest { limit, after },
            |mut c, r| async move { c.list_tenants(r).await },
        )
        .await?;
    let cursor = match (page.more, page.tenants.last()) {
        (true, Some(last)) => json!(encode_cursor(&last.tenant_id)),
        _ => Value::Null,
    };
    let tenants: Vec<Value> = page
        .tenants
        .iter()
        .map(|t| {
            json!({
                "tenant_id": t.tenant_id,
                "replication_factor": t.replication_factor,
                "created_at": t.created_at,
                "updated_at": t.updated_at,
            })
        })
        .collect();
    Ok(Json(
        json!({"status": "success", "tenants": tenants, "cursor": cursor}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        for id in ["acme", "a/b c", "ünï"] {
            assert_eq!(decode_cursor(&encode_cursor(id)).ok().as_deref(), Some(id));
        }
        for bad in ["***", "", &encode_cursor("a:b")] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
