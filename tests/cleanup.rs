//! Cleanup against real processes (SEMANTICS.md, "Topology changes"): after a node joins, the
//! old owners drop what they gave away, only once a quorum of each key's new owners is verified
//! to hold it; every key still reads back at ALL, and the old owners' disks shrink to their new
//! share.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::StorageNode;
use common::cluster::{
    RoleProcess, join_storage, join_storage_with_env, start_storage, start_storage_with_env,
};
use common::coord::{
    Client, code, create_tenant, eventually, get, list_from, listed_ring, put, sqlite_url,
    stored_record, wait_all_active, wait_migration,
};
use pairdb::ring::{NodeId, Ring, key_position};
use pairdb::rpc::common::{self as cpb, Consistency, NodeState as WireState};
use pairdb::rpc::coordinator::{self as pb, ErrorCode};
use pairdb::rpc::storage as spb;
use pairdb::vclock::physical_counter;

/// One multi-process cluster at a time: gossip heartbeats starve on 2 cores otherwise.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TENANTS: [(&str, u32); 2] = [("three", 3), ("one", 1)];

fn coordinator(storage: &[StorageNode], dir: &Path, env: &[(&str, &str)]) -> RoleProcess {
    RoleProcess::coordinator("c1", &sqlite_url(dir), "memory://", storage, env, dir)
}

