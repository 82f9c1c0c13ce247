//! Typed configuration of every role, layered flag > env > file > default (OPERATIONS.md).
//!
//! - Defaults: [`Config::default`].
//! - File: `--config=PATH`, TOML with the sections `[node]`, `[storage]`, `[coordinator]`,
//!   `[gateway]`, `[gateway.auth]` (examples in `config/`). Unknown keys are errors, so typos
//!   don't silently fall back to defaults.
//! - Env: `PAIRDB_<SECTION>_<KEY>`, e.g. `PAIRDB_STORAGE_DATA_DIR`, `PAIRDB_GATEWAY_AUTH_MODE`.
//!   Variables that name no section (like `PAIRDB_TOKEN` of the bench scripts) are ignored.
//!   Lists are comma-separated.
//! - Flags: only the flags given on the command line (see `cli.rs`).
//!
//! [`Config::validate`] checks the sections of the selected roles and reports the first problem
//! as one line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::engine::SyncMode;
use crate::limits::valid_node_id;
use crate::ring::allocation::TokenAllocation;

/// Configuration error: one line for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// A value that does not parse: what it should look like, and what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{expected}, not {got:?}")]
pub struct BadValue {
    pub expected: &'static str,
    pub got: String,
}

impl BadValue {
    fn new(expected: &'static str, got: &str) -> Self {
        Self {
            expected,
            got: got.to_owned(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub storage: StorageConfig,
    pub coordinator: CoordinatorConfig,
    pub gateway: GatewayConfig,
}

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

/// `--role=storage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// gRPC listener.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`; default: host of `listen`, port + 1000.
    pub http_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Gossip listener (UDP); gossip is off when unset.
    pub gossip: Option<SocketAddr>,
    /// Gossip addresses of other storage nodes.
    #[serde(deserialize_with = "list")]
    pub seeds: Vec<String>,
    /// Commit-log durability: `always` (group commit), `batch_ms=N` or `never`.
    pub sync: SyncMode,
    /// Open even when a commit-log segment is corrupt in the middle, dropping the rest of that
    /// segment (an operator's decision after reading the error; off by default).
    pub skip_corrupt_log: bool,
    /// Most bytes per second this node's range streams send together (node additions and
    /// removals); 0 = unlimited. 8 MiB/s by default: under half-capacity load, foreground p99
    /// during a change stays at its idle level (docs/benchmarks.md, "Streaming").
    pub stream_rate_limit: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            http_listen: None,
            data_dir: PathBuf::from("data/storage"),
            gossip: None,
            seeds: Vec::new(),
            sync: SyncMode::Always,
            skip_corrupt_log: false,
            stream_rate_limit: 8 << 20,
        }
    }
}

