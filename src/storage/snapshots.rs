//! Named snapshots of a storage node: `<data-dir>/snapshots/<name>/`, each the engine's
//! snapshot (hard links of the tables plus the manifest, `engine::snapshot`) and a
//! `SNAPSHOT.json` that says whose, when and how big. And `pairdb restore`, which rebuilds a
//! stopped node's data dir from one.
//!
//! # Invariants
//! - A snapshot is built under `snapshots/.partial-<name>` and renamed to its name once
//!   complete (metadata written and fsynced), so every directory with a valid name is a whole
//!   snapshot; `.partial-*` debris of a crash is removed by the next create.
//! - Names are 1..=64 of `[A-Za-z0-9._-]`, not starting with `.`: they never escape the
//!   snapshots directory, and never collide with the debris.
//! - A restore refuses a snapshot older than `gc_grace` unless told otherwise: tombstones
//!   written after it may be purged from every other replica by now, so the values it holds
//!   under them would come back (Cassandra's rule for the same reason).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{self, Engine, EngineError};

pub const DIR: &str = "snapshots";
const META: &str = "SNAPSHOT.json";
const PARTIAL: &str = ".partial-";

/// What a snapshot is (its `SNAPSHOT.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub node_id: String,
    pub created_at_ms: i64,
    pub tables: u64,
    pub bytes: u64,
    pub entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid snapshot name {0:?}: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot")]
    InvalidName(String),
    #[error("snapshot {0:?} exists")]
    Exists(String),
    #[error("no snapshot {0:?}")]
    NotFound(String),
    #[error(
        "snapshot {name:?} is {age_hours} h old, older than gc_grace ({grace_hours} h): values \
         deleted since may come back; pass --allow-older-than-gc-grace to restore it anyway"
    )]
    TooOld {
        name: String,
        age_hours: u64,
        grace_hours: u64,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let context = context.into();
    move |source| SnapshotError::Io { context, source }
}

pub use crate::limits::valid_snapshot_name as valid_name;

fn checked(name: &str) -> Result<&str, SnapshotError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(SnapshotError::InvalidName(name.to_owned()))
    }
}

/// The snapshots of one storage node's data dir.
#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
    node_id: String,
}

impl Snapshots {
    pub fn new(data_dir: &Path, node_id: &str) -> Self {
        Snapshots {
            root: data_dir.join(DIR),
            node_id: node_id.to_owned(),
        }
    }

    /// Takes snapshot `name` of `engine`. Blocking (flush, fsyncs).
    pub fn create(&self, engine: &Engine, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let name = checked(name)?;
        std::fs::create_dir_all(&self.root)
            .map_err(io(format!("create {}", self.root.display())))?;
        let target = self.root.join(name);
        if target.exists() {
            return Err(SnapshotError::Exists(name.to_owned()));
        }
        self.remove_debris()?;
        let partial = self.root.join(format!("{PARTIAL}{name}"));
        let tables = engine.snapshot(&partial)?;
        let info = SnapshotInfo {
            name: name.to_owned(),
            node_id: self.node_id.clone(),
            created_at_ms: crate::wallclock::now_ms() as i64,
            tables: tables.tables as u64,
            bytes: tables.bytes,
            entries: tables.entries,
        };
        write_meta(&partial, &info)?;
        std::fs::rename(&partial, &target).map_err(io(format!("rename {}", partial.display())))?;
        sync_dir(&self.root)?;
        Ok(info)
    }

    /// Every complete snapshot, by name.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("list {}", self.root.display()))(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("list {}", self.root.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_name(&name) {
                found.push(read_meta(&entry.path(), &name)?);
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Deletes snapshot `name`: the links go, the tables stay as long as the engine (or
    /// another snapshot) still uses them.
    pub fn delete(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let name = checked(name)?;
        let dir = self.root.join(name);
        let info = read_meta(&dir, name)?;
        // Out of sight first (a crash leaves debris, never half a snapshot under its name).
        let doomed = self.root.join(format!("{PARTIAL}{name}"));
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed).map_err(io(format!("remove {}", doomed.display())))?;
        }
        std::fs::rename(&dir, &doomed).map_err(io(format!("rename {}", dir.display())))?;
        sync_dir(&self.root)?;
        std::fs::remove_dir_all(&doomed).map_err(io(format!("remove {}", doomed.display())))?;
        Ok(info)
    }

    fn remove_debris(&self) -> Result<(), SnapshotError> {
        let entries =
            std::fs::read_dir(&self.root).map_err(io(format!("list {}", self.root.display())))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(io(format!("remove {}", path.display())))?;
            }
        }
        Ok(())
    }
}

/// The directory of snapshot `spec` for `data_dir`: a path when it has a `/` (a snapshot
/// copied off the node, say), else a name under `<data-dir>/snapshots/`.
pub fn locate(data_dir: &Path, spec: &str) -> Result<PathBuf, SnapshotError> {
    if spec.contains('/') {
        return Ok(PathBuf::from(spec));
    }
    Ok(data_dir.join(DIR).join(checked(spec)?))
}