async fn cleanup(
    c: &mut Client,
    node: Option<&str>,
    force: bool,
) -> Result<pb::CleanupAccepted, tonic::Status> {
    c.start_cleanup(pb::StartCleanupRequest {
        node_id: node.unwrap_or_default().to_owned(),
        force,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Adds `node` to the ring through `c` and waits until the addition completed.
async fn add_node(c: &mut Client, node: &StorageNode) {
    let added = c
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: node.id.clone(),
            host: node.grpc.ip().to_string(),
            port: u32::from(node.grpc.port()),
            virtual_nodes: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("add {}: {e}", node.id))
        .into_inner();
    wait_migration(c, &added.migration_id, pb::MigrationState::Completed).await;
}

/// The id of the first cleanup `c` lists, waiting up to a minute for one (nobody asks: the
/// automatic one).
async fn first_cleanup(c: &mut Client) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = c
            .list_migrations(pb::ListMigrationsRequest { limit: 10 })
            .await
            .map(|r| r.into_inner().migrations)
            .unwrap_or_default();
        if let Some(m) = list
            .iter()
            .find(|m| m.r#type() == pb::MigrationType::Cleanup)
        {
            return m.migration_id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no automatic cleanup");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A cleanup, asked again while gossip still calls a node that just came back down.
async fn cleanup_when_up(c: &mut Client, node: Option<&str>) -> pb::CleanupAccepted {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match cleanup(c, node, false).await {
            Ok(accepted) => return accepted,
            Err(e)
                if code(&e) == ErrorCode::Unavailable && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cleanup: {e:?}"),
        }
    }
}

/// A read at ALL, asked again while the coordinator answers QUORUM_NOT_REACHED (at most
/// 30 s): on this 2-core machine, with the whole suite running, gossip can call a live owner
/// down for a moment after the pause above, and a read then finds no replica to ask. Any
/// other answer (a value, a missing key, another error) is returned at once.
async fn get_all_when_up(c: &mut Client, tenant: &str, key: &str) -> Result<String, tonic::Status> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match get(c, tenant, key, Consistency::All).await {
            Err(e)
                if code(&e) == ErrorCode::QuorumNotReached
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answer => return answer,
        }
    }
}

/// Every (tenant, key) a node holds, keys only.
async fn held(node: &StorageNode) -> Vec<(String, String)> {
    let mut scan = node
        .client()
        .await
        .scan_range(spb::ScanRangeRequest {
            range: Some(cpb::HashRange { start: 0, end: 0 }),
            batch_size: 1000,
            keys_only: true,
        })
        .await
        .expect("scan")
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = scan.message().await.expect("scan batch") {
        for r in batch.records {
            assert!(r.payload.is_none(), "a keys-only scan carries no values");
            out.push((
                r.tenant_id,
                String::from_utf8(r.key.to_vec()).expect("utf-8"),
            ));
        }
    }
    out
}

/// How many of `keys` `node` holds without owning them at its tenant's RF.
fn not_owned(ring: &Ring, node: &str, keys: &[(String, String)]) -> usize {
    let rf = |t: &str| {
        TENANTS
            .iter()
            .find(|(n, _)| *n == t)
            .map_or(3, |(_, rf)| *rf) as usize
    };
    keys.iter()
        .filter(|(t, k)| {
            !ring
                .natural_owners(key_position(t, k.as_bytes()), rf(t))
                .iter()
                .any(|o| o.as_str() == node)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_verifies_the_new_owners_then_drops_what_old_owners_gave_away() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let manual = [
        ("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false"),
        ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500"),
    ];
    let c1 = coordinator(&storage, dir.path(), &manual);
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    for (tenant, rf) in TENANTS {
        create_tenant(&mut c, tenant, rf).await;
    }
    const KEYS: usize = 600;
    for (tenant, _) in TENANTS {
        for i in 0..KEYS {
            put(
                &mut c,
                tenant,
                &format!("k{i}"),
                &format!("\"{i}\""),
                Consistency::All,
            )
            .await
            .unwrap_or_else(|e| panic!("write {tenant}/k{i}: {e}"));
        }
    }
    add_node(&mut c, &s4).await;
    // Too soon: coordinators may not have switched rings yet.
    let early = cleanup(&mut c, None, false).await.expect_err("too soon");
    assert_eq!(code(&early), ErrorCode::NodeInUse, "{early:?}");
    assert!(early.message().contains("retry in"), "{early:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    let ring = listed_ring(&mut c, &all).await;
    let mut before = BTreeMap::new();
    for node in &storage {
        let keys = held(node).await;
        before.insert(
            node.id.clone(),
            (keys.len(), not_owned(&ring, &node.id, &keys)),
        );
    }
    let given_away: usize = before.values().map(|(_, n)| n).sum();
    assert!(
        given_away > 100,
        "old owners hold what s4 took over: {before:?}"
    );

    // A new owner down: refused up front, nothing changes.
    s4.pause();
    eventually("s4 down", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { common::coord::node_state(&mut c, "s4").await == Some(WireState::Down) }
    })
    .await;
    let refused = cleanup(&mut c, None, false).await.expect_err("s4 is down");
    assert_eq!(code(&refused), ErrorCode::Unavailable, "{refused:?}");
    assert!(refused.message().contains("s4"), "{refused:?}");
    s4.resume();
    wait_all_active(&c, 4).await;
    // Health checks answer before gossip calls s4 up again; writes follow gossip.
    eventually(
        "gossip reports every node up",
        Duration::from_secs(30),
        || {
            let http = c1.http;
            async move {
                common::http_get(http, "/metrics")
                    .await
                    .contains("pairdb_storage_nodes_down 0")
            }
        },
    )
    .await;

    // An old owner holds a version newer than any owner of its key (written to it alone, as a
    // stale coordinator might have, its hints lost): no repair compares it (repairs compare
    // owners), so the cleanup hands it over to the owner before it drops it.
    let (tenant, key) = ("one", "k7");
    let (owner, stray) = owner_and_stray(&ring, &storage, tenant, key);
    stray
        .client()
        .await
        .write(spb::WriteRequest {
            record: Some(newest_record(tenant, key, "\"stray\"")),
        })
        .await
        .expect("write to the stray node");
    let accepted = cleanup_when_up(&mut c, Some(&stray.id)).await;
    assert_eq!(accepted.node_ids, vec![stray.id.clone()]);
    let done = wait_migration(&c, &accepted.cleanup_id, pb::MigrationState::Completed).await;
    assert_eq!(done.r#type(), pb::MigrationType::Cleanup);
    let dropped_on_stray = done.keys_migrated as usize;
    let kept = held(stray).await;
    assert_eq!(
        not_owned(&ring, &stray.id, &kept),
        0,
        "{} cleaned",
        stray.id
    );
    assert_eq!(
        get_all_when_up(&mut c, tenant, key).await.expect("k7"),
        "\"stray\"",
        "the stray copy was handed over to {owner} before it was dropped"
    );
    assert!(
        common::http_get(c1.http, "/metrics")
            .await
            .contains("pairdb_cleanup_records_handed_over_total 1"),
        "one record handed over"
    );
    if let Some(counts) = before.get_mut(&stray.id) {
        counts.0 = kept.len();
    }

    // A later write wins over the handed-over version as over any other.
    eventually("rewrite one/k7", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            put(&mut c, tenant, key, "\"fixed\"", Consistency::All)
                .await
                .is_ok()
        }
    })
    .await;
    let accepted = cleanup_when_up(&mut c, None).await;
    assert_eq!(accepted.node_ids.len(), 4);
    let done = wait_migration(&c, &accepted.cleanup_id, pb::MigrationState::Completed).await;
    assert!(
        done.bytes_migrated > 0,
        "bytes reclaimed are recorded: {done:?}"
    );
    let mut dropped = 0;
    for node in &storage {
        let keys = held(node).await;
        assert_eq!(
            not_owned(&ring, &node.id, &keys),
            0,
            "{} kept keys it gave away",
            node.id
        );
        dropped += before[&node.id].0 - keys.len();
    }
    assert_eq!(done.keys_migrated as usize, dropped);
    assert!(
        dropped + dropped_on_stray >= given_away,
        "dropped {dropped} + {dropped_on_stray}, given away {given_away}"
    );
    for (tenant, _) in TENANTS {
        for i in 0..KEYS {
            let key = format!("k{i}");
            let want = if (tenant, key.as_str()) == ("one", "k7") {
                "\"fixed\"".to_owned()
            } else {
                format!("\"{i}\"")
            };
            let got = get_all_when_up(&mut c, tenant, &key)
                .await
                .unwrap_or_else(|e| panic!("read {tenant}/{key} at ALL: {e}"));
            assert_eq!(got, want, "{tenant}/{key}");
        }
    }
    let again = cleanup(&mut c, Some("s9"), false).await.expect_err("no s9");
    assert_eq!(code(&again), ErrorCode::NodeNotFound, "{again:?}");

    // An owner that does not take a handed-over record (here: fenced at a ring newer than the
    // registry's, so it refuses every write placed on the cleanup's ring): nothing is dropped.
    // Last in this test, since that owner refuses the coordinator's writes from here on.
    let (tenant, key) = ("one", "k8");
    let (owner, stray) = owner_and_stray(&ring, &storage, tenant, key);
    let owner = all
        .iter()
        .find(|n| n.id == owner.as_str())
        .expect("k8's owner");
    let epoch = stray
        .client()
        .await
        .fence_ring(spb::FenceRingRequest { epoch: 1 })
        .await
        .expect("the stray node's fence")
        .into_inner()
        .floor;
    // A cleaned node is fenced: a write names the ring it was placed on.
    stray
        .client()
        .await
        .write_batch(spb::WriteBatchRequest {
            records: vec![newest_record(tenant, key, "\"stray\"")],
            source: spb::BatchSource::Repair as i32,
            ring_digest: 0,
            ring_epoch: epoch,
        })
        .await
        .expect("write to the stray node");
    owner
        .client()
        .await
        .fence_ring(spb::FenceRingRequest { epoch: epoch + 1 })
        .await
        .expect("fence the owner above the registry");
    let accepted = cleanup_when_up(&mut c, Some(&stray.id)).await;
    let failed = wait_migration(&c, &accepted.cleanup_id, pb::MigrationState::Failed).await;
    assert!(
        failed.failure_reason.contains("hand-over write")
            && failed.failure_reason.contains(&owner.id),
        "{failed:?}"
    );
    assert!(
        held(stray)
            .await
            .contains(&(tenant.to_owned(), key.to_owned())),
        "nothing dropped on {}",
        stray.id
    );
}

/// The owner of `tenant`/`key` at RF 1 on `ring`, and a node of `storage` that does not own it.
fn owner_and_stray<'a>(
    ring: &Ring,
    storage: &'a [StorageNode],
    tenant: &str,
    key: &str,
) -> (NodeId, &'a StorageNode) {
    let owner = ring.natural_owners(key_position(tenant, key.as_bytes()), 1)[0].clone();
    let stray = storage
        .iter()
        .find(|n| n.id != owner.as_str())
        .unwrap_or_else(|| panic!("a node that does not own {key}"));
    (owner, stray)
}

/// A record of `tenant`/`key` holding `value`, newer than every version written before.
fn newest_record(tenant: &str, key: &str, value: &str) -> spb::Record {
    spb::Record {
        tenant_id: tenant.into(),
        key: key.as_bytes().to_vec().into(),
        version: Some(cpb::Version {
            clock: vec![cpb::ClockEntry {
                coordinator_id: "elsewhere".into(),
                counter: physical_counter(pairdb::wallclock::now_ms()),
            }],
            timestamp_ms: 0,
        }),
        payload: Some(spb::record::Payload::Value(
            value.as_bytes().to_vec().into(),
        )),
        ring_hash: 0,
        expires_at_ms: 0,
    }
}

/// Every file under `dir` with its size, for failure messages.
fn listing(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            out += &listing(&entry.path());
        } else {
            out += &format!("\n  {} {}", entry.path().display(), meta.len());
        }
    }
    out
}

