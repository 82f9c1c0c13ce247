//! `[node]`: settings of the process, whatever its roles, and the roles themselves.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            roles: Vec::new(),
            id: None,
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            worker_threads: None,
        }
    }
}

impl NodeConfig {
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
