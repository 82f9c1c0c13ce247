//! Storage faults beyond crashes, over real processes: a storage node whose SSTable holds a
//! flipped bit detects it by checksum, quarantines the table, reports itself degraded (health
//! and metrics) and refuses the key range; the coordinator serves every key from the other
//! replicas. Nothing wrong is served. A flipped bit in its manifest costs nothing but a report:
//! the node opens from the manifest's mirror copy and serves every key itself.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::time::Duration;

use common::cluster::{RoleProcess, start_storage};
use common::coord::{
    create_tenant, eventually, get, one_coordinator, put, sqlite_url, wait_all_active,
};
use pairdb::rpc::common::Consistency;
use pairdb::rpc::storage as spb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_table_is_quarantined_and_its_keys_served_by_other_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(3, dir.path());
    // Every QUORUM read asks every replica, so the damaged one is always among them.
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &[("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "1")],
        dir.path(),
    );
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    const KEYS: usize = 60;
    let value = |i: usize| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(40));
    for i in 0..KEYS {
        put(
            &mut c,
            "acme",
            &format!("k{i}"),
            &value(i),
            Consistency::All,
        )
        .await
        .expect("write at ALL");
    }

    // s1 flushes everything into a table, stops, and a bit of that table's first data block
    // flips on disk.
    let mut client = storage[0].client().await;
    client.drain(spb::DrainRequest {}).await.expect("flush s1");
    assert_eq!(storage[0].terminate().code(), Some(0));
    let sst = dir.path().join("s1").join("sst");
    let table = std::fs::read_dir(&sst)
        .expect("sst dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "sst"))
        .expect("a table");
    let mut bytes = std::fs::read(&table).expect("read table");
    bytes[40] ^= 0x10;
    std::fs::write(&table, &bytes).expect("flip a bit");
    storage[0].restart();
    wait_all_active(&c, 3).await;

    // Every read gives the right value, at QUORUM (every replica asked) and at ONE.
    for level in [Consistency::Quorum, Consistency::One] {
        for i in 0..KEYS {
            let got = get(&mut c, "acme", &format!("k{i}"), level)
                .await
                .unwrap_or_else(|e| panic!("k{i} at {level:?}: {e}"));
            assert_eq!(got, value(i), "k{i} at {level:?}");
        }
    }

    // s1 found the damage, took the table out and says so.
    let mut s1 = storage[0].client().await;
    eventually("s1 reports the quarantine", Duration::from_secs(10), || {
        let mut s1 = s1.clone();
        async move {
            s1.health_check(spb::HealthCheckRequest {})
                .await
                .map(|h| h.into_inner())
                .is_ok_and(|h| {
                    h.status == spb::HealthStatus::Degraded as i32
                        && h.problems.iter().any(|p| p.contains("quarantined"))
                })
        }
    })
    .await;
    let metrics = common::http_get(storage[0].http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pairdb_engine_tables_quarantined{") && l.ends_with(" 1")),
        "{metrics}"
    );
    // Its own answer for a key of that table is an error, not an older or missing value.
    let direct = s1
        .read(spb::ReadRequest {
            tenant_id: "acme".into(),
            key: b"k0".to_vec().into(),
        })
        .await;
    assert!(
        direct.is_err(),
        "s1 served a key of a quarantined table: {direct:?}"
    );
    drop(c1);
    storage.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_manifest_bit_is_reported_and_the_node_serves_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut storage, c1, mut c) =
        one_coordinator(1, dir.path(), "memory://", &[("acme", 1)]).await;
    const KEYS: usize = 30;
    for i in 0..KEYS {
        put(
            &mut c,
            "acme",
            &format!("k{i}"),
            &format!("\"v{i}\""),
            Consistency::All,
        )
        .await
        .expect("write");
    }
    let mut client = storage[0].client().await;
    client.drain(spb::DrainRequest {}).await.expect("flush s1");
    assert_eq!(storage[0].terminate().code(), Some(0));
    let manifest = dir.path().join("s1").join("MANIFEST");
    let original = std::fs::read(&manifest).expect("read manifest");
    for pos in [0, 13, 17, original.len() / 2] {
        let mut bytes = original.clone();
        bytes[pos] ^= 0x04;
        std::fs::write(&manifest, &bytes).expect("flip a bit");
        storage[0].restart();
        wait_all_active(&c, 1).await;
        let mut s1 = storage[0].client().await;
        let health = s1
            .health_check(spb::HealthCheckRequest {})
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            health.status,
            spb::HealthStatus::Degraded as i32,
            "flip at {pos}"
        );
        assert!(
            health.problems.iter().any(|p| p.contains("manifest")),
            "flip at {pos}: {:?}",
            health.problems
        );
        let metrics = common::http_get(storage[0].http, "/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("pairdb_engine_manifest_damaged{") && l.ends_with(" 1")),
            "flip at {pos}: {metrics}"
        );
        for i in 0..KEYS {
            let got = get(&mut c, "acme", &format!("k{i}"), Consistency::One)
                .await
                .unwrap_or_else(|e| panic!("flip at {pos}: k{i}: {e}"));
            assert_eq!(got, format!("\"v{i}\""), "flip at {pos}");
        }
        assert_eq!(storage[0].terminate().code(), Some(0));
        assert_eq!(
            std::fs::read(&manifest).expect("read"),
            original,
            "flip at {pos}: MANIFEST rewritten from the mirror"
        );
    }
    drop(c1);
    storage.clear();
}

