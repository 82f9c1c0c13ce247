//! The read path (SEMANTICS.md, "Read"). The read replicas are the natural owners plus
//! bootstrapping pending owners, minus nodes gossip reports down.
//!
//! - ONE and QUORUM ask the `required` least-loaded authoritative replicas first and, only if
//!   those cannot answer within 100 ms, every read replica (Cassandra's speculative retry). A `read_repair_chance` share of QUORUM reads (10% by
//!   default, spread evenly) asks every read replica at once, so read repair also reaches the
//!   replicas a quorum did not need.
//! - ALL (and QUORUM when `required` is every authoritative replica) asks every read replica.
//!
//! The winner is the highest version by [`Version::precedence`] among the answers (a tombstone
//! is a version like any other; the caller maps a tombstone winner to KEY_NOT_FOUND). After the
//! reply, once every asked replica answered, replicas holding an older version or nothing are
//! sent the overall winner through the repair queue.

use std::cmp::Ordering;

use tokio::time::Instant;

use crate::meta::Tenant;
use crate::quorum::{self, Consistency, ReplicaCall, ReplicaResult};
use crate::ring::NodeId;
use crate::rpc::coordinator::ReadDetail;
use crate::rpc::storage as pb;

use super::Coordinator;
use super::clock::Source;
use super::errors::CoordError;
use super::repair::RepairQueue;
use super::replicas::{self, OnRing, ReplicaError, refused_as_stale, stale_twice};
use super::write::{failures, placed_epoch};

type ReadResult = ReplicaResult<NodeId, Option<pb::Record>, ReplicaError>;

/// When the first replicas asked have not answered by then, ask every read replica
/// (Cassandra's speculative retry): a hung replica costs a read this much, not a failure.
const SPECULATE_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

