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
    eventually, gossip_reports, node_state, sqlite_url, stored, stored_record, wait_all_active,
    wait_migration,
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
    // s3 comes back with the old records. Gossip calls it down first: a verdict landing after
    // the restart would have reads skip s3 for a moment (the reads at ALL below would fail).
    gossip_reports(&c1, "down", 1).await;
    storage[2].restart();
    eventually("s3 active again", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;
    gossip_reports(&c1, "down", 0).await;

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

/// Three storage nodes, coordinator `c1` (refreshing as usual) behind gateway `gw1`, and one
/// coordinator per name in `lagging` that refreshes every 10 minutes (as one cut from the
/// metadata store or paused would), each behind its own gateway. Everything stops on drop.
struct Lagging {
    storage: Vec<common::StorageNode>,
    /// (coordinator, its gateway), one per lagging name.
    lagging: Vec<(RoleProcess, RoleProcess)>,
    url1: String,
    _c1: RoleProcess,
    _gw1: RoleProcess,
    _dir: tempfile::TempDir,
}

impl Lagging {
    async fn start(lagging: &[&str]) -> Lagging {
        let dir = tempfile::tempdir().unwrap();
        let storage = common::cluster::start_storage(3, dir.path());
        let meta = sqlite_url(dir.path());
        let env = [("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
        let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &env, dir.path());
        let gw1 = RoleProcess::gateway("gw1", &[&c1], &["--auth=none"], &[], dir.path());
        wait_all_active(&c1.client().await, 3).await;
        let slow = [
            ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
            ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "600000"),
        ];
        let mut started = Vec::new();
        for name in lagging {
            let c = RoleProcess::coordinator(name, &meta, "memory://", &storage, &slow, dir.path());
            wait_all_active(&c.client().await, 3).await;
            let gw = RoleProcess::gateway(
                &format!("gw-{name}"),
                &[&c],
                &["--auth=none"],
                &[],
                dir.path(),
            );
            started.push((c, gw));
        }
        Lagging {
            storage,
            lagging: started,
            url1: gw1.url(),
            _c1: c1,
            _gw1: gw1,
            _dir: dir,
        }
    }

    /// The gateway URL of the `i`-th lagging coordinator.
    fn url(&self, i: usize) -> String {
        self.lagging[i].1.url()
    }

    /// Creates acme through `c1`; `false` while the re-creation guard refuses it.
    async fn create(&self) -> bool {
        let (s, _) = call(
            Method::POST,
            format!("{}/v1/tenants", self.url1),
            None,
            Some(json!({"tenant_id": "acme"})),
        )
        .await;
        s == 200
    }

    /// Deletes acme through `c1`.
    async fn delete(&self) {
        let (s, b) = call(
            Method::DELETE,
            format!("{}/v1/tenants/acme", self.url1),
            None,
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }

    /// Creates acme again, as soon as the re-creation guard lets it.
    async fn recreate(&self) {
        eventually("acme created again", Duration::from_secs(15), || {
            self.create()
        })
        .await;
    }
}

/// Writes `value` to key `k` of acme through `url` at `level`.
async fn put(url: &str, value: &str, level: &str) -> (u16, Value) {
    call(
        Method::POST,
        format!("{url}/v1/key-value"),
        None,
        Some(json!({"key": "k", "value": value, "consistency": level})),
    )
    .await
}

/// Reads key `k` of acme through `url` at `level`.
async fn get(url: &str, level: &str) -> (u16, Value) {
    call(
        Method::GET,
        format!("{url}/v1/key-value?key=k&consistency={level}"),
        None,
        None,
    )
    .await
}

/// A coordinator that misses its metadata refreshes still holds the deleted incarnation in its
/// cache when the id is created again. Its writes must not be acknowledged into the dead
/// namespace: the storage nodes fenced it at the delete and refuse them, the coordinator drops
/// its cached tenant and answers 503 (retry), and the retry lands in the new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_that_missed_the_delete_cannot_acknowledge_into_the_dead_incarnation() {
    let c = Lagging::start(&["c2"]).await;
    let url2 = c.url(0);
    assert!(c.create().await);
    // c2 caches incarnation 1 with its first write.
    let (s, b) = put(&url2, "old", "quorum").await;
    assert_eq!(s, 200, "{b}");
    c.delete().await;
    c.recreate().await;

    // c2 still serves incarnation 1 from its cache: the replicas refuse the write.
    let (s, b) = put(&url2, "new", "quorum").await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "a write into the dead incarnation must not be acknowledged: {b}"
    );
    // Its retry writes the new incarnation, and every coordinator reads it there.
    let (s, b) = put(&url2, "new", "quorum").await;
    assert_eq!(s, 200, "{b}");
    for url in [&c.url1, &url2] {
        let (s, b) = get(url, "all").await;
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
    let mut c = Lagging::start(&["c2", "c3"]).await;
    let (url2, url3) = (c.url(0), c.url(1));
    assert!(c.create().await);
    // c2 and c3 cache incarnation 1.
    let (s, b) = put(&url2, "old", "all").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = get(&url3, "one").await;
    assert_eq!((s, b["value"].as_str()), (200, Some("old")), "{b}");

    // s3 is down during the delete and the re-creation.
    c.storage[2].terminate();
    c.delete().await;
    c.recreate().await;

    // s3 comes back; s1 and s2 go: s3 is the only replica c2 and c3 can reach.
    c.storage[2].restart();
    for (coordinator, _) in &c.lagging {
        let admin = coordinator.client().await;
        eventually("s3 seen again", Duration::from_secs(30), || {
            let mut admin = admin.clone();
            async move { node_state(&mut admin, "s3").await == Some(WireState::Active) }
        })
        .await;
    }
    c.storage[0].terminate();
    c.storage[1].terminate();

    // c3 reads at ONE: s3 still holds the predecessor's record, which must not be served.
    let (s, b) = get(&url3, "one").await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "the dead incarnation's record must not be served: {b}"
    );
    let (s, b) = put(&url2, "new", "one").await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "a write into the dead incarnation must not be acknowledged: {b}"
    );
    // The retry writes the new incarnation, on s3.
    let (s, b) = put(&url2, "new", "one").await;
    assert_eq!(s, 200, "{b}");
    let s3 = &c.storage[2];
    assert_eq!(
        stored(s3, "acme:2", "k").await.map(|v| v.0).as_deref(),
        Some("\"new\"")
    );
    assert_ne!(
        stored(s3, "acme", "k").await.map(|v| v.0).as_deref(),
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
    let c = Lagging::start(&["c2", "c3", "c4"]).await;
    assert!(c.create().await);
    let (s, b) = put(&c.url1, "old", "all").await;
    assert_eq!(s, 200, "{b}");
    // Each lagging coordinator caches the tenant with a read of the key.
    for i in 0..3 {
        let (s, b) = get(&c.url(i), "quorum").await;
        assert_eq!((s, b["value"].as_str()), (200, Some("old")), "{i}: {b}");
    }

    c.delete().await;
    let requests = [
        (Method::GET, "/v1/key-value?key=k&consistency=one", None),
        (Method::GET, "/v1/key-value?prefix=&consistency=one", None),
        (
            Method::POST,
            "/v1/key-value",
            Some(json!({"key": "k", "value": "late", "consistency": "one"})),
        ),
    ];
    for (i, (method, path, body)) in requests.into_iter().enumerate() {
        let (s, b) = call(method.clone(), format!("{}{path}", c.url(i)), None, body).await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (404, Some("TENANT_NOT_FOUND")),
            "{method} {path} through a coordinator with a stale cache: {b}"
        );
    }
}
