//! Listing a tenant's keys in key order (API.md, `GET /v1/key-value?prefix=&limit=&cursor=`).
//!
//! A tenant's keys are spread over every node by hash, so a page is a merge: enough storage
//! nodes (see [`first_wave`]) are asked for their next records with the prefix after the cursor
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
//! Placement: each round's calls carry the registry epoch of the ring (and tenant) it was
//! planned on. A node whose cleanup fenced a newer ring refuses it (`STALE_RING`): the nodes
//! this ring asks may no longer hold what a newer ring gave to nodes it does not know. The
//! round then runs once more on the registry and tenant read again; refused twice, the page is
//! UNAVAILABLE.
//!
//! Memory per request is bounded by the nodes' page sizes (nodes × min(limit records, 4 MiB)),
//! whatever the tenant's size.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;

use crate::meta::NodeRecord;
use crate::quorum::Consistency;
use crate::ring::NodeState;
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use crate::meta::Tenant;
use crate::rpc::detail::storage_code;

use super::Coordinator;
use super::errors::CoordError;
use super::expiry::{expires_at_text, live_value};
use super::replicas::{OnRing, stale_twice};
use super::write::placed_epoch;

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
        let mut tenant = self.tenant(&req.tenant_id).await?;
        let namespace = tenant.storage_id();
        let mut after = match req.cursor.as_str() {
            "" => Bytes::new(),
            text => self.open_cursor(&namespace, &req.prefix, text)?,
        };
        let limit = req.limit as usize;
        let mut keys = Vec::with_capacity(limit.min(128));
        let now = crate::wallclock::now_ms();
        for _ in 0..MAX_ROUNDS {
            let round = match self.list_round(&tenant, req, &after, level).await? {
                OnRing::Served(round) => round,
                // A node fenced a newer ring: read the registry and the tenant again, once.
                OnRing::Stale => {
                    tenant = self.tenant_again(&tenant, "list").await?;
                    match self.list_round(&tenant, req, &after, level).await? {
                        OnRing::Served(round) => round,
                        OnRing::Stale => return Err(stale_twice("listing")),
                    }
                }
            };
            if round.tenant_deleted {
                return Err(self.stale_tenant(&tenant, "list").await);
            }
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

    /// Asks enough nodes for their next page after `after` (see [`first_wave`]; the others too
    /// if one of those fails), checks that enough answered, and merges the answers. `Stale`
    /// when a node refused the listing as placed on a stale ring (the ring view was told).
    async fn list_round(
        &self,
        tenant: &Tenant,
        req: &pb::ListKeysRequest,
        after: &Bytes,
        level: Consistency,
    ) -> Result<OnRing<Round>, CoordError> {
        let namespace = tenant.storage_id();
        let rf = tenant.replication_factor;
        let snapshot = self.ring.fresh(self.options.ring_max_age()).await;
        let epoch = placed_epoch(&snapshot, tenant);
        let reachable: Vec<_> = snapshot
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Failed && !self.ring.is_down(&n.node_id))
            .cloned()
            .collect();
        let active: Vec<&str> = snapshot
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| n.node_id.as_str())
            .collect();
        let rf = (rf as usize).min(active.len());
        let required = level.required(rf);
        let request = spb::ListKeysRequest {
            tenant_id: namespace.clone(),
            prefix: req.prefix.clone(),
            start_after: after.clone(),
            limit: req.limit,
            keys_only: !req.values,
            ring_epoch: epoch,
        };
        let ask = |nodes: Vec<NodeRecord>| {
            let request = request.clone();
            async move {
                self.each_node(&nodes, self.options.request_timeout, |mut client| {
                    let request = request.clone();
                    async move { client.list_keys(request).await }
                })
                .await
            }
        };
        let (first, rest) = first_wave(reachable, active.len(), rf - required, after);
        let mut answers = ask(first).await;
        let missing_of =
            |answers: &[(NodeRecord, Result<spb::ListKeysResponse, tonic::Status>)]| {
                active
                    .iter()
                    .filter(|n| {
                        !answers
                            .iter()
                            .any(|(a, r)| a.node_id.as_str() == **n && r.is_ok())
                    })
                    .count()
            };
        if missing_of(&answers) > rf - required && !rest.is_empty() {
            metrics::counter!("pairdb_list_second_waves_total").increment(1);
            answers.extend(ask(rest).await);
        }
        let stale = answers.iter().any(|(_, answer)| {
            answer
                .as_ref()
                .is_err_and(|status| storage_code(status) == spb::ErrorCode::StaleRing)
        });
        if stale {
            self.ring.refused_as_stale(epoch);
            return Ok(OnRing::Stale);
        }
        let missing = missing_of(&answers);
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
        let mut tenant_deleted = false;
        for (_, answer) in answers {
            let Ok(page) = answer else { continue };
            tenant_deleted |= page.tenant_deleted;
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
        Ok(OnRing::Served(Round {
            merged,
            bound,
            tenant_deleted,
        }))
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

/// Which reachable nodes a round asks first, and which only if one of those fails.
///
/// Every key has `rf` replicas among the `active` nodes, so if at most `spare` (= rf −
/// required) active nodes are left out, every key still has `required` replicas among those
/// asked: asking `active − spare` active nodes is enough (one node of three at `one` with RF 3,
/// two at `quorum`, all at `all`), and the others are asked only when one of them fails. Nodes
/// joining or leaving (not active) are always asked: they may hold writes a change is moving.
/// Which active nodes come first varies with the position (`after`), so pages spread over them.
fn first_wave(
    reachable: Vec<NodeRecord>,
    active: usize,
    spare: usize,
    after: &[u8],
) -> (Vec<NodeRecord>, Vec<NodeRecord>) {
    let wanted = active.saturating_sub(spare);
    let (mut actives, others): (Vec<_>, Vec<_>) = reachable
        .into_iter()
        .partition(|n| n.state == NodeState::Active);
    actives.sort_by_key(|n| {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(after);
        h.update(n.node_id.as_bytes());
        h.digest()
    });
    let rest = actives.split_off(wanted.min(actives.len()));
    actives.extend(others);
    (actives, rest)
}

/// One round's answers merged by key, and where the page must end (`None`: every node said
/// everything it holds).
struct Round {
    merged: BTreeMap<Bytes, spb::Record>,
    bound: Option<Bytes>,
    /// A node answered that the namespace is a deleted tenant's.
    tenant_deleted: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            node_id: id.to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 1,
            virtual_nodes: 16,
            tokens: None,
            state,
        }
    }

    fn ids(nodes: &[NodeRecord]) -> Vec<&str> {
        nodes.iter().map(|n| n.node_id.as_str()).collect()
    }

    #[test]
    fn the_first_wave_leaves_out_at_most_the_spare_replicas() {
        let three: Vec<_> = ["s1", "s2", "s3"]
            .iter()
            .map(|id| node(id, NodeState::Active))
            .collect();
        // RF 3 of 3 nodes: one | quorum | all.
        for (spare, first) in [(2, 1), (1, 2), (0, 3)] {
            let (a, b) = first_wave(three.clone(), 3, spare, b"k");
            assert_eq!((a.len(), b.len()), (first, 3 - first), "spare {spare}");
        }
        // RF 3 of 5 nodes at one: three asked, so every key has an owner among them.
        let five: Vec<_> = (1..=5)
            .map(|i| node(&format!("s{i}"), NodeState::Active))
            .collect();
        let (a, b) = first_wave(five, 5, 2, b"k");
        assert_eq!((a.len(), b.len()), (3, 2));
        // A joining or leaving node is always asked.
        let mut changing = three.clone();
        changing.push(node("s4", NodeState::Bootstrapping));
        let (a, _) = first_wave(changing, 3, 2, b"k");
        assert!(ids(&a).contains(&"s4"), "{:?}", ids(&a));
        assert_eq!(a.len(), 2);
        // Pages spread over the nodes.
        let firsts: std::collections::BTreeSet<String> = (0..64u32)
            .map(|i| {
                first_wave(three.clone(), 3, 2, &i.to_le_bytes()).0[0]
                    .node_id
                    .clone()
            })
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }
}
