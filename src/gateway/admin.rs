//! Storage-node and migration administration (API.md, "Storage nodes and migrations"). Admin
//! token required in `token` mode. The coordinators carry the changes out and check the node
//! fields (INVALID_NODE_CONFIG); the gateway only parses the body.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::limits::valid_node_id;
use crate::rpc::common::{self as pbc, NodeState};
use crate::rpc::coordinator as pb;

use super::Gateway;
use super::body;
use super::errors::ApiError;

#[derive(Deserialize)]
struct AddNodeBody {
    node_id: String,
    host: String,
    port: u32,
    #[serde(default)]
    virtual_nodes: Option<u32>,
}

#[derive(Deserialize, Default)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// 202 with the migration that carries out an accepted node change.
fn accepted_response(accepted: pb::MigrationAccepted) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "accepted",
            "node_id": accepted.node_id,
            "migration_id": accepted.migration_id,
            "message": accepted.message,
            "estimated_completion": accepted.estimated_completion,
        })),
    )
}

/// 404 NODE_NOT_FOUND: an id no node can have is not looked up.
fn node_not_found(node_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NODE_NOT_FOUND",
        format!("no storage node {node_id:?}"),
    )
}

/// A JSON body that may be left out (empty or only whitespace: the default).
fn optional_body<T: Default + serde::de::DeserializeOwned>(
    raw: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = body::bytes(raw)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("{what} body: {e}")))
}

/// 404 NODE_NOT_FOUND for a node id no node can have.
fn check_node_id(node_id: Option<&str>) -> Result<(), ApiError> {
    match node_id {
        Some(id) if !valid_node_id(id) => Err(node_not_found(id)),
        _ => Ok(()),
    }
}

fn invalid_node(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_NODE_CONFIG", message)
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Active | NodeState::Unspecified => "active",
        NodeState::Bootstrapping => "bootstrapping",
        NodeState::Draining => "draining",
        NodeState::Down => "down",
        NodeState::Failed => "failed",
    }
}

pub async fn list_nodes(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let list = gw
        .forward(pb::ListStorageNodesRequest {}, |mut c, r| async move {
            c.list_storage_nodes(r).await
        })
        .await?;
    let nodes: Vec<_> = list
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "host": n.host,
                "port": n.port,
                "status": state_name(n.state()),
                "virtual_nodes": n.virtual_nodes,
                "keys_count": n.keys_count,
                "disk_usage_percent": n.disk_usage_percent,
                "tokens": n.tokens.iter().map(u64::to_string).collect::<Vec<_>>(),
                "health": {"status": n.health, "reasons": n.health_reasons},
                "load": n.load,
            })
        })
        .collect();
    Ok(Json(json!({"status": "success", "nodes": nodes})))
}

pub async fn add_node(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let bytes = body::bytes(raw)?;
    let b: AddNodeBody =
        serde_json::from_slice(&bytes).map_err(|e| invalid_node(format!("node config: {e}")))?;
    if b.virtual_nodes == Some(0) {
        return Err(invalid_node("virtual_nodes must be 1..=4096"));
    }
    let accepted = gw
        .forward(
            pb::AddStorageNodeRequest {
                node_id: b.node_id,
                host: b.host,
                port: b.port,
                // 0 asks for the default.
                virtual_nodes: b.virtual_nodes.unwrap_or(0),
            },
            |mut c, r| async move { c.add_storage_node(r).await },
        )
        .await?;
    Ok(accepted_response(accepted))
}

