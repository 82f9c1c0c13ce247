//! The hint replay loop against a real storage node and a real (SQLite) metadata store: live
//! hints are delivered in a batch and deleted after the ack; hints past the max window or the
//! max attempts are dropped undelivered; hints for an unreachable node are kept with one more
//! attempt counted.
//!
//! And the coordinator's stop-time drains, in process against the same real parts: the hint
//! writer stores every queued hint before its drain returns, the read-repair queue sends every
//! queued repair, and the storage pool's links answer every queued call before `close` returns.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::coord::records_on;
use common::{StorageNode, free_tcp_port};
use pairdb::coordinator::batcher::RingTag;
use pairdb::coordinator::hints::{HintWriter, Hinted, ReplayLimits, replay_round};
use pairdb::coordinator::membership::Membership;
use pairdb::coordinator::repair::RepairQueue;
use pairdb::coordinator::ring_view::RingView;
use pairdb::coordinator::storage_pool::StoragePool;
use pairdb::meta::{Hint, MetadataStore, NodeRecord, SqlMetadataStore};
use pairdb::ring::{NodeId, NodeState};
use pairdb::rpc::storage as pb;
use pairdb::vclock::{VectorClock, Version, physical_counter};
use pairdb::wallclock::now_ms;
use prost::Message;

fn record(key: &str) -> pb::Record {
    let version = Version::new(VectorClock::from_entries([(
        "c1",
        physical_counter(now_ms()),
    )]));
    pb::Record {
        tenant_id: "acme".into(),
        key: key.as_bytes().to_vec().into(),
        version: Some((&version).into()),
        payload: Some(pb::record::Payload::Value(b"\"hinted\"".to_vec().into())),
        ring_hash: 0,
        expires_at_ms: 0,
    }
}

fn hint(target: &str, key: &str, created_at_ms: i64, attempts: u32) -> Hint {
    let record = record(key);
    Hint {
        id: 0,
        target_node: target.into(),
        tenant_id: "acme".into(),
        record: record.encode_to_vec(),
        created_at_ms,
        attempts,
    }
}

fn node(id: &str, port: u16) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        host: "127.0.0.1".into(),
        port,
        virtual_nodes: 16,
        tokens: None,
        state: NodeState::Active,
    }
}

/// The replay's limits in these tests: a 3 h window, 5 attempts.
const LIMITS: ReplayLimits = ReplayLimits {
    interval: Duration::from_millis(100),
    max_window: Duration::from_secs(3 * 3600),
    max_attempts: 5,
    timeout: Duration::from_secs(2),
};

/// A replay without a coordinator: every hint goes to its target.
fn hinted<'a>(
    store: &'a dyn MetadataStore,
    ring: &'a RingView,
    pool: &'a StoragePool,
) -> Hinted<'a> {
    Hinted {
        store,
        ring,
        pool,
        owners: None,
    }
}

