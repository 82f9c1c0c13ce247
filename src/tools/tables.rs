//! What `pairdb admin nodes`, `admin snapshots` and `admin tenants list` print for people: aligned tables in
//! the manner of `nodetool status` (comfy-table, no borders), reasons under the table. `--json`
//! prints the API's JSON instead. `admin nodes` exits [`EXIT_UNHEALTHY`] when a node is not
//! `active` and `healthy`, so scripts and probes can tell without parsing.

use comfy_table::{CellAlignment, Table, presets};
use indicatif::HumanBytes;
use serde_json::Value;

/// Exit code of `pairdb admin nodes` when some node is not active and healthy (the table is
/// printed all the same).
pub const EXIT_UNHEALTHY: u8 = 3;

fn table(header: &[&str], right_aligned: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    for &column in right_aligned {
        if let Some(c) = t.column_mut(column) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Each node's share of the ring as first replica, in percent: a token `t` whose predecessor
/// is `p` owns the positions `[p, t)` (`ring` module doc). Failed nodes own nothing.
pub fn ownership(nodes: &[Value]) -> Vec<f64> {
    let mut tokens: Vec<(u64, usize)> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if node["status"] == "failed" {
            continue;
        }
        for t in node["tokens"].as_array().into_iter().flatten() {
            if let Some(t) = t.as_str().and_then(|s| s.parse::<u64>().ok()) {
                tokens.push((t, i));
            }
        }
    }
    tokens.sort_unstable();
    let mut owned = vec![0f64; nodes.len()];
    let Some(&(last, _)) = tokens.last() else {
        return owned;
    };
    let mut previous = last;
    for &(token, node) in &tokens {
        let arc = token.wrapping_sub(previous);
        // One token alone owns the whole ring (its arc wraps to 0).
        let arc = if tokens.len() == 1 {
            u64::MAX as f64 + 1.0
        } else {
            arc as f64
        };
        if let Some(share) = owned.get_mut(node) {
            *share += arc;
        }
        previous = token;
    }
    owned
        .iter()
        .map(|a| a / (u64::MAX as f64 + 1.0) * 100.0)
        .collect()
}

/// The node list (`GET /v1/admin/storage-nodes`) as a table, and whether every node is active
/// and healthy.
pub fn nodes(body: &Value) -> (String, bool) {
    let nodes: Vec<Value> = body["nodes"].as_array().cloned().unwrap_or_default();
    let owns = ownership(&nodes);
    let mut t = table(
        &[
            "NODE", "ADDRESS", "STATE", "HEALTH", "DISK", "KEYS", "LOAD", "OWNS",
        ],
        &[4, 5, 6, 7],
    );
    let mut reasons = Vec::new();
    let mut healthy = !nodes.is_empty();
    for (node, share) in nodes.iter().zip(owns) {
        let id = text(&node["node_id"]);
        let state = text(&node["status"]);
        let health = text(&node["health"]["status"]);
        healthy &= state == "active" && health == "healthy";
        for reason in node["health"]["reasons"].as_array().into_iter().flatten() {
            reasons.push(format!("{id}: {}", text(reason)));
        }
        t.add_row(vec![
            id,
            format!("{}:{}", text(&node["host"]), text(&node["port"])),
            state,
            health,
            node["disk_usage_percent"]
                .as_f64()
                .map_or("-".to_owned(), |d| format!("{d:.1}%")),
            text(&node["keys_count"]),
            node["load"]
                .as_f64()
                .map_or("-".to_owned(), |l| format!("{l:.0}/s")),
            format!("{share:.1}%"),
        ]);
    }
    let mut out = t.to_string();
    if !reasons.is_empty() {
        out.push_str("\n\n");
        out.push_str(&reasons.join("\n"));
    }
    (out, healthy)
}

/// The snapshot list (`GET /v1/admin/snapshots`) as a table.
pub fn snapshots(body: &Value) -> String {
    let all: Vec<Value> = body["snapshots"].as_array().cloned().unwrap_or_default();
    let mut out = if all.is_empty() {
        "no snapshots".to_owned()
    } else {
        let mut t = table(
            &["NAME", "CREATED", "NODES", "TABLES", "SIZE", "MISSING ON"],
            &[2, 3, 4],
        );
        for s in &all {
            let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
            let tables: u64 = nodes.iter().filter_map(|n| n["tables"].as_u64()).sum();
            let bytes: u64 = nodes.iter().filter_map(|n| n["bytes"].as_u64()).sum();
            let missing: Vec<String> = s["missing_nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            t.add_row(vec![
                text(&s["name"]),
                text(&s["created_at"]),
                nodes.len().to_string(),
                tables.to_string(),
                HumanBytes(bytes).to_string(),
                if missing.is_empty() {
                    "-".to_owned()
                } else {
                    missing.join(",")
                },
            ]);
        }
        t.to_string()
    };
    let unreachable: Vec<String> = body["unreachable_nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if !unreachable.is_empty() {
        out.push_str(&format!(
            "\n\nnot answering (their snapshots are not listed): {}",
            unreachable.join(", ")
        ));
    }
    out
}