/// Bytes under `dir`, recursively.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            disk_use(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_cleanup_brings_old_owners_disks_to_their_new_share() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(2, dir.path());
    let s3 = join_storage("s3", dir.path(), &storage);
    let quick = [
        ("PAIRDB_COORDINATOR_CLEANUP_GRACE_S", "2"),
        ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500"),
    ];
    let c1 = coordinator(&storage, dir.path(), &quick);
    let mut c = c1.client().await;
    wait_all_active(&c, 2).await;
    create_tenant(&mut c, "big", 1).await;
    // 400 MiB over two nodes: 200 MiB each.
    const KEYS: usize = 1600;
    const VALUE: usize = 256 * 1024;
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..KEYS).step_by(8) {
                let value = format!("\"{}\"", "x".repeat(VALUE - 2));
                put(&mut c, "big", &format!("k{i}"), &value, Consistency::All)
                    .await
                    .unwrap_or_else(|e| panic!("write big/k{i}: {e}"));
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    for node in &storage {
        let used = disk_use(&node.dir);
        assert!(used >= 200 << 20, "{} holds {used} bytes", node.id);
    }
    add_node(&mut c, &s3).await;

    // No one asks: the cleanup starts once the grace passed.
    let cleanup_id = first_cleanup(&mut c).await;
    let done = wait_migration(&c, &cleanup_id, pb::MigrationState::Completed).await;
    assert!(done.bytes_migrated > 100 << 20, "{done:?}");

    let all: Vec<&StorageNode> = storage.iter().chain([&s3]).collect();
    let ring = listed_ring(&mut c, &all).await;
    for node in &storage {
        let owned = (0..KEYS)
            .filter(|i| {
                ring.natural_owners(key_position("big", format!("k{i}").as_bytes()), 1)[0].as_str()
                    == node.id
            })
            .count();
        let share = (owned * VALUE) as f64;
        let used = disk_use(&node.dir) as f64;
        assert!(
            (used - share).abs() <= share * 0.2,
            "{} uses {used} bytes for a share of {share} ({owned} keys): {}",
            node.id,
            listing(&node.dir)
        );
    }
    for i in (0..KEYS).step_by(40) {
        let got = get(&mut c, "big", &format!("k{i}"), Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("read big/k{i} at ALL: {e}"));
        assert_eq!(got.len(), VALUE, "big/k{i}");
    }
}

