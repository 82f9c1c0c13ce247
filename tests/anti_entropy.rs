//! Anti-entropy over real processes: storage nodes, a coordinator and its repair service. A
//! replica that missed writes and deletes (paused, hints off) converges after one repair,
//! without any read touching the keys, also when nobody asks (the scheduled repair); a repair of
//! identical replicas fixes nothing. Targeted repair: a dropped hint, a read repair that failed
//! and one that found its queue full each leave markers that give the replica the key once it
//! is back, without another read.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::time::Duration;

use common::cluster::RoleProcess;
use common::coord::{
    Client, create_tenant, eventually, gossip_reports, node_state, put, sqlite_url, stored_record,
    wait_all_active, wait_migration,
};
use futures::future::join_all;
use pairdb::rpc::common::{Consistency, NodeState as WireState};
use pairdb::rpc::coordinator as pb;
use pairdb::rpc::storage as spb;

const KEYS: usize = 5000;
const DELETED: usize = 500;

fn key(i: usize) -> String {
    format!("key-{i:05}")
}

async fn delete(c: &mut Client, tenant: &str, key: &str) {
    c.delete_key_value(pb::DeleteKeyValueRequest {
        tenant_id: tenant.to_owned(),
        key: key.as_bytes().to_vec().into(),
        consistency: Consistency::Quorum as i32,
        ..Default::default()
    })
    .await
    .expect("delete at quorum");
}

/// Writes keys `0..count` of `tenant` at `level`, 100 at a time, key `i` with `value(i)`.
async fn write_keys(
    c: &Client,
    tenant: &str,
    count: usize,
    level: Consistency,
    value: fn(usize) -> String,
) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|&i| {
            let mut c = c.clone();
            async move {
                put(&mut c, tenant, &key(i), &value(i), level)
                    .await
                    .unwrap_or_else(|e| panic!("write {} at {level:?}: {e}", key(i)));
            }
        }))
        .await;
    }
}

/// The records of keys `0..count` on one node, read directly (batches of 500).
async fn held(node: &common::StorageNode, tenant: &str, count: usize) -> Vec<Option<spb::Record>> {
    let mut client = node.client().await;
    let mut all = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let reads = chunk
            .iter()
            .map(|&i| spb::ReadRequest {
                tenant_id: tenant.to_owned(),
                key: key(i).into_bytes().into(),
            })
            .collect();
        let answer = client
            .read_batch(spb::ReadBatchRequest {
                ring_epoch: 0,
                reads,
                source: spb::BatchSource::Unspecified as i32,
            })
            .await
            .expect("read batch")
            .into_inner();
        all.extend(answer.results.into_iter().map(|r| r.record));
    }
    all
}

/// Three storage nodes (`storage_env` added) and coordinator `c1` (SQLite metadata, no
/// scheduled repair, `coordinator_env` added), with tenant `acme` at RF 3.
async fn cluster(
    dir: &std::path::Path,
    storage_env: &[(&str, &str)],
    coordinator_env: &[(&str, &str)],
) -> (Vec<common::StorageNode>, RoleProcess, Client) {
    let storage = common::cluster::start_storage_with_env(3, dir, storage_env);
    let mut env = vec![("PAIRDB_COORDINATOR_AUTO_REPAIR", "false")];
    env.extend_from_slice(coordinator_env);
    let c1 = RoleProcess::coordinator("c1", &sqlite_url(dir), "memory://", &storage, &env, dir);
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    (storage, c1, c)
}

/// `cluster` with hints and read repair off (only a repair fixes what a replica missed) and
/// repairs paced at `repair_rate_limit` bytes/s ("0": unpaced).
async fn cluster_without_hints(
    dir: &std::path::Path,
    repair_rate_limit: &str,
) -> (Vec<common::StorageNode>, RoleProcess, Client) {
    cluster(
        dir,
        &[],
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
            ("PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT", repair_rate_limit),
        ],
    )
    .await
}

/// The coordinator's gossip view (what the write path follows; a failed health check alone
/// is not) reports `count` nodes as `what`.
/// Pauses `node` (SIGSTOP) once gossip saw every node up, and waits until it reports it down:
/// from then on no write is sent to it (none waits in its socket to land on resume).
async fn pause_until_gossip_says_down(c1: &RoleProcess, node: &common::StorageNode) {
    gossip_reports(c1, "up", 3).await;
    node.pause();
    gossip_reports(c1, "down", 1).await;
}

