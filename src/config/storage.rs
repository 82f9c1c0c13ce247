//! `[storage]`: `--role=storage`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::values::{list, split_host_port};
use super::{ConfigError, SyncMode, invalid};

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
    /// Register this node through the coordinators on its first start (`roles::join`), like
    /// `pairdb admin add-node` would; off by default.
    pub join: bool,
    /// The coordinators' gRPC addresses (host:port) a joining node registers through.
    #[serde(deserialize_with = "list")]
    pub join_coordinators: Vec<String>,
    /// host:port at which coordinators and other nodes reach this node's gRPC listener (a
    /// pod's stable DNS name); default: `listen`, which must then not be 0.0.0.0 or [::].
    pub advertise: Option<String>,
    /// Commit-log durability: `always` (group commit), `batch_ms=N` or `never`.
    pub sync: SyncMode,
    /// Open even when a commit-log segment is corrupt in the middle, dropping the rest of that
    /// segment (an operator's decision after reading the error; off by default).
    pub skip_corrupt_log: bool,
    /// Most bytes per second this node's range streams send together (node additions and
    /// removals); 0 = unlimited. 8 MiB/s by default, chosen with `scripts/bench-streaming.sh`
    /// (docs/benchmarks.md, "Streaming", which also says what a change still costs the
    /// foreground p99).
    pub stream_rate_limit: u64,
    /// Most bytes of records per second an anti-entropy listing scans on this node (one scan
    /// of a tenant per repair that finds differences); 0 = unlimited. 16 MiB/s by default,
    /// chosen with `scripts/bench-repair.sh` (docs/benchmarks.md, "Anti-entropy": at 32 MiB/s
    /// a divergent repair raised the foreground p99 1.57x, at 16 MiB/s 1.30x).
    pub repair_scan_rate_limit: u64,
    /// Tombstones younger than this are never purged; older ones only once anti-entropy
    /// repaired their range after they were written (Cassandra's `gc_grace_seconds`).
    #[serde(with = "super::values::human_duration")]
    pub gc_grace: std::time::Duration,
    /// Row cache of hot keys, in bytes (0 disables it).
    pub cache_bytes: u64,
    /// Memtable size that triggers a flush, in bytes.
    pub memtable_bytes: usize,
    /// Disk usage (%) from which the node warns and reports itself degraded.
    pub disk_warn_percent: f64,
    /// Disk usage (%) from which writes over 64 KiB are refused (DISK_THROTTLED).
    pub disk_throttle_percent: f64,
    /// Disk usage (%) from which every write is refused (DISK_FULL) and the node is unhealthy.
    pub disk_full_percent: f64,
    /// Nice value (0-19) of the threads that do what no client waits on: compaction, range
    /// streams' scans and the records streams, repairs and hint replays write, anti-entropy
    /// listings. 10 by default; 0 runs them at the process's priority (`crate::priority`).
    pub background_nice: u8,
    /// The layout new SSTables are written in (docs/sstable-format.md): 3 by default; 2 (or 1)
    /// while a rolling upgrade still has nodes whose binary predates format 3 (or 2): they
    /// cannot open its tables. Tables of every format are always read, and compaction
    /// rewrites old ones.
    pub table_format_version: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            http_listen: None,
            data_dir: PathBuf::from("data/storage"),
            gossip: None,
            seeds: Vec::new(),
            join: false,
            join_coordinators: Vec::new(),
            advertise: None,
            sync: SyncMode::Always,
            skip_corrupt_log: false,
            stream_rate_limit: 8 << 20,
            repair_scan_rate_limit: 16 << 20,
            gc_grace: std::time::Duration::from_secs(10 * 24 * 3600),
            cache_bytes: 64 << 20,
            memtable_bytes: 64 << 20,
            disk_warn_percent: crate::engine::WARN_PERCENT,
            disk_throttle_percent: crate::engine::THROTTLE_PERCENT,
            disk_full_percent: crate::engine::FULL_PERCENT,
            background_nice: crate::priority::DEFAULT_BACKGROUND_NICE,
            table_format_version: crate::engine::TableFormat::default().version(),
        }
    }
}

impl StorageConfig {
    /// The table format `table_format_version` names.
    pub fn table_format(&self) -> Result<crate::engine::TableFormat, ConfigError> {
        crate::engine::TableFormat::from_version(self.table_format_version).ok_or_else(|| {
            invalid(format!(
                "table_format_version = {}: this build writes format 1, 2 or 3",
                self.table_format_version
            ))
        })
    }

    /// The (host, port) this node registers itself at: `advertise`, else `listen` when that is
    /// a specific address.
    pub fn advertised(&self) -> Result<(String, u16), ConfigError> {
        match &self.advertise {
            Some(a) => split_host_port(a).map_err(|e| invalid(format!("--advertise: {e}"))),
            None if self.listen.ip().is_unspecified() => Err(invalid(format!(
                "--listen={} is every address: --advertise must say which one others reach \
                 this node at (e.g. its pod's DNS name)",
                self.listen
            ))),
            None => Ok((self.listen.ip().to_string(), self.listen.port())),
        }
    }

    /// The engine's disk thresholds from these settings.
    pub fn disk_thresholds(&self) -> crate::engine::DiskThresholds {
        crate::engine::DiskThresholds {
            warn_percent: self.disk_warn_percent,
            throttle_percent: self.disk_throttle_percent,
            full_percent: self.disk_full_percent,
            ..crate::engine::DiskThresholds::default()
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.join {
            if self.join_coordinators.is_empty() {
                return Err(invalid(
                    "--join needs --join-coordinators: the coordinators to register through",
                ));
            }
            for c in &self.join_coordinators {
                split_host_port(c).map_err(|e| invalid(format!("--join-coordinators: {e}")))?;
            }
            self.advertised()?;
        }
        if self.background_nice > crate::priority::MAX_NICE {
            return Err(invalid(format!(
                "background_nice = {}: nice values go from 0 to {}",
                self.background_nice,
                crate::priority::MAX_NICE
            )));
        }
        self.table_format()?;
        let (warn, throttle, full) = (
            self.disk_warn_percent,
            self.disk_throttle_percent,
            self.disk_full_percent,
        );
        if !(0.0 < warn && warn <= throttle && throttle <= full && full <= 100.0) {
            return Err(invalid(format!(
                "disk thresholds: need 0 < disk_warn_percent ({warn}) <= disk_throttle_percent \
                 ({throttle}) <= disk_full_percent ({full}) <= 100"
            )));
        }
        if self.memtable_bytes < 64 << 10 {
            return Err(invalid(format!(
                "memtable_bytes = {}: at least 65536",
                self.memtable_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_thresholds_must_be_ordered() {
        assert!(StorageConfig::default().validate().is_ok());
        let unordered = StorageConfig {
            disk_throttle_percent: 97.0,
            ..StorageConfig::default()
        };
        assert!(unordered.validate().is_err());
        let zero = StorageConfig {
            disk_warn_percent: 0.0,
            ..StorageConfig::default()
        };
        assert!(zero.validate().is_err());
        let low = StorageConfig {
            disk_warn_percent: 50.0,
            disk_throttle_percent: 60.0,
            disk_full_percent: 70.0,
            ..StorageConfig::default()
        };
        assert!(low.validate().is_ok());
        assert_eq!(low.disk_thresholds().full_percent, 70.0);
    }
}
