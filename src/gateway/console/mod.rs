//! The operator console (docs/console.md): a single-page app served by the gateway at
//! `/console`, its assets compiled into the binary (no CDN, nothing fetched at run time), and
//! the one endpoint it needs beyond the admin API: `GET /v1/admin/console/history`, the
//! gateway's short traffic history ([`history`]).
//!
//! Invariants: the page and its assets hold no data and need no token (a login form keeps the
//! admin token in the browser's session storage); every figure comes from an admin endpoint
//! that requires the admin token, and every action the console offers calls the same admin
//! endpoint the CLI does, after the operator confirmed it. The assets are served with a
//! Content-Security-Policy that allows only this origin.

pub mod history;

use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;

use super::Gateway;
use super::errors::ApiError;

pub use history::{History, Role};

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// Only this origin: no inline script, no third-party anything.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (merged into the gateway's router).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/console",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset(CONSOLE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset(CONSOLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/v1/admin/console/history", get(traffic_history))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    /// How far back, in seconds (default and at most the whole history).
    seconds: Option<u64>,
}

/// `GET /v1/admin/console/history?seconds=N` (admin): the traffic series of the last N
/// seconds, and the rate limits per tenant.
async fn traffic_history(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    gw.require_admin(&headers)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let kept = history::KEPT_STEPS as u64 * history::STEP_SECONDS;
    let seconds = query.seconds.unwrap_or(kept).min(kept);
    let now = crate::wallclock::now_secs();
    let series = gw.history.series_since(now.saturating_sub(seconds));
    let (write, read) = gw.limits.limits_of("");
    let tenants: serde_json::Map<String, serde_json::Value> = gw
        .limits
        .configured_tenants()
        .map(|t| {
            let (write, read) = gw.limits.limits_of(t);
            (t.to_owned(), json!({"write": write, "read": read}))
        })
        .collect();
    Ok(Json(json!({
        "status": "success",
        "now": now,
        "step_seconds": history::STEP_SECONDS,
        "series": series,
        "rate_limits": {"default": {"write": write, "read": read}, "tenants": tenants},
    })))
}

tokio::task_local! {
    /// The tenant the request being served was admitted for, noted by admission.
    static REQUEST_TENANT: Arc<Mutex<Option<String>>>;
}

/// Notes the tenant of the request being served (for its per-tenant series); outside a
/// request scope it does nothing.
pub fn note_tenant(tenant: &str) {
    let _ = REQUEST_TENANT.try_with(|slot| *slot.lock() = Some(tenant.to_owned()));
}

/// Runs a request and tells which tenant it was admitted for, if any.
pub async fn with_tenant_noted<F: Future>(request: F) -> (F::Output, Option<String>) {
    let slot = Arc::new(Mutex::new(None));
    let output = REQUEST_TENANT.scope(slot.clone(), request).await;
    let tenant = slot.lock().take();
    (output, tenant)
}
