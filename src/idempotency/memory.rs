//! In-process idempotency store with the Redis implementation's semantics (lock with TTL,
//! response with TTL), for `pairdb dev` and tests.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Claim, IdemError, IdempotencyStore, StoredResponse, decode, encode};

#[derive(Default)]
struct Entry {
    response: Option<(Vec<u8>, Instant)>,
    lock_until: Option<Instant>,
}

#[derive(Default)]
pub struct MemoryIdempotencyStore {
    entries: Mutex<HashMap<String, Entry>>,
}

impl MemoryIdempotencyStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[tonic::async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn ping(&self) -> Result<(), IdemError> {
        Ok(())
    }

    async fn claim(&self, key: &str, lock_ttl: Duration) -> Result<Claim, IdemError> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        // Expired entries go first, as Redis would have dropped them.
        entries.retain(|_, e| {
            e.response.as_ref().is_some_and(|(_, until)| *until > now)
                || e.lock_until.is_some_and(|until| until > now)
        });
        let entry = entries.entry(key.to_owned()).or_default();
        if let Some((bytes, _)) = &entry.response {
            return decode(key, bytes).map(Claim::Done);
        }
        if entry.lock_until.is_some_and(|until| until > now) {
            return Ok(Claim::Busy);
        }
        entry.lock_until = Some(now + lock_ttl);
        Ok(Claim::Acquired)
    }

    async fn complete(
        &self,
        key: &str,
        stored: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), IdemError> {
        let mut entries = self.entries.lock();
        let entry = entries.entry(key.to_owned()).or_default();
        entry.response = Some((encode(stored), Instant::now() + ttl));
        entry.lock_until = None;
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), IdemError> {
        if let Some(entry) = self.entries.lock().get_mut(key) {
            entry.lock_until = None;
        }
        Ok(())
    }
}
