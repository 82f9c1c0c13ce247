//! The write path (SEMANTICS.md, "Write"): a new version from the causal context and this
//! coordinator's clock, fanned out to every write replica in parallel; the reply comes once
//! `required` authoritative replicas applied it, the other calls finish in the background.
//! Every replica that failed, timed out or that gossip reports down gets a hint; so does one
//! whose call is still out [`SLOW_REPLICA_HINT_AFTER`] after the reply (without waiting for
//! the deadline, which a coordinator may not live to see). When the
//! required acks cannot be had, the answer is QUORUM_NOT_REACHED with the counts, after every
//! call ended (so the count is what really landed); writes that landed stay.
//!
//! Replicas that ignore a write answer with the version they hold; the clock observes it (HLC
//! receive rule), the response carries the winner, and a blind write beaten by a concurrent
//! version with a later timestamp is minted again above it ([`MAX_REMINTS`] times at most).

use std::cmp::Ordering;

use tokio::time::Instant;

use bytes::Bytes;

use crate::quorum::{self, Consistency, ReplicaCall, ReplicaOutcome, ReplicaResult};
use crate::ring::NodeId;
use crate::rpc::coordinator as pb_coord;
use crate::rpc::storage as pb;
use crate::vclock::{VectorClock, Version, next_version};

use crate::meta::Tenant;

use super::Coordinator;
use super::batcher::RingTag;
use super::clock::Source;
use super::errors::CoordError;
use super::expiry::Payload;
use super::replicas::{self, OnRing, ReplicaError, WriteAck, refused_as_stale, stale_twice};

type WriteResult = ReplicaResult<NodeId, WriteAck, ReplicaError>;

/// How many times a blind write that a concurrent version with a later timestamp beat is
/// minted again above it and resent.
pub const MAX_REMINTS: usize = 3;

/// How long after a write was answered a replica call still out gets its hint (a straggler's
/// hint would otherwise wait for the call to fail, at the request deadline).
const SLOW_REPLICA_HINT_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// What a write reached.
#[derive(Debug, Clone)]
pub struct Written {
    /// The version the replicas hold: the write's own, or the concurrent version that beat it
    /// on the replicas that answered (last-write-wins).
    pub version: Version,
    /// Replicas that applied it by the time of the reply.
    pub acks: usize,
    /// The tenant's RF exceeds the number of nodes in the ring.
    pub rf_capped: bool,
    /// The replicas that answered kept a concurrent version that beats the write (`version`
    /// is that one): the write did not become the key's value.
    pub superseded: bool,
    /// When the written value expires (ms since the Unix epoch); 0: never, a tombstone, or
    /// superseded (the winner's expiry is not known here).
    pub expires_at_ms: u64,
    /// What the replicas did, as of the reply.
    pub detail: pb_coord::WriteDetail,
}

/// One round of a write: what it reached, and the version that beat it, if one did.
struct Round {
    written: Written,
    beaten_by: Option<Version>,
}

impl Coordinator {
    /// A version that causally follows `context`, from this coordinator's durable clock. Only
    /// the context's counters within `max_clock_skew` move the clock; the version still
    /// dominates the whole context.
    pub async fn new_version(&self, context: &VectorClock) -> Result<Version, CoordError> {
        let observed = self.clock.trusted_max(context, Source::Context);
        let counter = self.clock.next(observed).await?;
        Ok(next_version(
            context,
            &self.id,
            counter,
            self.options.max_clock_entries,
        ))
    }

    /// Writes `payload` (a value, or a tombstone) at `consistency` under a new version that
    /// follows `context`. A blind write (`context` is `None`) that the replicas ignored because
    /// they hold a concurrent version with a later timestamp (this coordinator's clock is
    /// behind the one that wrote it) is minted again above that version and resent, at most
    /// [`MAX_REMINTS`] times: of two blind writes, the one the cluster accepted later wins.
    pub async fn write(
        &self,
        tenant: &Tenant,
        key: &Bytes,
        payload: Payload<'_>,
        context: Option<&VectorClock>,
        consistency: Consistency,
    ) -> Result<Written, CoordError> {
        let blind = context.is_none();
        let context = context.cloned().unwrap_or_default();
        let mut version = self.new_version(&context).await?;
        let mut remints = 0;
        loop {
            let round = self
                .replicate(tenant, key, payload, version, consistency)
                .await?;
            match round.beaten_by {
                Some(winner)
                    if blind
                        && remints < MAX_REMINTS
                        && self
                            .clock
                            .trusts(winner.clock.max_counter(), Source::Replica) =>
                {
                    remints += 1;
                    metrics::counter!("pairdb_writes_reminted_total").increment(1);
                    // `replicate` observed the winner, so the new counter lies above it.
                    version = self.new_version(&context).await?;
                }
                _ => return Ok(round.written),
            }
        }
    }

