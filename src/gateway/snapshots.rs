//! Cluster snapshots (API.md, "Admin additions"): `POST /v1/admin/snapshots` `{"name"}` takes
//! one on every storage node (200 with the nodes' shares; all or none), `GET` lists them,
//! `DELETE /v1/admin/snapshots/{name}` removes one. Admin token required in `token` mode. The
//! coordinators check the name (400 INVALID_REQUEST) and carry the calls out.

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
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
}

pub async fn create(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let b: CreateBody = body::json(raw)?;
    let taken = gw
        .forward(pb::SnapshotName { name: b.name }, |mut c, r| async move {
            c.create_snapshot(r).await
        })
        .await?;
    let mut body = snapshot_json(&taken);
    body["status"] = json!("success");
    Ok(Json(body))
}

pub async fn list(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let listed = gw
        .forward(pb::ListClusterSnapshotsRequest {}, |mut c, r| async move {
            c.list_snapshots(r).await
        })
        .await?;
    let snapshots: Vec<Value> = listed.snapshots.iter().map(snapshot_json).collect();
    Ok(Json(json!({
        "status": "success",
        "snapshots": snapshots,
        "unreachable_nodes": listed.unreachable_nodes,
    })))
}

pub async fn delete(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let deleted = gw
        .forward(pb::SnapshotName { name }, |mut c, r| async move {
            c.delete_snapshot(r).await
        })
        .await?;
    let mut body = snapshot_json(&deleted);
    body["status"] = json!("success");
    Ok(Json(body))
}

/// A cluster snapshot as the API shows it.
fn snapshot_json(s: &pb::ClusterSnapshot) -> Value {
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "created_at": n.created_at,
                "tables": n.tables,
                "bytes": n.bytes,
                "entries": n.entries,
            })
        })
        .collect();
    json!({
        "name": s.name,
        "created_at": s.created_at,
        "nodes": nodes,
        "missing_nodes": s.missing_nodes,
    })
}
