//! The storage role as a real process: gRPC round trips and error codes, durability under
//! `kill -9`, range streaming between two nodes, gossip of node health, the data-dir lock and
//! graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{StorageNode, free_udp_port};
use pairdb::rpc::auth::InternalChannel;
use pairdb::rpc::common as cpb;
use pairdb::rpc::detail::storage_code as code_in;
use pairdb::rpc::storage as pb;
use pairdb::rpc::storage::storage_node_client::StorageNodeClient;
use pairdb::vclock::physical_counter;
use tokio::sync::Mutex;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn version(counter: u64) -> cpb::Version {
    cpb::Version {
        clock: vec![cpb::ClockEntry {
            coordinator_id: "c1".into(),
            counter,
        }],
        timestamp_ms: 0,
    }
}

fn put(tenant: &str, key: &[u8], counter: u64, value: &[u8]) -> pb::Record {
    pb::Record {
        tenant_id: tenant.into(),
        key: key.to_vec().into(),
        version: Some(version(counter)),
        payload: Some(pb::record::Payload::Value(value.to_vec().into())),
        ring_hash: 0,
        expires_at_ms: 0,
    }
}

async fn read(
    client: &mut StorageNodeClient<InternalChannel>,
    tenant: &str,
    key: &[u8],
) -> Option<pb::Record> {
    client
        .read(pb::ReadRequest {
            tenant_id: tenant.into(),
            key: key.to_vec().into(),
        })
        .await
        .expect("read")
        .into_inner()
        .record
}

async fn scan(
    client: &mut StorageNodeClient<InternalChannel>,
    start: u64,
    end: u64,
) -> BTreeMap<(String, Vec<u8>), pb::Record> {
    let mut stream = client
        .scan_range(pb::ScanRangeRequest {
            range: Some(cpb::HashRange { start, end }),
            batch_size: 1000,
            ..Default::default()
        })
        .await
        .expect("scan")
        .into_inner();
    let mut out = BTreeMap::new();
    while let Some(batch) = stream.message().await.expect("scan batch") {
        for r in batch.records {
            out.insert((r.tenant_id.clone(), r.key.to_vec()), r);
        }
    }
    out
}

