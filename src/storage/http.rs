//! The storage node's HTTP side: `/healthz` (the process is up), `/readyz` (registered in the
//! cluster, and the engine takes writes: open and disk below 95%), `/metrics` (Prometheus: requests and latency per RPC, engine
//! stats, disk %, gossip members).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::engine::Engine;

use super::gossip::Gossip;

#[derive(Clone)]
struct Node {
    id: String,
    engine: Arc<Engine>,
    gossip: Option<Arc<Gossip>>,
    /// Registered in the cluster (a node that joins by itself is not ready before).
    joined: Arc<AtomicBool>,
}

pub fn router(
    id: String,
    engine: Arc<Engine>,
    gossip: Option<Arc<Gossip>>,
    joined: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/health", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Node {
            id,
            engine,
            gossip,
            joined,
        })
}

async fn ready(State(node): State<Node>) -> (StatusCode, String) {
    if !node.joined.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered in the cluster yet (joining)\n".to_owned(),
        );
    }
    let disk = node.engine.stats().disk_usage_percent;
    if disk >= node.engine.disk_thresholds().full_percent {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("disk {disk:.1}% full\n"),
        )
    } else {
        (StatusCode::OK, "ready\n".to_owned())
    }
}

async fn metrics(State(node): State<Node>) -> String {
    let s = node.engine.stats();
    let id = node.id.clone();
    let gauge = |name: &'static str, v: f64| metrics::gauge!(name, "node" => id.clone()).set(v);
    gauge("pairdb_engine_disk_usage_percent", s.disk_usage_percent);
    gauge("pairdb_engine_memtables", s.memtables as f64);
    gauge("pairdb_engine_memtable_bytes", s.memtable_bytes as f64);
    gauge("pairdb_engine_sstables", s.sstables as f64);
    gauge("pairdb_engine_sstable_bytes", s.sstable_bytes as f64);
    gauge("pairdb_engine_key_estimate", s.key_estimate as f64);
    gauge("pairdb_engine_cache_hits", s.cache_hits as f64);
    gauge("pairdb_engine_cache_misses", s.cache_misses as f64);
    gauge("pairdb_engine_cache_bytes", s.cache_bytes as f64);
    gauge("pairdb_engine_wal_segments", s.wal_segments as f64);
    gauge("pairdb_engine_wal_syncs", s.wal_syncs as f64);
    gauge(
        "pairdb_engine_wal_longest_sync_seconds",
        s.wal_longest_sync_micros as f64 / 1e6,
    );
    gauge("pairdb_engine_write_stalls", s.write_stalls as f64);
    gauge(
        "pairdb_engine_write_stall_seconds",
        s.write_stall_micros as f64 / 1e6,
    );
    gauge("pairdb_engine_writes_applied", s.writes_applied as f64);
    gauge("pairdb_engine_writes_ignored", s.writes_ignored as f64);
    gauge("pairdb_engine_flushes", s.flushes as f64);
    gauge("pairdb_engine_compactions", s.compactions as f64);
    gauge("pairdb_engine_compaction_moves", s.compaction_moves as f64);
    gauge(
        "pairdb_engine_compaction_rate_bytes",
        s.compaction_rate as f64,
    );
    gauge(
        "pairdb_engine_tables_quarantined",
        s.quarantined_tables as f64,
    );
    gauge(
        "pairdb_engine_manifest_damaged",
        f64::from(u8::from(s.manifest_damaged)),
    );
    gauge(
        "pairdb_engine_compaction_bytes_written",
        s.compaction_bytes_written as f64,
    );
    gauge(
        "pairdb_engine_flush_bytes_written",
        s.flush_bytes_written as f64,
    );
    gauge(
        "pairdb_engine_tombstones_dropped",
        s.tombstones_dropped as f64,
    );
    gauge(
        "pairdb_engine_expired_values_dropped",
        s.expired_dropped as f64,
    );
    gauge("pairdb_engine_log_torn_tails", s.replay.torn_tails as f64);
    gauge("pairdb_engine_ingest_rebuilds", s.ingest_rebuilds as f64);
    for (level, (tables, bytes)) in s.ingested.iter().enumerate() {
        let level = level.to_string();
        metrics::gauge!("pairdb_engine_ingested_tables", "node" => id.clone(), "level" => level.clone()).set(*tables as f64);
        metrics::gauge!("pairdb_engine_ingested_bytes", "node" => id.clone(), "level" => level)
            .set(*bytes as f64);
    }
    for (level, (tables, bytes, _)) in s.levels.iter().enumerate() {
        let level = level.to_string();
        metrics::gauge!("pairdb_engine_level_tables", "node" => id.clone(), "level" => level.clone()).set(*tables as f64);
        metrics::gauge!("pairdb_engine_level_bytes", "node" => id.clone(), "level" => level)
            .set(*bytes as f64);
    }
    // Every level the engine has, zeros for one no compaction wrote into yet.
    for level in 0..s.levels.len().max(s.compaction_levels.len()) {
        let c = s.compaction_levels.get(level).copied().unwrap_or_default();
        let level = level.to_string();
        metrics::gauge!("pairdb_engine_level_compaction_bytes_written", "node" => id.clone(), "level" => level.clone())
            .set(c.written_bytes as f64);
        metrics::gauge!("pairdb_engine_level_compaction_bytes_read", "node" => id.clone(), "level" => level)
            .set((c.read_upper_bytes + c.read_lower_bytes) as f64);
    }
    if let Some(g) = &node.gossip {
        let members = g.members().await;
        let up = members.iter().filter(|m| m.up).count();
        gauge("pairdb_gossip_members_up", up as f64);
        gauge("pairdb_gossip_members_down", (members.len() - up) as f64);
    }
    crate::metrics::render()
}
