//! The admin API calls the suite makes through a gateway: node lists, tenants, node additions
//! and removals, migration states.

use std::time::Duration;

use serde_json::{Value, json};

pub async fn http_json(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let client = pairdb::tools::client::http_builder(None)
        .expect("http client")
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.request(method, url);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// `GET /v1/admin/storage-nodes`: the registered nodes.
pub async fn storage_nodes(gateway: &str) -> Result<Vec<Value>, String> {
    let url = format!("{gateway}/v1/admin/storage-nodes");
    let (status, v) = http_json(reqwest::Method::GET, &url, None).await?;
    match v["nodes"].as_array() {
        Some(nodes) if status == 200 => Ok(nodes.clone()),
        _ => Err(format!("list storage nodes: {status} {v}")),
    }
}

pub async fn create_tenant(gateway: &str, tenant: &str, rf: usize) -> Result<(), String> {
    let body = json!({"tenant_id": tenant, "replication_factor": rf});
    let url = format!("{gateway}/v1/tenants");
    match http_json(reqwest::Method::POST, &url, Some(body)).await? {
        (200, _) => Ok(()),
        (status, v) => Err(format!("create tenant {tenant}: {status} {v}")),
    }
}

/// Starts adding (`Some(addr)`) or removing (`None`) node `id`; returns the migration id.
pub async fn change_node(
    gateway: &str,
    id: &str,
    add: Option<std::net::SocketAddr>,
) -> Result<String, String> {
    let (status, v) = match add {
        Some(addr) => {
            let body = json!({"node_id": id, "host": addr.ip().to_string(), "port": addr.port()});
            let url = format!("{gateway}/v1/admin/storage-nodes");
            http_json(reqwest::Method::POST, &url, Some(body)).await?
        }
        None => {
            let url = format!("{gateway}/v1/admin/storage-nodes/{id}");
            http_json(reqwest::Method::DELETE, &url, None).await?
        }
    };
    match v["migration_id"].as_str() {
        Some(m) if status == 202 => Ok(m.to_owned()),
        _ => Err(format!("{status} {v}")),
    }
}

/// `GET /v1/tenants/{tenant}`: its replication factor as stored (the old one while a change
/// runs).
pub async fn tenant_rf(gateway: &str, tenant: &str) -> Result<usize, String> {
    let url = format!("{gateway}/v1/tenants/{tenant}");
    let (status, v) = http_json(reqwest::Method::GET, &url, None).await?;
    match v["replication_factor"].as_u64() {
        Some(rf) if status == 200 => Ok(rf as usize),
        _ => Err(format!("tenant {tenant}: {status} {v}")),
    }
}

/// Starts moving `tenant`'s replication factor to `rf`; returns the migration id.
pub async fn change_rf(gateway: &str, tenant: &str, rf: usize) -> Result<String, String> {
    let url = format!("{gateway}/v1/tenants/{tenant}/replication-factor");
    let body = json!({ "replication_factor": rf });
    let (status, v) = http_json(reqwest::Method::PUT, &url, Some(body)).await?;
    match v["migration_id"].as_str() {
        Some(m) if status == 200 => Ok(m.to_owned()),
        _ => Err(format!("{status} {v}")),
    }
}

/// The newest replication-factor change of `tenant` (its migration id), if any.
pub async fn newest_rf_change(gateway: &str, tenant: &str) -> Result<Option<String>, String> {
    Ok(migrations(gateway, 50)
        .await?
        .iter()
        .find(|m| m["node_id"] == tenant && m["type"] == "replication_factor_change")
        .and_then(|m| m["migration_id"].as_str())
        .map(str::to_owned))
}

/// A migration as the suite follows it: its state (`pending`, `in_progress`, `completed`,
/// `failed`, `cancelled`) and, when it failed, why.
#[derive(Debug)]
pub struct MigrationState {
    pub state: String,
    pub failure: Option<String>,
}

impl MigrationState {
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.failure {
            Some(why) => write!(f, "{}: {why}", self.state),
            None => f.write_str(&self.state),
        }
    }
}

pub async fn migration_state(gateway: &str, migration: &str) -> Result<MigrationState, String> {
    let url = format!("{gateway}/v1/admin/migrations/{migration}");
    let (status, v) = http_json(reqwest::Method::GET, &url, None).await?;
    match v["state"].as_str() {
        Some(state) if status == 200 => Ok(MigrationState {
            state: state.to_owned(),
            failure: v["failure_reason"].as_str().map(str::to_owned),
        }),
        _ => Err(format!("migration {migration}: {status} {v}")),
    }
}