impl Coordinator {
    /// The winning stored record of a key (tombstones included), or `None` if no replica that
    /// answered holds one.
    pub async fn read_winner(
        &self,
        tenant: &Tenant,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<pb::Record>, CoordError> {
        Ok(self.read_winner_detailed(tenant, key, consistency).await?.0)
    }

    /// [`Self::read_winner`], with what the replicas said as of the reply. A replica that
    /// answers that the tenant's incarnation was deleted makes it TENANT_NOT_FOUND (or
    /// UNAVAILABLE when the id was created again): this coordinator's cache was stale.
    /// A replica that refuses the read as placed on a stale ring (`STALE_RING`) makes this
    /// coordinator read the registry again and read once more on the ring it reads (like
    /// writes: [`Self::write`]).
    pub async fn read_winner_detailed(
        &self,
        tenant: &Tenant,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<(Option<pb::Record>, ReadDetail), CoordError> {
        let mut tenant = std::borrow::Cow::Borrowed(tenant);
        for attempt in 0..2 {
            match self.read_on_ring(&tenant, key, consistency).await? {
                OnRing::Served(answer) => return Ok(answer),
                OnRing::Stale if attempt == 0 => {
                    tenant = std::borrow::Cow::Owned(self.tenant_again(&tenant, "read").await?);
                }
                OnRing::Stale => {}
            }
        }
        Err(stale_twice("read"))
    }

    /// One read on the ring [`super::ring_view::RingView::fresh`] gives.
    async fn read_on_ring(
        &self,
        tenant: &Tenant,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<OnRing<(Option<pb::Record>, ReadDetail)>, CoordError> {
        let namespace = tenant.storage_id();
        let rf = tenant.replication_factor;
        let snapshot = self.ring.fresh(self.options.ring_max_age()).await;
        let plan = self.ring.plan(&snapshot, &namespace, key, rf as usize)?;
        let required = plan.required(consistency);
        let mut replicas: Vec<(NodeId, bool)> = plan
            .read_replicas()
            .into_iter()
            .map(|id| {
                let authoritative = plan.is_authoritative(&id);
                (id, authoritative)
            })
            .collect();
        let deadline = Instant::now() + self.options.request_timeout;
        let epoch = placed_epoch(&snapshot, tenant);
        let shared_key = bytes::Bytes::copy_from_slice(key);
        let call = |(id, authoritative): (NodeId, bool)| ReplicaCall {
            call: replicas::read(
                &self.pool,
                &self.confirmations,
                id.as_str(),
                snapshot.address(id.as_str()),
                (namespace.clone(), shared_key.clone()),
                epoch,
            ),
            replica: id,
            authoritative,
        };

        let authoritative = replicas.iter().filter(|(_, a)| *a).count();
        let ask_all = consistency != Consistency::One
            && (required >= authoritative || self.sample_read_repair());
        let run = if !ask_all && replicas.len() > required {
            // First the `required` best replicas; if they cannot make it within
            // SPECULATE_AFTER (one is dead, hung or slow), everyone at once until the request
            // deadline: the retry may read a replica twice, which is cheaper than counting the
            // first round's late answers and always correct.
            self.order_by_load(&mut replicas);
            let first: Vec<_> = replicas[..required].to_vec();
            let speculate_at = (Instant::now() + SPECULATE_AFTER).min(deadline);
            let run = quorum::run(
                first.into_iter().map(call).collect(),
                required,
                speculate_at,
            )
            .await;
            if run.reached() {
                run
            } else {
                quorum::run(replicas.into_iter().map(call).collect(), required, deadline).await
            }
        } else {
            quorum::run(replicas.into_iter().map(call).collect(), required, deadline).await
        };
        let (acks, results, stragglers) = (run.acks, run.results, run.stragglers);
        let asked = results.len() + stragglers.len();
        metrics::histogram!("pairdb_replica_acks", "op" => "read").record(acks as f64);

        if refused_as_deleted(&results) {
            return Err(self.stale_tenant(tenant, "read").await);
        }
        if refused_as_stale(&results) {
            // Whatever the others answered was read on a ring some replica knows is old. The
            // calls still out are dropped with their answers.
            self.ring.refused_as_stale(snapshot.epoch);
            return Ok(OnRing::Stale);
        }
        if acks < required || required == 0 {
            let mut all = results;
            all.extend(stragglers.finish().await);
            if refused_as_deleted(&all) {
                return Err(self.stale_tenant(tenant, "read").await);
            }
            if refused_as_stale(&all) {
                self.ring.refused_as_stale(snapshot.epoch);
                return Ok(OnRing::Stale);
            }
            let received = all
                .iter()
                .filter(|r| r.authoritative && r.outcome.is_ok())
                .count();
            return Err(CoordError::QuorumNotReached {
                required,
                received,
                detail: failures(&all.iter().collect::<Vec<_>>()),
            });
        }
        let winner = winner_of(&results);
        if let Some(version) = winner.as_ref().and_then(|w| w.version.as_ref()) {
            // The HLC receive rule: the next write of this coordinator is minted above it.
            let highest = version.clock.iter().map(|e| e.counter).max().unwrap_or(0);
            self.clock.observe(highest, Source::Replica);
        }
        let mut detail = ReadDetail {
            asked: asked as u32,
            answered: results.iter().filter(|r| r.outcome.is_ok()).count() as u32,
            agreed: agreeing(&results, winner.as_ref()) as u32,
            repaired: 0,
        };
        if stragglers.is_empty() {
            detail.repaired = repair_stale(&self.repairs, &results, winner.as_ref(), epoch) as u32;
        } else {
            let repairs = self.repairs.clone();
            self.repairs.spawn_straggler(async move {
                let mut all = results;
                all.extend(stragglers.finish().await);
                repair_stale(&repairs, &all, winner_of(&all).as_ref(), epoch);
            });
        }
        Ok(OnRing::Served((winner, detail)))
    }

    /// Whether this QUORUM read asks every read replica (`read_repair_chance` of reads, spread
    /// evenly by a counter), so read repair also reaches replicas the quorum did not need.
    fn sample_read_repair(&self) -> bool {
        let chance = self.options.read_repair_chance;
        if chance >= 1.0 {
            return true;
        }
        if chance <= 0.0 {
            return false;
        }
        let n = self
            .reads_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
        (n * chance).floor() != ((n + 1.0) * chance).floor()
    }

    /// Authoritative before the others, then healthy before degraded before unhealthy (gossip's
    /// health), then least-loaded first (gossip's requests per second).
    fn order_by_load(&self, replicas: &mut [(NodeId, bool)]) {
        let membership = self.ring.membership();
        replicas.sort_by(|(a, a_auth), (b, b_auth)| {
            b_auth
                .cmp(a_auth)
                .then_with(|| {
                    membership
                        .health_rank(a.as_str())
                        .cmp(&membership.health_rank(b.as_str()))
                })
                .then_with(|| {
                    membership
                        .load(a.as_str())
                        .total_cmp(&membership.load(b.as_str()))
                })
        });
    }
}

/// Whether a replica answered that the key's tenant incarnation was deleted.
fn refused_as_deleted(answers: &[ReadResult]) -> bool {
    answers
        .iter()
        .any(|r| matches!(&r.outcome, quorum::ReplicaOutcome::Err(e) if e.tenant_deleted))
}

/// Answers that hold the winning version itself.
fn agreeing(answers: &[ReadResult], winner: Option<&pb::Record>) -> usize {
    let winning = winner.map(pb::Record::version);
    answers
        .iter()
        .filter(|r| match (&r.outcome, &winning) {
            (quorum::ReplicaOutcome::Ok(Some(held)), Some(w)) => {
                held.version().precedence(w) == Ordering::Equal
            }
            (quorum::ReplicaOutcome::Ok(None), None) => true,
            _ => false,
        })
        .count()
}

/// Queues `winner` for every replica that answered with an older version or nothing, the
/// answers of a read placed on the ring of `epoch`; returns how many.
fn repair_stale(
    repairs: &RepairQueue,
    answers: &[ReadResult],
    winner: Option<&pb::Record>,
    epoch: u64,
) -> usize {
    let Some(winner) = winner else {
        return 0;
    };
    let mut queued = 0;
    let winning = winner.version();
    for result in answers {
        let quorum::ReplicaOutcome::Ok(held) = &result.outcome else {
            continue;
        };
        let stale = match held {
            None => true,
            Some(r) => r.version().precedence(&winning) == Ordering::Less,
        };
        if stale {
            repairs.push(result.replica.as_str().to_owned(), winner.clone(), epoch);
            queued += 1;
        }
    }
    queued
}

/// The highest record among the successful answers.
fn winner_of(results: &[ReadResult]) -> Option<pb::Record> {
    results
        .iter()
        .filter_map(|r| match &r.outcome {
            quorum::ReplicaOutcome::Ok(Some(record)) => Some(record),
            _ => None,
        })
        .max_by(|a, b| a.version().precedence(&b.version()))
        .cloned()
}
