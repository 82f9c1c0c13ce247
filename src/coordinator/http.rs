//! The coordinator's HTTP side: `/healthz` and `/health` (the process is up), `/readyz` (the
//! metadata store and the idempotency store answer, and at least one storage node of the ring
//! answers a health check), `/metrics` (Prometheus).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::Coordinator;

/// Longest wait for the metadata and idempotency stores' answers.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub fn router(core: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .with_state(core)
}

async fn ready(State(core): State<Arc<Coordinator>>) -> (StatusCode, String) {
    match readiness(&core).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(problems) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problems}\n")),
    }
}

/// `Ok` when the coordinator can serve requests, else what is missing, in one line.
pub async fn readiness(core: &Coordinator) -> Result<(), NotReady> {
    let mut problems = Vec::new();
    match tokio::time::timeout(CHECK_TIMEOUT, core.meta.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(e.to_string()),
        Err(_) => problems.push("metadata store: no answer".to_owned()),
    }
    match tokio::time::timeout(CHECK_TIMEOUT, core.idempotency.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(e.to_string()),
        Err(_) => problems.push("idempotency store: no answer".to_owned()),
    }
    if !storage_reachable(core).await {
        problems.push("no storage node of the ring answers".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(NotReady(problems))
    }
}

/// What keeps a coordinator from serving, one entry per missing dependency.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct NotReady(pub Vec<String>);

/// Some node of the ring answers; or the registry is empty, waiting for its first nodes to join
/// (they register through a ready coordinator: on Kubernetes, through its Service).
async fn storage_reachable(core: &Coordinator) -> bool {
    let health = core.node_health().await;
    health.is_empty() || health.iter().any(|(_, health)| health.is_some())
}
