//! `pairdb kv`, `pairdb admin` and `pairdb bench` against a running `pairdb dev`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pairdb(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pairdb"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PAIRDB_")) {
        cmd.env_remove(key);
    }
    cmd.args(args)
        .env("PAIRDB_URL", url)
        .env("PAIRDB_TENANT", "demo")
        .output()
        .expect("run pairdb")
}

/// `pairdb admin nodes --json`: exit 0 when every node is active and healthy, 3 otherwise
/// (a dev cluster on a disk over 80% full is degraded); the JSON either way.
fn nodes_json(url: &str) -> Value {
    let out = pairdb(url, &["admin", "nodes", "--json"]);
    let body: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let healthy = body["nodes"].as_array().is_some_and(|n| {
        n.iter()
            .all(|x| x["status"] == "active" && x["health"]["status"] == "healthy")
    });
    assert_eq!(
        out.status.code(),
        Some(if healthy { 0 } else { 3 }),
        "the exit code says whether the cluster is healthy: {body}"
    );
    body
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "exit {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_out(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn kv_admin_and_bench_work_against_a_dev_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port_block();
    let url = format!("http://127.0.0.1:{port}");
    let _dev = Dev(Command::new(env!("CARGO_BIN_EXE_pairdb"))
        .args([
            "dev",
            &format!("--data-dir={}", dir.path().display()),
            &format!("--http=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pairdb dev"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = pairdb(&url, &["admin", "tenants", "create", "demo", "--rf", "3"]);
        if out.status.success() {
            assert_eq!(json_out(&out)["replication_factor"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "dev cluster never answered");
        std::thread::sleep(Duration::from_millis(200));
    }

    let put = json_out(&pairdb(&url, &["kv", "put", "greeting", "hello"]));
    assert_eq!(put["status"], "success");
    assert_eq!(
        json_out(&pairdb(&url, &["kv", "get", "greeting"]))["value"],
        "hello"
    );
    json_out(&pairdb(
        &url,
        &["kv", "put", "doc", r#"{"a":[1,2]}"#, "--consistency", "all"],
    ));
    assert_eq!(
        json_out(&pairdb(&url, &["kv", "get", "doc"]))["value"],
        json!({"a": [1, 2]})
    );
    let expiring = json_out(&pairdb(
        &url,
        &["kv", "put", "session", "1", "--ttl-seconds", "3600"],
    ));
    assert!(expiring["expires_at"].is_string(), "{expiring}");
    assert_eq!(
        json_out(&pairdb(&url, &["kv", "get", "session"]))["expires_at"],
        expiring["expires_at"]
    );
    // Listing: one page as JSON with its cursor, or every key as lines.
    for i in 0..5 {
        json_out(&pairdb(
            &url,
            &["kv", "put", &format!("list:{i}"), &i.to_string()],
        ));
    }
    let page = json_out(&pairdb(
        &url,
        &["kv", "list", "--prefix", "list:", "--limit", "2"],
    ));
    assert_eq!(page["keys"][0]["key"], "list:0", "{page}");
    let cursor = page["cursor"].as_str().expect("a cursor").to_owned();
    let next = json_out(&pairdb(
        &url,
        &[
            "kv", "list", "--prefix", "list:", "--limit", "2", "--cursor", &cursor,
        ],
    ));
    assert_eq!(next["keys"][0]["key"], "list:2", "{next}");
    let lines = stdout_of(&pairdb(
        &url,
        &[
            "kv", "list", "--prefix", "list:", "--limit", "2", "--all", "--values",
        ],
    ));
    assert_eq!(
        lines, "list:0\t0\nlist:1\t1\nlist:2\t2\nlist:3\t3\nlist:4\t4\n",
        "{lines}"
    );
    json_out(&pairdb(&url, &["kv", "delete", "greeting"]));
    let missing = pairdb(&url, &["kv", "get", "greeting"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("KEY_NOT_FOUND"));
    let listed = stdout_of(&pairdb(&url, &["admin", "tenants", "list"]));
    assert!(
        listed.contains("TENANT") && listed.contains("demo"),
        "{listed}"
    );
    let listed = json_out(&pairdb(&url, &["admin", "tenants", "list", "--json"]));
    assert_eq!(listed["tenants"][0]["tenant_id"], "demo", "{listed}");
    let nodes = nodes_json(&url);
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(3));
    // The table: a row per node, with its ownership; the exit code as with --json.
    let table = pairdb(&url, &["admin", "nodes"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with(" NODE") || text.starts_with("NODE"),
        "{text}"
    );
    assert!(
        text.contains("OWNS") && text.contains("s1") && text.contains("s3"),
        "{text}"
    );
    let owned: f64 = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            l.split_whitespace()
                .last()?
                .strip_suffix('%')?
                .parse::<f64>()
                .ok()
        })
        .sum();
    assert!(
        (owned - 100.0).abs() < 0.5,
        "ownership adds up to 100%: {text}"
    );
    assert_eq!(
        json_out(&pairdb(&url, &["admin", "tenants", "get", "demo"]))["tenant_id"],
        "demo"
    );
    for (args, code) in [
        (&["admin", "remove-node", "s9"][..], "NODE_NOT_FOUND"),
        // demo has RF 3 and the dev cluster 3 nodes.
        (&["admin", "remove-node", "s1"][..], "NODE_IN_USE"),
        (
            &["admin", "add-node", "s4", "127.0.0.1:1", "--vnodes", "8"][..],
            "INVALID_NODE_CONFIG",
        ),
    ] {
        let out = pairdb(&url, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(code), "{args:?}: {stderr}");
    }
    assert_eq!(
        nodes_json(&url)["nodes"].as_array().map(Vec::len),
        Some(3),
        "nothing changed"
    );

    // Snapshots through the CLI: taken on the three nodes, listed, deleted; errors exit 1.
    let taken = json_out(&pairdb(&url, &["admin", "snapshot", "before-bench"]));
    assert_eq!(taken["nodes"].as_array().map(Vec::len), Some(3), "{taken}");
    let listed = json_out(&pairdb(&url, &["admin", "snapshots", "--json"]));
    assert_eq!(listed["snapshots"][0]["name"], "before-bench", "{listed}");
    let table = stdout_of(&pairdb(&url, &["admin", "snapshots"]));
    assert!(
        table.contains("before-bench") && table.contains("MISSING ON"),
        "{table}"
    );
    for (args, code) in [
        (
            &["admin", "snapshot", "before-bench"][..],
            "SNAPSHOT_EXISTS",
        ),
        (&["admin", "snapshot", ".hidden"][..], "INVALID_REQUEST"),
        (
            &["admin", "delete-snapshot", "nope"][..],
            "SNAPSHOT_NOT_FOUND",
        ),
    ] {
        let out = pairdb(&url, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(code),
            "{args:?}"
        );
    }
    let deleted = json_out(&pairdb(&url, &["admin", "delete-snapshot", "before-bench"]));
    assert_eq!(deleted["name"], "before-bench", "{deleted}");

    let report = json_out(&pairdb(
        &url,
        &[
            "bench",
            "--workload",
            "mixed",
            "--keys",
            "200",
            "--concurrency",
            "4",
            "--duration",
            "2s",
            "--json",
        ],
    ));
    assert!(
        report["requests"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["latency_ms"]["p99"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{report}"
    );
    bench_stops_on_sigterm_with_a_latency_line_per_request(&url, dir.path());
    bench_load_writes_every_key_once_in_batches(&url);
    let unreachable = pairdb("http://127.0.0.1:1", &["kv", "get", "x"]);
    assert_eq!(unreachable.status.code(), Some(1));

    // Migrations: none yet; a forced removal followed to its end; then listed.
    let none = pairdb(&url, &["admin", "migrations"]);
    assert!(none.status.success());
    assert_eq!(
        String::from_utf8_lossy(&none.stdout).trim(),
        "no migrations"
    );
    let removed = pairdb(&url, &["admin", "remove-node", "s3", "--force", "--wait"]);
    let done = json_out(&removed);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["type"], "node_removal");
    assert_eq!(
        nodes_json(&url)["nodes"].as_array().map(Vec::len),
        Some(2),
        "--wait returned after s3 left"
    );
    let listed = pairdb(&url, &["admin", "migrations"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("node_removal") && text.contains("s3") && text.contains("completed"),
        "{text}"
    );
    assert!(
        text.contains(&format!("[{}] 100%", "#".repeat(24))),
        "{text}"
    );
    let listed = json_out(&pairdb(&url, &["admin", "migrations", "--json"]));
    assert_eq!(
        listed["migrations"][0]["migration_id"],
        done["migration_id"]
    );
    assert!(listed["migrations"][0]["failure_reason"].is_null());
    assert_eq!(
        json_out(&pairdb(&url, &["kv", "get", "doc", "--consistency", "all"]))["value"],
        json!({"a": [1, 2]}),
        "keys survive the removal"
    );

    // Cleanup after the change, followed to its end (refused until coordinators switched).
    let mut tries = 0;
    let cleaned = loop {
        let out = pairdb(&url, &["admin", "cleanup", "--wait"]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() || !stderr.contains("retry in") || tries == 20 {
            break out;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let cleaned = json_out(&cleaned);
    assert_eq!(cleaned["type"], "cleanup", "{cleaned}");
    assert_eq!(cleaned["state"], "completed", "{cleaned}");
    assert_eq!(
        json_out(&pairdb(&url, &["kv", "get", "doc", "--consistency", "all"]))["value"],
        json!({"a": [1, 2]}),
        "keys survive the cleanup"
    );

    // Anti-entropy: a repair followed to its end (what it compared and fixed), then the
    // status of every range.
    let repaired = json_out(&pairdb(&url, &["admin", "repair", "--wait"]));
    assert_eq!(repaired["state"], "completed", "{repaired}");
    assert_eq!(repaired["scope"], "*", "{repaired}");
    assert!(repaired["ranges_total"].as_u64() > Some(0), "{repaired}");
    assert_eq!(repaired["ranges_done"], repaired["ranges_total"]);
    assert_eq!(repaired["keys_fixed"], 0, "replicas agreed: {repaired}");
    let status = json_out(&pairdb(&url, &["admin", "repair-status"]));
    let ranges = status["ranges"].as_array().expect("ranges");
    assert!(!ranges.is_empty(), "{status}");
    assert!(
        ranges
            .iter()
            .all(|r| r["complete"] == true && r["last_repaired_at"].is_string()),
        "{status}"
    );
    assert_eq!(status["ranges_never_repaired"], 0, "{status}");

    // One range, as repair-status prints it: a repair of that arc alone.
    let arc = format!(
        "{}-{}",
        ranges[0]["range_start"].as_str().expect("start"),
        ranges[0]["range_end"].as_str().expect("end")
    );
    let one = json_out(&pairdb(
        &url,
        &[
            "admin",
            "repair",
            "--range",
            &arc,
            "--tenant-id",
            "demo",
            "--wait",
        ],
    ));
    assert_eq!(one["state"], "completed", "{one}");
    assert_eq!(one["scope"], format!("tenant=demo,range={arc}"), "{one}");
    assert_eq!(one["ranges_total"], 1, "one tenant, one range: {one}");
    let bad = pairdb(&url, &["admin", "repair", "--range", "12-x"]);
    assert!(!bad.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(said.contains("INVALID_REQUEST"), "{said}");
}

/// `pairdb bench --workload load`: 250 keys in batches of 100 are three requests, and every
/// key reads back with the loaded value; the key after the last is not written. A batch whose
/// items fail (an unknown tenant: 200 with an error per item) is tried three times, then
/// counted as not written.
fn bench_load_writes_every_key_once_in_batches(url: &str) {
    let load = |args: &[&str]| {
        let args = [&["bench", "--workload", "load", "--json"][..], args].concat();
        let report = json_out(&pairdb(url, &args));
        let counts = ["keys_written", "requests", "errors"].map(|f| report[f].as_u64());
        (counts, report)
    };
    let (counts, report) = load(&[
        "--keys",
        "250",
        "--batch",
        "100",
        "--value-size",
        "7",
        "--concurrency",
        "2",
    ]);
    assert_eq!(counts, [Some(250), Some(3), Some(0)], "{report}");
    for key in ["k0", "k99", "k100", "k249"] {
        assert_eq!(
            json_out(&pairdb(url, &["kv", "get", key, "--consistency", "all"]))["value"],
            "xxxxxxx",
            "{key}"
        );
    }
    let missing = pairdb(url, &["kv", "get", "k250"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("KEY_NOT_FOUND"));
    let (counts, report) = load(&["--keys", "5", "--tenant", "no-such-tenant"]);
    assert_eq!(counts, [Some(0), Some(3), Some(3)], "{report}");
}

/// A paced `pairdb bench` with an hour to run, stopped by SIGTERM after about 2 s: it exits 0
/// with the report of what ran, and its latency log holds one line per request counted, each
/// due within the run, answered 200, with a latency of at least 1 µs.
fn bench_stops_on_sigterm_with_a_latency_line_per_request(url: &str, dir: &std::path::Path) {
    let log = dir.join("latencies.txt");
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let before = unix_now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pairdb"))
        .args([
            "bench",
            "--url",
            url,
            "--tenant",
            "demo",
            "--workload",
            "mixed",
        ])
        .args([
            "--keys",
            "200",
            "--concurrency",
            "4",
            "--rate",
            "200",
            "--no-preload",
        ])
        .args(["--duration", "1h", "--json", "--latency-log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pairdb bench");
    std::thread::sleep(Duration::from_secs(2));
    let status = common::terminate(&mut child);
    let after = unix_now();
    let out = child.wait_with_output().expect("bench output");
    assert!(
        status.success(),
        "exit {status:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests >= 100, "paced at 200/s for 2 s: {report}");
    assert!(report["seconds"].as_f64().unwrap() < 30.0, "{report}");
    let text = std::fs::read_to_string(&log).expect("latency log");
    let lines: Vec<Vec<u64>> = text
        .lines()
        .map(|l| l.split(' ').map(|f| f.parse().expect(l)).collect())
        .collect();
    assert_eq!(lines.len() as u64, requests, "one line per request");
    for line in &lines {
        let [due, micros, status] = line[..] else {
            panic!("three fields: {line:?}")
        };
        assert!(
            (before..=after).contains(&due),
            "{line:?} not in {before}..{after}"
        );
        // 100 ms of slack: the two clocks the due time is mapped through may drift a little.
        assert!(micros >= 1 && due + micros <= after + 100_000, "{line:?}");
        assert_eq!(status, 200, "{line:?}");
    }
}
