//! Storage nodes that join by themselves, rehearsed as a StatefulSet would start them, over real
//! processes: a coordinator with an empty registry, three nodes with ordinal ids started at
//! once with `--join`, one restarted with its data (it does not register again), one added
//! later; the ring ends with every node `active` and every key readable. And a node that comes
//! back under a registered id without its data is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::RoleProcess;
use common::coord::{create_tenant, get, put, sqlite_url, wait_all_active};
use pairdb::rpc::common::Consistency;
use pairdb::rpc::coordinator as pb;

fn join_env(c1: &RoleProcess) -> Vec<(String, String)> {
    vec![
        ("PAIRDB_STORAGE_JOIN".to_owned(), "true".to_owned()),
        (
            "PAIRDB_STORAGE_JOIN_COORDINATORS".to_owned(),
            c1.grpc.to_string(),
        ),
    ]
}

/// Storage node `id` with `--join`, gossiping with `seeds`.
fn joining(
    id: &str,
    dir: &std::path::Path,
    gossip: SocketAddr,
    seeds: Vec<SocketAddr>,
    env: &[(String, String)],
) -> common::StorageNode {
    let data = dir.join(id);
    std::fs::create_dir_all(&data).unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    common::StorageNode::start_with_env(id, &data, Some((gossip, seeds)), &env)
}

async fn migrations(c: &mut common::coord::Client) -> usize {
    c.list_migrations(pb::ListMigrationsRequest { limit: 100 })
        .await
        .unwrap()
        .into_inner()
        .migrations
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statefulset_of_joining_nodes_ends_active_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &[],
        &[],
        dir.path(),
    );
    let mut c = c1.client().await;
    let env = join_env(&c1);
    let gossip: Vec<SocketAddr> = (0..4)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], common::free_udp_port())))
        .collect();
    let seeds = |i: usize| {
        gossip[..3]
            .iter()
            .filter(|g| **g != gossip[i])
            .copied()
            .collect()
    };
    // Three ordinals at once, like podManagementPolicy: Parallel.
    let mut nodes: Vec<common::StorageNode> = (0..3)
        .map(|i| {
            joining(
                &format!("pairdb-storage-{i}"),
                dir.path(),
                gossip[i],
                seeds(i),
                &env,
            )
        })
        .collect();
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    for i in 0..200 {
        put(
            &mut c,
            "acme",
            &format!("k{i}"),
            "\"v\"",
            Consistency::Quorum,
        )
        .await
        .unwrap();
    }

    // A restart with its data registers nothing again.
    let before = migrations(&mut c).await;
    nodes[1].terminate();
    nodes[1].restart();
    wait_all_active(&c, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(migrations(&mut c).await, before, "no second bootstrap");

    // One more ordinal later: it bootstraps and takes its share.
    nodes.push(joining(
        "pairdb-storage-3",
        dir.path(),
        gossip[3],
        gossip[..3].to_vec(),
        &env,
    ));
    wait_all_active(&c, 4).await;
    for i in 0..200 {
        assert_eq!(
            get(&mut c, "acme", &format!("k{i}"), Consistency::All)
                .await
                .unwrap(),
            "\"v\"",
            "k{i}"
        );
    }

    // The new node loses its volume and comes back under its id: refused, exit 2.
    nodes[3].terminate();
    std::fs::remove_dir_all(dir.path().join("pairdb-storage-3")).unwrap();
    std::fs::create_dir_all(dir.path().join("pairdb-storage-3")).unwrap();
    let port = common::free_tcp_port();
    let http = common::free_tcp_port();
    let mut child = common::pairdb_command()
        .args([
            "--role=storage",
            "--node-id=pairdb-storage-3",
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--http-listen=127.0.0.1:{http}"),
            &format!(
                "--data-dir={}",
                dir.path().join("pairdb-storage-3").display()
            ),
            "--log-level=warn",
            "--join",
            &format!("--join-coordinators={}", c1.grpc),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a node without its data was not refused");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("its data is lost") && stderr.contains("remove-node"),
        "{stderr}"
    );
}

/// With no coordinator to register through, a joining node serves but is not ready, and keeps
/// trying (it neither exits nor reports ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_join_yet_stays_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("127.0.0.1:{}", common::free_tcp_port());
    let env = [
        ("PAIRDB_STORAGE_JOIN", "true"),
        ("PAIRDB_STORAGE_JOIN_COORDINATORS", nobody.as_str()),
    ];
    let data = dir.path().join("pairdb-storage-0");
    std::fs::create_dir_all(&data).unwrap();
    let node = common::StorageNode::start_with_env("pairdb-storage-0", &data, None, &env);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ready = common::http_get(node.http, "/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 503") && ready.contains("joining"),
            "{ready}"
        );
    }
    assert!(!data.join("JOINED").exists());
}