/// A node addition ended by `c1`, whose wall clock runs 60 s behind, so its record looks a
/// minute old at once; `c2` (environment `c2_env` besides a 500 ms ring refresh) shares the
/// metadata store. Returns when the addition completed.
struct SkewedChange {
    _dir: tempfile::TempDir,
    _storage: Vec<StorageNode>,
    _s4: StorageNode,
    _c1: RoleProcess,
    _c2: RoleProcess,
    c2: Client,
}

/// `None` when libfaketime is missing (the test is skipped, or fails under CI).
async fn skewed_change(test: &str, c2_env: &[(&str, &str)]) -> Option<SkewedChange> {
    let Some(faketime) = common::backends::libfaketime() else {
        common::backends::skip_or_fail(test, "libfaketime (apt-get install faketime)");
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let refresh = ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500");
    let behind = [
        ("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false"),
        refresh,
        ("LD_PRELOAD", faketime),
        ("FAKETIME", "-60s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_DONT_RESET", "1"),
    ];
    let url = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &url, "memory://", &storage, &behind, dir.path());
    let mut a = c1.client().await;
    wait_all_active(&a, 3).await;
    let mut env = vec![refresh];
    env.extend_from_slice(c2_env);
    let c2 = RoleProcess::coordinator("c2", &url, "memory://", &storage, &env, dir.path());
    let b = c2.client().await;
    wait_all_active(&b, 3).await;
    create_tenant(&mut a, "three", 3).await;
    for i in 0..50 {
        put(&mut a, "three", &format!("k{i}"), "\"v\"", Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("write k{i}: {e}"));
    }
    add_node(&mut a, &s4).await;
    Some(SkewedChange {
        _dir: dir,
        _storage: storage,
        _s4: s4,
        _c1: c1,
        _c2: c2,
        c2: b,
    })
}

/// The settle wait before a cleanup does not trust another coordinator's wall clock: after
/// [`skewed_change`], `c2` still refuses a cleanup until it has held the new ring for the
/// settle time on its own clock (a coordinator that had not switched rings could write to an
/// old owner after the drop). Without that second clock, `c2` accepts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_waits_for_the_settle_time_on_its_own_clock_whatever_the_change_record_says() {
    let _serial = SERIAL.lock().await;
    let manual = [("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false")];
    let Some(mut change) = skewed_change(
        "a_cleanup_waits_for_the_settle_time_on_its_own_clock_whatever_the_change_record_says",
        &manual,
    )
    .await
    else {
        return;
    };
    let early = cleanup(&mut change.c2, None, false)
        .await
        .expect_err("c2 has not held the new ring for the settle time");
    assert_eq!(code(&early), ErrorCode::NodeInUse, "{early:?}");
    assert!(
        early.message().contains("this coordinator's ring changed"),
        "{early:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let accepted = cleanup_when_up(&mut change.c2, None).await;
    wait_migration(
        &change.c2,
        &accepted.cleanup_id,
        pb::MigrationState::Completed,
    )
    .await;
}

/// The automatic cleanup's grace passes on the cleaning coordinator's own clock too: after
/// [`skewed_change`] the record says a minute ago, yet `c2` (grace 8 s) starts no cleanup in
/// the first 5 s, and does start one later. Without its own clock it started one after the
/// settle time (about 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_cleanup_waits_its_grace_on_its_own_clock() {
    let _serial = SERIAL.lock().await;
    let auto = [("PAIRDB_COORDINATOR_CLEANUP_GRACE_S", "8")];
    let Some(mut change) = skewed_change(
        "the_automatic_cleanup_waits_its_grace_on_its_own_clock",
        &auto,
    )
    .await
    else {
        return;
    };
    let completed = std::time::Instant::now();
    let cleanup_id = first_cleanup(&mut change.c2).await;
    assert!(
        completed.elapsed() >= Duration::from_secs(5),
        "a cleanup started {:?} after the change, within its 8 s grace",
        completed.elapsed()
    );
    wait_migration(&change.c2, &cleanup_id, pb::MigrationState::Completed).await;
}

