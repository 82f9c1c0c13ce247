//! Tenant administration (API.md, "Tenants"): create, change the replication factor, read.
//! Admin token required in `token` mode. RF must be an integer in 1..=10 (absent = 3).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
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
