//! Gossip of node health among storage nodes, on chitchat (scuttlebutt anti-entropy with a
//! phi-accrual failure detector).
//!
//! Each node publishes `grpc` (its address), `status` (healthy/degraded/unhealthy), `disk`
//! (percent used) and `load` (requests per second). Heartbeats go out every 200 ms; a node that
//! stops answering crosses the phi threshold within a few seconds and is reported down by its
//! peers. Coordinators follow membership through a node's `WatchHealth` RPC.
//!
//! Every datagram is signed with the cluster secret (`gossip_transport`): gossip from outside
//! the cluster is dropped.
//!
//! Gossip runs on its own thread with its own one-thread runtime. A storage-only process
//! applies writes on its only runtime worker, which waits for each log sync; gossip sharing
//! that worker stopped sending heartbeats and reading peers' during a long sync, so under a
//! heavy load the node called its healthy peers down (the streaming benchmark's load made
//! one node report both others down at once, failing every quorum write), and they it.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};

use super::gossip_transport::SignedUdpTransport;
use crate::rpc::auth::ClusterSecret;
use crate::rpc::storage as pb;

const CLUSTER_ID: &str = "pairdb-storage";
const GOSSIP_INTERVAL: Duration = Duration::from_millis(200);

pub struct Gossip {
    handle: ChitchatHandle,
    /// Dropping it ends the gossip thread's runtime.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// The health a node publishes about itself.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub status: pb::HealthStatus,
    pub disk_percent: f64,
    pub load: f64,
}

fn status_name(s: pb::HealthStatus) -> &'static str {
    match s {
        pb::HealthStatus::Healthy => "healthy",
        pb::HealthStatus::Degraded => "degraded",
        pb::HealthStatus::Unhealthy | pb::HealthStatus::Unspecified => "unhealthy",
    }
}

/// The status a node gossips; `Unspecified` until its first publication has arrived (or for a
/// name this version does not know): coordinators treat that as "no news", not as unhealthy.
fn status_from(name: &str) -> pb::HealthStatus {
    match name {
        "healthy" => pb::HealthStatus::Healthy,
        "degraded" => pb::HealthStatus::Degraded,
        "unhealthy" => pb::HealthStatus::Unhealthy,
        _ => pb::HealthStatus::Unspecified,
    }
}

impl Gossip {
    /// Joins the gossip on `listen` with the given seeds (other nodes' gossip addresses).
    pub async fn start(
        node_id: &str,
        listen: SocketAddr,
        seeds: Vec<String>,
        grpc_address: &str,
        secret: ClusterSecret,
    ) -> anyhow::Result<Gossip> {
        // A new generation per start, so peers tell a restarted node from the old one.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id.to_owned(), generation, listen),
            cluster_id: CLUSTER_ID.to_owned(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: listen,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 100,
                max_interval: Duration::from_secs(2),
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let initial = vec![
            ("grpc".to_owned(), grpc_address.to_owned()),
            ("status".to_owned(), "healthy".to_owned()),
            ("disk".to_owned(), "0".to_owned()),
            ("load".to_owned(), "0".to_owned()),
        ];
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pairdb-gossip".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let transport = SignedUdpTransport { secret };
                    match chitchat::spawn_chitchat(config, initial, &transport).await {
                        Ok(handle) => {
                            if ready_tx.send(Ok(handle)).is_ok() {
                                // Drives the gossip tasks until told to stop (or dropped).
                                let _ = stopped.await;
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let handle = ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("the gossip thread ended before it started"))??;
        Ok(Gossip {
            handle,
            stop,
            thread,
        })
    }

    /// Publishes this node's health.
    pub async fn publish(&self, health: Health) {
        self.handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                me.set("status", status_name(health.status));
                me.set("disk", format!("{:.1}", health.disk_percent));
                me.set("load", format!("{:.1}", health.load));
            })
            .await;
    }

    /// Every node known through gossip (this one included), up or down, by node id.
    pub async fn members(&self) -> Vec<pb::MemberHealth> {
        self.handle
            .with_chitchat(|c| {
                let live: Vec<ChitchatId> = c.live_nodes().cloned().collect();
                let mut members: Vec<pb::MemberHealth> = c
                    .node_states()
                    .iter()
                    .map(|(id, state)| {
                        let up = live.contains(id);
                        let get = |k: &str| state.get(k).unwrap_or_default().to_owned();
                        pb::MemberHealth {
                            node_id: id.node_id.to_string(),
                            address: get("grpc"),
                            up,
                            status: if up {
                                status_from(&get("status")) as i32
                            } else {
                                pb::HealthStatus::Unhealthy as i32
                            },
                            disk_usage_percent: get("disk").parse().unwrap_or(0.0),
                            load: get("load").parse().unwrap_or(0.0),
                        }
                    })
                    .collect();
                // A restarted node appears under two generations: keep the up one.
                members.sort_by(|a, b| a.node_id.cmp(&b.node_id).then(b.up.cmp(&a.up)));
                members.dedup_by(|a, b| a.node_id == b.node_id);
                members
            })
            .await
    }

    /// Stops the gossip tasks, then its thread.
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(error = %e, "gossip shutdown");
        }
        let _ = self.stop.send(());
        let thread = self.thread;
        if !matches!(
            tokio::task::spawn_blocking(move || thread.join()).await,
            Ok(Ok(()))
        ) {
            tracing::warn!("the gossip thread did not stop cleanly");
        }
    }
}