/// A coordinator that was stalled across a node addition places its first requests after the
/// stall on the ring of now, not on the one it had before: `c2` is paused (SIGSTOP) while `c1`
/// adds `s4`, resumed, and at once writes 30 keys at ALL; every one whose owners now include
/// `s4` is on `s4`. Before, `c2` kept its old ring until its refresh loop ran again, and those
/// writes went to the old owners only, the ones a cleanup drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_back_from_a_stall_places_writes_on_the_current_ring() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let env = [("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false")];
    let url = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &url, "memory://", &storage, &env, dir.path());
    let mut a = c1.client().await;
    wait_all_active(&a, 3).await;
    let c2 = RoleProcess::coordinator("c2", &url, "memory://", &storage, &env, dir.path());
    let mut b = c2.client().await;
    wait_all_active(&b, 3).await;
    create_tenant(&mut a, "three", 3).await;
    // `c2` knows the tenant before its stall.
    put(&mut b, "three", "before", "\"v\"", Consistency::All)
        .await
        .expect("write before the stall");
    c2.pause();
    add_node(&mut a, &s4).await;
    // Longer than the oldest ring a request may be placed on (2 s refresh + 0.5 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    c2.resume();
    write_keys_and_check_the_new_owner(&mut a, &mut b, &storage, &s4, 30).await;
}

/// Creates tenant `three` (RF 3) through `a` and writes a key of it through `b`, so `b` holds
/// the tenant from before the change; then adds `s4` through `a`, waits `a`'s settle time
/// (2 x 500 ms + 1 s; `b` is not waited for) and cleans up `node` (every node when `None`).
async fn known_to_both_then_cleaned_up(
    a: &mut Client,
    b: &mut Client,
    s4: &StorageNode,
    node: Option<&str>,
) {
    create_tenant(a, "three", 3).await;
    put(b, "three", "before", "\"v\"", Consistency::All)
        .await
        .expect("write before the change");
    add_node(a, s4).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let accepted = cleanup_when_up(a, node).await;
    wait_migration(a, &accepted.cleanup_id, pb::MigrationState::Completed).await;
}

/// Writes `k0`..`k{keys - 1}` of tenant `three` at ALL through `b`, then checks that every
/// one of them `s4` owns (in the ring `a` lists) is on `s4`; returns that ring.
async fn write_keys_and_check_the_new_owner(
    a: &mut Client,
    b: &mut Client,
    storage: &[StorageNode],
    s4: &StorageNode,
    keys: usize,
) -> Ring {
    for i in 0..keys {
        put(b, "three", &format!("k{i}"), "\"v\"", Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("write k{i} through c2: {e}"));
    }
    let all: Vec<&StorageNode> = storage.iter().chain([s4]).collect();
    let ring = listed_ring(a, &all).await;
    let on_s4: Vec<String> = held(s4).await.into_iter().map(|(_, k)| k).collect();
    let owned: Vec<String> = (0..keys)
        .map(|i| format!("k{i}"))
        .filter(|k| {
            ring.natural_owners(key_position("three", k.as_bytes()), 3)
                .iter()
                .any(|o| o.as_str() == "s4")
        })
        .collect();
    assert!(!owned.is_empty(), "s4 owns none of the keys");
    let missing: Vec<&String> = owned.iter().filter(|k| !on_s4.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} of the {} keys s4 owns were written to the old owners only: {missing:?}",
        missing.len(),
        owned.len()
    );
    ring
}

/// Two coordinators: `c1` reads the registry every 500 ms; `c2` every 10 minutes, so it keeps
/// the ring and tenants it read first (as one cut off from the metadata store, or stalled,
/// would). Returns each with a client.
async fn current_and_stale_coordinators(
    storage: &[StorageNode],
    dir: &Path,
) -> (RoleProcess, Client, RoleProcess, Client) {
    current_and_stale_coordinators_with(storage, dir, &[], &[]).await
}

/// [`current_and_stale_coordinators`], with more settings for each.
async fn current_and_stale_coordinators_with(
    storage: &[StorageNode],
    dir: &Path,
    current_env: &[(&str, &str)],
    stale_env: &[(&str, &str)],
) -> (RoleProcess, Client, RoleProcess, Client) {
    let url = sqlite_url(dir);
    let start = |id: &str, refresh_ms: &str, more: &[(&str, &str)]| {
        let mut env = vec![
            ("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false"),
            ("PAIRDB_COORDINATOR_RING_REFRESH_MS", refresh_ms),
        ];
        env.extend_from_slice(more);
        RoleProcess::coordinator(id, &url, "memory://", storage, &env, dir)
    };
    let c1 = start("c1", "500", current_env);
    let a = c1.client().await;
    wait_all_active(&a, storage.len()).await;
    let c2 = start("c2", "600000", stale_env);
    let b = c2.client().await;
    wait_all_active(&b, storage.len()).await;
    (c1, a, c2, b)
}

