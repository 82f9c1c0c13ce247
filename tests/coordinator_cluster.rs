//! Coordinator role against real processes: gossiping storage nodes and `pairdb
//! --role=coordinator` over gRPC, sharing a metadata store (PostgreSQL when the machine has it,
//! else SQLite; PostgreSQL and Redis are required under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::backends::{Postgres, Redis, skip_or_fail};
use common::cluster::{RoleProcess, start_storage};
use common::coord::{
    Client, code, create_tenant, eventually, get, listed_ring, node_state, put, put_idem,
    sqlite_url, stored, wait_all_active, wait_migration,
};
use pairdb::meta::{MetadataStore, NodeRecord, SqlMetadataStore};
use pairdb::ring::NodeState;
use pairdb::rpc::common::{Consistency, NodeState as WireState};
use pairdb::rpc::coordinator::{self as pb, ErrorCode};
use pairdb::rpc::detail::coordinator_detail as detail_in;
use pairdb::vclock::Version;

/// The tests of this file run one at a time: each starts 3-5 storage nodes and coordinators,
/// and running them all at once on a 2-core machine starves gossip heartbeats.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEVELS: [Consistency; 3] = [Consistency::One, Consistency::Quorum, Consistency::All];

/// Three storage nodes `s1..s3` and coordinator `c1` (SQLite metadata, `env` added) with
/// gossip converged and tenant `acme` at RF 3.
async fn one_coordinator(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Vec<common::StorageNode>, RoleProcess, Client) {
    let storage = start_storage(3, dir);
    let c1 = RoleProcess::coordinator("c1", &sqlite_url(dir), "memory://", &storage, env, dir);
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    (storage, c1, c)
}

/// Creates `tenant` at `rf` holding `count` keys `k0..`, each written at ALL with `value`.
async fn tenant_with_keys(
    c: &mut Client,
    tenant: &str,
    rf: u32,
    count: usize,
    value: &str,
) -> Vec<String> {
    create_tenant(c, tenant, rf).await;
    let keys: Vec<String> = (0..count).map(|i| format!("k{i}")).collect();
    common::coord::write_at_all(c, tenant, &keys, value).await;
    keys
}

/// Asks for `tenant`'s replication factor to become `rf`.
async fn change_rf(c: &mut Client, tenant: &str, rf: u32) -> pb::UpdateReplicationFactorResponse {
    c.update_replication_factor(pb::UpdateReplicationFactorRequest {
        tenant_id: tenant.into(),
        replication_factor: rf,
    })
    .await
    .unwrap_or_else(|e| panic!("RF of {tenant} to {rf}: {e}"))
    .into_inner()
}