/// A hint stored for a tenant in the instant of its deletion is dropped by the replay, not
/// delivered; the other hints of the same target are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_drops_the_hints_of_deleted_tenants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = StorageNode::start("s1", &dir.path().join("s1"), None);
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store: Arc<dyn MetadataStore> =
        Arc::new(SqlMetadataStore::connect(&url).await.expect("store"));
    store
        .add_node(&node("s1", s1.grpc.port()))
        .await
        .expect("add");
    store.create_tenant("gone", 1).await.expect("create");
    store.delete_tenant("gone").await.expect("delete");
    // Stored after the delete removed the tenant's hints: a coordinator's straggler.
    let mut late = hint("s1", "late", now_ms() as i64, 0);
    let mut record = record("late");
    record.tenant_id = "gone".into();
    late.tenant_id = "gone".into();
    late.record = record.encode_to_vec();
    store
        .store_hints(&[late, hint("s1", "live", now_ms() as i64, 0)])
        .await
        .expect("store hints");
    let ring = RingView::load(store.clone(), Arc::new(Membership::default()))
        .await
        .expect("ring");
    let limits = LIMITS;
    let pool = StoragePool::new(common::internal_auth());
    replay_round(hinted(&*store, &ring, &pool), limits)
        .await
        .expect("round");
    assert!(store.hints_for("s1", 10).await.expect("hints").is_empty());
    let mut client = s1.client().await;
    for (tenant, key, delivered) in [("gone", "late", false), ("acme", "live", true)] {
        let found = client
            .read(pb::ReadRequest {
                tenant_id: tenant.into(),
                key: key.as_bytes().to_vec().into(),
            })
            .await
            .expect("read")
            .into_inner()
            .record;
        assert_eq!(found.is_some(), delivered, "{tenant}/{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_live_hints_and_drops_expired_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("s1");
    let s1 = StorageNode::start("s1", &data, None);
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store: Arc<dyn MetadataStore> =
        Arc::new(SqlMetadataStore::connect(&url).await.expect("store"));
    store
        .add_node(&node("s1", s1.grpc.port()))
        .await
        .expect("add");
    store
        .add_node(&node("gone", free_tcp_port()))
        .await
        .expect("add");

    let now = now_ms() as i64;
    let hour = 3_600_000;
    store
        .store_hints(&[
            hint("s1", "fresh-1", now, 0),
            hint("s1", "too-old", now - 4 * hour, 0),
            hint("s1", "fresh-2", now - hour, 2),
            hint("s1", "too-many-attempts", now, 5),
            hint("gone", "fresh-3", now, 0),
        ])
        .await
        .expect("store hints");

    let ring = RingView::load(store.clone(), Arc::new(Membership::default()))
        .await
        .expect("ring");
    let limits = LIMITS;
    let pool = StoragePool::new(common::internal_auth());
    replay_round(hinted(&*store, &ring, &pool), limits)
        .await
        .expect("round");

    let mut client = s1.client().await;
    let read = |key: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .read(pb::ReadRequest {
                    tenant_id: "acme".into(),
                    key: key.as_bytes().to_vec().into(),
                })
                .await
                .expect("read")
                .into_inner()
                .record
        }
    };
    assert!(read("fresh-1").await.is_some(), "live hint delivered");
    assert!(read("fresh-2").await.is_some(), "retried hint delivered");
    assert!(
        read("too-old").await.is_none(),
        "expired hint not delivered"
    );
    assert!(read("too-many-attempts").await.is_none());
    assert!(store.hints_for("s1", 10).await.expect("hints").is_empty());

    let kept = store.hints_for("gone", 10).await.expect("hints");
    assert_eq!(kept.len(), 1, "undeliverable hint kept");
    assert_eq!(kept[0].attempts, 1, "one failed attempt counted");
    drop(
        client
            .health_check(pb::HealthCheckRequest {})
            .await
            .expect("node still fine"),
    );
}

/// A hint delivery carries the registry epoch it was placed on. A target whose ring fence is
/// above it (a cleanup fenced a newer ring) refuses it and applies nothing; the replay counts
/// no attempt, reads the registry again, and delivers on the newer ring in its next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_replay_placed_on_a_ring_older_than_the_targets_fence_waits_for_a_newer_ring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s1, store, ring) = one_node(dir.path()).await;
    let held = ring.snapshot().epoch;
    let mut client = s1.client().await;
    client
        .fence_ring(pb::FenceRingRequest { epoch: held + 1 })
        .await
        .expect("fence s1 above the ring the replay holds");
    // The registry moves on (a node added raises its epoch to the fence); the replay's ring
    // has not seen it.
    store
        .add_node(&node("s2", free_tcp_port()))
        .await
        .expect("add");
    store
        .store_hints(&[hint("s1", "fenced", now_ms() as i64, 0)])
        .await
        .expect("store hints");
    let limits = LIMITS;
    let pool = StoragePool::new(common::internal_auth());
    let read = |client: &mut pb::storage_node_client::StorageNodeClient<_>| {
        let mut client = client.clone();
        async move {
            client
                .read(pb::ReadRequest {
                    tenant_id: "acme".into(),
                    key: b"fenced".to_vec().into(),
                })
                .await
                .expect("read")
                .into_inner()
                .record
        }
    };
    replay_round(hinted(&*store, &ring, &pool), limits)
        .await
        .expect("round");
    assert!(read(&mut client).await.is_none(), "refused, not applied");
    let kept = store.hints_for("s1", 10).await.expect("hints");
    assert_eq!(kept.len(), 1, "the hint is kept");
    assert_eq!(
        kept[0].attempts, 0,
        "a stale ring is not the hint's failure"
    );
    assert!(
        ring.snapshot().epoch > held,
        "the refusal made the replay read the registry"
    );
    replay_round(hinted(&*store, &ring, &pool), limits)
        .await
        .expect("round");
    assert!(
        read(&mut client).await.is_some(),
        "delivered on the newer ring"
    );
    assert!(store.hints_for("s1", 10).await.expect("hints").is_empty());
}

