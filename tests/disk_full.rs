//! Health-aware routing over real processes: storage node s3 keeps its data dir on a small
//! tmpfs this test mounts, and the disk fills up. Gossip reports s3 unhealthy, the gateway's
//! node list says why, coordinators stop sending it writes (they become hints) while writes
//! keep succeeding at quorum on s1 and s2; when space is freed, s3 is healthy again, the hints
//! replay, and it holds every write: nothing lost.
//!
//! Needs root for the mount: under CI (`CI` set) a refused mount fails the test, elsewhere it
//! is skipped with a message. The mount is removed when the test ends, also when it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::RoleProcess;
use common::coord::{create_tenant, eventually, put, sqlite_url, stored, wait_all_active};
use futures::future::join_all;
use pairdb::rpc::common::Consistency;
use serde_json::Value;

const SMALL_DISK_MB: u64 = 32;

/// A tmpfs mounted for the test, unmounted on drop (lazily: a process that still has a file
/// open there cannot keep it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let size = format!("size={SMALL_DISK_MB}m");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "pdbdiskfull"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot mount a tmpfs under CI (root needed): {why}"
                );
                eprintln!("skipped: cannot mount a tmpfs (root needed): {why}");
                None
            }
        }
    }

    /// Fills the disk with a filler file, leaving `keep` bytes free.
    fn fill(&self, keep: u64) {
        use std::io::Write;
        let stat = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let mut w = std::io::BufWriter::new(std::fs::File::create(self.0.join("filler")).unwrap());
        let chunk = vec![0xA5u8; 1 << 20];
        let mut left = free.saturating_sub(keep);
        // Written out: tmpfs allocates on write, not on set_len.
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        w.flush().unwrap();
    }

    fn free_space(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn key(i: usize) -> String {
    format!("key-{i:04}")
}

async fn s3_health(gw: &RoleProcess) -> Value {
    let nodes: Value = common::http_client()
        .get(format!("{}/v1/admin/storage-nodes", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "s3")
        .map(|n| n["health"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_full_disk_is_routed_around_and_catches_up_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    // Declared first, so dropped last: the nodes are gone before the disk goes.
    let Some(disk) = Tmpfs::mount(&dir.path().join("s3")) else {
        return;
    };
    let storage = common::cluster::start_storage(3, dir.path());
    let env = [
        ("PAIRDB_COORDINATOR_READ_REPAIR_CHANCE", "0"),
        ("PAIRDB_COORDINATOR_AUTO_REPAIR", "false"),
        ("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL_MS", "500"),
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
    let write = |keys: std::ops::Range<usize>, value: &'static str| {
        let c = c.clone();
        async move {
            for chunk in keys.collect::<Vec<_>>().chunks(50) {
                join_all(chunk.iter().map(|&i| {
                    let mut c = c.clone();
                    async move {
                        put(&mut c, "acme", &key(i), value, Consistency::Quorum)
                            .await
                            .unwrap_or_else(|e| panic!("write {} at quorum: {e}", key(i)));
                    }
                }))
                .await;
            }
        }
    };
    write(0..200, "\"v1\"").await;
    assert_eq!(s3_health(&gw).await["status"], "healthy");

    disk.fill(256 * 1024);
    eventually(
        "s3 reported unhealthy, with its disk as the reason",
        Duration::from_secs(30),
        || {
            let gw = &gw;
            async move {
                let health = s3_health(gw).await;
                health["status"] == "unhealthy"
                    && health["reasons"][0]
                        .as_str()
                        .is_some_and(|r| r.contains("DISK_FULL"))
            }
        },
    )
    .await;
    eventually(
        "the coordinator's gossip view has s3 unhealthy",
        Duration::from_secs(30),
        || {
            let c1 = &c1;
            async move {
                common::metric_sum(c1.http, "pairdb_storage_nodes_health{status=\"unhealthy\"}")
                    .await
                    == 1.0
            }
        },
    )
    .await;

    // Writes keep succeeding at quorum; s3 is not sent them.
    let skipped_before =
        common::metric_sum(c1.http, "pairdb_writes_to_unhealthy_hinted_total").await;
    write(0..50, "\"v2\"").await;
    write(200..400, "\"v1\"").await;
    let skipped = common::metric_sum(c1.http, "pairdb_writes_to_unhealthy_hinted_total").await
        - skipped_before;
    assert!(
        skipped >= 250.0,
        "writes to s3 went out as hints: {skipped}"
    );
    assert_eq!(stored(&storage[2], "acme", &key(300)).await, None);
    assert_eq!(
        stored(&storage[2], "acme", &key(0))
            .await
            .map(|v| v.0)
            .as_deref(),
        Some("\"v1\"")
    );
    // Reads at quorum answer the newest version (healthy replicas asked first).
    for i in [0, 49, 250, 399] {
        let value = common::coord::get(&mut c, "acme", &key(i), Consistency::Quorum)
            .await
            .unwrap();
        let want = if i < 50 { "\"v2\"" } else { "\"v1\"" };
        assert_eq!(value, want, "{}", key(i));
    }

    // Space freed: s3 healthy again, the hints replay, nothing is lost.
    disk.free_space();
    eventually("s3 healthy again", Duration::from_secs(30), || {
        let gw = &gw;
        async move { s3_health(gw).await["status"] == "healthy" }
    })
    .await;
    eventually("s3 holds every write", Duration::from_secs(60), || {
        let s3 = &storage[2];
        async move {
            for i in 0..400 {
                let want = if i < 50 { "\"v2\"" } else { "\"v1\"" };
                if stored(s3, "acme", &key(i)).await.map(|v| v.0).as_deref() != Some(want) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drop(storage);
}
