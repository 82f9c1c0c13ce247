//! The idempotency store (SEMANTICS.md, "Idempotency"): per `idem:{tenant}:{key}:{idempotency
//! key}`, a lock taken by the first request (SET NX PX, 30 s) and, once its write reached its
//! required acks, the fingerprint of the request and its response (TTL 24 h). Two
//! implementations with the same semantics and one test suite (`tests/idempotency_store.rs`):
//! Redis through fred ([`RedisIdempotencyStore`]) and in-process ([`MemoryIdempotencyStore`]).
//!
//! Invariant: a lock is released only by its owner. Each claim that acquires the lock gets a
//! fresh [`LockToken`] stored as the lock's value; `complete` and `release` drop the lock only
//! while it still holds that token (compare-and-delete), so a request that outlived its lock
//! never releases the lock of the request that took over.

mod memory;
mod redis;

use std::time::Duration;

pub use memory::MemoryIdempotencyStore;
pub use redis::RedisIdempotencyStore;

/// How long a request holds the lock before others may take over.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a stored response is replayed.
pub const RESPONSE_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdemError {
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    #[error("idempotency store holds a malformed entry for {0}")]
    Corrupt(String),
}

/// The first response stored under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// Fingerprint of the request that produced it (a different one is a conflict).
    pub fingerprint: String,
    pub response: Vec<u8>,
}

/// Proof of holding an idempotency key's lock: the value stored in the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(pub String);

impl LockToken {
    fn new() -> Self {
        LockToken(uuid::Uuid::new_v4().to_string())
    }
}

/// What a request finds when it claims its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request holds the lock: perform the write, then `complete` (or `release`) with the
    /// token.
    Acquired(LockToken),
    /// A first request finished: replay its response (or report a conflict).
    Done(StoredResponse),
    /// Another request holds the lock: wait and claim again.
    Busy,
}

/// The store key of an idempotency key.
pub fn store_key(tenant: &str, key: &[u8], idempotency_key: &str) -> String {
    format!("idem:{tenant}:{}:{idempotency_key}", hex(key))
}

/// Whether `store_key` is one of namespace `namespace`'s: `idem:{namespace}:{hex}:...` with a
/// non-empty, even-length hex key right after it. (A later incarnation's keys,
/// `idem:{namespace}:{N}:{hex}:...`, carry the odd-length `N` there instead: namespaces are
/// told apart though one is a prefix of the other.)
pub fn in_namespace(store_key: &str, namespace: &str) -> bool {
    let Some(rest) = store_key
        .strip_prefix("idem:")
        .and_then(|r| r.strip_prefix(namespace))
        .and_then(|r| r.strip_prefix(':'))
    else {
        return false;
    };
    let hex_key = rest.split(':').next().unwrap_or("");
    !hex_key.is_empty()
        && hex_key.len() % 2 == 0
        && hex_key
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
pub trait IdempotencyStore: Send + Sync {
    async fn ping(&self) -> Result<(), IdemError>;
    /// An id of the store that every coordinator using the same store computes alike, `None`
    /// for a store only this process sees (the in-process one).
    fn shared_id(&self) -> Option<String>;
    async fn claim(&self, key: &str, lock_ttl: Duration) -> Result<Claim, IdemError>;
    /// Stores the response and drops the lock if `lock` still holds it.
    async fn complete(
        &self,
        key: &str,
        lock: &LockToken,
        stored: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), IdemError>;
    /// Drops the lock without a response (the write failed; a retry may try again), only if
    /// `lock` still holds it.
    async fn release(&self, key: &str, lock: &LockToken) -> Result<(), IdemError>;
    /// Deletes every response stored for tenant namespace `namespace` (a deleted tenant's);
    /// returns how many. Locks expire on their own.
    async fn forget_namespace(&self, namespace: &str) -> Result<u64, IdemError>;
}

/// `fp_len:u32 fp response` — one value per key in both implementations.
fn encode(stored: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + stored.fingerprint.len() + stored.response.len());
    out.extend_from_slice(&(stored.fingerprint.len() as u32).to_le_bytes());
    out.extend_from_slice(stored.fingerprint.as_bytes());
    out.extend_from_slice(&stored.response);
    out
}

fn decode(key: &str, bytes: &[u8]) -> Result<StoredResponse, IdemError> {
    let corrupt = || IdemError::Corrupt(key.to_owned());
    let len_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let fp = bytes.get(4..4 + len).ok_or_else(corrupt)?;
    Ok(StoredResponse {
        fingerprint: String::from_utf8(fp.to_vec()).map_err(|_| corrupt())?,
        response: bytes.get(4 + len..).ok_or_else(corrupt)?.to_vec(),
    })
}
