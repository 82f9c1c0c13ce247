//! `pairdb --role=coordinator`: connect the metadata and idempotency stores (refusing to start
//! when either is unreachable), seed an empty node registry from `--storage-nodes`, follow the
//! registry and gossip, start the hint writer, hint replay and read repair, and serve the
//! Coordinator gRPC service plus `/healthz`, `/readyz`, `/metrics` until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, CoordinatorConfig};
use crate::coordinator::clock::CoordinatorClock;
use crate::coordinator::hints::{self, HintWriter, MarkerSink, ReplayLimits};
use crate::coordinator::membership::Membership;
use crate::coordinator::repair::RepairQueue;
use crate::coordinator::ring_view::RingView;
use crate::coordinator::service::CoordinatorService;
use crate::coordinator::storage_pool::StoragePool;
use crate::coordinator::tenant_cache::TenantCache;
use crate::coordinator::tenant_confirm::Confirmations;
use crate::coordinator::{
    self, Coordinator, Options, admission, anti_entropy, cleanup, http, lease, rf_change,
};
use crate::idempotency::{IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore};
use crate::meta::{MetadataStore, NodeRecord, SqlMetadataStore};
use crate::ring::NodeState;
use crate::rpc::auth::InternalAuth;
use crate::rpc::coordinator::coordinator_server::CoordinatorServer;

pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = config
        .node
        .id
        .clone()
        .context("coordinator needs a node id")?;
    let cfg = &config.coordinator;
    let (grpc_listener, http_listener) =
        super::bind_grpc_and_http(cfg.listen, cfg.http_listen).await?;
    if !cfg.seeds.is_empty() {
        tracing::info!(
            "coordinators follow gossip through the storage nodes' WatchHealth; --seeds is not needed"
        );
    }
    let auth = config.node.internal_auth()?;
    let core = start(&id, cfg, &auth, shutdown.clone()).await?;
    crate::metrics::handle();
    crate::metrics::register_counters(&[
        ("pairdb_hints_dropped_total", Some(("reason", "expired"))),
        ("pairdb_hints_replayed_total", None),
        ("pairdb_writes_to_unhealthy_hinted_total", None),
    ]);
    tracing::info!(coordinator = %id, grpc = %grpc_listener.local_addr()?, http = %http_listener.local_addr()?, "coordinator serving");

    let http_server =
        super::spawn_http(http_listener, http::router(core.clone()), shutdown.clone());
    let grpc = CoordinatorServer::new(CoordinatorService::new(core.clone()))
        .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES);
    let served = super::serve_grpc(
        tonic::service::Routes::new(grpc),
        grpc_listener,
        &auth,
        &core.tasks,
    )
    .await;
    let _ = http_server.await;
    stop(&core, cfg.shutdown_drain_timeout).await;
    served?;
    tracing::info!("coordinator stopped cleanly");
    Ok(())
}

/// The coordinator's stop, once its servers took no more calls and answered the ones they had
/// (the key-value streams drained: `mux::serve`): the background work ends at its next step
/// (migrations are left to a takeover), then every hint queued or still to come from replica
/// calls that outlived their requests is stored, every read repair queued is sent, and the
/// storage links send what they hold. Each wait is bounded by `drain_timeout`.
pub async fn stop(core: &Coordinator, drain_timeout: Duration) {
    let left = core.tasks.stop_and_wait("coordinator", drain_timeout).await;
    let queued = core.hints.queued();
    let drained = core.hints.drain(drain_timeout).await;
    tracing::info!(queued, lost = drained.lost, "hint queue drained");
    let repairs_left = core.repairs.drain(drain_timeout).await;
    let links_done = core.pool.close(drain_timeout).await;
    tracing::info!(
        tasks_left = left,
        repairs_left,
        links_done,
        "coordinator background work stopped"
    );
}