/// A storage node `s1` registered in a fresh SQLite store, and the ring read from it.
async fn one_node(dir: &std::path::Path) -> (StorageNode, Arc<dyn MetadataStore>, Arc<RingView>) {
    let s1 = StorageNode::start("s1", &dir.join("s1"), None);
    let url = format!("sqlite://{}", dir.join("meta.db").display());
    let store: Arc<dyn MetadataStore> =
        Arc::new(SqlMetadataStore::connect(&url).await.expect("store"));
    store
        .add_node(&node("s1", s1.grpc.port()))
        .await
        .expect("add");
    let ring = RingView::load(store.clone(), Arc::new(Membership::default()))
        .await
        .expect("ring");
    (s1, store, ring)
}

const QUEUED: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hint_writer_drain_stores_every_queued_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store: Arc<dyn MetadataStore> =
        Arc::new(SqlMetadataStore::connect(&url).await.expect("store"));
    let writer = HintWriter::start(Some(store.clone()), None);
    let replicas = [NodeId::new("s1"), NodeId::new("s2")];
    for i in 0..QUEUED {
        writer.hint("s1", &record(&format!("k{i}")), &replicas);
    }
    assert!(writer.queued() > 0, "the hints are still queued");
    let drained = writer.drain(Duration::from_secs(30)).await;
    assert_eq!(drained.lost, 0);
    let counts = store.hint_counts().await.expect("counts");
    assert_eq!(
        counts,
        vec![("s1".to_owned(), QUEUED as u64)],
        "every hint stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_repair_drain_sends_every_queued_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s1, _store, ring) = one_node(dir.path()).await;
    let pool = Arc::new(StoragePool::new(common::internal_auth()));
    let epoch = ring.snapshot().epoch;
    let repairs = RepairQueue::start(QUEUED, ring, pool, Duration::from_secs(5));
    let keys: Vec<String> = (0..QUEUED).map(|i| format!("r{i}")).collect();
    for key in &keys {
        repairs.push("s1".into(), record(key), epoch);
    }
    assert_eq!(
        repairs.drain(Duration::from_secs(30)).await,
        0,
        "nothing left"
    );
    assert_eq!(
        records_on(&s1).await,
        QUEUED,
        "every repair applied before the drain returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_storage_pool_answers_every_queued_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s1, _store, _ring) = one_node(dir.path()).await;
    // The batcher sends client writes, which a node takes once told the deleted tenants (a
    // coordinator's write path does that on the first refusal; here the test client does).
    s1.client().await;
    let pool = StoragePool::new(common::internal_auth());
    let address = s1.grpc.to_string();
    let batcher = pool.batcher("s1", &address).expect("batcher");
    let keys: Vec<String> = (0..QUEUED).map(|i| format!("w{i}")).collect();
    let calls: Vec<_> = keys
        .iter()
        .map(|key| {
            let (batcher, record) = (batcher.clone(), record(key));
            tokio::spawn(async move { batcher.write("s1", record, RingTag::default()).await })
        })
        .collect();
    drop(batcher);
    assert!(
        pool.close(Duration::from_secs(30)).await,
        "every link ended"
    );
    assert_eq!(
        records_on(&s1).await,
        QUEUED,
        "every queued write applied before close returned"
    );
    for call in calls {
        assert!(
            call.await.expect("call task").is_ok(),
            "every call answered"
        );
    }
}