/// s3 paused (gossip saw it down) while keys `0..count` of each tenant are written at quorum,
/// then resumed and seen active again: it lacks every one of them (hints must be off).
async fn s3_misses_writes(
    c1: &RoleProcess,
    storage: &[common::StorageNode],
    c: &Client,
    tenants: &[&str],
    count: usize,
) {
    pause_until_gossip_says_down(c1, &storage[2]).await;
    for tenant in tenants {
        write_keys(c, tenant, count, Consistency::Quorum, |_| {
            "\"v\"".to_owned()
        })
        .await;
    }
    storage[2].resume();
    eventually("s3 seen up", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;
}

async fn repair(c: &mut Client) -> pb::Migration {
    let accepted = c
        .start_repair(pb::StartRepairRequest::default())
        .await
        .expect("start repair")
        .into_inner();
    wait_migration(c, &accepted.repair_id, pb::MigrationState::Completed).await
}

async fn status(c: &mut Client) -> pb::RepairStatus {
    c.get_repair_status(pb::RepairStatusRequest {})
        .await
        .expect("repair status")
        .into_inner()
}

/// Hints off; s3 paused (SIGSTOP) while 5,000 keys are written and 500 deleted at quorum;
/// resumed; one repair later every replica holds the same version of every key, read from
/// each node directly, and no client read touched the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_writes_and_deletes_converges_after_one_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, mut c) = cluster_without_hints(dir.path(), "0").await;
    // The keys to be deleted exist everywhere first, so a missed delete leaves a value behind.
    write_keys(&c, "acme", DELETED, Consistency::All, |_| {
        "\"old\"".to_owned()
    })
    .await;

    pause_until_gossip_says_down(&c1, &storage[2]).await;
    write_keys(&c, "acme", KEYS, Consistency::Quorum, |i| {
        format!("\"v{i}\"")
    })
    .await;
    for chunk in (0..DELETED).collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|&i| {
            let mut c = c.clone();
            async move { delete(&mut c, "acme", &key(i)).await }
        }))
        .await;
    }
    storage[2].resume();
    eventually("s3 seen up", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;

    let before = held(&storage[2], "acme", KEYS).await;
    let stale = before
        .iter()
        .enumerate()
        .filter(|(i, r)| match r {
            None => true,
            Some(r) => {
                *i < DELETED && !matches!(r.payload, Some(spb::record::Payload::Tombstone(_)))
            }
        })
        .count();
    assert_eq!(stale, KEYS, "s3 must have missed every write and delete");

    let done = repair(&mut c).await;
    assert_eq!(done.r#type(), pb::MigrationType::Repair);
    assert_eq!(done.keys_migrated, done.total_keys, "every range done");
    let views = [
        held(&storage[0], "acme", KEYS).await,
        held(&storage[1], "acme", KEYS).await,
        held(&storage[2], "acme", KEYS).await,
    ];
    for i in 0..KEYS {
        let first = views[0][i].as_ref().expect("s1 holds every key");
        for (n, view) in views.iter().enumerate().skip(1) {
            assert_eq!(view[i].as_ref(), Some(first), "{} on s{}", key(i), n + 1);
        }
        let deleted = matches!(first.payload, Some(spb::record::Payload::Tombstone(_)));
        assert_eq!(deleted, i < DELETED, "{}", key(i));
    }
    let after = status(&mut c).await;
    assert!(!after.ranges.is_empty());
    assert!(after.ranges.iter().all(|r| r.complete), "{after:?}");
    assert_eq!(after.ranges_never_repaired, 0);
    let fixed: u64 = after.ranges.iter().map(|r| r.keys_fixed).sum();
    assert_eq!(fixed, KEYS as u64, "one fix per key s3 missed");

    // Identical replicas: nothing to list, nothing to fix.
    repair(&mut c).await;
    let again = status(&mut c).await;
    assert_eq!(again.ranges.iter().map(|r| r.keys_compared).sum::<u64>(), 0);
    assert_eq!(again.ranges.iter().map(|r| r.keys_fixed).sum::<u64>(), 0);
    drop(c1);
}

fn is_tombstone(record: &Option<spb::Record>) -> bool {
    matches!(
        record.as_ref().and_then(|r| r.payload.as_ref()),
        Some(spb::record::Payload::Tombstone(_))
    )
}

async fn compact(node: &common::StorageNode) {
    node.client()
        .await
        .compact(spb::CompactRequest {})
        .await
        .expect("compact");
}

async fn read_at(c: &mut Client, key: &str, level: Consistency) -> Option<String> {
    match common::coord::get(c, "acme", key, level).await {
        Ok(v) => Some(v),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("read {key} at {level:?}: {s}"),
    }
}

/// Resurrection: s3 misses a delete (paused, hints off) and gc_grace is 1 s. Compactions on
/// s1 and s2 keep the tombstone: its range was never repaired. Once s3 is back, the key never
/// reads as present at QUORUM or ALL; a repair gives s3 the tombstone; after it, compactions
/// on every node purge the tombstone and no node holds the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_a_replica_missed_never_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, mut c) = cluster(
        dir.path(),
        &[("PAIRDB_STORAGE_GC_GRACE", "1s")],
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
            ("PAIRDB_COORDINATOR_MAX_CLOCK_SKEW", "500ms"),
            ("PAIRDB_COORDINATOR_REQUEST_TIMEOUT", "1s"),
        ],
    )
    .await;
    put(&mut c, "acme", "zombie", "\"alive\"", Consistency::All)
        .await
        .expect("write at all");

    pause_until_gossip_says_down(&c1, &storage[2]).await;
    delete(&mut c, "acme", "zombie").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &storage[..2] {
        compact(node).await;
        assert!(
            is_tombstone(&stored_record(node, "acme", "zombie").await),
            "{}: a tombstone past gc_grace in a range never repaired must stay",
            node.id
        );
    }
    storage[2].resume();
    eventually("s3 seen up", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;
    assert_eq!(
        common::coord::stored(&storage[2], "acme", "zombie")
            .await
            .map(|v| v.0)
            .as_deref(),
        Some("\"alive\""),
        "s3 missed the delete"
    );
    for level in [Consistency::Quorum, Consistency::All] {
        assert_eq!(read_at(&mut c, "zombie", level).await, None, "{level:?}");
    }

    // Past the repair's margin (request timeout + clock skew), then one repair.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    repair(&mut c).await;
    for node in &storage {
        assert!(
            is_tombstone(&stored_record(node, "acme", "zombie").await),
            "{} holds the tombstone after the repair",
            node.id
        );
    }
    for node in &storage {
        compact(node).await;
    }
    for node in &storage {
        assert_eq!(
            stored_record(node, "acme", "zombie").await,
            None,
            "{}: the tombstone is purged once every replica held it",
            node.id
        );
    }
    for level in [Consistency::One, Consistency::Quorum, Consistency::All] {
        assert_eq!(read_at(&mut c, "zombie", level).await, None, "{level:?}");
    }
    drop(c1);
}