/// Placement, quorum reads and writes at every level from two coordinators, tenant isolation,
/// input errors, delete, and ring changes seen by both coordinators through the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_over_three_and_five_nodes_with_two_coordinators() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    if pg.is_none() {
        skip_or_fail("the PostgreSQL half of this test", "PostgreSQL");
    }
    for n in [3usize, 5] {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = start_storage(n, dir.path());
        let meta_url = match &pg {
            // One database per cluster.
            Some(pg) => {
                let db = format!("cluster{n}");
                let admin = sqlx::PgPool::connect(&pg.url()).await.expect("pg");
                sqlx::query(&format!("CREATE DATABASE {db}"))
                    .execute(&admin)
                    .await
                    .expect("create db");
                admin.close().await;
                format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port)
            }
            None => sqlite_url(dir.path()),
        };
        let c1 = RoleProcess::coordinator("c1", &meta_url, "memory://", &storage, &[], dir.path());
        let c2 = RoleProcess::coordinator("c2", &meta_url, "memory://", &storage, &[], dir.path());
        let (mut a, mut b) = (c1.client().await, c2.client().await);
        wait_all_active(&a, n).await;
        wait_all_active(&b, n).await;
        create_tenant(&mut a, "acme", 3).await;
        create_tenant(&mut a, "globex", 3).await;

        for i in 0..20 {
            let key = format!("user:{i}");
            let via = if i % 2 == 0 { &mut a } else { &mut b };
            let w = put(
                via,
                "acme",
                &key,
                &format!("\"acme-{i}\""),
                Consistency::Quorum,
            )
            .await
            .expect("quorum write");
            assert!(
                w.replica_count >= 2,
                "quorum write acked by {}",
                w.replica_count
            );
            put(
                via,
                "globex",
                &key,
                &format!("{{\"g\":{i}}}"),
                Consistency::Quorum,
            )
            .await
            .expect("quorum write");
        }
        for i in 0..20 {
            let key = format!("user:{i}");
            for level in LEVELS {
                for c in [&mut a, &mut b] {
                    assert_eq!(
                        get(c, "acme", &key, level).await.expect("read"),
                        format!("\"acme-{i}\"")
                    );
                    assert_eq!(
                        get(c, "globex", &key, level).await.expect("read"),
                        format!("{{\"g\":{i}}}")
                    );
                }
            }
            // RF 3: exactly three nodes hold each key, whatever the node count.
            let mut holders = 0;
            for node in &storage {
                if stored(node, "acme", &key).await.is_some() {
                    holders += 1;
                }
            }
            assert!(holders >= 2, "{key} on {holders} nodes");
            assert!(holders <= 3, "{key} on {holders} nodes");
        }
        eventually(
            "every write reaches all three replicas",
            Duration::from_secs(10),
            || {
                let storage = &storage;
                async move {
                    let mut total = 0;
                    for node in storage {
                        for i in 0..20 {
                            total += usize::from(
                                stored(node, "acme", &format!("user:{i}")).await.is_some(),
                            );
                        }
                    }
                    total == 60
                }
            },
        )
        .await;

        // Errors, and nothing written by them.
        let e = get(&mut a, "nobody", "user:1", Consistency::Quorum)
            .await
            .expect_err("unknown tenant");
        assert_eq!(code(&e), ErrorCode::TenantNotFound);
        let e = put(&mut a, "acme", &"k".repeat(1025), "1", Consistency::Quorum)
            .await
            .expect_err("long key");
        assert_eq!(code(&e), ErrorCode::KeyTooLarge);
        let e = put(&mut a, "acme", "", "1", Consistency::Quorum)
            .await
            .expect_err("empty key");
        assert_eq!(code(&e), ErrorCode::InvalidRequest);
        let e = put(&mut a, "bad:tenant", "k", "1", Consistency::Quorum)
            .await
            .expect_err("bad tenant");
        assert_eq!(code(&e), ErrorCode::InvalidRequest);
        let e = a
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                replication_factor: 3,
            })
            .await
            .expect_err("twice");
        assert_eq!(code(&e), ErrorCode::TenantExists);
        let e = a
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "big".into(),
                replication_factor: 11,
            })
            .await
            .expect_err("rf 11");
        assert_eq!(code(&e), ErrorCode::InvalidReplicationFactor);
        let e = b
            .get_tenant(pb::GetTenantRequest {
                tenant_id: "big".into(),
            })
            .await
            .expect_err("not created");
        assert_eq!(code(&e), ErrorCode::TenantNotFound);
        let t = b
            .get_tenant(pb::GetTenantRequest {
                tenant_id: "globex".into(),
            })
            .await
            .expect("tenant")
            .into_inner();
        assert_eq!(t.replication_factor, 3);
        assert!(
            t.created_at.ends_with('Z'),
            "RFC 3339 UTC: {}",
            t.created_at
        );
        let e = get(&mut a, "acme", "never", Consistency::Quorum)
            .await
            .expect_err("missing");
        assert_eq!(code(&e), ErrorCode::KeyNotFound);

        // Delete from one coordinator, gone for the other; the other tenant keeps its key.
        let d = a
            .delete_key_value(pb::DeleteKeyValueRequest {
                tenant_id: "acme".into(),
                key: b"user:0".to_vec().into(),
                consistency: Consistency::Quorum as i32,
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert!(d.replica_count >= 2);
        let e = get(&mut b, "acme", "user:0", Consistency::Quorum)
            .await
            .expect_err("deleted");
        assert_eq!(code(&e), ErrorCode::KeyNotFound);
        assert_eq!(
            get(&mut b, "globex", "user:0", Consistency::All)
                .await
                .expect("other tenant"),
            "{\"g\":0}"
        );
        let e = b
            .delete_key_value(pb::DeleteKeyValueRequest {
                tenant_id: "acme".into(),
                key: b"user:0".to_vec().into(),
                consistency: Consistency::Quorum as i32,
                ..Default::default()
            })
            .await
            .expect_err("already deleted");
        assert_eq!(code(&e), ErrorCode::KeyNotFound);
        put(&mut b, "acme", "user:0", "\"again\"", Consistency::Quorum)
            .await
            .expect("rewrite after delete");
        assert_eq!(
            get(&mut a, "acme", "user:0", Consistency::All)
                .await
                .expect("read"),
            "\"again\""
        );

        // Both coordinators list every node as active, with the same balanced tokens (seeded
        // by both at once: admission is serialized through the store), none taken twice.
        let mut listed = Vec::new();
        for c in [&mut a, &mut b] {
            let nodes = c
                .list_storage_nodes(pb::ListStorageNodesRequest {})
                .await
                .expect("list")
                .into_inner()
                .nodes;
            assert_eq!(nodes.len(), n);
            let vnodes = pairdb::ring::BALANCED_VIRTUAL_NODES;
            assert!(nodes.iter().all(|x| x.state() == WireState::Active
                && x.virtual_nodes == vnodes
                && x.tokens.len() == vnodes as usize));
            listed.push(
                nodes
                    .iter()
                    .map(|x| (x.node_id.clone(), x.tokens.clone()))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(listed[0], listed[1]);
        let distinct: std::collections::BTreeSet<u64> = listed[0]
            .iter()
            .flat_map(|(_, t)| t.iter().copied())
            .collect();
        assert_eq!(
            distinct.len(),
            n * pairdb::ring::BALANCED_VIRTUAL_NODES as usize
        );
        // A registry change made through the shared store reaches both coordinators' rings.
        let store = SqlMetadataStore::connect(&meta_url).await.expect("store");
        store
            .add_node(&NodeRecord {
                node_id: "s99".into(),
                host: "127.0.0.1".into(),
                port: 1,
                virtual_nodes: 8,
                tokens: None,
                state: NodeState::Failed,
            })
            .await
            .expect("add");
        for c in [&mut a, &mut b] {
            eventually("the new registry entry", Duration::from_secs(5), || {
                let mut c = c.clone();
                async move { node_state(&mut c, "s99").await == Some(WireState::Failed) }
            })
            .await;
        }
        store.close().await;
    }
}

/// A replica call still out a while after the write was answered gets its hint then, not at
/// the call's deadline: a coordinator killed in between (here 1 s after the answer, with a 5 s
/// deadline) leaves the hint stored, and the replica gets the write once it is back. Before,
/// that replica kept missing the write until a full repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_call_still_out_when_its_coordinator_dies_left_a_hint() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL_MS", "300"),
        ("PAIRDB_COORDINATOR_REQUEST_TIMEOUT_MS", "5000"),
    ];
    let (mut storage, mut c1, mut c) = one_coordinator(dir.path(), &env).await;

    // The replica answers nothing (its call neither fails nor ends) while the others ack.
    storage[2].pause();
    let w = put(&mut c, "acme", "k", "\"v\"", Consistency::Quorum)
        .await
        .expect("a quorum of the other two");
    assert_eq!(w.replica_count, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c1.kill9();
    // The request it was sent dies with it, unread.
    storage[2].kill9();
    storage[2].restart();
    assert_eq!(stored(&storage[2], "acme", "k").await, None, "it missed k");

    c1.restart();
    let c = c1.client().await;
    wait_all_active(&c, 3).await;
    eventually("the hint reaches s3", Duration::from_secs(20), || async {
        stored(&storage[2], "acme", "k").await.is_some()
    })
    .await;
}

/// A dead replica: quorum keeps working, ALL fails with the counts, hints pile up, and are
/// replayed when the node is back, so that node alone serves the latest values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replica_gets_hints_replayed_when_back() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(3, dir.path());
    let meta_url = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator(
        "c1",
        &meta_url,
        "memory://",
        &storage,
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL_MS", "300")],
        dir.path(),
    );
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    for i in 0..10 {
        put(
            &mut c,
            "acme",
            &format!("k{i}"),
            "\"old\"",
            Consistency::All,
        )
        .await
        .expect("write");
    }
    storage[2].kill9();
    for i in 0..10 {
        let w = put(
            &mut c,
            "acme",
            &format!("k{i}"),
            "\"new\"",
            Consistency::Quorum,
        )
        .await
        .expect("quorum write with a dead replica");
        assert_eq!(w.replica_count, 2);
        assert_eq!(
            get(&mut c, "acme", &format!("k{i}"), Consistency::Quorum)
                .await
                .expect("read"),
            "\"new\""
        );
    }
    let e = put(&mut c, "acme", "k0", "\"all\"", Consistency::All)
        .await
        .expect_err("ALL");
    assert_eq!(code(&e), ErrorCode::QuorumNotReached);
    let detail = detail_in(&e).expect("detail");
    assert_eq!(
        (detail.required, detail.received),
        (3, 2),
        "{}",
        e.message()
    );
    let e = get(&mut c, "acme", "k1", Consistency::All)
        .await
        .expect_err("ALL read");
    assert_eq!(code(&e), ErrorCode::QuorumNotReached);

    let store = SqlMetadataStore::connect(&meta_url).await.expect("store");
    let hints_for_s3 = |counts: Vec<(String, u64)>| {
        counts
            .into_iter()
            .find(|(n, _)| n == "s3")
            .map_or(0, |(_, c)| c)
    };
    eventually("hints for s3", Duration::from_secs(5), || {
        let store = &store;
        async move { hints_for_s3(store.hint_counts().await.expect("counts")) >= 11 }
    })
    .await;

    storage[2].restart();
    eventually("hints replayed to s3", Duration::from_secs(30), || {
        let store = &store;
        async move { hints_for_s3(store.hint_counts().await.expect("counts")) == 0 }
    })
    .await;
    // k0 was written at ALL after the QUORUM writes: the ALL attempt landed on two replicas
    // and was hinted for s3, so "all" is k0's latest value everywhere.
    for i in 0..10 {
        let want = if i == 0 { "\"all\"" } else { "\"new\"" };
        let held = stored(&storage[2], "acme", &format!("k{i}"))
            .await
            .expect("replayed");
        assert_eq!(held.0, want, "k{i} on s3");
    }
    storage[0].kill9();
    storage[1].kill9();
    for i in 1..10 {
        assert_eq!(
            get(&mut c, "acme", &format!("k{i}"), Consistency::One)
                .await
                .expect("ONE from s3"),
            "\"new\""
        );
    }
    store.close().await;
}

