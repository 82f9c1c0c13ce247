//! Clients of a coordinator for tests: key-value calls, tenants, node states, and what one
//! storage node holds.

use std::time::{Duration, Instant};

use pairdb::ring::{NodeId, NodeState, Ring, RingNode};
use pairdb::rpc::auth::InternalChannel;
use pairdb::rpc::common::{Consistency, NodeState as WireState};
use pairdb::rpc::coordinator::coordinator_client::CoordinatorClient;
use pairdb::rpc::coordinator::{self as pb, ErrorCode};
use pairdb::rpc::detail::coordinator_detail as detail_in;
use pairdb::rpc::storage as spb;
use pairdb::vclock::Version;

use super::StorageNode;
use super::cluster::{RoleProcess, start_storage};

pub type Client = CoordinatorClient<InternalChannel>;

/// `n` storage nodes and one coordinator `c1` (SQLite metadata under `dir`, the idempotency
/// store at `idempotency_url`) with every node active and `tenants` created (id, RF).
pub async fn one_coordinator(
    n: usize,
    dir: &std::path::Path,
    idempotency_url: &str,
    tenants: &[(&str, u32)],
) -> (Vec<StorageNode>, RoleProcess, Client) {
    let storage = start_storage(n, dir);
    let c1 = RoleProcess::coordinator("c1", &sqlite_url(dir), idempotency_url, &storage, &[], dir);
    let mut c = c1.client().await;
    wait_all_active(&c, n).await;
    for (tenant, rf) in tenants {
        create_tenant(&mut c, tenant, *rf).await;
    }
    (storage, c1, c)
}

pub async fn put(
    c: &mut Client,
    tenant: &str,
    key: &str,
    value: &str,
    level: Consistency,
) -> Result<pb::WriteKeyValueResponse, tonic::Status> {
    put_idem(c, tenant, key, value, level, "").await
}

/// Writes every key of `keys` in `tenant` with `value` at ALL.
pub async fn write_at_all(c: &mut Client, tenant: &str, keys: &[String], value: &str) {
    for key in keys {
        put(c, tenant, key, value, Consistency::All)
            .await
            .unwrap_or_else(|e| panic!("write {tenant}/{key}: {e}"));
    }
}

pub async fn put_idem(
    c: &mut Client,
    tenant: &str,
    key: &str,
    value: &str,
    level: Consistency,
    idempotency_key: &str,
) -> Result<pb::WriteKeyValueResponse, tonic::Status> {
    c.write_key_value(pb::WriteKeyValueRequest {
        tenant_id: tenant.to_owned(),
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        consistency: level as i32,
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

pub async fn get(
    c: &mut Client,
    tenant: &str,
    key: &str,
    level: Consistency,
) -> Result<String, tonic::Status> {
    c.read_key_value(pb::ReadKeyValueRequest {
        tenant_id: tenant.to_owned(),
        key: key.as_bytes().to_vec().into(),
        consistency: level as i32,
    })
    .await
    .map(|r| String::from_utf8(r.into_inner().value.to_vec()).expect("utf-8 value"))
}

pub fn code(status: &tonic::Status) -> ErrorCode {
    detail_in(status).map_or(ErrorCode::Unspecified, |d| d.code())
}

pub async fn create_tenant(c: &mut Client, tenant: &str, rf: u32) {
    c.create_tenant(pb::CreateTenantRequest {
        tenant_id: tenant.to_owned(),
        replication_factor: rf,
    })
    .await
    .expect("create tenant");
}

/// What a node holds for a key, read from it directly (tombstones included).
pub async fn stored_record(node: &StorageNode, tenant: &str, key: &str) -> Option<spb::Record> {
    node.unconfirmed_client()
        .await
        .read(spb::ReadRequest {
            tenant_id: tenant.to_owned(),
            key: key.as_bytes().to_vec().into(),
        })
        .await
        .expect("storage read")
        .into_inner()
        .record
}

/// The value a storage node holds for a key (`None`: nothing; tombstones read as `None` too).
pub async fn stored(node: &StorageNode, tenant: &str, key: &str) -> Option<(String, Version)> {
    let record = stored_record(node, tenant, key).await?;
    let version = Version::from(record.version.as_ref().expect("version"));
    match record.payload? {
        spb::record::Payload::Value(v) => {
            Some((String::from_utf8(v.to_vec()).expect("utf-8"), version))
        }
        spb::record::Payload::Tombstone(_) => None,
    }
}

pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_seen(what, within, || {
        let done = cond();
        async move {
            if done.await {
                Ok(())
            } else {
                Err(String::new())
            }
        }
    })
    .await;
}

/// [`eventually`] for a condition that says what it saw instead (`Err`), which a timeout
/// reports.
pub async fn eventually_seen<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    while let Err(seen) = cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}",
            if seen.is_empty() {
                String::new()
            } else {
                format!("; saw {seen}")
            }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn node_state(c: &mut Client, node: &str) -> Option<WireState> {
    c.list_storage_nodes(pb::ListStorageNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.node_id == node)
        .map(|n| n.state())
}

/// Waits until coordinator `c1`'s metrics say gossip reports `count` storage nodes `what`
/// ("up", "down", or a labelled series such as `health{status="unhealthy"}`). Reads skip and
/// writes hint the nodes gossip calls down, whatever a health check answers.
pub async fn gossip_reports(c1: &RoleProcess, what: &str, count: usize) {
    let line = format!("pairdb_storage_nodes_{what} {count}");
    eventually_seen(&format!("gossip: {line}"), Duration::from_secs(30), || {
        let http = c1.http;
        let line = line.clone();
        async move {
            let metrics = super::http_get(http, "/metrics").await;
            if metrics.contains(&line) {
                return Ok(());
            }
            // What gossip reported instead.
            let seen: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("pairdb_storage_nodes_"))
                .collect();
            Err(format!("{seen:?}"))
        }
    })
    .await;
}