/// Repair markers a node holds.
async fn markers(node: &common::StorageNode) -> Vec<spb::RepairMarker> {
    node.client()
        .await
        .list_repair_markers(spb::ListRepairMarkersRequest { limit: 1000 })
        .await
        .expect("list markers")
        .into_inner()
        .markers
}

/// A marker can name a node that no longer owns its key (a topology or RF change moved the
/// key since the write was missed). The targeted repair works it off on the key's owners now
/// and sends nothing to that node, where a cleanup would drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_for_a_node_that_no_longer_owns_the_key_repairs_only_the_owners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, _c1, mut c) = cluster(
        dir.path(),
        &[],
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms")],
    )
    .await;
    create_tenant(&mut c, "solo", 1).await;
    put(&mut c, "solo", "moved", "\"v1\"", Consistency::All)
        .await
        .expect("write");
    let mut owner = None;
    for node in &storage {
        if let Some(record) = stored_record(node, "solo", "moved").await {
            owner = Some((node, record));
        }
    }
    let (owner, record) = owner.expect("the key's owner holds it");
    let other = storage
        .iter()
        .find(|n| n.id != owner.id)
        .expect("a node that does not own the key");
    owner
        .client()
        .await
        .record_repair_markers(spb::RepairMarkersRequest {
            markers: vec![spb::RepairMarker {
                tenant_id: "solo".into(),
                key: b"moved".to_vec().into(),
                missed_node: other.id.clone(),
                version: record.version.clone(),
            }],
        })
        .await
        .expect("record a marker");
    eventually("the marker worked off", Duration::from_secs(20), || async {
        markers(owner).await.is_empty()
    })
    .await;
    assert!(
        stored_record(other, "solo", "moved").await.is_none(),
        "the repair wrote the key to {}, which does not own it",
        other.id
    );
    assert!(stored_record(owner, "solo", "moved").await.is_some());
}