/// A storage node applies writes on its runtime's only worker, which waits for each log sync.
/// Gossip must not depend on that worker: with it blocked for 8 s (far beyond the failure
/// detector's few seconds), neither node may call the other down.
#[test]
fn a_blocked_runtime_does_not_stop_gossip() {
    use pairdb::storage::gossip::Gossip;
    let (pa, pb) = (common::free_udp_port(), common::free_udp_port());
    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let one_worker = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    let start = |rt: &tokio::runtime::Runtime, id: &str, me: u16, peer: u16| {
        let seeds = vec![addr(peer).to_string()];
        rt.block_on(Gossip::start(
            id,
            addr(me),
            seeds,
            "127.0.0.1:1",
            common::cluster_secret(),
        ))
        .expect("gossip")
    };
    let (ra, rb) = (one_worker(), one_worker());
    let a = start(&ra, "ga", pa, pb);
    let b = start(&rb, "gb", pb, pa);
    let sees_up = |rt: &tokio::runtime::Runtime, g: &Gossip, other: &str| {
        rt.block_on(g.members())
            .iter()
            .any(|m| m.node_id == other && m.up)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(sees_up(&ra, &a, "gb") && sees_up(&rb, &b, "ga")) {
        assert!(
            std::time::Instant::now() < deadline,
            "gossip never converged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Node a's runtime thread is stuck (as in a long sync) while b keeps running.
    let blocked = std::thread::spawn(move || {
        ra.block_on(async { std::thread::sleep(Duration::from_secs(8)) });
        (ra, a)
    });
    for _ in 0..80 {
        assert!(
            sees_up(&rb, &b, "ga"),
            "b called a down while a's runtime was blocked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ra, a) = blocked.join().expect("blocked thread");
    // Right after the stall, a judges b by the heartbeats its gossip thread kept receiving.
    assert!(
        sees_up(&ra, &a, "gb"),
        "a called b down after its runtime was blocked"
    );
    ra.block_on(a.shutdown());
    rb.block_on(b.shutdown());
}

/// Gossip from outside the cluster is ignored: a node with another cluster secret, seeded with
/// the members' addresses, never appears in their membership, nor they in its.
#[test]
fn gossip_from_another_secret_is_ignored() {
    use pairdb::rpc::auth::ClusterSecret;
    use pairdb::storage::gossip::Gossip;
    let ports = [
        common::free_udp_port(),
        common::free_udp_port(),
        common::free_udp_port(),
    ];
    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let start = |id: &str, me: u16, secret: ClusterSecret| {
        let seeds = ports
            .iter()
            .filter(|p| **p != me)
            .map(|p| addr(*p).to_string())
            .collect();
        rt.block_on(Gossip::start(id, addr(me), seeds, "127.0.0.1:1", secret))
            .expect("gossip")
    };
    let a = start("ga", ports[0], common::cluster_secret());
    let b = start("gb", ports[1], common::cluster_secret());
    let stranger = start(
        "intruder",
        ports[2],
        ClusterSecret::new("another-cluster-secret").expect("valid"),
    );
    let members = |g: &Gossip| {
        let mut ids: Vec<String> = rt
            .block_on(g.members())
            .into_iter()
            .map(|m| m.node_id)
            .collect();
        ids.sort();
        ids
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while members(&a) != ["ga", "gb"] || members(&b) != ["ga", "gb"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the members never saw each other: {:?} {:?}",
            members(&a),
            members(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Many gossip rounds later, still nobody knows the stranger, nor it them.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(members(&a), ["ga", "gb"]);
    assert_eq!(members(&b), ["ga", "gb"]);
    assert_eq!(members(&stranger), ["intruder"]);
    for g in [a, b, stranger] {
        rt.block_on(g.shutdown());
    }
}