/// `--role=coordinator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    /// `postgres://...` or `sqlite://path` (the embedded default).
    pub metadata_url: String,
    /// `redis://...` or `memory://` (the embedded default).
    pub idempotency_url: String,
    /// Seeds an empty node registry: `id@host:port`.
    #[serde(deserialize_with = "list")]
    pub storage_nodes: Vec<NodeAddress>,
    /// Gossip addresses of storage nodes, to follow membership.
    #[serde(deserialize_with = "list")]
    pub seeds: Vec<String>,
    /// Deadline of one client request (all replica calls of it), in milliseconds.
    pub request_timeout_ms: u64,
    /// Keep hints for replicas that missed writes (Cassandra's `hinted_handoff_enabled`).
    pub hints_enabled: bool,
    /// Hints older than this many seconds are dropped (they need repair instead).
    pub max_hint_window_s: u64,
    /// Delivery attempts of one hint before it is dropped.
    pub max_hint_attempts: u32,
    /// How often the hint replay loop looks for hints to deliver, in milliseconds.
    pub hint_replay_interval_ms: u64,
    /// How often the node registry is re-read from the metadata store, in milliseconds.
    pub ring_refresh_ms: u64,
    /// Tenant cache entries are fresh for this many seconds.
    pub tenant_cache_ttl_s: u64,
    /// Entries a vector clock keeps before the oldest counters are pruned.
    pub max_clock_entries: usize,
    /// Read repairs waiting to be sent; more are dropped (and counted).
    pub read_repair_queue: usize,
    /// Share of QUORUM reads that ask every replica instead of just a quorum, so read repair
    /// reaches all of them (Cassandra's `read_repair_chance`), 0..=1.
    pub read_repair_chance: f64,
    /// Coalesced batches of replica calls outstanding per storage node and kind (reads,
    /// writes); fewer means larger batches (fewer RPCs and fsyncs), more means less queueing.
    pub batch_in_flight: usize,
    /// A node addition or removal whose streams make no progress for this many seconds is
    /// rolled back.
    pub topology_timeout_s: u64,
    /// Removing a node that would leave fewer active nodes than this (or than the largest
    /// tenant RF) needs `force`.
    pub min_storage_nodes: usize,
    /// How far ahead of this coordinator's clock a counter from outside (a client's context, a
    /// replica's version) may lie, in milliseconds; a client context beyond it is refused and a
    /// replica's version beyond it never moves the clock.
    pub max_clock_skew_ms: u64,
    /// On SIGTERM, the longest wait for queued hints to reach the metadata store, in
    /// milliseconds.
    pub shutdown_drain_timeout_ms: u64,
    /// How a joining storage node's tokens are chosen: `balanced` (the allocator, stored in the
    /// registry) or `random` (the xxh3 rule of earlier versions).
    pub token_allocation: TokenAllocation,
    /// Tokens of a node added without `virtual_nodes`; 0 = the allocation's default (16
    /// balanced, 150 random).
    pub virtual_nodes: u32,
    /// Old owners drop the ranges they gave away automatically this many seconds after a
    /// topology or replication-factor change completed (SEMANTICS.md: 24 h).
    pub cleanup_grace_s: u64,
    /// Run that cleanup automatically (`POST /v1/admin/cleanup` runs one at any time).
    pub auto_cleanup: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7201)),
            http_listen: None,
            metadata_url: "sqlite://pairdb-metadata.db".to_owned(),
            idempotency_url: "memory://".to_owned(),
            storage_nodes: Vec::new(),
            seeds: Vec::new(),
            request_timeout_ms: 2_000,
            hints_enabled: true,
            max_hint_window_s: 3 * 3600,
            max_hint_attempts: 100,
            hint_replay_interval_ms: 1_000,
            ring_refresh_ms: 2_000,
            tenant_cache_ttl_s: 300,
            max_clock_entries: 64,
            read_repair_queue: 10_000,
            read_repair_chance: 0.1,
            batch_in_flight: 1,
            topology_timeout_s: 3600,
            min_storage_nodes: 1,
            max_clock_skew_ms: 60_000,
            shutdown_drain_timeout_ms: 20_000,
            token_allocation: TokenAllocation::Balanced,
            virtual_nodes: 0,
            cleanup_grace_s: 24 * 3600,
            auto_cleanup: true,
        }
    }
}

/// `--role=gateway`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// HTTP listener of the public API.
    pub listen: SocketAddr,
    /// Coordinators' gRPC addresses (`host:port`), load-balanced with failover.
    #[serde(deserialize_with = "list")]
    pub coordinators: Vec<String>,
    /// Per tenant, per minute.
    pub write_rate_limit: u32,
    pub read_rate_limit: u32,
    /// Per-tenant overrides: `[gateway.tenant_limits.acme] write = 5000, read = 50000`.
    pub tenant_limits: std::collections::BTreeMap<String, TenantLimits>,
    /// Largest request body accepted (a 10 MiB value plus its JSON), in bytes.
    pub max_body_bytes: usize,
    /// Deadline of one call to a coordinator, in milliseconds.
    pub request_timeout_ms: u64,
    pub auth: AuthConfig,
}