/// A hint dropped at the end of its window (1 s) leaves a repair marker; the targeted repair
/// fixes the key within seconds of the target coming back, and clears the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_hint_is_repaired_soon_after_the_target_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, mut c) = cluster(
        dir.path(),
        &[],
        &[
            ("PAIRDB_COORDINATOR_MAX_HINT_WINDOW", "1s"),
            ("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
        ],
    )
    .await;
    pause_until_gossip_says_down(&c1, &storage[2]).await;
    put(&mut c, "acme", "hinted", "\"v1\"", Consistency::Quorum)
        .await
        .expect("write at quorum");
    // The hint expires and becomes markers on the other nodes.
    eventually("the expired hint marked", Duration::from_secs(20), || {
        let nodes = &storage[..2];
        async move {
            let mut total = 0;
            for node in nodes {
                total += markers(node)
                    .await
                    .iter()
                    .filter(|m| m.missed_node == "s3" && &m.key[..] == b"hinted")
                    .count();
            }
            total > 0
        }
    })
    .await;
    storage[2].resume();
    let back = std::time::Instant::now();
    eventually("s3 repaired", Duration::from_secs(20), || {
        let s3 = &storage[2];
        async move {
            common::coord::stored(s3, "acme", "hinted")
                .await
                .map(|v| v.0)
                .as_deref()
                == Some("\"v1\"")
        }
    })
    .await;
    eprintln!("s3 repaired {:?} after it came back", back.elapsed());
    eventually("markers cleared", Duration::from_secs(10), || {
        let nodes = &storage[..2];
        async move {
            for node in nodes {
                if !markers(node).await.is_empty() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drop(c1);
}

/// A repair limited to an arc of the ring (hints and read repair off, s3 missed every write):
/// s3 receives exactly the keys whose positions lie in the arc, and the repair's record counts
/// them as fixed; keys outside stay missing until a repair covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_of_one_arc_fixes_the_keys_in_it_and_no_other() {
    const WRITTEN: usize = 600;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, mut c) = cluster_without_hints(dir.path(), "0").await;
    s3_misses_writes(&c1, &storage, &c, &["acme"], WRITTEN).await;

    // An arc that wraps past the top of the ring: the last quarter and the first eighth.
    let arc = pairdb::ring::HashRange::new(3 << 62, 1 << 61);
    let in_arc: Vec<bool> = (0..WRITTEN)
        .map(|i| arc.contains(pairdb::ring::key_position("acme", key(i).as_bytes())))
        .collect();
    let inside = in_arc.iter().filter(|x| **x).count();
    assert!(
        inside > 0 && inside < WRITTEN,
        "{inside} of {WRITTEN} keys in the arc"
    );
    let accepted = c
        .start_repair(pb::StartRepairRequest {
            range: Some(arc.into()),
            ..Default::default()
        })
        .await
        .expect("start repair")
        .into_inner();
    wait_migration(&c, &accepted.repair_id, pb::MigrationState::Completed).await;
    let run = c
        .get_repair(pb::GetMigrationStatusRequest {
            migration_id: accepted.repair_id.clone(),
        })
        .await
        .expect("get repair")
        .into_inner();
    assert_eq!(run.keys_fixed, inside as u64, "{run:?}");
    assert_eq!(
        run.migration.as_ref().map(|m| m.node_id.as_str()),
        Some(format!("range={}-{}", arc.start, arc.end).as_str())
    );
    let s3 = held(&storage[2], "acme", WRITTEN).await;
    for (i, record) in s3.iter().enumerate() {
        assert_eq!(record.is_some(), in_arc[i], "{} on s3", key(i));
    }
    // A repair that is not one refuses the id.
    let missing = c
        .get_repair(pb::GetMigrationStatusRequest {
            migration_id: "no-such-repair".to_owned(),
        })
        .await
        .expect_err("unknown repair");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    drop(c1);
}

/// The coordinator running a repair dies (SIGKILL) in the middle of it: the other one takes the
/// repair over from its lease and completes it, and every replica ends with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_whose_coordinator_dies_is_taken_over_and_completed() {
    const TENANTS: [&str; 4] = ["t1", "t2", "t3", "t4"];
    const PER_TENANT: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    // Paced slowly (50 kB/s), so the repair is caught between two tenants.
    let env = [
        ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
        ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
        ("PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT", "50000"),
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
    ];
    let (storage, mut c1, mut a) = cluster(dir.path(), &[], &env).await;
    let c2 = RoleProcess::coordinator(
        "c2",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &env,
        dir.path(),
    );
    let b = c2.client().await;
    for tenant in TENANTS {
        create_tenant(&mut a, tenant, 3).await;
    }
    s3_misses_writes(&c1, &storage, &a, &TENANTS, PER_TENANT).await;

    let id = a
        .start_repair(pb::StartRepairRequest::default())
        .await
        .expect("start repair")
        .into_inner()
        .repair_id;
    eventually("one tenant repaired", Duration::from_secs(60), || {
        let (mut c, id) = (a.clone(), id.clone());
        async move { common::coord::migration(&mut c, &id).await.keys_migrated > 0 }
    })
    .await;
    c1.kill9();
    let left = common::coord::migration(&mut b.clone(), &id).await;
    assert_eq!(
        left.state(),
        pb::MigrationState::InProgress,
        "killed in the middle ({} of {} ranges)",
        left.keys_migrated,
        left.total_keys
    );
    let done = wait_migration(&b, &id, pb::MigrationState::Completed).await;
    assert_eq!(done.keys_migrated, done.total_keys);
    for tenant in TENANTS {
        let s3 = held(&storage[2], tenant, PER_TENANT).await;
        let missing = s3.iter().filter(|r| r.is_none()).count();
        assert_eq!(
            missing, 0,
            "{tenant}: s3 lacks {missing} keys after the repair"
        );
    }
    drop(c2);
}