/// With hints off, a replica that missed a write is stale until a quorum read repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_read_repairs_a_stale_replica() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut storage, _c1, mut c) = one_coordinator(
        dir.path(),
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "1"),
        ],
    )
    .await;
    put(&mut c, "acme", "k", "\"v1\"", Consistency::All)
        .await
        .expect("write");
    storage[2].kill9();
    put(&mut c, "acme", "k", "\"v2\"", Consistency::Quorum)
        .await
        .expect("write");
    put(&mut c, "acme", "fresh", "\"only-two\"", Consistency::Quorum)
        .await
        .expect("write");
    storage[2].restart();
    eventually(
        "s3 back in the coordinator's view",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
        },
    )
    .await;
    assert_eq!(
        stored(&storage[2], "acme", "k").await.expect("old").0,
        "\"v1\"",
        "s3 is stale"
    );
    assert!(
        stored(&storage[2], "acme", "fresh").await.is_none(),
        "s3 misses the key"
    );

    assert_eq!(
        get(&mut c, "acme", "k", Consistency::Quorum)
            .await
            .expect("read"),
        "\"v2\""
    );
    assert_eq!(
        get(&mut c, "acme", "fresh", Consistency::Quorum)
            .await
            .expect("read"),
        "\"only-two\""
    );
    eventually("read repair of s3", Duration::from_secs(10), || {
        let s3 = &storage[2];
        async move {
            stored(s3, "acme", "k").await.map(|v| v.0).as_deref() == Some("\"v2\"")
                && stored(s3, "acme", "fresh").await.is_some()
        }
    })
    .await;
}