/// Requests per minute for one tenant; unset = the gateway's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    pub write: Option<u32>,
    pub read: Option<u32>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            coordinators: vec!["127.0.0.1:7201".to_owned()],
            write_rate_limit: 1000,
            read_rate_limit: 10000,
            tenant_limits: std::collections::BTreeMap::new(),
            max_body_bytes: 11 * 1024 * 1024,
            request_timeout_ms: 5_000,
            auth: AuthConfig::default(),
        }
    }
}

/// `[gateway.auth]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// HS256 secret (or `secret_file`).
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// HS256 JWT bearer tokens (the production default).
    #[default]
    Token,
    /// No token: the tenant comes from the request (development only).
    None,
}

/// A storage node's address as given to coordinators: `id@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub id: String,
    pub host: String,
    pub port: u16,
}

impl FromStr for NodeAddress {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BadValue::new("storage node must look like id@host:port", s);
        let (id, addr) = s.split_once('@').ok_or_else(err)?;
        let (host, port) = split_host_port(addr).map_err(|_| err())?;
        if id.is_empty() {
            return Err(err());
        }
        Ok(Self {
            id: id.to_owned(),
            host,
            port,
        })
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.id, self.host, self.port)
    }
}

/// Splits `host:port` (host may be a name, an IPv4 address or a bracketed IPv6 address).
pub fn split_host_port(addr: &str) -> Result<(String, u16), BadValue> {
    let err = || BadValue::new("address must look like host:port", addr);
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() || port == 0 {
        return Err(err());
    }
    Ok((host.to_owned(), port))
}

macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(SyncMode);
serde_via_str!(NodeAddress);

/// Accepts a list either as a sequence or as one comma-separated string (env vars).
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Raw::Many(v) => v,
    };
    items
        .iter()
        .map(|s| s.parse::<T>().map_err(serde::de::Error::custom))
        .collect()
}

/// Sections an env var may name, longest first so `GATEWAY_AUTH_` wins over `GATEWAY_`.
const ENV_SECTIONS: [(&str, &str); 5] = [
    ("gateway_auth_", "gateway.auth."),
    ("gateway_", "gateway."),
    ("coordinator_", "coordinator."),
    ("storage_", "storage."),
    ("node_", "node."),
];

/// `PAIRDB_STORAGE_DATA_DIR` -> `storage.data_dir`; `None` for variables of no section.
pub fn env_key(name_without_prefix: &str) -> Option<String> {
    let lower = name_without_prefix.to_ascii_lowercase();
    ENV_SECTIONS.iter().find_map(|(prefix, section)| {
        lower
            .strip_prefix(prefix)
            .filter(|key| !key.is_empty())
            .map(|key| format!("{section}{key}"))
    })
}

