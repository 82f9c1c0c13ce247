//! Read repair (SEMANTICS.md, "Read"): replicas that answered a read with an older version, or
//! with nothing, are sent the winner through the storage `Repair` RPC, off the request path.
//! The queue is bounded: when it is full the repair is dropped and counted (the next read or
//! anti-entropy catches it); a repair never delays or fails a read.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::rpc::storage as pb;

use super::ring_view::RingView;
use super::storage_pool::StoragePool;

/// Repairs sent to storage nodes at once.
const CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct RepairQueue {
    sender: mpsc::Sender<(String, pb::Record)>,
}

impl RepairQueue {
    /// Starts the workers; the queue holds at most `capacity` repairs.
    pub fn start(
        capacity: usize,
        ring: Arc<RingView>,
        pool: Arc<StoragePool>,
        timeout: Duration,
    ) -> Self {
        let (sender, mut receiver) = mpsc::channel::<(String, pb::Record)>(capacity.max(1));
        let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        tokio::spawn(async move {
            while let Some((node, record)) = receiver.recv().await {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let snapshot = ring.snapshot();
                let client = snapshot
                    .address(&node)
                    .ok_or_else(|| "not in the registry".to_owned())
                    .and_then(|a| pool.client(&node, a).map_err(|e| e.to_string()));
                tokio::spawn(async move {
                    let result = match client {
                        Ok(mut client) => {
                            let call = client.repair(pb::RepairRequest {
                                record: Some(record),
                            });
                            match tokio::time::timeout(timeout, call).await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err(s)) => Err(s.message().to_owned()),
                                Err(_) => Err("timed out".to_owned()),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    let outcome = match result {
                        Ok(()) => "applied",
                        Err(e) => {
                            tracing::debug!(node, error = %e, "read repair failed");
                            "failed"
                        }
                    };
                    metrics::counter!("pairdb_read_repairs_total", "result" => outcome)
                        .increment(1);
                    drop(permit);
                });
            }
        });
        Self { sender }
    }

    /// Queues sending `winner` to `node`; drops it when the queue is full.
    pub fn push(&self, node: String, winner: pb::Record) {
        let result = match self.sender.try_send((node, winner)) {
            Ok(()) => "queued",
            Err(_) => "dropped",
        };
        metrics::counter!("pairdb_read_repairs_total", "result" => result).increment(1);
    }
}