/// Writers racing on one key through two coordinators, one of them restarted mid-way: every
/// replica ends with the same winner, and writes after the restart are not shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_converge_and_a_restarted_coordinator_never_shadows() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta_url = sqlite_url(dir.path());
    let mut c1 = RoleProcess::coordinator("c1", &meta_url, "memory://", &storage, &[], dir.path());
    let c2 = RoleProcess::coordinator("c2", &meta_url, "memory://", &storage, &[], dir.path());
    let (mut a, mut b) = (c1.client().await, c2.client().await);
    wait_all_active(&a, 3).await;
    wait_all_active(&b, 3).await;
    create_tenant(&mut a, "acme", 3).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut client = if w % 2 == 0 { a.clone() } else { b.clone() };
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = 0;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                if put(
                    &mut client,
                    "acme",
                    "hot",
                    &format!("\"w{w}-{n}\""),
                    Consistency::Quorum,
                )
                .await
                .is_ok()
                {
                    acked += 1;
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    c1.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c1.restart();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = 0;
    for w in writers {
        acked += w.await.expect("writer");
    }
    assert!(acked > 20, "only {acked} writes acknowledged");

    eventually(
        "all replicas agree on one winner",
        Duration::from_secs(15),
        || {
            let storage = &storage;
            async move {
                let mut held = Vec::new();
                for node in storage {
                    held.push(stored(node, "acme", "hot").await);
                }
                held[0].is_some() && held.iter().all(|h| *h == held[0])
            }
        },
    )
    .await;
    let winner = stored(&storage[0], "acme", "hot").await.expect("winner").0;
    assert_eq!(
        get(&mut b, "acme", "hot", Consistency::All)
            .await
            .expect("read"),
        winner
    );

    // Sequential writes after the restart win, whichever coordinator takes them.
    let mut a = c1.client().await;
    put(
        &mut a,
        "acme",
        "hot",
        "\"after-restart\"",
        Consistency::Quorum,
    )
    .await
    .expect("write");
    assert_eq!(
        get(&mut b, "acme", "hot", Consistency::Quorum)
            .await
            .expect("read"),
        "\"after-restart\""
    );
    put(&mut b, "acme", "hot", "\"from-c2\"", Consistency::Quorum)
        .await
        .expect("write");
    put(&mut a, "acme", "hot", "\"from-c1\"", Consistency::Quorum)
        .await
        .expect("write");
    assert_eq!(
        get(&mut b, "acme", "hot", Consistency::Quorum)
            .await
            .expect("read"),
        "\"from-c1\""
    );
}

