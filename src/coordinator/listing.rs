//! Listing a tenant's keys in key order (API.md, `GET /v1/key-value?prefix=&limit=&cursor=`).
//!
//! A tenant's keys are spread over every node by hash, so a page is a merge: every storage node
//! that is not reported down is asked for its next records with the prefix after the cursor
//! (`ListKeys`, tombstones included, at most `limit` records or about 4 MiB each), the answers
//! are merged by key (the highest version of each key wins, as in a read), tombstones dropped,
//! and the page is cut at the smallest "last key" among the nodes that said they hold more:
//! up to there, every node has said everything it holds, so nothing is missed in between.
//! Rounds repeat (at most [`MAX_ROUNDS`]) until the page is full or every node is exhausted.
//!
//! Consistency: the page is served only if, for the tenant's RF, few enough active nodes
//! failed to answer that every key still has `required(level)` answering natural owners (so a
//! QUORUM listing sees every write acknowledged at QUORUM before it began, as a QUORUM read
//! does); otherwise QUORUM_NOT_REACHED. Listing does not read-repair.
//!
//! Cursors are opaque: the namespace (tenant incarnation), the prefix and the last key listed,
//! tagged with an HMAC under the cluster secret. A cursor of another tenant, incarnation or
//! prefix, or one altered in any bit, is 400. A cursor is a position in key order, not a
//! snapshot: it stays valid across topology changes (keys written behind it are not listed).
//!
//! Memory per request is bounded by the nodes' page sizes (nodes × min(limit records, 4 MiB)),
//! whatever the tenant's size.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;

use crate::quorum::Consistency;
use crate::ring::NodeState;
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::errors::CoordError;
use super::expiry::{expires_at_text, live_value};

/// Keys per page, at most (API.md).
pub const MAX_LIMIT: u32 = 1000;
/// Merge rounds per page, at most: a prefix full of tombstones may end a page short (with a
/// cursor) rather than hold the request.
const MAX_ROUNDS: usize = 8;
/// What cursor tags are for (see `ClusterSecret::tag`).
const CURSOR_DOMAIN: &[u8] = b"pairdb-list-cursor\0";
const CURSOR_VERSION: u8 = 1;
/// Bytes of the HMAC a cursor carries.
const CURSOR_TAG_LEN: usize = 16;

impl Coordinator {
    /// One page of the tenant's live keys with `prefix`, after `cursor`.
    pub async fn list_keys(
        &self,
        req: &pb::ListKeysRequest,
        level: Consistency,
    ) -> Result<pb::ListKeysResponse, CoordError> {
        super::admin::check_tenant_id(&req.tenant_id)?;
        if req.limit == 0 || req.limit > MAX_LIMIT {
            return Err(CoordError::InvalidRequest(format!(
                "limit must be 1..={MAX_LIMIT}"
            )));
        }
        if req.prefix.len() > crate::limits::MAX_KEY_BYTES || req.prefix.contains(&0) {
            return Err(CoordError::InvalidRequest(
                "prefix must be at most 1024 bytes without NUL".to_owned(),
            ));
        }
        let tenant = self.tenant(&req.tenant_id).await?;
        let namespace = tenant.storage_id();
        let mut after = match req.cursor.as_str() {
            "" => Bytes::new(),
            text => self.open_cursor(&namespace, &req.prefix, text)?,
        };
        let limit = req.limit as usize;
        let mut keys = Vec::with_capacity(limit.min(128));
        let now = crate::wallclock::now_ms();
        for _ in 0..MAX_ROUNDS {
            let round = self
                .list_round(&namespace, tenant.replication_factor, req, &after, level)
                .await?;
            for (key, record) in round.merged {
                if round.bound.as_ref().is_some_and(|b| key > *b) {
                    break;
                }
                after = key.clone();
                if let Some(listed) = live(key, record, req.values, now) {
                    keys.push(listed);
                    if keys.len() == limit {
                        let cursor = self.seal_cursor(&namespace, &req.prefix, &after);
                        return Ok(pb::ListKeysResponse { keys, cursor });
                    }
                }
            }
            match round.bound {
                // Every node said everything it holds: the last page.
                None => {
                    return Ok(pb::ListKeysResponse {
                        keys,
                        cursor: String::new(),
                    });
                }
                Some(bound) => after = bound,
            }
        }
        metrics::counter!("pairdb_list_pages_cut_total").increment(1);
        let cursor = self.seal_cursor(&namespace, &req.prefix, &after);
        Ok(pb::ListKeysResponse { keys, cursor })
    }

