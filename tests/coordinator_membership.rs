//! The coordinator's view of storage membership, from real storage nodes' gossip: a killed node
//! is reported down, a restarted one up, and the watch fails over when its node dies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{StorageNode, free_udp_port};
use pairdb::coordinator::membership::Membership;
use pairdb::coordinator::storage_pool::StoragePool;
use pairdb::rpc::storage as pb;
use tokio_util::sync::CancellationToken;

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two gossiping storage nodes `m0`, `m1` and a membership following them (the watch starts
/// on `m0`), once both are up.
struct TwoNodes {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<StorageNode>,
    pool: Arc<StoragePool>,
    membership: Arc<Membership>,
    stop: CancellationToken,
}

async fn two_nodes() -> TwoNodes {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let gossip: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port())))
        .collect();
    let nodes: Vec<StorageNode> = (0..2)
        .map(|i| {
            StorageNode::start(
                &format!("m{i}"),
                dirs[i].path(),
                Some((gossip[i], vec![gossip[1 - i]])),
            )
        })
        .collect();
    let pool = Arc::new(StoragePool::new(common::internal_auth()));
    let stop = CancellationToken::new();
    let registry: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.id.clone(), n.grpc.to_string()))
        .collect();
    let membership = Arc::new(Membership::default());
    membership.follow(
        move || registry.clone(),
        pool.clone(),
        &pairdb::shutdown::Tasks::new(stop.clone()),
    );
    wait_until("both nodes up", || {
        membership.members().iter().filter(|m| m.up).count() == 2
    })
    .await;
    TwoNodes {
        _dirs: dirs,
        nodes,
        pool,
        membership,
        stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_gossip_and_fails_over() {
    let TwoNodes {
        _dirs,
        mut nodes,
        pool,
        membership,
        stop,
    } = two_nodes().await;
    let mut client = pool
        .client("m0", &nodes[0].grpc.to_string())
        .expect("client");
    let health = client
        .health_check(pb::HealthCheckRequest {})
        .await
        .expect("pooled client works")
        .into_inner();
    assert_eq!(health.node_id, "m0");

    nodes[1].kill9();
    wait_until("m1 down", || membership.is_down("m1")).await;
    assert!(!membership.is_down("m0"));
    nodes[1].restart();
    wait_until("m1 up again", || {
        !membership.is_down("m1")
            && membership
                .members()
                .iter()
                .any(|m| m.node_id == "m1" && m.up)
    })
    .await;

    // The node being watched dies: the watch moves to the other node, which reports it down.
    nodes[0].kill9();
    wait_until("m0 down, seen through m1", || membership.is_down("m0")).await;
    stop.cancel();
}

/// The watched node freezes (SIGSTOP: its connection stays open and silent, as behind a
/// partition that drops packets). The watch must give up on the silent stream and move to the
/// other node, which reports the frozen one down; a frozen watch would keep it up forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_moves_to_another_node() {
    let TwoNodes {
        _dirs,
        nodes,
        membership,
        stop,
        ..
    } = two_nodes().await;
    // (A node paused when the test fails is killed with the rest on drop.)
    nodes[0].pause();
    wait_until("m0 down, seen through m1", || membership.is_down("m0")).await;
    nodes[0].resume();
    wait_until("m0 up again", || !membership.is_down("m0")).await;
    stop.cancel();
}
