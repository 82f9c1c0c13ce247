//! How an engine is tuned: [`EngineOptions`] and the commit log's [`SyncMode`].
//!
//! The engine's own types: whoever opens an engine (the storage node, tests, benchmarks)
//! translates its configuration into these, so the engine imports nothing above it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::compaction::policy::LevelPolicy;
use super::vfs::{self, Vfs};

/// Commit-log sync policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fsync before acknowledging, concurrent writers share one fsync (group commit).
    #[default]
    Always,
    /// fsync at most every N ms; a crash may lose the last N ms of acknowledged writes.
    BatchMs(u64),
    /// Never fsync explicitly (tests and benchmarks only).
    Never,
}

/// A sync policy that is not `always`, `batch_ms=N` (N > 0) or `never`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sync must be always, batch_ms=N (N > 0) or never, not {0:?}")]
pub struct BadSyncMode(pub String);

impl FromStr for SyncMode {
    type Err = BadSyncMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => match other.strip_prefix("batch_ms=").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Self::BatchMs(ms)),
                _ => Err(BadSyncMode(other.to_owned())),
            },
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::BatchMs(ms) => write!(f, "batch_ms={ms}"),
            Self::Never => f.write_str("never"),
        }
    }
}

/// Decides whether a tombstone past gc_grace may be purged (a storage node: only once its
/// range was repaired after it was written, so no replica that missed it can bring the value
/// back).
pub trait TombstoneGate: Send + Sync + std::fmt::Debug {
    fn may_purge(&self, tenant: &str, ring_hash: u64, written_ms: u64) -> bool;
}

/// Tuning of one engine. `Default` is the production configuration.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub sync: SyncMode,
    /// Commit-log segment size before rotation.
    pub segment_bytes: u64,
    /// Memtable size that triggers a flush.
    pub memtable_bytes: usize,
    /// Frozen memtables allowed to wait for flushing before writers stall. With the active
    /// one and the cache, this bounds the engine's memory: `memtable_bytes` x (1 + this)
    /// + `cache_bytes` (2: 256 MiB by default; RocksDB's default keeps one frozen).
    pub max_immutable_memtables: usize,
    /// Target size of a data block.
    pub block_bytes: usize,
    /// The layout new tables are written in; tables of every format are read. Formats 1 and 2
    /// are for a rolling upgrade: a binary from before format N cannot open format-N tables.
    pub table_format: super::sstable::TableFormat,
    /// Target size of a compaction output table.
    pub table_bytes: u64,
    pub levels: LevelPolicy,
    /// Row cache capacity in bytes (0 disables it).
    pub cache_bytes: u64,
    /// Tombstones younger than this survive compaction.
    pub gc_grace: Duration,
    /// Says which tombstones past `gc_grace` compaction may purge (anti-entropy's repaired
    /// ranges); `None`: every one.
    pub tombstone_gate: Option<Arc<dyn TombstoneGate>>,
    /// Disk usage at which writes are warned about, throttled and refused.
    pub disk: super::disk::DiskThresholds,
    /// Compaction write rate limit (bytes/s); `None` = unthrottled.
    pub compaction_bytes_per_sec: Option<u64>,
    /// Open even if a commit-log segment is corrupt in the middle, dropping the rest of it.
    pub skip_corrupt_log: bool,
    /// Run the flush and compaction workers (tests may drive them by hand).
    pub background: bool,
    /// Write tables (flush and compaction outputs) with direct I/O, bypassing the page cache
    /// (RocksDB's `use_direct_io_for_flush_and_compaction`). For nodes whose data is larger
    /// than their memory limit: no dirty table pages for reclaim to wait on. The cost: a table
    /// is cold when written, so reads of fresh data go to the device (cluster GETs 12-26%
    /// slower right after a write load, docs/benchmarks.md "Round 3, step 11"). Off by default.
    pub direct_table_writes: bool,
    /// Nice value of the compaction thread (`crate::priority`; 0: the process's own). Unless
    /// 0, its disk I/O is also put in the idle class (`priority::idle_current_thread_io`).
    /// Flushes keep the process's priority: writers wait for them once memtables are full.
    pub compaction_nice: u8,
    /// How long after the last ingested table the runs that ingests stacked above the last
    /// level stay as they are; then one merge takes them into the last level
    /// (`compaction::policy::pick`). Streams deliver a batch every second or less, so a
    /// gap this long means they are over (or stalled: the merge is then merely early).
    pub ingest_quiet: Duration,
    /// Where files live: the real file system, or a simulated disk in crash tests.
    pub vfs: Arc<dyn Vfs>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            sync: SyncMode::Always,
            segment_bytes: 128 << 20,
            memtable_bytes: 64 << 20,
            max_immutable_memtables: 2,
            block_bytes: 4096,
            table_format: super::sstable::TableFormat::V3,
            table_bytes: 64 << 20,
            levels: LevelPolicy::default(),
            cache_bytes: 64 << 20,
            gc_grace: Duration::from_secs(10 * 24 * 3600),
            tombstone_gate: None,
            disk: super::disk::DiskThresholds::default(),
            compaction_bytes_per_sec: Some(64 << 20),
            skip_corrupt_log: false,
            background: true,
            direct_table_writes: false,
            compaction_nice: crate::priority::DEFAULT_BACKGROUND_NICE,
            ingest_quiet: Duration::from_secs(10),
            vfs: vfs::real(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_mode_parses_and_prints() {
        for s in ["always", "never", "batch_ms=5"] {
            assert_eq!(s.parse::<SyncMode>().expect(s).to_string(), s);
        }
        assert!("batch_ms=0".parse::<SyncMode>().is_err());
        assert!("sometimes".parse::<SyncMode>().is_err());
    }
}