/// A coordinator whose ring is older than a cleanup (here: one that does not read the
/// registry again for 10 minutes) writes after the cleanup dropped ranges: the storage nodes
/// refuse its writes as placed on a stale ring (`STALE_RING`: the cleanup raised their ring
/// fence), and it reads the registry again and places them on the current ring. Every write
/// is acknowledged, every key `s4` owns is on `s4`, and no node holds a key it does not own.
/// Without the fence the old owners took those writes into the ranges they had just dropped,
/// where no read looks and the next cleanup deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_placed_on_a_ring_older_than_a_cleanup_is_refused_and_placed_again() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let (_c1, mut a, _c2, mut b) = current_and_stale_coordinators(&storage, dir.path()).await;
    known_to_both_then_cleaned_up(&mut a, &mut b, &s4, None).await;

    let ring = write_keys_and_check_the_new_owner(&mut a, &mut b, &storage, &s4, 40).await;
    let all: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    for node in &all {
        let keys = held(node).await;
        assert_eq!(
            not_owned(&ring, &node.id, &keys),
            0,
            "{} holds keys it does not own after the cleanup",
            node.id
        );
    }
    // A batch placed on the ring before the cleanup, sent straight to a node: refused, and
    // nothing of it applied.
    let stale = spb::WriteBatchRequest {
        records: vec![newest_record("three", "late", "\"late\"")],
        source: spb::BatchSource::Client as i32,
        ring_digest: 0,
        ring_epoch: 1,
    };
    let refused = storage[0]
        .client()
        .await
        .write_batch(stale)
        .await
        .expect_err("a batch placed on an old ring is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        !held(&storage[0]).await.iter().any(|(_, k)| k == "late"),
        "the refused batch was applied"
    );
}

/// Through `a` (the current coordinator): creates `tenant` at its RF, writes `keys` keys
/// (`{prefix}00`, ...) at ALL, adds `s4`, waits `a`'s settle time (2 x 500 ms + 1 s) and cleans
/// every node up. Returns the keys written.
async fn write_add_and_clean_up(
    a: &mut Client,
    (tenant, rf): (&str, u32),
    prefix: &str,
    keys: usize,
    s4: &StorageNode,
) -> Vec<String> {
    create_tenant(a, tenant, rf).await;
    let written: Vec<String> = (0..keys).map(|i| format!("{prefix}{i:02}")).collect();
    common::coord::write_at_all(a, tenant, &written, "\"v\"").await;
    add_node(a, s4).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let accepted = cleanup_when_up(a, None).await;
    wait_migration(a, &accepted.cleanup_id, pb::MigrationState::Completed).await;
    written
}

/// The same for a listing: `c2`, whose ring predates `s4`, lists an RF 1 tenant after a cleanup
/// dropped from the old owners the ranges `s4` took. Its listing asks `s1`..`s3` only; they
/// refuse it as placed on a stale ring, and it lists again on the current ring, `s4` included.
/// Without the fence the listing silently missed every key that lives on `s4` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_placed_on_a_ring_older_than_a_cleanup_is_refused_and_placed_again() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let (_c1, mut a, _c2, mut b) = current_and_stale_coordinators(&storage, dir.path()).await;
    let mut written = write_add_and_clean_up(&mut a, ("one", 1), "k", 60, &s4).await;
    let on_s4 = held(&s4).await.len();
    assert!(on_s4 > 0, "s4 took some of the keys");

    let (mut listed, _) =
        list_from(&mut b, "one", String::new(), 1000, Consistency::One, None).await;
    listed.sort();
    written.sort();
    assert_eq!(
        listed, written,
        "the stale coordinator lists every key ({on_s4} of them live on s4 alone)"
    );
}

