//! Snapshots of an engine, and restoring an engine from one (backups).
//!
//! A snapshot is a directory holding a copy of the manifest and a hard link to every table it
//! lists (`<dest>/MANIFEST`, `<dest>/MANIFEST.mirror`, `<dest>/sst/<id>.sst`): nothing is
//! copied, so taking one costs a flush and a link per table, and it shares disk space with the
//! live tables until compaction replaces them.
//!
//! # Invariants
//! - A snapshot holds every record acknowledged before [`Engine::snapshot`] was called: the
//!   memtables are flushed first, then the tables are linked under the manifest lock. Tables
//!   leave the manifest before their files are removed (flush, compaction, range drops), so
//!   every file the manifest lists exists while the lock is held.
//! - Tables are never written after they are finished (and table files are created
//!   exclusively), so a link is a frozen copy; compaction later removes only its own name.
//! - A snapshot is complete once its manifest exists: the tables are linked and their
//!   directory fsynced first, the manifest stored last (atomically). [`restore`] refuses a
//!   directory without one (the debris of a crash while taking it).
//! - [`restore`] replaces an engine directory's tables, manifest and commit log with the
//!   snapshot's. It writes the marker `RESTORING` first and removes it last, and
//!   [`Engine::open`] refuses a directory that has the marker, so an interrupted restore
//!   never opens as a half-empty engine; running the restore again finishes it.

use std::path::Path;

use super::error::{EngineError, Result};
use super::manifest::{self, Manifest};
use super::sstable::{SsTable, table_file_name};
use super::vfs::Vfs;
use super::{Engine, io_err};

/// The marker of a restore in progress (see the module doc).
pub const RESTORING: &str = "RESTORING";

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotTables {
    pub tables: usize,
    /// Sum of the table file sizes.
    pub bytes: u64,
    /// Records in the tables (overcounts keys present in several tables).
    pub entries: u64,
}

impl SnapshotTables {
    fn of(manifest: &Manifest) -> Self {
        let tables = manifest.levels.iter().flatten();
        SnapshotTables {
            tables: tables.clone().count(),
            bytes: tables.clone().map(|t| t.file_bytes).sum(),
            entries: tables.map(|t| t.entries).sum(),
        }
    }
}

impl Engine {
    /// Takes a snapshot into `dest`, which must not exist (its parent must).
    pub fn snapshot(&self, dest: &Path) -> Result<SnapshotTables> {
        self.core.check_open()?;
        let vfs = &*self.core.options.vfs;
        if vfs.exists(dest) {
            return Err(EngineError::InvalidArgument(format!(
                "{} exists",
                dest.display()
            )));
        }
        self.flush()?;
        let sst = dest.join("sst");
        vfs.create_dir_all(&sst)
            .map_err(|e| io_err("create", &sst, e))?;
        let manifest = self.core.manifest.lock();
        for id in manifest.live_ids() {
            let name = table_file_name(id);
            let from = self.core.sst_dir.join(&name);
            vfs.hard_link(&from, &sst.join(&name))
                .map_err(|e| io_err("link", &from, e))?;
        }
        vfs.sync_dir(&sst).map_err(|e| io_err("fsync", &sst, e))?;
        manifest.store(vfs, dest)?;
        if let Some(parent) = dest.parent() {
            vfs.sync_dir(parent)
                .map_err(|e| io_err("fsync", parent, e))?;
        }
        Ok(SnapshotTables::of(&manifest))
    }
}

/// Checks a snapshot directory: an intact manifest and every table it lists, readable.
pub fn verify_snapshot(vfs: &dyn Vfs, snapshot: &Path) -> Result<SnapshotTables> {
    let manifest = load_snapshot_manifest(vfs, snapshot)?;
    for id in manifest.live_ids() {
        SsTable::open(vfs, &snapshot.join("sst").join(table_file_name(id)), id)?;
    }
    Ok(SnapshotTables::of(&manifest))
}

fn load_snapshot_manifest(vfs: &dyn Vfs, snapshot: &Path) -> Result<Manifest> {
    Manifest::load(vfs, snapshot)?
        .manifest
        .ok_or_else(|| EngineError::Corrupted {
            path: Manifest::path(snapshot),
            offset: 0,
            reason: "the snapshot has no manifest (it was never completed)".to_owned(),
        })
}

