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

/// The verdict for a write of `bytes` at `percent` disk usage.
pub fn decide(percent: f64, bytes: usize) -> Result<(), EngineError> {
    if percent >= FULL_PERCENT {
        return Err(EngineError::DiskFull { percent });
    }
    if percent >= THROTTLE_PERCENT && bytes > LARGE_WRITE_BYTES {
        return Err(EngineError::DiskThrottled {
            percent,
            limit: LARGE_WRITE_BYTES,
        });
    }
    Ok(())
}

pub struct DiskGuard {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    last: Mutex<(Instant, f64)>,
}

impl DiskGuard {
    pub fn new(vfs: Arc<dyn Vfs>, dir: &Path) -> Self {
        let percent = vfs.usage_percent(dir).unwrap_or(0.0);
        Self {
            vfs,
            dir: dir.to_path_buf(),
            last: Mutex::new((Instant::now(), percent)),
        }
    }

    /// Current usage (refreshed at most once a second).
    pub fn percent(&self) -> f64 {
        let mut last = self.last.lock();
        if last.0.elapsed() >= REFRESH {
            match self.vfs.usage_percent(&self.dir) {
                Ok(p) => {
                    if p >= WARN_PERCENT && last.1 < WARN_PERCENT {
                        tracing::warn!(dir = %self.dir.display(), percent = p, "disk usage above 80%");
                    }
                    *last = (Instant::now(), p);
                }
                Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed"),
            }
        }
        last.1
    }

    pub fn check(&self, bytes: usize) -> Result<(), EngineError> {
        decide(self.percent(), bytes)
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
    }

    #[test]
    fn reads_real_usage() {
        use crate::engine::vfs::{RealVfs, Vfs};
        let p = RealVfs.usage_percent(Path::new("/")).expect("statvfs /");
        assert!((0.0..=100.0).contains(&p));
    }
}