/// Starts a repair and waits until it gave `s3` one of the keys `0..written` of `acme`;
/// returns its id.
async fn repair_until_the_first_fix(
    c: &mut Client,
    s3: &common::StorageNode,
    written: usize,
) -> String {
    let id = c
        .start_repair(pb::StartRepairRequest::default())
        .await
        .expect("start repair")
        .into_inner()
        .repair_id;
    eventually("the first fixes on s3", Duration::from_secs(60), || async {
        held(s3, "acme", written).await.iter().any(Option::is_some)
    })
    .await;
    id
}

/// A repair compares each tenant's ranges on the ring (and replication factors) of the
/// registry it read. When the registry epoch moves while it runs (here: another tenant's RF
/// is lowered in the middle of the first tenant's pass), what it compares no longer stands for
/// every replica: it fails instead of going on, and records no range as repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_during_which_the_registry_moves_fails() {
    const WRITTEN: usize = 1500;
    let dir = tempfile::tempdir().expect("tempdir");
    // Paced at 20 kB/s: fixing every key would take about half a minute.
    let (storage, c1, mut c) = cluster_without_hints(dir.path(), "20000").await;
    create_tenant(&mut c, "zeta", 3).await;
    s3_misses_writes(&c1, &storage, &c, &["acme"], WRITTEN).await;
    let id = repair_until_the_first_fix(&mut c, &storage[2], WRITTEN).await;
    c.update_replication_factor(pb::UpdateReplicationFactorRequest {
        tenant_id: "zeta".into(),
        replication_factor: 2,
    })
    .await
    .expect("lower zeta's RF");
    let failed = wait_migration(&c, &id, pb::MigrationState::Failed).await;
    assert!(
        failed.failure_reason.contains("changed during the repair"),
        "{failed:?}"
    );
    let repaired = status(&mut c).await;
    assert!(
        repaired.ranges_never_repaired > 0,
        "no range recorded as repaired: {repaired:?}"
    );
}

