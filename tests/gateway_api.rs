//! The public HTTP API end to end: real `pairdb` processes (3 gossiping storage nodes,
//! coordinators, gateways) driven over HTTP with reqwest. Every API.md endpoint and error code,
//! both auth modes, tenant isolation, rate limits, idempotent retries, bad input, and a storage
//! node and a coordinator dying under the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::time::{Duration, Instant};

use common::StorageNode;
use common::cluster::{RoleProcess, start_storage};
use pairdb::gateway::auth::{TokenRole, issue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// One cluster per test, one test at a time (a 2-core machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "gateway-test-secret";

struct Cluster {
    _dir: tempfile::TempDir,
    storage: Vec<StorageNode>,
    coordinators: Vec<RoleProcess>,
}

fn cluster(coordinators: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta = format!("sqlite://{}", dir.path().join("meta.db").display());
    let coordinators = (1..=coordinators)
        .map(|i| {
            RoleProcess::coordinator(
                &format!("c{i}"),
                &meta,
                "memory://",
                &storage,
                &[],
                dir.path(),
            )
        })
        .collect();
    Cluster {
        _dir: dir,
        storage,
        coordinators,
    }
}

impl Cluster {
    fn gateway(&self, id: &str, flags: &[&str], env: &[(&str, &str)]) -> RoleProcess {
        let coordinators: Vec<&RoleProcess> = self.coordinators.iter().collect();
        RoleProcess::gateway(id, &coordinators, flags, env, self._dir.path())
    }
}

/// An HTTP call; returns status, headers and the JSON body (Null when not JSON).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let client = common::http_client();
    let mut request = client.request(method, url).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(b) = body {
        request = request.header("content-type", "application/json").body(b);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn post(url: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let (s, _, b) = call(
        Method::POST,
        url,
        token,
        &[],
        Some(body.to_string().into_bytes()),
    )
    .await;
    (s, b)
}

async fn get(url: &str, token: Option<&str>) -> (StatusCode, Value) {
    let (s, _, b) = call(Method::GET, url, token, &[], None).await;
    (s, b)
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(body["error_code"], want_code, "{body}");
    assert!(body["message"].is_string(), "{body}");
}

fn token(tenant: &str, role: TokenRole) -> String {
    issue(SECRET.as_bytes(), tenant, role, Duration::from_secs(3600)).expect("token")
}

/// Waits until the coordinators behind the gateway see all three storage nodes up (gossip
/// converged), asking several times so each coordinator answers.
async fn wait_all_active(gateway: &RoleProcess, token: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_a_row = 0;
    while in_a_row < 4 {
        let (s, b) = get(&format!("{}/v1/admin/storage-nodes", gateway.url()), token).await;
        let all = s == StatusCode::OK
            && b["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|x| x["status"] == "active"));
        in_a_row = if all { in_a_row + 1 } else { 0 };
        assert!(
            Instant::now() < deadline,
            "storage nodes never all active: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(gateway: &RoleProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _, _) = call(
            Method::GET,
            &format!("{}/readyz", gateway.url()),
            None,
            &[],
            None,
        )
        .await;
        if s == StatusCode::OK {
            return;
        }
        assert!(Instant::now() < deadline, "gateway never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_serves_the_whole_api_and_keeps_tenants_apart() {
    let _serial = SERIAL.lock().await;
    let c = cluster(1);
    let gw = c.gateway(
        "gw-token",
        &["--auth=token"],
        &[("PAIRDB_GATEWAY_AUTH_SECRET", SECRET)],
    );
    wait_ready(&gw).await;
    let url = gw.url();
    let admin = token("ops", TokenRole::Admin);
    wait_all_active(&gw, Some(&admin)).await;
    let acme = token("acme", TokenRole::Tenant);
    let globex = token("globex", TokenRole::Tenant);
    let ghost = token("ghost", TokenRole::Tenant);
    let kv = format!("{url}/v1/key-value");

    // Authentication and authorization.
    let (s, b) = get(&format!("{kv}?key=a"), None).await;
    assert_error(s, &b, 401, "UNAUTHORIZED");
    let (s, b) = get(&format!("{kv}?key=a"), Some("not.a.token")).await;
    assert_error(s, &b, 401, "UNAUTHORIZED");
    let forged = issue(
        b"another-secret",
        "acme",
        TokenRole::Admin,
        Duration::from_secs(60),
    )
    .expect("t");
    let (s, b) = get(&format!("{kv}?key=a"), Some(&forged)).await;
    assert_error(s, &b, 401, "UNAUTHORIZED");
    let expired = issue(SECRET.as_bytes(), "acme", TokenRole::Tenant, Duration::ZERO).expect("t");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = get(&format!("{kv}?key=a"), Some(&expired)).await;
    assert_error(s, &b, 401, "UNAUTHORIZED");
    let (s, b) = post(
        &format!("{url}/v1/tenants"),
        Some(&acme),
        &json!({"tenant_id": "acme"}),
    )
    .await;
    assert_error(s, &b, 403, "FORBIDDEN");
    let (s, b) = get(&format!("{url}/v1/admin/storage-nodes"), Some(&acme)).await;
    assert_error(s, &b, 403, "FORBIDDEN");

    // Tenants.
    let (s, b) = post(
        &format!("{url}/v1/tenants"),
        Some(&admin),
        &json!({"tenant_id": "acme", "replication_factor": 3}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["status"].as_str(),
            b["tenant_id"].as_str(),
            b["replication_factor"].as_u64()
        ),
        (Some("success"), Some("acme"), Some(3))
    );
    assert!(
        b["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{b}"
    );
    let (s, b) = post(
        &format!("{url}/v1/tenants"),
        Some(&admin),
        &json!({"tenant_id": "acme"}),
    )
    .await;
    assert_error(s, &b, 409, "TENANT_EXISTS");
    let (s, b) = post(
        &format!("{url}/v1/tenants"),
        Some(&admin),
        &json!({"tenant_id": "big", "replication_factor": 11}),
    )
    .await;
    assert_error(s, &b, 400, "INVALID_REPLICATION_FACTOR");
    let (s, b) = post(
        &format!("{url}/v1/tenants"),
        Some(&admin),
        &json!({"tenant_id": "a:b"}),
    )
    .await;
    assert_error(s, &b, 400, "INVALID_REQUEST");
    let (s, _) = post(
        &format!("{url}/v1/tenants"),
        Some(&admin),
        &json!({"tenant_id": "globex", "replication_factor": 3}),
    )
    .await;
    assert_eq!(s, 200);
    // The tenant list: admin only, paged in id order by an opaque cursor.
    for id in ["t-3", "t-1", "t-2"] {
        let (s, _) = post(
            &format!("{url}/v1/tenants"),
            Some(&admin),
            &json!({"tenant_id": id}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, b) = get(&format!("{url}/v1/tenants"), Some(&acme)).await;
    assert_error(s, &b, 403, "FORBIDDEN");
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page_url = match &cursor {
            None => format!("{url}/v1/tenants?limit=2"),
            Some(c) => format!("{url}/v1/tenants?limit=2&cursor={c}"),
        };
        let (s, b) = get(&page_url, Some(&admin)).await;
        assert_eq!(s, 200, "{b}");
        pages += 1;
        let page = b["tenants"].as_array().expect("tenants");
        assert!(page.len() <= 2, "{b}");
        listed.extend(
            page.iter()
                .map(|t| t["tenant_id"].as_str().unwrap().to_owned()),
        );
        match b["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, ["acme", "globex", "t-1", "t-2", "t-3"]);
    assert_eq!(pages, 3);
    for bad in ["limit=0", "limit=1001", "limit=x", "cursor=%2A%2A%2A"] {
        let (s, b) = get(&format!("{url}/v1/tenants?{bad}"), Some(&admin)).await;
        assert_error(s, &b, 400, "INVALID_REQUEST");
    }
    let (s, _, b) = call(
        Method::PUT,
        &format!("{url}/v1/tenants/globex/replication-factor"),
        Some(&admin),
        &[],
        Some(br#"{"replication_factor": 2}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["old_replication_factor"].as_u64(),
            b["new_replication_factor"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert!(b["updated_at"].is_string());
    // Lowering is a migration too (the replicas that stay are brought up to date first); a
    // second change waits for it.
    let lowering = b["migration_id"].as_str().expect("migration id").to_owned();
    wait_completed(&url, &admin, &lowering).await;
    // Raising starts a migration that copies existing keys, visible through its id.
    let (s, _, b) = call(
        Method::PUT,
        &format!("{url}/v1/tenants/globex/replication-factor"),
        Some(&admin),
        &[],
        Some(br#"{"replication_factor": 3}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["new_replication_factor"], 3, "{b}");
    let migration = b["migration_id"].as_str().expect("migration id").to_owned();
    let (s, m) = get(
        &format!("{url}/v1/admin/migrations/{migration}"),
        Some(&admin),
    )
    .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["type"], "replication_factor_change", "{m}");
    for field in [
        "migration_id",
        "node_id",
        "state",
        "progress",
        "started_at",
        "estimated_completion",
    ] {
        assert!(!m[field].is_null(), "{field} missing: {m}");
    }
    let (s, _, b) = call(
        Method::PUT,
        &format!("{url}/v1/tenants/globex/replication-factor"),
        Some(&admin),
        &[],
        Some(br#"{"replication_factor": 0}"#.to_vec()),
    )
    .await;
    assert_error(s, &b, 400, "INVALID_REPLICATION_FACTOR");
    let (s, _, b) = call(
        Method::PUT,
        &format!("{url}/v1/tenants/nope/replication-factor"),
        Some(&admin),
        &[],
        Some(br#"{"replication_factor": 3}"#.to_vec()),
    )
    .await;
    assert_error(s, &b, 404, "TENANT_NOT_FOUND");
    let (s, b) = get(&format!("{url}/v1/tenants/acme"), Some(&admin)).await;
    assert_eq!(s, 200);
    for field in [
        "status",
        "tenant_id",
        "replication_factor",
        "created_at",
        "updated_at",
    ] {
        assert!(!b[field].is_null(), "{field} missing: {b}");
    }
    let (s, b) = get(&format!("{url}/v1/tenants/nope"), Some(&admin)).await;
    assert_error(s, &b, 404, "TENANT_NOT_FOUND");
    let (s, b) = get(
        &format!("{url}/v1/tenants/..%2F..%2Fetc%2Fpasswd"),
        Some(&admin),
    )
    .await;
    assert_error(s, &b, 404, "TENANT_NOT_FOUND");

    // Values of every JSON type round-trip unchanged.
    let values = [
        r#""a string""#,
        "1.50",
        "12345678901234567890",
        "-0.000001",
        r#"{"nested":{"list":[1,"two",null,true]},"n":2}"#,
        "[1,2,3]",
        "true",
        "null",
    ];
    for (i, v) in values.iter().enumerate() {
        let body = format!(r#"{{"key":"v{i}","value":{v},"consistency":"quorum"}}"#);
        let (s, _, b) = call(Method::POST, &kv, Some(&acme), &[], Some(body.into_bytes())).await;
        assert_eq!(s, 200, "{b}");
        for field in [
            "key",
            "idempotency_key",
            "vector_clock",
            "replica_count",
            "consistency",
            "is_duplicate",
        ] {
            assert!(!b[field].is_null(), "{field} missing: {b}");
        }
        assert!(b["vector_clock"].is_object());
        let response = common::http_client()
            .get(format!("{kv}?key=v{i}"))
            .bearer_auth(&acme)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("text");
        assert!(
            text.contains(&format!(r#""value":{v}"#)),
            "exact JSON text of {v}: {text}"
        );
    }

    // Isolation: the same key in two tenants.
    let (s, _) = post(
        &kv,
        Some(&acme),
        &json!({"key": "shared", "value": "acme's"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = get(&format!("{kv}?key=shared"), Some(&globex)).await;
    assert_error(s, &b, 404, "KEY_NOT_FOUND");
    let (s, _) = post(
        &kv,
        Some(&globex),
        &json!({"key": "shared", "value": "globex's"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&format!("{kv}?key=shared"), Some(&acme)).await.1["value"],
        "acme's"
    );
    assert_eq!(
        get(&format!("{kv}?key=shared&consistency=all"), Some(&globex))
            .await
            .1["value"],
        "globex's"
    );
    let (s, b) = post(
        &kv,
        Some(&acme),
        &json!({"key": "shared", "value": 1, "tenant_id": "globex"}),
    )
    .await;
    assert_error(s, &b, 403, "FORBIDDEN");
    let (s, b) = get(&format!("{kv}?key=shared&tenant_id=globex"), Some(&acme)).await;
    assert_error(s, &b, 403, "FORBIDDEN");
    assert_eq!(
        get(&format!("{kv}?key=shared"), Some(&globex)).await.1["value"],
        "globex's"
    );
    let (s, b) = get(&format!("{kv}?key=shared"), Some(&ghost)).await;
    assert_error(s, &b, 404, "TENANT_NOT_FOUND");

    // Consistency levels and the causal context.
    for level in ["one", "quorum", "all"] {
        let (s, b) = post(
            &kv,
            Some(&acme),
            &json!({"key": "lvl", "value": level, "consistency": level}),
        )
        .await;
        assert_eq!(
            (s.as_u16(), b["consistency"].as_str()),
            (200, Some(level)),
            "{b}"
        );
        assert_eq!(
            get(&format!("{kv}?key=lvl&consistency={level}"), Some(&acme))
                .await
                .1["value"],
            level
        );
    }
    let (s, b) = post(
        &kv,
        Some(&acme),
        &json!({"key": "lvl", "value": 1, "consistency": "strong"}),
    )
    .await;
    assert_error(s, &b, 400, "INVALID_REQUEST");
    let (s, b) = get(&format!("{kv}?key=lvl&consistency=ALL"), Some(&acme)).await;
    assert_error(s, &b, 400, "INVALID_REQUEST");
    let first = get(&format!("{kv}?key=lvl"), Some(&acme)).await.1["vector_clock"].clone();
    let (_, next) = post(
        &kv,
        Some(&acme),
        &json!({"key": "lvl", "value": "next", "context": first}),
    )
    .await;
    for (id, counter) in first.as_object().expect("clock") {
        assert!(
            next["vector_clock"][id].as_u64() > counter.as_u64(),
            "{next} follows {first}"
        );
    }

    // Delete: body form and query form; deleting again is 404.
    let (s, _, b) = call(
        Method::DELETE,
        &kv,
        Some(&acme),
        &[],
        Some(br#"{"key":"v0","consistency":"quorum"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    for field in [
        "status",
        "key",
        "vector_clock",
        "replica_count",
        "consistency",
    ] {
        assert!(!b[field].is_null(), "{field} missing: {b}");
    }
    let (s, b) = get(&format!("{kv}?key=v0"), Some(&acme)).await;
    assert_error(s, &b, 404, "KEY_NOT_FOUND");
    let (s, _, _) = call(
        Method::DELETE,
        &format!("{kv}?key=v1"),
        Some(&acme),
        &[],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, b) = call(
        Method::DELETE,
        &format!("{kv}?key=v1"),
        Some(&acme),
        &[],
        None,
    )
    .await;
    assert_error(s, &b, 404, "KEY_NOT_FOUND");

    // Bad input: the documented 4xx, and nothing written.
    let bad: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "INVALID_REQUEST"),
        (br#"{"key":"nv1"}"#.to_vec(), 400, "INVALID_REQUEST"),
        (br#"{"key":5,"value":1}"#.to_vec(), 400, "INVALID_REQUEST"),
        (br#"{"key":"","value":1}"#.to_vec(), 400, "INVALID_REQUEST"),
        (
            format!(r#"{{"key":"{}","value":1}}"#, "k".repeat(1025)).into_bytes(),
            400,
            "KEY_TOO_LARGE",
        ),
        (
            format!(
                r#"{{"key":"nv2","value":"{}"}}"#,
                "x".repeat(10 * 1024 * 1024)
            )
            .into_bytes(),
            413,
            "VALUE_TOO_LARGE",
        ),
        (
            format!(
                r#"{{"key":"nv3","value":"{}"}}"#,
                "x".repeat(12 * 1024 * 1024)
            )
            .into_bytes(),
            413,
            "VALUE_TOO_LARGE",
        ),
        (
            br#"{"key":"nv4","value":1,"consistency":7}"#.to_vec(),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (body, status, code) in bad {
        let (s, _, b) = call(Method::POST, &kv, Some(&acme), &[], Some(body)).await;
        assert_error(s, &b, status, code);
    }
    for key in ["nv1", "nv2", "nv3", "nv4"] {
        let (s, b) = get(&format!("{kv}?key={key}"), Some(&acme)).await;
        assert_error(s, &b, 404, "KEY_NOT_FOUND");
    }
    let (s, b) = get(&kv, Some(&acme)).await;
    assert_error(s, &b, 400, "INVALID_REQUEST");

    // Storage nodes and migrations.
    let (s, b) = get(&format!("{url}/v1/admin/storage-nodes"), Some(&admin)).await;
    assert_eq!(s, 200, "{b}");
    let nodes = b["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        for field in [
            "node_id",
            "host",
            "port",
            "status",
            "virtual_nodes",
            "keys_count",
            "disk_usage_percent",
            "tokens",
        ] {
            assert!(!n[field].is_null(), "{field} missing: {n}");
        }
        // Tokens are decimal strings (u64 does not fit a JSON number exactly), one per vnode.
        let tokens = n["tokens"].as_array().expect("tokens");
        assert_eq!(
            Some(tokens.len() as u64),
            n["virtual_nodes"].as_u64(),
            "{n}"
        );
        assert!(
            tokens
                .iter()
                .all(|t| t.as_str().is_some_and(|t| t.parse::<u64>().is_ok()))
        );
    }
    for body in [
        json!({"node_id": "s4", "host": "127.0.0.1", "port": 0}),
        json!({"node_id": "bad id", "host": "h", "port": 1}),
        json!({"host": "h"}),
    ] {
        let (s, b) = post(
            &format!("{url}/v1/admin/storage-nodes"),
            Some(&admin),
            &body,
        )
        .await;
        assert_error(s, &b, 400, "INVALID_NODE_CONFIG");
    }
    // Nodes are added only once no replica set is being copied.
    wait_completed(&url, &admin, &migration).await;
    let s4_dir = c._dir.path().join("s4");
    std::fs::create_dir_all(&s4_dir).expect("mkdir");
    let s4 = StorageNode::start("s4", &s4_dir, None);
    let s4_body = json!({"node_id": "s4", "host": "127.0.0.1", "port": s4.grpc.port()});
    let (s, b) = post(
        &format!("{url}/v1/admin/storage-nodes"),
        Some(&admin),
        &s4_body,
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        (b["status"].as_str(), b["node_id"].as_str()),
        (Some("accepted"), Some("s4"))
    );
    for field in ["migration_id", "message", "estimated_completion"] {
        assert!(
            b[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}: {b}"
        );
    }
    let added = b["migration_id"].as_str().unwrap_or_default().to_owned();
    let (s, b) = post(
        &format!("{url}/v1/admin/storage-nodes"),
        Some(&admin),
        &s4_body,
    )
    .await;
    assert_error(s, &b, 409, "NODE_EXISTS");
    // acme has RF 3 and only s1..s3 are active: none of them may leave without force.
    let (s, _, b) = call(
        Method::DELETE,
        &format!("{url}/v1/admin/storage-nodes/s1?force=false"),
        Some(&admin),
        &[],
        None,
    )
    .await;
    assert_error(s, &b, 400, "NODE_IN_USE");
    let (s, m) = get(&format!("{url}/v1/admin/migrations/{added}"), Some(&admin)).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(
        (m["type"].as_str(), m["node_id"].as_str()),
        (Some("node_addition"), Some("s4"))
    );
    assert!(
        ["in_progress", "completed"].contains(&m["state"].as_str().unwrap_or_default()),
        "{m}"
    );
    let (s, b) = get(&format!("{url}/v1/admin/migrations/m-1"), Some(&admin)).await;
    assert_error(s, &b, 404, "MIGRATION_NOT_FOUND");
    let (s, _, b) = call(
        Method::DELETE,
        &format!("{url}/v1/admin/storage-nodes/..%2Fetc"),
        Some(&admin),
        &[],
        None,
    )
    .await;
    assert_error(s, &b, 404, "NODE_NOT_FOUND");

    // Health, metrics, unknown routes.
    for path in ["/healthz", "/health", "/readyz"] {
        let (s, _, _) = call(Method::GET, &format!("{url}{path}"), None, &[], None).await;
        assert_eq!(s, 200, "{path}");
    }
    let metrics = common::http_client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("pairdb_gateway_requests_total"),
        "{metrics}"
    );
    let (s, b) = get(&format!("{url}/v1/nothing-here"), Some(&admin)).await;
    assert_error(s, &b, 404, "INVALID_REQUEST");

    // A stored value that is not JSON (written past the gateway, straight to a coordinator)
    // cannot be served as JSON: 500 INTERNAL_ERROR with the error body, and the gateway lives on.
    let mut coordinator = c.coordinators[0].client().await;
    coordinator
        .write_key_value(pairdb::rpc::coordinator::WriteKeyValueRequest {
            tenant_id: "acme".into(),
            key: b"raw".to_vec().into(),
            value: b"not json".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("raw write");
    let (s, b) = get(&format!("{kv}?key=raw"), Some(&acme)).await;
    assert_error(s, &b, 500, "INTERNAL_ERROR");
    assert_eq!(get(&format!("{kv}?key=shared"), Some(&acme)).await.0, 200);
    drop(c.storage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_mode_rate_limits_and_idempotent_retries() {
    let _serial = SERIAL.lock().await;
    let c = cluster(1);
    let gw = c.gateway(
        "gw-none",
        &["--auth=none", "--log-level=info,pairdb::gateway=debug"],
        &[],
    );
    // Per-tenant limits come from the config file: globex may write 5 per minute.
    let limits_dir = tempfile::tempdir().expect("tempdir");
    let limits_file = limits_dir.path().join("limits.toml");
    std::fs::write(&limits_file, "[gateway.tenant_limits.globex]\nwrite = 5\n")
        .expect("write config");
    let limits_arg = format!("--config={}", limits_file.display());
    let limited = c.gateway(
        "gw-limited",
        &["--auth=none", "--write-rate-limit=3", &limits_arg],
        &[],
    );
    wait_ready(&gw).await;
    wait_all_active(&gw, None).await;
    let (url, kv) = (gw.url(), format!("{}/v1/key-value", gw.url()));

    // The tenant comes from the body, the query, or X-Tenant-ID; none at all is 400.
    for t in ["acme", "globex"] {
        let (s, b) = post(&format!("{url}/v1/tenants"), None, &json!({"tenant_id": t})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["replication_factor"], 3);
    }
    let (s, _) = post(
        &kv,
        None,
        &json!({"tenant_id": "acme", "key": "k", "value": "from-body"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&format!("{kv}?key=k&tenant_id=acme"), None).await.1["value"],
        "from-body"
    );
    let (s, _, b) = call(
        Method::GET,
        &format!("{kv}?key=k"),
        None,
        &[("X-Tenant-ID", "acme")],
        None,
    )
    .await;
    assert_eq!((s.as_u16(), b["value"].as_str()), (200, Some("from-body")));
    let (s, _, b) = call(
        Method::GET,
        &format!("{kv}?key=k"),
        None,
        &[("X-Tenant-ID", "globex")],
        None,
    )
    .await;
    assert_error(s, &b, 404, "KEY_NOT_FOUND");
    let (s, b) = post(&kv, None, &json!({"key": "k", "value": 1})).await;
    assert_error(s, &b, 400, "INVALID_REQUEST");
    let (s, _, b) = call(
        Method::DELETE,
        &kv,
        None,
        &[],
        Some(br#"{"tenant_id":"acme","key":"k"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // Rate limits: headers on every key-value response, 429 with Retry-After past the limit.
    let lkv = format!("{}/v1/key-value", limited.url());
    for remaining in [2u32, 1, 0] {
        let (s, h, b) = call(
            Method::POST,
            &lkv,
            None,
            &[("X-Tenant-ID", "acme")],
            Some(br#"{"key":"r","value":1}"#.to_vec()),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert_eq!(h["x-ratelimit-remaining"], remaining.to_string().as_str());
        let reset: u64 = h["x-ratelimit-reset"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("unix seconds");
        assert!(reset >= pairdb::wallclock::now_secs());
    }
    let (s, h, b) = call(
        Method::POST,
        &lkv,
        None,
        &[("X-Tenant-ID", "acme")],
        Some(br#"{"key":"r","value":2}"#.to_vec()),
    )
    .await;
    assert_error(s, &b, 429, "RATE_LIMIT_EXCEEDED");
    let retry: u64 = h["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    let (s, h, b) = call(
        Method::GET,
        &format!("{lkv}?key=r"),
        None,
        &[("X-Tenant-ID", "acme")],
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), b["value"].as_u64()),
        (200, Some(1)),
        "reads have their own budget; the refused write changed nothing"
    );
    assert_eq!(h["x-ratelimit-limit"], "10000");
    let (s, h, _) = call(
        Method::POST,
        &lkv,
        None,
        &[("X-Tenant-ID", "globex")],
        Some(br#"{"key":"r","value":1}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "another tenant has its own budget");
    assert_eq!(
        h["x-ratelimit-limit"], "5",
        "globex's own limit from the config"
    );
    assert_eq!(h["x-ratelimit-remaining"], "4");

    // One access-log line per request at debug: method, route, status, latency.
    let log = std::fs::read_to_string(&gw.log).expect("gateway log");
    let line = log
        .lines()
        .find(|l| l.contains("request") && l.contains("/v1/key-value") && l.contains("status=200"))
        .unwrap_or_else(|| panic!("no access-log line for a key-value request in:\n{log}"));
    assert!(line.contains("POST") || line.contains("GET"), "{line}");
    assert!(line.contains("ms="), "{line}");

    // Idempotency: concurrent retries write once; a different value is a conflict.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            call(
                Method::POST,
                &kv,
                None,
                &[("X-Tenant-ID", "acme"), ("Idempotency-Key", "order-7")],
                Some(br#"{"key":"order","value":{"total":7}}"#.to_vec()),
            )
            .await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        let (s, _, b) = t.await.expect("task");
        assert_eq!(s, 200, "{b}");
        answers.push(b);
    }
    assert_eq!(
        answers
            .iter()
            .filter(|b| b["is_duplicate"] == false)
            .count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|b| b["vector_clock"] == answers[0]["vector_clock"]
                && b["idempotency_key"] == "order-7")
    );
    let (s, _, b) = call(
        Method::GET,
        &format!("{kv}?key=order"),
        None,
        &[("X-Tenant-ID", "acme")],
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), &b["vector_clock"]),
        (200, &answers[0]["vector_clock"]),
        "one version written"
    );
    let (s, _, b) = call(
        Method::POST,
        &kv,
        None,
        &[("X-Tenant-ID", "acme"), ("Idempotency-Key", "order-7")],
        Some(br#"{"key":"order","value":{"total":8}}"#.to_vec()),
    )
    .await;
    assert_error(s, &b, 400, "IDEMPOTENCY_KEY_CONFLICT");
    let (_, b) = post(
        &kv,
        None,
        &json!({"tenant_id": "acme", "key": "fresh", "value": 1}),
    )
    .await;
    assert_eq!(
        b["idempotency_key"].as_str().map(str::len),
        Some(36),
        "generated UUID: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_survives_a_dead_storage_node_and_a_dead_coordinator() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster(2);
    let gw = c.gateway("gw", &["--auth=none"], &[]);
    wait_ready(&gw).await;
    wait_all_active(&gw, None).await;
    let kv = format!("{}/v1/key-value", gw.url());
    let (s, _) = post(
        &format!("{}/v1/tenants", gw.url()),
        None,
        &json!({"tenant_id": "acme"}),
    )
    .await;
    assert_eq!(s, 200);
    let put = |key: String, consistency: &'static str| {
        let kv = kv.clone();
        async move {
            post(
                &kv,
                None,
                &json!({"tenant_id": "acme", "key": key, "value": "v", "consistency": consistency}),
            )
            .await
        }
    };
    for i in 0..10 {
        assert_eq!(put(format!("k{i}"), "all").await.0, 200);
    }
    c.storage[2].kill9();
    for i in 0..10 {
        let (s, b) = put(format!("k{i}"), "quorum").await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            get(
                &format!("{kv}?key=k{i}&tenant_id=acme&consistency=quorum"),
                None
            )
            .await
            .0,
            200
        );
    }
    let (s, b) = put("k0".into(), "all").await;
    assert_error(s, &b, 503, "QUORUM_NOT_REACHED");
    assert_eq!(
        (
            b["details"]["required"].as_u64(),
            b["details"]["received"].as_u64()
        ),
        (Some(3), Some(2)),
        "{b}"
    );

    // One coordinator dies: the gateway fails over, nothing is refused.
    c.coordinators[0].kill9();
    for i in 0..20 {
        let (s, b) = put(format!("after-{i}"), "quorum").await;
        assert_eq!(s, 200, "request {i} after the coordinator died: {b}");
        let (s, b) = get(&format!("{kv}?key=after-{i}&tenant_id=acme"), None).await;
        assert_eq!(s, 200, "{b}");
    }
    // Both dead: 503 UNAVAILABLE, and /readyz says so. A write the gateway sent on its open
    // connection just as the coordinator died is 503 OUTCOME_UNKNOWN instead (it cannot know
    // whether it was applied); the next one finds no coordinator.
    c.coordinators[1].kill9();
    let (mut s, mut b) = put("none-left".into(), "quorum").await;
    for _ in 0..3 {
        if b["error_code"] != "OUTCOME_UNKNOWN" {
            break;
        }
        assert_eq!(s.as_u16(), 503, "{b}");
        (s, b) = put("none-left".into(), "quorum").await;
    }
    assert_error(s, &b, 503, "UNAVAILABLE");
    let (s, _, _) = call(
        Method::GET,
        &format!("{}/readyz", gw.url()),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(s, 503);
}

/// Waits (up to 30 s) until a migration completed; failing fails the test.
async fn wait_completed(url: &str, admin: &str, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = get(&format!("{url}/v1/admin/migrations/{id}"), Some(admin)).await;
        if m["state"] == "completed" {
            return;
        }
        assert_ne!(m["state"], "failed", "{m}");
        assert!(
            std::time::Instant::now() < deadline,
            "migration {id} never completed: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every answer names its request id (the client's when valid, else a fresh one) in
/// `X-Request-ID`, error bodies repeat it, and the coordinator's log line for a failed request
/// carries it: a failed request can be followed from the client into the roles' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_follow_a_request_into_the_logs() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster(1);
    let gw = c.gateway("gw", &["--auth=none"], &[]);
    wait_ready(&gw).await;
    wait_all_active(&gw, None).await;
    let (s, _) = post(
        &format!("{}/v1/tenants", gw.url()),
        None,
        &json!({"tenant_id": "acme", "replication_factor": 3}),
    )
    .await;
    assert_eq!(s, 200);
    c.storage[2].kill9();
    let kv = format!("{}/v1/key-value", gw.url());
    let body = json!({"tenant_id": "acme", "key": "k", "value": 1, "consistency": "all"});
    let send = |id: Option<&'static str>| {
        let (kv, body) = (kv.clone(), body.to_string().into_bytes());
        async move {
            let headers: Vec<(&str, &str)> =
                id.map(|id| ("X-Request-ID", id)).into_iter().collect();
            call(Method::POST, &kv, None, &headers, Some(body)).await
        }
    };
    let header = |h: &reqwest::header::HeaderMap| {
        h.get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("X-Request-ID in every answer")
    };

    let (s, h, b) = send(Some("trace-me-123")).await;
    assert_error(s, &b, 503, "QUORUM_NOT_REACHED");
    assert_eq!(header(&h), "trace-me-123");
    assert_eq!(b["request_id"], "trace-me-123", "{b}");
    let coordinator_log = std::fs::read_to_string(&c.coordinators[0].log).expect("log");
    let line = coordinator_log
        .lines()
        .find(|l| l.contains("request failed") && l.contains("trace-me-123"))
        .unwrap_or_else(|| panic!("no coordinator log line names the request:\n{coordinator_log}"));
    assert!(line.contains("acme"), "{line}");

    // No id, or one that is not a plain token: a fresh one, never the given text.
    for given in [None, Some("bad id\twith tab")] {
        let (s, h, b) = send(given).await;
        assert_eq!(s.as_u16(), 503, "{b}");
        let id = header(&h);
        assert!(pairdb::rpc::trace::valid(&id) && id.len() == 32, "{id}");
        assert_eq!(b["request_id"], id.as_str(), "{b}");
    }
    // Successful answers carry it too.
    let (s, h, _) = call(
        Method::GET,
        &format!("{}/healthz", gw.url()),
        None,
        &[("X-Request-ID", "health-1")],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(header(&h), "health-1");
}