/// Replaces the engine in `dir` (not open) with the snapshot in `snapshot`: its tables and
/// manifest; the commit log is emptied. Idempotent, and safe to run again after a crash.
pub fn restore(vfs: &dyn Vfs, snapshot: &Path, dir: &Path) -> Result<SnapshotTables> {
    let what = verify_snapshot(vfs, snapshot)?;
    let manifest = load_snapshot_manifest(vfs, snapshot)?;
    let sst_dir = dir.join("sst");
    let wal_dir = dir.join("wal");
    for d in [dir, &sst_dir, &wal_dir] {
        vfs.create_dir_all(d).map_err(|e| io_err("create", d, e))?;
    }
    let marker = dir.join(RESTORING);
    let file = vfs
        .create(&marker, false)
        .map_err(|e| io_err("create", &marker, e))?;
    file.write_at(snapshot.to_string_lossy().as_bytes(), 0)
        .map_err(|e| io_err("write", &marker, e))?;
    file.sync_all().map_err(|e| io_err("fsync", &marker, e))?;
    vfs.sync_dir(dir).map_err(|e| io_err("fsync", dir, e))?;

    // The old state goes: manifest copies, log segments, tables.
    for name in [manifest::FILE_NAME, manifest::MIRROR_NAME] {
        let path = dir.join(name);
        if vfs.exists(&path) {
            vfs.remove(&path).map_err(|e| io_err("remove", &path, e))?;
        }
    }
    vfs.sync_dir(dir).map_err(|e| io_err("fsync", dir, e))?;
    for d in [&wal_dir, &sst_dir] {
        for path in vfs.list(d).map_err(|e| io_err("list", d, e))? {
            vfs.remove(&path).map_err(|e| io_err("remove", &path, e))?;
        }
        vfs.sync_dir(d).map_err(|e| io_err("fsync", d, e))?;
    }
    // The snapshot's state comes in: tables first, the manifest that lists them last.
    for id in manifest.live_ids() {
        let name = table_file_name(id);
        link_or_copy(vfs, &snapshot.join("sst").join(&name), &sst_dir.join(&name))?;
    }
    vfs.sync_dir(&sst_dir)
        .map_err(|e| io_err("fsync", &sst_dir, e))?;
    manifest.store(vfs, dir)?;
    vfs.remove(&marker)
        .map_err(|e| io_err("remove", &marker, e))?;
    vfs.sync_dir(dir).map_err(|e| io_err("fsync", dir, e))?;
    Ok(what)
}

/// A hard link of `from` at `to`, or a copy when they are on different file systems (a
/// snapshot brought back from elsewhere).
fn link_or_copy(vfs: &dyn Vfs, from: &Path, to: &Path) -> Result<()> {
    match vfs.hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let bytes = vfs.read(from).map_err(|e| io_err("read", from, e))?;
            let file = vfs.create(to, true).map_err(|e| io_err("create", to, e))?;
            file.write_at(&bytes, 0)
                .map_err(|e| io_err("write", to, e))?;
            file.sync_all().map_err(|e| io_err("fsync", to, e))
        }
        Err(e) => Err(io_err("link", from, e)),
    }
}

