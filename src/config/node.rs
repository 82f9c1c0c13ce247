//! `[node]`: settings of the process, whatever its roles, and the roles themselves.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::rpc::auth::{ClusterSecret, InternalAuth};
use crate::rpc::tls::InternalTls;

use super::values::{BadValue, list};

/// A role one process can run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Public HTTP/JSON API: auth, rate limits, forwards to coordinators.
    Gateway,
    /// Stateless request brain: placement, quorums, versions, repair, hints.
    Coordinator,
    /// LSM storage engine served over gRPC.
    Storage,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Coordinator => "coordinator",
            Role::Storage => "storage",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Role as clap::ValueEnum>::from_str(s.trim(), false)
            .map_err(|_| BadValue::new("role must be gateway, coordinator or storage", s))
    }
}

/// Settings of the process, whatever its roles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Roles to run in this process.
    #[serde(deserialize_with = "list")]
    pub roles: Vec<Role>,
    /// Node id: the storage node's id and the coordinator's vector-clock id.
    pub id: Option<String>,
    pub log_format: LogFormat,
    /// tracing filter, e.g. `info` or `pairdb=debug,info`.
    pub log_level: String,
    /// Async runtime worker threads; unset: 1 for a storage-only process (its one event loop
    /// applies writes itself, see `storage::service::WritePath`), one per core otherwise.
    pub worker_threads: Option<usize>,
    /// The secret every internal gRPC call and gossip datagram carries (`rpc::auth`); or
    /// `cluster_secret_file`. Required by every role outside `pairdb dev`.
    pub cluster_secret: Option<String>,
    /// A file holding the cluster secret (surrounding whitespace ignored).
    pub cluster_secret_file: Option<PathBuf>,
    /// Mutual TLS between roles (`rpc::tls`): the cluster CA, this node's certificate and its
    /// key, PEM files (all three or none).
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// OpenTelemetry: the OTLP/gRPC collector spans are exported to (e.g.
    /// `http://127.0.0.1:4317`); none by default (`telemetry`).
    pub otlp_endpoint: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            roles: Vec::new(),
            id: None,
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            worker_threads: None,
            cluster_secret: None,
            cluster_secret_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            otlp_endpoint: None,
        }
    }
}

impl NodeConfig {
    /// How internal calls are authenticated: the cluster secret, and mutual TLS when the three
    /// TLS files are set.
    pub fn internal_auth(&self) -> Result<InternalAuth, ConfigError> {
        let secret = self.cluster_secret()?;
        let tls = match (&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => {
                Some(InternalTls::load(ca, cert, key).map_err(|e| invalid(e.to_string()))?)
            }
            _ => {
                return Err(invalid(
                    "internal TLS needs all three of tls_ca_file, tls_cert_file and tls_key_file (--tls-ca-file, --tls-cert-file, --tls-key-file)",
                ));
            }
        };
        Ok(InternalAuth { secret, tls })
    }

    /// The cluster secret: `cluster_secret`, else the trimmed contents of
    /// `cluster_secret_file`; an error when neither is set or the value is unusable.
    pub fn cluster_secret(&self) -> Result<ClusterSecret, ConfigError> {
        let text = match (&self.cluster_secret, &self.cluster_secret_file) {
            (Some(secret), _) if !secret.is_empty() => secret.clone(),
            (_, Some(path)) => std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    invalid(format!(
                        "cannot read the cluster secret file {}: {e}",
                        path.display()
                    ))
                })?,
            _ => {
                return Err(invalid(
                    "internal calls need a cluster secret: set --cluster-secret-file, [node] cluster_secret(_file) or PAIRDB_NODE_CLUSTER_SECRET (the same on every node; only `pairdb dev` runs without one)",
                ));
            }
        };
        ClusterSecret::new(&text).map_err(|e| invalid(e.to_string()))
    }

    /// Worker threads for this process's runtime (see `worker_threads`).
    pub fn runtime_workers(&self) -> usize {
        match self.worker_threads {
            Some(n) => n,
            None if self.roles == [Role::Storage] => 1,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}
