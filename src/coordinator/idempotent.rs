//! Idempotent writes (SEMANTICS.md, "Idempotency"). A write carrying an idempotency key claims
//! `idem:{tenant}:{key}:{idempotency key}`:
//! - `Acquired`: this request performs the write; only when it reached its required acks is the
//!   response stored (24 h) with the request's fingerprint; on failure the lock is released so
//!   a retry may try again.
//! - `Done`: the first response is replayed with `is_duplicate = true`, or, when the stored
//!   fingerprint differs (another value), IDEMPOTENCY_KEY_CONFLICT. Nothing is written.
//! - `Busy`: another request with the same key is running; wait for its result (poll) for at
//!   most the request timeout, then UNAVAILABLE: the client retries, and once the holder's lock
//!   expires (a holder that crashed) a retry takes over. Never longer: a request waiting out a
//!   crashed holder's 30 s lock wrote 30 s after its client had given up and moved on, rolling
//!   the key back over the client's later writes (found by the fault suite).
//!
//! When the idempotency store is down, writes keep being served without it (logged, counted),
//! and for [`BREAKER_OPEN`] after a failure the store is not asked at all, so an outage costs
//! one command timeout, not one per write. Such answers carry `idempotency_skipped`: the client
//! learns that a repeat of the request would be written again (the fault suite counted those
//! repeats as double applies until the answer said so).

use std::future::Future;
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;

use crate::idempotency::{Claim, LOCK_TTL, RESPONSE_TTL, StoredResponse, store_key};
use crate::rpc::coordinator::{DeleteKeyValueResponse, WriteKeyValueResponse};
use crate::vclock::VectorClock;

use super::Coordinator;
use super::conditional::Condition;
use super::errors::CoordError;

const POLL: Duration = Duration::from_millis(20);
/// How long writes skip the idempotency store after it failed.
pub const BREAKER_OPEN: Duration = Duration::from_secs(5);

/// Remembers a failed idempotency store for [`BREAKER_OPEN`].
#[derive(Default)]
pub struct Breaker {
    open_until: parking_lot::Mutex<Option<Instant>>,
}

impl Breaker {
    fn is_open(&self) -> bool {
        self.open_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }

    fn trip(&self) {
        *self.open_until.lock() = Some(Instant::now() + BREAKER_OPEN);
    }
}

/// A response an idempotent call stores and replays.
pub trait Replayable: Message + Default {
    /// Marks a replayed response as a duplicate.
    fn mark_duplicate(&mut self);
    /// Marks a response the idempotency store did not record (a repeat would write again).
    fn mark_skipped(&mut self);
}

impl Replayable for WriteKeyValueResponse {
    fn mark_duplicate(&mut self) {
        self.is_duplicate = true;
    }
    fn mark_skipped(&mut self) {
        self.idempotency_skipped = true;
    }
}

impl Replayable for DeleteKeyValueResponse {
    fn mark_duplicate(&mut self) {
        self.is_duplicate = true;
    }
    fn mark_skipped(&mut self) {
        self.idempotency_skipped = true;
    }
}

/// The answer of a write served without the idempotency store, marked so.
async fn skipped<R: Replayable>(
    write: impl Future<Output = Result<R, CoordError>>,
) -> Result<R, CoordError> {
    write.await.map(|mut r| {
        r.mark_skipped();
        r
    })
}

/// What an idempotent request does, for its fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A write; `ttl_seconds` 0: the value never expires.
    Put {
        ttl_seconds: u64,
    },
    Delete,
}

/// The fingerprint of a request: what must match for a retry to be "the same request". It
/// covers the operation (with its TTL), the key, the value, the causal context (absent and
/// empty differ) and the condition, not the consistency level. Every part is length-prefixed, so no two requests share an
/// encoding.
pub fn fingerprint(
    operation: Operation,
    key: &[u8],
    value: &[u8],
    context: Option<&VectorClock>,
    condition: &Condition,
) -> String {
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    hash.update(match operation {
        Operation::Put { .. } => b"P",
        Operation::Delete => b"D",
    });
    let mut part = |b: &[u8]| {
        hash.update(&(b.len() as u64).to_le_bytes());
        hash.update(b);
    };
    part(key);
    part(value);
    match context {
        None => part(b"-"),
        Some(clock) => {
            part(b"+");
            for (id, counter) in clock.iter() {
                part(id.as_bytes());
                part(&counter.to_le_bytes());
            }
        }
    }
    part(&condition.fingerprint_bytes());
    // Last and only when set: fingerprints of requests without a TTL stay what they were
    // before TTLs existed (keys recorded by an older coordinator still match).
    if let Operation::Put { ttl_seconds } = operation {
        if ttl_seconds != 0 {
            part(b"ttl");
            part(&ttl_seconds.to_le_bytes());
        }
    }
    format!("{:032x}", hash.digest128())
}

