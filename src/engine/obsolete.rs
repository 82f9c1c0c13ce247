//! Tables a compaction replaced, on their way out.
//!
//! A replaced table leaves the manifest (durably) and the in-memory state first; readers that
//! took their snapshot of the state before still read it, so its file is deleted only once
//! nothing else holds the table, by the compaction thread. Before, the file was unlinked at
//! once and its blocks were freed by whichever thread dropped the last reference, sometimes a
//! reader (the last unmap of an unlinked 64 MiB file takes 11 ms on the benchmark machine).
//! The file is cut from its end in steps before it is unlinked ([`vfs::remove_in_steps`]):
//! on a disk mounted with `discard`, one large free holds the device queue (measured for a
//! 256 MiB file; for tables of at most 64 MiB the log's fsyncs were not measurably slower, so
//! the steps are insurance, docs/benchmarks.md "Round 3, step 10").
//!
//! # Invariants
//! - A table here is in neither the manifest nor the state, so no new reader and no new
//!   snapshot (which links what the manifest lists, under its lock) can reach it. When this
//!   list holds its only reference, nothing maps it and nothing can map it again.
//! - A file with another name (a snapshot's hard link) is only unlinked, never cut.
//! - A crash at any point leaves at most a shortened file under a name the manifest does not
//!   list, which the next open removes without reading it (`open::remove_orphans`); so does a
//!   failed deletion, and a table a reader still held when the engine closed.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::Result;
use super::io_err;
use super::sstable::SsTable;
use super::vfs::{self, Vfs};

/// Replaced tables not yet deleted.
#[derive(Default)]
pub(crate) struct ObsoleteTables {
    tables: Mutex<Vec<Arc<SsTable>>>,
}

impl ObsoleteTables {
    /// Takes tables that just left the manifest and the state.
    pub fn add(&self, tables: impl IntoIterator<Item = Arc<SsTable>>) {
        self.tables.lock().extend(tables);
    }

