//! Disk guard (STORAGE.md): usage >= 80% warns, >= 90% rejects large writes
//! (`DISK_THROTTLED`), >= 95% rejects every write (`DISK_FULL`). Usage is read with statvfs at
//! most once a second, so the guard costs nothing per write and recovers by itself once space
//! is freed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::error::EngineError;
use super::vfs::Vfs;

pub const WARN_PERCENT: f64 = 80.0;
pub const THROTTLE_PERCENT: f64 = 90.0;
pub const FULL_PERCENT: f64 = 95.0;
/// Writes above this many bytes count as large once the disk is past the throttle mark.
pub const LARGE_WRITE_BYTES: usize = 64 * 1024;
const REFRESH: Duration = Duration::from_secs(1);

/// Where disk usage warns, refuses large writes and refuses every write (a storage node's
/// `disk_*_percent` settings; the defaults are STORAGE.md's 80 / 90 / 95%).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskThresholds {
    pub warn_percent: f64,
    pub throttle_percent: f64,
    pub full_percent: f64,
    pub large_write_bytes: usize,
}

impl Default for DiskThresholds {
    fn default() -> Self {
        Self {
            warn_percent: WARN_PERCENT,
            throttle_percent: THROTTLE_PERCENT,
            full_percent: FULL_PERCENT,
            large_write_bytes: LARGE_WRITE_BYTES,
        }
    }
}

impl DiskThresholds {
    /// The verdict for a write of `bytes` at `percent` disk usage.
    pub fn decide(&self, percent: f64, bytes: usize) -> Result<(), EngineError> {
        if percent >= self.full_percent {
            return Err(EngineError::DiskFull { percent });
        }
        if percent >= self.throttle_percent && bytes > self.large_write_bytes {
            return Err(EngineError::DiskThrottled {
                percent,
                limit: self.large_write_bytes,
            });
        }
        Ok(())
    }
}

/// The verdict for a write of `bytes` at `percent` disk usage, with the default thresholds.
pub fn decide(percent: f64, bytes: usize) -> Result<(), EngineError> {
    DiskThresholds::default().decide(percent, bytes)
}

pub struct DiskGuard {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    thresholds: DiskThresholds,
    last: Mutex<(Instant, f64)>,
}

impl DiskGuard {
    pub fn new(vfs: Arc<dyn Vfs>, dir: &Path, thresholds: DiskThresholds) -> Self {
        let percent = vfs.usage_percent(dir).unwrap_or(0.0);
        Self {
            vfs,
            dir: dir.to_path_buf(),
            thresholds,
            last: Mutex::new((Instant::now(), percent)),
        }
    }

    /// Current usage (refreshed at most once a second).
    pub fn percent(&self) -> f64 {
        let mut last = self.last.lock();
        if last.0.elapsed() >= REFRESH {
            match self.vfs.usage_percent(&self.dir) {
                Ok(p) => {
                    let warn = self.thresholds.warn_percent;
                    if p >= warn && last.1 < warn {
                        tracing::warn!(dir = %self.dir.display(), percent = p, warn, "disk usage above the warning mark");
                    }
                    *last = (Instant::now(), p);
                }
                Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed"),
            }
        }
        last.1
    }

    pub fn check(&self, bytes: usize) -> Result<(), EngineError> {
        self.thresholds.decide(self.percent(), bytes)
    }

    pub fn thresholds(&self) -> DiskThresholds {
        self.thresholds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert!(decide(50.0, 10 << 20).is_ok());
        assert!(decide(85.0, 10 << 20).is_ok());
        assert!(decide(91.0, 100).is_ok());
        assert!(matches!(
            decide(91.0, 100_000),
            Err(EngineError::DiskThrottled { .. })
        ));
        assert!(matches!(decide(95.0, 1), Err(EngineError::DiskFull { .. })));
        assert!(matches!(decide(96.0, 1), Err(EngineError::DiskFull { .. })));
        let low = DiskThresholds {
            warn_percent: 10.0,
            throttle_percent: 20.0,
            full_percent: 30.0,
            large_write_bytes: 10,
        };
        assert!(low.decide(15.0, 1 << 20).is_ok());
        assert!(matches!(
            low.decide(25.0, 11),
            Err(EngineError::DiskThrottled { limit: 10, .. })
        ));
        assert!(matches!(
            low.decide(30.0, 1),
            Err(EngineError::DiskFull { .. })
        ));
    }

    #[test]
    fn reads_real_usage() {
        use crate::engine::vfs::{RealVfs, Vfs};
        let p = RealVfs.usage_percent(Path::new("/")).expect("statvfs /");
        assert!((0.0..=100.0).contains(&p));
    }
}