/// Twenty concurrent retries with one idempotency key write once; another value is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_write_once() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let idem_url = match &redis {
        Some(r) => r.url(),
        None => {
            skip_or_fail(
                "the Redis half of idempotent_retries_write_once",
                "redis-server",
            );
            "memory://".to_owned()
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta_url = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &meta_url, &idem_url, &storage, &[], dir.path());
    // Two coordinators share the idempotency store only through Redis.
    let c2 = redis
        .as_ref()
        .map(|_| RoleProcess::coordinator("c2", &meta_url, &idem_url, &storage, &[], dir.path()));
    let mut a = c1.client().await;
    wait_all_active(&a, 3).await;
    create_tenant(&mut a, "acme", 3).await;
    let mut clients = vec![a.clone()];
    if let Some(c2) = &c2 {
        let b = c2.client().await;
        wait_all_active(&b, 3).await;
        clients.push(b);
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            put_idem(
                &mut client,
                "acme",
                "order:1",
                "{\"total\":5}",
                Consistency::Quorum,
                "retry-1",
            )
            .await
        }));
    }
    let mut responses = Vec::new();
    for t in tasks {
        responses.push(t.await.expect("task").expect("write"));
    }
    let firsts = responses.iter().filter(|r| !r.is_duplicate).count();
    assert_eq!(firsts, 1, "exactly one request wrote");
    assert!(
        responses
            .iter()
            .all(|r| r.version == responses[0].version && r.idempotency_key == "retry-1")
    );
    let written = Version::from(responses[0].version.as_ref().expect("version"));
    for node in &storage {
        let held = stored(node, "acme", "order:1").await.expect("held");
        assert_eq!(held.1, written, "one version on {}", node.id);
    }

    let e = put_idem(
        &mut a,
        "acme",
        "order:1",
        "{\"total\":6}",
        Consistency::Quorum,
        "retry-1",
    )
    .await
    .expect_err("different value");
    assert_eq!(code(&e), ErrorCode::IdempotencyKeyConflict);
    assert_eq!(
        get(&mut a, "acme", "order:1", Consistency::All)
            .await
            .expect("read"),
        "{\"total\":5}"
    );
    // A new key writes again; no key gets a generated one.
    let again = put_idem(
        &mut a,
        "acme",
        "order:1",
        "{\"total\":6}",
        Consistency::Quorum,
        "retry-2",
    )
    .await
    .expect("new key");
    assert!(!again.is_duplicate);
    let generated = put(&mut a, "acme", "order:2", "1", Consistency::Quorum)
        .await
        .expect("write");
    assert_eq!(
        generated.idempotency_key.len(),
        36,
        "a UUID: {}",
        generated.idempotency_key
    );
}

/// A hung replica (SIGSTOP, not dead: connections open, no answers) neither fails nor stalls
/// quorum reads and writes: reads retry on the other replicas, writes need only two acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_does_not_fail_quorum_requests() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, mut c) = one_coordinator(dir.path(), &[]).await;
    for i in 0..20 {
        put(&mut c, "acme", &format!("k{i}"), "\"v\"", Consistency::All)
            .await
            .expect("write");
    }
    let metrics = common::http_get(c1.http, "/metrics").await;
    assert!(
        metrics.contains("pairdb_coordinator_batch_seconds"),
        "{metrics}"
    );
    storage[2].pause();
    for i in 0..20 {
        let key = format!("k{i}");
        assert_eq!(
            get(&mut c, "acme", &key, Consistency::Quorum)
                .await
                .expect("quorum read with a hung replica"),
            "\"v\""
        );
        put(&mut c, "acme", &key, "\"w\"", Consistency::Quorum)
            .await
            .expect("quorum write with a hung replica");
    }
    storage[2].resume();
}

