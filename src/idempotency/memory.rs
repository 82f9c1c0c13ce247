//! In-process idempotency store with the Redis implementation's semantics (lock with an owner
//! token and a TTL, response with a TTL), for `pairdb dev` and tests.
//!
//! Expiry is kept in an index ordered by deadline, so a claim drops only the entries that
//! expired (each once) and finds its own entry by hash: O(log n) per claim, never a scan of
//! every entry.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Claim, IdemError, IdempotencyStore, LockToken, StoredResponse, decode, encode};

#[derive(Default)]
struct Entry {
    response: Option<(Vec<u8>, Instant)>,
    lock: Option<(LockToken, Instant)>,
}

impl Entry {
    /// When the entry stops holding anything (`None`: it holds nothing now).
    fn deadline(&self, now: Instant) -> Option<Instant> {
        let response = self.response.as_ref().map(|(_, until)| *until);
        let lock = self.lock.as_ref().map(|(_, until)| *until);
        response.max(lock).filter(|until| *until > now)
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// (deadline, key) of every entry: expired entries are dropped from the front.
    expiry: BTreeSet<(Instant, String)>,
}

impl State {
    /// Drops every entry whose deadline passed (as Redis would have).
    fn expire(&mut self, now: Instant) {
        while let Some((deadline, key)) = self.expiry.first().cloned() {
            if deadline > now {
                break;
            }
            self.expiry.pop_first();
            if let Some(entry) = self.entries.get(&key) {
                match entry.deadline(now) {
                    None => {
                        self.entries.remove(&key);
                    }
                    // The entry got a later deadline since: keep it under that one.
                    Some(later) => {
                        self.expiry.insert((later, key));
                    }
                }
            }
        }
    }

    /// Updates `key`'s entry and its place in the expiry index.
    fn update(&mut self, key: &str, now: Instant, change: impl FnOnce(&mut Entry)) {
        let entry = self.entries.entry(key.to_owned()).or_default();
        let before = entry.deadline(now);
        change(entry);
        let after = entry.deadline(now);
        if before != after {
            if let Some(before) = before {
                self.expiry.remove(&(before, key.to_owned()));
            }
            match after {
                Some(after) => {
                    self.expiry.insert((after, key.to_owned()));
                }
                None => {
                    self.entries.remove(key);
                }
            }
        }
    }
}

#[derive(Default)]
pub struct MemoryIdempotencyStore {
    state: Mutex<State>,
}

impl MemoryIdempotencyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held (tests check that expired ones go).
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(slot: &Option<(impl Sized, Instant)>, now: Instant) -> bool {
    slot.as_ref().is_some_and(|(_, until)| *until > now)
}

#[tonic::async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn forget_namespace(&self, namespace: &str) -> Result<u64, IdemError> {
        let mut state = self.state.lock();
        let before = state.entries.len();
        state
            .entries
            .retain(|key, _| !super::in_namespace(key, namespace));
        Ok((before - state.entries.len()) as u64)
    }

    async fn ping(&self) -> Result<(), IdemError> {
        Ok(())
    }

    fn shared_id(&self) -> Option<String> {
        None
    }

    async fn claim(&self, key: &str, lock_ttl: Duration) -> Result<Claim, IdemError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.expire(now);
        if let Some(entry) = state.entries.get(key) {
            if let Some((bytes, until)) = &entry.response {
                if *until > now {
                    return decode(key, bytes).map(Claim::Done);
                }
            }
            if live(&entry.lock, now) {
                return Ok(Claim::Busy);
            }
        }
        let token = LockToken::new();
        let lock = (token.clone(), now + lock_ttl);
        state.update(key, now, |e| e.lock = Some(lock));
        Ok(Claim::Acquired(token))
    }

    async fn complete(
        &self,
        key: &str,
        lock: &LockToken,
        stored: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), IdemError> {
        let now = Instant::now();
        let response = (encode(stored), now + ttl);
        self.state.lock().update(key, now, |e| {
            e.response = Some(response);
            if e.lock.as_ref().is_some_and(|(owner, _)| owner == lock) {
                e.lock = None;
            }
        });
        Ok(())
    }

    async fn release(&self, key: &str, lock: &LockToken) -> Result<(), IdemError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.entries.contains_key(key) {
            state.update(key, now, |e| {
                if e.lock.as_ref().is_some_and(|(owner, _)| owner == lock) {
                    e.lock = None;
                }
            });
        }
        Ok(())
    }
}