/// A repair placed on a ring older than a cleanup: `c2`, whose ring predates `s4`, works off a
/// repair marker for a key whose old owner X gave it to `s4` and dropped it in the cleanup. On
/// its ring X still owns the key and holds nothing, so it writes the key to X; X refuses that
/// write as placed on a stale ring, the marker stays, and `c2`'s next round, on the registry
/// read anew, repairs the key's owners now (X is not one). Without the fence X took the key
/// back into the range it dropped, where no read looks and from which a later change could
/// bring an old value back. (`c1` runs no targeted repair here: its interval is an hour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_placed_on_a_ring_older_than_a_cleanup_writes_nothing_into_a_dropped_range() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let (_c1, mut a, _c2, _b) = current_and_stale_coordinators_with(
        &storage,
        dir.path(),
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "1h")],
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms")],
    )
    .await;
    let keys = write_add_and_clean_up(&mut a, ("three", 3), "r", 40, &s4).await;

    // A key an old node dropped (it went to s4), and an old node that still holds it.
    let mut moved = None;
    'keys: for key in &keys {
        for dropped_by in &storage {
            if stored_record(dropped_by, "three", key).await.is_some() {
                continue;
            }
            for holder in &storage {
                if let Some(record) = stored_record(holder, "three", key).await {
                    moved = Some((key.clone(), dropped_by, holder, record));
                    break 'keys;
                }
            }
        }
    }
    let (key, dropped_by, holder, record) = moved.expect("s4 took keys from the old nodes");
    holder
        .client()
        .await
        .record_repair_markers(spb::RepairMarkersRequest {
            markers: vec![spb::RepairMarker {
                tenant_id: "three".into(),
                key: key.as_bytes().to_vec().into(),
                missed_node: dropped_by.id.clone(),
                version: record.version.clone(),
            }],
        })
        .await
        .expect("record a marker");
    eventually("the marker worked off", Duration::from_secs(30), || async {
        holder
            .client()
            .await
            .list_repair_markers(spb::ListRepairMarkersRequest { limit: 10 })
            .await
            .expect("list markers")
            .into_inner()
            .markers
            .is_empty()
    })
    .await;
    assert!(
        stored_record(dropped_by, "three", &key).await.is_none(),
        "the stale repair wrote {key} into the range {} dropped",
        dropped_by.id
    );
    assert!(stored_record(&s4, "three", &key).await.is_some());
}

/// A write acknowledged by some replicas while another refuses it as placed on a stale ring
/// only after the ack (a straggler): the refusing replica gets the write through a hint,
/// placed anew when it is replayed. `c2`'s ring and tenant predate `s4`; only `s1` is cleaned
/// up (fenced at the registry's epoch), so `s2` and `s3` take `c2`'s write at ONE while `s1`,
/// paused for the moment of the write, refuses it late. Before, a late refusal left neither a
/// hint nor a marker, and `s1` lacked the key until a full repair (the fault suite found such
/// keys, all missing on one replica, after its cleanups). `c1` replays hints every 300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_a_write_as_stale_after_the_ack_gets_it_through_a_hint() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join_storage("s4", dir.path(), &storage);
    let (_c1, mut a, _c2, mut b) = current_and_stale_coordinators_with(
        &storage,
        dir.path(),
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "300ms")],
        &[("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL", "1h")],
    )
    .await;
    known_to_both_then_cleaned_up(&mut a, &mut b, &s4, Some("s1")).await;
    let all: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    let ring = listed_ring(&mut a, &all).await;
    let key = (0..1000)
        .map(|i| format!("late{i}"))
        .find(|k| {
            ring.natural_owners(key_position("three", k.as_bytes()), 3)
                .iter()
                .any(|o| o.as_str() == "s1")
        })
        .expect("a key s1 owns");

    storage[0].pause();
    let written = put(&mut b, "three", &key, "\"v\"", Consistency::One).await;
    storage[0].resume();
    written.expect("acknowledged by s2 or s3");
    eventually("s1 holds the key", Duration::from_secs(20), || async {
        stored_record(&storage[0], "three", &key).await.is_some()
    })
    .await;
}

