//! `pairdb kv put|get|delete` and `pairdb admin tenants|nodes|migration|migrations`: one HTTP
//! call each, the JSON answer printed on stdout (exit 0) or the error body on stderr (exit 1);
//! `admin migrations` prints a line per migration instead, `admin nodes` and `admin snapshots`
//! tables ([`super::tables`]; `--json` for the JSON), and `add-node`/`remove-node --wait`
//! poll the migration to its end (exit 1 unless it completed).
//!
//! Connection: `--url` (PAIRDB_URL, default http://127.0.0.1:8080), `--tenant` (PAIRDB_TENANT,
//! sent as `X-Tenant-ID` for gateways with auth none), `--token` (PAIRDB_TOKEN, sent as a bearer
//! token). A `kv put` value that parses as JSON is sent as that JSON; anything else is sent as a
//! JSON string, so `pairdb kv put greeting hello` stores "hello".

use std::path::Path;

use anyhow::Context;
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

use crate::cli::{AdminCommand, Connection, KvCommand, TenantCommand};

/// What a command got back.
pub struct Answer {
    pub ok: bool,
    pub body: Value,
    /// Printed instead of the JSON body, when the command renders for people.
    pub text: Option<String>,
    /// The exit code of an answer that is not an error but says the cluster is not healthy
    /// (`admin nodes`: [`super::tables::EXIT_UNHEALTHY`]).
    pub exit_code: Option<u8>,
}

