//! The gateway: the public HTTP/JSON API of API.md. It authenticates, resolves the tenant,
//! applies per-tenant rate limits, checks input, and forwards to coordinators over gRPC; it
//! keeps no data.
//!
//! Modules: [`auth`] (JWT / none), [`rate_limit`] (governor per tenant), [`coordinators`]
//! (client with round-robin and failover), [`errors`] (the error body and code mapping),
//! [`body`] (JSON body reading with the size limit), [`kv`], [`tenants`], [`admin`] (the
//! routes), [`router`] (routes, health, metrics, access log).
//!
//! Invariants: a request that fails validation, auth or the rate limit never reaches a
//! coordinator; every key-value response (errors included, once the tenant is known) carries
//! the `X-RateLimit-*` headers; values are stored as the exact JSON text the client sent.

pub mod admin;
pub mod auth;
pub mod body;
pub mod coordinators;
pub mod errors;
pub mod kv;
pub mod rate_limit;
pub mod router;
pub mod tenants;

use std::time::{SystemTime, UNIX_EPOCH};

use auth::Auth;
use coordinators::Coordinators;
use rate_limit::RateLimits;

/// Shared state of the HTTP handlers.
pub struct Gateway {
    pub auth: Auth,
    pub limits: RateLimits,
    pub coordinators: Coordinators,
    pub max_body_bytes: usize,
}

/// Current time as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
