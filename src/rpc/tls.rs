//! Mutual TLS between roles (docs/security.md, "TLS").
//!
//! When a cluster CA is configured, every internal gRPC hop (gateway -> coordinator ->
//! storage, storage -> storage streaming) runs over TLS in both directions: the server presents
//! its node certificate and refuses a client without one signed by the cluster CA; the client
//! checks the server's certificate against the same CA and the name [`INTERNAL_NAME`], which
//! `pairdb cert` puts into every node certificate. A certificate signed by the cluster CA is a
//! member of the cluster; addresses are not part of the check, so a node keeps its certificate
//! when its IP changes (Kubernetes pods).
//!
//! The files are read once at start; an unreadable or unparsable file stops the role with the
//! file named. The cluster secret (`rpc::auth`) is still checked on top: gossip is UDP and
//! authenticated with it.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every internal certificate carries and every internal client checks.
pub const INTERNAL_NAME: &str = "pairdb-internal";

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no {expected} in PEM form")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

/// A node's certificate, key and the cluster CA, as PEM.
#[derive(Clone)]
pub struct InternalTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for InternalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalTls(<node certificate>)")
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// PEM certificates of `path`, at least one.
pub fn certificates(what: &'static str, path: &Path) -> Result<Vec<Vec<u8>>, TlsError> {
    let bytes = read(what, path)?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

/// Checks that `path` holds a private key in PEM form; its bytes.
pub fn private_key(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NotPem {
        what,
        path: path.to_owned(),
        expected: "private key",
    })?;
    Ok(bytes)
}

impl InternalTls {
    /// Reads the cluster CA, the node's certificate and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        certificates("the cluster CA file", ca)?;
        certificates("the node certificate file", cert)?;
        Ok(Self {
            ca: read("the cluster CA file", ca)?,
            cert: read("the node certificate file", cert)?,
            key: private_key("the node key file", key)?,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// A server that presents the node certificate and requires a client certificate signed
    /// by the cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// A client that presents the node certificate and accepts servers whose certificate the
    /// cluster CA signed for [`INTERNAL_NAME`].
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(INTERNAL_NAME)
    }
}