/// `GET /v1/admin/migrations?limit=N`: the newest `limit` migrations, newest first.
async fn migrations(gateway: &str, limit: u32) -> Result<Vec<Value>, String> {
    let url = format!("{gateway}/v1/admin/migrations?limit={limit}");
    let (status, mut v) = http_json(reqwest::Method::GET, &url, None).await?;
    match v["migrations"].take() {
        Value::Array(list) if status == 200 => Ok(list),
        _ => Err(format!("list migrations: {status} {v}")),
    }
}

/// What the registry holds of node `id`: whether it is in the ring (any state but `failed`),
/// and the newest topology change of it (node additions and removals only).
pub async fn node_in_registry(gateway: &str, id: &str) -> Result<(bool, Option<String>), String> {
    let member = storage_nodes(gateway)
        .await?
        .iter()
        .any(|n| n["node_id"] == id && n["status"] != "failed");
    let newest = migrations(gateway, 50)
        .await?
        .iter()
        .find(|m| {
            m["node_id"] == id
                && matches!(m["type"].as_str(), Some("node_addition" | "node_removal"))
        })
        .and_then(|m| m["migration_id"].as_str())
        .map(str::to_owned);
    Ok((member, newest))
}

/// What a finished anti-entropy repair did (`GET /v1/admin/repair/{id}`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RepairCounts {
    pub keys_compared: u64,
    pub keys_fixed: u64,
}

/// Runs a repair of every tenant and range (`POST /v1/admin/repair` with no scope) and waits
/// for it to complete. A repair that is refused because another one or a node change runs, or
/// that fails (a replica that did not answer), is started again, until `deadline`.
pub async fn repair_everything(
    gateway: &str,
    deadline: tokio::time::Instant,
) -> Result<RepairCounts, String> {
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let url = format!("{gateway}/v1/admin/repair");
        let id = match http_json(reqwest::Method::POST, &url, Some(json!({}))).await {
            Ok((202, v)) => v["repair_id"].as_str().map(str::to_owned),
            Ok((status, v)) => {
                last = format!("start: {status} {v}");
                None
            }
            Err(e) => {
                last = format!("start: {e}");
                None
            }
        };
        if let Some(id) = id {
            match repair_outcome(gateway, &id, deadline).await {
                Ok(counts) => return Ok(counts),
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("no full repair completed: {last}"))
}

/// Follows repair `id` to its end: its counts when it completed, why not otherwise.
async fn repair_outcome(
    gateway: &str,
    id: &str,
    deadline: tokio::time::Instant,
) -> Result<RepairCounts, String> {
    let url = format!("{gateway}/v1/admin/repair/{id}");
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http_json(reqwest::Method::GET, &url, None).await {
            Ok((200, v)) => match v["state"].as_str() {
                Some("completed") => {
                    return Ok(RepairCounts {
                        keys_compared: v["keys_compared"].as_u64().unwrap_or(0),
                        keys_fixed: v["keys_fixed"].as_u64().unwrap_or(0),
                    });
                }
                Some("running") => last = format!("repair {id} still running: {v}"),
                _ => return Err(format!("repair {id} ended: {v}")),
            },
            Ok((status, v)) => last = format!("repair {id}: {status} {v}"),
            Err(e) => last = format!("repair {id}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

/// The last 1000 migrations (`GET /v1/admin/migrations`): how many of each type ended in each
/// state (`"cleanup completed"`: n), and the failed ones' reasons (`"cleanup: <reason>"`: n).
pub async fn migration_counts(gateway: &str) -> Result<MigrationCounts, String> {
    let mut counts = MigrationCounts::default();
    for m in migrations(gateway, 1000).await? {
        let kind = m["type"].as_str().unwrap_or("?");
        let state = m["state"].as_str().unwrap_or("?");
        *counts
            .by_state
            .entry(format!("{kind} {state}"))
            .or_insert(0) += 1;
        if let Some(reason) = m["failure_reason"].as_str() {
            let reason: String = reason.chars().take(200).collect();
            *counts
                .failures
                .entry(format!("{kind}: {reason}"))
                .or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// What [`migration_counts`] found.
#[derive(Debug, Default)]
pub struct MigrationCounts {
    pub by_state: std::collections::BTreeMap<String, usize>,
    pub failures: std::collections::BTreeMap<String, usize>,
}