/// A coordinator's gRPC port refuses callers without the cluster secret (UNAUTHENTICATED, the
/// write not made); the gateway's calls, which carry it, go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_calls_without_the_cluster_secret_are_refused() {
    use pairdb::rpc::coordinator::coordinator_client::CoordinatorClient;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, c1, mut c) = one_coordinator(dir.path(), &[]).await;
    let mut bare = CoordinatorClient::connect(format!("http://{}", c1.grpc))
        .await
        .expect("connect");
    let refused = bare
        .write_key_value(pb::WriteKeyValueRequest {
            tenant_id: "acme".to_owned(),
            key: b"k".to_vec().into(),
            value: b"\"v\"".to_vec().into(),
            consistency: Consistency::All as i32,
            ..Default::default()
        })
        .await
        .expect_err("a write without the secret");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let admin = bare
        .list_storage_nodes(pb::ListStorageNodesRequest {})
        .await
        .expect_err("admin without the secret");
    assert_eq!(admin.code(), tonic::Code::Unauthenticated);
    let missing = get(&mut c, "acme", "k", Consistency::All)
        .await
        .expect_err("the refused write was not made");
    assert_eq!(code(&missing), ErrorCode::KeyNotFound);
    put(&mut c, "acme", "k", "\"v\"", Consistency::All)
        .await
        .expect("a write with the secret");
}

/// Raising a tenant's RF copies every existing key to its new replicas (while writes made
/// meanwhile reach them too), then switches the tenant to the new RF on every coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_replication_factor_copies_existing_keys() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta_url = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &meta_url, "memory://", &storage, &[], dir.path());
    let c2 = RoleProcess::coordinator("c2", &meta_url, "memory://", &storage, &[], dir.path());
    let (mut a, mut b) = (c1.client().await, c2.client().await);
    wait_all_active(&a, 3).await;
    create_tenant(&mut a, "grow", 1).await;
    for i in 0..100 {
        put(
            &mut a,
            "grow",
            &format!("k{i}"),
            &format!("{i}"),
            Consistency::All,
        )
        .await
        .expect("write at RF 1");
    }
    let mut held = 0;
    for node in &storage {
        held += usize::from(stored(node, "grow", "k0").await.is_some());
    }
    assert_eq!(held, 1, "RF 1: one replica");

    let raised = a
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "grow".into(),
            replication_factor: 3,
        })
        .await
        .expect("raise")
        .into_inner();
    assert_eq!(
        (raised.old_replication_factor, raised.new_replication_factor),
        (1, 3)
    );
    assert!(!raised.migration_id.is_empty());
    // Writes go to the union of old and new replicas from the moment the change is accepted;
    // only the old replica's ack counts (reads still use RF 1).
    let during = put(&mut a, "grow", "during", "\"d\"", Consistency::All)
        .await
        .expect("write during the change");
    assert_eq!(during.replica_count, 1, "counted: the old replica only");
    for node in &storage {
        eventually(
            "the write during the change reaches old and new replicas",
            Duration::from_secs(10),
            || async { stored(node, "grow", "during").await.is_some() },
        )
        .await;
    }
    for i in 0..20 {
        put(
            &mut b,
            "grow",
            &format!("late{i}"),
            "\"late\"",
            Consistency::One,
        )
        .await
        .expect("write during the change");
    }
    wait_migration(&a, &raised.migration_id, pb::MigrationState::Completed).await;
    let m = a
        .get_migration_status(pb::GetMigrationStatusRequest {
            migration_id: raised.migration_id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(m.r#type(), pb::MigrationType::ReplicationFactorChange);
    assert!(m.keys_migrated >= 100, "{m:?}");
    assert!(
        m.bytes_migrated > m.keys_migrated,
        "bytes sent are recorded: {m:?}"
    );

    for node in &storage {
        for i in 0..100 {
            let (v, _) = stored(node, "grow", &format!("k{i}"))
                .await
                .unwrap_or_else(|| panic!("k{i} missing on {}", node.id));
            assert_eq!(v, format!("{i}"));
        }
        for i in 0..20 {
            assert!(
                stored(node, "grow", &format!("late{i}")).await.is_some(),
                "late{i} missing on {}",
                node.id
            );
        }
    }
    eventually(
        "the other coordinator sees RF 3",
        Duration::from_secs(10),
        || {
            let mut b = b.clone();
            async move {
                b.get_tenant(pb::GetTenantRequest {
                    tenant_id: "grow".into(),
                })
                .await
                .is_ok_and(|t| t.into_inner().replication_factor == 3)
            }
        },
    )
    .await;
    for i in 0..100 {
        assert_eq!(
            get(&mut b, "grow", &format!("k{i}"), Consistency::All)
                .await
                .expect("read at ALL after the change"),
            format!("{i}")
        );
    }
}

/// While a tenant's RF is being raised, reads still use the old replicas, so a write must not be
/// acknowledged on the strength of new replicas alone: with the key's only old replica dead, a
/// write at ONE fails even though its new replica took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_raise_only_old_replicas_count() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut storage, _c1, mut c) = one_coordinator(dir.path(), &[]).await;
    create_tenant(&mut c, "grow", 1).await;
    put(&mut c, "grow", "k", "\"old\"", Consistency::All)
        .await
        .expect("write at RF 1");
    let mut old = None;
    for (i, node) in storage.iter().enumerate() {
        if stored(node, "grow", "k").await.is_some() {
            old = Some(i);
        }
    }
    let old = old.expect("RF 1: one replica holds k");

    c.update_replication_factor(pb::UpdateReplicationFactorRequest {
        tenant_id: "grow".into(),
        replication_factor: 2,
    })
    .await
    .expect("raise");
    storage[old].kill9();
    let refused = put(&mut c, "grow", "k", "\"new\"", Consistency::One)
        .await
        .expect_err("the new replica's ack alone must not count");
    assert_eq!(code(&refused), ErrorCode::QuorumNotReached, "{refused:?}");
    let mut new_replicas = 0;
    for (i, node) in storage.iter().enumerate() {
        if i != old && stored(node, "grow", "k").await.is_some() {
            new_replicas += 1;
        }
    }
    assert_eq!(new_replicas, 1, "the write did reach the new replica");
}

/// An RF change whose copy meets a node that is down (restarting) copies from it again once it
/// is back, instead of failing the change (it used to fail at the first connection error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rf_raise_copies_again_from_a_node_that_restarted() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let fast = [("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500")];
    let (mut storage, _c1, mut c) = one_coordinator(dir.path(), &fast).await;
    let keys = tenant_with_keys(&mut c, "grow", 1, 60, "\"v\"").await;
    let raised = change_rf(&mut c, "grow", 3).await;
    // The copy starts 2 x 500 ms + 1 s after the change was accepted: it meets a dead node.
    storage[0].kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let meanwhile = common::coord::migration(&mut c, &raised.migration_id).await;
    assert_eq!(
        meanwhile.state(),
        pb::MigrationState::InProgress,
        "{meanwhile:?}"
    );
    storage[0].restart();
    wait_migration(&c, &raised.migration_id, pb::MigrationState::Completed).await;
    for node in &storage {
        for key in &keys {
            assert!(
                stored(node, "grow", key).await.is_some(),
                "{} holds grow/{key} at RF 3",
                node.id
            );
        }
    }
}

