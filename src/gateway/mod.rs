//! The gateway: the public HTTP/JSON API of API.md. It authenticates, resolves the tenant,
//! applies per-tenant rate limits, checks input, and forwards to coordinators over gRPC; it
//! keeps no data.
//!
//! Modules: [`auth`] (JWT / none), [`rate_limit`] (governor per tenant), [`coordinators`]
//! (client with round-robin and failover), [`errors`] (the error body and code mapping),
//! [`body`] (JSON body reading with the size limit), [`kv`], [`tenants`], [`admin`] (the
//! routes), [`router`] (routes, health, metrics, access log), [`console`] (the operator
//! console and its traffic history).
//!
//! Invariants: a request that fails validation, auth or the rate limit never reaches a
//! coordinator; every key-value response (errors included, once the tenant is known) carries
//! the `X-RateLimit-*` headers; values are stored as the exact JSON text the client sent.

pub mod admin;
pub mod auth;
pub mod batch;
pub mod body;
pub mod console;
pub mod coordinators;
pub mod errors;
pub mod fields;
pub mod https;
pub mod kv;
pub mod listing;
pub mod rate_limit;
pub mod router;
pub mod snapshots;
pub mod tenants;

use std::future::Future;

use axum::http::HeaderMap;

use crate::rpc::coordinator::{key_value_call, key_value_result};
use auth::Auth;
use coordinators::{Client, Coordinators};
use errors::ApiError;
use rate_limit::RateLimits;

/// Shared state of the HTTP handlers.
pub struct Gateway {
    pub auth: Auth,
    pub limits: RateLimits,
    pub coordinators: Coordinators,
    pub max_body_bytes: usize,
    /// The traffic the console charts.
    pub history: console::History,
}

impl Gateway {
    /// Sends `request` to a coordinator (with failover) and maps its error to the API's.
    pub async fn forward<Req, T, F, Fut>(&self, request: Req, call: F) -> Result<T, ApiError>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.coordinators
            .call(|client| call(client, request.clone()))
            .await
            .map_err(|s| ApiError::from_status(&s))
    }

    /// Sends a key-value call to a coordinator's key-value stream (with failover) and maps its
    /// error to the API's.
    pub async fn key_value(
        &self,
        call: key_value_call::Call,
    ) -> Result<key_value_result::Result, ApiError> {
        let started = std::time::Instant::now();
        let result = self
            .coordinators
            .key_value(call)
            .await
            .map_err(|s| ApiError::from_status(&s));
        let code = result.as_ref().map_or_else(|e| e.code, |_| "OK");
        self.history.record(
            crate::wallclock::now_secs(),
            console::Role::Coordinator,
            None,
            started.elapsed().as_micros() as u64,
            code,
        );
        result
    }

    /// Admin endpoints: an admin token (anybody with auth `none`).
    pub fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let caller = self.auth.caller(headers)?;
        self.auth.require_admin(&caller)
    }
}
