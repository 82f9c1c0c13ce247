//! Data directory locking: one process per data directory. The lock is an exclusive `flock` on
//! `<data-dir>/LOCK`, released by the kernel when the process dies (also on `kill -9`).

use std::fs::{self, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Holds the lock while alive.
pub struct DataDirLock {
    _lock: Flock<fs::File>,
}

pub fn lock(dir: &Path) -> anyhow::Result<DataDirLock> {
    fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "data dir {} is locked by another pairdb process ({errno})",
            dir.display()
        )
    })?;
    Ok(DataDirLock { _lock: lock })
}