impl Coordinator {
    /// Runs `write` at most once per (tenant, key, idempotency key) within 24 h.
    pub async fn idempotent<R, F, Fut>(
        &self,
        tenant: &str,
        key: &[u8],
        idempotency_key: &str,
        fingerprint: String,
        write: F,
    ) -> Result<R, CoordError>
    where
        R: Replayable,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, CoordError>>,
    {
        if self.idempotency_breaker.is_open() {
            metrics::counter!("pairdb_idempotency_skipped_total").increment(1);
            return skipped(write()).await;
        }
        let store_key = store_key(tenant, key, idempotency_key);
        let give_up = Instant::now() + self.options.request_timeout;
        let lock = loop {
            match self.idempotency.claim(&store_key, LOCK_TTL).await {
                Ok(Claim::Acquired(lock)) => break lock,
                Ok(Claim::Done(stored)) => {
                    if stored.fingerprint != fingerprint {
                        return Err(CoordError::IdempotencyConflict(idempotency_key.to_owned()));
                    }
                    let mut response = R::decode(stored.response.as_slice()).map_err(|e| {
                        CoordError::Internal(format!("stored idempotent response: {e}"))
                    })?;
                    response.mark_duplicate();
                    metrics::counter!("pairdb_idempotent_replays_total").increment(1);
                    return Ok(response);
                }
                Ok(Claim::Busy) => {
                    if Instant::now() >= give_up {
                        return Err(CoordError::Unavailable(format!(
                            "idempotency key {idempotency_key:?} is held by a request that did not finish"
                        )));
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency store unavailable; writing without it");
                    metrics::counter!("pairdb_idempotency_store_errors_total").increment(1);
                    self.idempotency_breaker.trip();
                    return skipped(write()).await;
                }
            }
        };
        let mut result = write().await;
        let outcome = match &result {
            Ok(response) => {
                let stored = StoredResponse {
                    fingerprint,
                    response: response.encode_to_vec(),
                };
                self.idempotency
                    .complete(&store_key, &lock, &stored, RESPONSE_TTL)
                    .await
            }
            Err(_) => self.idempotency.release(&store_key, &lock).await,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "idempotency store unavailable after the write");
            metrics::counter!("pairdb_idempotency_store_errors_total").increment(1);
            self.idempotency_breaker.trip();
            if let Ok(response) = result.as_mut() {
                response.mark_skipped();
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUT: Operation = Operation::Put { ttl_seconds: 0 };

    #[test]
    fn the_fingerprint_covers_the_whole_request() {
        let ctx = VectorClock::from_entries([("c1", 5)]);
        let base = fingerprint(PUT, b"k", b"1", None, &Condition::Always);
        assert_eq!(base, fingerprint(PUT, b"k", b"1", None, &Condition::Always));
        for other in [
            fingerprint(Operation::Delete, b"k", b"1", None, &Condition::Always),
            fingerprint(PUT, b"k2", b"1", None, &Condition::Always),
            fingerprint(PUT, b"k", b"2", None, &Condition::Always),
            fingerprint(PUT, b"k", b"1", Some(&ctx), &Condition::Always),
            fingerprint(
                PUT,
                b"k",
                b"1",
                Some(&VectorClock::new()),
                &Condition::Always,
            ),
            fingerprint(PUT, b"k", b"1", None, &Condition::IfAbsent),
            fingerprint(
                Operation::Put { ttl_seconds: 60 },
                b"k",
                b"1",
                None,
                &Condition::Always,
            ),
            // Length prefixes: moving a byte from the key to the value is another request.
            fingerprint(PUT, b"k1", b"", None, &Condition::Always),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(
            fingerprint(PUT, b"k", b"1", Some(&ctx), &Condition::Always),
            fingerprint(
                PUT,
                b"k",
                b"1",
                Some(&VectorClock::from_entries([("c1", 6)])),
                &Condition::Always,
            )
        );
    }
}
