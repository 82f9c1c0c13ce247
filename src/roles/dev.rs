//! `pairdb dev`: a whole cluster in one process for development: `--storage-nodes` storage
//! nodes, one coordinator and one gateway, embedded metadata (SQLite under `--data-dir`) and
//! in-process idempotency, auth `none`, rate limits of a million requests per tenant per
//! minute, every commit log fsync'd as in production.
//!
//! Ports: the gateway on `--http` (P); storage node i on P+i (i = 1..=n); the coordinator on
//! P+n+1; their health/metrics HTTP listeners on free ports. Data lives in `--data-dir`
//! (`s1/`.. `sN/`, `metadata.db`) and survives restarts. Each start rewrites the dev registry's
//! addresses to the current ports; a data dir created with another node count is refused
//! (its keys are placed on that many nodes).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::{DevArgs, Role};
use crate::config::{AuthMode, Config, NodeAddress, SyncMode};
use crate::coordinator::admission;
use crate::meta::{MetadataStore, NodeRecord, SqlMetadataStore};
use crate::ring::NodeState;
use crate::ring::allocation::TokenAllocation;
use crate::rpc::auth::ClusterSecret;

use super::{coordinator, gateway, storage};

/// Requests per tenant per minute in `pairdb dev`.
const DEV_RATE_LIMIT: u32 = 1_000_000;

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signal()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;
    let n = args.storage_nodes as u16;
    let base = args.http.port();
    if base == 0 || u32::from(base) + u32::from(n) + 1 > 65535 {
        anyhow::bail!(
            "--http needs a fixed port with {} free ports above it",
            n + 1
        );
    }
    let host = args.http.ip();
    let at = |offset: u16| SocketAddr::new(host, base + offset);
    let any_port = SocketAddr::new(host, 0);
    // Bind the gateway first: a busy port fails before anything else starts.
    let http = super::bind(args.http).await?;

    let nodes: Vec<NodeAddress> = (1..=n)
        .map(|i| NodeAddress {
            id: format!("s{i}"),
            host: host.to_string(),
            port: base + i,
        })
        .collect();
    let metadata_url = format!("sqlite://{}", data_dir.join("metadata.db").display());
    point_registry_at(&metadata_url, &nodes).await?;

    let mut config = Config::default();
    // The dev cluster's roles share this process: a fresh secret each start, so its internal
    // ports are closed to other processes too.
    config.node.cluster_secret = Some(ClusterSecret::random_text());
    config.storage.sync = SyncMode::Always;
    config.storage.http_listen = Some(any_port);
    config.coordinator.listen = at(n + 1);
    config.coordinator.http_listen = Some(any_port);
    config.coordinator.metadata_url = metadata_url;
    config.coordinator.idempotency_url = "memory://".to_owned();
    config.coordinator.storage_nodes = nodes.clone();
    config.gateway.coordinators = vec![at(n + 1).to_string()];
    config.gateway.auth.mode = AuthMode::None;
    // Development: rate limits out of the way (so `pairdb bench` measures the cluster).
    config.gateway.write_rate_limit = DEV_RATE_LIMIT;
    config.gateway.read_rate_limit = DEV_RATE_LIMIT;

    let mut roles = super::StopOrder::new(shutdown.clone());
    for (i, node) in nodes.iter().enumerate() {
        let mut cfg = config.clone();
        cfg.node.roles = vec![Role::Storage];
        cfg.node.id = Some(node.id.clone());
        cfg.storage.listen = at(i as u16 + 1);
        cfg.storage.data_dir = data_dir.join(&node.id);
        roles.spawn(Role::Storage, move |stop| async move {
            storage::run(&cfg, stop).await
        });
    }
    let mut cfg = config.clone();
    cfg.node.roles = vec![Role::Coordinator];
    cfg.node.id = Some("c1".to_owned());
    roles.spawn(Role::Coordinator, move |stop| async move {
        coordinator::run(&cfg, stop).await
    });
    let gateway_cfg = config.gateway.clone();
    let auth = config.node.internal_auth()?;
    roles.spawn(Role::Gateway, move |stop| async move {
        gateway::serve(&gateway_cfg, &auth, http, stop).await
    });

    let url = format!("http://{}", args.http);
    // Ready means every listener a first request needs: the storage nodes replay their logs
    // before they listen, so after a restart they may come up after the coordinator.
    let listeners: Vec<_> = (1..=n + 1).map(at).collect();
    tokio::spawn(async move {
        for addr in listeners {
            wait_for(addr, &shutdown).await;
        }
        if !shutdown.is_cancelled() {
            print_banner(&url, &data_dir, n);
        }
    });
    roles.run().await
}

/// Registers the dev nodes at their current addresses (the dev cluster owns its registry).
async fn point_registry_at(url: &str, nodes: &[NodeAddress]) -> anyhow::Result<()> {
    let store = SqlMetadataStore::connect(url)
        .await
        .context("opening the dev metadata store")?;
    let existing = store.list_nodes().await?;
    if !existing.is_empty() && existing.len() != nodes.len() {
        anyhow::bail!(
            "this data dir was created with {} storage nodes: use --storage-nodes={} or another --data-dir",
            existing.len(),
            existing.len()
        );
    }
    // A node keeps its tokens across restarts (only its port changes); a new data dir's nodes
    // are admitted one by one with balanced tokens.
    let policy = TokenAllocation::Balanced;
    let rfs = admission::balanced_for(&Default::default());
    for node in nodes {
        let record = NodeRecord {
            node_id: node.id.clone(),
            host: node.host.clone(),
            port: node.port,
            virtual_nodes: policy.virtual_nodes(0),
            tokens: None,
            state: NodeState::Active,
        };
        match existing.iter().find(|n| n.node_id == node.id) {
            Some(old) => {
                store.remove_node(&node.id).await?;
                store
                    .add_node(&NodeRecord {
                        virtual_nodes: old.virtual_nodes,
                        tokens: old.tokens.clone(),
                        ..record
                    })
                    .await?;
            }
            None => {
                admission::admit(&store, record, policy, &rfs).await?;
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn wait_for(addr: SocketAddr, stop: &CancellationToken) {
    while !stop.is_cancelled() && tokio::net::TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_banner(url: &str, data_dir: &std::path::Path, n: u16) {
    println!(
        "\npairdb dev is running: {url}  ({n} storage nodes, 1 coordinator, 1 gateway; data in {})\n\
         \n  curl -s -X POST {url}/v1/tenants -H 'Content-Type: application/json' -d '{{\"tenant_id\":\"demo\",\"replication_factor\":3}}'\
         \n  curl -s -X POST {url}/v1/key-value -H 'Content-Type: application/json' -H 'X-Tenant-ID: demo' -d '{{\"key\":\"hello\",\"value\":{{\"to\":\"world\"}}}}'\
         \n  curl -s '{url}/v1/key-value?key=hello' -H 'X-Tenant-ID: demo'\n\
         \nStop with Ctrl-C.",
        data_dir.display()
    );
}
