//! The roles one `pairdb` process can run. Each role is `roles/<role>.rs` with
//! `run(config, shutdown)`; a role that has not landed is refused, never faked.
//!
//! Stop order ([`StopOrder`]): on SIGTERM/SIGINT (or when one role fails) the roles of a process
//! stop front to back: the gateways first (they take no new request and answer the ones they
//! have), then the coordinators (their calls to storage end), then the storage nodes (engines
//! closed last), each stage once the one before it returned.

pub mod coordinator;
pub mod dev;
pub mod gateway;
pub mod join;
pub mod storage;

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{DevArgs, Role};
use crate::config::{Config, default_http_listen};
use crate::rpc::auth::{InternalAuth, RequireSecret};

/// Why a role could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoleError {
    #[error("role {0} is not built yet")]
    NotBuilt(&'static str),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// Roles whose implementation has landed.
pub fn is_built(role: Role) -> bool {
    match role {
        Role::Storage | Role::Coordinator | Role::Gateway => true,
    }
}

/// Runs every role of `config.node.roles` until SIGTERM/SIGINT (or until one fails).
pub async fn run(config: Config) -> Result<(), RoleError> {
    if let Some(missing) = config.node.roles.iter().copied().find(|r| !is_built(*r)) {
        return Err(RoleError::NotBuilt(missing.as_str()));
    }
    let signal = crate::shutdown::on_signal().map_err(|e| RoleError::Failed(e.into()))?;
    let mut roles = StopOrder::new(signal);
    for role in config.node.roles.clone() {
        let config = config.clone();
        roles.spawn(role, move |stop| async move {
            match role {
                Role::Storage => storage::run(&config, stop).await,
                Role::Coordinator => coordinator::run(&config, stop).await,
                Role::Gateway => gateway::run(&config, stop).await,
            }
        });
    }
    roles.run().await.map_err(RoleError::Failed)
}

/// The roles of one process grouped by the order they stop in (see the module doc).
pub(crate) struct StopOrder {
    /// Cancelled by the signal or by a role that returned on its own (it failed).
    signal: CancellationToken,
    /// Gateway, coordinator, storage: each stage's stop token and its roles.
    stages: [(CancellationToken, JoinSet<anyhow::Result<()>>); 3],
}

impl StopOrder {
    pub(crate) fn new(signal: CancellationToken) -> Self {
        Self {
            signal,
            stages: std::array::from_fn(|_| (CancellationToken::new(), JoinSet::new())),
        }
    }

    fn stage(role: Role) -> usize {
        match role {
            Role::Gateway => 0,
            Role::Coordinator => 1,
            Role::Storage => 2,
        }
    }

    /// Starts `run(stop)` in `role`'s stage; `stop` is cancelled when the stage's turn comes.
    /// A role that returns before that (it failed) starts the stop of the whole process.
    pub(crate) fn spawn<F, Fut>(&mut self, role: Role, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, set) = &mut self.stages[Self::stage(role)];
        let running = run(stop.clone());
        let signal = self.signal.clone();
        set.spawn(async move {
            let result = running.await;
            signal.cancel();
            result
        });
    }

    /// Waits for the signal, then stops the stages in order; the first error of any role.
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        self.signal.cancelled().await;
        let mut first_error = None;
        for (stop, mut roles) in self.stages {
            stop.cancel();
            while let Some(done) = roles.join_next().await {
                if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// `pairdb dev`: the whole cluster in one process.
pub async fn run_dev(args: DevArgs) -> Result<(), RoleError> {
    dev::run(args).await.map_err(RoleError::Failed)
}

/// Binds `addr`, naming it in the error.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Binds a gRPC role's listener and its health/metrics HTTP listener (`http_listen`, by default
/// the host of `listen` with its port + 1000).
async fn bind_grpc_and_http(
    listen: SocketAddr,
    http_listen: Option<SocketAddr>,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let grpc = bind(listen).await?;
    let http = bind(http_listen.unwrap_or_else(|| default_http_listen(listen))).await?;
    Ok((grpc, http))
}

/// Serves `router` on `listener` until `shutdown`, letting requests in flight finish.
fn spawn_http(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

/// How long a stopping gRPC server waits for open calls to end. Peers keep long-lived streams
/// open (a gateway's key-value stream, a coordinator's batch stream and gossip watch), which a
/// graceful shutdown alone would wait for forever.
pub(crate) const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves gRPC `routes` on `listener` (TCP_NODELAY on every connection; only calls carrying the
/// cluster secret, over mutual TLS when configured: `rpc::auth`, `rpc::tls`) until the role stops
/// (`tasks`). Then the multiplexed streams drain (at most [`SHUTDOWN_GRACE`]: `mux::serve`)
/// while the server still holds its connections, then the server takes no new connections and
/// lets the calls still open finish for at most another [`SHUTDOWN_GRACE`] before it closes
/// the connections.
async fn serve_grpc(
    routes: tonic::service::Routes,
    listener: TcpListener,
    auth: &InternalAuth,
    tasks: &crate::shutdown::Tasks,
) -> anyhow::Result<()> {
    let shutdown = tasks.stop().clone();
    let streams = tasks.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &auth.tls {
        builder = builder
            .tls_config(tls.server())
            .context("the node certificate cannot serve TLS")?;
    }
    let server = builder
        // Every call is checked for the cluster secret before any handler runs.
        .layer(tonic::service::InterceptorLayer::new(RequireSecret::new(
            auth.secret.clone(),
        )))
        // A call's work runs as part of the request it names (`rpc::trace`).
        .layer(crate::rpc::trace::RequestIdLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(crate::net::incoming_nodelay(listener), async move {
            // The multiplexed streams drain first, so no connection closes under them.
            streams.streams_ended(SHUTDOWN_GRACE).await
        });
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served.context("gRPC server failed"),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(2 * SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "closing the connections still open after the shutdown grace");
            Ok(())
        }
    }
}
