//! Adding and removing storage nodes at runtime, against real processes: gossiping storage
//! nodes and a `pairdb --role=coordinator`. Each test writes keys of tenants with different
//! replication factors, changes the topology while writing more, and checks that every key is
//! on every node that owns it in the new ring (computed here independently) and reads at ALL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::StorageNode;
use common::cluster::{RoleProcess, join_storage, start_storage, start_storage_with_env};
use common::coord::{
    Client, code, create_tenant, eventually, get, list_from, listed_ring, migration, node_state,
    put, records_on, sqlite_url, stored, wait_all_active, wait_migration,
};
use pairdb::meta::{
    MetadataStore, Migration, MigrationKind, MigrationState, NodeRecord, SqlMetadataStore,
};
use pairdb::ring::{NodeState, key_position};
use pairdb::rpc::common::{Consistency, NodeState as WireState};
use pairdb::rpc::coordinator::{self as pb, ErrorCode};

/// One multi-process cluster at a time: gossip heartbeats starve on 2 cores otherwise.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tenants and their replication factors.
const TENANTS: [(&str, u32); 3] = [("wide", 3), ("pair", 2), ("narrow", 1)];

/// A storage node that joins the others' gossip.
fn join(id: &str, dir: &Path, peers: &[StorageNode]) -> StorageNode {
    join_storage(id, dir, peers)
}

fn coordinator(storage: &[StorageNode], dir: &Path, env: &[(&str, &str)]) -> RoleProcess {
    RoleProcess::coordinator("c1", &sqlite_url(dir), "memory://", storage, env, dir)
}

/// Writes `prefix0..prefix{n-1}` for every tenant, the value being the key.
async fn write_keys(c: &mut Client, prefix: &str, n: usize, level: Consistency) {
    write_keys_of(c, &TENANTS, prefix, n, level).await;
}

/// Every key of `tenants` is held by every node that owns it in a ring of `nodes` (all active),
/// and reads back at ALL. Returns how many keys each node holds as an owner.
async fn assert_placed(
    c: &mut Client,
    nodes: &[&StorageNode],
    tenants: &[(&str, u32)],
    keys: &[String],
) -> Vec<usize> {
    assert_placed_with(c, nodes, tenants, keys, |key| format!("\"{key}\"")).await
}

/// [`assert_placed`] where `value_of(key)` is each key's value.
async fn assert_placed_with(
    c: &mut Client,
    nodes: &[&StorageNode],
    tenants: &[(&str, u32)],
    keys: &[String],
    value_of: impl Fn(&str) -> String,
) -> Vec<usize> {
    let ring = listed_ring(c, nodes).await;
    let mut held = vec![0; nodes.len()];
    for &(tenant, rf) in tenants {
        for key in keys {
            let want = value_of(key);
            for owner in ring.natural_owners(key_position(tenant, key.as_bytes()), rf as usize) {
                let i = nodes
                    .iter()
                    .position(|n| n.id == owner.as_str())
                    .expect("owner is a member");
                let (value, _) = stored(nodes[i], tenant, key)
                    .await
                    .unwrap_or_else(|| panic!("{tenant}/{key} missing on its owner {owner}"));
                assert_eq!(value, want, "{tenant}/{key} on {owner}");
                held[i] += 1;
            }
            let read = get(c, tenant, key, Consistency::All)
                .await
                .unwrap_or_else(|e| panic!("read {tenant}/{key} at ALL: {e}"));
            assert_eq!(read, want);
        }
    }
    held
}

async fn add(c: &mut Client, node: &StorageNode) -> Result<pb::MigrationAccepted, tonic::Status> {
    add_as(c, &node.id, node.grpc).await
}