/// An HTTP client builder for a gateway: HTTPS through rustls on the ring provider (installed
/// as the process default on first use), trusting `cacert` (a PEM file, e.g. `pairdb cert`'s
/// `ca.pem`) besides the system's roots.
pub fn http_builder(cacert: Option<&Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    // Another caller may have installed it first: either way there is one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder();
    if let Some(path) = cacert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --cacert {}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--cacert {} holds no PEM certificate", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

fn request(conn: &Connection, method: Method, path: &str) -> anyhow::Result<RequestBuilder> {
    let client = http_builder(conn.cacert.as_deref())?.build()?;
    Ok(request_on(&client, conn, method, path))
}

/// A request on an existing client (a command making many requests keeps its connections and
/// builds its TLS configuration once).
fn request_on(
    client: &reqwest::Client,
    conn: &Connection,
    method: Method,
    path: &str,
) -> RequestBuilder {
    let url = format!("{}{path}", conn.url.trim_end_matches('/'));
    let mut r = client.request(method, url);
    if let Some(t) = &conn.tenant {
        r = r.header("X-Tenant-ID", t);
    }
    if let Some(t) = &conn.token {
        r = r.bearer_auth(t);
    }
    r
}

async fn send(r: RequestBuilder) -> anyhow::Result<Answer> {
    let response = r.send().await.context("cannot reach the gateway")?;
    let ok = response.status().is_success();
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    let body = serde_json::from_str(&text).unwrap_or_else(
        |_| json!({"status": "error", "http_status": status.as_u16(), "body": text}),
    );
    Ok(Answer {
        ok,
        body,
        text: None,
        exit_code: None,
    })
}

/// A value from the command line: JSON if it parses, else a JSON string.
pub fn parse_value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

fn query(key: &str) -> String {
    url_encode(key)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

pub async fn kv(conn: &Connection, command: &KvCommand) -> anyhow::Result<Answer> {
    match command {
        KvCommand::Put {
            key,
            value,
            consistency,
            idempotency_key,
            ttl_seconds,
        } => {
            let mut body = json!({"key": key, "value": parse_value(value)});
            if let Some(c) = consistency {
                body["consistency"] = json!(c);
            }
            if let Some(ttl) = ttl_seconds {
                body["ttl_seconds"] = json!(ttl);
            }
            let mut r = request(conn, Method::POST, "/v1/key-value")?.json(&body);
            if let Some(k) = idempotency_key {
                r = r.header("Idempotency-Key", k);
            }
            send(r).await
        }
        KvCommand::Get { key, consistency } => {
            let mut path = format!("/v1/key-value?key={}", query(key));
            if let Some(c) = consistency {
                path.push_str(&format!("&consistency={}", query(c)));
            }
            send(request(conn, Method::GET, &path)?).await
        }
        KvCommand::List {
            prefix,
            limit,
            cursor,
            values,
            all,
            consistency,
        } => {
            let mut base = format!(
                "/v1/key-value?prefix={}&limit={limit}&values={values}",
                query(prefix)
            );
            if let Some(c) = consistency {
                base.push_str(&format!("&consistency={}", query(c)));
            }
            list(conn, &base, cursor.clone(), *values, *all).await
        }
        KvCommand::Delete { key, consistency } => {
            let mut body = json!({"key": key});
            if let Some(c) = consistency {
                body["consistency"] = json!(c);
            }
            send(request(conn, Method::DELETE, "/v1/key-value")?.json(&body)).await
        }
    }
}

/// One page of a listing, or with `all` every page, printed as lines.
async fn list(
    conn: &Connection,
    base: &str,
    mut cursor: Option<String>,
    values: bool,
    all: bool,
) -> anyhow::Result<Answer> {
    let mut lines = String::new();
    let client = http_builder(conn.cacert.as_deref())?.build()?;
    loop {
        let path = match &cursor {
            Some(c) => format!("{base}&cursor={}", query(c)),
            None => base.to_owned(),
        };
        let page = send(request_on(&client, conn, Method::GET, &path)).await?;
        if !all || !page.ok {
            return Ok(page);
        }
        for k in page.body["keys"].as_array().into_iter().flatten() {
            lines.push_str(k["key"].as_str().unwrap_or_default());
            if values {
                lines.push('\t');
                lines.push_str(&k["value"].to_string());
            }
            lines.push('\n');
        }
        match page.body["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => {
                // The caller prints the text with a newline of its own.
                if lines.ends_with('\n') {
                    lines.pop();
                }
                return Ok(Answer {
                    text: Some(lines),
                    ..page
                });
            }
        }
    }
}

async fn get_migration(conn: &Connection, migration_id: &str) -> anyhow::Result<Answer> {
    let path = format!("/v1/admin/migrations/{}", url_encode(migration_id));
    send(request(conn, Method::GET, &path)?).await
}

/// With `wait`, follows the migration an accepted change started until it ends (a progress bar
/// on stderr; `id_field` names the id in the answer); the answer is the final migration, ok
/// only if it completed.
async fn follow_if(
    conn: &Connection,
    accepted: Answer,
    wait: bool,
    id_field: &str,
) -> anyhow::Result<Answer> {
    let id = accepted.body[id_field].as_str().map(str::to_owned);
    let (true, true, Some(id)) = (wait, accepted.ok, id) else {
        return Ok(accepted);
    };
    let bar = super::progress::bar(&id);
    loop {
        let answer = get_migration(conn, &id).await?;
        if !answer.ok {
            bar.abandon();
            return Ok(answer);
        }
        super::progress::update(&bar, &answer.body);
        match answer.body["state"].as_str() {
            Some("completed") => {
                bar.finish();
                return Ok(answer);
            }
            Some("failed" | "cancelled") => {
                bar.abandon();
                return Ok(Answer {
                    ok: false,
                    ..answer
                });
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

pub async fn admin(conn: &Connection, command: &AdminCommand) -> anyhow::Result<Answer> {
    match command {
        AdminCommand::Nodes { json } => {
            let mut answer = send(request(conn, Method::GET, "/v1/admin/storage-nodes")?).await?;
            if answer.ok {
                let (table, healthy) = super::tables::nodes(&answer.body);
                if !json {
                    answer.text = Some(table);
                }
                answer.exit_code = (!healthy).then_some(super::tables::EXIT_UNHEALTHY);
            }
            Ok(answer)
        }
        AdminCommand::Snapshot { name } => {
            let body = json!({"name": name});
            send(request(conn, Method::POST, "/v1/admin/snapshots")?.json(&body)).await
        }
        AdminCommand::Snapshots { json } => {
            let mut answer = send(request(conn, Method::GET, "/v1/admin/snapshots")?).await?;
            if answer.ok && !json {
                answer.text = Some(super::tables::snapshots(&answer.body));
            }
            Ok(answer)
        }
        AdminCommand::DeleteSnapshot { name } => {
            let path = format!("/v1/admin/snapshots/{}", url_encode(name));
            send(request(conn, Method::DELETE, &path)?).await
        }
        AdminCommand::AddNode {
            node_id,
            address,
            virtual_nodes,
            wait,
        } => {
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("address must be host:port, not {address:?}"))?;
            let mut body = json!({"node_id": node_id, "host": host, "port": port});
            if let Some(v) = virtual_nodes {
                body["virtual_nodes"] = json!(v);
            }
            let accepted =
                send(request(conn, Method::POST, "/v1/admin/storage-nodes")?.json(&body)).await?;
            follow_if(conn, accepted, *wait, "migration_id").await
        }
        AdminCommand::RemoveNode {
            node_id,
            force,
            wait,
        } => {
            let path = format!(
                "/v1/admin/storage-nodes/{}?force={force}",
                url_encode(node_id)
            );
            let accepted = send(request(conn, Method::DELETE, &path)?).await?;
            follow_if(conn, accepted, *wait, "migration_id").await
        }
        AdminCommand::Cleanup {
            node_id,
            force,
            wait,
        } => {
            let mut body = json!({"force": force});
            if let Some(id) = node_id {
                body["node_id"] = json!(id);
            }
            let accepted =
                send(request(conn, Method::POST, "/v1/admin/cleanup")?.json(&body)).await?;
            // A cleanup is a migration: followed the same way.
            follow_if(conn, accepted, *wait, "cleanup_id").await
        }
        AdminCommand::Repair {
            tenant_id,
            node_id,
            range,
            wait,
        } => {
            let mut body = json!({});
            if let Some(id) = tenant_id {
                body["tenant_id"] = json!(id);
            }
            if let Some(id) = node_id {
                body["node_id"] = json!(id);
            }
            if let Some(range) = range {
                let Some((start, end)) = range.split_once('-') else {
                    anyhow::bail!("--range takes START-END (decimal ring positions)");
                };
                body["range_start"] = json!(start);
                body["range_end"] = json!(end);
            }
            let accepted =
                send(request(conn, Method::POST, "/v1/admin/repair")?.json(&body)).await?;
            let end = follow_if(conn, accepted, *wait, "repair_id").await?;
            // Followed to its end: the repair's own record says what it compared and fixed.
            match (*wait, end.body["migration_id"].as_str()) {
                (true, Some(id)) => {
                    let path = format!("/v1/admin/repair/{}", url_encode(id));
                    let run = send(request(conn, Method::GET, &path)?).await?;
                    Ok(Answer { ok: end.ok, ..run })
                }
                _ => Ok(end),
            }
        }
        AdminCommand::RepairStatus => send(request(conn, Method::GET, "/v1/admin/repair")?).await,
        AdminCommand::Migration { migration_id } => get_migration(conn, migration_id).await,
        AdminCommand::Cancel { migration_id, wait } => {
            let path = format!("/v1/admin/migrations/{}", url_encode(migration_id));
            let accepted = send(request(conn, Method::DELETE, &path)?).await?;
            let end = follow_if(conn, accepted, *wait, "migration_id").await?;
            // Followed to its end: only a cancelled one is what was asked.
            let ok = if *wait {
                end.body["state"] == "cancelled"
            } else {
                end.ok
            };
            Ok(Answer { ok, ..end })
        }
        AdminCommand::Migrations { limit, json } => {
            let path = format!("/v1/admin/migrations?limit={limit}");
            let mut answer = send(request(conn, Method::GET, &path)?).await?;
            if answer.ok && !json {
                let lines: Vec<String> = answer.body["migrations"]
                    .as_array()
                    .map(|all| all.iter().map(super::progress::migration_line).collect())
                    .unwrap_or_default();
                answer.text = Some(if lines.is_empty() {
                    "no migrations".to_owned()
                } else {
                    lines.join("\n")
                });
            }
            Ok(answer)
        }
        AdminCommand::Tenants(TenantCommand::Create {
            tenant_id,
            replication_factor,
        }) => {
            let mut body = json!({"tenant_id": tenant_id});
            if let Some(rf) = replication_factor {
                body["replication_factor"] = json!(rf);
            }
            send(request(conn, Method::POST, "/v1/tenants")?.json(&body)).await
        }
        AdminCommand::Tenants(TenantCommand::List { limit, json }) => {
            let mut tenants: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            while tenants.len() < *limit {
                let page_size = (*limit - tenants.len()).min(1000);
                let mut path = format!("/v1/tenants?limit={page_size}");
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={}", url_encode(c)));
                }
                let answer = send(request(conn, Method::GET, &path)?).await?;
                if !answer.ok {
                    return Ok(answer);
                }
                tenants.extend(
                    answer.body["tenants"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                match answer.body["cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            let body = json!({ "tenants": tenants });
            Ok(Answer {
                ok: true,
                text: (!json).then(|| super::tables::tenants(&body)),
                body,
                exit_code: None,
            })
        }
        AdminCommand::Tenants(TenantCommand::Delete { tenant_id }) => {
            let path = format!("/v1/tenants/{}", url_encode(tenant_id));
            send(request(conn, Method::DELETE, &path)?).await
        }
        AdminCommand::Tenants(TenantCommand::Get { tenant_id }) => {
            let path = format!("/v1/tenants/{}", url_encode(tenant_id));
            send(request(conn, Method::GET, &path)?).await
        }
        AdminCommand::Tenants(TenantCommand::SetRf {
            tenant_id,
            replication_factor,
        }) => {
            let path = format!("/v1/tenants/{}/replication-factor", url_encode(tenant_id));
            let body = json!({"replication_factor": replication_factor});
            send(request(conn, Method::PUT, &path)?.json(&body)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_when_they_parse() {
        assert_eq!(parse_value("hello"), json!("hello"));
        assert_eq!(parse_value("{\"a\":1}"), json!({"a": 1}));
        assert_eq!(parse_value("12"), json!(12));
        assert_eq!(url_encode("user:1 x/y"), "user%3A1%20x%2Fy");
    }
}
