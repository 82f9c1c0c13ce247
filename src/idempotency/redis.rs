//! Redis idempotency store (fred): the response under the key (`SET ... PX 24h`), the lock
//! under `lock:<key>` (`SET NX PX 30s`).

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use super::{Claim, IdemError, IdempotencyStore, StoredResponse, decode, encode};

/// Longest wait for one Redis command.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

pub struct RedisIdempotencyStore {
    client: Client,
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
        Ok(RedisIdempotencyStore { client })
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
    async fn ping(&self) -> Result<(), IdemError> {
        self.client.ping::<()>(None).await.map_err(unavailable)
    }

    async fn claim(&self, key: &str, lock_ttl: Duration) -> Result<Claim, IdemError> {
        if let Some(done) = self.stored(key).await? {
            return Ok(Claim::Done(done));
        }
        let locked: Option<String> = self
            .client
            .set(
                lock_key(key),
                "1",
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
            self.release(key).await?;
            return Ok(Claim::Done(done));
        }
        Ok(Claim::Acquired)
    }

    async fn complete(
        &self,
        key: &str,
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
        self.release(key).await
    }

    async fn release(&self, key: &str) -> Result<(), IdemError> {
        self.client
            .del::<i64, _>(lock_key(key))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