async fn add_as(
    c: &mut Client,
    id: &str,
    address: SocketAddr,
) -> Result<pb::MigrationAccepted, tonic::Status> {
    c.add_storage_node(pb::AddStorageNodeRequest {
        node_id: id.to_owned(),
        host: address.ip().to_string(),
        port: u32::from(address.port()),
        virtual_nodes: 0,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn remove(
    c: &mut Client,
    id: &str,
    force: bool,
) -> Result<pb::MigrationAccepted, tonic::Status> {
    c.remove_storage_node(pb::RemoveStorageNodeRequest {
        node_id: id.to_owned(),
        force,
    })
    .await
    .map(tonic::Response::into_inner)
}

fn keys(prefixes: &[(&str, usize)]) -> Vec<String> {
    prefixes
        .iter()
        .flat_map(|(p, n)| (0..*n).map(move |i| format!("{p}{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_streams_its_ranges_then_activates_it() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join("s4", dir.path(), &storage);
    let mut c1 = coordinator(&storage, dir.path(), &[]);
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    for (tenant, rf) in TENANTS {
        create_tenant(&mut c, tenant, rf).await;
    }
    write_keys(&mut c, "k", 150, Consistency::All).await;

    // Bad additions change nothing.
    let wrong_id = add_as(&mut c, "s9", s4.grpc).await.expect_err("wrong id");
    assert_eq!(
        code(&wrong_id),
        ErrorCode::InvalidNodeConfig,
        "{wrong_id:?}"
    );
    let dead = SocketAddr::from(([127, 0, 0, 1], common::free_tcp_port()));
    let nobody = add_as(&mut c, "s9", dead).await.expect_err("nobody there");
    assert_eq!(code(&nobody), ErrorCode::InvalidNodeConfig, "{nobody:?}");
    let taken = add(&mut c, &storage[0]).await.expect_err("s1 exists");
    assert_eq!(code(&taken), ErrorCode::NodeExists);
    assert_eq!(node_state(&mut c, "s9").await, None);

    let accepted = add(&mut c, &s4).await.expect("add s4");
    assert_eq!(accepted.node_id, "s4");
    assert!(!accepted.migration_id.is_empty());
    assert!(!accepted.estimated_completion.is_empty());
    // The coordinator dies before streaming starts; the one restarted resumes the change.
    c1.kill9();
    c1.restart();
    let mut c = c1.client().await;
    assert_eq!(
        node_state(&mut c, "s4").await,
        Some(WireState::Bootstrapping)
    );
    let again = add(&mut c, &s4).await.expect_err("s4 exists");
    assert_eq!(code(&again), ErrorCode::NodeExists);
    let busy = remove(&mut c, "s4", true).await.expect_err("s4 is joining");
    assert_eq!(code(&busy), ErrorCode::NodeInUse);
    // Written while s4 joins: they reach it as a pending owner or through the streams.
    write_keys(&mut c, "during", 40, Consistency::Quorum).await;

    let done = wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(done.r#type(), pb::MigrationType::NodeAddition);
    assert_eq!(done.node_id, "s4");
    assert!(done.keys_migrated > 0, "{done:?}");
    assert!(
        done.bytes_migrated > done.keys_migrated,
        "bytes streamed are recorded: {done:?}"
    );
    assert_eq!(done.keys_migrated, done.total_keys);
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Active));

    let nodes: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    let held = assert_placed(
        &mut c,
        &nodes,
        &TENANTS,
        &keys(&[("k", 150), ("during", 40)]),
    )
    .await;
    assert!(held[3] > 40, "s4 owns a share of the keys: {held:?}");
}

/// A node joins empty. One that holds records (a removed node started again on its old data
/// directory) is refused with INVALID_NODE_CONFIG and registered nowhere: what it kept would be
/// live again, deleted keys among them once their tombstones were purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_holds_data_is_refused() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, s4, _c1, mut c) = three_nodes_and_a_joiner(dir.path()).await;
    hold_a_record(&s4).await;
    let refused = add(&mut c, &s4).await.expect_err("s4 holds data");
    assert_eq!(code(&refused), ErrorCode::InvalidNodeConfig, "{refused:?}");
    assert!(refused.message().contains("holds data"), "{refused:?}");
    assert_eq!(node_state(&mut c, "s4").await, None);
}

/// The value of a counter on a storage node's `/metrics` (0 when absent).
async fn counter(node: &StorageNode, name: &str) -> u64 {
    let metrics = common::http_get(node.http, "/metrics").await;
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Writes made while a node joins go to it from the coordinator (a pending owner) and are not
/// forwarded a second time by the senders: the coordinator's batches name the ring they were
/// placed on, the same one the streams were planned on. Every key still lands on every owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_join_reach_the_new_node_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Throttled, so the streams still copy while the writes arrive.
    let slow = [("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "100000")];
    let storage = start_storage_with_env(3, dir.path(), &slow);
    let s4 = join("s4", dir.path(), &storage);
    let c1 = coordinator(&storage, dir.path(), &[]);
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    const WIDE: [(&str, u32); 1] = [("wide", 3)];
    create_tenant(&mut c, "wide", 3).await;
    let big = |key: &str| format!("\"{key}{}\"", "x".repeat(2000));
    for i in 0..1000 {
        let key = format!("k{i}");
        put(&mut c, "wide", &key, &big(&key), Consistency::Quorum)
            .await
            .expect("load");
    }
    let accepted = add(&mut c, &s4).await.expect("add s4");
    eventually("streams copying", Duration::from_secs(60), || {
        let mut c = c.clone();
        let id = accepted.migration_id.clone();
        async move { migration(&mut c, &id).await.keys_migrated > 0 }
    })
    .await;
    write_keys_of(&mut c, &WIDE, "during", 200, Consistency::Quorum).await;
    let now = migration(&mut c, &accepted.migration_id).await;
    assert_eq!(
        now.state(),
        pb::MigrationState::InProgress,
        "the writes must land while the streams copy: {now:?}"
    );
    wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;

    let nodes: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    let loaded = keys(&[("k", 1000)]);
    assert_placed_with(&mut c, &nodes, &WIDE, &loaded, big).await;
    assert_placed(&mut c, &nodes, &WIDE, &keys(&[("during", 200)])).await;
    let (mut forwarded, mut skipped) = (0, 0);
    for s in &storage {
        forwarded += counter(s, "pairdb_stream_live_writes_forwarded_total").await;
        skipped += counter(s, "pairdb_stream_live_writes_skipped_total").await;
    }
    assert_eq!(forwarded, 0, "skipped {skipped}");
    assert!(skipped > 0, "writes landed in ranges being streamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_nodes_hands_their_ranges_to_the_inheritors() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(4, dir.path());
    let c1 = coordinator(&storage, dir.path(), &[]);
    let mut c = c1.client().await;
    wait_all_active(&c, 4).await;
    for (tenant, rf) in TENANTS {
        create_tenant(&mut c, tenant, rf).await;
    }
    write_keys(&mut c, "k", 150, Consistency::All).await;

    let unknown = remove(&mut c, "s9", false).await.expect_err("no s9");
    assert_eq!(code(&unknown), ErrorCode::NodeNotFound);
    let accepted = remove(&mut c, "s4", false).await.expect("remove s4");
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Draining));
    // s1..s3 would leave 2 active nodes for a tenant with RF 3.
    let in_use = remove(&mut c, "s3", false)
        .await
        .expect_err("RF 3 needs s3");
    assert_eq!(code(&in_use), ErrorCode::NodeInUse, "{in_use:?}");
    assert_eq!(node_state(&mut c, "s3").await, Some(WireState::Active));
    write_keys(&mut c, "during", 40, Consistency::Quorum).await;

    let done = wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(done.r#type(), pb::MigrationType::NodeRemoval);
    assert!(done.keys_migrated > 0, "{done:?}");
    assert_eq!(node_state(&mut c, "s4").await, None, "s4 left the registry");
    let three: Vec<&StorageNode> = storage.iter().take(3).collect();
    let all_keys = keys(&[("k", 150), ("during", 40)]);
    assert_placed(&mut c, &three, &TENANTS, &all_keys).await;

    // A dead node removed with force (below the largest RF): its ranges come from the
    // surviving replicas. RF 1 keys that lived only on it are gone with it.
    let mut storage = storage;
    storage[2].kill9();
    let in_use = remove(&mut c, "s3", false).await.expect_err("still needed");
    assert_eq!(code(&in_use), ErrorCode::NodeInUse);
    let forced = remove(&mut c, "s3", true).await.expect("forced removal");
    let done = wait_migration(&c, &forced.migration_id, pb::MigrationState::Completed).await;
    assert!(done.keys_migrated > 0, "{done:?}");
    let two: Vec<&StorageNode> = storage.iter().take(2).collect();
    assert_placed(&mut c, &two, &TENANTS[..2], &all_keys).await;
}

/// A coordinator that never replays hints (they stay queued), once every node of `storage`
/// is active, with `tenant` created at its RF.
async fn without_replay(
    storage: &[StorageNode],
    dir: &Path,
    (tenant, rf): (&str, u32),
) -> (RoleProcess, Client) {
    let quiet = [("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL_MS", "3600000")];
    let c1 = coordinator(storage, dir, &quiet);
    let mut c = c1.client().await;
    wait_all_active(&c, storage.len()).await;
    create_tenant(&mut c, tenant, rf).await;
    (c1, c)
}

/// `storage[i]` misses `n` writes of `tenant` (`missed0..`, each the key as its value): it is
/// killed while they are written at `level` through `c`, then restarted and seen active. Each
/// becomes a hint for it (kept while `c` does not replay).
async fn miss_writes(
    c: &mut Client,
    storage: &mut [StorageNode],
    i: usize,
    tenant: &str,
    n: usize,
    level: Consistency,
) -> Vec<String> {
    storage[i].kill9();
    let missed: Vec<String> = (0..n).map(|k| format!("missed{k}")).collect();
    for key in &missed {
        put(c, tenant, key, &format!("\"{key}\""), level)
            .await
            .unwrap_or_else(|e| panic!("write {key}: {e}"));
    }
    storage[i].restart();
    wait_all_active(c, storage.len()).await;
    missed
}

/// A coordinator that replays hints, once it replayed (or handed on) every stored hint.
async fn replay_every_hint(storage: &[StorageNode], dir: &Path) -> RoleProcess {
    let c2 = coordinator(storage, dir, &[]);
    let _c = c2.client().await;
    let store = SqlMetadataStore::connect(&sqlite_url(dir))
        .await
        .expect("the coordinators' store");
    eventually("every hint replayed", Duration::from_secs(60), || async {
        store.hint_counts().await.expect("hint counts").is_empty()
    })
    .await;
    c2
}

/// Writes a node missed while it was down are hints. When that node is then removed, the data
/// it streams out lacks those writes: its hints must go to the nodes inheriting the keys, not
/// be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_hands_its_hints_to_its_heirs() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(4, dir.path());
    // No replay while s4 is back: its hints must still be queued when it leaves.
    let (c1, mut c) = without_replay(&storage, dir.path(), ("pair", 2)).await;

    let missed = miss_writes(&mut c, &mut storage, 3, "pair", 60, Consistency::One).await;
    let accepted = remove(&mut c, "s4", false).await.expect("remove s4");
    wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;

    // A coordinator that replays hints: every key reaches both of its owners among s1..s3.
    drop(c1);
    let c2 = coordinator(&storage, dir.path(), &[]);
    let mut c = c2.client().await;
    let three: Vec<&StorageNode> = storage.iter().take(3).collect();
    let ring = listed_ring(&mut c, &three).await;
    let mut expected = 0;
    for key in &missed {
        for owner in ring.natural_owners(key_position("pair", key.as_bytes()), 2) {
            let node = three
                .iter()
                .find(|n| n.id == owner.as_str())
                .expect("owner is a member");
            expected += 1;
            eventually(
                &format!("pair/{key} on {owner}"),
                Duration::from_secs(30),
                || async { stored(node, "pair", key).await.is_some() },
            )
            .await;
        }
    }
    assert_eq!(expected, 2 * missed.len());
}

/// The same for a node that stays: writes `s3` missed while it was down are hints for it. When
/// a joining node then takes ranges from `s3`, the ranges it streams lack those writes, so the
/// joining node must get the hints for the keys it takes, before it becomes active; and `s3`
/// must not get them later for keys it no longer owns (a cleanup would drop them there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_giving_ranges_to_a_joining_one_hands_it_its_hints() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(3, dir.path());
    let s4 = join("s4", dir.path(), &storage);
    // No replay: s3's hints must still be queued when s4 joins.
    let (c1, mut c) = without_replay(&storage, dir.path(), ("pair", 2)).await;

    let missed = miss_writes(&mut c, &mut storage, 2, "pair", 120, Consistency::One).await;
    let accepted = add(&mut c, &s4).await.expect("add s4");
    wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;

    // Active means complete: every missed key s4 took from s3 is on s4 already.
    let nodes: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    let before = listed_ring(&mut c, &nodes[..3]).await;
    let after = listed_ring(&mut c, &nodes).await;
    let owners = |ring: &pairdb::ring::Ring, key: &str| -> Vec<String> {
        ring.natural_owners(key_position("pair", key.as_bytes()), 2)
            .into_iter()
            .map(|n| n.as_str().to_owned())
            .collect()
    };
    let taken_from_s3: Vec<&String> = missed
        .iter()
        .filter(|k| {
            owners(&before, k).contains(&"s3".to_owned())
                && owners(&after, k).contains(&"s4".to_owned())
        })
        .collect();
    assert!(
        taken_from_s3.len() >= 5,
        "s4 takes some of s3's keys: {}",
        taken_from_s3.len()
    );
    for key in &taken_from_s3 {
        assert!(
            stored(&s4, "pair", key).await.is_some(),
            "pair/{key}, taken from s3, is on s4 when it is active"
        );
    }

    // A coordinator that replays hints: every key reaches its owners, and s3 none it lost.
    drop(c1);
    let _c2 = replay_every_hint(&storage, dir.path()).await;
    for key in &missed {
        let owned = owners(&after, key);
        for node in &nodes {
            let held = stored(node, "pair", key).await.is_some();
            if owned.contains(&node.id) {
                assert!(held, "pair/{key} missing on its owner {}", node.id);
            } else if node.id == "s3" {
                // s3 missed every write: it can only have got this one from a hint.
                assert!(!held, "pair/{key} delivered to s3, which gave it away");
            }
        }
    }
}

/// Lowering an RF takes replicas out of keys' replica sets. Hints for such a replica are for
/// keys it no longer owns: the replay sends them to the keys' owners instead (which take them as
/// a no-op), never to that replica, where a cleanup would drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_for_a_replica_an_rf_lowering_removed_go_to_the_owners() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(3, dir.path());
    let (c1, mut c) = without_replay(&storage, dir.path(), ("wide", 3)).await;

    let missed = miss_writes(&mut c, &mut storage, 2, "wide", 60, Consistency::Quorum).await;
    let lowered = set_rf(&mut c, "wide", 1).await.expect("lower the RF");
    wait_migration(&c, &lowered.migration_id, pb::MigrationState::Completed).await;

    drop(c1);
    let c2 = replay_every_hint(&storage, dir.path()).await;
    let nodes: Vec<&StorageNode> = storage.iter().collect();
    let ring = listed_ring(&mut c2.client().await, &nodes).await;
    let mut owned_by_s3 = 0;
    for key in &missed {
        let owner = ring.natural_owners(key_position("wide", key.as_bytes()), 1);
        let owns = owner[0].as_str() == "s3";
        owned_by_s3 += usize::from(owns);
        let held = stored(&storage[2], "wide", key).await.is_some();
        assert_eq!(held, owns, "wide/{key} on s3 (owner at RF 1: {owner:?})");
        if !owns {
            let i = nodes
                .iter()
                .position(|n| n.id == owner[0].as_str())
                .expect("member");
            assert!(
                stored(nodes[i], "wide", key).await.is_some(),
                "wide/{key} on its owner"
            );
        }
    }
    assert!(
        owned_by_s3 > 0 && owned_by_s3 < missed.len(),
        "s3 owns some of the keys at RF 1: {owned_by_s3}"
    );
}

/// A 3-node cluster with both tenants and 150 keys each, whose coordinator (topology timeout
/// 3 s) was asked to add `s4`, killed right after: the addition makes no progress and fails.
/// Returns the storage nodes, `s4` (stopped), the coordinator, a client and the failed
/// migration.
async fn a_failed_addition(
    dir: &Path,
) -> (
    Vec<StorageNode>,
    StorageNode,
    RoleProcess,
    Client,
    pb::Migration,
) {
    let storage = start_storage(3, dir);
    let mut s4 = join("s4", dir, &storage);
    let c1 = coordinator(
        &storage,
        dir,
        &[("PAIRDB_COORDINATOR_TOPOLOGY_TIMEOUT_S", "3")],
    );
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    for (tenant, rf) in TENANTS {
        create_tenant(&mut c, tenant, rf).await;
    }
    write_keys(&mut c, "k", 150, Consistency::All).await;
    let accepted = add(&mut c, &s4).await.expect("add s4");
    s4.kill9();
    let failed = wait_migration(&c, &accepted.migration_id, pb::MigrationState::Failed).await;
    (storage, s4, c1, c, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addition_without_progress_is_rolled_back() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, _s4, _c1, mut c, failed) = a_failed_addition(dir.path()).await;
    assert_eq!(failed.node_id, "s4");
    assert!(
        failed.failure_reason.contains("no streaming progress"),
        "the status says why: {failed:?}"
    );
    let listed = c
        .list_migrations(pb::ListMigrationsRequest { limit: 0 })
        .await
        .expect("list migrations")
        .into_inner()
        .migrations;
    assert_eq!(listed.first(), Some(&failed), "newest first");
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Failed));
    // Out of the ring: writes at ALL need only s1..s3 again.
    write_keys(&mut c, "after", 20, Consistency::All).await;
    let three: Vec<&StorageNode> = storage.iter().collect();
    assert_placed(
        &mut c,
        &three,
        &TENANTS,
        &keys(&[("k", 150), ("after", 20)]),
    )
    .await;

    // A failed addition owns nothing; removing it just forgets it.
    let forgotten = remove(&mut c, "s4", false).await.expect("forget s4");
    let m = migration(&mut c, &forgotten.migration_id).await;
    assert_eq!(m.state(), pb::MigrationState::Completed);
    assert_eq!(node_state(&mut c, "s4").await, None);
}

/// Three active storage nodes, `s4` started but not added, and a coordinator with a client.
async fn three_nodes_and_a_joiner(
    dir: &Path,
) -> (Vec<StorageNode>, StorageNode, RoleProcess, Client) {
    let storage = start_storage(3, dir);
    let s4 = join("s4", dir, &storage);
    let c1 = coordinator(&storage, dir, &[]);
    let c = c1.client().await;
    wait_all_active(&c, 3).await;
    (storage, s4, c1, c)
}

/// Writes a record straight to `node`, as one kept from an earlier membership or received by
/// an earlier attempt to add it.
async fn hold_a_record(node: &StorageNode) {
    let record = pairdb::rpc::storage::Record {
        tenant_id: "wide".into(),
        key: b"kept".to_vec().into(),
        version: Some(pairdb::rpc::common::Version {
            clock: vec![pairdb::rpc::common::ClockEntry {
                coordinator_id: "c9".into(),
                counter: pairdb::vclock::physical_counter(pairdb::wallclock::now_ms()),
            }],
            timestamp_ms: 0,
        }),
        payload: Some(pairdb::rpc::storage::record::Payload::Value(
            b"\"old\"".to_vec().into(),
        )),
        ring_hash: 0,
        expires_at_ms: 0,
    };
    node.client()
        .await
        .write_batch(pairdb::rpc::storage::WriteBatchRequest {
            records: vec![record],
            source: pairdb::rpc::storage::BatchSource::Repair as i32,
            ring_digest: 0,
            ring_epoch: 0,
        })
        .await
        .expect("a record the node holds");
}

/// A failed addition tried again under the same id joins empty too: what its first attempt
/// received is only as new as that attempt (a key deleted since could lose its tombstone
/// everywhere else before the retry). Refused while it holds that; wiped, it is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_addition_tried_again_joins_empty() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_storage, mut s4, _c1, mut c, _) = a_failed_addition(dir.path()).await;
    s4.restart();
    hold_a_record(&s4).await;

    let refused = add(&mut c, &s4).await.expect_err("s4 holds data");
    assert_eq!(code(&refused), ErrorCode::InvalidNodeConfig, "{refused:?}");
    assert!(refused.message().contains("failed addition"), "{refused:?}");
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Failed));

    s4.kill9();
    std::fs::remove_dir_all(&s4.dir).expect("wipe s4");
    std::fs::create_dir_all(&s4.dir).expect("an empty data dir");
    s4.restart();
    let accepted = add(&mut c, &s4).await.expect("add s4, wiped");
    wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Active));
    assert!(stored(&s4, "wide", "kept").await.is_none());
}

