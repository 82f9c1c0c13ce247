//! The write path (SEMANTICS.md, "Write"): a new version from the causal context and this
//! coordinator's clock, fanned out to every write replica in parallel; the reply comes once
//! `required` authoritative replicas applied it, the other calls finish in the background.
//! Every replica that failed, timed out or that gossip reports down gets a hint. When the
//! required acks cannot be had, the answer is QUORUM_NOT_REACHED with the counts, after every
//! call ended (so the count is what really landed); writes that landed stay.

use tokio::time::Instant;

use crate::quorum::{self, Consistency, ReplicaCall, ReplicaOutcome, ReplicaResult};
use crate::ring::NodeId;
use crate::rpc::storage as pb;
use crate::vclock::{VectorClock, Version, next_version};

use crate::meta::Tenant;

use super::Coordinator;
use super::errors::CoordError;
use super::replicas::{self, ReplicaError};

/// What a write reached.
#[derive(Debug, Clone)]
pub struct Written {
    pub version: Version,
    /// Replicas that applied it by the time of the reply.
    pub acks: usize,
    /// The tenant's RF exceeds the number of nodes in the ring.
    pub rf_capped: bool,
}

impl Coordinator {
    /// A version that causally follows `context`, from this coordinator's durable clock.
    pub async fn new_version(&self, context: &VectorClock) -> Result<Version, CoordError> {
        let counter = self.clock.next(context.max_counter()).await?;
        Ok(next_version(
            context,
            &self.id,
            counter,
            self.options.max_clock_entries,
        ))
    }

    /// Writes `value` (or a tombstone for `None`) under `version` at `consistency`, to the
    /// tenant's replicas (the union of old and new ones while its RF is being raised).
    pub async fn replicate(
        &self,
        tenant: &Tenant,
        key: &[u8],
        value: Option<Vec<u8>>,
        version: Version,
        consistency: Consistency,
    ) -> Result<Written, CoordError> {
        let snapshot = self.ring.snapshot();
        let rf = self.pending_rf.write_rf(tenant);
        let plan = self
            .ring
            .plan(&snapshot, &tenant.tenant_id, key, rf as usize)?;
        let required = plan.required(consistency);
        let record = pb::Record {
            tenant_id: tenant.tenant_id.clone(),
            key: key.to_vec(),
            version: Some((&version).into()),
            payload: Some(match value {
                Some(v) => pb::record::Payload::Value(v),
                None => pb::record::Payload::Tombstone(pb::Tombstone {}),
            }),
            ring_hash: 0,
        };
        let mut calls = Vec::new();
        for node in plan.write_replicas() {
            if self.ring.is_down(node.as_str()) {
                self.hints.hint(node.as_str(), &record);
                continue;
            }
            calls.push(ReplicaCall {
                authoritative: plan.is_authoritative(&node),
                call: replicas::write(
                    &self.pool,
                    node.as_str(),
                    snapshot.address(node.as_str()),
                    record.clone(),
                ),
                replica: node,
            });
        }
        let deadline = Instant::now() + self.options.request_timeout;
        let run = quorum::run(calls, required, deadline).await;
        metrics::histogram!("pairdb_replica_acks", "op" => "write").record(run.acks as f64);
        self.hint_misses(&record, &run.results);
        if run.reached() {
            let acks = run.acks;
            let hints = self.hints.clone();
            let stragglers = run.stragglers;
            if !stragglers.is_empty() {
                tokio::spawn(async move {
                    for miss in missed(&stragglers.finish().await) {
                        hints.hint(miss.as_str(), &record);
                    }
                });
            }
            return Ok(Written {
                version,
                acks,
                rf_capped: plan.rf_capped(),
            });
        }
        let late = run.stragglers.finish().await;
        self.hint_misses(&record, &late);
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

    fn hint_misses(
        &self,
        record: &pb::Record,
        results: &[ReplicaResult<NodeId, (), ReplicaError>],
    ) {
        for miss in missed(results) {
            self.hints.hint(miss.as_str(), record);
        }
    }
}

/// Replicas that did not apply the write and could later (not those that refused it as invalid).
fn missed(results: &[ReplicaResult<NodeId, (), ReplicaError>]) -> Vec<NodeId> {
    results
        .iter()
        .filter(|r| match &r.outcome {
            ReplicaOutcome::Ok(()) => false,
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
