//! The key-value additions of API.md over real processes (three storage nodes, a coordinator,
//! a gateway): conditional writes and deletes (`if_match`, `if_absent`), with their bad input
//! and what concurrent conditional writers get; batches of writes and reads; the replica
//! detail a request can ask for (`X-Replica-Detail`); listing keys with cursors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::BTreeMap;

use common::cluster::{RoleProcess, start_storage};
use common::coord::{sqlite_url, wait_all_active};
use reqwest::Method;
use serde_json::{Value, json};

/// One cluster per test, one test at a time (a 2-core machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    url: String,
    _gateway: RoleProcess,
    coordinator: RoleProcess,
    storage: Vec<common::StorageNode>,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let storage = start_storage(3, dir.path());
    let coordinator = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &[],
        dir.path(),
    );
    let gateway = RoleProcess::gateway("gw", &[&coordinator], &["--auth=none"], &[], dir.path());
    wait_all_active(&coordinator.client().await, 3).await;
    let url = gateway.url();
    let (s, b) = call(
        Method::POST,
        &format!("{url}/v1/tenants"),
        None,
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    Cluster {
        url,
        _gateway: gateway,
        coordinator,
        storage,
        _dir: dir,
    }
}

/// An HTTP call as tenant acme; status and JSON body.
async fn call(method: Method, url: &str, idem: Option<&str>, body: Option<Value>) -> (u16, Value) {
    call_as("acme", method, url, idem, body).await
}

