//! HTTPS on the gateway (docs/security.md, "TLS"): rustls over the gateway's listener, with the
//! certificate and key reloaded from their files on SIGHUP.
//!
//! # Invariants
//! - A reload swaps the certificate for handshakes that start after it; connections already
//!   open keep theirs and are not dropped. A reload that fails (unreadable file, no key, a key
//!   that does not fit rustls) keeps the certificate in use and says why in the log.
//! - Handshakes run in their own tasks with a deadline ([`HANDSHAKE_TIMEOUT`]): a client that
//!   opens a connection and sends nothing holds neither the accept loop nor other clients.
//! - A failed handshake is logged at debug level and counted; it never stops the listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the HTTPS certificate cannot be (re)loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {expected} in PEM form")]
    NotPem {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the key in {path} cannot sign TLS handshakes: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The certificate the gateway presents, reloadable from its files.
#[derive(Debug)]
pub struct CertReloader {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

fn read(path: &Path) -> Result<Vec<u8>, HttpsError> {
    std::fs::read(path).map_err(|source| HttpsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, HttpsError> {
    let cert_bytes = read(cert_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(HttpsError::NotPem {
            path: cert_file.to_owned(),
            expected: "certificate",
        });
    }
    let key_bytes = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| HttpsError::NotPem {
        path: key_file.to_owned(),
        expected: "private key",
    })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| HttpsError::BadKey {
            path: key_file.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| HttpsError::BadKey {
        path: key_file.to_owned(),
        reason: format!("it does not belong to the certificate ({e})"),
    })?;
    Ok(certified)
}

impl CertReloader {
    /// Loads the certificate chain and key (PEM).
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> Result<Self, HttpsError> {
        let current = ArcSwap::from_pointee(load(&cert_file, &key_file)?);
        Ok(Self {
            cert_file,
            key_file,
            current,
        })
    }

    /// Reads the files again; on success new handshakes use the new certificate.
    pub fn reload(&self) -> Result<(), HttpsError> {
        let fresh = load(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS acceptor presenting `reloader`'s certificate, HTTP/2 or HTTP/1.1 by ALPN.
pub fn acceptor(reloader: Arc<CertReloader>) -> Result<TlsAcceptor, HttpsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(reloader);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reloads `reloader` on every SIGHUP until `stop`.
pub fn reload_on_sighup(
    reloader: Arc<CertReloader>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match reloader.reload() {
                        Ok(()) => tracing::info!(cert = %reloader.cert_file.display(), "HTTPS certificate reloaded"),
                        Err(e) => tracing::error!(error = %e, "HTTPS certificate not reloaded; the previous one stays in use"),
                    }
                }
            }
        }
    }))
}

/// A listener whose connections are TLS sessions: TCP connections from `inner`, each
/// handshake in its own task.
pub struct TlsListener<L> {
    inner: L,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl<L> TlsListener<L> {
    pub fn new(inner: L, acceptor: TlsAcceptor) -> Self {
        Self {
            inner,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener<Io = TcpStream, Addr = SocketAddr>,
{
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                (tcp, peer) = self.inner.accept() => {
                    let acceptor = self.acceptor.clone();
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => Some((tls, peer)),
                            Ok(Err(e)) => {
                                metrics::counter!("pairdb_gateway_tls_handshake_failures_total").increment(1);
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                metrics::counter!("pairdb_gateway_tls_handshake_failures_total").increment(1);
                                tracing::debug!(peer = %peer, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(session)) = done {
                        return session;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