/// Refuses to open an engine whose restore was interrupted.
pub(super) fn check_not_restoring(vfs: &dyn Vfs, dir: &Path) -> Result<()> {
    let marker = dir.join(RESTORING);
    if !vfs.exists(&marker) {
        return Ok(());
    }
    let from = vfs
        .read(&marker)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Err(EngineError::InvalidArgument(format!(
        "a restore of {} from snapshot {from:?} was interrupted: run `pairdb restore` again \
         to finish it",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vfs::SimVfs;
    use crate::engine::{EngineOptions, Record, SyncMode};
    use crate::vclock::{VectorClock, Version};
    use std::sync::Arc;

    fn version(counter: u64) -> Version {
        Version::new(VectorClock::from_entries([("c1", counter)]))
    }

    fn options(vfs: Arc<dyn Vfs>) -> EngineOptions {
        EngineOptions {
            sync: SyncMode::Always,
            vfs,
            ..EngineOptions::default()
        }
    }

    fn value(engine: &Engine, key: &str) -> Option<Vec<u8>> {
        engine
            .get("t", key.as_bytes())
            .expect("get")
            .filter(|r| !r.is_tombstone())
            .and_then(|r| r.value.as_ref().map(|v| v.to_vec()))
    }

    #[test]
    fn a_restored_engine_holds_what_was_acknowledged_before_the_snapshot_and_nothing_after() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        let snap = root.path().join("snap");
        let vfs = crate::engine::vfs::real();
        {
            let engine = Engine::open(&dir, options(vfs.clone())).expect("open");
            for i in 0..200u64 {
                engine
                    .apply(Record::put("t", format!("k{i}"), version(1), "before"))
                    .expect("put");
                if i == 100 {
                    engine.flush().expect("flush");
                }
            }
            let taken = engine.snapshot(&snap).expect("snapshot");
            assert_eq!(taken.tables, 2, "two flushes, two tables: {taken:?}");
            assert!(
                matches!(engine.snapshot(&snap), Err(EngineError::InvalidArgument(_))),
                "a snapshot never overwrites another"
            );
            // After the snapshot: overwrites, new keys, a delete, and a compaction that
            // removes the tables the snapshot links.
            for i in 0..50u64 {
                engine
                    .apply(Record::put("t", format!("k{i}"), version(2), "after"))
                    .expect("overwrite");
            }
            engine
                .apply(Record::put("t", "new", version(1), "after"))
                .expect("put new");
            engine
                .apply(Record::tombstone("t", "k150", version(2)))
                .expect("delete");
            engine.flush().expect("flush");
            engine.compact().expect("compact");
            assert_eq!(value(&engine, "k0").as_deref(), Some(&b"after"[..]));
        }
        verify_snapshot(&*vfs, &snap).expect("the snapshot survives the compaction");
        restore(&*vfs, &snap, &dir).expect("restore");
        let engine = Engine::open(&dir, options(vfs.clone())).expect("open the restored engine");
        for i in 0..200u64 {
            assert_eq!(
                value(&engine, &format!("k{i}")).as_deref(),
                Some(&b"before"[..]),
                "k{i}"
            );
        }
        assert_eq!(value(&engine, "new"), None, "written after the snapshot");
        // The restored engine takes writes that survive a reopen (the log starts above the
        // snapshot's flushed sequence).
        engine
            .apply(Record::put("t", "k0", version(3), "later"))
            .expect("put");
        drop(engine);
        let engine = Engine::open(&dir, options(vfs)).expect("reopen");
        assert_eq!(value(&engine, "k0").as_deref(), Some(&b"later"[..]));
    }

    #[test]
    fn an_interrupted_restore_refuses_to_open_until_it_is_run_again() {
        let vfs = SimVfs::new();
        let shared: Arc<dyn Vfs> = Arc::new(vfs.clone());
        let dir = Path::new("/data");
        let snap = Path::new("/snap");
        {
            let engine = Engine::open(dir, options(shared.clone())).expect("open");
            for i in 0..20u64 {
                engine
                    .apply(Record::put("t", format!("k{i}"), version(1), "v"))
                    .expect("put");
            }
            engine.snapshot(snap).expect("snapshot");
            engine.close().expect("close");
        }
        // Crash the restore at every step it takes; the engine either opens with every key
        // (the restore finished, or had not begun removing anything) or refuses to open.
        let base = vfs.process_crash();
        let start = vfs.operations();
        restore(&*shared, snap, dir).expect("a full restore");
        let steps = vfs.operations() - start;
        assert!(steps > 10, "the restore took {steps} steps");
        for crash_at in 0..steps {
            let attempt = base.process_crash();
            attempt.crash_at(attempt.operations() + crash_at);
            let on_attempt: Arc<dyn Vfs> = Arc::new(attempt.clone());
            assert!(restore(&*on_attempt, snap, dir).is_err(), "step {crash_at}");
            let after: Arc<dyn Vfs> = Arc::new(attempt.power_loss(crash_at));
            match Engine::open(dir, options(after.clone())) {
                Ok(engine) => {
                    for i in 0..20u64 {
                        assert!(
                            value(&engine, &format!("k{i}")).is_some(),
                            "step {crash_at}"
                        );
                    }
                }
                Err(EngineError::InvalidArgument(why)) => {
                    assert!(why.contains("interrupted"), "{why}");
                    restore(&*after, snap, dir).expect("run the restore again");
                    let engine = Engine::open(dir, options(after)).expect("open");
                    for i in 0..20u64 {
                        assert!(
                            value(&engine, &format!("k{i}")).is_some(),
                            "step {crash_at}"
                        );
                    }
                }
                Err(e) => panic!("step {crash_at}: {e}"),
            }
        }
    }
}
