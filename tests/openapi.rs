//! `docs/openapi.yaml` against the running gateway: every documented operation is probed (and
//! every probe names a documented operation, so the document and the routes cannot drift), each
//! answer's status is one the document lists for that operation, and its JSON body matches the
//! documented schema (types, required fields, enums) for that status.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{RoleProcess, start_storage};
use reqwest::Method;
use serde_json::Value;

struct Probe {
    method: Method,
    template: &'static str,
    path: String,
    body: Option<&'static str>,
}

fn probe(method: Method, template: &'static str, path: &str, body: Option<&'static str>) -> Probe {
    Probe {
        method,
        template,
        path: path.to_owned(),
        body,
    }
}

fn probes() -> Vec<Probe> {
    use Method as M;
    let kv = "/v1/key-value";
    vec![
        probe(
            M::POST,
            "/v1/tenants",
            "/v1/tenants",
            Some(r#"{"tenant_id":"acme","replication_factor":3}"#),
        ),
        probe(
            M::POST,
            "/v1/tenants",
            "/v1/tenants",
            Some(r#"{"tenant_id":"acme"}"#),
        ),
        probe(
            M::POST,
            "/v1/tenants",
            "/v1/tenants",
            Some(r#"{"tenant_id":"x","replication_factor":0}"#),
        ),
        probe(M::GET, "/v1/tenants/{tenant_id}", "/v1/tenants/acme", None),
        probe(M::GET, "/v1/tenants", "/v1/tenants?limit=1", None),
        probe(
            M::DELETE,
            "/v1/tenants/{tenant_id}",
            "/v1/tenants/never-created",
            None,
        ),
        probe(
            M::POST,
            "/v1/tenants",
            "/v1/tenants",
            Some(r#"{"tenant_id":"doomed"}"#),
        ),
        probe(
            M::DELETE,
            "/v1/tenants/{tenant_id}",
            "/v1/tenants/doomed",
            None,
        ),
        probe(M::GET, "/v1/tenants", "/v1/tenants?cursor=%2A", None),
        probe(
            M::GET,
            "/v1/tenants/{tenant_id}",
            "/v1/tenants/missing",
            None,
        ),
        probe(
            M::PUT,
            "/v1/tenants/{tenant_id}/replication-factor",
            "/v1/tenants/acme/replication-factor",
            Some(r#"{"replication_factor":2}"#),
        ),
        probe(
            M::PUT,
            "/v1/tenants/{tenant_id}/replication-factor",
            "/v1/tenants/missing/replication-factor",
            Some(r#"{"replication_factor":2}"#),
        ),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"k","value":{"any":["json",1,null]},"consistency":"all"}"#),
        ),
        probe(M::POST, kv, kv, Some(r#"{"key":"n","value":null}"#)),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"t","value":1,"ttl_seconds":3600}"#),
        ),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"t","value":1,"ttl_seconds":-1}"#),
        ),
        probe(M::GET, kv, "/v1/key-value?key=t", None),
        probe(M::GET, "/console", "/console", None),
        probe(
            M::GET,
            "/v1/admin/console/history",
            "/v1/admin/console/history?seconds=60",
            None,
        ),
        probe(
            M::GET,
            "/v1/admin/console/history",
            "/v1/admin/console/history?seconds=soon",
            None,
        ),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"k","value":1,"consistency":"most"}"#),
        ),
        probe(M::GET, kv, "/v1/key-value?key=k", None),
        probe(M::GET, kv, "/v1/key-value?key=n&consistency=one", None),
        probe(M::GET, kv, "/v1/key-value?key=absent", None),
        probe(
            M::GET,
            kv,
            "/v1/key-value?prefix=&limit=2&values=true",
            None,
        ),
        probe(M::GET, kv, "/v1/key-value?prefix=k&cursor=forged", None),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"k","value":2,"if_match":{"nobody":1}}"#),
        ),
        probe(
            M::POST,
            kv,
            kv,
            Some(r#"{"key":"k","value":2,"if_absent":true}"#),
        ),
        probe(
            M::POST,
            "/v1/key-value/batch",
            "/v1/key-value/batch",
            Some(
                r#"{"items":[{"key":"b1","value":1,"ttl_seconds":60},{"op":"delete","key":"never"},{"key":"k","value":3,"if_absent":true}]}"#,
            ),
        ),
        probe(
            M::POST,
            "/v1/key-value/batch",
            "/v1/key-value/batch",
            Some(r#"{"items":[]}"#),
        ),
        probe(
            M::POST,
            "/v1/key-value/batch-get",
            "/v1/key-value/batch-get",
            Some(r#"{"keys":["b1","never","t"],"consistency":"one"}"#),
        ),
        probe(
            M::POST,
            "/v1/key-value/batch-get",
            "/v1/key-value/batch-get",
            Some(r#"{"keys":[]}"#),
        ),
        probe(
            M::DELETE,
            kv,
            kv,
            Some(r#"{"key":"k","if_match":{"nobody":1}}"#),
        ),
        probe(M::DELETE, kv, kv, Some(r#"{"key":"k"}"#)),
        probe(M::DELETE, kv, "/v1/key-value?key=k", None),
        probe(
            M::GET,
            "/v1/admin/storage-nodes",
            "/v1/admin/storage-nodes",
            None,
        ),
        probe(
            M::POST,
            "/v1/admin/storage-nodes",
            "/v1/admin/storage-nodes",
            Some(r#"{"node_id":"s9","host":"127.0.0.1","port":7109}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/storage-nodes",
            "/v1/admin/storage-nodes",
            Some(r#"{"node_id":"s9","host":"127.0.0.1","port":0}"#),
        ),
        probe(
            M::DELETE,
            "/v1/admin/storage-nodes/{node_id}",
            "/v1/admin/storage-nodes/s1?force=false",
            None,
        ),
        probe(
            M::GET,
            "/v1/admin/migrations/{migration_id}",
            "/v1/admin/migrations/m1",
            None,
        ),
        probe(
            M::GET,
            "/v1/admin/migrations",
            "/v1/admin/migrations?limit=5",
            None,
        ),
        probe(
            M::DELETE,
            "/v1/admin/migrations/{migration_id}",
            "/v1/admin/migrations/m1",
            None,
        ),
        probe(
            M::POST,
            "/v1/admin/cleanup",
            "/v1/admin/cleanup",
            Some(r#"{"node_id":"s1"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/cleanup",
            "/v1/admin/cleanup",
            Some(r#"{"node_id":"nobody"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/cleanup",
            "/v1/admin/cleanup",
            Some(r#"{"forse":true}"#),
        ),
        probe(M::GET, "/v1/admin/repair", "/v1/admin/repair", None),
        probe(
            M::POST,
            "/v1/admin/repair",
            "/v1/admin/repair",
            Some(r#"{"node_id":"nobody"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/repair",
            "/v1/admin/repair",
            Some(r#"{"tenant":"x"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/repair",
            "/v1/admin/repair",
            Some(r#"{"range_start":"12"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/repair",
            "/v1/admin/repair",
            Some(r#"{"range_start":"12","range_end":"-1"}"#),
        ),
        probe(
            M::GET,
            "/v1/admin/repair/{repair_id}",
            "/v1/admin/repair/no-such-repair",
            None,
        ),
        probe(M::POST, "/v1/admin/repair", "/v1/admin/repair", None),
        probe(
            M::POST,
            "/v1/admin/snapshots",
            "/v1/admin/snapshots",
            Some(r#"{"name":"probe"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/snapshots",
            "/v1/admin/snapshots",
            Some(r#"{"name":"probe"}"#),
        ),
        probe(
            M::POST,
            "/v1/admin/snapshots",
            "/v1/admin/snapshots",
            Some(r#"{"name":"../x"}"#),
        ),
        probe(M::GET, "/v1/admin/snapshots", "/v1/admin/snapshots", None),
        probe(
            M::DELETE,
            "/v1/admin/snapshots/{name}",
            "/v1/admin/snapshots/probe",
            None,
        ),
        probe(
            M::DELETE,
            "/v1/admin/snapshots/{name}",
            "/v1/admin/snapshots/probe",
            None,
        ),
        probe(M::GET, "/healthz", "/healthz", None),
        probe(M::GET, "/health", "/health", None),
        probe(M::GET, "/readyz", "/readyz", None),
        probe(M::GET, "/metrics", "/metrics", None),
    ]
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.trim_start_matches('#');
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("bad $ref {r}")),
            )
        }
        None => v,
    }
}

/// Checks `value` against an OpenAPI schema (the subset the document uses).
/// Whether `value` matches `schema` (types, required fields, enums, nullable; `oneOf`: some
/// branch; `allOf`: every one); the first mismatch otherwise.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(branches) = schema["oneOf"].as_array() {
        let failures: Vec<String> = branches
            .iter()
            .filter_map(|b| check(doc, b, value, at).err())
            .collect();
        if failures.len() == branches.len() {
            return Err(format!("{at}: no oneOf branch matches: {failures:?}"));
        }
    }
    for branch in schema["allOf"].as_array().into_iter().flatten() {
        check(doc, branch, value, at)?;
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return Err(format!("{at}: {value} not in {options:?}"));
        }
    }
    let fail = |what: &str| Err(format!("{at}: not {what}: {value}"));
    match schema["type"].as_str() {
        None => Ok(()),
        Some("object") => {
            let Some(map) = value.as_object() else {
                return fail("an object");
            };
            for field in schema["required"].as_array().into_iter().flatten() {
                let field = field.as_str().unwrap_or_default();
                if !map.contains_key(field) {
                    return Err(format!("{at}: missing {field} in {value}"));
                }
            }
            for (name, v) in map {
                if let Some(s) = schema["properties"].get(name) {
                    check(doc, s, v, &format!("{at}.{name}"))?;
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    check(doc, s, v, &format!("{at}.{name}"))?;
                } else if schema.get("additionalProperties") != Some(&Value::Bool(true)) {
                    return Err(format!("{at}: {name} is not documented (in {value})"));
                }
            }
            Ok(())
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("an array");
            };
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Some("string") if value.is_string() => Ok(()),
        Some("integer") if value.is_u64() || value.is_i64() => Ok(()),
        Some("number") if value.is_number() => Ok(()),
        Some("boolean") if value.is_boolean() => Ok(()),
        Some(other @ ("string" | "integer" | "number" | "boolean")) => fail(other),
        Some(other) => Err(format!("{at}: schema type {other} not handled")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_gateway_matches_docs_openapi_yaml() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let doc: Value = serde_norway::from_str(&text).expect("valid YAML");
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("operations")
                .keys()
                .filter(|m| !m.starts_with("x-") && *m != "parameters")
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let probed: BTreeSet<(String, String)> = probes()
        .iter()
        .map(|p| (p.method.to_string(), p.template.to_owned()))
        .collect();
    assert_eq!(
        documented, probed,
        "documented operations = probed operations"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let storage = start_storage(3, dir.path());
    let meta = format!("sqlite://{}", dir.path().join("meta.db").display());
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &[], dir.path());
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &[], dir.path());
    let client = common::http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes: Value = client
            .get(format!("{}/v1/admin/storage-nodes", gw.url()))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .unwrap_or(Value::Null);
        let up = nodes["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3 && n.iter().all(|x| x["status"] == "active"));
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "cluster not up: {nodes}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for p in probes() {
        let name = format!("{} {}", p.method, p.path);
        let mut request = client
            .request(p.method.clone(), format!("{}{}", gw.url(), p.path))
            .header("X-Tenant-ID", "acme");
        if let Some(b) = p.body {
            request = request.header("content-type", "application/json").body(b);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16().to_string();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.expect("body");
        let op = &doc["paths"][p.template][p.method.as_str().to_lowercase()];
        let documented = resolve(
            &doc,
            op["responses"]
                .get(&status)
                .unwrap_or_else(|| panic!("{name}: status {status} is not documented ({body})")),
        );
        if let Some(schema) = documented["content"]["application/json"].get("schema") {
            assert!(
                content_type.starts_with("application/json"),
                "{name}: {content_type}"
            );
            let value: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"));
            if let Err(e) = check(&doc, schema, &value, &name) {
                panic!("{e}");
            }
        } else {
            // Text (health, metrics) or the console's page: the documented media type.
            let media = content_type.split(';').next().unwrap_or_default().trim();
            assert!(
                documented["content"].get(media).is_some(),
                "{name}: {media} is not documented"
            );
        }
    }
}
