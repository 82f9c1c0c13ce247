//! The alert rules (`deploy/prometheus/alerts.yml`) and the Grafana dashboard
//! (`deploy/grafana/pairdb.json`) reference only metrics the binary exports: a cluster of real
//! processes (three storage nodes, a coordinator, a gateway) serves some traffic, every role's
//! `/metrics` is scraped, and each `pairdb_*` name in a rule or panel expression must be among
//! the names scraped. Also: every rule is well formed (alert, expr, severity, summary).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{RoleProcess, start_storage};
use common::coord::{sqlite_url, wait_all_active};
use serde_json::{Value, json};

/// The `pairdb_*` metric names an expression mentions.
fn referenced(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pairdb_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric names of a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn rule_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .unwrap();
    let doc: Value = serde_norway::from_str(&text).expect("alerts.yml is YAML");
    let mut all = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(
                ["warning", "critical"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            all.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    all
}

fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/pairdb.json"
    ))
    .unwrap();
    let doc: Value = serde_json::from_str(&text).expect("pairdb.json is JSON");
    let mut all = Vec::new();
    for panel in doc["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            all.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    all
}

async fn call(client: &reqwest::Client, method: reqwest::Method, url: String, body: Option<Value>) {
    let mut request = client.request(method, url).header("X-Tenant-ID", "acme");
    if let Some(body) = body {
        request = request.json(&body);
    }
    let status = request.send().await.expect("request").status();
    assert!(status.is_success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_reference_only_exported_metrics() {
    let mut wanted: Vec<(String, String)> = rule_expressions();
    wanted.extend(dashboard_expressions());
    let names: BTreeSet<String> = wanted.iter().flat_map(|(_, e)| referenced(e)).collect();
    assert!(names.len() >= 15, "the files watch the cluster: {names:?}");

    let dir = tempfile::tempdir().unwrap();
    let storage = start_storage(3, dir.path());
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &[],
        dir.path(),
    );
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());
    wait_all_active(&c1.client().await, 3).await;
    let client = common::http_client();
    let url = gw.url();
    use reqwest::Method as M;
    call(
        &client,
        M::POST,
        format!("{url}/v1/tenants"),
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    for i in 0..20 {
        let body = json!({"key": format!("k{i}"), "value": i});
        call(&client, M::POST, format!("{url}/v1/key-value"), Some(body)).await;
        call(
            &client,
            M::GET,
            format!("{url}/v1/key-value?key=k{i}"),
            None,
        )
        .await;
    }
    call(&client, M::GET, format!("{url}/v1/admin/repair"), None).await;

    // Gauges of periodic loops (migrations, hints, membership) appear within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut scraped = BTreeSet::new();
        for node in &storage {
            scraped.extend(exported(&common::http_get(node.http, "/metrics").await));
        }
        scraped.extend(exported(&common::http_get(c1.http, "/metrics").await));
        scraped.extend(exported(&common::http_get(gw.http, "/metrics").await));
        let missing: BTreeSet<&String> = names.iter().filter(|n| !scraped.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let culprits: Vec<&String> = wanted
                .iter()
                .filter(|(_, e)| referenced(e).iter().any(|n| missing.contains(n)))
                .map(|(what, _)| what)
                .collect();
            panic!("not exported: {missing:?}, used by {culprits:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn names_are_read_out_of_expressions_and_expositions() {
    assert_eq!(
        referenced("sum(rate(pairdb_a_total{x=\"pairdb_not\"}[5m])) / max(pairdb_b)"),
        ["pairdb_a_total", "pairdb_b", "pairdb_not"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    let text = "# TYPE pairdb_x counter\npairdb_x{a=\"b\"} 1\npairdb_y 2\n";
    assert_eq!(
        exported(text),
        ["pairdb_x", "pairdb_y"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
}