/// A tombstone must outlive every copy of the value it deletes, also the copy an old owner
/// keeps of a range it gave away until a cleanup drops it. Here `s4` takes keys of an RF 1
/// tenant from their old owners, one of them is deleted, and a repair runs past `gc_grace`
/// (1 s): no range counts as repaired while no cleanup followed the change, so a compaction on
/// `s4` keeps the tombstone. When `s4` then leaves, its ranges go back to the old owners with
/// the tombstone, and the key stays deleted. Without the rule the compaction purged it, and
/// the old owner's leftover value would have come back. Once a cleanup dropped the leftovers,
/// repairs let tombstones go again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_outlives_the_copies_old_owners_keep_until_a_cleanup() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gc = [("PAIRDB_STORAGE_GC_GRACE", "1s")];
    let storage = start_storage_with_env(3, dir.path(), &gc);
    let s4 = join_storage_with_env("s4", dir.path(), &storage, &gc);
    let c1 = coordinator(
        &storage,
        dir.path(),
        &[
            ("PAIRDB_COORDINATOR_AUTO_CLEANUP", "false"),
            ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
            ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
            ("PAIRDB_COORDINATOR_MAX_CLOCK_SKEW", "500ms"),
            ("PAIRDB_COORDINATOR_REQUEST_TIMEOUT", "1s"),
            ("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500"),
        ],
    );
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "one", 1).await;
    let keys: Vec<String> = (0..40).map(|i| format!("z{i}")).collect();
    for key in &keys {
        put(&mut c, "one", key, "\"alive\"", Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("write {key}: {e}"));
    }
    add_node(&mut c, &s4).await;
    let mut zombie = None;
    for key in &keys {
        if stored_record(&s4, "one", key).await.is_some() {
            zombie = Some(key.clone());
            break;
        }
    }
    let zombie = zombie.expect("s4 took some keys");
    let mut old_owner = None;
    for node in &storage {
        if stored_record(node, "one", &zombie).await.is_some() {
            old_owner = Some(node);
        }
    }
    let old_owner = old_owner.expect("the old owner keeps its copy until a cleanup");

    delete_at_all(&mut c, "one", &zombie).await;
    // Past gc_grace and the repair's margin (request timeout + clock skew).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    repair(&mut c).await;
    compact(&s4).await;
    assert!(
        is_tombstone(&stored_record(&s4, "one", &zombie).await),
        "one/{zombie}: a tombstone purged while {} still holds the value it deleted",
        old_owner.id
    );

    let removed = c
        .remove_storage_node(pb::RemoveStorageNodeRequest {
            node_id: "s4".into(),
            force: false,
        })
        .await
        .expect("remove s4")
        .into_inner();
    wait_migration(&c, &removed.migration_id, pb::MigrationState::Completed).await;
    let read = get(&mut c, "one", &zombie, Consistency::All).await;
    assert!(
        matches!(&read, Err(s) if s.code() == tonic::Code::NotFound),
        "one/{zombie} came back after s4 left: {read:?}"
    );

    // A cleanup of every node (after the settle time): repairs let tombstones go again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let accepted = cleanup_when_up(&mut c, None).await;
    wait_migration(&c, &accepted.cleanup_id, pb::MigrationState::Completed).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    repair(&mut c).await;
    compact(old_owner).await;
    assert_eq!(
        stored_record(old_owner, "one", &zombie).await,
        None,
        "the tombstone goes once no leftover copy can exist"
    );
}

async fn delete_at_all(c: &mut Client, tenant: &str, key: &str) {
    c.delete_key_value(pb::DeleteKeyValueRequest {
        tenant_id: tenant.to_owned(),
        key: key.as_bytes().to_vec().into(),
        consistency: Consistency::All as i32,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("delete {tenant}/{key}: {e}"));
}

async fn repair(c: &mut Client) {
    let accepted = c
        .start_repair(pb::StartRepairRequest::default())
        .await
        .expect("start repair")
        .into_inner();
    wait_migration(c, &accepted.repair_id, pb::MigrationState::Completed).await;
}

async fn compact(node: &StorageNode) {
    node.client()
        .await
        .compact(spb::CompactRequest {})
        .await
        .expect("compact");
}

fn is_tombstone(record: &Option<spb::Record>) -> bool {
    matches!(
        record.as_ref().and_then(|r| r.payload.as_ref()),
        Some(spb::record::Payload::Tombstone(_))
    )
}

/// The same for a replication factor: `c2` still has tenant `one` at RF 3 after `c1` lowered
/// it to 1 and a cleanup dropped the replicas that left. A write of another tenant first
/// brings `c2`'s ring up to date (refused, read again), so only its cached tenant is stale.
/// Its writes of `one` are refused (`STALE_RING`: an RF change raises the registry epoch, and
/// the tenant record carries the epoch it was read at), it reads the tenant again and writes
/// to the one owner. Without the tenant's epoch in the tag, the two former replicas took
/// those writes into the ranges they had just dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_a_replication_factor_older_than_a_cleanup_is_refused_and_placed_again() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let (_c1, mut a, _c2, mut b) = current_and_stale_coordinators(&storage, dir.path()).await;
    for tenant in ["one", "three"] {
        create_tenant(&mut a, tenant, 3).await;
        put(&mut b, tenant, "before", "\"v\"", Consistency::All)
            .await
            .expect("write before the change");
    }
    let lowered = a
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "one".into(),
            replication_factor: 1,
        })
        .await
        .expect("lower the RF")
        .into_inner();
    wait_migration(&a, &lowered.migration_id, pb::MigrationState::Completed).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let accepted = cleanup_when_up(&mut a, None).await;
    wait_migration(&a, &accepted.cleanup_id, pb::MigrationState::Completed).await;
    put(&mut b, "three", "after", "\"v\"", Consistency::All)
        .await
        .expect("a write that brings c2's ring up to date");

    const KEYS: usize = 30;
    for i in 0..KEYS {
        put(&mut b, "one", &format!("k{i}"), "\"v\"", Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("write k{i} through the stale coordinator: {e}"));
    }
    let all: Vec<&StorageNode> = storage.iter().collect();
    let ring = listed_ring(&mut a, &all).await;
    for node in &all {
        let keys = held(node).await;
        assert_eq!(
            not_owned(&ring, &node.id, &keys),
            0,
            "{} holds keys of tenant one (RF 1) it does not own",
            node.id
        );
    }
    for i in 0..KEYS {
        let read = get(&mut a, "one", &format!("k{i}"), Consistency::All).await;
        assert!(read.is_ok(), "k{i} does not read back: {read:?}");
    }
}