    /// Asks every node that is not down for its next page after `after`, checks that enough
    /// answered, and merges the answers.
    async fn list_round(
        &self,
        namespace: &str,
        rf: u32,
        req: &pb::ListKeysRequest,
        after: &Bytes,
        level: Consistency,
    ) -> Result<Round, CoordError> {
        let snapshot = self.ring.snapshot();
        let asked: Vec<_> = snapshot
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Failed && !self.ring.is_down(&n.node_id))
            .cloned()
            .collect();
        let request = spb::ListKeysRequest {
            tenant_id: namespace.to_owned(),
            prefix: req.prefix.clone(),
            start_after: after.clone(),
            limit: req.limit,
            keys_only: !req.values,
        };
        let answers = self
            .each_node(&asked, self.options.request_timeout, |mut client| {
                let request = request.clone();
                async move { client.list_keys(request).await }
            })
            .await;
        let active: Vec<&str> = snapshot
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| n.node_id.as_str())
            .collect();
        let answered: Vec<&str> = answers
            .iter()
            .filter(|(_, a)| a.is_ok())
            .map(|(n, _)| n.node_id.as_str())
            .collect();
        let missing = active.iter().filter(|n| !answered.contains(n)).count();
        let rf = (rf as usize).min(active.len());
        let required = level.required(rf);
        if rf == 0 || missing > rf - required {
            let detail = answers
                .iter()
                .filter_map(|(n, a)| {
                    a.as_ref()
                        .err()
                        .map(|e| format!("{}: {}", n.node_id, e.message()))
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(CoordError::QuorumNotReached {
                required,
                received: rf.saturating_sub(missing),
                detail: format!(
                    "listing needs {required} of {rf} replicas of every key; {missing} active \
                     node(s) did not answer ({detail})"
                ),
            });
        }
        let mut merged: BTreeMap<Bytes, spb::Record> = BTreeMap::new();
        let mut bound: Option<Bytes> = None;
        for (_, answer) in answers {
            let Ok(page) = answer else { continue };
            if page.more {
                if let Some(last) = page.records.last() {
                    if bound.as_ref().is_none_or(|b| last.key < *b) {
                        bound = Some(last.key.clone());
                    }
                }
            }
            for record in page.records {
                if record.key <= *after || !record.key.starts_with(&req.prefix) {
                    continue; // not what was asked: a node's answer is not trusted blindly
                }
                match merged.get(&record.key) {
                    Some(held)
                        if held.version().precedence(&record.version()) != Ordering::Less => {}
                    _ => {
                        merged.insert(record.key.clone(), record);
                    }
                }
            }
        }
        Ok(Round { merged, bound })
    }

    /// The cursor after `last` for this namespace and prefix.
    fn seal_cursor(&self, namespace: &str, prefix: &[u8], last: &[u8]) -> String {
        let payload = cursor_payload(namespace, prefix, last);
        let tag = self.pool.secret().tag(CURSOR_DOMAIN, &payload);
        let mut bytes = payload;
        bytes.extend_from_slice(&tag[..CURSOR_TAG_LEN]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The last key of a cursor this cluster issued for this namespace and prefix.
    fn open_cursor(&self, namespace: &str, prefix: &[u8], text: &str) -> Result<Bytes, CoordError> {
        let bad = || {
            CoordError::InvalidRequest(
                "cursor was not issued for this tenant and prefix (or was altered)".to_owned(),
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad())?;
        if bytes.len() <= CURSOR_TAG_LEN {
            return Err(bad());
        }
        let (payload, tag) = bytes.split_at(bytes.len() - CURSOR_TAG_LEN);
        if !self.pool.secret().tag_matches(CURSOR_DOMAIN, payload, tag) {
            return Err(bad());
        }
        let head = cursor_payload(namespace, prefix, b"");
        match payload.strip_prefix(head.as_slice()) {
            Some(last) if !last.is_empty() => Ok(Bytes::copy_from_slice(last)),
            _ => Err(bad()),
        }
    }
}

/// One round's answers merged by key, and where the page must end (`None`: every node said
/// everything it holds).
struct Round {
    merged: BTreeMap<Bytes, spb::Record>,
    bound: Option<Bytes>,
}

/// A merged record as a listed key, if it is live at `now_ms` (not a tombstone, not expired).
fn live(key: Bytes, record: spb::Record, values: bool, now_ms: u64) -> Option<pb::ListedKey> {
    let value = live_value(&record, now_ms)?;
    Some(pb::ListedKey {
        key,
        value: if values { value.clone() } else { Bytes::new() },
        expires_at: expires_at_text(record.expires_at_ms),
        version: record.version,
    })
}

/// What a cursor's tag covers: a version byte, the namespace and the prefix (each with its
/// length), then the last key.
fn cursor_payload(namespace: &str, prefix: &[u8], last: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 + namespace.len() + prefix.len() + last.len());
    out.push(CURSOR_VERSION);
    out.extend_from_slice(&(namespace.len() as u16).to_be_bytes());
    out.extend_from_slice(namespace.as_bytes());
    out.extend_from_slice(&(prefix.len() as u16).to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(last);
    out
}
