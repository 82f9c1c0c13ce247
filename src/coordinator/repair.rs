//! Read repair (SEMANTICS.md, "Read"): replicas that answered a read with an older version, or
//! with nothing, are sent the winner through the storage `Repair` RPC, off the request path.
//! The queue is bounded: when it is full the repair is not sent but counted, and a repair
//! that fails or cannot be queued leaves a repair marker on other nodes (`hints::mark_missed`)
//! that the targeted repair works off once the replica is up; a repair never delays or fails
//! a read.
//!
//! A repair carries the registry epoch of the ring its read was placed on (`ring_epoch`): a
//! replica whose cleanup fenced a later ring refuses it (`STALE_RING`) instead of taking the
//! record into a range it dropped, and the refusal leaves a marker like any failure (the
//! targeted repair works it off on the key's owners then).
//!
//! Stopping ([`RepairQueue::drain`], after the server stopped taking requests): the reads'
//! stragglers (replica answers still to come, which may queue repairs) finish first, then the
//! queue takes nothing more and every repair queued is sent, up to a deadline; what is left
//! then is counted (`pairdb_read_repairs_total{result="dropped_at_shutdown"}`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::rpc::detail::storage_code;
use crate::rpc::storage as pb;

use super::ring_view::RingView;
use super::storage_pool::StoragePool;

/// Repairs sent to storage nodes at once.
const CONCURRENCY: usize = 16;

/// A repair waiting to be sent: the replica, the winner, the epoch of the read's ring.
type Queued = (String, pb::Record, u64);

#[derive(Clone)]
pub struct RepairQueue {
    sender: mpsc::Sender<Queued>,
    /// The dispatcher and the repairs it sends.
    work: TaskTracker,
    /// Reads' work after their reply that may still queue repairs.
    stragglers: TaskTracker,
    /// Cancelled by [`RepairQueue::drain`]: the queue takes nothing more.
    closing: CancellationToken,
    /// Where a repair that could not be sent leaves its durable marker.
    ring: Arc<RingView>,
    pool: Arc<StoragePool>,
    timeout: Duration,
}

impl RepairQueue {
    /// Starts the workers; the queue holds at most `capacity` repairs.
    pub fn start(
        capacity: usize,
        ring: Arc<RingView>,
        pool: Arc<StoragePool>,
        timeout: Duration,
    ) -> Self {
        let (sender, mut receiver) = mpsc::channel::<Queued>(capacity.max(1));
        let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let work = TaskTracker::new();
        let closing = CancellationToken::new();
        let (spawner, closed) = (work.clone(), closing.clone());
        let (ring_kept, pool_kept) = (ring.clone(), pool.clone());
        work.spawn(async move {
            let mut closed_now = false;
            loop {
                let next = tokio::select! {
                    next = receiver.recv() => next,
                    () = closed.cancelled(), if !closed_now => {
                        // What is queued is still received, then `None`.
                        receiver.close();
                        closed_now = true;
                        continue;
                    }
                };
                let Some((node, record, ring_epoch)) = next else {
                    return;
                };
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let snapshot = ring.snapshot();
                let client = snapshot
                    .address(&node)
                    .ok_or(RepairFailed::NotInRegistry)
                    .and_then(|a| Ok(pool.client(&node, a)?));
                let (ring, pool) = (ring.clone(), pool.clone());
                let record_copy = record.clone();
                spawner.spawn(async move {
                    let result = match client {
                        Ok(mut client) => {
                            let call = client.repair(pb::RepairRequest {
                                record: Some(record),
                                ring_epoch,
                            });
                            match tokio::time::timeout(timeout, call).await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err(s)) => {
                                    if storage_code(&s) == pb::ErrorCode::StaleRing {
                                        ring.refused_as_stale(ring_epoch);
                                    }
                                    Err(RepairFailed::Refused(s))
                                }
                                Err(_) => Err(RepairFailed::TimedOut),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    let outcome = match result {
                        Ok(()) => "applied",
                        Err(e) => {
                            tracing::debug!(node, error = %e, "read repair failed; marking the key for the targeted repair");
                            super::hints::mark_missed(
                                &ring,
                                &pool,
                                timeout,
                                vec![(node, record_copy)],
                            )
                            .await;
                            "failed"
                        }
                    };
                    metrics::counter!("pairdb_read_repairs_total", "result" => outcome)
                        .increment(1);
                    drop(permit);
                });
            }
        });
        Self {
            sender,
            work,
            stragglers: TaskTracker::new(),
            closing,
            ring: ring_kept,
            pool: pool_kept,
            timeout,
        }
    }

    /// Runs a read's work after its reply (answers of replicas the reply did not wait for),
    /// which may still queue repairs; [`RepairQueue::drain`] waits for it.
    pub fn spawn_straggler<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.stragglers.spawn(work);
    }

    /// Sends every repair queued or still to come from running stragglers, waiting at most
    /// `timeout`; returns how many were not sent (counted as dropped). Call once the server
    /// stopped taking requests.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        self.stragglers.close();
        let _ = tokio::time::timeout_at(deadline, self.stragglers.wait()).await;
        self.closing.cancel();
        self.work.close();
        if tokio::time::timeout_at(deadline, self.work.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let queued = self.sender.max_capacity() - self.sender.capacity();
        // The dispatcher itself is one of the tasks.
        let left = queued + self.work.len().saturating_sub(1);
        tracing::warn!(
            left,
            "shutdown: read repairs not sent before the drain deadline"
        );
        metrics::counter!("pairdb_read_repairs_total", "result" => "dropped_at_shutdown")
            .increment(left as u64);
        left
    }

    /// Queues sending `winner` to `node`, found stale by a read placed on the ring of
    /// `ring_epoch`; when the queue is full the repair is not sent but leaves a repair marker
    /// (see `hints::mark_missed`) for the targeted repair.
    pub fn push(&self, node: String, winner: pb::Record, ring_epoch: u64) {
        let result = match self.sender.try_send((node, winner, ring_epoch)) {
            Ok(()) => "queued",
            Err(refused) => {
                let (node, winner, _) = refused.into_inner();
                let missed = (node, winner);
                let (ring, pool, timeout) = (self.ring.clone(), self.pool.clone(), self.timeout);
                self.stragglers.spawn(async move {
                    super::hints::mark_missed(&ring, &pool, timeout, vec![missed]).await;
                });
                "dropped"
            }
        };
        metrics::counter!("pairdb_read_repairs_total", "result" => result).increment(1);
    }
}

/// Why one read repair was not applied (logged and counted; the repair is not retried).
#[derive(Debug, thiserror::Error)]
enum RepairFailed {
    #[error("not in the registry")]
    NotInRegistry,
    #[error(transparent)]
    BadAddress(#[from] super::storage_pool::BadAddress),
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    #[error("timed out")]
    TimedOut,
}