pub async fn remove_node(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(node_id): Path<String>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let force = query
        .map(|q| q.0.force)
        .map_err(|e| ApiError::invalid(format!("force must be true or false: {e}")))?;
    if !valid_node_id(&node_id) {
        return Err(node_not_found(&node_id));
    }
    let accepted = gw
        .forward(
            pb::RemoveStorageNodeRequest {
                node_id: node_id.clone(),
                force,
            },
            |mut c, r| async move { c.remove_storage_node(r).await },
        )
        .await?;
    Ok(accepted_response(accepted))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CleanupBody {
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    force: bool,
}

/// `POST /v1/admin/cleanup` `{"node_id"?, "force"?}`: old owners drop the ranges they no
/// longer own; 202 with the cleanup's id (a migration of type `cleanup`). An empty body cleans
/// every node.
pub async fn cleanup(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let b: CleanupBody = optional_body(raw, "cleanup")?;
    check_node_id(b.node_id.as_deref())?;
    let accepted = gw
        .forward(
            pb::StartCleanupRequest {
                node_id: b.node_id.unwrap_or_default(),
                force: b.force,
            },
            |mut c, r| async move { c.start_cleanup(r).await },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "accepted",
            "cleanup_id": accepted.cleanup_id,
            "message": accepted.message,
            "node_ids": accepted.node_ids,
        })),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RepairBody {
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    range_start: Option<RingPosition>,
    #[serde(default)]
    range_end: Option<RingPosition>,
}

/// A ring position as the API writes it (a decimal string: JSON numbers lose u64 precision in
/// many clients), or as a JSON number.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RingPosition {
    Text(String),
    Number(u64),
}

impl RingPosition {
    fn value(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            RingPosition::Number(n) => Ok(*n),
            RingPosition::Text(t) => t.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "{field} must be a ring position: a decimal integer from 0 to {}",
                    u64::MAX
                ))
            }),
        }
    }
}

/// The arc `[range_start, range_end)` of a repair body: both or neither.
fn repair_arc(b: &RepairBody) -> Result<Option<pbc::HashRange>, ApiError> {
    match (&b.range_start, &b.range_end) {
        (None, None) => Ok(None),
        (Some(start), Some(end)) => Ok(Some(pbc::HashRange {
            start: start.value("range_start")?,
            end: end.value("range_end")?,
        })),
        _ => Err(ApiError::invalid(
            "range_start and range_end go together (the arc [range_start, range_end) of the ring)",
        )),
    }
}

/// `POST /v1/admin/repair` `{"tenant_id"?, "node_id"?, "range_start"?, "range_end"?}`:
/// anti-entropy over every range (of one tenant, that one node replicates, within one arc of
/// the ring); 202 with the repair's id (a migration of type `repair`). An empty body repairs
/// everything.
pub async fn repair(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let b: RepairBody = optional_body(raw, "repair")?;
    check_node_id(b.node_id.as_deref())?;
    let range = repair_arc(&b)?;
    let accepted = gw
        .forward(
            pb::StartRepairRequest {
                tenant_id: b.tenant_id.unwrap_or_default(),
                node_id: b.node_id.unwrap_or_default(),
                range,
            },
            |mut c, r| async move { c.start_repair(r).await },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "accepted",
            "repair_id": accepted.repair_id,
            "message": accepted.message,
        })),
    ))
}

/// `GET /v1/admin/repair`: the last repair of each range of the current ring.
pub async fn repair_status(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let status = gw
        .forward(pb::RepairStatusRequest {}, |mut c, r| async move {
            c.get_repair_status(r).await
        })
        .await?;
    let ranges: Vec<Value> = status
        .ranges
        .iter()
        .map(|r| {
            let range = r.range.unwrap_or_default();
            json!({
                // Ring positions are u64: strings, so JSON numbers do not round them.
                "range_start": range.start.to_string(),
                "range_end": range.end.to_string(),
                "last_repaired_at": (!r.last_repaired_at.is_empty()).then_some(&r.last_repaired_at),
                "keys_compared": r.keys_compared,
                "keys_fixed": r.keys_fixed,
                "complete": r.complete,
            })
        })
        .collect();
    Ok(Json(json!({
        "ranges": ranges,
        "oldest_unrepaired_seconds": status.oldest_unrepaired_seconds,
        "ranges_never_repaired": status.ranges_never_repaired,
    })))
}