/// Rebuilds the (stopped) node's data dir from a snapshot: its tables replace the engine's,
/// the commit log is emptied. Everything else in the data dir (snapshots, repair state) stays.
/// Run a repair of the node's ranges afterwards: it holds the data as of the snapshot.
pub fn restore(
    data_dir: &Path,
    snapshot: &Path,
    gc_grace: Duration,
    allow_older_than_gc_grace: bool,
) -> anyhow::Result<SnapshotInfo> {
    let _lock = super::datadir::lock(data_dir)?;
    let name = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let info = read_meta(snapshot, &name)?;
    let age_ms = (crate::wallclock::now_ms() as i64 - info.created_at_ms).max(0) as u64;
    if age_ms > gc_grace.as_millis() as u64 && !allow_older_than_gc_grace {
        return Err(SnapshotError::TooOld {
            name: info.name,
            age_hours: age_ms / 3_600_000,
            grace_hours: gc_grace.as_secs() / 3600,
        }
        .into());
    }
    engine::snapshot::restore(&*engine::vfs::real(), snapshot, data_dir)?;
    Ok(info)
}

fn write_meta(dir: &Path, info: &SnapshotInfo) -> Result<(), SnapshotError> {
    let path = dir.join(META);
    let bytes = serde_json::to_vec_pretty(info)
        .map_err(|e| io("encode snapshot metadata")(std::io::Error::other(e)))?;
    let file = std::fs::File::create(&path).map_err(io(format!("create {}", path.display())))?;
    std::io::Write::write_all(&mut &file, &bytes)
        .map_err(io(format!("write {}", path.display())))?;
    file.sync_all()
        .map_err(io(format!("fsync {}", path.display())))?;
    sync_dir(dir)
}

fn read_meta(dir: &Path, name: &str) -> Result<SnapshotInfo, SnapshotError> {
    let path = dir.join(META);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotFound(name.to_owned()));
        }
        Err(e) => return Err(io(format!("read {}", path.display()))(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        io(format!("parse {}", path.display()))(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e,
        ))
    })
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineOptions, Record};
    use crate::vclock::{VectorClock, Version};

    #[test]
    fn names_never_leave_the_snapshots_directory() {
        for good in ["a", "nightly-2026-12-02", "v1.2_x", &"x".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".partial-a",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn create_list_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path(), EngineOptions::default()).expect("open");
        let version = Version::new(VectorClock::from_entries([("c1", 1)]));
        engine
            .apply(Record::put("t", "k", version, "v"))
            .expect("put");
        let snapshots = Snapshots::new(dir.path(), "s1");
        assert_eq!(snapshots.list().expect("list"), Vec::new());
        let taken = snapshots.create(&engine, "one").expect("create");
        assert_eq!((taken.tables, taken.entries), (1, 1));
        assert!(matches!(
            snapshots.create(&engine, "one"),
            Err(SnapshotError::Exists(_))
        ));
        assert!(matches!(
            snapshots.create(&engine, "../escape"),
            Err(SnapshotError::InvalidName(_))
        ));
        // Debris of a crashed create is neither listed nor in the way.
        std::fs::create_dir_all(dir.path().join(DIR).join(".partial-two")).expect("debris");
        snapshots.create(&engine, "two").expect("create two");
        let names: Vec<String> = snapshots
            .list()
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(snapshots.delete("one").expect("delete").name, "one");
        assert!(matches!(
            snapshots.delete("one"),
            Err(SnapshotError::NotFound(_))
        ));
        assert_eq!(snapshots.list().expect("list").len(), 1);
        // The engine still reads its key: deleting a snapshot removes only links.
        drop(engine);
        let engine = Engine::open(dir.path(), EngineOptions::default()).expect("reopen");
        assert!(engine.get("t", b"k").expect("get").is_some());
    }

    #[test]
    fn a_restore_refuses_a_snapshot_older_than_gc_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        {
            let engine = Engine::open(&data, EngineOptions::default()).expect("open");
            Snapshots::new(&data, "s1")
                .create(&engine, "old")
                .expect("create");
        }
        let snap = data.join(DIR).join("old");
        let meta = snap.join(META);
        let mut info: SnapshotInfo =
            serde_json::from_slice(&std::fs::read(&meta).expect("read")).expect("parse");
        info.created_at_ms -= 2 * 3_600_000;
        std::fs::write(&meta, serde_json::to_vec(&info).expect("encode")).expect("write");
        let grace = Duration::from_secs(3600);
        let refused = restore(&data, &snap, grace, false).expect_err("too old");
        assert!(refused.to_string().contains("gc_grace"), "{refused}");
        restore(&data, &snap, grace, true).expect("allowed");
    }
}
