//! A memory-limited control group for one benchmark child process.
//!
//! cgroup v2 when its root offers the `memory` controller (`memory.max`, `memory.peak`);
//! otherwise the v1 memory hierarchy the machine mounts (`memory.limit_in_bytes`,
//! `memory.max_usage_in_bytes`), as on hosts where systemd is not PID 1 and the memory
//! controller stays bound to v1. Both limits count the page cache the process causes, so data
//! larger than the limit is read from the disk, not from memory.
//!
//! The group is created under the group this process is in, and removed on drop (after its
//! process exited: a group with live members cannot be removed).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct MemoryGroup {
    dir: PathBuf,
    peak_file: &'static str,
}

impl MemoryGroup {
    /// Creates the group `name` with a memory limit of `limit_bytes` (no swap where settable).
    pub fn create(name: &str, limit_bytes: u64) -> Result<Self> {
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2_controllers = std::fs::read_to_string(v2_root.join("cgroup.controllers"));
        if v2_controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
            let parent = v2_root.join(own_group("0::")?);
            let dir = parent.join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            write(&dir.join("memory.max"), limit_bytes)?;
            // Absent when the kernel has no swap accounting; then there is no swap to limit.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            return Ok(Self {
                dir,
                peak_file: "memory.peak",
            });
        }
        let v1_root = Path::new("/sys/fs/cgroup/memory");
        anyhow::ensure!(
            v1_root.join("memory.limit_in_bytes").exists(),
            "no cgroup memory controller (neither v2 nor v1) on this machine"
        );
        let parent = v1_root.join(own_group(":memory:")?);
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        write(&dir.join("memory.limit_in_bytes"), limit_bytes)?;
        let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        Ok(Self {
            dir,
            peak_file: "memory.max_usage_in_bytes",
        })
    }

    /// The file a process writes its own pid into to join the group.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The group's peak memory use (process memory plus page cache), bytes.
    pub fn peak_bytes(&self) -> Result<u64> {
        let path = self.dir.join(self.peak_file);
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        Ok(text.trim().parse()?)
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Moves the calling process into the group whose `cgroup.procs` is `procs_file`.
pub fn join(procs_file: &Path) -> Result<()> {
    std::fs::write(procs_file, std::process::id().to_string())
        .with_context(|| format!("join {}", procs_file.display()))
}

/// This process's group in the hierarchy whose `/proc/self/cgroup` line starts with `prefix`
/// after the hierarchy id, relative (no leading `/`).
fn own_group(prefix: &str) -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|line| {
            let rest = if prefix == "0::" {
                line.strip_prefix("0::")
            } else {
                line.find(prefix).map(|i| &line[i + prefix.len()..])
            }?;
            Some(rest.trim_start_matches('/').to_string())
        })
        .with_context(|| format!("no {prefix} line in /proc/self/cgroup"))
}

fn write(path: &Path, value: u64) -> Result<()> {
    std::fs::write(path, value.to_string()).with_context(|| format!("write {}", path.display()))
}
