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

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::engine::SyncMode;
use crate::limits::valid_node_id;

mod coordinator;
mod gateway;
mod node;
mod storage;
mod values;

pub use coordinator::CoordinatorConfig;
pub use gateway::{AuthConfig, AuthMode, GatewayConfig, TenantLimits};
pub use node::{LogFormat, NodeConfig, Role};
pub use storage::StorageConfig;
pub use values::{BadValue, NodeAddress, default_http_listen, split_host_port};

/// Configuration error: one line for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn invalid(msg: impl Into<String>) -> ConfigError {
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
        let mut config: Config = figment.extract().map_err(|e| {
            let reason = e.to_string().replace('\n', " ");
            match file {
                Some(path) => ConfigError::File {
                    path: path.display().to_string(),
                    reason,
                },
                None => invalid(reason),
            }
        })?;
        config.coordinator.apply_legacy_units();
        config.gateway.apply_legacy_units();
        Ok(config)
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
        // Every role calls or serves internal RPCs.
        self.node.internal_auth()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::allocation::TokenAllocation;

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
                cluster_secret: Some("config-tests-secret".to_owned()),
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
    fn durations_read_humantime_and_the_old_unit_keys() {
        use std::time::Duration;
        let load = |toml: &str| {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), toml).expect("write");
            Config::load(Some(file.path()), &serde_json::json!({})).map_err(|e| e.to_string())
        };
        let new = load("[coordinator]\nring_refresh = \"500ms\"\ncleanup_grace = \"2h\"\n[gateway]\nrequest_timeout = \"7s\"")
            .expect("new names");
        assert_eq!(new.coordinator.ring_refresh, Duration::from_millis(500));
        assert_eq!(new.coordinator.cleanup_grace, Duration::from_secs(7200));
        assert_eq!(new.gateway.request_timeout, Duration::from_secs(7));
        let old = load("[coordinator]\nring_refresh_ms = 500\ncleanup_grace_s = 7200\nmax_clock_skew_ms = 1500\n[gateway]\nrequest_timeout_ms = 7000")
            .expect("old names");
        assert_eq!(old.coordinator.ring_refresh, Duration::from_millis(500));
        assert_eq!(old.coordinator.cleanup_grace, Duration::from_secs(7200));
        assert_eq!(old.coordinator.max_clock_skew, Duration::from_millis(1500));
        assert_eq!(old.gateway.request_timeout, Duration::from_secs(7));
        // Defaults stay what they were; the old keys are never written out.
        let defaults = Config::default();
        assert_eq!(defaults.coordinator.request_timeout, Duration::from_secs(2));
        assert_eq!(
            defaults.coordinator.cleanup_grace,
            Duration::from_secs(24 * 3600)
        );
        let printed = toml::to_string(&defaults).expect("print");
        assert!(printed.contains("ring_refresh = \"2s\""), "{printed}");
        assert!(!printed.contains("_ms"), "{printed}");
        assert!(load("[coordinator]\nring_refresh = \"soon\"").is_err());
        let zero = load(
            "[node]\nroles = [\"coordinator\"]\nid = \"c1\"\n[coordinator]\nring_refresh = \"0s\"",
        )
        .expect("parses");
        let refused = zero.validate().expect_err("a zero refresh is refused");
        assert!(refused.to_string().contains("ring_refresh"), "{refused}");
    }

    /// A storage node's configuration: the minimal file plus `extra` lines of `[storage]`.
    fn storage_config(extra: &str) -> Config {
        let toml = format!(
            "[node]\nroles = [\"storage\"]\nid = \"s1\"\n[storage]\ndata_dir = \"d\"\n{extra}"
        );
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), toml).expect("write");
        Config::load(Some(file.path()), &serde_json::json!({})).expect("parses")
    }

    #[test]
    fn background_nice_is_a_nice_value() {
        let default = storage_config("");
        assert_eq!(default.storage.background_nice, 10);
        default.storage.validate().expect("the default is valid");
        let off = storage_config("background_nice = 0");
        off.storage.validate().expect("0 turns it off");
        let refused = storage_config("background_nice = 20")
            .storage
            .validate()
            .expect_err("20 is no nice value");
        assert!(refused.to_string().contains("background_nice"), "{refused}");
    }

    #[test]
    fn table_format_version_is_one_this_build_writes() {
        let default = storage_config("");
        assert_eq!(
            default.storage.table_format().ok(),
            Some(crate::engine::TableFormat::V3)
        );
        let upgrading = storage_config("table_format_version = 1");
        assert_eq!(
            upgrading.storage.table_format().ok(),
            Some(crate::engine::TableFormat::V1)
        );
        for bad in [0, 4] {
            let refused = storage_config(&format!("table_format_version = {bad}"))
                .storage
                .validate()
                .expect_err("no such format");
            assert!(
                refused.to_string().contains("table_format_version"),
                "{refused}"
            );
        }
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
