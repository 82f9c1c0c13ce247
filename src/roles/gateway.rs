//! `pairdb --role=gateway`: the public HTTP API on `--listen`, forwarding to `--coordinators`,
//! until SIGTERM/SIGINT.
//!
//! Stop: the listening socket closes at once (new connections are refused, so a client knows
//! its request was not sent); for [`LAME_DUCK`] the open connections are still served, every
//! answer with `Connection: close`, so a client that keeps a connection alive learns of the
//! stop from an answer instead of from a connection closed under a request it just sent; then
//! the idle connections close and the requests in flight finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, GatewayConfig};
use crate::gateway::auth::Auth;
use crate::gateway::coordinators::Coordinators;
use crate::gateway::https::{self, CertReloader, TlsListener, reload_on_sighup};
use crate::gateway::rate_limit::RateLimits;
use crate::gateway::{Gateway, router};
use crate::rpc::auth::InternalAuth;

pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = &config.gateway;
    let auth = config.node.internal_auth()?;
    let listener = super::bind(cfg.listen).await?;
    serve(cfg, &auth, listener, shutdown).await
}

/// Serves the gateway on a bound listener (`pairdb dev` binds its own).
pub async fn serve(
    cfg: &GatewayConfig,
    auth: &InternalAuth,
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
        coordinators: Coordinators::new(&cfg.coordinators, cfg.request_timeout, auth)?,
        max_body_bytes: cfg.max_body_bytes,
        history: crate::gateway::console::History::new(),
    });
    let https = match (&cfg.https_cert_file, &cfg.https_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(CertReloader::new(cert.clone(), key.clone())?)),
        _ => None,
    };
    crate::metrics::handle();
    crate::metrics::register_counters(&[
        ("pairdb_gateway_outcome_unknown_total", None),
        ("pairdb_gateway_coordinator_failovers_total", None),
    ]);
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(http = %addr, https = https.is_some(), auth = ?cfg.auth.mode, coordinators = ?cfg.coordinators, "gateway serving");
    let listener = Stoppable {
        addr,
        listener: Some(listener),
        stop: shutdown.clone(),
    };
    // Ends the SIGHUP watcher once the server returned.
    let shutdown_of_reload = CancellationToken::new();
    // Set when the stop begins; read per answer (a token's `is_cancelled` takes its lock, which
    // every request would share).
    let closing = Arc::new(AtomicBool::new(false));
    let stopping = closing.clone();
    let router = router::router(gateway).layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let closing = closing.load(Ordering::Acquire);
            async move {
                if closing {
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        },
    ));
    let lame_duck = async move {
        shutdown.cancelled().await;
        stopping.store(true, Ordering::Release);
        tokio::time::sleep(LAME_DUCK).await;
    };
    match https {
        Some(reloader) => {
            let hangups = reload_on_sighup(reloader.clone(), shutdown_of_reload.clone())
                .context("cannot watch SIGHUP for HTTPS certificate reloads")?;
            let tls = TlsListener::new(listener, https::acceptor(reloader)?);
            let served = axum::serve(tls, router)
                .with_graceful_shutdown(lame_duck)
                .await;
            shutdown_of_reload.cancel();
            let _ = hangups.await;
            served
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(lame_duck)
                .await
        }
    }
    .context("HTTP server failed")?;
    tracing::info!("gateway stopped cleanly");
    Ok(())
}

/// How long a stopping gateway keeps serving its open connections (see the module doc).
pub const LAME_DUCK: Duration = Duration::from_secs(1);

/// The gateway's listener: TCP_NODELAY on every connection; once `stop` is cancelled it takes
/// the connections the kernel already completed (closing the socket would reset them under
/// requests already sent), then closes: later connections are refused.
struct Stoppable {
    addr: SocketAddr,
    listener: Option<TcpListener>,
    stop: CancellationToken,
}

impl axum::serve::Listener for Stoppable {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some(listener) = &self.listener else {
                return std::future::pending().await;
            };
            if self.stop.is_cancelled() {
                match futures::FutureExt::now_or_never(listener.accept()) {
                    Some(Ok((tcp, peer))) => return (nodelay(tcp), peer),
                    _ => {
                        self.listener = None;
                        continue;
                    }
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => {}
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => return (nodelay(tcp), peer),
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

fn nodelay(tcp: TcpStream) -> TcpStream {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    tcp
}