/// Lowering RF 3 -> 1 after a QUORUM write that reached only replicas 2 and 3 (hints off, so
/// nothing else brings it to replica 1): the change brings the newest version to the replica
/// that stays before reads use it, so a read at the new RF returns the newest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_rf_keeps_writes_that_missed_the_remaining_replica() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hints_off = [("PAIRDB_COORDINATOR_HINTS_ENABLED", "false")];
    let (mut storage, _c1, mut c) = one_coordinator(dir.path(), &hints_off).await;
    let keys = tenant_with_keys(&mut c, "shrink", 3, 20, "\"v1\"").await;
    // The replica that stays at RF 1 is the first owner; pick the node that is first for k0
    // and use every key it is first for.
    let members: Vec<&common::StorageNode> = storage.iter().collect();
    let ring = listed_ring(&mut c, &members).await;
    let first = |key: &str| {
        ring.natural_owners(pairdb::ring::key_position("shrink", key.as_bytes()), 1)[0]
            .as_str()
            .to_owned()
    };
    let stays = first("k0");
    let keys: Vec<&String> = keys.iter().filter(|k| first(k) == stays).collect();
    let at = storage
        .iter()
        .position(|n| n.id == stays)
        .expect("a member");

    storage[at].kill9();
    for key in &keys {
        put(&mut c, "shrink", key, "\"v2\"", Consistency::Quorum)
            .await
            .expect("quorum of replicas 2 and 3");
    }
    storage[at].restart();
    wait_all_active(&c, 3).await;
    assert_eq!(
        stored(&storage[at], "shrink", keys[0])
            .await
            .map(|(v, _)| v),
        Some("\"v1\"".to_owned()),
        "the staying replica missed v2"
    );

    let lowered = change_rf(&mut c, "shrink", 1).await;
    assert!(!lowered.migration_id.is_empty(), "lowering is a migration");
    wait_migration(&c, &lowered.migration_id, pb::MigrationState::Completed).await;
    eventually("the new RF is in use", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.get_tenant(pb::GetTenantRequest {
                tenant_id: "shrink".into(),
            })
            .await
            .is_ok_and(|t| t.into_inner().replication_factor == 1)
        }
    })
    .await;
    for key in &keys {
        let read = get(&mut c, "shrink", key, Consistency::One)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert_eq!(read, "\"v2\"", "{key} at RF 1");
    }
}

