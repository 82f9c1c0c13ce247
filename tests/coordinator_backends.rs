//! Dead backends under a running cluster (real PostgreSQL, Redis, storage, coordinator and
//! gateway processes): when Redis dies, writes keep being served without idempotency and
//! readiness says why; when PostgreSQL dies, known tenants keep working from the cache while
//! unknown tenants and tenant creation get 503 UNAVAILABLE. Nothing acknowledged is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::time::{Duration, Instant};

use common::backends::{Postgres, Redis, skip_or_fail};
use common::cluster::{RoleProcess, start_storage};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("HTTP");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_serving_when_redis_and_postgres_die() {
    let (Some(pg), Some(redis)) = (Postgres::start(), Redis::start()) else {
        skip_or_fail(
            "cluster_keeps_serving_when_redis_and_postgres_die",
            "PostgreSQL or redis-server",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let c1 = RoleProcess::coordinator("c1", &pg.url(), &redis.url(), &storage, &[], dir.path());
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());
    let client = common::http_client();
    let kv = format!("{}/v1/key-value", gw.url());
    let put = |key: &str, idem: Option<&str>| {
        let mut r = client
            .post(&kv)
            .header("X-Tenant-ID", "acme")
            .json(&json!({"key": key, "value": key}));
        if let Some(i) = idem {
            r = r.header("Idempotency-Key", i);
        }
        send(r)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _) = send(
            client
                .post(format!("{}/v1/tenants", gw.url()))
                .json(&json!({"tenant_id": "acme"})),
        )
        .await;
        if s == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "cluster never came up: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, b) = put("before", Some("idem-1")).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = put("before", Some("idem-1")).await;
    assert_eq!((s.as_u16(), &b["is_duplicate"]), (200, &json!(true)), "{b}");
    assert_eq!(b["idempotency_skipped"], json!(false), "{b}");

    // Redis dies: writes go on without idempotency; readiness names the idempotency store.
    drop(redis);
    for i in 0..5 {
        let (s, b) = put(&format!("no-redis-{i}"), Some(&format!("idem-r{i}"))).await;
        assert_eq!(s, 200, "write {i} without Redis: {b}");
        // The client learns that a repeat of this request would be written again.
        assert_eq!(b["idempotency_skipped"], json!(true), "write {i}: {b}");
    }
    let ready = common::http_get(c1.http, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("idempotency"),
        "{ready}"
    );
    let metrics = common::http_get(c1.http, "/metrics").await;
    assert!(
        metrics.contains("pairdb_idempotency_store_errors_total"),
        "counted"
    );

    // PostgreSQL dies: the cached tenant keeps working; unknown tenants and admin get 503.
    drop(pg);
    for i in 0..5 {
        let (s, b) = put(&format!("no-pg-{i}"), None).await;
        assert_eq!(s, 200, "write {i} without PostgreSQL: {b}");
    }
    let (s, b) = send(
        client
            .get(format!("{kv}?key=before"))
            .header("X-Tenant-ID", "acme"),
    )
    .await;
    assert_eq!((s.as_u16(), &b["value"]), (200, &json!("before")), "{b}");
    let (s, b) = send(
        client
            .get(format!("{kv}?key=x"))
            .header("X-Tenant-ID", "newco"),
    )
    .await;
    assert_eq!(
        (s.as_u16(), b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "{b}"
    );
    let (s, b) = send(
        client
            .post(format!("{}/v1/tenants", gw.url()))
            .json(&json!({"tenant_id": "newco"})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), b["error_code"].as_str()),
        (503, Some("UNAVAILABLE")),
        "{b}"
    );

    // Every acknowledged write is there.
    for key in ["before", "no-redis-0", "no-redis-4", "no-pg-0", "no-pg-4"] {
        let (s, b) = send(
            client
                .get(format!("{kv}?key={key}&consistency=all"))
                .header("X-Tenant-ID", "acme"),
        )
        .await;
        assert_eq!((s.as_u16(), b["value"].as_str()), (200, Some(key)), "{b}");
    }
}