/// Node changes issued back to back run together: two removals and two additions accepted
/// while each other are in progress all complete (planned against their combined final ring,
/// made final at once); what cannot run with them is refused up front (NODE_IN_USE, saying
/// why), never accepted and then failed. 5 nodes, RF 1 and RF 3 tenants, 2,000 keys each;
/// every key is on its owners and reads back at ALL at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_node_changes_run_together_and_complete() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(5, dir.path());
    let s6 = join("s6", dir.path(), &storage);
    let s7 = join("s7", dir.path(), &storage);
    let c1 = coordinator(&storage, dir.path(), &[]);
    let mut c = c1.client().await;
    wait_all_active(&c, 5).await;
    let tenants = [("three", 3u32), ("one", 1u32)];
    for (tenant, rf) in tenants {
        create_tenant(&mut c, tenant, rf).await;
    }
    let all_keys = keys(&[("k", 2000)]);
    for (tenant, _) in tenants {
        for key in &all_keys {
            put(&mut c, tenant, key, &format!("\"{key}\""), Consistency::All)
                .await
                .unwrap_or_else(|e| panic!("write {tenant}/{key}: {e}"));
        }
    }

    let mut accepted = vec![remove(&mut c, "s5", false).await.expect("remove s5")];
    accepted.push(add(&mut c, &s6).await.expect("add s6 while s5 drains"));
    accepted.push(remove(&mut c, "s4", false).await.expect("remove s4 too"));
    accepted.push(add(&mut c, &s7).await.expect("add s7 too"));
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Draining));
    assert_eq!(
        node_state(&mut c, "s7").await,
        Some(WireState::Bootstrapping)
    );
    // s1..s3 would leave 2 active nodes for a tenant with RF 3; s5 is already leaving; an RF
    // change would copy replica sets that are moving.
    for (refused, says) in [
        (
            remove(&mut c, "s3", false).await.map(|_| ()),
            "would leave 2 active nodes",
        ),
        (
            remove(&mut c, "s5", false).await.map(|_| ()),
            "s5 is draining",
        ),
        (
            set_rf(&mut c, "one", 2).await.map(|_| ()),
            "wait for node changes",
        ),
    ] {
        let refused = refused.expect_err("refused up front");
        assert_eq!(code(&refused), ErrorCode::NodeInUse, "{refused:?}");
        assert!(refused.message().contains(says), "{refused:?}");
    }
    assert_eq!(node_state(&mut c, "s3").await, Some(WireState::Active));
    write_keys_of(&mut c, &tenants, "during", 100, Consistency::Quorum).await;
    for change in &accepted {
        let done = wait_migration(&c, &change.migration_id, pb::MigrationState::Completed).await;
        assert_eq!(done.node_id, change.node_id);
    }
    for (node, state) in [("s4", None), ("s5", None)] {
        assert_eq!(node_state(&mut c, node).await, state, "{node} left");
    }
    for node in ["s6", "s7"] {
        assert_eq!(node_state(&mut c, node).await, Some(WireState::Active));
    }

    // A node change waits for an RF change too: its streams would be planned on replica sets
    // that are still being copied.
    let raise = set_rf(&mut c, "one", 2).await.expect("raise the RF of one");
    let refused = remove(&mut c, "s6", false)
        .await
        .expect_err("an RF change copies");
    assert_eq!(code(&refused), ErrorCode::NodeInUse, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("replication-factor change of tenant \"one\""),
        "{refused:?}"
    );
    wait_migration(&c, &raise.migration_id, pb::MigrationState::Completed).await;

    let members: Vec<&StorageNode> = storage.iter().take(3).chain([&s6, &s7]).collect();
    let all_keys = keys(&[("k", 2000), ("during", 100)]);
    let held = assert_placed(&mut c, &members, &[("three", 3), ("one", 2)], &all_keys).await;
    assert!(held[3] > 0 && held[4] > 0, "s6 and s7 own keys: {held:?}");
}

