//! The gateway's routes, its health endpoints, metrics and access log.
//!
//! `/healthz` and `/health`: the process is up. `/readyz`: at least one coordinator answers its
//! `Health` RPC as ready. `/metrics`: Prometheus. Every request is counted by route and status
//! (`pairdb_gateway_requests_total`, `pairdb_gateway_request_seconds`) and logged as one line
//! at debug level. Unknown routes get the JSON error body (404 INVALID_REQUEST).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::rpc::coordinator as pb;
use crate::rpc::trace;

use super::console::{self, Role};
use super::errors::ApiError;
use super::{Gateway, admin, batch, kv, snapshots, tenants};

pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.max_body_bytes;
    Router::new()
        .route(
            "/v1/key-value",
            post(kv::put).get(kv::get).delete(kv::delete),
        )
        .route("/v1/key-value/batch", post(batch::write))
        .route("/v1/key-value/batch-get", post(batch::get))
        .route("/v1/tenants", get(tenants::list).post(tenants::create))
        .route(
            "/v1/tenants/{tenant_id}",
            get(tenants::get).delete(tenants::delete),
        )
        .route(
            "/v1/tenants/{tenant_id}/replication-factor",
            put(tenants::update_replication_factor),
        )
        .route(
            "/v1/admin/storage-nodes",
            get(admin::list_nodes).post(admin::add_node),
        )
        .route(
            "/v1/admin/storage-nodes/{node_id}",
            axum::routing::delete(admin::remove_node),
        )
        .route("/v1/admin/migrations", get(admin::migrations))
        .route("/v1/admin/cleanup", post(admin::cleanup))
        .route(
            "/v1/admin/repair",
            get(admin::repair_status).post(admin::repair),
        )
        .route("/v1/admin/repair/{repair_id}", get(admin::repair_run))
        .route(
            "/v1/admin/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route(
            "/v1/admin/snapshots/{name}",
            axum::routing::delete(snapshots::delete),
        )
        .route(
            "/v1/admin/migrations/{migration_id}",
            get(admin::migration).delete(admin::cancel_migration),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .merge(console::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "INVALID_REQUEST", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "INVALID_REQUEST",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(gateway.clone(), observe))
        .with_state(gateway)
}

async fn ready(State(gw): State<Arc<Gateway>>) -> (StatusCode, String) {
    match gw
        .coordinators
        .call(|mut c| async move { c.health(pb::HealthRequest {}).await })
        .await
    {
        Ok(h) if h.ready => (StatusCode::OK, "ready\n".to_owned()),
        Ok(h) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("coordinator not ready: {}\n", h.problems),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no coordinator reachable: {}\n", e.message()),
        ),
    }
}

/// The request's id, metrics and the access log line of every request. The id is the client's
/// `X-Request-ID` when it is valid (`rpc::trace::valid`), else a fresh one; the request runs in
/// its scope (so the calls to coordinators carry it) and the answer names it in `X-Request-ID`.
async fn observe(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| trace::valid(id))
        .map_or_else(trace::generate, str::to_owned);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let (response, tenant) = console::with_tenant_noted(trace::scope(&id, next.run(request))).await;
    let mut response = response.into_response();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(trace::HEADER, value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!("pairdb_gateway_requests_total", "route" => route.clone(), "method" => method.to_string(), "status" => status.to_string()).increment(1);
    metrics::histogram!("pairdb_gateway_request_seconds", "route" => route.clone(), "method" => method.to_string())
        .record(elapsed.as_secs_f64());
    tracing::debug!(request_id = %id, %method, route, status, ms = elapsed.as_secs_f64() * 1e3, "request");
    // The console charts the data traffic, not its own polling of the admin API.
    if route.starts_with("/v1/key-value") {
        let code = response
            .extensions()
            .get::<super::errors::ApiErrorCode>()
            .map_or("OK", |c| c.0);
        gw.history.record(
            crate::wallclock::now_secs(),
            Role::Gateway,
            tenant.as_deref(),
            elapsed.as_micros() as u64,
            code,
        );
    }
    response
}
