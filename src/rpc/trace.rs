//! Request ids across the roles (docs/gateway.md, "request ids").
//!
//! The gateway gives every request an id (the client's `X-Request-ID` when it is a valid one,
//! else a fresh one), answers with it in the `X-Request-ID` header and in every error body, and
//! runs the request inside [`REQUEST_ID`] and a `request` span carrying it. Every internal hop
//! carries it on: unary gRPC calls in the [`HEADER`] metadata entry (added by the client
//! interceptor of `rpc::auth` from [`current`]), calls multiplexed on a stream in their own
//! `request_id` field (one stream serves many requests). Each role's server runs the work of a
//! call inside the same task-local and span ([`RequestIdLayer`] for unary calls, [`scope`] for
//! stream calls), so its log lines for the request name the id.
//!
//! # Invariants
//! - An id is 1..=[`MAX_LEN`] characters of letters, digits, `-`, `_`, `.` or `:` ([`valid`]);
//!   anything else from a client or a peer is replaced or dropped, never logged as given.
//! - Work spawned off the request's task (hints, read repairs) does not inherit the id.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument;

/// The HTTP header and the gRPC metadata entry.
pub const HEADER: &str = "x-request-id";
/// Longest id accepted.
pub const MAX_LEN: usize = 128;

tokio::task_local! {
    /// The id of the request the current task works for.
    pub static REQUEST_ID: String;
}

/// Whether `id` may be used as a request id.
pub fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh id: 32 hex digits.
pub fn generate() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The id of the request the current task works for, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Runs `work` as part of request `id` (nothing when `id` is empty or not [`valid`]).
pub async fn scope<F: Future>(id: &str, work: F) -> F::Output {
    if valid(id) {
        let span = tracing::info_span!("request", request_id = %id);
        REQUEST_ID.scope(id.to_owned(), work.instrument(span)).await
    } else {
        work.await
    }
}

/// A tower layer for gRPC servers: each call whose metadata carries a valid request id runs
/// in its [`scope`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> tower_layer::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for RequestIdService<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| valid(id))
            .map(str::to_owned);
        let answer = self.inner.call(request);
        match id {
            Some(id) => Box::pin(async move { scope(&id, answer).await }),
            None => Box::pin(answer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_plain() {
        assert!(valid("abc-123_x.y:z"));
        assert!(valid(&generate()));
        assert!(!valid(""));
        assert!(!valid("a b"));
        assert!(!valid("line\nbreak"));
        assert!(!valid(&"x".repeat(MAX_LEN + 1)));
        assert!(valid(&"x".repeat(MAX_LEN)));
    }

    #[tokio::test]
    async fn the_id_is_current_inside_its_scope_only() {
        assert_eq!(current(), None);
        let inside = scope("req-1", async { current() }).await;
        assert_eq!(inside.as_deref(), Some("req-1"));
        assert_eq!(scope("bad id", async { current() }).await, None);
        assert_eq!(current(), None);
    }
}