/// An HTTP call as `tenant`; status and JSON body.
async fn call_as(
    tenant: &str,
    method: Method,
    url: &str,
    idem: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = common::http_client()
        .request(method, url)
        .header("X-Tenant-ID", tenant);
    if let Some(key) = idem {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http call");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn conflict(s: u16, b: &Value) -> Value {
    assert_eq!(
        (s, b["error_code"].as_str()),
        (409, Some("VERSION_CONFLICT")),
        "{b}"
    );
    assert!(b.get("current_vector_clock").is_some(), "{b}");
    b["current_vector_clock"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_writes_and_deletes() {
    let _serial = SERIAL.lock().await;
    let c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    let put = |body: Value| call(Method::POST, &kv, None, Some(body));
    let value_of = || async {
        let (s, b) = call(
            Method::GET,
            &format!("{kv}?key=k&consistency=all"),
            None,
            None,
        )
        .await;
        (s, b["value"].clone(), b["vector_clock"].clone())
    };

    // if_absent on a new key writes; a second one conflicts and names the current version.
    let (s, first) = put(json!({"key": "k", "value": 1, "if_absent": true})).await;
    assert_eq!(s, 200, "{first}");
    let v1 = first["vector_clock"].clone();
    let (s, b) = put(json!({"key": "k", "value": 2, "if_absent": true})).await;
    assert_eq!(conflict(s, &b), v1);
    assert_eq!(
        value_of().await.1,
        json!(1),
        "a failed condition writes nothing"
    );

    // if_match: a stale or unknown clock conflicts, the current one writes.
    let (s, b) = put(json!({"key": "k", "value": 3, "if_match": {"nobody": 1}})).await;
    assert_eq!(conflict(s, &b), v1);
    let (s, second) = put(json!({"key": "k", "value": 3, "if_match": v1})).await;
    assert_eq!(s, 200, "{second}");
    let v2 = second["vector_clock"].clone();
    assert_ne!(v1, v2);
    let (s, b) = put(json!({"key": "k", "value": 4, "if_match": v1})).await;
    assert_eq!(conflict(s, &b), v2, "the old version no longer matches");
    assert_eq!(value_of().await.1, json!(3));

    // A conditional delete: stale conflicts and deletes nothing; current deletes.
    let (s, b) = call(
        Method::DELETE,
        &kv,
        None,
        Some(json!({"key": "k", "if_match": v1})),
    )
    .await;
    assert_eq!(conflict(s, &b), v2);
    assert_eq!(value_of().await.0, 200);
    let (s, b) = call(
        Method::DELETE,
        &kv,
        None,
        Some(json!({"key": "k", "if_match": v2})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(value_of().await.0, 404);
    // Deleted: if_match of anything conflicts with a null current version, if_absent writes.
    let (s, b) = put(json!({"key": "k", "value": 5, "if_match": v2})).await;
    assert_eq!(conflict(s, &b), Value::Null);
    let (s, b) = call(
        Method::DELETE,
        &kv,
        None,
        Some(json!({"key": "never", "if_match": v2})),
    )
    .await;
    assert_eq!(
        conflict(s, &b),
        Value::Null,
        "a missing key is a conflict, not a 404"
    );
    let (s, b) = put(json!({"key": "k", "value": 6, "if_absent": true})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(value_of().await.1, json!(6));
    let v3 = b["vector_clock"].clone();

    // Bad input: a documented 400, and nothing written.
    for bad in [
        json!({"key": "k", "value": 7, "if_match": v3, "if_absent": true}),
        json!({"key": "k", "value": 7, "if_match": {}}),
        json!({"key": "k", "value": 7, "if_match": v3, "context": v3}),
        json!({"key": "k", "value": 7, "if_match": "c1:5"}),
        json!({"key": "k", "value": 7, "if_match": {"c1": -1}}),
        json!({"key": "k", "value": 7, "if_absent": "yes"}),
    ] {
        let (s, b) = put(bad.clone()).await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{bad}: {b}"
        );
    }
    assert_eq!(value_of().await.1, json!(6));

    // An idempotent retry of a conditional write answers the first response, even though the
    // condition no longer holds; the same key with another condition is another request.
    let body = json!({"key": "k", "value": 8, "if_match": v3});
    let (s, first) = call(Method::POST, &kv, Some("cond-1"), Some(body.clone())).await;
    assert_eq!(s, 200, "{first}");
    let (s, again) = call(Method::POST, &kv, Some("cond-1"), Some(body)).await;
    assert_eq!(
        (s, again["is_duplicate"].as_bool()),
        (200, Some(true)),
        "{again}"
    );
    let (s, b) = call(
        Method::POST,
        &kv,
        Some("cond-1"),
        Some(json!({"key": "k", "value": 8, "if_absent": true})),
    )
    .await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (400, Some("IDEMPOTENCY_KEY_CONFLICT")),
        "{b}"
    );
}

/// Concurrent conditional writers of the same version: what the design gives (the module doc
/// of coordinator/conditional.rs). At least one succeeds; every one that fails names a newer
/// version; the value that stays is one a writer was told succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_writers() {
    let _serial = SERIAL.lock().await;
    let c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "race", "value": "start"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let start = b["vector_clock"].clone();
    let writers = (0..16).map(|i| {
        let (kv, start) = (kv.clone(), start.clone());
        async move {
            let body = json!({"key": "race", "value": i, "if_match": start});
            (i, call(Method::POST, &kv, None, Some(body)).await)
        }
    });
    let mut succeeded = Vec::new();
    let mut conflicts = 0;
    for (i, (s, b)) in futures::future::join_all(writers).await {
        match s {
            200 => succeeded.push(i),
            409 => {
                let current = conflict(s, &b);
                assert_ne!(current, start, "{b}");
                conflicts += 1;
            }
            other => panic!("writer {i}: {other} {b}"),
        }
    }
    assert!(!succeeded.is_empty(), "some writer must succeed");
    let (s, b) = call(
        Method::GET,
        &format!("{kv}?key=race&consistency=all"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let kept = b["value"].as_i64().expect("an integer") as i32;
    assert!(
        succeeded.contains(&kept),
        "the value kept ({kept}) was acknowledged to its writer: {succeeded:?}"
    );
    let counts: BTreeMap<&str, usize> =
        BTreeMap::from([("succeeded", succeeded.len()), ("conflicts", conflicts)]);
    println!("16 concurrent if_match writers of one version: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_of_writes_and_reads() {
    let _serial = SERIAL.lock().await;
    let c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    let batch = format!("{kv}/batch");
    let batch_get = format!("{kv}/batch-get");
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "old", "value": "x"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let old_clock = b["vector_clock"].clone();

    // Puts of every JSON type, a delete, a delete of nothing, a failed condition: each item
    // its own result, in order; not atomic.
    let items = json!({"consistency": "all", "items": [
        {"key": "a", "value": {"n": 1}},
        {"op": "put", "key": "b", "value": null},
        {"op": "delete", "key": "old", "if_match": old_clock},
        {"op": "delete", "key": "never"},
        {"key": "c", "value": [1, 2], "if_absent": true},
        {"key": "a2", "value": 2, "if_match": {"nobody": 1}},
    ]});
    let (s, b) = call(Method::POST, &batch, None, Some(items)).await;
    assert_eq!(s, 200, "{b}");
    let results = b["results"].as_array().expect("results");
    let outcome: Vec<(&str, &str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
                r["error_code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcome,
        vec![
            ("a", "success", ""),
            ("b", "success", ""),
            ("old", "success", ""),
            ("never", "error", "KEY_NOT_FOUND"),
            ("c", "success", ""),
            ("a2", "error", "VERSION_CONFLICT"),
        ],
        "{b}"
    );
    assert_eq!(results[5]["current_vector_clock"], Value::Null, "{b}");
    assert_eq!(results[0]["replica_count"], 3, "{b}");
    assert!(results[0]["vector_clock"].is_object(), "{b}");

    // Read back in one batch-get: values byte for byte, misses as errors.
    let (s, b) = call(
        Method::POST,
        &batch_get,
        None,
        Some(json!({"keys": ["a", "b", "c", "old", "a2"], "consistency": "quorum"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let got = b["items"].as_array().expect("items");
    assert_eq!(got[0]["value"], json!({"n": 1}));
    assert_eq!(got[1]["value"], Value::Null);
    assert!(
        got[1].get("value").is_some(),
        "a null value is a value: {b}"
    );
    assert_eq!(got[2]["value"], json!([1, 2]));
    for missing in &got[3..] {
        assert_eq!(missing["error_code"], "KEY_NOT_FOUND", "{b}");
        assert!(missing.get("value").is_none(), "{b}");
    }

    // An idempotent batch: the retry replays every item.
    let idem = json!({"items": [{"key": "i1", "value": 1}, {"op": "delete", "key": "a"}]});
    let (s, first) = call(Method::POST, &batch, Some("batch-1"), Some(idem.clone())).await;
    assert_eq!(s, 200, "{first}");
    let (s, again) = call(Method::POST, &batch, Some("batch-1"), Some(idem)).await;
    assert_eq!(s, 200, "{again}");
    for (one, two) in first["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["results"].as_array().unwrap())
    {
        assert_eq!(one["status"], "success", "{first}");
        assert_eq!(two["is_duplicate"], true, "{again}");
        assert_eq!(one["vector_clock"], two["vector_clock"]);
    }

    // Bad batches: a documented 4xx, and nothing of them written.
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"key": format!("m{i}"), "value": i}))
        .collect();
    let big = "x".repeat(4 << 20);
    for (bad, status, code) in [
        (json!({"items": []}), 400, "INVALID_REQUEST"),
        (json!({"items": many}), 400, "INVALID_REQUEST"),
        (
            json!({"items": [{"key": "m0", "value": 1}, {"key": "m0", "value": 2}]}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"items": [{"key": "m0", "value": 1}, {"key": "m1"}]}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"items": [{"key": "m0", "value": 1}, {"key": "m1", "value": 1, "ttl_seconds": -60}]}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"items": [{"key": "m0", "value": 1, "op": "merge"}]}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"items": [{"key": "m0", "value": 1}], "consistency": "most"}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"items": [{"key": "m0", "value": big}, {"key": "m1", "value": big}, {"key": "m2", "value": "y".repeat(2 << 20)}]}),
            413,
            "VALUE_TOO_LARGE",
        ),
    ] {
        let (s, b) = call(Method::POST, &batch, None, Some(bad)).await;
        assert_eq!((s, b["error_code"].as_str()), (status, Some(code)), "{b}");
    }
    let (s, b) = call(
        Method::POST,
        &batch_get,
        None,
        Some(json!({"keys": ["m0", "m1", "m2"]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["error_code"] == "KEY_NOT_FOUND"),
        "no item of a refused batch was written: {b}"
    );
    for bad in [
        json!({"keys": []}),
        json!({"keys": (0..101).map(|i| format!("k{i}")).collect::<Vec<_>>()}),
        json!({"keys": ["ok", ""]}),
        json!({"keys": "a"}),
    ] {
        let (s, b) = call(Method::POST, &batch_get, None, Some(bad)).await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{b}"
        );
    }
    // A batch takes one request per item from the rate budget, all or none.
    let limited = RoleProcess::gateway(
        "gw-limited",
        &[&c.coordinator],
        &["--auth=none", "--write-rate-limit=5"],
        &[],
        c._dir.path(),
    );
    let lbatch = format!("{}/v1/key-value/batch", limited.url());
    let four: Vec<Value> = (0..4)
        .map(|i| json!({"key": format!("r{i}"), "value": i}))
        .collect();
    let (s, b) = call(Method::POST, &lbatch, None, Some(json!({"items": four}))).await;
    assert_eq!(s, 200, "{b}");
    let two: Vec<Value> = (4..6)
        .map(|i| json!({"key": format!("r{i}"), "value": i}))
        .collect();
    let (s, b) = call(Method::POST, &lbatch, None, Some(json!({"items": two}))).await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (429, Some("RATE_LIMIT_EXCEEDED")),
        "{b}"
    );
    let (s, b) = call(Method::GET, &format!("{kv}?key=r4"), None, None).await;
    assert_eq!(s, 404, "a refused batch wrote nothing: {b}");
}

/// A request with `X-Replica-Detail: true`; status and JSON body.
async fn detailed(method: Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = common::http_client()
        .request(method, url)
        .header("X-Tenant-ID", "acme")
        .header("X-Replica-Detail", "true");
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http call");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_can_see_what_the_replicas_did() {
    use pairdb::rpc::common as cpb;
    use pairdb::rpc::storage as spb;
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    let read_all = format!("{kv}?key=k&consistency=all");

    // Not asked: not there.
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "k", "value": 1})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.get("replicas").is_none(), "{b}");
    let (s, b) = detailed(
        Method::POST,
        &kv,
        Some(json!({"key": "k", "value": 2, "consistency": "all"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["replicas"],
        json!({"asked": 3, "acked": 3, "hinted": 0, "pending": 0, "on_all_replicas": true}),
        "{b}"
    );
    let clock = b["vector_clock"].clone();
    let (s, b) = detailed(Method::GET, &read_all, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["replicas"],
        json!({"asked": 3, "answered": 3, "agreed": 3, "read_repair": false, "repaired": 0}),
        "{b}"
    );

    // One replica holds a newer version (written to it directly): the read says only one
    // agreed and that read repair fired; the next read finds them all agreeing.
    let mut entries: Vec<cpb::ClockEntry> = clock
        .as_object()
        .expect("clock")
        .iter()
        .map(|(id, n)| cpb::ClockEntry {
            coordinator_id: id.clone(),
            counter: n.as_u64().expect("counter"),
        })
        .collect();
    entries.push(cpb::ClockEntry {
        coordinator_id: "zz-direct".into(),
        counter: 1,
    });
    let mut s1 = c.storage[0].client().await;
    s1.write(spb::WriteRequest {
        record: Some(spb::Record {
            tenant_id: "acme".into(),
            key: b"k".to_vec().into(),
            version: Some(cpb::Version {
                clock: entries,
                timestamp_ms: pairdb::wallclock::now_ms(),
            }),
            payload: Some(spb::record::Payload::Value(b"\"direct\"".to_vec().into())),
            ring_hash: 0,
            expires_at_ms: 0,
        }),
    })
    .await
    .expect("direct write");
    let (s, b) = detailed(Method::GET, &read_all, None).await;
    assert_eq!((s, b["value"].as_str()), (200, Some("direct")), "{b}");
    assert_eq!(
        b["replicas"],
        json!({"asked": 3, "answered": 3, "agreed": 1, "read_repair": true, "repaired": 2}),
        "{b}"
    );
    common::coord::eventually(
        "read repair landed",
        std::time::Duration::from_secs(10),
        || {
            let read_all = read_all.clone();
            async move {
                let (_, b) = detailed(Method::GET, &read_all, None).await;
                b["replicas"]["agreed"] == 3
            }
        },
    )
    .await;

    // A replica down: a quorum write says it relies on a hint.
    c.storage[2].terminate();
    let admin = c.coordinator.client().await;
    let down = c.storage[2].id.clone();
    common::coord::eventually("s3 seen down", std::time::Duration::from_secs(30), || {
        let (mut admin, down) = (admin.clone(), down.clone());
        async move {
            common::coord::node_state(&mut admin, &down).await
                == Some(pairdb::rpc::common::NodeState::Down)
        }
    })
    .await;
    let (s, b) = detailed(Method::POST, &kv, Some(json!({"key": "k", "value": 3}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["replicas"],
        json!({"asked": 3, "acked": 2, "hinted": 1, "pending": 0, "on_all_replicas": false}),
        "{b}"
    );
    let (s, b) = detailed(Method::DELETE, &kv, Some(json!({"key": "k"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["replicas"]["on_all_replicas"], false, "{b}");
}

/// Every page of a listing; the keys (with values when asked) in the order served.
async fn list_all(tenant: &str, url: &str, query: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let page_url = match &cursor {
            None => format!("{url}?{query}"),
            Some(c) => format!("{url}?{query}&cursor={c}"),
        };
        let (s, b) = call_as(tenant, Method::GET, &page_url, None, None).await;
        assert_eq!(s, 200, "{page_url}: {b}");
        for k in b["keys"].as_array().expect("keys") {
            assert!(k["vector_clock"].is_object(), "{k}");
            out.push((
                k["key"].as_str().expect("key").to_owned(),
                k["value"].clone(),
            ));
        }
        match b["cursor"].as_str() {
            None => return out,
            Some(c) => cursor = Some(c.to_owned()),
        }
    }
    panic!("listing did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_keys_in_order_across_nodes_with_cursors() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    // RF 1: every node holds a different share, so each page is a merge.
    let (s, b) = call(
        Method::POST,
        &format!("{}/v1/tenants", c.url),
        None,
        Some(json!({"tenant_id": "spread", "replication_factor": 1})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut expected = Vec::new();
    for chunk in (0..240).collect::<Vec<u32>>().chunks(60) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"key": format!("item:{i:04}"), "value": {"n": i}}))
            .collect();
        let (s, b) = call_as(
            "spread",
            Method::POST,
            &format!("{kv}/batch"),
            None,
            Some(json!({"items": items})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    for i in 0..240u32 {
        if i % 24 == 5 {
            let (s, b) = call_as(
                "spread",
                Method::DELETE,
                &format!("{kv}?key=item:{i:04}"),
                None,
                None,
            )
            .await;
            assert_eq!(s, 200, "{b}");
        } else {
            expected.push((format!("item:{i:04}"), json!({"n": i})));
        }
    }
    for key in ["itel", "item", "itemz", "other:1"] {
        let (s, b) = call_as(
            "spread",
            Method::POST,
            &kv,
            None,
            Some(json!({"key": key, "value": 0})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    // The same key names in another tenant are never listed.
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "item:0001", "value": "acme"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    let listed = list_all("spread", &kv, "prefix=item:&limit=37&values=true").await;
    assert_eq!(
        listed, expected,
        "every live key once, in key order, with its value"
    );
    let keys_only = list_all("spread", &kv, "prefix=item:&limit=1000").await;
    assert_eq!(keys_only.len(), expected.len());
    assert!(
        keys_only.iter().all(|(_, v)| v.is_null()),
        "no values unless asked"
    );
    let everything = list_all("spread", &kv, "prefix=&limit=7&consistency=all").await;
    let names: Vec<&str> = everything.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names.len(), expected.len() + 4);
    assert_eq!(&names[..2], &["itel", "item"]);
    assert_eq!(names[names.len() - 2..], ["itemz", "other:1"]);
    let (s, b) = call_as(
        "spread",
        Method::GET,
        &format!("{kv}?prefix=nothing"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (s, b["keys"].clone(), b["cursor"].clone()),
        (200, json!([]), Value::Null),
        "{b}"
    );

    // Cursors: only for the tenant and prefix that got them, and only unaltered.
    let (s, b) = call_as(
        "spread",
        Method::GET,
        &format!("{kv}?prefix=item:&limit=5"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let cursor = b["cursor"].as_str().expect("a cursor").to_owned();
    let (s, b) = call_as(
        "spread",
        Method::GET,
        &format!("{kv}?prefix=item:&limit=5&cursor={cursor}"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (s, b["keys"][0]["key"].as_str()),
        (200, Some("item:0006")),
        "{b}"
    );
    let mut altered = cursor.clone().into_bytes();
    let last = altered.len() - 3;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ascii");
    for (tenant, url) in [
        ("acme", format!("{kv}?prefix=item:&cursor={cursor}")),
        ("spread", format!("{kv}?prefix=item:0&cursor={cursor}")),
        ("spread", format!("{kv}?prefix=item:&cursor={altered}")),
        ("spread", format!("{kv}?prefix=item:&cursor=not-a-cursor")),
        ("spread", format!("{kv}?prefix=item:&limit=0")),
        ("spread", format!("{kv}?prefix=item:&limit=1001")),
        ("spread", format!("{kv}?prefix=item:&limit=ten")),
        ("spread", format!("{kv}?prefix=item:&key=item:0001")),
        ("spread", format!("{kv}?prefix=item:&consistency=most")),
    ] {
        let (s, b) = call_as(tenant, Method::GET, &url, None, None).await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{tenant} {url}: {b}"
        );
    }

    // A node down: an RF 1 listing cannot be complete and says so; RF 3 at QUORUM still is.
    for i in 0..20u32 {
        let (s, b) = call(
            Method::POST,
            &kv,
            None,
            Some(json!({"key": format!("q{i:02}"), "value": i, "consistency": "all"})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    c.storage[1].terminate();
    // Before gossip says so, a node that fails a listing is made up for by the nodes the
    // first wave left out: every key, in order, at one (a page of one key: 20 first waves,
    // some of them on s2).
    let one = list_all("acme", &kv, "prefix=q&limit=1&consistency=one").await;
    let keys: Vec<&str> = one.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("q{i:02}")).collect();
    assert_eq!(keys, want);
    let metrics = common::http_get(c.coordinator.http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pairdb_list_second_waves_total") && !l.ends_with(" 0")),
        "a second wave was needed at least once"
    );
    let admin = c.coordinator.client().await;
    let down = c.storage[1].id.clone();
    common::coord::eventually("s2 seen down", std::time::Duration::from_secs(30), || {
        let (mut admin, down) = (admin.clone(), down.clone());
        async move {
            common::coord::node_state(&mut admin, &down).await
                == Some(pairdb::rpc::common::NodeState::Down)
        }
    })
    .await;
    let (s, b) = call_as(
        "spread",
        Method::GET,
        &format!("{kv}?prefix=item:&consistency=one"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("QUORUM_NOT_REACHED")),
        "{b}"
    );
    let quorum = list_all("acme", &kv, "prefix=q&limit=6&consistency=quorum").await;
    assert_eq!(quorum.len(), 20, "{quorum:?}");
    let (s, b) = call(
        Method::GET,
        &format!("{kv}?prefix=q&consistency=all"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (503, Some("QUORUM_NOT_REACHED")),
        "{b}"
    );
}

/// Milliseconds since the Unix epoch of an RFC 3339 `expires_at`.
fn expiry_ms(b: &Value) -> u64 {
    let text = b["expires_at"].as_str().unwrap_or_else(|| panic!("{b}"));
    humantime::parse_rfc3339(text)
        .expect("RFC 3339")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// A value written with `ttl_seconds` reads (with its `expires_at`) until then, and from then
/// on is absent at every consistency, in listings and batch reads, and to conditions; the
/// replicas still hold it (no node runs a timer) with one and the same expiry, and a new write
/// follows it. Bad TTLs are 400 and write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_with_a_ttl_expire_everywhere_at_once() {
    let _serial = SERIAL.lock().await;
    let c = cluster().await;
    let kv = format!("{}/v1/key-value", c.url);
    let before = pairdb::wallclock::now_ms();
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "session", "value": {"user": 7}, "ttl_seconds": 2})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let expires = expiry_ms(&b);
    assert!(
        (before + 2_000..=pairdb::wallclock::now_ms() + 2_000).contains(&expires),
        "the expiry is the write's time plus the TTL: {b}"
    );
    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "forever", "value": 1})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.get("expires_at").is_none(), "{b}");
    let (s, b) = call(
        Method::POST,
        &format!("{kv}/batch"),
        None,
        Some(json!({"items": [{"key": "batched", "value": 2, "ttl_seconds": 2}]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["results"][0]["expires_at"].is_string(), "{b}");

    // An Idempotency-Key replays the first expiry and covers the TTL.
    let once = json!({"key": "once", "value": 1, "ttl_seconds": 600});
    let (s, first) = call(Method::POST, &kv, Some("ttl-1"), Some(once.clone())).await;
    assert_eq!(s, 200, "{first}");
    let (s, again) = call(Method::POST, &kv, Some("ttl-1"), Some(once)).await;
    assert_eq!(
        (s, again["is_duplicate"].as_bool()),
        (200, Some(true)),
        "{again}"
    );
    assert_eq!(again["expires_at"], first["expires_at"], "{again}");
    let (s, b) = call(
        Method::POST,
        &kv,
        Some("ttl-1"),
        Some(json!({"key": "once", "value": 1, "ttl_seconds": 601})),
    )
    .await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (400, Some("IDEMPOTENCY_KEY_CONFLICT")),
        "{b}"
    );

    let (s, b) = call(Method::GET, &format!("{kv}?key=session"), None, None).await;
    assert_eq!((s, b["value"]["user"].as_u64()), (200, Some(7)), "{b}");
    assert_eq!(expiry_ms(&b), expires, "{b}");
    // The expiry is part of the version: every replica holds the same one.
    for node in &c.storage {
        let record = common::coord::stored_record(node, "acme", "session")
            .await
            .expect("held");
        assert_eq!(record.expires_at_ms, expires, "{}", node.id);
    }
    let listed = list_all("acme", &kv, "prefix=&values=true").await;
    assert_eq!(listed.len(), 4, "{listed:?}");

    // Expired: absent at every level, in listings, batch reads and to if_absent.
    common::coord::eventually(
        "session expired",
        std::time::Duration::from_secs(10),
        || {
            let url = format!("{kv}?key=session&consistency=one");
            async move { call(Method::GET, &url, None, None).await.0 == 404 }
        },
    )
    .await;
    for level in ["one", "quorum", "all"] {
        let (s, b) = call(
            Method::GET,
            &format!("{kv}?key=session&consistency={level}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (404, Some("KEY_NOT_FOUND")),
            "{level}: {b}"
        );
    }
    let listed = list_all("acme", &kv, "prefix=").await;
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["forever", "once"], "expired keys are not listed");
    let (s, b) = call(
        Method::POST,
        &format!("{kv}/batch-get"),
        None,
        Some(json!({"keys": ["session", "batched", "forever"]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["items"][0]["error_code"], "KEY_NOT_FOUND", "{b}");
    assert_eq!(b["items"][1]["error_code"], "KEY_NOT_FOUND", "{b}");
    assert_eq!(b["items"][2]["value"], 1, "{b}");
    let (s, b) = call(Method::DELETE, &kv, None, Some(json!({"key": "batched"}))).await;
    assert_eq!(
        (s, b["error_code"].as_str()),
        (404, Some("KEY_NOT_FOUND")),
        "{b}"
    );
    // No timer removed it: the replicas still hold the expired version.
    let held = common::coord::stored_record(&c.storage[0], "acme", "session")
        .await
        .expect("still held");
    let expired_clock = pairdb::vclock::Version::from(held.version.as_ref().expect("version"));

    let (s, b) = call(
        Method::POST,
        &kv,
        None,
        Some(json!({"key": "session", "value": "again", "if_absent": true})),
    )
    .await;
    assert_eq!(s, 200, "an expired value is absent to if_absent: {b}");
    assert!(b.get("expires_at").is_none(), "{b}");
    let (s, b) = call(Method::GET, &format!("{kv}?key=session"), None, None).await;
    assert_eq!((s, b["value"].as_str()), (200, Some("again")), "{b}");
    assert!(b.get("expires_at").is_none(), "{b}");
    let now_held = common::coord::stored_record(&c.storage[0], "acme", "session")
        .await
        .expect("held");
    assert_eq!(now_held.expires_at_ms, 0);
    assert_eq!(
        pairdb::vclock::Version::from(now_held.version.as_ref().expect("version"))
            .compare(&expired_clock),
        pairdb::vclock::Causality::After,
        "the new write follows the expired version"
    );

    // Bad TTLs: 400, nothing written (single writes and batches alike).
    for bad in [
        json!(-1),
        json!(0),
        json!(1.5),
        json!("60"),
        json!(315_360_001u64),
    ] {
        let (s, b) = call(
            Method::POST,
            &kv,
            None,
            Some(json!({"key": "bad", "value": 1, "ttl_seconds": bad})),
        )
        .await;
        assert_eq!(
            (s, b["error_code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{bad}: {b}"
        );
        let (s, b) = call(
            Method::POST,
            &format!("{kv}/batch"),
            None,
            Some(json!({"items": [
                {"key": "bad-batch", "value": 1},
                {"key": "bad", "value": 1, "ttl_seconds": bad}
            ]})),
        )
        .await;
        assert_eq!(s, 400, "{bad}: {b}");
    }
    for key in ["bad", "bad-batch"] {
        let (s, _) = call(Method::GET, &format!("{kv}?key={key}"), None, None).await;
        assert_eq!(s, 404, "{key} was not written");
    }
}

/// Whether a value expired is the reading coordinator's decision, by its own clock: with one
/// coordinator's clock two hours ahead, a value with a one-hour TTL is absent through it and
/// present through the other. The expiry travels with the version to a replica that was down
/// at the write (hint replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_is_decided_by_the_reading_coordinators_clock_and_travels_with_the_version() {
    use common::backends::{libfaketime, skip_or_fail};
    use pairdb::rpc::common::Consistency;
    let _serial = SERIAL.lock().await;
    let Some(faketime) = libfaketime() else {
        skip_or_fail(
            "expiry_is_decided_by_the_reading_coordinators_clock_and_travels_with_the_version",
            "libfaketime (apt-get install faketime)",
        );
        return;
    };
    let mut c = cluster().await;
    let ahead = RoleProcess::skewed_coordinator(
        "c-ahead",
        &sqlite_url(c._dir.path()),
        "+2h",
        faketime,
        &c.storage,
        c._dir.path(),
    );
    let mut later = ahead.client().await;
    wait_all_active(&later, 3).await;
    let mut now = c.coordinator.client().await;

    // s3 is down at the write: it gets the version, expiry included, by hint.
    c.storage[2].terminate();
    let written = now
        .write_key_value(pairdb::rpc::coordinator::WriteKeyValueRequest {
            tenant_id: "acme".into(),
            key: b"lease".to_vec().into(),
            value: b"\"held\"".to_vec().into(),
            consistency: Consistency::Quorum as i32,
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await
        .expect("write")
        .into_inner();
    assert!(!written.expires_at.is_empty(), "{written:?}");
    c.storage[2].restart();
    let expires = common::coord::stored_record(&c.storage[0], "acme", "lease")
        .await
        .expect("held")
        .expires_at_ms;
    common::coord::eventually(
        "the hint carried the expiry",
        std::time::Duration::from_secs(20),
        || async {
            common::coord::stored_record(&c.storage[2], "acme", "lease")
                .await
                .is_some_and(|r| r.expires_at_ms == expires)
        },
    )
    .await;

    for level in [Consistency::One, Consistency::All] {
        let read = common::coord::get(&mut now, "acme", "lease", level).await;
        assert_eq!(read.as_deref().ok(), Some("\"held\""), "{level:?}");
        let read = common::coord::get(&mut later, "acme", "lease", level).await;
        let status = read.expect_err("expired by the clock of c-ahead");
        assert_eq!(
            common::coord::code(&status),
            pairdb::rpc::coordinator::ErrorCode::KeyNotFound,
            "{level:?}: {status:?}"
        );
    }
    let listed = later
        .list_keys(pairdb::rpc::coordinator::ListKeysRequest {
            tenant_id: "acme".into(),
            limit: 10,
            consistency: Consistency::One as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.keys.is_empty(), "{listed:?}");
}