/// A cancel reaches a repair in the middle of a tenant's pass: it ends `cancelled` while the
/// replica still lacks keys, and nothing more is written to it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_cancelled_in_the_middle_of_a_tenant_stops_there() {
    const WRITTEN: usize = 1500;
    let dir = tempfile::tempdir().expect("tempdir");
    // Paced at 20 kB/s: fixing every key would take about half a minute.
    let (storage, c1, mut c) = cluster_without_hints(dir.path(), "20000").await;
    s3_misses_writes(&c1, &storage, &c, &["acme"], WRITTEN).await;
    let held_by_s3 = || async {
        held(&storage[2], "acme", WRITTEN)
            .await
            .iter()
            .filter(|r| r.is_some())
            .count()
    };

    let id = repair_until_the_first_fix(&mut c, &storage[2], WRITTEN).await;
    c.cancel_migration(pb::GetMigrationStatusRequest {
        migration_id: id.clone(),
    })
    .await
    .expect("cancel");
    wait_migration(&c, &id, pb::MigrationState::Cancelled).await;
    let at_cancel = held_by_s3().await;
    assert!(
        at_cancel < WRITTEN,
        "the cancel stopped the pass: s3 holds {at_cancel} of {WRITTEN}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        held_by_s3().await,
        at_cancel,
        "nothing written after the end"
    );
    let run = c
        .get_repair(pb::GetMigrationStatusRequest {
            migration_id: id.clone(),
        })
        .await
        .expect("get repair")
        .into_inner();
    assert_eq!(
        run.keys_fixed as usize, at_cancel,
        "the cancelled repair's record counts what it fixed"
    );
    let status = status(&mut c).await;
    assert_eq!(status.ranges_never_repaired as usize, status.ranges.len());
    drop(c1);
}

/// The repair service runs by itself every `repair_interval`: with hints and read repair off
/// and no read touching the keys, a replica that missed writes gets them without anyone
/// asking for a repair, and the repair that fixed them is on record as a full repair (subject
/// `*`) that completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_repair_fixes_a_replica_nobody_asked_about() {
    const WRITTEN: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, c) = cluster(
        dir.path(),
        &[],
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
            ("PAIRDB_COORDINATOR_REPAIR_RATE_LIMIT", "0"),
            // Overrides the helper's "false" (the later value of a variable wins).
            ("PAIRDB_COORDINATOR_AUTO_REPAIR", "true"),
            ("PAIRDB_COORDINATOR_REPAIR_INTERVAL", "3s"),
        ],
    )
    .await;
    s3_misses_writes(&c1, &storage, &c, &["acme"], WRITTEN).await;
    eventually(
        "a scheduled repair gives s3 every key",
        Duration::from_secs(90),
        || async {
            held(&storage[2], "acme", WRITTEN)
                .await
                .iter()
                .all(Option::is_some)
        },
    )
    .await;
    // The record says `completed` once the repair's last range is recorded, a moment after
    // its last fix landed.
    eventually(
        "the scheduled repair is on record as completed",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            async move {
                c.list_migrations(pb::ListMigrationsRequest { limit: 100 })
                    .await
                    .expect("migrations")
                    .into_inner()
                    .migrations
                    .iter()
                    .any(|m| {
                        m.migration_id.starts_with("repair-")
                            && m.node_id == "*"
                            && m.state == pb::MigrationState::Completed as i32
                    })
            }
        },
    )
    .await;
    drop(c1);
}