/// Builds a coordinator and starts its background loops (stopped by `stop`).
pub async fn start(
    id: &str,
    cfg: &CoordinatorConfig,
    auth: &InternalAuth,
    stop: CancellationToken,
) -> anyhow::Result<Arc<Coordinator>> {
    let meta: Arc<dyn MetadataStore> = Arc::new(
        SqlMetadataStore::connect(&cfg.metadata_url)
            .await
            .with_context(|| format!("metadata store {}", redact(&cfg.metadata_url)))?,
    );
    let idempotency: Arc<dyn IdempotencyStore> = if cfg.idempotency_url == "memory://" {
        Arc::new(MemoryIdempotencyStore::new())
    } else {
        Arc::new(
            RedisIdempotencyStore::connect(&cfg.idempotency_url)
                .await
                .with_context(|| format!("idempotency store {}", redact(&cfg.idempotency_url)))?,
        )
    };
    seed_registry(&*meta, cfg)
        .await
        .context("seeding the node registry")?;

    let tasks = crate::shutdown::Tasks::new(stop);
    let pool = Arc::new(StoragePool::with_batch_in_flight(
        cfg.batch_in_flight,
        auth.clone(),
    ));
    let membership = Arc::new(Membership::default());
    let ring = RingView::load(meta.clone(), membership.clone())
        .await
        .context("reading the node registry")?;
    ring.spawn_refresh(cfg.ring_refresh, &tasks);
    let watched = ring.clone();
    membership.follow(
        move || {
            let snapshot = watched.snapshot();
            snapshot
                .nodes
                .iter()
                .filter_map(|n| Some((n.node_id.clone(), snapshot.address(&n.node_id)?.to_owned())))
                .collect()
        },
        pool.clone(),
        &tasks,
    );
    let timeout = cfg.request_timeout;
    let hint_limits = ReplayLimits {
        interval: cfg.hint_replay_interval,
        max_window: cfg.max_hint_window,
        max_attempts: cfg.max_hint_attempts,
        timeout: timeout.max(Duration::from_secs(5)),
    };
    let clock = CoordinatorClock::resume(
        id,
        meta.clone(),
        u64::try_from(cfg.max_clock_skew.as_millis()).unwrap_or(u64::MAX),
    )
    .await
    .context("loading the coordinator clock")?;
    let core = Arc::new(Coordinator {
        id: id.to_owned(),
        options: Options {
            request_timeout: timeout,
            max_clock_entries: cfg.max_clock_entries,
            read_repair_chance: cfg.read_repair_chance,
            metadata_refresh: cfg.ring_refresh,
            topology_timeout: cfg.topology_timeout,
            min_storage_nodes: cfg.min_storage_nodes,
            hint_limits,
            max_clock_skew: cfg.max_clock_skew,
            token_allocation: cfg.token_allocation,
            repair_rate_limit: cfg.repair_rate_limit,
            virtual_nodes: cfg.token_allocation.virtual_nodes(cfg.virtual_nodes),
        },
        pending_rf: Default::default(),
        reads_served: std::sync::atomic::AtomicU64::new(0),
        leases: Default::default(),
        tasks,
        hints: HintWriter::start(
            cfg.hints_enabled.then(|| meta.clone()),
            Some(MarkerSink {
                pool: pool.clone(),
                ring: ring.clone(),
                timeout,
            }),
        ),
        repairs: RepairQueue::start(cfg.read_repair_queue, ring.clone(), pool.clone(), timeout),
        tenants: TenantCache::new(meta.clone(), cfg.tenant_cache_ttl),
        confirmations: Confirmations::new(meta.clone(), pool.clone()),
        meta,
        idempotency,
        idempotency_breaker: Default::default(),
        clock,
        pool,
        ring,
    });
    hints::spawn_replay(
        core.meta.clone(),
        core.ring.clone(),
        core.pool.clone(),
        core.clone(),
        hint_limits,
        &core.tasks,
    );
    rf_change::spawn_refresh(core.clone(), cfg.ring_refresh);
    crate::coordinator::migration_metrics::spawn_export(core.clone(), cfg.ring_refresh);
    crate::coordinator::tenant_delete::spawn_purge(core.clone(), cfg.ring_refresh * 10);
    lease::spawn_watch(core.clone(), cfg.ring_refresh);
    if cfg.auto_cleanup {
        let grace = cfg.cleanup_grace;
        // Checked often enough to start within a tenth of the grace (a second at least).
        let every = (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        cleanup::spawn_auto_cleanup(core.clone(), grace, every);
    }
    anti_entropy::targeted::spawn_targeted(core.clone(), cfg.hint_replay_interval);
    if cfg.auto_repair {
        let interval = cfg.repair_interval;
        let every = (interval / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        anti_entropy::spawn_auto_repair(core.clone(), interval, every);
    }
    coordinator::resume_migrations(&core);
    Ok(core)
}

/// Registers `--storage-nodes` as active nodes when the registry is empty. Several coordinators
/// starting at once on one store may race: a node another one registered first is fine.
async fn seed_registry(
    meta: &dyn MetadataStore,
    cfg: &CoordinatorConfig,
) -> Result<(), admission::AdmitError> {
    if cfg.storage_nodes.is_empty() || !meta.list_nodes().await?.is_empty() {
        return Ok(());
    }
    let rfs = admission::balanced_for(&Default::default());
    let records: Vec<NodeRecord> = cfg
        .storage_nodes
        .iter()
        .map(|node| NodeRecord {
            node_id: node.id.clone(),
            host: node.host.clone(),
            port: node.port,
            virtual_nodes: cfg.token_allocation.virtual_nodes(cfg.virtual_nodes),
            tokens: None,
            state: NodeState::Active,
        })
        .collect();
    if !admission::seed(meta, records, cfg.token_allocation, &rfs).await? {
        return Ok(()); // another coordinator seeded it
    }
    tracing::info!(
        nodes = cfg.storage_nodes.len(),
        "node registry seeded from --storage-nodes"
    );
    Ok(())
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
