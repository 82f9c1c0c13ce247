//! `pairdb --role=storage`: lock the data dir, open the engine, join the gossip, serve gRPC and
//! HTTP until SIGTERM/SIGINT, then stop in order: take no new calls and answer the ones in
//! flight (batch streams drain: `mux::serve`), pause the range streams at their checkpoints,
//! leave the gossip, close the engine (its log synced) and return.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{Engine, EngineOptions};
use crate::rpc::storage::storage_node_server::StorageNodeServer;
use crate::storage::background::BackgroundPool;
use crate::storage::datadir;
use crate::storage::dropped_tenants::DroppedTenants;
use crate::storage::gossip::Gossip;
use crate::storage::http;
use crate::storage::repair_markers::RepairMarkerLog;
use crate::storage::repaired_ranges::RepairedRanges;
use crate::storage::ring_fence::RingFence;
use crate::storage::service::{Ledgers, StorageService};

pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node_id = config.node.id.clone().context("storage needs a node id")?;
    let cfg = &config.storage;
    let _lock = datadir::lock(&cfg.data_dir)?;
    // Read before the engine creates its files: a registered node that starts without data
    // has lost it (`join`).
    let fresh = super::join::is_fresh(&cfg.data_dir);
    let repaired = Arc::new(RepairedRanges::open(&cfg.data_dir).with_context(|| {
        format!(
            "cannot open the repaired ranges in {}",
            cfg.data_dir.display()
        )
    })?);
    let options = EngineOptions {
        sync: cfg.sync,
        skip_corrupt_log: cfg.skip_corrupt_log,
        gc_grace: cfg.gc_grace,
        tombstone_gate: Some(repaired.clone()),
        cache_bytes: cfg.cache_bytes,
        memtable_bytes: cfg.memtable_bytes,
        disk: cfg.disk_thresholds(),
        compaction_nice: cfg.background_nice,
        table_format: cfg.table_format()?,
        ..EngineOptions::default()
    };
    let dir = cfg.data_dir.clone();
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || Engine::open(dir, options))
            .await?
            .with_context(|| format!("cannot open the engine in {}", cfg.data_dir.display()))?,
    );

    let auth = config.node.internal_auth()?;
    let (grpc_listener, http_listener) =
        super::bind_grpc_and_http(cfg.listen, cfg.http_listen).await?;
    let grpc_addr = grpc_listener.local_addr()?;

    let gossip = match cfg.gossip {
        Some(addr) => Some(Arc::new(
            Gossip::start(
                &node_id,
                addr,
                cfg.seeds.clone(),
                &grpc_addr.to_string(),
                auth.secret.clone(),
            )
            .await
            .with_context(|| format!("cannot start gossip on {addr}"))?,
        )),
        None => None,
    };
    crate::metrics::handle();
    crate::metrics::register_counters(&[
        (
            "pairdb_engine_checksum_failures_total",
            Some(("kind", "checksum")),
        ),
        (
            "pairdb_engine_checksum_failures_total",
            Some(("kind", "structure")),
        ),
        ("pairdb_engine_tables_quarantined_total", None),
        ("pairdb_stream_bytes_sent_total", None),
        ("pairdb_stream_records_sent_total", None),
        ("pairdb_stream_live_writes_forwarded_total", None),
        ("pairdb_stream_live_writes_skipped_total", None),
    ]);
    let markers = Arc::new(RepairMarkerLog::open(&cfg.data_dir).with_context(|| {
        format!(
            "cannot open the repair markers in {}",
            cfg.data_dir.display()
        )
    })?);
    let tasks = crate::shutdown::Tasks::new(shutdown.clone());
    let dropped = Arc::new(DroppedTenants::open(&cfg.data_dir).with_context(|| {
        format!(
            "cannot open the dropped tenants in {}",
            cfg.data_dir.display()
        )
    })?);
    let fence =
        Arc::new(RingFence::open(&cfg.data_dir).with_context(|| {
            format!("cannot open the ring fence in {}", cfg.data_dir.display())
        })?);
    let ledgers = Ledgers {
        markers,
        repaired,
        dropped,
        fence,
    };
    let service = StorageService::new(
        node_id.clone(),
        engine.clone(),
        gossip.clone(),
        ledgers,
        tasks.clone(),
        auth.clone(),
        Arc::new(
            BackgroundPool::new(cfg.background_nice)
                .context("cannot start the background threads")?,
        ),
    );
    service.streams().set_rate_limit(cfg.stream_rate_limit);
    service.set_listing_rate_limit(cfg.repair_scan_rate_limit);
    tracing::info!(node = %node_id, grpc = %grpc_addr, http = %http_listener.local_addr()?, writes = ?service.write_path(), "storage node serving");

    if let Some(g) = gossip.clone() {
        let service = service.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = (std::time::Instant::now(), service.requests_served());
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = (std::time::Instant::now(), service.requests_served());
                        let secs = now.0.duration_since(last.0).as_secs_f64().max(0.001);
                        let load = (now.1 - last.1) as f64 / secs;
                        last = now;
                        g.publish(service.health(load)).await;
                    }
                    () = stop.cancelled() => break,
                }
            }
        });
    }

    // Ready once registered (at once when not joining by itself).
    let joined = Arc::new(std::sync::atomic::AtomicBool::new(!cfg.join));
    if cfg.join {
        let (host, port) = cfg.advertised()?;
        let join = super::join::Join {
            node_id: node_id.clone(),
            host,
            port,
            coordinators: cfg.join_coordinators.clone(),
            data_dir: cfg.data_dir.clone(),
            fresh,
        };
        tasks.spawn(super::join::run(
            join,
            auth.clone(),
            joined.clone(),
            shutdown.clone(),
        ));
    }
    let router = http::router(node_id, engine.clone(), gossip.clone(), joined);
    let http_server = super::spawn_http(http_listener, router, shutdown.clone());
    let grpc = StorageNodeServer::from_arc(service.clone())
        .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES);
    let served = super::serve_grpc(
        tonic::service::Routes::new(grpc),
        grpc_listener,
        &auth,
        &tasks,
    )
    .await;
    let _ = http_server.await;
    tasks.stop_and_wait("storage", super::SHUTDOWN_GRACE).await;
    if let Some(g) = gossip {
        if let Ok(g) = Arc::try_unwrap(g) {
            g.shutdown().await;
        }
    }
    drop(service);
    tokio::task::spawn_blocking(move || engine.close())
        .await?
        .context("closing the engine")?;
    served?;
    tracing::info!("storage node stopped cleanly");
    Ok(())
}
