//! Tenant deletion and re-creation over real processes (three storage nodes, a coordinator, a
//! gateway), with storage node s3 stopped during the delete and started again after the
//! re-creation: the deleted tenant stops answering at once, its records go from the nodes that
//! were up at once and from s3 once it is back, and the new incarnation of the id never
//! serves, repairs or replicates anything of its predecessor, nor replays its idempotency keys.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::time::Duration;

use common::cluster::RoleProcess;
use common::coord::{
    eventually, node_state, sqlite_url, stored, stored_record, wait_all_active, wait_migration,
};
use pairdb::rpc::common::NodeState as WireState;
use pairdb::rpc::coordinator as pb;
use reqwest::Method;
use serde_json::{Value, json};

const KEYS: usize = 50;

async fn call(
    method: Method,
    url: String,
    idem: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = common::http_client()
        .request(method, url)
        .header("X-Tenant-ID", "acme");
    if let Some(key) = idem {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http call");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_tenant_is_gone_everywhere_and_its_successor_sees_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = common::cluster::start_storage(3, dir.path());
    let env = [("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &env,
        dir.path(),
    );
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());
    let c = c1.client().await;
    wait_all_active(&c, 3).await;
    let url = gw.url();
    let kv = format!("{url}/v1/key-value");

    let (s, b) = call(
        Method::POST,
        format!("{url}/v1/tenants"),
        None,
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    for i in 0..KEYS {
        let idem = (i == 0).then_some("idem-1");
        let body = json!({"key": format!("k{i}"), "value": "old", "consistency": "all"});
        let (s, b) = call(Method::POST, kv.clone(), idem, Some(body)).await;
        assert_eq!(s, 200, "{b}");
    }
    assert!(stored(&storage[2], "acme", "k1").await.is_some());

    // s3 is down during the delete.
    storage[2].terminate();
    let (s, b) = call(Method::DELETE, format!("{url}/v1/tenants/acme"), None, None).await;
    assert_eq!((s, b["deleted"].as_bool()), (200, Some(true)), "{b}");
    let (s, b) = call(Method::GET, format!("{kv}?key=k1"), None, None).await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (404, Some("TENANT_NOT_FOUND")),
        "{b}"
    );
    let (s, b) = call(Method::DELETE, format!("{url}/v1/tenants/acme"), None, None).await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (404, Some("TENANT_NOT_FOUND")),
        "{b}"
    );
    let (_, listed) = call(Method::GET, format!("{url}/v1/tenants"), None, None).await;
    assert_eq!(listed["tenants"], json!([]), "{listed}");
    // The nodes that were up hold nothing of it: a range delete, no tombstones.
    for node in &storage[..2] {
        for i in 0..KEYS {
            assert_eq!(
                stored_record(node, "acme", &format!("k{i}")).await,
                None,
                "{} k{i}",
                node.id
            );
        }
    }

    // The id again: a new incarnation (refused for a moment after the delete).
    eventually("acme created again", Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            let (s, _) = call(
                Method::POST,
                format!("{url}/v1/tenants"),
                None,
                Some(json!({"tenant_id": "acme"})),
            )
            .await;
            s == 200
        }
    })
    .await;
    // s3 comes back with the old records.
    storage[2].restart();
    eventually("s3 active again", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;

    // Nothing of the predecessor is served, at any consistency.
    for level in ["one", "quorum", "all"] {
        let (s, b) = call(
            Method::GET,
            format!("{kv}?key=k1&consistency={level}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (404, Some("KEY_NOT_FOUND")),
            "{level}: {b}"
        );
    }
    // Its idempotency keys are not replayed: the same key writes anew.
    let (s, b) = call(
        Method::POST,
        kv.clone(),
        Some("idem-1"),
        Some(json!({"key": "k0", "value": "new"})),
    )
    .await;
    assert_eq!((s, b["is_duplicate"].as_bool()), (200, Some(false)), "{b}");
    let (s, b) = call(Method::GET, format!("{kv}?key=k0"), None, None).await;
    assert_eq!((s, b["value"].as_str()), (200, Some("new")), "{b}");

    // A repair of everything does not bring the old records back to s1 and s2.
    let mut admin = c.clone();
    let accepted = admin
        .start_repair(pb::StartRepairRequest::default())
        .await
        .expect("start repair")
        .into_inner();
    wait_migration(&c, &accepted.repair_id, pb::MigrationState::Completed).await;
    for node in &storage[..2] {
        assert_eq!(stored_record(node, "acme", "k1").await, None, "{}", node.id);
    }
    // And the purge loop takes them from s3 (a pass every 10 metadata refreshes: 5 s here).
    eventually(
        "s3 purged of the deleted incarnation",
        Duration::from_secs(30),
        || {
            let s3 = &storage[2];
            async move {
                for i in 0..KEYS {
                    if stored_record(s3, "acme", &format!("k{i}")).await.is_some() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    // The new incarnation's record is where it belongs, in its own namespace.
    assert_eq!(
        stored(&storage[0], "acme:2", "k0")
            .await
            .map(|v| v.0)
            .as_deref(),
        Some("\"new\"")
    );
}

/// A coordinator that misses its metadata refreshes (here: one that refreshes every 10
/// minutes, as one cut from the store or paused would) still holds the deleted incarnation in
/// its cache when the id is created again. Its writes must not be acknowledged into the dead
/// namespace: the storage nodes fenced it at the delete and refuse them, the coordinator drops
/// its cached tenant and answers 503 (retry), and the retry lands in the new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_that_missed_the_delete_cannot_acknowledge_into_the_dead_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let storage = common::cluster::start_storage(3, dir.path());
    let meta = sqlite_url(dir.path());
    let env = [("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &env, dir.path());
    let lagging = [
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
        ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "600000"),
    ];
    let c2 = RoleProcess::coordinator("c2", &meta, "memory://", &storage, &lagging, dir.path());
    let gw1 = RoleProcess::gateway("gw1", &[&c1], &["--auth=none"], &[], dir.path());
    let gw2 = RoleProcess::gateway("gw2", &[&c2], &["--auth=none"], &[], dir.path());
    wait_all_active(&c1.client().await, 3).await;
    wait_all_active(&c2.client().await, 3).await;
    let (url1, url2) = (gw1.url(), gw2.url());

    let (s, b) = call(
        Method::POST,
        format!("{url1}/v1/tenants"),
        None,
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // c2 caches incarnation 1 with its first write.
    let put = |url: String, value: &'static str| async move {
        call(
            Method::POST,
            format!("{url}/v1/key-value"),
            None,
            Some(json!({"key": "k", "value": value, "consistency": "quorum"})),
        )
        .await
    };
    let (s, b) = put(url2.clone(), "old").await;
    assert_eq!(s, 200, "{b}");

    let (s, b) = call(
        Method::DELETE,
        format!("{url1}/v1/tenants/acme"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    eventually("acme created again", Duration::from_secs(15), || {
        let url1 = url1.clone();
        async move {
            let (s, _) = call(
                Method::POST,
                format!("{url1}/v1/tenants"),
                None,
                Some(json!({"tenant_id": "acme"})),
            )
            .await;
            s == 200
        }
    })
    .await;

    // c2 still serves incarnation 1 from its cache: the replicas refuse the write.
    let (s, b) = put(url2.clone(), "new").await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "a write into the dead incarnation must not be acknowledged: {b}"
    );
    // Its retry writes the new incarnation, and every coordinator reads it there.
    let (s, b) = put(url2.clone(), "new").await;
    assert_eq!(s, 200, "{b}");
    for url in [&url1, &url2] {
        let (s, b) = call(
            Method::GET,
            format!("{url}/v1/key-value?key=k&consistency=all"),
            None,
            None,
        )
        .await;
        assert_eq!((s, b["value"].as_str()), (200, Some("new")), "{url}: {b}");
    }
}

/// The case the storage fence alone misses: s3 is down during the delete, so it never fenced
/// the dead namespace, and coordinators whose caches still hold the deleted incarnation (they
/// refresh every 10 minutes) read and write at ONE while s3 is the only replica up. s3 must
/// not serve either before it learned the delete: a node that starts refuses client reads and
/// writes until a coordinator sends it the deleted tenants read from the store, which the
/// coordinator does at once; the read and the write are then refused as the dead
/// incarnation's (503, retry), and the retried write lands in the new incarnation on s3.
/// Acknowledged into the dead namespace, it would have been purged later: acknowledged, then
/// lost; served, the predecessor's record would have reached the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_during_the_delete_serves_nothing_of_the_dead_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = common::cluster::start_storage(3, dir.path());
    let meta = sqlite_url(dir.path());
    let env = [("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &env, dir.path());
    let lagging = [
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
        ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "600000"),
    ];
    let c2 = RoleProcess::coordinator("c2", &meta, "memory://", &storage, &lagging, dir.path());
    let c3 = RoleProcess::coordinator("c3", &meta, "memory://", &storage, &lagging, dir.path());
    let gw1 = RoleProcess::gateway("gw1", &[&c1], &["--auth=none"], &[], dir.path());
    let gw2 = RoleProcess::gateway("gw2", &[&c2], &["--auth=none"], &[], dir.path());
    let gw3 = RoleProcess::gateway("gw3", &[&c3], &["--auth=none"], &[], dir.path());
    let c2_admin = c2.client().await;
    let c3_admin = c3.client().await;
    wait_all_active(&c1.client().await, 3).await;
    wait_all_active(&c2_admin, 3).await;
    wait_all_active(&c3_admin, 3).await;
    let (url1, url2, url3) = (gw1.url(), gw2.url(), gw3.url());
    let get_one = |url: String| async move {
        call(
            Method::GET,
            format!("{url}/v1/key-value?key=k&consistency=one"),
            None,
            None,
        )
        .await
    };
    let put = |url: String, value: &'static str, level: &'static str| async move {
        call(
            Method::POST,
            format!("{url}/v1/key-value"),
            None,
            Some(json!({"key": "k", "value": value, "consistency": level})),
        )
        .await
    };

    let (s, b) = call(
        Method::POST,
        format!("{url1}/v1/tenants"),
        None,
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // c2 and c3 cache incarnation 1.
    let (s, b) = put(url2.clone(), "old", "all").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = get_one(url3.clone()).await;
    assert_eq!((s, b["value"].as_str()), (200, Some("old")), "{b}");

    // s3 is down during the delete and the re-creation.
    storage[2].terminate();
    let (s, b) = call(
        Method::DELETE,
        format!("{url1}/v1/tenants/acme"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    eventually("acme created again", Duration::from_secs(15), || {
        let url1 = url1.clone();
        async move {
            let (s, _) = call(
                Method::POST,
                format!("{url1}/v1/tenants"),
                None,
                Some(json!({"tenant_id": "acme"})),
            )
            .await;
            s == 200
        }
    })
    .await;

    // s3 comes back; s1 and s2 go: s3 is the only replica c2 can write.
    storage[2].restart();
    for admin in [&c2_admin, &c3_admin] {
        eventually("s3 seen again", Duration::from_secs(30), || {
            let mut c = admin.clone();
            async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
        })
        .await;
    }
    storage[0].terminate();
    storage[1].terminate();

    // c3 reads at ONE: s3 still holds the predecessor's record, which must not be served.
    let (s, b) = get_one(url3.clone()).await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "the dead incarnation's record must not be served: {b}"
    );

    let (s, b) = put(url2.clone(), "new", "one").await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "a write into the dead incarnation must not be acknowledged: {b}"
    );
    // The retry writes the new incarnation, on s3.
    let (s, b) = put(url2.clone(), "new", "one").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        stored(&storage[2], "acme:2", "k")
            .await
            .map(|v| v.0)
            .as_deref(),
        Some("\"new\"")
    );
    assert_ne!(
        stored(&storage[2], "acme", "k")
            .await
            .map(|v| v.0)
            .as_deref(),
        Some("\"new\""),
        "nothing was written into the dead incarnation"
    );
}

/// "The tenant stops accepting requests at once", on every coordinator: three coordinators
/// that refresh every 10 minutes hold the tenant in their caches when another deletes it. The
/// nodes the delete reached answer reads, listings and writes of the dead namespace as the
/// deleted tenant's, so each of them answers 404 TENANT_NOT_FOUND right away, not the
/// predecessor's data and not a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_coordinator_stops_serving_a_deleted_tenant_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = common::cluster::start_storage(3, dir.path());
    let meta = sqlite_url(dir.path());
    let env = [("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
    let lagging = [
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
        ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "600000"),
    ];
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &env, dir.path());
    let gw1 = RoleProcess::gateway("gw1", &[&c1], &["--auth=none"], &[], dir.path());
    wait_all_active(&c1.client().await, 3).await;
    let url1 = gw1.url();
    let (s, b) = call(
        Method::POST,
        format!("{url1}/v1/tenants"),
        None,
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = call(
        Method::POST,
        format!("{url1}/v1/key-value"),
        None,
        Some(json!({"key": "k", "value": "old", "consistency": "all"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    let mut lagging_gateways = Vec::new();
    let mut keep = Vec::new();
    for name in ["c2", "c3", "c4"] {
        let c = RoleProcess::coordinator(name, &meta, "memory://", &storage, &lagging, dir.path());
        wait_all_active(&c.client().await, 3).await;
        let gw = RoleProcess::gateway(
            &format!("gw-{name}"),
            &[&c],
            &["--auth=none"],
            &[],
            dir.path(),
        );
        // Each caches the tenant with a read of the key.
        let (s, b) = call(
            Method::GET,
            format!("{}/v1/key-value?key=k", gw.url()),
            None,
            None,
        )
        .await;
        assert_eq!((s, b["value"].as_str()), (200, Some("old")), "{name}: {b}");
        lagging_gateways.push(gw.url());
        keep.push((c, gw));
    }

    let (s, b) = call(
        Method::DELETE,
        format!("{url1}/v1/tenants/acme"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let requests = [
        (Method::GET, "/v1/key-value?key=k&consistency=one", None),
        (Method::GET, "/v1/key-value?prefix=&consistency=one", None),
        (
            Method::POST,
            "/v1/key-value",
            Some(json!({"key": "k", "value": "late", "consistency": "one"})),
        ),
    ];
    for (url, (method, path, body)) in lagging_gateways.iter().zip(requests) {
        let (s, b) = call(method.clone(), format!("{url}{path}"), None, body).await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (404, Some("TENANT_NOT_FOUND")),
            "{method} {path} through a coordinator with a stale cache: {b}"
        );
    }
}
