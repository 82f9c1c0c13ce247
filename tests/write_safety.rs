//! Writes that no client, clock skew or retry can corrupt, over real processes (storage nodes,
//! coordinators and gateways started from the `pairdb` binary; SQLite metadata, Redis where
//! coordinators must share idempotency keys, libfaketime for a skewed clock):
//!
//! - a client context with a huge counter is refused (400) and harms no later request, while a
//!   key poisoned before the bound existed stays writable;
//! - blind writes through a coordinator whose clock is seconds behind still win when they come
//!   later;
//! - a call lost after it was sent is OUTCOME_UNKNOWN (never sent twice), and with an
//!   Idempotency-Key it is resent and written once;
//! - identical idempotent requests racing on two coordinators with a shared Redis write once;
//! - a write behind a dead holder's idempotency lock gives up within the request timeout and
//!   never lands later;
//! - a later blind write wins over a peer whose clock ran 45 s fast while its own runs 45 s
//!   slow (counters 90 s ahead, beyond `max_clock_skew`, but honest);
//! - SIGTERM stores every queued hint before the coordinator exits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::backends::{Redis, libfaketime, skip_or_fail};
use common::cluster::{RoleProcess, start_storage};
use common::coord::{
    Client, create_tenant, get, one_coordinator, put, put_idem, sqlite_url, wait_all_active,
};
use pairdb::idempotency::{Claim, IdempotencyStore, LOCK_TTL, RedisIdempotencyStore, store_key};
use pairdb::meta::{MetadataStore, SqlMetadataStore};
use pairdb::rpc::common::Consistency;
use pairdb::rpc::coordinator as pb;
use pairdb::rpc::storage as spb;
use pairdb::vclock::{VectorClock, Version, counter_bound, physical_counter};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One test at a time: each starts several processes on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn http(
    method: reqwest::Method,
    url: &str,
    tenant: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = pairdb::tools::client::http_builder(None)
        .expect("http client")
        .build()
        .expect("http client")
        .request(method, url)
        .timeout(Duration::from_secs(30))
        .header("x-tenant-id", tenant);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(b) = body {
        request = request
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn put_http(
    gw: &RoleProcess,
    tenant: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let url = format!("{}/v1/key-value", gw.url());
    http(reqwest::Method::POST, &url, tenant, headers, Some(&body)).await
}

async fn get_http(gw: &RoleProcess, tenant: &str, key: &str) -> (StatusCode, Value) {
    let url = format!("{}/v1/key-value?key={key}&consistency=all", gw.url());
    http(reqwest::Method::GET, &url, tenant, &[], None).await
}

fn now_ms() -> u64 {
    pairdb::wallclock::now_ms()
}

/// The counter of `id` in a JSON vector clock.
fn counter(clock: &Value, id: &str) -> u64 {
    clock[id].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_context_is_refused_and_harms_no_one() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, _c) =
        one_coordinator(3, dir.path(), "memory://", &[("acme", 3), ("globex", 3)]).await;
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());

    // A key poisoned before the bound existed: every replica holds a version whose counter lies
    // decades ahead (written straight to the storage nodes, as an old coordinator would have).
    let poison = 1u64 << 62;
    let record = spb::Record {
        tenant_id: "acme".into(),
        key: b"poisoned".to_vec().into(),
        version: Some((&Version::new(VectorClock::from_entries([("z", poison)]))).into()),
        payload: Some(spb::record::Payload::Value(b"\"old\"".to_vec().into())),
        ring_hash: 0,
        expires_at_ms: 0,
    };
    for node in &storage {
        node.client()
            .await
            .write_batch(spb::WriteBatchRequest {
                ring_epoch: 0,
                records: vec![record.clone()],
                source: spb::BatchSource::Repair as i32,
                ring_digest: 0,
            })
            .await
            .expect("poison a replica");
    }

    // Storage nodes store such a version but log and count it.
    let metrics = common::http_get(storage[0].http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pairdb_storage_versions_far_ahead_total")
                && l.contains("BATCH_SOURCE_REPAIR")),
        "{metrics}"
    );

    // The request that used to break the coordinator for everyone: 400 naming the field...
    for huge in [i64::MAX as u64, poison] {
        let (s, b) = put_http(
            &gw,
            "acme",
            json!({"key": "k", "value": 1, "context": {"z": huge}}),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert_eq!(b["error_code"], "INVALID_REQUEST", "{b}");
        assert!(
            b["message"].as_str().is_some_and(|m| m.contains("context")),
            "{b}"
        );
        // ... nothing written ...
        let (s, _) = get_http(&gw, "acme", "k").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // ... and another tenant's write right after it is served, with a sane clock.
        let (s, b) = put_http(&gw, "globex", json!({"key": "g", "value": 2}), &[]).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let own = counter(&b["vector_clock"], "c1");
        assert!(
            own <= counter_bound(now_ms(), 60_000),
            "the clock was pushed ahead: {b}"
        );
        assert!(own >= physical_counter(now_ms() - 60_000), "{b}");
    }

    // A context the replicas hold is the client's read: the poisoned key stays writable. The
    // new version dominates the old one; the coordinator's own entry stays at its clock.
    let (s, read) = get_http(&gw, "acme", "poisoned").await;
    assert_eq!(s, StatusCode::OK, "{read}");
    assert_eq!(counter(&read["vector_clock"], "z"), poison);
    // The coordinator saw the far-ahead version in the read answers and did not adopt it.
    let metrics = common::http_get(c1.http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pairdb_clock_far_ahead_total") && l.contains("replica")),
        "{metrics}"
    );
    let (s, b) = put_http(
        &gw,
        "acme",
        json!({"key": "poisoned", "value": "new", "context": read["vector_clock"]}),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(counter(&b["vector_clock"], "z"), poison);
    assert!(
        counter(&b["vector_clock"], "c1") <= counter_bound(now_ms(), 60_000),
        "{b}"
    );
    let (s, now) = get_http(&gw, "acme", "poisoned").await;
    assert_eq!(
        (s, now["value"].clone()),
        (StatusCode::OK, json!("new")),
        "{now}"
    );
    // Later blind writes are not dragged ahead either.
    let (s, b) = put_http(&gw, "acme", json!({"key": "after", "value": 3}), &[]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(
        counter(&b["vector_clock"], "c1") <= counter_bound(now_ms(), 60_000),
        "{b}"
    );
}

/// A coordinator whose wall clock runs `offset` off (libfaketime).
fn skewed_coordinator(
    id: &str,
    offset: &str,
    faketime: &str,
    storage: &[common::StorageNode],
    dir: &Path,
) -> RoleProcess {
    RoleProcess::skewed_coordinator(id, &sqlite_url(dir), offset, faketime, storage, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_writes_through_a_skewed_coordinator_still_win_when_later() {
    let _serial = SERIAL.lock().await;
    let Some(faketime) = libfaketime() else {
        skip_or_fail(
            "blind_writes_through_a_skewed_coordinator_still_win_when_later",
            "libfaketime (apt-get install faketime)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &[], dir.path());
    // c2's wall clock runs 5 s behind.
    let slow = skewed_coordinator("c2", "-5s", faketime, &storage, dir.path());
    let mut a = c1.client().await;
    let mut b = slow.client().await;
    wait_all_active(&a, 3).await;
    wait_all_active(&b, 3).await;
    create_tenant(&mut a, "acme", 3).await;
    // The skew is real: c2's first counter lies seconds behind c1's.
    let first_a = put(&mut a, "acme", "probe-a", "1", Consistency::Quorum)
        .await
        .expect("put");
    let first_b = put(&mut b, "acme", "probe-b", "1", Consistency::Quorum)
        .await
        .expect("put");
    let ts = |r: &pb::WriteKeyValueResponse| {
        Version::from(r.version.as_ref().expect("version")).timestamp_ms()
    };
    assert!(
        ts(&first_a) > ts(&first_b) + 3_000,
        "c2 is not behind: {} vs {}",
        ts(&first_a),
        ts(&first_b)
    );

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..100 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = format!("k{i}");
        let (first, second) = if seed & 1 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        put(first, "acme", &key, "\"A\"", Consistency::Quorum)
            .await
            .expect("write A");
        let written = put(second, "acme", &key, "\"B\"", Consistency::Quorum)
            .await
            .expect("write B");
        let read = a
            .read_key_value(pb::ReadKeyValueRequest {
                tenant_id: "acme".into(),
                key: key.as_bytes().to_vec().into(),
                consistency: Consistency::All as i32,
            })
            .await
            .expect("read at ALL")
            .into_inner();
        assert_eq!(
            &read.value[..],
            b"\"B\"" as &[u8],
            "round {i}: the later write B lost (second writer c{})",
            if seed & 1 == 0 { 2 } else { 1 }
        );
        assert_eq!(
            read.version, written.version,
            "round {i}: the response must carry the stored version"
        );
    }
}

/// Two coordinators sharing SQLite and one Redis, and a gateway in front of both.
struct Shared {
    _redis: Redis,
    dir: tempfile::TempDir,
    _storage: Vec<common::StorageNode>,
    coordinators: Vec<RoleProcess>,
}

fn shared_cluster(test: &str) -> Option<Shared> {
    let Some(redis) = Redis::start() else {
        skip_or_fail(test, "redis-server (apt-get install redis-server)");
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta = sqlite_url(dir.path());
    let idem = redis.url();
    let coordinators = ["c1", "c2"]
        .iter()
        .map(|id| RoleProcess::coordinator(id, &meta, &idem, &storage, &[], dir.path()))
        .collect();
    Some(Shared {
        _redis: redis,
        dir,
        _storage: storage,
        coordinators,
    })
}

/// Sends `n` writes at once through the gateway while `c1` hangs, then kills `c1`: the calls
/// that went to it are lost after they were sent. Returns each key with its answer.
async fn writes_lost_on_c1(
    cluster: &mut Shared,
    gw: &RoleProcess,
    prefix: &str,
    idempotent: bool,
) -> Vec<(String, StatusCode, Value)> {
    cluster.coordinators[0].pause();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let key = format!("{prefix}{i}");
            let url = gw.url();
            tokio::spawn(async move {
                let idem = format!("idem-{key}");
                let headers: Vec<(&str, &str)> = if idempotent {
                    vec![("idempotency-key", idem.as_str())]
                } else {
                    vec![]
                };
                let (s, b) = http(
                    reqwest::Method::POST,
                    &format!("{url}/v1/key-value"),
                    "acme",
                    &headers,
                    Some(&json!({"key": key, "value": i})),
                )
                .await;
                (key, s, b)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.coordinators[0].kill9();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_lost_after_it_was_sent_is_never_sent_twice() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = shared_cluster("a_call_lost_after_it_was_sent_is_never_sent_twice")
    else {
        return;
    };
    let mut c = cluster.coordinators[1].client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    let refs: Vec<&RoleProcess> = cluster.coordinators.iter().collect();
    let gw = RoleProcess::gateway("gw", &refs, &["--auth=none"], &[], cluster.dir.path());
    // Open the gateway's streams to both coordinators.
    for i in 0..6 {
        let (s, b) = put_http(
            &gw,
            "acme",
            json!({"key": format!("warm{i}"), "value": i}),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }

    // Without an Idempotency-Key: OUTCOME_UNKNOWN, and the write is not sent elsewhere (c1 hung
    // before it could run it, so nothing may be stored).
    let answers = writes_lost_on_c1(&mut cluster, &gw, "plain", false).await;
    let unknown: Vec<&String> = answers
        .iter()
        .filter(|(_, s, b)| {
            *s == StatusCode::SERVICE_UNAVAILABLE && b["error_code"] == "OUTCOME_UNKNOWN"
        })
        .map(|(k, _, _)| k)
        .collect();
    for (key, s, b) in &answers {
        assert!(
            *s == StatusCode::OK || unknown.contains(&key),
            "{key}: {s} {b}"
        );
    }
    assert!(
        !unknown.is_empty(),
        "no call went to the hung coordinator: {answers:?}"
    );
    for key in &unknown {
        let (s, b) = get_http(&gw, "acme", key).await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "{key} was sent a second time: {b}"
        );
    }

    // With an Idempotency-Key the lost calls go to c2 (same Redis) and are written once.
    cluster.coordinators[0].restart();
    for i in 0..6 {
        let (s, b) = put_http(
            &gw,
            "acme",
            json!({"key": format!("rewarm{i}"), "value": i}),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = writes_lost_on_c1(&mut cluster, &gw, "idem", true).await;
    for (key, s, b) in &answers {
        assert_eq!(*s, StatusCode::OK, "{key}: {b}");
        assert_eq!(b["is_duplicate"], false, "{key}: {b}");
        let idem = format!("idem-{key}");
        let value: u64 = key.trim_start_matches("idem").parse().expect("index");
        let (s, again) = put_http(
            &gw,
            "acme",
            json!({"key": key, "value": value}),
            &[("idempotency-key", idem.as_str())],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{again}");
        assert_eq!(
            again["is_duplicate"], true,
            "{key} was written twice: {again}"
        );
        assert_eq!(again["vector_clock"], b["vector_clock"], "{key}");
        let (s, read) = get_http(&gw, "acme", key).await;
        assert_eq!(
            (s, &read["vector_clock"]),
            (StatusCode::OK, &b["vector_clock"]),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_idempotent_requests_racing_on_two_coordinators_write_once() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) =
        shared_cluster("identical_idempotent_requests_racing_on_two_coordinators_write_once")
    else {
        return;
    };
    let mut a = cluster.coordinators[0].client().await;
    let b = cluster.coordinators[1].client().await;
    wait_all_active(&a, 3).await;
    create_tenant(&mut a, "acme", 3).await;
    for i in 0..20 {
        let key = format!("race{i}");
        let idem = format!("req-{i}");
        let (mut x, mut y) = (a.clone(), b.clone());
        let (k1, k2, i1, i2) = (key.clone(), key.clone(), idem.clone(), idem.clone());
        let first = tokio::spawn(async move {
            put_idem(&mut x, "acme", &k1, "1", Consistency::Quorum, &i1).await
        });
        let second = tokio::spawn(async move {
            put_idem(&mut y, "acme", &k2, "1", Consistency::Quorum, &i2).await
        });
        let first = first.await.expect("task").expect("write");
        let second = second.await.expect("task").expect("write");
        assert_eq!(
            [first.is_duplicate, second.is_duplicate]
                .iter()
                .filter(|d| !**d)
                .count(),
            1,
            "{key}: exactly one of the two may write ({first:?} / {second:?})"
        );
        assert_eq!(first.version, second.version, "{key}");
        // The same idempotency key with another value (or a context) is a conflict.
        let mut other = a.clone();
        let conflict = put_idem(&mut other, "acme", &key, "2", Consistency::Quorum, &idem).await;
        assert!(
            conflict.is_err(),
            "{key}: another value under the same key must conflict"
        );
    }
}

/// Three storage nodes and coordinator `c1` (SQLite, `env` added) with tenant `acme` at RF 3;
/// then `s3` is killed (every write misses it) and the metadata store is locked (by the
/// returned connection, in an open `BEGIN EXCLUSIVE`), so hints cannot be stored.
async fn missed_writes_with_a_locked_store(
    dir: &Path,
    env: &[(&str, &str)],
) -> (
    Vec<common::StorageNode>,
    RoleProcess,
    Client,
    sqlx::SqliteConnection,
) {
    let mut storage = start_storage(3, dir);
    let c1 = RoleProcess::coordinator("c1", &sqlite_url(dir), "memory://", &storage, env, dir);
    let mut c: Client = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    // The clock reserves its high-water mark now, before the store is locked.
    put(&mut c, "acme", "first", "0", Consistency::Quorum)
        .await
        .expect("put");
    storage[2].kill9();
    let db = dir.join("meta.db");
    let mut lock = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        db.display()
    ))
    .await
    .expect("open the metadata store");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .expect("lock");
    (storage, c1, c, lock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_every_queued_hint() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = sqlite_url(dir.path());
    // Hints cannot be stored and queue up in the coordinator.
    let (storage, mut c1, c, mut lock) = missed_writes_with_a_locked_store(dir.path(), &[]).await;

    const WRITES: usize = 10_000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut client = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..WRITES).step_by(32) {
                put(
                    &mut client,
                    "acme",
                    &format!("k{i}"),
                    "1",
                    Consistency::Quorum,
                )
                .await
                .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    drop(c);
    eprintln!("{WRITES} writes with s3 dead in {:?}", started.elapsed());

    // SIGTERM while the hints are queued; the store comes back a second later.
    let stopping = tokio::task::spawn_blocking(move || {
        let status = c1.terminate();
        (c1, status)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("unlock");
    drop(lock);
    let (c1, status) = stopping.await.expect("stop");
    assert!(status.success(), "coordinator exit: {status}");
    let log = std::fs::read_to_string(&c1.log).unwrap_or_default();
    let drained = log
        .lines()
        .find(|l| l.contains("hint queue drained"))
        .unwrap_or_else(|| panic!("no drain in the log: {log}"));
    let field = |name: &str| -> usize {
        drained
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {drained}"))
    };
    let (queued, lost) = (field("queued="), field("lost="));
    assert_eq!(lost, 0, "{drained}");

    let store = SqlMetadataStore::connect(&meta)
        .await
        .expect("metadata store");
    let held: u64 = store
        .hint_counts()
        .await
        .expect("hint counts")
        .into_iter()
        .filter(|(target, _)| target == "s3")
        .map(|(_, n)| n)
        .sum();
    // A batch that waited out its store attempts before the stop (a slow, loaded machine)
    // became repair markers on the replicas that took the write: not lost, and not the
    // drain's to store. Every hint still queued at the stop is stored, and every write is
    // either a stored hint or a marker.
    let markers = common::http_get(storage[0].http, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with("pairdb_repair_markers_pending "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as usize;
    assert!(queued > 0, "nothing was queued at the stop: {drained}");
    assert!(
        held as usize >= queued,
        "queued {queued}, stored {held}: hints lost by the orderly stop"
    );
    assert_eq!(
        held as usize + markers,
        WRITES,
        "stored {held} hints and {markers} markers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_that_cannot_be_stored_become_repair_markers_on_the_other_replicas() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The metadata store stays locked through the whole stop: no hint can be stored.
    let drain = [("PAIRDB_COORDINATOR_SHUTDOWN_DRAIN_TIMEOUT_MS", "4000")];
    let (mut storage, mut c1, mut c, lock) =
        missed_writes_with_a_locked_store(dir.path(), &drain).await;
    const WRITES: usize = 1_000;
    for i in 0..WRITES {
        put(&mut c, "acme", &format!("m{i}"), "1", Consistency::Quorum)
            .await
            .expect("write");
    }
    drop(c);
    let status = tokio::task::spawn_blocking(move || c1.terminate())
        .await
        .expect("stop");
    assert!(status.success(), "coordinator exit: {status}");

    // Every missed write is marked, durably, on both replicas that hold it.
    for node in &storage[..2] {
        let metrics = common::http_get(node.http, "/metrics").await;
        let pending = metrics
            .lines()
            .find(|l| l.starts_with("pairdb_repair_markers_pending "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(pending, Some(WRITES as f64), "{}: {metrics}", node.id);
    }
    drop(lock);
    // The markers survive a restart of the node, and name what was missed.
    storage[0].kill9();
    storage[0].restart();
    let metrics = common::http_get(storage[0].http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("pairdb_repair_markers_pending {WRITES}")),
        "{metrics}"
    );
    let log = pairdb::storage::repair_markers::RepairMarkerLog::open(&storage[1].dir)
        .expect("open markers");
    let markers = log.read_all().expect("read markers");
    assert_eq!(markers.len(), WRITES);
    assert!(
        markers
            .iter()
            .all(|m| m.missed_node == "s3" && m.tenant_id == "acme" && m.version.is_some())
    );
}

/// A write whose idempotency key is held by a request that died (its coordinator crashed with
/// the lock taken) waits at most the request timeout, then fails; it never writes later, when
/// its client has long given up (the fault suite saw such a write land 30 s late, when the dead
/// holder's lock expired, and roll the key back over the client's later writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_a_dead_holders_lock_gives_up_and_never_lands_later() {
    let _serial = SERIAL.lock().await;
    let test = "a_write_behind_a_dead_holders_lock_gives_up_and_never_lands_later";
    let Some(redis) = Redis::start() else {
        skip_or_fail(test, "redis-server (apt-get install redis-server)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, _c1, mut c) = one_coordinator(3, dir.path(), &redis.url(), &[("acme", 3)]).await;

    // The holder: a request that took the lock and died with it (30 s TTL).
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .expect("connect to redis");
    let claim = store
        .claim(&store_key("acme", b"held", "idem-held"), LOCK_TTL)
        .await
        .expect("claim");
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");

    let started = Instant::now();
    let waited = put_idem(
        &mut c,
        "acme",
        "held",
        "\"late\"",
        Consistency::Quorum,
        "idem-held",
    )
    .await;
    let took = started.elapsed();
    let status = waited.expect_err("the write must not pass a held lock");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "it waited {took:?}, far beyond the request timeout"
    );
    // Nothing lands afterwards either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let read = c
        .read_key_value(pb::ReadKeyValueRequest {
            tenant_id: "acme".into(),
            key: b"held".to_vec().into(),
            consistency: Consistency::All as i32,
        })
        .await;
    assert_eq!(
        read.map(|r| r.into_inner().value).map_err(|s| s.code()),
        Err(tonic::Code::NotFound),
        "a write whose client got UNAVAILABLE landed later"
    );
}

/// Each coordinator's clock 45 s off true time, one fast and one slow: the fast one's counters
/// lie 90 s ahead of the slow one's clock, beyond `max_clock_skew` (60 s), yet they are honest.
/// A later blind write through the slow coordinator must still win (re-minted above them), not
/// be acknowledged with the fast one's version while the older value stays (the fault suite's
/// finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_blind_write_wins_over_a_fast_clock_within_twice_the_skew() {
    let _serial = SERIAL.lock().await;
    let Some(faketime) = libfaketime() else {
        skip_or_fail(
            "a_later_blind_write_wins_over_a_fast_clock_within_twice_the_skew",
            "libfaketime (apt-get install faketime)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let fast = skewed_coordinator("c1", "+45s", faketime, &storage, dir.path());
    let slow = skewed_coordinator("c2", "-45s", faketime, &storage, dir.path());
    let mut a = fast.client().await;
    let mut b = slow.client().await;
    wait_all_active(&a, 3).await;
    wait_all_active(&b, 3).await;
    create_tenant(&mut a, "acme", 3).await;
    for round in 0..3 {
        let key = format!("k{round}");
        put(&mut a, "acme", &key, "\"fast\"", Consistency::Quorum)
            .await
            .expect("write through the fast coordinator");
        put(&mut b, "acme", &key, "\"slow, later\"", Consistency::Quorum)
            .await
            .expect("write through the slow coordinator");
        for c in [&mut a, &mut b] {
            let value = get(c, "acme", &key, Consistency::All).await.expect("read");
            assert_eq!(
                value, "\"slow, later\"",
                "round {round}: the later write was acknowledged but the older value stayed"
            );
        }
    }
}