/// Waits until the coordinator sees all `n` storage nodes up (gossip converged).
pub async fn wait_all_active(c: &Client, n: usize) {
    eventually("every storage node active", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.list_storage_nodes(pb::ListStorageNodesRequest {})
                .await
                .map(|r| r.into_inner().nodes)
                .is_ok_and(|nodes| {
                    nodes.len() == n && nodes.iter().all(|x| x.state() == WireState::Active)
                })
        }
    })
    .await;
}

pub fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("meta.db").display())
}

/// The ring of `nodes` (all active) with the tokens each was admitted with, as the coordinator
/// lists them.
pub async fn listed_ring(c: &mut Client, nodes: &[&StorageNode]) -> Ring {
    let listed = c
        .list_storage_nodes(pb::ListStorageNodesRequest {})
        .await
        .expect("list storage nodes")
        .into_inner()
        .nodes;
    Ring::new(nodes.iter().map(|n| {
        let info = listed
            .iter()
            .find(|i| i.node_id == n.id)
            .unwrap_or_else(|| panic!("{} is not listed", n.id));
        RingNode {
            id: NodeId::new(n.id.clone()),
            virtual_nodes: info.virtual_nodes,
            tokens: Some(info.tokens.clone()),
            state: NodeState::Active,
        }
    }))
}

/// A migration's status.
pub async fn migration(c: &mut Client, id: &str) -> pb::Migration {
    c.get_migration_status(pb::GetMigrationStatusRequest {
        migration_id: id.to_owned(),
    })
    .await
    .expect("migration status")
    .into_inner()
}

/// Waits (up to 90 s) until migration `id` is in state `want`; a failure while waiting for
/// completion fails the test at once.
pub async fn wait_migration(c: &Client, id: &str, want: pb::MigrationState) -> pb::Migration {
    eventually(
        &format!("migration {id} {want:?}"),
        Duration::from_secs(90),
        || {
            let mut c = c.clone();
            async move {
                let m = migration(&mut c, id).await;
                if want == pb::MigrationState::Completed {
                    assert_ne!(
                        m.state(),
                        pb::MigrationState::Failed,
                        "migration {id} failed: {}",
                        m.failure_reason
                    );
                }
                m.state() == want
            }
        },
    )
    .await;
    migration(&mut c.clone(), id).await
}

/// How many records (keys of every tenant, tombstones included) a storage node holds.
pub async fn records_on(node: &StorageNode) -> usize {
    let mut scan = node
        .unconfirmed_client()
        .await
        .scan_range(spb::ScanRangeRequest {
            range: Some(pairdb::rpc::common::HashRange { start: 0, end: 0 }),
            batch_size: 1000,
            keys_only: true,
        })
        .await
        .expect("scan")
        .into_inner();
    let mut n = 0;
    while let Some(batch) = scan.message().await.expect("scan batch") {
        n += batch.records.len();
    }
    n
}

/// Lists every key of `tenant` through the coordinator, following the cursor from `cursor`;
/// returns the keys and the pages' count.
pub async fn list_from(
    c: &mut Client,
    tenant: &str,
    mut cursor: String,
    limit: u32,
    level: Consistency,
    pages: Option<usize>,
) -> (Vec<String>, String) {
    let mut keys = Vec::new();
    for _ in 0..pages.unwrap_or(usize::MAX) {
        let page = c
            .list_keys(pb::ListKeysRequest {
                tenant_id: tenant.to_owned(),
                prefix: bytes::Bytes::new(),
                limit,
                cursor: cursor.clone(),
                values: false,
                consistency: level as i32,
            })
            .await
            .expect("list")
            .into_inner();
        keys.extend(
            page.keys
                .iter()
                .map(|k| String::from_utf8_lossy(&k.key).into_owned()),
        );
        cursor = page.cursor;
        if cursor.is_empty() {
            break;
        }
    }
    (keys, cursor)
}