/// Writes `prefix0..prefix{n-1}` for each of `tenants`, the value being the key.
async fn write_keys_of(
    c: &mut Client,
    tenants: &[(&str, u32)],
    prefix: &str,
    n: usize,
    level: Consistency,
) {
    for (tenant, _) in tenants {
        for i in 0..n {
            let key = format!("{prefix}{i}");
            put(c, tenant, &key, &format!("\"{key}\""), level)
                .await
                .unwrap_or_else(|e| panic!("write {tenant}/{key}: {e}"));
        }
    }
}

async fn set_rf(
    c: &mut Client,
    tenant: &str,
    rf: u32,
) -> Result<pb::UpdateReplicationFactorResponse, tonic::Status> {
    c.update_replication_factor(pb::UpdateReplicationFactorRequest {
        tenant_id: tenant.to_owned(),
        replication_factor: rf,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// A change in progress can be cancelled from any coordinator (rolled back, state cancelled,
/// the changes running with it planned again without it), and a change whose coordinator dies (kill -9) or is stopped (SIGTERM) is taken over by
/// another running coordinator without anyone restarting anything, streaming each record at
/// most once more per stream batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_cancelled_and_taken_over_without_restarts() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Streams are throttled on the senders so the changes are caught in the middle.
    let slow = [("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "100000")];
    let storage = start_storage_with_env(3, dir.path(), &slow);
    let s4 = join("s4", dir.path(), &storage);
    let s5 = join("s5", dir.path(), &storage);
    let s6 = join("s6", dir.path(), &storage);
    let s7 = join("s7", dir.path(), &storage);
    let quick = [("PAIRDB_COORDINATOR_RING_REFRESH_MS", "500")];
    let mut c1 = coordinator(&storage, dir.path(), &quick);
    let c2 = RoleProcess::coordinator(
        "c2",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &quick,
        dir.path(),
    );
    let mut a = c1.client().await;
    let mut b = c2.client().await;
    wait_all_active(&a, 3).await;
    let tenants = [("wide", 3u32), ("narrow", 1u32)];
    for (tenant, rf) in tenants {
        create_tenant(&mut a, tenant, rf).await;
    }
    let value = format!("\"{}\"", "v".repeat(2000));
    // A bulk batch holds one second of the throttle (100,000 bytes): about 48 of these
    // records, each over 2,000 bytes on the wire.
    const PER_BATCH: u64 = 50;
    let all_keys = keys(&[("k", 800)]);
    for (tenant, _) in tenants {
        for key in &all_keys {
            put(&mut a, tenant, key, &value, Consistency::All)
                .await
                .unwrap_or_else(|e| panic!("write {tenant}/{key}: {e}"));
        }
    }
    let streaming = |c: &Client, id: String| {
        let c = c.clone();
        async move {
            eventually("streaming under way", Duration::from_secs(60), || {
                let (mut c, id) = (c.clone(), id.clone());
                async move {
                    let m = migration(&mut c, &id).await;
                    m.state() == pb::MigrationState::InProgress && m.keys_migrated > 0
                }
            })
            .await;
        }
    };

    // A second addition while the first streams: both are planned again together. Cancelled
    // through the other coordinator, the second is rolled back and the first, planned alone
    // again, completes.
    let first = add(&mut a, &s4).await.expect("add s4");
    streaming(&a, first.migration_id.clone()).await;
    let joined = add(&mut a, &s5).await.expect("add s5 while s4 streams");
    streaming(&a, joined.migration_id.clone()).await;
    let asked = b
        .cancel_migration(pb::GetMigrationStatusRequest {
            migration_id: joined.migration_id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(asked.migration_id, joined.migration_id);
    let cancelled = wait_migration(&a, &joined.migration_id, pb::MigrationState::Cancelled).await;
    assert_eq!(cancelled.r#type(), pb::MigrationType::NodeAddition);
    assert_eq!(node_state(&mut a, "s5").await, Some(WireState::Failed));
    for (id, want) in [
        (joined.migration_id.as_str(), ErrorCode::InvalidRequest),
        ("no-such-migration", ErrorCode::MigrationNotFound),
    ] {
        let refused = b
            .cancel_migration(pb::GetMigrationStatusRequest {
                migration_id: id.to_owned(),
            })
            .await
            .expect_err("nothing to cancel");
        assert_eq!(code(&refused), want, "{refused:?}");
    }
    wait_migration(&a, &first.migration_id, pb::MigrationState::Completed).await;
    // The other coordinator may have completed it: this one's ring view follows within its
    // refresh interval (500 ms here).
    eventually("c1 sees s4 active", Duration::from_secs(10), || {
        let mut a = a.clone();
        async move { node_state(&mut a, "s4").await == Some(WireState::Active) }
    })
    .await;

    // Its coordinator dies in the middle: the other one finishes it.
    let second = add(&mut a, &s6).await.expect("add s6");
    streaming(&a, second.migration_id.clone()).await;
    // The streams' positions are kept in the metadata store too (a sender that lost its own
    // checkpoint resumes from there), and dropped when the change ends.
    let store = SqlMetadataStore::connect(&sqlite_url(dir.path()))
        .await
        .expect("the coordinators' store");
    eventually(
        "stream checkpoints kept",
        Duration::from_secs(30),
        || async {
            !store
                .stream_checkpoints(&second.migration_id)
                .await
                .expect("checkpoints")
                .is_empty()
        },
    )
    .await;
    c1.kill9();
    let done = wait_migration(&b, &second.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(node_state(&mut b, "s6").await, Some(WireState::Active));
    let left = store.stream_checkpoints(&second.migration_id).await;
    assert_eq!(left.expect("checkpoints"), vec![], "dropped at the end");
    let moved = records_on(&s6).await as u64;
    assert!(
        done.keys_migrated >= moved && done.keys_migrated <= moved + 4 * PER_BATCH,
        "{} records streamed for {moved} moved (4 streams, at most one batch again each)",
        done.keys_migrated
    );

    // Its coordinator is stopped (SIGTERM) in the middle: it exits cleanly, giving the change
    // up at its next step, and the other one finishes it from the senders' checkpoints.
    c1.restart();
    let mut a = c1.client().await;
    let third = add(&mut a, &s7).await.expect("add s7");
    streaming(&a, third.migration_id.clone()).await;
    let stopped = c1.terminate();
    assert!(
        stopped.success(),
        "a stopped coordinator exits cleanly: {stopped}"
    );
    let left = migration(&mut b, &third.migration_id).await;
    assert_eq!(
        left.state(),
        pb::MigrationState::InProgress,
        "c1 gave the change up unfinished ({} of {} records)",
        left.keys_migrated,
        left.total_keys
    );
    let done = wait_migration(&b, &third.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(node_state(&mut b, "s7").await, Some(WireState::Active));
    let moved = records_on(&s7).await as u64;
    assert!(
        done.keys_migrated >= moved && done.keys_migrated <= moved + 5 * PER_BATCH,
        "{} records streamed for {moved} moved (5 streams, at most one batch again each)",
        done.keys_migrated
    );

    let members: Vec<&StorageNode> = storage.iter().chain([&s4, &s6, &s7]).collect();
    let held = assert_placed_with(&mut b, &members, &tenants, &all_keys, |_| value.clone()).await;
    assert!(
        held[3] > 0 && held[4] > 0 && held[5] > 0,
        "s4, s6 and s7 own keys: {held:?}"
    );
}

/// A coordinator can stop between rolling a change back in the registry and recording the
/// migration's end. The change resumed afterwards finds nothing to stream; it must be recorded
/// failed, never made final: an addition rolled back must not become active with nothing
/// streamed, a removal rolled back must not drop the node and its data. One stopped between
/// registering a node and recording its migration leaves a change nobody runs: the next
/// change's leader rolls it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_change_resumed_after_a_crash_is_never_made_final() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let store = SqlMetadataStore::connect(&sqlite_url(dir.path()))
        .await
        .expect("store");
    // The registry as such a coordinator left it: s4's addition rolled back (failed), s3's
    // removal rolled back (active), both migrations still in progress and owned by nobody.
    let record = |id: &str, port: u16, state| NodeRecord {
        node_id: id.to_owned(),
        host: "127.0.0.1".to_owned(),
        port,
        virtual_nodes: 16,
        tokens: None,
        state,
    };
    for n in &storage {
        store
            .add_node(&record(&n.id, n.grpc.port(), NodeState::Active))
            .await
            .expect("register");
    }
    store
        .add_node(&record("s4", 1, NodeState::Failed))
        .await
        .expect("register");
    // And an acceptance cut short between the registry write and the migration record: s6
    // bootstrapping with no migration, so nobody runs it.
    store
        .add_node(&record("s6", 2, NodeState::Bootstrapping))
        .await
        .expect("register");
    let changes = [
        ("add-crashed", MigrationKind::NodeAddition, "s4"),
        ("remove-crashed", MigrationKind::NodeRemoval, "s3"),
    ];
    for (id, kind, node) in changes {
        store
            .create_migration(&Migration::begin(
                id.to_owned(),
                kind,
                node,
                MigrationState::InProgress,
            ))
            .await
            .expect("migration");
    }

    let c1 = coordinator(&storage, dir.path(), &[]);
    let c = c1.client().await;
    for (id, _, _) in changes {
        let failed = wait_migration(&c, id, pb::MigrationState::Failed).await;
        assert!(
            failed.failure_reason.contains("rolled back"),
            "the status says why: {failed:?}"
        );
    }
    let mut c = c;
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Failed));
    assert_eq!(node_state(&mut c, "s3").await, Some(WireState::Active));

    // A real addition meanwhile leads the changes in progress: it rolls the unrecorded s6 back
    // once it stood so for 30 s, then completes alone.
    let s5 = join("s5", dir.path(), &storage);
    let added = add(&mut c, &s5).await.expect("add s5");
    wait_migration(&c, &added.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(node_state(&mut c, "s5").await, Some(WireState::Active));
    assert_eq!(node_state(&mut c, "s6").await, Some(WireState::Failed));
}

/// The metadata store refuses the commit of a node addition for a while (a PostgreSQL trigger
/// raises on the registry update that activates the node, as a store failing transiently
/// would): the change is not rolled back on the first refusal but tried again, and once the
/// store accepts, it completes with every key in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_metadata_store_refuses_for_a_while_is_tried_again() {
    let _serial = SERIAL.lock().await;
    let Some(pg) = common::backends::Postgres::start() else {
        common::backends::skip_or_fail(
            "a_commit_the_metadata_store_refuses_for_a_while_is_tried_again",
            "PostgreSQL",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let s4 = join("s4", dir.path(), &storage);
    let c1 = RoleProcess::coordinator("c1", &pg.url(), "memory://", &storage, &[], dir.path());
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    for (tenant, rf) in TENANTS {
        create_tenant(&mut c, tenant, rf).await;
    }
    write_keys(&mut c, "k", 100, Consistency::All).await;

    let store = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_activation() RETURNS trigger AS $$
         BEGIN
           IF OLD.state = 'bootstrapping' AND NEW.state = 'active' THEN
             RAISE EXCEPTION 'test: activation refused';
           END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_activation BEFORE UPDATE ON storage_nodes
           FOR EACH ROW EXECUTE FUNCTION refuse_activation();",
    )
    .execute(&store)
    .await
    .expect("create the trigger");
    let accepted = add(&mut c, &s4).await.expect("add s4");
    // The streams complete, then the commit is refused, again and again.
    eventually(
        "the commit refused twice",
        Duration::from_secs(60),
        || async {
            let log = std::fs::read_to_string(&c1.log).unwrap_or_default();
            log.matches("activation refused").count() >= 2
        },
    )
    .await;
    assert_eq!(
        node_state(&mut c, "s4").await,
        Some(WireState::Bootstrapping),
        "not rolled back"
    );
    sqlx::raw_sql("DROP TRIGGER refuse_activation ON storage_nodes")
        .execute(&store)
        .await
        .expect("drop the trigger");

    let done = wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;
    assert_eq!(done.keys_migrated, done.total_keys, "{done:?}");
    assert_eq!(node_state(&mut c, "s4").await, Some(WireState::Active));
    let nodes: Vec<&StorageNode> = storage.iter().chain([&s4]).collect();
    assert_placed(&mut c, &nodes, &TENANTS, &keys(&[("k", 100)])).await;
}

/// A listing cursor is a position in key order: taken before a node joins and used after its
/// ranges moved, it goes on to list every key exactly once, in order (RF 1, so each key lives on
/// one node, which changed for some of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_cursor_survives_a_topology_change() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (storage, s4, _c1, mut c) = three_nodes_and_a_joiner(dir.path()).await;
    create_tenant(&mut c, "narrow", 1).await;
    write_keys_of(&mut c, &[("narrow", 1)], "k", 300, Consistency::All).await;
    let mut expected = keys(&[("k", 300)]);
    expected.sort();

    let (first, cursor) = list_from(
        &mut c,
        "narrow",
        String::new(),
        40,
        Consistency::One,
        Some(2),
    )
    .await;
    assert_eq!(first, expected[..80].to_vec());
    let accepted = add(&mut c, &s4).await.expect("add s4");
    wait_migration(&c, &accepted.migration_id, pb::MigrationState::Completed).await;
    let moved = listed_ring(&mut c, &[&storage[0], &storage[1], &storage[2], &s4]).await;
    assert!(
        expected.iter().any(|k| moved
            .natural_owners(key_position("narrow", k.as_bytes()), 1)
            .iter()
            .any(|o| o.as_str() == "s4")),
        "some keys moved to s4"
    );
    let (rest, end) = list_from(&mut c, "narrow", cursor, 40, Consistency::Quorum, None).await;
    assert!(end.is_empty());
    let all: Vec<String> = first.into_iter().chain(rest).collect();
    assert_eq!(
        all, expected,
        "every key once, in key order, across the change"
    );
}
