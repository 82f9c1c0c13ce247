//! `scripts/cluster.sh start|status|stop` brings up a real multi-process cluster (3 storage
//! nodes, two coordinators with `COORDINATORS=2`, a gateway in front of both) that serves the
//! API, reports itself, and stops every process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::process::{Command, Output};

use serde_json::{Value, json};

/// A base port B with every port the script derives from it free (TCP B+1..3, B+50 for the
/// gateway, B+101..102, B+1001..1003, B+1101..1102; UDP B+201..203), below the kernel's
/// ephemeral range (see `common::pick_port`).
fn free_base() -> u16 {
    let tcp = [1, 2, 3, 50, 101, 102, 1001, 1002, 1003, 1101, 1102];
    let udp = [201, 202, 203];
    common::pick_port(1103, |base| {
        tcp.iter().all(|o| common::tcp_free(base + o))
            && udp.iter().all(|o| common::udp_free(base + o))
    })
}

fn script(dir: &std::path::Path, base: u16, gateway: &str, action: &str) -> Output {
    let mut cmd = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PAIRDB_")) {
        cmd.env_remove(key);
    }
    cmd.arg(action)
        .env("CLUSTER_DIR", dir)
        .env("PAIRDB_BIN", env!("CARGO_BIN_EXE_pairdb"))
        .env("BASE_PORT", base.to_string())
        .env("GATEWAY_ADDR", gateway)
        .env("COORDINATORS", "2")
        .output()
        .expect("run scripts/cluster.sh")
}

struct StopOnDrop<'a>(&'a dyn Fn() -> Output);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_script_starts_serves_and_stops_a_cluster() {
    if Command::new("curl").arg("--version").output().is_err() {
        common::backends::skip_or_fail("cluster_script_starts_serves_and_stops_a_cluster", "curl");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base();
    let gateway = format!("127.0.0.1:{}", base + 50);
    let started = script(dir.path(), base, &gateway, "start");
    let stop = || script(dir.path(), base, &gateway, "stop");
    // Stops the cluster however the test ends: a panic must not leave five processes behind.
    let _stopper = StopOnDrop(&stop);
    if !started.status.success() {
        panic!("start failed: {}", text(&started));
    }
    let status = script(dir.path(), base, &gateway, "status");
    let report = text(&status);
    for name in ["s1", "s2", "s3", "c1", "c2", "gw"] {
        assert!(report.contains(&format!("{name}: running")), "{report}");
    }
    assert!(report.contains("ready"), "{report}");

    let client = pairdb::tools::client::http_builder(None)
        .expect("http client")
        .build()
        .expect("http client");
    let url = format!("http://{gateway}");
    let created = client
        .post(format!("{url}/v1/tenants"))
        .json(&json!({"tenant_id": "demo"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 200);
    let written: Value = client
        .post(format!("{url}/v1/key-value"))
        .header("X-Tenant-ID", "demo")
        .json(&json!({"key": "k", "value": [1, 2], "consistency": "all"}))
        .send()
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!(
        written["replica_count"], 3,
        "three storage processes: {written}"
    );
    let read: Value = client
        .get(format!("{url}/v1/key-value?key=k"))
        .header("X-Tenant-ID", "demo")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(read["value"], json!([1, 2]));
    // Both coordinators serve: the gateway spreads calls over them, and each one's own
    // metrics count the writes it coordinated.
    for i in 0..6 {
        let answer = client
            .post(format!("{url}/v1/key-value"))
            .header("X-Tenant-ID", "demo")
            .json(&json!({"key": format!("spread{i}"), "value": i}))
            .send()
            .await
            .expect("put");
        assert_eq!(answer.status(), 200);
    }
    for c in 1..=2u16 {
        let metrics = client
            .get(format!("http://127.0.0.1:{}/metrics", base + 1100 + c))
            .send()
            .await
            .expect("coordinator metrics")
            .text()
            .await
            .expect("text");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("pairdb_coordinator_requests_total")
                    && l.contains("op=\"write\"")),
            "coordinator c{c} served no write"
        );
    }

    // A second cluster on the same ports must fail to start, not pass the readiness checks
    // on the first one's answers.
    let other = tempfile::tempdir().expect("tempdir");
    let second = script(other.path(), base, &gateway, "start");
    assert!(!second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("already in use"),
        "{}",
        text(&second)
    );

    let pids: Vec<i32> =
        String::from_utf8_lossy(&script(dir.path(), base, &gateway, "pids").stdout)
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect();
    assert_eq!(pids.len(), 6);
    let stopped = stop();
    assert!(
        text(&stopped).contains("stopped 6 processes"),
        "{}",
        text(&stopped)
    );
    for pid in pids {
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"));
        assert!(gone, "process {pid} still running after stop");
    }
}