/// A counter of the coordinator's `/metrics` (the full series name, labels included; 0 when
/// absent).
async fn coordinator_counter(c1: &RoleProcess, series: &str) -> u64 {
    let text = common::http_get(c1.http, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The distinct keys that the markers on s1 and s2 say s3 missed.
async fn keys_marked_for_s3(storage: &[common::StorageNode]) -> usize {
    let mut keys = std::collections::BTreeSet::new();
    for node in &storage[..2] {
        for m in markers(node).await {
            if m.missed_node == "s3" {
                keys.insert(m.key.to_vec());
            }
        }
    }
    keys.len()
}

/// Reads keys `0..count` at ALL through the coordinator (`in_flight` at once), each once.
async fn read_all_once(c: &Client, count: usize, in_flight: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(in_flight) {
        join_all(chunk.iter().map(|&i| {
            let mut c = c.clone();
            async move {
                let value = common::coord::get(&mut c, "acme", &key(i), Consistency::All)
                    .await
                    .expect("read at all");
                assert_eq!(value, "\"v\"", "{}", key(i));
            }
        }))
        .await;
    }
}

/// s3 holds the value of every key `0..count`.
async fn s3_holds_all(storage: &[common::StorageNode], count: usize) -> bool {
    held(&storage[2], "acme", count).await.iter().all(|r| {
        matches!(
            r.as_ref().and_then(|r| r.payload.as_ref()),
            Some(spb::record::Payload::Value(v)) if &v[..] == b"\"v\""
        )
    })
}

/// Waits until the targeted repair gave s3 the value of every key `0..count` and cleared the
/// markers on s1 and s2.
async fn targeted_repair_gives_s3_every_key(storage: &[common::StorageNode], count: usize) {
    eventually(
        "the targeted repair gives s3 every key",
        Duration::from_secs(60),
        || s3_holds_all(storage, count),
    )
    .await;
    eventually("markers cleared", Duration::from_secs(20), || async {
        keys_marked_for_s3(storage).await == 0
    })
    .await;
}

/// The disk guard's thresholds of a storage node.
const DISK_THRESHOLDS: [&str; 3] = [
    "PAIRDB_STORAGE_DISK_WARN_PERCENT",
    "PAIRDB_STORAGE_DISK_THROTTLE_PERCENT",
    "PAIRDB_STORAGE_DISK_FULL_PERCENT",
];

/// Read repairs that fail leave durable markers: s3 answers reads but refuses every write (its
/// disk past a tiny full mark), hints off. Reads at ALL find it lacking every key; each read
/// repair is refused and becomes a marker on s1 and s2, which stays while s3 still refuses
/// (the targeted repair's writes fail too). Once s3 takes writes again, the targeted repair
/// gives it every key without any further read, and clears the markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_repair_leaves_a_marker_that_is_worked_off_once_the_replica_takes_writes() {
    const WRITTEN: usize = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut storage, c1, c) = cluster(
        dir.path(),
        &[],
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms"),
        ],
    )
    .await;
    storage[2].kill9();
    for threshold in DISK_THRESHOLDS {
        storage[2].set_env(threshold, Some("0.001"));
    }
    storage[2].restart();
    gossip_reports(&c1, "up", 3).await;
    gossip_reports(&c1, "health{status=\"unhealthy\"}", 1).await;
    write_keys(&c, "acme", WRITTEN, Consistency::Quorum, |_| {
        "\"v\"".to_owned()
    })
    .await;
    assert_eq!(keys_marked_for_s3(&storage).await, 0, "hints are off");
    read_all_once(&c, WRITTEN, 50).await;
    eventually(
        "every failed read repair marked",
        Duration::from_secs(30),
        || async { keys_marked_for_s3(&storage).await == WRITTEN },
    )
    .await;
    let failed = coordinator_counter(&c1, "pairdb_read_repairs_total{result=\"failed\"}").await;
    assert!(failed >= WRITTEN as u64, "{failed} read repairs failed");
    // The targeted repair tries and fails while s3 refuses writes; the markers stay.
    eventually(
        "a targeted repair refused",
        Duration::from_secs(30),
        || async {
            coordinator_counter(&c1, "pairdb_targeted_repairs_total{result=\"failed\"}").await > 0
        },
    )
    .await;
    assert_eq!(keys_marked_for_s3(&storage).await, WRITTEN);
    assert!(
        held(&storage[2], "acme", WRITTEN)
            .await
            .iter()
            .all(Option::is_none),
        "s3 took no write"
    );

    storage[2].kill9();
    for threshold in DISK_THRESHOLDS {
        storage[2].set_env(threshold, None);
    }
    storage[2].restart();
    targeted_repair_gives_s3_every_key(&storage, WRITTEN).await;
    drop((c1, c));
}

/// Read repairs that find their queue full (`read_repair_queue` = 1) leave durable markers
/// instead: s3 missed every write (paused, hints off), each key is read once at ALL, many at a
/// time, so most repairs are dropped at the queue; the targeted repair still gives s3 every
/// key without any further read, and clears the markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_repair_that_finds_its_queue_full_leaves_a_marker() {
    const WRITTEN: usize = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, c1, c) = cluster(
        dir.path(),
        &[],
        &[
            ("PAIRDB_COORDINATOR_HINTS_ENABLED", "false"),
            ("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_QUEUE", "1"),
        ],
    )
    .await;
    s3_misses_writes(&c1, &storage, &c, &["acme"], WRITTEN).await;
    read_all_once(&c, WRITTEN, 200).await;
    let dropped = coordinator_counter(&c1, "pairdb_read_repairs_total{result=\"dropped\"}").await;
    let queued = coordinator_counter(&c1, "pairdb_read_repairs_total{result=\"queued\"}").await;
    eprintln!("read repairs: {queued} queued, {dropped} dropped at the queue");
    assert!(
        dropped > 0,
        "no read repair found the queue full ({queued} queued): the test proves nothing"
    );
    targeted_repair_gives_s3_every_key(&storage, WRITTEN).await;
    drop(c1);
}