    /// Writes `payload` under `version` at `consistency` (see [`Self::replicate_on_ring`]). A
    /// replica that refuses the write as placed on a stale ring or replication factor
    /// (`STALE_RING`: it was fenced by a cleanup at a later registry epoch) makes this
    /// coordinator read the registry and the tenant again and write the same version once
    /// more with what it reads; replicas that applied it already ignore it then. Refused
    /// twice, the write is UNAVAILABLE (it may have landed).
    async fn replicate(
        &self,
        tenant: &Tenant,
        key: &Bytes,
        payload: Payload<'_>,
        version: Version,
        consistency: Consistency,
    ) -> Result<Round, CoordError> {
        let mut tenant = std::borrow::Cow::Borrowed(tenant);
        for attempt in 0..2 {
            let placed = self
                .replicate_on_ring(&tenant, key, payload, version.clone(), consistency)
                .await?;
            match placed {
                OnRing::Served(round) => return Ok(round),
                OnRing::Stale if attempt == 0 => {
                    tenant = std::borrow::Cow::Owned(self.tenant_again(&tenant, "write").await?);
                }
                OnRing::Stale => {}
            }
        }
        Err(stale_twice("write"))
    }

    /// The tenant read again from the metadata store after a replica refused a call placed
    /// with it (`STALE_RING`); the error [`Self::stale_tenant`] gives when its incarnation
    /// is gone.
    pub(super) async fn tenant_again(
        &self,
        tenant: &Tenant,
        op: &'static str,
    ) -> Result<Tenant, CoordError> {
        self.tenants.invalidate(&tenant.tenant_id);
        match self.tenants.get(&tenant.tenant_id).await? {
            Some(now) if now.incarnation == tenant.incarnation => Ok(now),
            _ => Err(self.stale_tenant(tenant, op).await),
        }
    }

