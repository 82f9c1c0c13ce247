//! `[gateway]` and `[gateway.auth]`: `--role=gateway`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{list, split_host_port};
use super::{ConfigError, invalid};

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
    #[serde(with = "super::values::human_duration")]
    pub request_timeout: Duration,
    pub auth: AuthConfig,
    /// HTTPS: the certificate chain and key the public API presents (PEM; both or none),
    /// reloaded on SIGHUP.
    pub https_cert_file: Option<PathBuf>,
    pub https_key_file: Option<PathBuf>,
    // Earlier names of the durations above, as whole milliseconds (`_ms`) or seconds (`_s`).
    // Still read from files and env vars (a value given this way wins); never written.
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub request_timeout_ms: Option<u64>,
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
            request_timeout: Duration::from_millis(5_000),
            request_timeout_ms: None,
            auth: AuthConfig::default(),
            https_cert_file: None,
            https_key_file: None,
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

impl GatewayConfig {
    /// Folds the earlier `_ms`/`_s` keys into the durations.
    pub(super) fn apply_legacy_units(&mut self) {
        if let Some(v) = self.request_timeout_ms.take() {
            self.request_timeout = Duration::from_millis(v);
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.max_body_bytes < 1024 || self.request_timeout.is_zero() {
            return Err(invalid(
                "gateway max_body_bytes must be >= 1024 and request_timeout > 0",
            ));
        }
        if self.https_cert_file.is_some() != self.https_key_file.is_some() {
            return Err(invalid(
                "HTTPS needs both https_cert_file and https_key_file (--https-cert-file, --https-key-file)",
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
