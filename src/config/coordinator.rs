//! `[coordinator]`: `--role=coordinator`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ring::allocation::TokenAllocation;

use super::values::{NodeAddress, list, split_host_port};
use super::{ConfigError, invalid};

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
    #[serde(with = "super::values::human_duration")]
    pub request_timeout: Duration,
    /// Keep hints for replicas that missed writes (Cassandra's `hinted_handoff_enabled`).
    pub hints_enabled: bool,
    /// Hints older than this many seconds are dropped (they need repair instead).
    #[serde(with = "super::values::human_duration")]
    pub max_hint_window: Duration,
    /// Delivery attempts of one hint before it is dropped.
    pub max_hint_attempts: u32,
    /// How often the hint replay loop looks for hints to deliver, in milliseconds.
    #[serde(with = "super::values::human_duration")]
    pub hint_replay_interval: Duration,
    /// How often the node registry is re-read from the metadata store, in milliseconds.
    #[serde(with = "super::values::human_duration")]
    pub ring_refresh: Duration,
    /// Tenant cache entries are fresh for this many seconds.
    #[serde(with = "super::values::human_duration")]
    pub tenant_cache_ttl: Duration,
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
    #[serde(with = "super::values::human_duration")]
    pub topology_timeout: Duration,
    /// Removing a node that would leave fewer active nodes than this (or than the largest
    /// tenant RF) needs `force`.
    pub min_storage_nodes: usize,
    /// How far ahead of this coordinator's clock a counter from outside (a client's context, a
    /// replica's version) may lie, in milliseconds; a client context beyond it is refused and a
    /// replica's version beyond it never moves the clock.
    #[serde(with = "super::values::human_duration")]
    pub max_clock_skew: Duration,
    /// On SIGTERM, the longest wait for queued hints to reach the metadata store, in
    /// milliseconds.
    #[serde(with = "super::values::human_duration")]
    pub shutdown_drain_timeout: Duration,
    /// How a joining storage node's tokens are chosen: `balanced` (the allocator, stored in the
    /// registry) or `random` (the xxh3 rule of earlier versions).
    pub token_allocation: TokenAllocation,
    /// Tokens of a node added without `virtual_nodes`; 0 = the allocation's default (16
    /// balanced, 150 random).
    pub virtual_nodes: u32,
    /// Old owners drop the ranges they gave away automatically this many seconds after a
    /// topology or replication-factor change completed (SEMANTICS.md: 24 h).
    #[serde(with = "super::values::human_duration")]
    pub cleanup_grace: Duration,
    /// Run that cleanup automatically (`POST /v1/admin/cleanup` runs one at any time).
    pub auto_cleanup: bool,
    /// Anti-entropy: a repair of every range starts this long after the last one started
    /// (`POST /v1/admin/repair` runs one at any time).
    #[serde(with = "super::values::human_duration")]
    pub repair_interval: Duration,
    /// Run repairs on that schedule.
    pub auto_repair: bool,
    /// Bytes per second a repair exchanges with the storage nodes at most (hashes, listings,
    /// records read and written); 0 = unpaced.
    pub repair_rate_limit: u64,
    // Earlier names of the durations above, as whole milliseconds (`_ms`) or seconds (`_s`).
    // Still read from files and env vars (a value given this way wins); never written.
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub request_timeout_ms: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub max_hint_window_s: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub hint_replay_interval_ms: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub ring_refresh_ms: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub tenant_cache_ttl_s: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub topology_timeout_s: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub max_clock_skew_ms: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub shutdown_drain_timeout_ms: Option<u64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub cleanup_grace_s: Option<u64>,
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
            request_timeout: Duration::from_millis(2_000),
            request_timeout_ms: None,
            hints_enabled: true,
            max_hint_window: Duration::from_secs(3 * 3600),
            max_hint_window_s: None,
            max_hint_attempts: 100,
            hint_replay_interval: Duration::from_millis(1_000),
            hint_replay_interval_ms: None,
            ring_refresh: Duration::from_millis(2_000),
            ring_refresh_ms: None,
            tenant_cache_ttl: Duration::from_secs(300),
            tenant_cache_ttl_s: None,
            max_clock_entries: 64,
            read_repair_queue: 10_000,
            read_repair_chance: 0.1,
            batch_in_flight: 1,
            topology_timeout: Duration::from_secs(3600),
            topology_timeout_s: None,
            min_storage_nodes: 1,
            max_clock_skew: Duration::from_millis(60_000),
            max_clock_skew_ms: None,
            shutdown_drain_timeout: Duration::from_millis(20_000),
            shutdown_drain_timeout_ms: None,
            token_allocation: TokenAllocation::Balanced,
            virtual_nodes: 0,
            cleanup_grace: Duration::from_secs(24 * 3600),
            cleanup_grace_s: None,
            auto_cleanup: true,
            repair_interval: Duration::from_secs(24 * 3600),
            auto_repair: true,
            repair_rate_limit: 16 << 20,
        }
    }
}

impl CoordinatorConfig {
    /// Folds the earlier `_ms`/`_s` keys into the durations.
    pub(super) fn apply_legacy_units(&mut self) {
        if let Some(v) = self.request_timeout_ms.take() {
            self.request_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.max_hint_window_s.take() {
            self.max_hint_window = Duration::from_secs(v);
        }
        if let Some(v) = self.hint_replay_interval_ms.take() {
            self.hint_replay_interval = Duration::from_millis(v);
        }
        if let Some(v) = self.ring_refresh_ms.take() {
            self.ring_refresh = Duration::from_millis(v);
        }
        if let Some(v) = self.tenant_cache_ttl_s.take() {
            self.tenant_cache_ttl = Duration::from_secs(v);
        }
        if let Some(v) = self.topology_timeout_s.take() {
            self.topology_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.max_clock_skew_ms.take() {
            self.max_clock_skew = Duration::from_millis(v);
        }
        if let Some(v) = self.shutdown_drain_timeout_ms.take() {
            self.shutdown_drain_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.cleanup_grace_s.take() {
            self.cleanup_grace = Duration::from_secs(v);
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.request_timeout.is_zero()
            || self.hint_replay_interval.is_zero()
            || self.ring_refresh.is_zero()
        {
            return Err(invalid(
                "coordinator request_timeout, hint_replay_interval and ring_refresh must be > 0",
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
        if !(Duration::from_millis(1)..=Duration::from_secs(24 * 3600))
            .contains(&self.max_clock_skew)
        {
            return Err(invalid("coordinator max_clock_skew must be 1ms..=24h"));
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