async fn write(
    client: &mut StorageNodeClient<InternalChannel>,
    record: pb::Record,
) -> Result<pb::ApplyResponse, tonic::Status> {
    client
        .write(pb::WriteRequest {
            record: Some(record),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Writes `records` as a stream's batch would (no client check, nothing forwarded on).
async fn load(client: &mut StorageNodeClient<InternalChannel>, records: Vec<pb::Record>) {
    client
        .write_batch(pb::WriteBatchRequest {
            ring_epoch: 0,
            records,
            source: pb::BatchSource::Stream as i32,
            ring_digest: 0,
        })
        .await
        .expect("load");
}

async fn repair(
    client: &mut StorageNodeClient<InternalChannel>,
    record: pb::Record,
) -> pb::ApplyResponse {
    client
        .repair(pb::RepairRequest {
            record: Some(record),
            ring_epoch: 0,
        })
        .await
        .expect("repair")
        .into_inner()
}

async fn stream_status(
    client: &mut StorageNodeClient<InternalChannel>,
    id: &str,
) -> Result<pb::StreamStatus, tonic::Status> {
    client
        .get_stream_status(pb::StreamStatusRequest {
            stream_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Polls a stream until it copied at least `keys` (within 60 s); returns how many it copied.
async fn copied_at_least(
    client: &mut StorageNodeClient<InternalChannel>,
    id: &str,
    keys: u64,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stream_status(client, id).await.expect("status");
        if s.keys_copied >= keys {
            return s.keys_copied;
        }
        assert!(
            Instant::now() < deadline,
            "stream did not reach {keys}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts `node` (stopped by the caller) and asks for stream `request` again.
async fn restart_and_resume(
    node: &mut StorageNode,
    request: &pb::StartStreamingRequest,
) -> (StorageNodeClient<InternalChannel>, pb::StreamStatus) {
    node.restart();
    let mut client = node.client().await;
    let resumed = client
        .start_streaming(request.clone())
        .await
        .expect("start again")
        .into_inner();
    (client, resumed)
}

/// Polls a stream until it completes; fails on `failed` or after `secs`.
async fn wait_completed(
    client: &mut StorageNodeClient<InternalChannel>,
    id: &str,
    secs: u64,
) -> pb::StreamStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = stream_status(client, id).await.expect("status");
        if s.state == pb::StreamState::Completed as i32 {
            return s;
        }
        assert_ne!(
            s.state,
            pb::StreamState::Failed as i32,
            "stream failed: {}",
            s.error
        );
        assert!(Instant::now() < deadline, "stream did not complete: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_and_bad_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let base = physical_counter(now_ms());

    let r = write(&mut c, put("acme", b"user:1", base + 2, b"\"v2\""))
        .await
        .expect("write");
    assert_eq!(r.outcome, pb::ApplyOutcome::Applied as i32);
    let got = read(&mut c, "acme", b"user:1")
        .await
        .expect("written value reads back");
    assert_eq!(
        got.payload,
        Some(pb::record::Payload::Value(b"\"v2\"".to_vec().into()))
    );
    assert_eq!(got.version.expect("version").clock[0].counter, base + 2);
    assert_eq!(
        read(&mut c, "other", b"user:1").await,
        None,
        "tenants are separate"
    );

    // An older version is ignored and the stored one reported.
    let r = write(&mut c, put("acme", b"user:1", base + 1, b"\"v1\""))
        .await
        .expect("write");
    assert_eq!(r.outcome, pb::ApplyOutcome::IgnoredDominated as i32);
    assert_eq!(r.stored_version.expect("stored").clock[0].counter, base + 2);

    // Delete writes a tombstone that reads back as such.
    let r = c
        .delete(pb::DeleteRequest {
            tenant_id: "acme".into(),
            key: b"user:1".to_vec().into(),
            version: Some(version(base + 3)),
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(r.outcome, pb::ApplyOutcome::Applied as i32);
    let got = read(&mut c, "acme", b"user:1").await.expect("tombstone");
    assert!(matches!(
        got.payload,
        Some(pb::record::Payload::Tombstone(_))
    ));

    // Bad inputs: documented codes, nothing written.
    let cases: Vec<(pb::Record, pb::ErrorCode)> = vec![
        (
            put("acme", &[b'k'; 1025], base, b"1"),
            pb::ErrorCode::KeyTooLarge,
        ),
        (
            put("acme", b"big", base, &vec![b'x'; 10 * 1024 * 1024 + 1]),
            pb::ErrorCode::ValueTooLarge,
        ),
        (
            put("ac:me", b"k", base, b"1"),
            pb::ErrorCode::InvalidTenantId,
        ),
        (put("", b"k", base, b"1"), pb::ErrorCode::InvalidTenantId),
        (put("acme", b"", base, b"1"), pb::ErrorCode::InvalidKey),
        (
            pb::Record {
                version: None,
                ..put("acme", b"nover", base, b"1")
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            pb::Record {
                payload: None,
                ..put("acme", b"nopayload", base, b"1")
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            pb::Record {
                version: Some(cpb::Version {
                    clock: vec![],
                    timestamp_ms: 0,
                }),
                ..put("acme", b"emptyclock", base, b"1")
            },
            pb::ErrorCode::InvalidArgument,
        ),
    ];
    for (record, code) in cases {
        let key = record.key.clone();
        let err = c
            .write(pb::WriteRequest {
                record: Some(record),
            })
            .await
            .expect_err("must be rejected");
        assert_eq!(code_in(&err), code, "{}", err.message());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        if !key.is_empty() && key.len() <= 1024 {
            assert_eq!(
                read(&mut c, "acme", &key).await,
                None,
                "a rejected write changed something"
            );
        }
    }
    // A batch with one bad record is rejected whole.
    let batch = vec![
        put("acme", b"ok-1", base, b"1"),
        put("acme", &[b'k'; 2000], base, b"1"),
    ];
    let err = c
        .write_batch(pb::WriteBatchRequest {
            ring_epoch: 0,
            records: batch,
            source: pb::BatchSource::Hint as i32,
            ring_digest: 0,
        })
        .await
        .expect_err("bad batch");
    assert_eq!(code_in(&err), pb::ErrorCode::KeyTooLarge);
    assert_eq!(read(&mut c, "acme", b"ok-1").await, None);

    let health = c
        .health_check(pb::HealthCheckRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.node_id, "s1");
    // Healthy below 80% disk use, degraded above (the test machine's own disk decides which).
    assert!(health.disk_usage_percent > 0.0 && health.disk_usage_percent < 100.0);
    assert_eq!(
        health.status,
        pairdb::storage::service::health_status(
            health.disk_usage_percent,
            &pairdb::engine::DiskThresholds::default(),
        ) as i32,
        "at {:.1}% disk use",
        health.disk_usage_percent
    );
    assert!(health.key_estimate >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let acked = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let base = physical_counter(now_ms());
    let mut writers = Vec::new();
    for w in 0..32u64 {
        let mut c = node.client().await;
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                // Half the writers send single records, half batches of three (the path the
                // coordinator uses): both are acknowledged only once durable.
                let keys: Vec<Vec<u8>> = if w % 2 == 0 {
                    vec![format!("w{w}-{i}").into_bytes()]
                } else {
                    (0..3)
                        .map(|j| format!("w{w}-{i}-{j}").into_bytes())
                        .collect()
                };
                let mut records: Vec<pb::Record> = keys
                    .iter()
                    .map(|key| put("durable", key, base + i, key))
                    .collect();
                let sent = if w % 2 == 0 {
                    let record = records.pop();
                    c.write(pb::WriteRequest { record }).await.map(drop)
                } else {
                    c.write_batch(pb::WriteBatchRequest {
                        ring_epoch: 0,
                        records,
                        source: pb::BatchSource::Client as i32,
                        ring_digest: 0,
                    })
                    .await
                    .map(drop)
                };
                match sent {
                    Ok(()) => acked.lock().await.extend(keys),
                    Err(_) => return, // the node died under us: this write was never acknowledged
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() > 200, "too few writes: {}", acked.len());
    node.restart();
    let mut c = node.client().await;
    for key in &acked {
        let got = read(&mut c, "durable", key)
            .await
            .unwrap_or_else(|| panic!("acknowledged {} lost", String::from_utf8_lossy(key)));
        assert_eq!(
            got.payload,
            Some(pb::record::Payload::Value(key.clone().into()))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_copies_a_range_with_live_writes() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let a = StorageNode::start("a", da.path(), None);
    let b = StorageNode::start("b", db.path(), None);
    let mut ca = a.client().await;
    let base = physical_counter(now_ms());
    for chunk in 0..100u64 {
        let records = (0..1000u64)
            .map(|i| {
                let n = chunk * 1000 + i;
                put(
                    "t",
                    format!("key-{n:06}").as_bytes(),
                    base + n,
                    format!("value-{n}").as_bytes(),
                )
            })
            .collect();
        load(&mut ca, records).await;
    }
    let (start, end) = (0u64, 1u64 << 63);
    let status = ca
        .start_streaming(pb::StartStreamingRequest {
            stream_id: "m1".into(),
            ranges: vec![cpb::HashRange { start, end }],
            target_node_id: "b".into(),
            target_address: b.grpc.to_string(),
            resume: None,
            dropped_tenants: Vec::new(),
            ring_digest: 0,
            ring_epoch: 0,
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(status.state, pb::StreamState::Copying as i32);

    // A keeps serving during the copy, and writes made meanwhile reach B too. B is paused while
    // they are made, so the stream is certainly still copying (on a fast machine the copy could
    // otherwise finish first, and writes after completion are not the stream's to forward).
    b.pause();
    for n in 0..2000u64 {
        let key = format!("live-{n:05}");
        write(
            &mut ca,
            put("t", key.as_bytes(), base + 1_000_000 + n, b"live"),
        )
        .await
        .expect("live write");
        if n % 200 == 0 {
            assert!(read(&mut ca, "t", b"key-000007").await.is_some());
        }
    }
    b.resume();
    let done = wait_completed(&mut ca, "m1", 120).await;
    let expected = scan(&mut ca, start, end).await;
    let mut cb = b.client().await;
    let copied = scan(&mut cb, 0, 0).await;
    assert!(expected.len() > 40_000, "half the keys: {}", expected.len());
    assert_eq!(
        copied.len(),
        expected.len(),
        "B holds exactly the streamed range"
    );
    for (k, r) in &expected {
        let c = copied
            .get(k)
            .unwrap_or_else(|| panic!("{k:?} missing on B"));
        assert_eq!((&c.version, &c.payload), (&r.version, &r.payload));
    }
    assert!(
        expected.keys().any(|(_, k)| k.starts_with(b"live-")),
        "live writes in the range"
    );
    assert!(done.keys_copied >= 40_000 && done.bytes_copied > 0);
}

/// A stream of large values reaches its target as ingested tables (its batches are over
/// the 1 MiB at which a target writes them as tables instead of through its log), and the
/// target ends with the newest version of every key: keys it held at an older version take
/// the streamed one, keys it held at a newer version keep theirs. All of it survives a
/// kill -9 of the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_large_values_is_ingested_and_keeps_the_newest_versions() {
    const KEYS: u64 = 1_500;
    // Batches of one second of the sender's throttle: three of them, each over 1 MiB.
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let paced = [("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "3000000")];
    let a = StorageNode::start_with_env("a", dirs[0].path(), None, &paced);
    let mut b = StorageNode::start("b", dirs[1].path(), None);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let base = physical_counter(now_ms()) + 10;
    let value = |tag: &str, n: u64| format!("{tag}-{n:05}-").repeat(700).into_bytes();
    let key = |n: u64| format!("big-{n:05}").into_bytes();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(150) {
        let records = chunk
            .iter()
            .map(|n| put("t", &key(*n), base + n, &value("a", *n)));
        load(&mut ca, records.collect()).await;
    }
    // B already holds every 7th key: at an older version when n is even, a newer one when odd.
    let held: Vec<u64> = (0..KEYS).step_by(7).collect();
    for n in &held {
        let counter = if n % 2 == 0 {
            base + n - 5
        } else {
            base + n + 1_000_000
        };
        let record = put("t", &key(*n), counter, &value("b", *n));
        write(&mut cb, record).await.expect("write to B");
    }
    let expected = |n: u64| {
        if held.contains(&n) && n % 2 == 1 {
            (base + n + 1_000_000, value("b", n))
        } else {
            (base + n, value("a", n))
        }
    };

    ca.start_streaming(pb::StartStreamingRequest {
        stream_id: "big".into(),
        ranges: vec![cpb::HashRange { start: 0, end: 0 }],
        target_node_id: "b".into(),
        target_address: b.grpc.to_string(),
        ..Default::default()
    })
    .await
    .expect("start");
    wait_completed(&mut ca, "big", 120).await;

    let ingested = common::metric_sum(b.http, "pairdb_engine_ingested_tables").await;
    assert!(
        ingested >= 2.0,
        "the stream's batches were ingested: {ingested} tables"
    );
    for round in ["after the stream", "after a kill -9 of the target"] {
        for n in 0..KEYS {
            let got = read(&mut cb, "t", &key(n))
                .await
                .unwrap_or_else(|| panic!("{round}: key {n} missing on B"));
            let (counter, value) = expected(n);
            let clock = got.version.as_ref().map(|v| v.clock.clone());
            assert_eq!(clock, Some(version(counter).clock), "{round}: key {n}");
            assert_eq!(
                got.payload,
                Some(pb::record::Payload::Value(value.into())),
                "{round}: key {n}"
            );
        }
        b.kill9();
        b.restart();
        cb = b.client().await;
    }
}

/// A coordinator that placed its writes on the ring a stream was planned on wrote them to the
/// stream's target itself (or hinted them), so the sender does not forward them a second
/// time; writes placed on another ring, or on an unknown one, are forwarded as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_placed_on_the_streams_own_ring_are_not_forwarded() {
    const RING: u64 = 77;
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    // Throttled, so the stream is still copying when the writes arrive.
    let slow = [("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "400000")];
    let a = StorageNode::start_with_env("a", da.path(), None, &slow);
    let b = StorageNode::start("b", db.path(), None);
    let mut ca = a.client().await;
    let base = physical_counter(now_ms());
    let key = |n: u64| format!("key-{n:06}");
    for chunk in 0..20u64 {
        let records = (0..1000u64)
            .map(|i| {
                let n = chunk * 1000 + i;
                put("t", key(n).as_bytes(), base + n, &[b'v'; 100])
            })
            .collect();
        load(&mut ca, records).await;
    }
    ca.start_streaming(pb::StartStreamingRequest {
        stream_id: "add-b".into(),
        ranges: vec![cpb::HashRange { start: 0, end: 0 }],
        target_node_id: "b".into(),
        target_address: b.grpc.to_string(),
        resume: None,
        dropped_tenants: Vec::new(),
        ring_digest: RING,
        ring_epoch: 0,
    })
    .await
    .expect("start");
    // The scan goes in key order: once 1,000 keys are acknowledged, keys 0..300 are behind it
    // and their new versions can reach B only by forwarding.
    copied_at_least(&mut ca, "add-b", 1000).await;
    let newer = |n: u64| put("t", key(n).as_bytes(), base + 1_000_000 + n, b"new");
    for (first, ring_digest) in [(0u64, RING), (100, RING + 1), (200, 0)] {
        ca.write_batch(pb::WriteBatchRequest {
            ring_epoch: 0,
            records: (first..first + 100).map(newer).collect(),
            source: pb::BatchSource::Client as i32,
            ring_digest,
        })
        .await
        .expect("client batch");
    }
    let during = stream_status(&mut ca, "add-b").await.expect("status");
    assert!(
        during.state == pb::StreamState::Copying as i32 && during.keys_copied < 20_000,
        "the writes must land while the stream copies: {during:?}"
    );
    let done = wait_completed(&mut ca, "add-b", 120).await;
    assert_eq!(done.writes_forwarded, 200, "{done:?}");
    let mut cb = b.client().await;
    let copied = scan(&mut cb, 0, 0).await;
    assert_eq!(copied.len(), 20_000);
    let counter = |n: u64| {
        let r = &copied[&("t".to_owned(), key(n).into_bytes())];
        r.version.as_ref().expect("version").clock[0].counter
    };
    for n in 0..100 {
        assert_eq!(
            counter(n),
            base + n,
            "{}: placed on the stream's ring",
            key(n)
        );
    }
    for n in 100..300 {
        assert_eq!(counter(n), base + 1_000_000 + n, "{}: forwarded", key(n));
    }
}

async fn members(node: &StorageNode) -> Vec<pb::MemberHealth> {
    let mut c = node.client().await;
    let mut stream = c
        .watch_health(pb::WatchHealthRequest {})
        .await
        .expect("watch")
        .into_inner();
    stream
        .message()
        .await
        .expect("update")
        .expect("first update")
        .members
}

async fn wait_for(node: &StorageNode, what: &str, pred: impl Fn(&[pb::MemberHealth]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = members(node).await;
        if pred(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_up(m: &[pb::MemberHealth], id: &str) -> Option<bool> {
    m.iter().find(|x| x.node_id == id).map(|x| x.up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_sees_nodes_leave_and_return() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let addrs: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port())))
        .collect();
    let mut nodes: Vec<StorageNode> = (0..3)
        .map(|i| {
            let seeds = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect();
            StorageNode::start(&format!("g{i}"), dirs[i].path(), Some((addrs[i], seeds)))
        })
        .collect();
    wait_for(&nodes[0], "all three up", |m| {
        ["g0", "g1", "g2"]
            .iter()
            .all(|id| is_up(m, id) == Some(true))
    })
    .await;
    // Load is requests per second, published every second.
    let mut c = nodes[0].client().await;
    let busy = tokio::spawn(async move {
        loop {
            let _ = c.health_check(pb::HealthCheckRequest {}).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    wait_for(&nodes[1], "g0's load seen by g1", |m| {
        m.iter().any(|x| x.node_id == "g0" && x.load > 0.0)
    })
    .await;
    busy.abort();
    let started = Instant::now();
    nodes[2].kill9();
    wait_for(&nodes[0], "g2 down", |m| is_up(m, "g2") == Some(false)).await;
    wait_for(&nodes[1], "g2 down", |m| is_up(m, "g2") == Some(false)).await;
    eprintln!("g2 seen down after {:?}", started.elapsed());
    nodes[2].restart();
    wait_for(&nodes[0], "g2 up again", |m| is_up(m, "g2") == Some(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_lock_metrics_and_graceful_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    write(&mut c, put("t", b"k", physical_counter(now_ms()), b"v"))
        .await
        .expect("write");

    let second = common::pairdb_command()
        .args([
            "--role=storage",
            "--node-id=s2",
            "--listen=127.0.0.1:0",
            "--http-listen=127.0.0.1:0",
        ])
        .arg(format!("--data-dir={}", dir.path().display()))
        .output()
        .expect("run second node");
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("locked by another pairdb process"));

    let body = common::http_get(node.http, "/metrics").await;
    assert!(body.contains("pairdb_storage_requests_total"), "{body}");
    assert!(body.contains("pairdb_engine_disk_usage_percent"));
    assert!(body.contains("pairdb_engine_log_sync_seconds"), "{body}");
    assert!(
        body.contains("pairdb_engine_level_compaction_bytes_written{")
            && body.contains("pairdb_engine_level_compaction_bytes_read{"),
        "{body}"
    );
    assert!(common::http_get(node.http, "/healthz").await.contains("ok"));
    assert!(
        common::http_get(node.http, "/readyz")
            .await
            .contains("ready")
    );

    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    node.restart();
    let mut c = node.client().await;
    assert!(read(&mut c, "t", b"k").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_survives_a_target_outage() {
    let (_dirs, a, mut b) = two_nodes();
    let mut ca = a.client().await;
    let base = physical_counter(now_ms());
    for chunk in 0..10u64 {
        let records = (0..1000u64)
            .map(|i| {
                put(
                    "t",
                    format!("key-{:05}", chunk * 1000 + i).as_bytes(),
                    base + i,
                    b"v",
                )
            })
            .collect();
        load(&mut ca, records).await;
    }
    stream_through_a_target_outage(&mut ca, &mut b, "outage", pb::StreamState::Copying).await;
    let mut cb = b.client().await;
    assert_eq!(scan(&mut cb, 0, 0).await.len(), 10_000);
}

/// A stream with nothing to copy reaches its last step, the target's flush (`Drain`), at
/// once: a target that is down then is waited for there too, as for any batch, instead of
/// failing the stream (and with it a whole topology change, as the fault suite saw when a
/// node was isolated at that moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_final_flush_waits_for_a_target_outage() {
    let (_dirs, a, mut b) = two_nodes();
    let mut ca = a.client().await;
    stream_through_a_target_outage(&mut ca, &mut b, "flush-outage", pb::StreamState::Syncing).await;
}

/// A stream that outlived its change (planned on a ring older than a cleanup on its target):
/// the target refuses its first batch as placed on a stale ring, the stream fails at once
/// (retrying cannot help), and nothing of it lands on the target. The same stream planned on
/// the fenced ring completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_planned_on_a_ring_older_than_its_targets_fence_fails_and_sends_nothing() {
    let (_dirs, a, b) = two_nodes();
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let base = physical_counter(now_ms());
    let records = (0..50u64)
        .map(|n| put("t", format!("s{n:03}").as_bytes(), base + n, b"v"))
        .collect();
    load(&mut ca, records).await;
    cb.fence_ring(pb::FenceRingRequest { epoch: 5 })
        .await
        .expect("fence");
    let stream = |id: &str, ring_epoch: u64| pb::StartStreamingRequest {
        stream_id: id.into(),
        ranges: vec![cpb::HashRange { start: 0, end: 0 }],
        target_node_id: b.id.clone(),
        target_address: b.grpc.to_string(),
        resume: None,
        dropped_tenants: Vec::new(),
        ring_digest: 0,
        ring_epoch,
    };
    ca.start_streaming(stream("stale", 4)).await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let s = stream_status(&mut ca, "stale").await.expect("status");
        if s.state == pb::StreamState::Failed as i32 {
            break s;
        }
        assert!(Instant::now() < deadline, "not failed within 10 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failed.error.contains("epoch"), "{failed:?}");
    assert_eq!(failed.keys_copied, 0, "{failed:?}");
    assert!(scan(&mut cb, 0, 0).await.is_empty(), "nothing landed on b");
    ca.start_streaming(stream("current", 5))
        .await
        .expect("start");
    let done = wait_completed(&mut ca, "current", 60).await;
    assert_eq!(done.keys_copied, 50);
    assert_eq!(scan(&mut cb, 0, 0).await.len(), 50);
}

/// Storage nodes `a` and `b`, each in a data dir of its own (kept by the caller).
fn two_nodes() -> ([tempfile::TempDir; 2], StorageNode, StorageNode) {
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let a = StorageNode::start("a", dirs[0].path(), None);
    let b = StorageNode::start("b", dirs[1].path(), None);
    (dirs, a, b)
}

/// Streams every range from the node of `client` to `target`, which is down when the stream
/// starts: after 2 s the stream must be waiting in `waiting_in`, not failed; then the target
/// comes back and the stream must complete.
async fn stream_through_a_target_outage(
    client: &mut StorageNodeClient<InternalChannel>,
    target: &mut StorageNode,
    id: &str,
    waiting_in: pb::StreamState,
) {
    target.kill9();
    client
        .start_streaming(pb::StartStreamingRequest {
            stream_id: id.into(),
            ranges: vec![cpb::HashRange { start: 0, end: 0 }],
            target_node_id: target.id.clone(),
            target_address: target.grpc.to_string(),
            resume: None,
            dropped_tenants: Vec::new(),
            ring_digest: 0,
            ring_epoch: 0,
        })
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = stream_status(client, id).await.expect("status");
    assert_eq!(
        s.state, waiting_in as i32,
        "waiting for the target, not failed: {s:?}"
    );
    target.restart();
    wait_completed(client, id, 60).await;
}

/// The operator's bad day of the crash-consistency issue: a crash right after a new commit-log
/// segment was created (the file exists, 0 bytes), a restart, and a `kill -9` before anything
/// was flushed. The node must start again by itself, with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_after_crashing_right_after_creating_a_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let base = physical_counter(now_ms());
    let mut c = node.client().await;
    for i in 0..10u64 {
        write(&mut c, put("t", format!("a{i}").as_bytes(), base + i, b"v"))
            .await
            .expect("write");
    }
    assert_eq!(node.terminate().code(), Some(0));
    let wal = dir.path().join("wal");
    let next = std::fs::read_dir(&wal)
        .expect("wal")
        .filter_map(|e| {
            let name = e.expect("entry").file_name();
            name.to_str()?.strip_suffix(".log")?.parse::<u64>().ok()
        })
        .max()
        .expect("a segment")
        + 1;
    std::fs::write(wal.join(format!("{next:020}.log")), b"").expect("an empty segment");
    node.restart();
    let mut c = node.client().await;
    for i in 0..10u64 {
        write(&mut c, put("t", format!("b{i}").as_bytes(), base + i, b"v"))
            .await
            .expect("write");
    }
    node.kill9();
    node.restart();
    let mut c = node.client().await;
    for key in (0..10).flat_map(|i| [format!("a{i}"), format!("b{i}")]) {
        assert!(
            read(&mut c, "t", key.as_bytes()).await.is_some(),
            "acknowledged {key} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_commit_log_stops_the_node_unless_the_operator_skips_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let base = physical_counter(now_ms());
    for i in 0..20u64 {
        write(&mut c, put("t", format!("k{i}").as_bytes(), base + i, b"v"))
            .await
            .expect("write");
    }
    assert_eq!(node.terminate().code(), Some(0));
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .expect("wal")
        .map(|e| e.expect("entry").path())
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 8).unwrap_or(false))
        .collect();
    segments.sort();
    let segment = segments.pop().expect("a segment with records");
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[8 + 24 + 2] ^= 0xff; // inside the first record, with good records after it
    std::fs::write(&segment, &bytes).expect("corrupt");

    let refused = common::pairdb_command()
        .args([
            "--role=storage",
            "--node-id=s1",
            "--listen=127.0.0.1:0",
            "--http-listen=127.0.0.1:0",
        ])
        .arg(format!("--data-dir={}", dir.path().display()))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&segment.display().to_string()) && err.contains("offset 8"),
        "{err}"
    );

    let skipped = common::pairdb_command()
        .args([
            "--role=storage",
            "--node-id=s1",
            "--listen=127.0.0.1:0",
            "--http-listen=127.0.0.1:0",
            "--skip-corrupt-log",
            "--check-config",
        ])
        .arg(format!("--data-dir={}", dir.path().display()))
        .output()
        .expect("run");
    assert!(skipped.status.success());
    // With the flag the node starts (the damaged segment's records are dropped).
    let mut restarted = common::pairdb_command()
        .args([
            "--role=storage",
            "--node-id=s1",
            "--skip-corrupt-log",
            "--log-level=warn",
        ])
        .arg(format!("--listen={}", node.grpc))
        .arg(format!("--http-listen={}", node.http))
        .arg(format!("--data-dir={}", dir.path().display()))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(node.grpc).is_err() {
        assert!(
            restarted.try_wait().expect("wait").is_none(),
            "node with --skip-corrupt-log exited"
        );
        assert!(
            Instant::now() < deadline,
            "node with --skip-corrupt-log did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    restarted.kill().expect("kill");
    restarted.wait().expect("reap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_applies_only_newer_versions_and_streams_can_be_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let base = physical_counter(now_ms());
    write(&mut c, put("t", b"k", base + 5, b"current"))
        .await
        .expect("write");
    let stale = repair(&mut c, put("t", b"k", base + 1, b"stale")).await;
    assert_eq!(stale.outcome, pb::ApplyOutcome::IgnoredDominated as i32);
    let newer = repair(&mut c, put("t", b"k", base + 9, b"repaired")).await;
    assert_eq!(newer.outcome, pb::ApplyOutcome::Applied as i32);
    let got = read(&mut c, "t", b"k").await.expect("k");
    assert_eq!(
        got.payload,
        Some(pb::record::Payload::Value(b"repaired".to_vec().into()))
    );

    // A stream to a target that never answers keeps retrying until it is stopped.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    c.start_streaming(pb::StartStreamingRequest {
        stream_id: "s".into(),
        ranges: vec![cpb::HashRange { start: 0, end: 0 }],
        target_node_id: "nobody".into(),
        target_address: nowhere.to_string(),
        resume: None,
        dropped_tenants: Vec::new(),
        ring_digest: 0,
        ring_epoch: 0,
    })
    .await
    .expect("start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = c
        .stop_streaming(pb::StreamStatusRequest {
            stream_id: "s".into(),
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state, pb::StreamState::Stopped as i32);
    let later = stream_status(&mut c, "s").await.expect("status");
    assert_eq!(later.state, pb::StreamState::Stopped as i32);
    let unknown = stream_status(&mut c, "nope")
        .await
        .expect_err("unknown stream");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(
        c.drain(pb::DrainRequest {})
            .await
            .expect("drain")
            .into_inner()
            .drained
    );
    let health = c
        .health_check(pb::HealthCheckRequest {})
        .await
        .expect("health")
        .into_inner();
    assert!(
        health.sstable_count >= 1,
        "drain flushed the memtable into a table"
    );
}

/// Cleanup's storage side: HeldVersions answers "this version or a newer one", and DropRanges
/// removes exactly the named tenants' records in the named ranges (others stay, across a
/// restart), refusing a drop that names no tenant or the whole ring, and one verified against
/// a ring older than a write the node took (a late drop), also after `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_versions_and_tenant_range_drops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let base = physical_counter(now_ms());
    for i in 0..200u32 {
        for tenant in ["acme", "other"] {
            write(
                &mut c,
                put(tenant, format!("k{i}").as_bytes(), base + 5, b"1"),
            )
            .await
            .expect("write");
        }
    }
    let entry = |key: &str, counter: u64| pb::KeyVersion {
        tenant_id: "acme".into(),
        key: key.as_bytes().to_vec().into(),
        version: Some(version(counter)),
    };
    let held = c
        .held_versions(pb::HeldVersionsRequest {
            entries: vec![
                entry("k1", base + 5),
                entry("k1", base + 4),
                entry("k1", base + 6),
                entry("missing", base),
            ],
        })
        .await
        .expect("held versions")
        .into_inner()
        .held;
    assert_eq!(held, vec![true, true, false, false]);
    let too_many = pb::HeldVersionsRequest {
        entries: vec![entry("k1", base); 10_001],
    };
    let refused = c
        .held_versions(too_many)
        .await
        .expect_err("too many entries");
    assert_eq!(
        code_in(&refused),
        pb::ErrorCode::InvalidArgument,
        "{refused:?}"
    );

    // Half the ring, acme only.
    let half = cpb::HashRange {
        start: 0,
        end: 1 << 63,
    };
    let drop_on =
        |ring_epoch: u64, tenants: Vec<String>, range: cpb::HashRange| pb::DropRangesRequest {
            drops: vec![pb::TenantRanges {
                tenant_ids: tenants,
                ranges: vec![range],
            }],
            ring_epoch,
        };
    let drop_req = |tenants: Vec<String>, range: cpb::HashRange| drop_on(9, tenants, range);
    for bad in [
        drop_req(Vec::new(), half),
        drop_req(vec!["acme".into()], cpb::HashRange { start: 7, end: 7 }),
        drop_req(vec!["bad:tenant".into()], half),
    ] {
        let refused = c.drop_ranges(bad).await.expect_err("bad drop");
        assert_eq!(
            code_in(&refused),
            pb::ErrorCode::InvalidArgument,
            "{refused:?}"
        );
    }
    // A write placed on the ring of epoch 9 (the same version again: applied or not, the
    // node took a write on that ring), then a drop verified against epoch 8: late, refused.
    c.write_batch(pb::WriteBatchRequest {
        records: vec![put("acme", b"k0", base + 5, b"1")],
        source: pb::BatchSource::Stream as i32,
        ring_digest: 0,
        ring_epoch: 9,
    })
    .await
    .expect("a write on the ring of epoch 9");
    drop(c);
    node.kill9();
    node.restart();
    let mut c = node.client().await;
    for late in [0, 8] {
        let refused = c
            .drop_ranges(drop_on(late, vec!["acme".into()], half))
            .await
            .expect_err("a drop verified against an older ring");
        assert_eq!(code_in(&refused), pb::ErrorCode::StaleRing, "{refused:?}");
    }
    assert_eq!(
        scan(&mut c, 0, 0).await.len(),
        400,
        "a refused drop changes nothing"
    );
    let dropped = c
        .drop_ranges(drop_req(vec!["acme".into()], half))
        .await
        .expect("drop")
        .into_inner();
    let in_half = |r: &pb::Record| r.ring_hash < 1 << 63;
    let left = scan(&mut c, 0, 0).await;
    assert!(left.values().all(|r| r.tenant_id == "other" || !in_half(r)));
    let acme_left = left.values().filter(|r| r.tenant_id == "acme").count();
    assert_eq!(dropped.records_dropped as usize, 200 - acme_left);
    assert!(
        dropped.records_dropped > 50 && acme_left > 50,
        "{dropped:?}"
    );
    assert_eq!(
        left.values().filter(|r| r.tenant_id == "other").count(),
        200
    );
    assert!(dropped.bytes_after < dropped.bytes_before, "{dropped:?}");

    // Nothing dropped comes back after a crash and restart (no tombstones, no log replay).
    drop(c);
    node.kill9();
    node.restart();
    let mut c = node.client().await;
    assert_eq!(scan(&mut c, 0, 0).await.len(), left.len());
}

/// The ring fence (cleanup's `FenceRing`): client calls, hint replays, repairs, read repairs,
/// stream batches and listings placed on an older ring, or naming none, are refused with
/// STALE_RING and change nothing; calls on the fenced ring or a newer one are taken (reads
/// of a repair are not client calls, and are answered); the fence only rises, and it holds
/// after `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_fence_refuses_client_calls_placed_on_an_older_ring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let base = physical_counter(now_ms());
    let batch =
        |source: pb::BatchSource, epoch: u64, key: &str, counter: u64| pb::WriteBatchRequest {
            records: vec![put("acme", key.as_bytes(), counter, b"v")],
            source: source as i32,
            ring_digest: 0,
            ring_epoch: epoch,
        };
    let reads = |epoch: u64| pb::ReadBatchRequest {
        reads: vec![pb::ReadRequest {
            tenant_id: "acme".into(),
            key: b"k0".to_vec().into(),
        }],
        source: pb::BatchSource::Client as i32,
        ring_epoch: epoch,
    };
    let listing = |epoch: u64| pb::ListKeysRequest {
        tenant_id: "acme".into(),
        prefix: Default::default(),
        start_after: Default::default(),
        limit: 10,
        keys_only: true,
        ring_epoch: epoch,
    };
    let fence = |epoch: u64| pb::FenceRingRequest { epoch };
    c.write_batch(batch(pb::BatchSource::Client, 0, "k0", base))
        .await
        .expect("an unfenced node takes calls naming no ring");
    let refused = c.fence_ring(fence(0)).await.expect_err("epoch 0");
    assert_eq!(code_in(&refused), pb::ErrorCode::InvalidArgument);
    let floor = |r: tonic::Response<pb::FenceRingResponse>| r.into_inner().floor;
    assert_eq!(floor(c.fence_ring(fence(5)).await.expect("fence")), 5);
    assert_eq!(
        floor(c.fence_ring(fence(3)).await.expect("fence")),
        5,
        "never lowered"
    );
    let stale = |e: tonic::Status| {
        assert_eq!(code_in(&e), pb::ErrorCode::StaleRing, "{e:?}");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    };
    let read_repair = |epoch: u64| pb::RepairRequest {
        record: Some(put("acme", b"k1", base + 1, b"v")),
        ring_epoch: epoch,
    };
    for epoch in [0, 4] {
        for source in [
            pb::BatchSource::Client,
            pb::BatchSource::Hint,
            pb::BatchSource::Repair,
            pb::BatchSource::Stream,
        ] {
            stale(
                c.write_batch(batch(source, epoch, "k1", base + 1))
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("a {source:?} batch on an older ring")),
            );
        }
        stale(
            c.repair(read_repair(epoch))
                .await
                .expect_err("a read repair of a read on an older ring"),
        );
        stale(
            c.list_keys(listing(epoch))
                .await
                .expect_err("a listing placed on an older ring"),
        );
        stale(
            c.read_batch(reads(epoch))
                .await
                .expect_err("a client read on an older ring"),
        );
    }
    stale(
        write(&mut c, put("acme", b"k1", base + 1, b"v"))
            .await
            .expect_err("a single write names no ring"),
    );
    assert!(
        read(&mut c, "acme", b"k1").await.is_none(),
        "nothing refused was applied"
    );
    c.write_batch(batch(pb::BatchSource::Client, 5, "k2", base + 2))
        .await
        .expect("the fenced ring");
    c.write_batch(batch(pb::BatchSource::Hint, 5, "k5", base + 5))
        .await
        .expect("a hint replay on the fenced ring");
    c.list_keys(listing(5))
        .await
        .expect("a listing on the fenced ring");
    c.write_batch(batch(pb::BatchSource::Repair, 5, "k3", base + 3))
        .await
        .expect("a repair on the fenced ring");
    c.write_batch(batch(pb::BatchSource::Stream, 6, "k6", base + 6))
        .await
        .expect("a stream planned on a newer ring");
    c.repair(read_repair(5))
        .await
        .expect("a read repair on the fenced ring");
    let repair_read = pb::ReadBatchRequest {
        source: pb::BatchSource::Repair as i32,
        ..reads(0)
    };
    c.read_batch(repair_read)
        .await
        .expect("a repair's read names no ring and is answered");
    let answers = c
        .read_batch(reads(6))
        .await
        .expect("a newer ring")
        .into_inner()
        .results;
    assert!(answers[0].record.is_some());

    drop(c);
    node.kill9();
    node.restart();
    let mut c = node.client().await;
    stale(
        c.write_batch(batch(pb::BatchSource::Client, 4, "k4", base + 4))
            .await
            .expect_err("still fenced after kill -9"),
    );
    c.write_batch(batch(pb::BatchSource::Client, 5, "k4", base + 4))
        .await
        .expect("the fenced ring after the restart");
}

/// A sender killed in the middle of a stream and asked for it again after its restart goes on
/// from its checkpoint: every record reaches the target, and at most the batch in flight is
/// sent twice. One that lost its checkpoint file goes on from the copy the coordinator passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sender_resumes_its_stream_from_the_checkpoint() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    // Throttled, so the kill lands in the middle.
    let slow = [("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "400000")];
    let mut a = StorageNode::start_with_env("a", da.path(), None, &slow);
    let b = StorageNode::start("b", db.path(), None);
    let mut ca = a.client().await;
    let base = physical_counter(now_ms());
    const RECORDS: u64 = 4000;
    let value = vec![b'v'; 1000];
    for chunk in 0..RECORDS / 500 {
        let records = (0..500u64)
            .map(|i| {
                let n = chunk * 500 + i;
                put("t", format!("key-{n:06}").as_bytes(), base + n, &value)
            })
            .collect();
        load(&mut ca, records).await;
    }
    let request = pb::StartStreamingRequest {
        stream_id: "add-1-a-b".into(),
        // Two ranges: the whole ring in two halves.
        ranges: vec![
            cpb::HashRange {
                start: 0,
                end: 1 << 63,
            },
            cpb::HashRange {
                start: 1 << 63,
                end: 0,
            },
        ],
        target_node_id: "b".into(),
        target_address: b.grpc.to_string(),
        resume: None,
        dropped_tenants: Vec::new(),
        ring_digest: 0,
        ring_epoch: 0,
    };
    let bad = pb::StartStreamingRequest {
        stream_id: "../escape".into(),
        ..request.clone()
    };
    let refused = ca
        .start_streaming(bad)
        .await
        .expect_err("a path as stream id");
    assert_eq!(
        code_in(&refused),
        pb::ErrorCode::InvalidArgument,
        "{refused:?}"
    );
    ca.start_streaming(request.clone()).await.expect("start");
    let before_kill = copied_at_least(&mut ca, "add-1-a-b", 1000).await;
    assert!(
        before_kill < RECORDS,
        "killed in the middle ({before_kill} sent)"
    );
    drop(ca);
    a.kill9();
    let (mut ca, resumed) = restart_and_resume(&mut a, &request).await;
    assert!(
        resumed.keys_copied >= 500,
        "counters go on from the checkpoint: {resumed:?}"
    );
    // An orderly stop (SIGTERM) in the middle keeps the checkpoint too.
    let before_stop = copied_at_least(&mut ca, "add-1-a-b", 2000).await;
    assert!(
        before_stop < RECORDS,
        "stopped in the middle ({before_stop} sent)"
    );
    drop(ca);
    assert_eq!(a.terminate().code(), Some(0), "SIGTERM exits 0");
    let (mut ca, resumed) = restart_and_resume(&mut a, &request).await;
    assert!(
        resumed.keys_copied + 500 >= before_stop,
        "a stop keeps the checkpoint: {resumed:?} after {before_stop}"
    );
    // A sender that lost its own checkpoint (its streams directory wiped) goes on from the
    // coordinator's copy: the position its status reported, passed back as `resume`.
    copied_at_least(&mut ca, "add-1-a-b", 3000).await;
    let reported = stream_status(&mut ca, "add-1-a-b")
        .await
        .expect("status")
        .checkpoint
        .expect("the status reports its position");
    assert!(
        reported.keys < RECORDS,
        "wiped in the middle ({} sent)",
        reported.keys
    );
    drop(ca);
    a.kill9();
    std::fs::remove_dir_all(da.path().join("streams")).expect("wipe the checkpoints");
    let with_copy = pb::StartStreamingRequest {
        resume: Some(reported.clone()),
        ..request.clone()
    };
    let (mut ca, resumed) = restart_and_resume(&mut a, &with_copy).await;
    assert!(
        resumed.keys_copied >= reported.keys,
        "goes on from the copy: {resumed:?} after {reported:?}"
    );
    let done = wait_completed(&mut ca, "add-1-a-b", 120).await;
    // The copy may lag the last acknowledged batch by what was sent between the status and the
    // kill: a batch or two at this rate.
    assert!(
        done.keys_copied >= RECORDS && done.keys_copied <= RECORDS + 2000,
        "{} records sent for {RECORDS} (a batch or two twice per interruption)",
        done.keys_copied
    );
    let mut cb = b.client().await;
    assert_eq!(scan(&mut cb, 0, 0).await.len() as u64, RECORDS);
    assert!(
        !da.path().join("streams/add-1-a-b.ckpt").exists(),
        "the checkpoint goes with the stream"
    );
}

/// The disk thresholds are settings: a node whose full mark lies below the disk's usage
/// refuses every write with DISK_FULL and reports itself unhealthy, while reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_thresholds_come_from_the_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = "0.001";
    let node = StorageNode::start_with_env(
        "s1",
        dir.path(),
        None,
        &[
            ("PAIRDB_STORAGE_DISK_WARN_PERCENT", tiny),
            ("PAIRDB_STORAGE_DISK_THROTTLE_PERCENT", tiny),
            ("PAIRDB_STORAGE_DISK_FULL_PERCENT", tiny),
        ],
    );
    let mut c = node.client().await;
    let refused = write(&mut c, put("acme", b"k", physical_counter(now_ms()), b"1"))
        .await
        .expect_err("the disk is past the full mark");
    assert_eq!(code_in(&refused), pb::ErrorCode::DiskFull, "{refused:?}");
    assert_eq!(read(&mut c, "acme", b"k").await, None, "reads still answer");
    let health = c
        .health_check(pb::HealthCheckRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, pb::HealthStatus::Unhealthy as i32);
}

/// Anti-entropy requests are bounded and checked before any work: too many groups, a segment
/// past the tree, or a repair "as of" the node's future is INVALID_ARGUMENT; marks of a
/// comparison on a ring older than a write the node took are STALE_RING. None records a mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_requests_out_of_bounds_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = StorageNode::start("s1", dir.path(), None);
    let mut c = node.client().await;
    let segments = pairdb::engine::trees::SEGMENTS;
    let group = |first, count| pb::SegmentGroup { first, count };
    let too_many = vec![group(0, 1); pairdb::engine::trees::MAX_GROUPS + 1];
    let bad_groups = [too_many, vec![group(segments, 1)], vec![group(0, 0)]];
    for groups in bad_groups {
        let refused = c
            .segment_hashes(pb::SegmentHashesRequest {
                tenant_id: "acme".into(),
                groups,
            })
            .await
            .expect_err("out of bounds");
        assert_eq!(
            code_in(&refused),
            pb::ErrorCode::InvalidArgument,
            "{refused:?}"
        );
    }
    let refused = c
        .list_segments(pb::ListSegmentsRequest {
            tenant_id: "acme".into(),
            segments: vec![segments],
        })
        .await
        .expect_err("segment past the tree");
    assert_eq!(
        code_in(&refused),
        pb::ErrorCode::InvalidArgument,
        "{refused:?}"
    );
    let refused = c
        .mark_repaired(pb::MarkRepairedRequest {
            ranges: vec![pb::RepairedRange {
                tenant_id: "acme".into(),
                range: Some(cpb::HashRange { start: 0, end: 0 }),
                repaired_as_of_ms: now_ms() + 3_600_000,
            }],
            ring_epoch: 0,
        })
        .await
        .expect_err("repaired as of the future");
    assert_eq!(
        code_in(&refused),
        pb::ErrorCode::InvalidArgument,
        "{refused:?}"
    );
    // After a write placed on the ring of epoch 9, marks of a comparison on epoch 8 are late.
    c.write_batch(pb::WriteBatchRequest {
        records: vec![put("other", b"k", physical_counter(now_ms()), b"v")],
        source: pb::BatchSource::Client as i32,
        ring_digest: 0,
        ring_epoch: 9,
    })
    .await
    .expect("a write on the ring of epoch 9");
    let late = |ring_epoch: u64| pb::MarkRepairedRequest {
        ranges: vec![pb::RepairedRange {
            tenant_id: "acme".into(),
            range: Some(cpb::HashRange { start: 0, end: 0 }),
            repaired_as_of_ms: now_ms(),
        }],
        ring_epoch,
    };
    let refused = c
        .mark_repaired(late(8))
        .await
        .expect_err("marks of a comparison on an older ring");
    assert_eq!(code_in(&refused), pb::ErrorCode::StaleRing, "{refused:?}");
    assert!(
        !dir.path().join("repaired-ranges.json").exists(),
        "a refused mark records nothing"
    );
    // In bounds, an empty node answers.
    let ok = c
        .segment_hashes(pb::SegmentHashesRequest {
            tenant_id: "acme".into(),
            groups: vec![group(0, segments)],
        })
        .await
        .expect("in bounds")
        .into_inner();
    assert_eq!(ok.hashes, vec![0]);
}

/// An open storage port is not an open door: every RPC without the cluster secret, or with
/// another, is refused as UNAUTHENTICATED before it runs (a write changes nothing, a scan
/// returns nothing, a stream to an attacker's address never starts); with the secret it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_cluster_secret_are_refused() {
    use pairdb::rpc::auth::{ClusterSecret, internal_channel};
    let dir = tempfile::tempdir().expect("tempdir");
    let node = StorageNode::start("s1", dir.path(), None);
    let mut ok = node.client().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut bare = StorageNodeClient::new(channel.clone());
    let wrong = ClusterSecret::new("not-the-cluster-secret").expect("valid");
    let mut imposter = StorageNodeClient::new(internal_channel(channel, &wrong));
    let base = physical_counter(now_ms());
    let record = put("acme", b"k", base, b"\"v\"");

    let refused = |s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        s.message().to_owned()
    };
    let msg = refused(
        bare.write(pb::WriteRequest {
            record: Some(record.clone()),
        })
        .await
        .expect_err("write without the secret"),
    );
    assert!(msg.contains("without the cluster secret"), "{msg}");
    let msg = refused(
        imposter
            .write(pb::WriteRequest {
                record: Some(record.clone()),
            })
            .await
            .expect_err("write with another secret"),
    );
    assert!(msg.contains("wrong cluster secret"), "{msg}");
    refused(
        imposter
            .scan_range(pb::ScanRangeRequest {
                range: Some(cpb::HashRange { start: 0, end: 0 }),
                batch_size: 10,
                ..Default::default()
            })
            .await
            .expect_err("scan"),
    );
    refused(
        bare.start_streaming(pb::StartStreamingRequest {
            stream_id: "steal".into(),
            target_node_id: "x".into(),
            target_address: "127.0.0.1:1".into(),
            ranges: vec![cpb::HashRange { start: 0, end: 0 }],
            ..Default::default()
        })
        .await
        .expect_err("streaming"),
    );
    // Nothing was written, and no stream started.
    assert_eq!(read(&mut ok, "acme", b"k").await, None);
    let unknown = stream_status(&mut ok, "steal")
        .await
        .expect_err("no such stream");
    assert!(unknown.message().contains("unknown stream"), "{unknown:?}");
    // The same write with the secret lands.
    let r = write(&mut ok, record).await.expect("write with the secret");
    assert_eq!(r.outcome, pb::ApplyOutcome::Applied as i32);
}

/// A deleted tenant's namespace, once a node dropped it (or a stream start named it), is
/// fenced there for good: no client write, hint, repair or stream applies a record of it
/// (answered TENANT_DELETED, the rest of a batch applied), a stream does not send it, and the
/// fence survives `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tenant_is_fenced_against_every_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s1 = StorageNode::start("s1", &dir.path().join("s1"), None);
    let s2 = StorageNode::start("s2", &dir.path().join("s2"), None);
    let mut c = s1.client().await;
    let base = physical_counter(now_ms());
    for tenant in ["acme", "beta", "other"] {
        for i in 0..20u32 {
            write(&mut c, put(tenant, format!("k{i}").as_bytes(), base, b"1"))
                .await
                .expect("write");
        }
    }
    let dropped = c
        .drop_tenants(pb::DropTenantsRequest {
            tenant_ids: vec!["acme".into()],
            complete: false,
        })
        .await
        .expect("drop tenants")
        .into_inner();
    assert_eq!(dropped.records_dropped, 20);

    let deleted = pb::ApplyOutcome::TenantDeleted as i32;
    let applied = pb::ApplyOutcome::Applied as i32;
    for (n, source) in [
        pb::BatchSource::Client,
        pb::BatchSource::Hint,
        pb::BatchSource::Repair,
        pb::BatchSource::Stream,
    ]
    .into_iter()
    .enumerate()
    {
        let counter = base + 10 + n as u64;
        let answer = c
            .write_batch(pb::WriteBatchRequest {
                ring_epoch: 0,
                records: vec![
                    put("acme", b"late", counter, b"x"),
                    put("other", b"late", counter, b"x"),
                ],
                source: source as i32,
                ring_digest: 0,
            })
            .await
            .expect("write batch")
            .into_inner();
        assert_eq!(answer.outcomes, vec![deleted, applied], "{source:?}");
    }
    let unary = write(&mut c, put("acme", b"k1", base + 2, b"x"))
        .await
        .expect("write");
    assert_eq!(unary.outcome, deleted);
    assert_eq!(
        repair(&mut c, put("acme", b"k2", base + 2, b"x"))
            .await
            .outcome,
        deleted
    );
    assert!(read(&mut c, "acme", b"late").await.is_none());
    assert!(read(&mut c, "acme", b"k1").await.is_none());
    assert!(read(&mut c, "other", b"late").await.is_some());

    // A stream start that names beta fences it and does not send it.
    let status = c
        .start_streaming(pb::StartStreamingRequest {
            stream_id: "fenced-stream".into(),
            ranges: vec![cpb::HashRange { start: 0, end: 0 }],
            target_node_id: "s2".into(),
            target_address: s2.grpc.to_string(),
            resume: None,
            dropped_tenants: vec!["beta".into()],
            ring_digest: 0,
            ring_epoch: 0,
        })
        .await
        .expect("start streaming")
        .into_inner();
    assert_eq!(status.stream_id, "fenced-stream");
    wait_completed(&mut c, "fenced-stream", 60).await;
    let mut c2 = s2.client().await;
    let copied = scan(&mut c2, 0, 0).await;
    assert!(
        copied.keys().all(|(tenant, _)| tenant == "other"),
        "{:?}",
        copied.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        copied.len(),
        21,
        "every record of other, none of acme or beta"
    );
    let beta = write(&mut c, put("beta", b"k1", base + 3, b"x"))
        .await
        .expect("write");
    assert_eq!(beta.outcome, deleted);

    // A bad name is refused and fences nothing.
    let refused = c
        .drop_tenants(pb::DropTenantsRequest {
            tenant_ids: vec!["bad:tenant".into()],
            complete: true,
        })
        .await
        .expect_err("bad namespace");
    assert_eq!(code_in(&refused), pb::ErrorCode::InvalidArgument);

    // The fence is durable.
    drop(c);
    s1.kill9();
    s1.restart();
    let mut c = s1.client().await;
    for tenant in ["acme", "beta"] {
        let after = write(&mut c, put(tenant, b"k9", base + 4, b"x"))
            .await
            .expect("write");
        assert_eq!(after.outcome, deleted, "{tenant} after kill -9");
    }
    let live = write(&mut c, put("acme:2", b"k9", base + 4, b"x"))
        .await
        .expect("write");
    assert_eq!(live.outcome, applied, "the next incarnation is live");
}

/// A node that just started does not know which tenants were deleted while it was down, so it
/// refuses client writes (unary writes and deletes, client batches) with TENANTS_UNCONFIRMED
/// and client reads until a coordinator sends it the complete list (`DropTenants` with
/// `complete`); hints, repairs, streams and other reads are served meanwhile. Once confirmed,
/// reads of a dropped namespace are answered `tenant_deleted`, without a record. A partial list does not confirm it, and
/// every start (here after `kill -9`) begins unconfirmed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_client_writes_only_once_told_every_deleted_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s1 = StorageNode::start("s1", &dir.path().join("s1"), None);
    let mut c = s1.unconfirmed_client().await;
    let base = physical_counter(now_ms());
    let unconfirmed = |e: tonic::Status| {
        assert_eq!(code_in(&e), pb::ErrorCode::TenantsUnconfirmed, "{e:?}");
        assert_eq!(e.code(), tonic::Code::Unavailable, "retryable: {e:?}");
    };
    let read_batch = |source: pb::BatchSource| pb::ReadBatchRequest {
        ring_epoch: 0,
        reads: vec![pb::ReadRequest {
            tenant_id: "other".into(),
            key: b"k".to_vec().into(),
        }],
        source: source as i32,
    };
    let client_calls_refused = |c: StorageNodeClient<InternalChannel>, counter: u64| async move {
        let mut c = c;
        unconfirmed(
            write(&mut c, put("other", b"k", counter, b"x"))
                .await
                .expect_err("unary write"),
        );
        unconfirmed(
            c.delete(pb::DeleteRequest {
                tenant_id: "other".into(),
                key: b"k".to_vec().into(),
                version: Some(version(counter)),
            })
            .await
            .expect_err("unary delete"),
        );
        unconfirmed(
            c.write_batch(pb::WriteBatchRequest {
                ring_epoch: 0,
                records: vec![put("other", b"k", counter, b"x")],
                source: pb::BatchSource::Client as i32,
                ring_digest: 0,
            })
            .await
            .expect_err("client batch"),
        );
        unconfirmed(
            c.read_batch(read_batch(pb::BatchSource::Client))
                .await
                .expect_err("client read batch"),
        );
    };
    client_calls_refused(c.clone(), base).await;
    assert!(
        read(&mut c, "other", b"k").await.is_none(),
        "nothing landed"
    );

    let applied = pb::ApplyOutcome::Applied as i32;
    let deleted = pb::ApplyOutcome::TenantDeleted as i32;
    let batch = |source: pb::BatchSource, tenant: &str, counter: u64| pb::WriteBatchRequest {
        ring_epoch: 0,
        records: vec![put(tenant, b"k", counter, b"x")],
        source: source as i32,
        ring_digest: 0,
    };
    for (n, source) in [pb::BatchSource::Hint, pb::BatchSource::Repair]
        .into_iter()
        .enumerate()
    {
        let answer = c
            .write_batch(batch(source, "other", base + 1 + n as u64))
            .await
            .expect("not a client write")
            .into_inner();
        assert_eq!(answer.outcomes, vec![applied], "{source:?}");
    }
    assert!(read(&mut c, "other", b"k").await.is_some());
    let repair_read = c
        .read_batch(read_batch(pb::BatchSource::Repair))
        .await
        .expect("a repair's read")
        .into_inner();
    assert!(repair_read.results[0].record.is_some());

    // A partial list fences but does not confirm.
    c.drop_tenants(pb::DropTenantsRequest {
        tenant_ids: vec!["acme".into()],
        complete: false,
    })
    .await
    .expect("partial list");
    client_calls_refused(c.clone(), base + 5).await;
    // The last call of a complete list confirms.
    c.drop_tenants(pb::DropTenantsRequest {
        tenant_ids: vec!["beta".into()],
        complete: true,
    })
    .await
    .expect("complete list");
    let answer = c
        .write_batch(pb::WriteBatchRequest {
            ring_epoch: 0,
            records: vec![
                put("acme", b"k", base + 6, b"x"),
                put("beta", b"k", base + 6, b"x"),
                put("other", b"k", base + 6, b"x"),
            ],
            source: pb::BatchSource::Client as i32,
            ring_digest: 0,
        })
        .await
        .expect("confirmed")
        .into_inner();
    assert_eq!(answer.outcomes, vec![deleted, deleted, applied]);
    let reads = c
        .read_batch(pb::ReadBatchRequest {
            ring_epoch: 0,
            reads: ["acme", "other"]
                .into_iter()
                .map(|t| pb::ReadRequest {
                    tenant_id: t.into(),
                    key: b"k".to_vec().into(),
                })
                .collect(),
            source: pb::BatchSource::Client as i32,
        })
        .await
        .expect("confirmed read")
        .into_inner()
        .results;
    assert!(reads[0].tenant_deleted && reads[0].record.is_none());
    assert!(!reads[1].tenant_deleted && reads[1].record.is_some());
    assert_eq!(
        write(&mut c, put("other", b"k2", base + 6, b"x"))
            .await
            .expect("unary write")
            .outcome,
        applied
    );

    // Every start begins unconfirmed; the fences stay.
    drop(c);
    s1.kill9();
    s1.restart();
    let mut c = s1.unconfirmed_client().await;
    client_calls_refused(c.clone(), base + 7).await;
    let answer = c
        .write_batch(batch(pb::BatchSource::Hint, "acme", base + 7))
        .await
        .expect("hint")
        .into_inner();
    assert_eq!(answer.outcomes, vec![deleted]);
    assert!(read(&mut c, "other", b"k2").await.is_some());
}
