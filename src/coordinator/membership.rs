//! Membership as the storage nodes' gossip sees it. The coordinator follows one node's
//! `WatchHealth` stream (any registered node will do; on error, or when the stream stays silent
//! past three heartbeats, it moves to the next) and keeps the set of nodes reported down: reads
//! skip them, writes to them become hints.
//!
//! Health rides along: a node gossip reports `unhealthy` (its disk over the full mark, or its
//! commit log failed: it refuses every write) is not sent writes either (they become hints,
//! replayed once it is healthy again), and reads ask healthy replicas before degraded ones and
//! those before unhealthy ones ([`Membership::health_rank`]).
//!
//! A node counts as down only after gossip reported it up at least once and then not up. Gossip
//! reports freshly discovered peers as not up until its failure detector has heard enough
//! heartbeats, so trusting "not up" from the start would refuse writes for the first seconds of
//! every cluster. A node that was dead before this coordinator started is therefore not marked
//! down: calls to it fail fast (connection refused) and its writes become hints all the same.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::rpc::storage as pb;

use super::storage_pool::StoragePool;

#[derive(Default)]
pub struct Membership {
    members: RwLock<Vec<pb::MemberHealth>>,
    down: RwLock<HashSet<String>>,
    seen_up: RwLock<HashSet<String>>,
}

impl Membership {
    pub fn is_down(&self, node_id: &str) -> bool {
        self.down.read().contains(node_id)
    }

    /// The health gossip reports for a node that it sees up (`None`: not up, or no news).
    fn reported_health(&self, node_id: &str) -> Option<pb::HealthStatus> {
        self.members
            .read()
            .iter()
            .find(|m| m.node_id == node_id && m.up)
            .map(pb::MemberHealth::status)
    }

    /// Whether the node takes writes: not when gossip sees it up and reports it unhealthy (it
    /// would refuse them). Whether it is reachable is [`Self::is_down`]'s business; a node
    /// gossip knows nothing about gets the call (which fails and becomes a hint if need be).
    pub fn accepts_writes(&self, node_id: &str) -> bool {
        self.reported_health(node_id) != Some(pb::HealthStatus::Unhealthy)
    }

    /// 0 healthy (or no news), 1 degraded, 2 unhealthy: the order reads ask replicas in.
    pub fn health_rank(&self, node_id: &str) -> u8 {
        match self.reported_health(node_id) {
            Some(pb::HealthStatus::Unhealthy) => 2,
            Some(pb::HealthStatus::Degraded) => 1,
            _ => 0,
        }
    }

    /// Requests per second gossip reports for a node (0 when unknown).
    pub fn load(&self, node_id: &str) -> f64 {
        self.members
            .read()
            .iter()
            .find(|m| m.node_id == node_id)
            .map_or(0.0, |m| m.load)
    }

    pub fn members(&self) -> Vec<pb::MemberHealth> {
        self.members.read().clone()
    }

    fn update(&self, members: Vec<pb::MemberHealth>) {
        {
            let mut seen = self.seen_up.write();
            seen.extend(members.iter().filter(|m| m.up).map(|m| m.node_id.clone()));
        }
        let seen = self.seen_up.read();
        let down: HashSet<String> = members
            .iter()
            .filter(|m| !m.up && seen.contains(&m.node_id))
            .map(|m| m.node_id.clone())
            .collect();
        drop(seen);
        {
            let before = self.down.read();
            for id in down.difference(&before) {
                tracing::warn!(node = %id, "gossip reports storage node down");
            }
            for id in before.difference(&down) {
                tracing::info!(node = %id, "gossip reports storage node up");
            }
        }
        {
            let before = self.members.read();
            for m in &members {
                let was = before
                    .iter()
                    .find(|b| b.node_id == m.node_id)
                    .map(pb::MemberHealth::status);
                if was.is_some_and(|w| w != m.status()) {
                    tracing::warn!(node = %m.node_id, status = ?m.status(), disk_percent = m.disk_usage_percent, "gossip reports a storage node's health changed");
                }
            }
        }
        for status in [pb::HealthStatus::Degraded, pb::HealthStatus::Unhealthy] {
            let count = members
                .iter()
                .filter(|m| m.up && m.status() == status)
                .count();
            let name = if status == pb::HealthStatus::Degraded {
                "degraded"
            } else {
                "unhealthy"
            };
            metrics::gauge!("pairdb_storage_nodes_health", "status" => name).set(count as f64);
        }
        metrics::gauge!("pairdb_storage_nodes_down").set(down.len() as f64);
        metrics::gauge!("pairdb_storage_nodes_up")
            .set(members.iter().filter(|m| m.up).count() as f64);
        *self.down.write() = down;
        *self.members.write() = members;
    }

    /// Follows `WatchHealth` from the storage nodes `nodes()` lists (`(node_id, grpc address)`,
    /// asked again before each attempt so registry changes are picked up), trying them in
    /// turn, until the role stops.
    pub fn follow(
        self: &Arc<Self>,
        nodes: impl Fn() -> Vec<(String, String)> + Send + 'static,
        pool: Arc<StoragePool>,
        tasks: &crate::shutdown::Tasks,
    ) {
        let me = self.clone();
        let stop = tasks.stop().clone();
        tasks.spawn(async move {
            let mut next = 0usize;
            while !stop.is_cancelled() {
                let nodes = nodes();
                if nodes.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                let (id, address) = &nodes[next % nodes.len()];
                next += 1;
                let watched = async {
                    let mut client = pool.client(id, address)?;
                    let mut stream = client
                        .watch_health(pb::WatchHealthRequest {})
                        .await?
                        .into_inner();
                    // A stream that stays silent past three heartbeats was cut (a partition
                    // drops packets without a reset): move on rather than keep a frozen view.
                    let stale = 3 * crate::rpc::WATCH_HEALTH_HEARTBEAT;
                    loop {
                        let next = tokio::time::timeout(stale, stream.message())
                            .await
                            .map_err(|_| WatchEnded::Silent(stale))?;
                        match next? {
                            Some(update) => me.update(update.members),
                            None => break,
                        }
                    }
                    Ok::<(), WatchEnded>(())
                };
                tokio::select! {
                    result = watched => {
                        if let Err(e) = result {
                            tracing::debug!(node = %id, error = %e, "membership watch ended; trying the next node");
                        }
                    }
                    () = stop.cancelled() => return,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// Why a membership watch ended (before the watched node ended it itself).
#[derive(Debug, thiserror::Error)]
enum WatchEnded {
    #[error(transparent)]
    BadAddress(#[from] super::storage_pool::BadAddress),
    #[error("{}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("no membership update for {0:?}")]
    Silent(Duration),
}
