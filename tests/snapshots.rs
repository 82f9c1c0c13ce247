//! Snapshots and restore over real processes (three storage nodes, a coordinator, a gateway):
//! a snapshot taken through the HTTP API, more writes, one node wiped and rebuilt from its
//! snapshot with `pairdb restore`, then a repair: every key at its newest version everywhere.
//! And the documented errors: a taken name, a bad name, an unknown snapshot, a restore into the
//! data dir of a running node.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::RoleProcess;
use common::coord::{
    Client, create_tenant, eventually, node_state, put, sqlite_url, stored, stored_record,
    wait_all_active, wait_migration,
};
use futures::future::join_all;
use pairdb::rpc::common::{Consistency, NodeState as WireState};
use pairdb::rpc::coordinator as pb;
use pairdb::rpc::storage as spb;
use serde_json::{Value, json};

const KEYS: usize = 600;

fn key(i: usize) -> String {
    format!("key-{i:04}")
}

async fn put_all(c: &Client, keys: std::ops::Range<usize>, value: &str) {
    for chunk in keys.collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|&i| {
            let mut c = c.clone();
            async move {
                put(&mut c, "acme", &key(i), value, Consistency::All)
                    .await
                    .expect("write at all");
            }
        }))
        .await;
    }
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = common::http_client().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http call");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// Copies a directory tree (a backup of a snapshot, off the node's data dir).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn restore(data_dir: &Path, snapshot: &str) -> std::process::Output {
    common::pairdb_command()
        .args(["restore", "--data-dir"])
        .arg(data_dir)
        .args(["--snapshot", snapshot])
        .output()
        .expect("run pairdb restore")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restored_from_a_snapshot_and_repaired_holds_every_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = common::cluster::start_storage(3, dir.path());
    // Only the repair may fix the restored node: no read repair, no scheduled repair.
    let env = [
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
        ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
    ];
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &env,
        dir.path(),
    );
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());
    let mut c = c1.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    put_all(&c, 0..KEYS, "\"v1\"").await;

    let snapshots = format!("{}/v1/admin/snapshots", gw.url());
    let (status, taken) = call(
        reqwest::Method::POST,
        snapshots.clone(),
        Some(json!({"name": "nightly"})),
    )
    .await;
    assert_eq!(status, 200, "{taken}");
    let nodes = taken["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{taken}");
    for node in nodes {
        assert!(
            node["entries"].as_u64().unwrap() >= KEYS as u64,
            "every node holds every key at RF 3: {node}"
        );
    }
    // A taken name, a bad name, a bad body: documented errors, nothing changes.
    for (body, want_status, want_code) in [
        (json!({"name": "nightly"}), 409, "SNAPSHOT_EXISTS"),
        (json!({"name": "../escape"}), 400, "INVALID_REQUEST"),
        (json!({"name": ""}), 400, "INVALID_REQUEST"),
        (json!({"nom": "x"}), 400, "INVALID_REQUEST"),
    ] {
        let (status, answer) = call(reqwest::Method::POST, snapshots.clone(), Some(body)).await;
        assert_eq!(
            (status, answer["error_code"].as_str()),
            (want_status, Some(want_code)),
            "{answer}"
        );
    }
    let (status, listed) = call(reqwest::Method::GET, snapshots.clone(), None).await;
    assert_eq!(status, 200, "{listed}");
    let all = listed["snapshots"].as_array().expect("snapshots");
    assert_eq!(all.len(), 1, "only the one snapshot: {listed}");
    assert_eq!(all[0]["name"], "nightly");
    assert_eq!(all[0]["missing_nodes"], json!([]));

    // After the snapshot: overwrites, new keys, deletes.
    put_all(&c, 0..KEYS / 2, "\"v2\"").await;
    put_all(&c, KEYS..KEYS + 100, "\"new\"").await;
    for i in KEYS - 50..KEYS {
        c.delete_key_value(pb::DeleteKeyValueRequest {
            tenant_id: "acme".to_owned(),
            key: key(i).into_bytes().into(),
            consistency: Consistency::All as i32,
            ..Default::default()
        })
        .await
        .expect("delete at all");
    }

    // The backup: s3's snapshot, copied off its data dir.
    let s3_dir = storage[2].dir.clone();
    let backup = dir.path().join("backup-s3");
    copy_tree(&s3_dir.join("snapshots").join("nightly"), &backup);

    // A restore into a running node's data dir is refused, and changes nothing.
    let refused = restore(&storage[0].dir, "nightly");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        stored(&storage[0], "acme", &key(0)).await.map(|v| v.0),
        Some("\"v2\"".to_owned())
    );

    // s3 dies with its disk: wiped, restored from the backup, started again.
    storage[2].terminate();
    std::fs::remove_dir_all(&s3_dir).unwrap();
    let restored = restore(&s3_dir, backup.to_str().unwrap());
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    storage[2].restart();
    eventually("s3 seen up", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { node_state(&mut c, "s3").await == Some(WireState::Active) }
    })
    .await;
    // It holds the snapshot's data: old values, no later keys, no later deletes.
    let s3 = &storage[2];
    assert_eq!(
        stored(s3, "acme", &key(0)).await.map(|v| v.0),
        Some("\"v1\"".to_owned())
    );
    assert_eq!(stored_record(s3, "acme", &key(KEYS)).await, None);
    assert_eq!(
        stored(s3, "acme", &key(KEYS - 1)).await.map(|v| v.0),
        Some("\"v1\"".to_owned())
    );

    // A repair brings it to the newest version of every key.
    let accepted = c
        .start_repair(pb::StartRepairRequest {
            node_id: "s3".to_owned(),
            ..Default::default()
        })
        .await
        .expect("start repair")
        .into_inner();
    wait_migration(&c, &accepted.repair_id, pb::MigrationState::Completed).await;
    for i in 0..KEYS + 100 {
        let want = match i {
            i if i < KEYS / 2 => Some("\"v2\""),
            i if i >= KEYS => Some("\"new\""),
            i if i >= KEYS - 50 => None,
            _ => Some("\"v1\""),
        };
        for node in &storage {
            let held = stored_record(node, "acme", &key(i)).await;
            let value = held.as_ref().and_then(|r| match &r.payload {
                Some(spb::record::Payload::Value(v)) => {
                    Some(String::from_utf8(v.to_vec()).unwrap())
                }
                _ => None,
            });
            assert_eq!(value.as_deref(), want, "{} {}", node.id, key(i));
            if want.is_none() {
                assert!(
                    matches!(
                        held.and_then(|r| r.payload),
                        Some(spb::record::Payload::Tombstone(_))
                    ),
                    "{} {}: the delete must be there as a tombstone",
                    node.id,
                    key(i)
                );
            }
        }
    }

    // Deleting: once, then 404.
    let one = format!("{snapshots}/nightly");
    let (status, deleted) = call(reqwest::Method::DELETE, one.clone(), None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(
        deleted["nodes"].as_array().map(Vec::len),
        Some(2),
        "s3's went with its disk: {deleted}"
    );
    let (status, again) = call(reqwest::Method::DELETE, one, None).await;
    assert_eq!(
        (status, again["error_code"].as_str()),
        (404, Some("SNAPSHOT_NOT_FOUND")),
        "{again}"
    );
    let (_, listed) = call(reqwest::Method::GET, snapshots, None).await;
    assert_eq!(listed["snapshots"], json!([]), "{listed}");
}