/// `GET /v1/admin/repair/{repair_id}`: one repair's state, ranges and keys (API.md, "Admin
/// additions"); 404 MIGRATION_NOT_FOUND for an id that names no repair.
pub async fn repair_run(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(repair_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let run = gw
        .forward(
            pb::GetMigrationStatusRequest {
                migration_id: repair_id,
            },
            |mut c, r| async move { c.get_repair(r).await },
        )
        .await?;
    let m = run.migration.unwrap_or_default();
    let state = match m.state() {
        pb::MigrationState::Completed => "completed",
        pb::MigrationState::Failed => "failed",
        pb::MigrationState::Cancelled => "cancelled",
        _ => "running",
    };
    Ok(Json(json!({
        "status": "success",
        "repair_id": m.migration_id,
        "scope": m.node_id,
        "state": state,
        "ranges_total": m.total_keys,
        "ranges_done": m.keys_migrated,
        "keys_compared": run.keys_compared,
        "keys_fixed": run.keys_fixed,
        "bytes_exchanged": m.bytes_migrated,
        "started_at": m.started_at,
        "failure_reason": (!m.failure_reason.is_empty()).then_some(&m.failure_reason),
    })))
}

pub async fn migration(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(migration_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let m = gw
        .forward(
            pb::GetMigrationStatusRequest {
                migration_id: migration_id.clone(),
            },
            |mut c, r| async move { c.get_migration_status(r).await },
        )
        .await?;
    let mut body = migration_json(&m);
    body["status"] = json!("success");
    Ok(Json(body))
}

/// `DELETE /v1/admin/migrations/{id}`: 202 with the migration as it was when the cancel was
/// asked (follow it with GET: it ends `cancelled`, or `completed` if past its last step).
pub async fn cancel_migration(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(migration_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let m = gw
        .forward(
            pb::GetMigrationStatusRequest { migration_id },
            |mut c, r| async move { c.cancel_migration(r).await },
        )
        .await?;
    let mut body = migration_json(&m);
    body["status"] = json!("accepted");
    body["message"] = json!("cancelling: the change is rolled back at its next step");
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// `GET /v1/admin/migrations?limit=N`: the most recently started migrations, newest first.
pub async fn migrations(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let list = gw
        .forward(
            pb::ListMigrationsRequest {
                limit: query.limit.unwrap_or(0),
            },
            |mut c, r| async move { c.list_migrations(r).await },
        )
        .await?;
    let migrations: Vec<Value> = list.migrations.iter().map(migration_json).collect();
    Ok(Json(json!({"status": "success", "migrations": migrations})))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

/// A migration as the API shows it (API.md, "Storage nodes and migrations").
fn migration_json(m: &pb::Migration) -> Value {
    let kind = match m.r#type() {
        pb::MigrationType::NodeRemoval => "node_removal",
        pb::MigrationType::ReplicationFactorChange => "replication_factor_change",
        pb::MigrationType::Cleanup => "cleanup",
        pb::MigrationType::Repair => "repair",
        _ => "node_addition",
    };
    let state = match m.state() {
        pb::MigrationState::InProgress => "in_progress",
        pb::MigrationState::Completed => "completed",
        pb::MigrationState::Failed => "failed",
        pb::MigrationState::Cancelled => "cancelled",
        _ => "pending",
    };
    let percentage = if m.total_keys == 0 {
        0.0
    } else {
        100.0 * m.keys_migrated as f64 / m.total_keys as f64
    };
    let failure_reason = (!m.failure_reason.is_empty()).then_some(m.failure_reason.as_str());
    json!({
        "migration_id": m.migration_id,
        "type": kind,
        "node_id": m.node_id,
        "state": state,
        "migration_status": state,
        "progress": {"keys_migrated": m.keys_migrated, "total_keys": m.total_keys, "percentage": percentage, "bytes_migrated": m.bytes_migrated},
        "started_at": m.started_at,
        "estimated_completion": m.estimated_completion,
        "failure_reason": failure_reason,
    })
}
