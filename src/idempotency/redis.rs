//! Redis idempotency store (fred): the response under the key (`SET ... PX 24h`), the lock
//! under `lock:<key>` (`SET NX PX 30s` with the owner's token as value), released by a Lua
//! compare-and-delete so only its owner drops it.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use super::{Claim, IdemError, IdempotencyStore, LockToken, StoredResponse, decode, encode};

/// Deletes `KEYS[1]` only while it holds `ARGV[1]` (the lock owner's token).
const COMPARE_AND_DELETE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) else return 0 end";

/// Longest wait for one Redis command.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

pub struct RedisIdempotencyStore {
    client: Client,
    /// xxh3 of the server's address and database (no credentials).
    shared_id: String,
}

fn unavailable(e: fred::error::Error) -> IdemError {
    IdemError::Unavailable(e.to_string())
}

fn lock_key(key: &str) -> String {
    format!("lock:{key}")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl RedisIdempotencyStore {
    /// Connects to `redis://...` (fails if Redis does not answer).
    pub async fn connect(url: &str) -> Result<RedisIdempotencyStore, IdemError> {
        let config = Config::from_url(url).map_err(unavailable)?;
        // Every command gives up after COMMAND_TIMEOUT, so a dead Redis costs writes a second at
        // most (they go on without idempotency) instead of hanging while fred reconnects.
        let client = Builder::from_config(config)
            .with_connection_config(|c| c.connection_timeout = Duration::from_secs(2))
            .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
            .build()
            .map_err(unavailable)?;
        client.init().await.map_err(unavailable)?;
        let server = url.rsplit('@').next().unwrap_or(url);
        let server = server
            .trim_start_matches("redis://")
            .trim_start_matches("rediss://");
        let shared_id = format!(
            "redis-{:016x}",
            xxhash_rust::xxh3::xxh3_64(server.as_bytes())
        );
        Ok(RedisIdempotencyStore { client, shared_id })
    }
}

impl RedisIdempotencyStore {
    /// The response stored under `key`, if any.
    async fn stored(&self, key: &str) -> Result<Option<StoredResponse>, IdemError> {
        let bytes: Option<Vec<u8>> = self.client.get(key).await.map_err(unavailable)?;
        bytes.map(|b| decode(key, &b)).transpose()
    }
}

#[tonic::async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn forget_namespace(&self, namespace: &str) -> Result<u64, IdemError> {
        use fred::types::scan::Scanner;
        use futures::TryStreamExt;
        // SCAN with the namespace's prefix (glob characters escaped), then the exact test:
        // a later incarnation's keys share the prefix.
        let prefix = format!("idem:{namespace}:");
        let mut pattern = String::with_capacity(prefix.len() + 1);
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let mut doomed: Vec<String> = Vec::new();
        let mut pages = self.client.scan(pattern, Some(1000), None);
        while let Some(mut page) = pages.try_next().await.map_err(unavailable)? {
            for key in page.take_results().unwrap_or_default() {
                if let Some(k) = key.as_str().filter(|k| super::in_namespace(k, namespace)) {
                    doomed.push(k.to_owned());
                }
            }
            page.next();
        }
        for chunk in doomed.chunks(500) {
            self.client
                .del::<i64, _>(chunk.to_vec())
                .await
                .map_err(unavailable)?;
        }
        Ok(doomed.len() as u64)
    }

    async fn ping(&self) -> Result<(), IdemError> {
        self.client.ping::<()>(None).await.map_err(unavailable)
    }

    fn shared_id(&self) -> Option<String> {
        Some(self.shared_id.clone())
    }

    async fn claim(&self, key: &str, lock_ttl: Duration) -> Result<Claim, IdemError> {
        if let Some(done) = self.stored(key).await? {
            return Ok(Claim::Done(done));
        }
        let token = LockToken::new();
        let locked: Option<String> = self
            .client
            .set(
                lock_key(key),
                token.0.as_str(),
                Some(Expiration::PX(millis(lock_ttl))),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(unavailable)?;
        if locked.is_none() {
            return Ok(Claim::Busy);
        }
        // The first request may have completed between our GET and SET: replay it.
        if let Some(done) = self.stored(key).await? {
            self.release(key, &token).await?;
            return Ok(Claim::Done(done));
        }
        Ok(Claim::Acquired(token))
    }

    async fn complete(
        &self,
        key: &str,
        lock: &LockToken,
        stored: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), IdemError> {
        self.client
            .set::<(), _, _>(
                key,
                encode(stored),
                Some(Expiration::PX(millis(ttl))),
                None,
                false,
            )
            .await
            .map_err(unavailable)?;
        self.release(key, lock).await
    }

    async fn release(&self, key: &str, lock: &LockToken) -> Result<(), IdemError> {
        self.client
            .eval::<i64, _, _, _>(
                COMPARE_AND_DELETE,
                vec![lock_key(key)],
                vec![lock.0.clone()],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