/// The key-value stream gateways use: answers find their calls by id under concurrency, errors
/// carry their codes, and a call outlives neither its deadline nor the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_stream_answers_each_call_by_id() {
    use pairdb::mux::{MuxError, MuxStream};
    use pb::key_value_call::Call;
    use pb::key_value_result::Result as Answer;

    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, mut c1, c) = one_coordinator(dir.path(), &[]).await;
    let client = c.clone();
    let stream =
        MuxStream::open(|calls| async move { client.clone().key_value_stream(calls).await })
            .await
            .expect("open the stream");
    let timeout = Duration::from_secs(5);
    let call = |call: Call| {
        let stream = stream.clone();
        async move {
            stream
                .call(
                    |id| pb::KeyValueCall {
                        id,
                        request_id: String::new(),
                        call: Some(call),
                    },
                    timeout,
                )
                .await
                .map(|r| r.result.expect("an answer"))
        }
    };
    let writes = (0..50).map(|i| {
        call(Call::Write(pb::WriteKeyValueRequest {
            tenant_id: "acme".into(),
            key: format!("k{i}").into_bytes().into(),
            value: format!("{i}").into_bytes().into(),
            consistency: Consistency::All as i32,
            ..Default::default()
        }))
    });
    for answer in futures::future::join_all(writes).await {
        match answer.expect("write") {
            Answer::Write(w) => assert_eq!(w.replica_count, 3),
            other => panic!("not a write answer: {other:?}"),
        }
    }
    let reads = (0..50).rev().map(|i| {
        let read = call(Call::Read(pb::ReadKeyValueRequest {
            tenant_id: "acme".into(),
            key: format!("k{i}").into_bytes().into(),
            consistency: Consistency::Quorum as i32,
        }));
        async move { (i, read.await) }
    });
    for (i, answer) in futures::future::join_all(reads).await {
        match answer.expect("read") {
            Answer::Read(r) => assert_eq!(r.value, format!("{i}").into_bytes(), "k{i}"),
            other => panic!("not a read answer: {other:?}"),
        }
    }
    let missing = call(Call::Read(pb::ReadKeyValueRequest {
        tenant_id: "acme".into(),
        key: b"absent".to_vec().into(),
        consistency: Consistency::One as i32,
    }))
    .await;
    assert!(
        matches!(&missing, Ok(Answer::Error(d)) if d.code() == ErrorCode::KeyNotFound),
        "{missing:?}"
    );
    let empty = stream
        .call(
            |id| pb::KeyValueCall {
                id,
                call: None,
                request_id: String::new(),
            },
            timeout,
        )
        .await
        .expect("answered")
        .result;
    assert!(
        matches!(&empty, Some(Answer::Error(d)) if d.code() == ErrorCode::InvalidRequest),
        "{empty:?}"
    );

    // A hung coordinator: the deadline answers. Killed while a call waits: the call learns
    // that the stream broke, and later calls that it is closed.
    let read_one = |key: &str| {
        let call = Call::Read(pb::ReadKeyValueRequest {
            tenant_id: "acme".into(),
            key: key.as_bytes().to_vec().into(),
            consistency: Consistency::One as i32,
        });
        move |id| pb::KeyValueCall {
            id,
            request_id: String::new(),
            call: Some(call),
        }
    };
    c1.pause();
    let hung = stream
        .call(read_one("k1"), Duration::from_millis(300))
        .await;
    assert_eq!(hung.err(), Some(MuxError::TimedOut));
    let waiting = {
        let (stream, call) = (stream.clone(), read_one("k2"));
        tokio::spawn(async move { stream.call(call, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c1.kill9();
    let broken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered before its deadline")
        .expect("task");
    assert_eq!(broken.err(), Some(MuxError::Broken));
    eventually("the stream is closed", Duration::from_secs(5), || {
        let open = stream.is_open();
        async move { !open }
    })
    .await;
    let closed = stream
        .call(
            |id| pb::KeyValueCall {
                id,
                call: None,
                request_id: String::new(),
            },
            timeout,
        )
        .await;
    assert_eq!(closed.err(), Some(MuxError::Closed));
}