impl Config {
    /// Layers defaults, the TOML file, `PAIRDB_*` env vars and the given flags.
    /// `flags` is shaped like the file (sections of keys); only the flags given.
    pub fn load(file: Option<&Path>, flags: &impl Serialize) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    reason: "no such file".to_owned(),
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(Env::prefixed("PAIRDB_").filter_map(|k| env_key(k.as_str()).map(Into::into)));
        figment = figment.merge(Serialized::defaults(flags));
        figment.extract().map_err(|e| {
            let reason = e.to_string().replace('\n', " ");
            match file {
                Some(path) => ConfigError::File {
                    path: path.display().to_string(),
                    reason,
                },
                None => invalid(reason),
            }
        })
    }

    /// Checks what the selected roles need.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.roles.is_empty() {
            return Err(invalid(
                "no role given: use --role=gateway|coordinator|storage (or a comma list), or `pairdb dev`",
            ));
        }
        if self.node.worker_threads == Some(0) {
            return Err(invalid("node.worker_threads must be at least 1"));
        }
        let needs_id = self
            .node
            .roles
            .iter()
            .any(|r| matches!(r, Role::Storage | Role::Coordinator));
        if needs_id {
            match self.node.id.as_deref() {
                None | Some("") => {
                    return Err(invalid(
                        "--node-id is required for the storage and coordinator roles",
                    ));
                }
                Some(id) if !valid_node_id(id) => {
                    return Err(invalid(format!(
                        "node id {id:?} must be 1..=128 characters of letters, digits, '-', '_' or '.'"
                    )));
                }
                Some(_) => {}
            }
        }
        for role in &self.node.roles {
            match role {
                Role::Storage => self.storage.validate()?,
                Role::Coordinator => self.coordinator.validate()?,
                Role::Gateway => self.gateway.validate()?,
            }
        }
        let listens: Vec<(Role, SocketAddr)> = self
            .node
            .roles
            .iter()
            .map(|r| (*r, self.listen_of(*r)))
            .collect();
        for (i, (a, addr_a)) in listens.iter().enumerate() {
            for (b, addr_b) in &listens[i + 1..] {
                if addr_a == addr_b && addr_a.port() != 0 {
                    return Err(invalid(format!(
                        "roles {a} and {b} both listen on {addr_a}; give each its own address"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The main listener of a role.
    pub fn listen_of(&self, role: Role) -> SocketAddr {
        match role {
            Role::Storage => self.storage.listen,
            Role::Coordinator => self.coordinator.listen,
            Role::Gateway => self.gateway.listen,
        }
    }
}

/// The HTTP (health/metrics) listener next to a gRPC listener: same host, port + 1000.
pub fn default_http_listen(listen: SocketAddr) -> SocketAddr {
    let port = match listen.port() {
        0 => 0,
        p => p.saturating_add(1000),
    };
    SocketAddr::new(listen.ip(), port)
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("--data-dir is required for the storage role"));
        }
        if self.gossip.is_none() && !self.seeds.is_empty() {
            return Err(invalid(
                "--seeds needs --gossip: a storage node gossips from its own gossip address",
            ));
        }
        for seed in &self.seeds {
            split_host_port(seed).map_err(|e| invalid(format!("--seeds: {e}")))?;
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.metadata_url.as_str();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err(invalid(format!(
                "--metadata-url must be postgres://... or sqlite://path, not {url:?}"
            )));
        }
        let idem = self.idempotency_url.as_str();
        if !(idem.starts_with("redis://") || idem.starts_with("rediss://") || idem == "memory://") {
            return Err(invalid(format!(
                "--idempotency-url must be redis://... or memory://, not {idem:?}"
            )));
        }
        for seed in &self.seeds {
            split_host_port(seed).map_err(|e| invalid(format!("--seeds: {e}")))?;
        }
        if self.request_timeout_ms == 0
            || self.hint_replay_interval_ms == 0
            || self.ring_refresh_ms == 0
        {
            return Err(invalid(
                "coordinator request_timeout_ms, hint_replay_interval_ms and ring_refresh_ms must be > 0",
            ));
        }
        if self.virtual_nodes > crate::ring::MAX_VIRTUAL_NODES {
            return Err(invalid(format!(
                "coordinator virtual_nodes must be 0 (the default) ..={}",
                crate::ring::MAX_VIRTUAL_NODES
            )));
        }
        if !(1..=64).contains(&self.batch_in_flight) {
            return Err(invalid("coordinator batch_in_flight must be 1..=64"));
        }
        if !(0.0..=1.0).contains(&self.read_repair_chance) {
            return Err(invalid("coordinator read_repair_chance must be in 0..=1"));
        }
        if !(1..=24 * 3600 * 1000).contains(&self.max_clock_skew_ms) {
            return Err(invalid(
                "coordinator max_clock_skew_ms must be 1..=86400000",
            ));
        }
        if !(1..=1000).contains(&self.max_clock_entries) {
            return Err(invalid("coordinator max_clock_entries must be 1..=1000"));
        }
        let mut ids: Vec<&str> = self.storage_nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "--storage-nodes names node {:?} twice",
                w[0]
            )));
        }
        Ok(())
    }
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.coordinators.is_empty() {
            return Err(invalid("--coordinators needs at least one host:port"));
        }
        for c in &self.coordinators {
            split_host_port(c).map_err(|e| invalid(format!("--coordinators: {e}")))?;
        }
        let tenant_zero = self
            .tenant_limits
            .values()
            .any(|l| l.write == Some(0) || l.read == Some(0));
        if self.write_rate_limit == 0 || self.read_rate_limit == 0 || tenant_zero {
            return Err(invalid("rate limits must be at least 1 request per minute"));
        }
        if self.max_body_bytes < 1024 || self.request_timeout_ms == 0 {
            return Err(invalid(
                "gateway max_body_bytes must be >= 1024 and request_timeout_ms > 0",
            ));
        }
        if self.auth.mode == AuthMode::Token
            && self.auth.secret.as_deref().is_none_or(str::is_empty)
            && self.auth.secret_file.is_none()
        {
            return Err(invalid(
                "--auth=token needs a secret: set [gateway.auth] secret or secret_file, or PAIRDB_GATEWAY_AUTH_SECRET",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_only_processes_run_one_worker_unless_told() {
        let node = |roles: Vec<Role>, worker_threads| NodeConfig {
            roles,
            worker_threads,
            ..NodeConfig::default()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(node(vec![Role::Storage], None).runtime_workers(), 1);
        assert_eq!(node(vec![Role::Coordinator], None).runtime_workers(), cores);
        assert_eq!(
            node(vec![Role::Storage, Role::Gateway], None).runtime_workers(),
            cores
        );
        assert_eq!(node(vec![Role::Storage], Some(4)).runtime_workers(), 4);
        let storage = |worker_threads| Config {
            node: NodeConfig {
                id: Some("s1".to_owned()),
                ..node(vec![Role::Storage], worker_threads)
            },
            ..Config::default()
        };
        let zero = storage(Some(0));
        assert!(zero.validate().is_err());
        let one = storage(Some(1));
        assert!(one.validate().is_ok(), "{:?}", one.validate());
    }

    #[test]
    fn env_names_map_to_sections() {
        assert_eq!(
            env_key("STORAGE_DATA_DIR").as_deref(),
            Some("storage.data_dir")
        );
        assert_eq!(
            env_key("GATEWAY_AUTH_MODE").as_deref(),
            Some("gateway.auth.mode")
        );
        assert_eq!(env_key("GATEWAY_LISTEN").as_deref(), Some("gateway.listen"));
        assert_eq!(env_key("TOKEN"), None);
        assert_eq!(env_key("STORAGE_"), None);
    }

    #[test]
    fn token_allocation_is_configurable() {
        let parse = |toml: &str| {
            Figment::from(Serialized::defaults(CoordinatorConfig::default()))
                .merge(Toml::string(toml))
                .extract::<CoordinatorConfig>()
                .map_err(|e| e.to_string())
        };
        let cfg = parse("token_allocation = \"random\"\nvirtual_nodes = 64").expect("parse");
        assert_eq!(cfg.token_allocation, TokenAllocation::Random);
        assert_eq!(cfg.token_allocation.virtual_nodes(cfg.virtual_nodes), 64);
        let default = CoordinatorConfig::default();
        assert_eq!(default.token_allocation, TokenAllocation::Balanced);
        assert_eq!(default.token_allocation.virtual_nodes(0), 16);
        assert_eq!(TokenAllocation::Random.virtual_nodes(0), 150);
        assert!(parse("token_allocation = \"even\"").is_err());
    }

    #[test]
    fn node_addresses_parse() {
        let n: NodeAddress = "s1@127.0.0.1:7101".parse().expect("parse");
        assert_eq!(
            (n.id.as_str(), n.host.as_str(), n.port),
            ("s1", "127.0.0.1", 7101)
        );
        assert!("127.0.0.1:7101".parse::<NodeAddress>().is_err());
        assert!("s1@host".parse::<NodeAddress>().is_err());
        assert!("@h:1".parse::<NodeAddress>().is_err());
    }

    #[test]
    fn http_listen_defaults_to_port_plus_1000() {
        let addr: SocketAddr = "127.0.0.1:7101".parse().expect("addr");
        assert_eq!(default_http_listen(addr).port(), 8101);
    }
}