    /// Tables waiting for their last reader.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.tables.lock().len()
    }

    /// Deletes the files of the tables no reader holds any more; the others wait for the next
    /// call. Every deletion is tried; the first error is returned (that file stays until the
    /// next open removes it).
    pub fn delete_unread(&self, vfs: &dyn Vfs) -> Result<()> {
        let unread: Vec<(PathBuf, u64)> = {
            let mut tables = self.tables.lock();
            let (unread, read): (Vec<_>, Vec<_>) = std::mem::take(&mut *tables)
                .into_iter()
                .partition(|t| Arc::strong_count(t) == 1);
            *tables = read;
            // Dropping the tables here unmaps their files.
            unread
                .into_iter()
                .map(|t| (t.path().to_path_buf(), t.meta.file_bytes))
                .collect()
        };
        let mut first_error = None;
        for (path, bytes) in unread {
            let deleted = match vfs.link_count(&path) {
                Ok(1) => vfs::remove_in_steps(vfs, &path, bytes),
                Ok(_) => vfs.remove(&path),
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                tracing::warn!(path = %path.display(), error = %e, "deleting a replaced table failed; the next open removes it");
                first_error.get_or_insert(io_err("remove compacted", &path, e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::vfs::DELETE_STEP;
    use crate::engine::vfs::recording::RecordingVfs;
    use crate::engine::{Engine, EngineOptions, Record, snapshot};
    use crate::vclock::{VectorClock, Version};

    const KEYS: u32 = 12_000;

    /// An engine on a recording file system holding two level-0 tables of about 12 MiB (more
    /// than one deletion step) with the same keys, and the tables' paths.
    fn two_big_tables(dir: &Path) -> (Engine, Arc<RecordingVfs>, Vec<PathBuf>) {
        let recording = Arc::new(RecordingVfs::default());
        let options = EngineOptions {
            vfs: recording.clone(),
            memtable_bytes: 64 << 20,
            ..EngineOptions::default()
        };
        let engine = Engine::open(dir, options).expect("open");
        for round in 1..=2u64 {
            for i in 0..KEYS {
                let version = Version::new(VectorClock::from_entries([("c1", round)]));
                let value = vec![round as u8; 1024];
                let record = Record::put("t", i.to_be_bytes().to_vec(), version, value);
                engine.apply(record).expect("apply");
            }
            engine.flush().expect("flush");
        }
        let tables: Vec<PathBuf> = engine
            .core
            .snapshot()
            .levels
            .iter()
            .flatten()
            .map(|t| t.path().to_path_buf())
            .collect();
        assert_eq!(tables.len(), 2, "two flushed tables");
        for path in &tables {
            let bytes = std::fs::metadata(path).expect("table").len();
            assert!(bytes > DELETE_STEP, "{bytes} bytes: the test needs steps");
        }
        (engine, recording, tables)
    }

    /// The lengths `paths` were cut to, in order.
    fn cuts_of(recording: &RecordingVfs, paths: &[PathBuf]) -> Vec<u64> {
        let cuts = recording.truncations.lock();
        cuts.iter()
            .filter(|(p, _)| paths.contains(p))
            .map(|(_, len)| *len)
            .collect()
    }

    fn every_key_reads_the_second_round(engine: &Engine) {
        for i in (0..KEYS).step_by(97) {
            let read = engine.get("t", &i.to_be_bytes()).expect("get");
            assert_eq!(
                read.and_then(|r| r.value.clone()).as_deref(),
                Some(&[2u8; 1024][..]),
                "key {i}"
            );
        }
    }

    /// A reader that took its view before a compaction keeps reading the replaced tables:
    /// their files stay until it lets go, and are then cut in steps and unlinked.
    #[test]
    fn replaced_tables_are_deleted_in_steps_once_no_reader_holds_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, recording, replaced) = two_big_tables(dir.path());
        let reader = engine.core.snapshot();
        engine.compact().expect("compact");
        assert_eq!(engine.core.obsolete.waiting(), 2);
        for path in &replaced {
            assert!(
                path.exists(),
                "{} went while a reader holds it",
                path.display()
            );
        }
        assert!(
            cuts_of(&recording, &replaced).is_empty(),
            "nothing is cut while read"
        );
        let held: usize = reader.levels.iter().map(Vec::len).sum();
        assert_eq!(held, 2, "the reader still sees the replaced tables");
        drop(reader);
        let vfs = &*engine.core.options.vfs;
        engine.core.obsolete.delete_unread(vfs).expect("delete");
        assert_eq!(engine.core.obsolete.waiting(), 0);
        for path in &replaced {
            assert!(!path.exists(), "{} was not deleted", path.display());
            let lens = cuts_of(&recording, std::slice::from_ref(path));
            assert!(!lens.is_empty(), "{} was not cut first", path.display());
            assert!(lens.windows(2).all(|w| w[0] - w[1] == DELETE_STEP));
        }
        every_key_reads_the_second_round(&engine);
    }

    /// A crash in the middle of the cuts leaves a replaced table shortened under its name,
    /// which the manifest no longer lists: the next open removes it without reading it (a
    /// shortened table would read as corruption), and every key still reads back.
    #[test]
    fn a_replaced_table_a_crash_left_cut_short_is_removed_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, _recording, replaced) = two_big_tables(dir.path());
        let kept: Vec<Vec<u8>> = replaced
            .iter()
            .map(|p| std::fs::read(p).expect("table"))
            .collect();
        engine.compact().expect("compact");
        engine.close().expect("close");
        drop(engine);
        // What a crash after the first cut of each leaves behind.
        for (path, bytes) in replaced.iter().zip(&kept) {
            assert!(!path.exists());
            let cut = bytes.len() - DELETE_STEP as usize;
            std::fs::write(path, &bytes[..cut]).expect("write the shortened table");
        }
        let engine = Engine::open(dir.path(), EngineOptions::default()).expect("reopen");
        for path in &replaced {
            assert!(!path.exists(), "{} was left behind", path.display());
        }
        every_key_reads_the_second_round(&engine);
    }

    /// A snapshot hard-links the tables it holds; cutting a replaced table would cut the
    /// snapshot's copy, so a table with another name is only unlinked.
    #[test]
    fn a_replaced_table_a_snapshot_links_is_unlinked_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, recording, replaced) = two_big_tables(&dir.path().join("engine"));
        let taken = dir.path().join("snapshot");
        engine.snapshot(&taken).expect("snapshot");
        engine.compact().expect("compact");
        engine
            .core
            .obsolete
            .delete_unread(&*engine.core.options.vfs)
            .expect("delete");
        for path in &replaced {
            assert!(!path.exists(), "{} was not deleted", path.display());
        }
        assert!(
            cuts_of(&recording, &replaced).is_empty(),
            "a linked table was cut"
        );
        engine.close().expect("close");
        let real = vfs::real();
        let held = snapshot::verify_snapshot(&*real, &taken).expect("verify");
        assert_eq!(held.tables, 2);
        let restored = dir.path().join("restored");
        snapshot::restore(&*real, &taken, &restored).expect("restore");
        let engine = Engine::open(&restored, EngineOptions::default()).expect("open restored");
        every_key_reads_the_second_round(&engine);
    }
}