    /// Writes `payload` under `version` at `consistency`, to the tenant's
    /// replicas (the union of old and new ones while its RF is being raised) on the ring as
    /// [`super::ring_view::RingView::fresh`] gives it. Acks count only
    /// from the replicas reads use, the old RF's, until the raise completes: an ack from a new
    /// replica that no read asks yet must not stand in for an old one.
    async fn replicate_on_ring(
        &self,
        tenant: &Tenant,
        key: &Bytes,
        payload: Payload<'_>,
        version: Version,
        consistency: Consistency,
    ) -> Result<OnRing<Round>, CoordError> {
        let snapshot = self.ring.fresh(self.options.ring_max_age()).await;
        // Records and placement live in the incarnation's namespace.
        let namespace = tenant.storage_id();
        let rf = self.pending_rf.write_rf(tenant);
        let plan = self.ring.plan(&snapshot, &namespace, key, rf as usize)?;
        // Only while a raise is in progress is there a second plan to count against; every
        // other write counts against its own plan without copying it.
        let raising = (rf != tenant.replication_factor)
            .then(|| {
                let old_rf = tenant.replication_factor as usize;
                self.ring.plan(&snapshot, &namespace, key, old_rf)
            })
            .transpose()?;
        let counted = raising.as_ref().unwrap_or(&plan);
        let required = counted.required(consistency);
        // The expiry follows the version: a reminted write expires from its new timestamp.
        let (payload, expires_at_ms) = payload.to_record_parts(&version);
        let record = pb::Record {
            tenant_id: namespace.clone(),
            key: key.clone(),
            version: Some((&version).into()),
            payload: Some(payload),
            ring_hash: 0,
            expires_at_ms,
        };
        let mut calls = Vec::new();
        let replicas = plan.write_replicas();
        // Every write replica of this ring is written (or hinted) below, so range streams
        // planned on it need not forward the record; without hints a missed pending owner
        // would have nothing else, so then the streams forward as before.
        let ring = RingTag {
            digest: if self.hints.keeps_hints() {
                snapshot.ring_digest
            } else {
                0
            },
            epoch: placed_epoch(&snapshot, tenant),
        };
        let mut hinted_up_front = 0;
        for node in replicas.iter().cloned() {
            // Down, or refusing writes (disk full, commit log failed): a hint, replayed once it
            // takes writes again.
            if !self.ring.accepts_writes(node.as_str()) {
                hinted_up_front += 1;
                if !self.ring.is_down(node.as_str()) {
                    metrics::counter!("pairdb_writes_to_unhealthy_hinted_total").increment(1);
                }
                self.hints.hint(node.as_str(), &record, &replicas);
                continue;
            }
            calls.push(ReplicaCall {
                authoritative: counted.is_authoritative(&node),
                call: replicas::write(
                    &self.pool,
                    &self.confirmations,
                    node.as_str(),
                    snapshot.address(node.as_str()),
                    (record.clone(), ring),
                ),
                replica: node,
            });
        }
        let deadline = Instant::now() + self.options.request_timeout;
        let run = quorum::run(calls, required, deadline).await;
        metrics::histogram!("pairdb_replica_acks", "op" => "write").record(run.acks as f64);
        self.hint_misses(&record, &run.results, &replicas);
        if refused_as_deleted(&run.results) {
            return Err(self.stale_tenant(tenant, "write").await);
        }
        let stale = refused_as_stale(&run.results);
        if stale {
            self.ring.refused_as_stale(snapshot.epoch);
        }
        if run.reached() {
            let detail = pb_coord::WriteDetail {
                asked: replicas.len() as u32,
                acked: run.results.iter().filter(|r| r.outcome.is_ok()).count() as u32,
                hinted: (hinted_up_front + missed(&run.results).len()) as u32,
                pending: run.stragglers.len() as u32,
            };
            let beaten_by = self.winner_over(&version, &run.results);
            let acks = run.acks;
            let hints = self.hints.clone();
            let stragglers = run.stragglers;
            if !stragglers.is_empty() {
                let (ring, epoch) = (self.ring.clone(), snapshot.epoch);
                self.hints.spawn_straggler(async move {
                    // A call still out a while after the ack gets its hint then, not only when
                    // it fails at the deadline: a coordinator that dies in between (a replica
                    // cut off by a partition answers nothing) would otherwise leave that
                    // replica without the write and without a hint. One that succeeds after
                    // all makes its hint a no-op at replay.
                    let (late, hinted) = stragglers
                        .finish_noting_slow(SLOW_REPLICA_HINT_AFTER, |slow| {
                            metrics::counter!("pairdb_hints_for_slow_replicas_total")
                                .increment(slow.len() as u64);
                            for node in slow {
                                hints.hint(node.as_str(), &record, &replicas);
                            }
                        })
                        .await;
                    for miss in missed(&late) {
                        if !hinted.contains(&miss) {
                            hints.hint(miss.as_str(), &record, &replicas);
                        }
                    }
                    if refused_as_stale(&late) {
                        // The next request reads the registry first.
                        ring.refused_as_stale(epoch);
                    }
                });
            }
            if stale {
                // Acked on a ring some replica knows is old: placed again.
                return Ok(OnRing::Stale);
            }
            return Ok(OnRing::Served(Round {
                written: Written {
                    version: beaten_by.clone().unwrap_or(version),
                    acks,
                    rf_capped: plan.rf_capped(),
                    superseded: beaten_by.is_some(),
                    expires_at_ms: if beaten_by.is_some() {
                        0
                    } else {
                        expires_at_ms
                    },
                    detail,
                },
                beaten_by,
            }));
        }
        let late = run.stragglers.finish().await;
        self.hint_misses(&record, &late, &replicas);
        if refused_as_deleted(&late) {
            return Err(self.stale_tenant(tenant, "write").await);
        }
        if stale || refused_as_stale(&late) {
            self.ring.refused_as_stale(snapshot.epoch);
            return Ok(OnRing::Stale);
        }
        let results: Vec<_> = run.results.iter().chain(late.iter()).collect();
        let received = results
            .iter()
            .filter(|r| r.authoritative && r.outcome.is_ok())
            .count();
        Err(CoordError::QuorumNotReached {
            required,
            received,
            detail: failures(&results),
        })
    }