/// The tenant list (`{"tenants": [...]}`, every page) as a table.
pub fn tenants(body: &Value) -> String {
    let all: Vec<Value> = body["tenants"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        return "no tenants".to_owned();
    }
    let mut t = table(&["TENANT", "RF", "CREATED", "UPDATED"], &[1]);
    for tenant in &all {
        t.add_row(vec![
            text(&tenant["tenant_id"]),
            text(&tenant["replication_factor"]),
            text(&tenant["created_at"]),
            text(&tenant["updated_at"]),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ownership_adds_up_and_follows_the_arcs() {
        let half = (1u64 << 63).to_string();
        let nodes = vec![
            json!({"node_id": "a", "status": "active", "tokens": ["0"]}),
            json!({"node_id": "b", "status": "active", "tokens": [half]}),
            json!({"node_id": "c", "status": "failed", "tokens": ["5"]}),
        ];
        let owns = ownership(&nodes);
        assert!(
            (owns[0] - 50.0).abs() < 1e-9 && (owns[1] - 50.0).abs() < 1e-9,
            "{owns:?}"
        );
        assert_eq!(owns[2], 0.0);
        let quarter = (1u64 << 62).to_string();
        let nodes = vec![
            json!({"node_id": "a", "status": "active", "tokens": [quarter]}),
            json!({"node_id": "b", "status": "active", "tokens": ["0"]}),
        ];
        // a's token at 2^62 owns [0, 2^62): a quarter.
        let owns = ownership(&nodes);
        assert!((owns[0] - 25.0).abs() < 1e-9, "{owns:?}");
        assert!((owns[1] - 75.0).abs() < 1e-9, "{owns:?}");
    }

    #[test]
    fn a_node_not_active_and_healthy_makes_the_cluster_unhealthy() {
        let node = |id: &str, status: &str, health: &str| {
            json!({"node_id": id, "host": "h", "port": 1, "status": status,
                   "health": {"status": health, "reasons": []}, "tokens": ["1"],
                   "disk_usage_percent": 10.0, "keys_count": 5, "load": 2.0})
        };
        let (table, healthy) = nodes(&json!({"nodes": [node("s1", "active", "healthy")]}));
        assert!(healthy, "{table}");
        assert!(table.contains("s1") && table.contains("10.0%"), "{table}");
        for (state, health) in [
            ("down", "unknown"),
            ("active", "degraded"),
            ("draining", "healthy"),
        ] {
            let body =
                json!({"nodes": [node("s1", "active", "healthy"), node("s2", state, health)]});
            assert!(!nodes(&body).1, "{state} {health}");
        }
        assert!(
            !nodes(&json!({"nodes": []})).1,
            "no nodes is not a healthy cluster"
        );
    }
}
