//! Flushing: freeze the active memtable, write frozen ones to L0 oldest first (the manifest
//! records the flushed sequence, then the log drops the segments below it), and the workers
//! that flush and compact in the background.

use std::path::PathBuf;

use super::memtable::flush_size;
use super::{
    Arc, Core, Duration, LevelEdit, Memtable, Mutex, Ordering, Result, SsTable, io_err, mpsc,
    sstable, table_file_name,
};

impl Core {
    pub(super) fn signal(&self, slot: &Mutex<Option<mpsc::Sender<()>>>) {
        if let Some(tx) = slot.lock().as_ref() {
            let _ = tx.send(());
        }
    }

    /// Swaps in a fresh active memtable. Unless `force`, only when the active one is still
    /// over the limit (several writers may race to freeze).
    pub(super) fn freeze(&self, force: bool) {
        {
            let mut state = self.state.write();
            if state.active.is_empty() || !(force || state.active.is_full()) {
                return;
            }
            let mut next = (**state).clone();
            next.immutables.insert(0, next.active.clone());
            next.active = Arc::new(Memtable::new(flush_size(self.options.memtable_bytes)));
            *state = Arc::new(next);
        }
        self.signal(&self.flush_signal);
    }

    /// Writes every frozen memtable to L0, oldest first, then releases the log segments whose
    /// records are all flushed (also when there was nothing to flush: a sealed segment left
    /// after a rotation, or one that replayed records kept until they were gone).
    pub(super) fn flush_pending(&self) -> Result<()> {
        let _flushing = self.flush_lock.lock();
        loop {
            let Some(oldest) = self.snapshot().immutables.last().cloned() else {
                let flushed_seq = self.manifest.lock().flushed_seq;
                self.wal.release_up_to(flushed_seq)?;
                return Ok(());
            };
            self.flush_memtable(&oldest)?;
            self.stall.notify_all();
        }
    }

    pub(super) fn allocate_table_id(&self) -> u64 {
        let mut m = self.manifest.lock();
        let id = m.next_table_id;
        m.next_table_id += 1;
        id
    }

    /// A builder for a new table under a fresh id, in the configured format; its path.
    pub(super) fn new_table(&self) -> Result<(u64, PathBuf, sstable::TableBuilder)> {
        let id = self.allocate_table_id();
        let path = self.sst_dir.join(table_file_name(id));
        let builder = sstable::TableBuilder::create(
            &*self.options.vfs,
            &path,
            id,
            self.options.block_bytes,
            self.options.table_format,
            self.options.direct_table_writes,
        )?;
        Ok((id, path, builder))
    }

    pub(super) fn flush_memtable(&self, memtable: &Arc<Memtable>) -> Result<()> {
        let (id, path, mut builder) = self.new_table()?;
        let vfs = &*self.options.vfs;
        for (ikey, record) in memtable.iter() {
            builder.add(&ikey, &record)?;
        }
        let table = if builder.is_empty() {
            drop(builder);
            vfs.remove(&path).map_err(|e| io_err("remove", &path, e))?;
            None
        } else {
            let meta = builder.finish()?;
            self.metrics
                .flush_bytes_written
                .fetch_add(meta.file_bytes, Ordering::Relaxed);
            vfs.sync_dir(&self.sst_dir)
                .map_err(|e| io_err("fsync", &self.sst_dir, e))?;
            Some((meta.clone(), SsTable::open(vfs, &path, id)?))
        };
        let flushed_seq = {
            let mut manifest = self.manifest.lock();
            let mut next = manifest.clone();
            next.flushed_seq = next.flushed_seq.max(memtable.max_seq());
            let (meta, opened) = table.map(|(m, t)| (vec![m], vec![t])).unwrap_or_default();
            let edit = LevelEdit::default(); // into L0, newest first
            edit.apply(&mut next.levels, meta);
            next.store(&*self.options.vfs, &self.dir)?;
            {
                let mut state = self.state.write();
                let mut s = (**state).clone();
                s.immutables.retain(|m| !Arc::ptr_eq(m, memtable));
                edit.apply(&mut s.levels, opened);
                *state = Arc::new(s);
            }
            let seq = next.flushed_seq;
            *manifest = next;
            seq
        };
        self.wal.release_up_to(flushed_seq)?;
        self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        self.signal(&self.compaction_signal);
        Ok(())
    }

    pub(super) fn worker_loop(self: Arc<Self>, rx: mpsc::Receiver<()>, is_flush: bool) {
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let result = if is_flush {
                self.flush_pending()
            } else {
                loop {
                    match self.compact_once(false) {
                        Ok(true) if !self.closed.load(Ordering::Acquire) => continue,
                        Ok(_) => break self.obsolete.delete_unread(&*self.options.vfs),
                        Err(e) => break Err(e),
                    }
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, worker = if is_flush { "flush" } else { "compaction" }, "engine background work failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