    /// The version that replicas kept instead of `written` (the highest among those that
    /// ignored the write), if any. Every such version moves the clock (the HLC receive rule).
    fn winner_over(&self, written: &Version, results: &[WriteResult]) -> Option<Version> {
        let mut winner: Option<&Version> = None;
        for result in results {
            if let ReplicaOutcome::Ok(WriteAck::Ignored { stored }) = &result.outcome {
                self.clock
                    .observe(stored.clock.max_counter(), Source::Replica);
                if stored.precedence(written) == Ordering::Greater
                    && winner.is_none_or(|w| stored.precedence(w) == Ordering::Greater)
                {
                    winner = Some(stored);
                }
            }
        }
        winner.cloned()
    }

    /// A replica refused the request (`op`: "write" or "read") because the tenant's
    /// incarnation was deleted: this coordinator's cache is stale (it missed the refreshes
    /// that would have said so). Nothing was acknowledged or served. The entry goes and the
    /// store says what is true now: TENANT_NOT_FOUND when the id is gone, UNAVAILABLE (retry)
    /// when it was created again, since a retry goes to the new incarnation.
    pub(super) async fn stale_tenant(&self, tenant: &Tenant, op: &'static str) -> CoordError {
        metrics::counter!("pairdb_requests_to_deleted_tenants_total", "op" => op).increment(1);
        tracing::warn!(
            tenant = %tenant.tenant_id,
            incarnation = tenant.incarnation,
            op,
            "a replica refused a request of a deleted incarnation; cached tenant dropped"
        );
        self.tenants.invalidate(&tenant.tenant_id);
        match self.tenants.get(&tenant.tenant_id).await {
            Ok(None) => CoordError::TenantNotFound(tenant.tenant_id.clone()),
            Ok(Some(now)) => CoordError::Unavailable(format!(
                "tenant {:?} was deleted and created again (incarnation {}) while this \
                 coordinator still served incarnation {}; the {op} was not served, retry",
                tenant.tenant_id, now.incarnation, tenant.incarnation
            )),
            Err(e) => e.into(),
        }
    }

    fn hint_misses(&self, record: &pb::Record, results: &[WriteResult], replicas: &[NodeId]) {
        for miss in missed(results) {
            self.hints.hint(miss.as_str(), record, replicas);
        }
    }
}

/// The registry epoch a call placed on `snapshot` with `tenant`'s replication factor carries:
/// the older of the two (storage nodes' ring fence compares it).
pub(crate) fn placed_epoch(snapshot: &super::ring_view::Snapshot, tenant: &Tenant) -> u64 {
    snapshot.epoch.min(tenant.registry_epoch)
}

/// Whether a replica refused the write because its tenant was deleted.
fn refused_as_deleted(results: &[WriteResult]) -> bool {
    results
        .iter()
        .any(|r| matches!(&r.outcome, ReplicaOutcome::Err(e) if e.tenant_deleted))
}

/// Replicas that did not apply the write and could later (not those that refused it as
/// invalid). One that refused it as placed on a stale ring is among them: its hint is placed
/// anew when it is replayed (delivered to it only if it still owns the key, else to the key's
/// owners then, and fenced like every write; `hints`), so it cannot land in a dropped range.
/// Without it a replica that refused only after the write was acknowledged (a straggler) would
/// miss the write with neither a hint nor a marker.
fn missed(results: &[WriteResult]) -> Vec<NodeId> {
    results
        .iter()
        .filter(|r| match &r.outcome {
            ReplicaOutcome::Ok(_) => false,
            ReplicaOutcome::Err(e) => !e.rejected,
            ReplicaOutcome::TimedOut => true,
        })
        .map(|r| r.replica.clone())
        .collect()
}

/// One line naming each replica that failed and why.
pub fn failures<T>(results: &[&ReplicaResult<NodeId, T, ReplicaError>]) -> String {
    let parts: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.outcome {
            ReplicaOutcome::Ok(_) => None,
            ReplicaOutcome::Err(e) => Some(e.to_string()),
            ReplicaOutcome::TimedOut => Some(format!("{}: timed out", r.replica.as_str())),
        })
        .collect();
    if parts.is_empty() {
        "too few replicas reachable".to_owned()
    } else {
        parts.join("; ")
    }
}
