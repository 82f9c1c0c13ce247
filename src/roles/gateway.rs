//! `pairdb --role=gateway`: the public HTTP API on `--listen`, forwarding to `--coordinators`,
//! until SIGTERM/SIGINT (in-flight requests finish first).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, GatewayConfig};
use crate::gateway::auth::Auth;
use crate::gateway::coordinators::Coordinators;
use crate::gateway::rate_limit::RateLimits;
use crate::gateway::{Gateway, router};

pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = &config.gateway;
    let listener = super::bind(cfg.listen).await?;
    serve(cfg, listener, shutdown).await
}

/// Serves the gateway on a bound listener (`pairdb dev` binds its own).
pub async fn serve(
    cfg: &GatewayConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gateway = Arc::new(Gateway {
        auth: Auth::new(&cfg.auth)?,
        limits: RateLimits::new(
            cfg.write_rate_limit,
            cfg.read_rate_limit,
            cfg.tenant_limits.clone(),
        ),
        coordinators: Coordinators::new(&cfg.coordinators, cfg.request_timeout)?,
        max_body_bytes: cfg.max_body_bytes,
    });
    crate::metrics::handle();
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(http = %addr, auth = ?cfg.auth.mode, coordinators = ?cfg.coordinators, "gateway serving");
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router::router(gateway))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("HTTP server failed")?;
    tracing::info!("gateway stopped cleanly");
    Ok(())
}
