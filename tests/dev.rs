//! `pairdb dev`: one process with the whole cluster. From nothing to a working POST/GET, the
//! printed URL and curl example, a clean SIGTERM, and data that survives a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Starts `pairdb dev` and returns it once it printed its banner (the URL).
fn start(dir: &std::path::Path, port: u16) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pairdb"))
        .args([
            "dev",
            &format!("--data-dir={}", dir.display()),
            &format!("--http=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pairdb dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut banner = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("curl") && line.contains("?key=") {
                let _ = tx.send(banner.clone());
            }
        }
    });
    let banner = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("pairdb dev printed its banner");
    (child, banner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_serves_the_api_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port_block();
    let url = format!("http://127.0.0.1:{port}");
    let (mut child, banner) = start(dir.path(), port);
    assert!(banner.contains(&url), "{banner}");
    let client = pairdb::tools::client::http_builder(None)
        .expect("http client")
        .build()
        .expect("http client");

    let created: Value = client
        .post(format!("{url}/v1/tenants"))
        .json(&json!({"tenant_id": "demo", "replication_factor": 3}))
        .send()
        .await
        .expect("create tenant")
        .json()
        .await
        .expect("json");
    assert_eq!(created["status"], "success", "{created}");
    let written: Value = client
        .post(format!("{url}/v1/key-value"))
        .header("X-Tenant-ID", "demo")
        .json(&json!({"key": "hello", "value": {"to": "world"}, "consistency": "all"}))
        .send()
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!(written["replica_count"], 3, "{written}");
    let read = |client: reqwest::Client, url: String| async move {
        client
            .get(format!("{url}/v1/key-value?key=hello&consistency=all"))
            .header("X-Tenant-ID", "demo")
            .send()
            .await
            .expect("get")
            .json::<Value>()
            .await
            .expect("json")
    };
    assert_eq!(
        read(client.clone(), url.clone()).await["value"],
        json!({"to": "world"})
    );

    assert!(
        common::terminate(&mut child).success(),
        "clean exit on SIGTERM"
    );
    let (mut child, _) = start(dir.path(), port);
    let again = read(client.clone(), url.clone()).await;
    assert_eq!(
        again["value"],
        json!({"to": "world"}),
        "data survives a restart: {again}"
    );
    assert!(common::terminate(&mut child).success());

    // A data dir made for 3 nodes is refused with another count.
    let out = Command::new(env!("CARGO_BIN_EXE_pairdb"))
        .args([
            "dev",
            &format!("--data-dir={}", dir.path().display()),
            &format!("--http=127.0.0.1:{port}"),
            "--storage-nodes=5",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--storage-nodes=3"));
}
