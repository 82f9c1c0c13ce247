//! Executes compaction tasks: merges the input tables, keeps each key's winner, drops
//! tombstones older than gc_grace when the output is bottommost (and, for a range drop, every
//! record in the dropped hash ranges), writes size-bounded output tables at the [`super::pace`]
//! the commit log allows, then installs the result atomically (manifest first, then the
//! in-memory state) and deletes the inputs once no reader holds them
//! ([`crate::engine::obsolete`]). A table nothing overlaps in the next level moves there
//! instead (a manifest edit, no rewrite). Reads and writes never wait for it: readers hold
//! their own snapshot, and the state swap is one pointer store.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::engine::error::Result;
use crate::engine::iterators::{MergeIter, Source};
use crate::engine::levels::LevelEdit;
use crate::engine::sstable::{SsTable, TableBuilder, TableIter, TableMeta, table_file_name};
use crate::engine::types::{RangeDrop, Record};
use crate::engine::write::tree_entry;
use crate::engine::{Core, LevelCompactions, State, io_err};

use super::busy::Busy;
use super::policy::{self, CompactionTask};

/// How often a compaction checks its pace.
const THROTTLE_STEP: u64 = 1 << 20;

/// A key's winner that a compaction left out: what the range trees need to take it out.
struct Removed {
    ikey: Vec<u8>,
    tenant: String,
    ring_hash: u64,
    entry: u64,
}

impl Removed {
    fn of(ikey: Vec<u8>, record: &Record) -> Self {
        Self {
            entry: tree_entry(&ikey, record),
            ikey,
            tenant: record.tenant.clone(),
            ring_hash: record.ring_hash,
        }
    }
}

impl Core {
    /// Runs one compaction (the policy's pick, or a major one with `full`). Returns whether
    /// there was anything to do.
    pub(crate) fn compact_once(&self, full: bool) -> Result<bool> {
        let _compacting = self.compaction_lock.lock();
        let (task, _marked) = {
            let manifest = self.manifest.lock();
            let mut ingests = self.ingests.lock();
            let task = if full {
                policy::full(&manifest.levels)
            } else {
                let ingested = ingests.state(self.options.ingest_quiet);
                policy::pick(&manifest.levels, &self.options.levels, ingested)
            };
            let Some(task) = task else {
                return Ok(false);
            };
            let busy = if task.merges_all {
                // Everything goes to the last level: no ingest goes above it meanwhile, and
                // nothing stacked is left once it installs.
                let had_stacked = ingests.merging_all();
                if had_stacked && !full {
                    tracing::info!(
                        tables = task.inputs.len() + task.overlapping.len(),
                        "ingests stopped: merging the runs they stacked into the last level"
                    );
                }
                Busy::Everything
            } else {
                Busy::of(&task, &manifest.levels)
            };
            (task, self.compaction_output.mark(busy))
        };
        if task.is_move() {
            return self.move_table(&task).map(|()| true);
        }
        self.run_or_quarantine(&task, &[]).map(|_| true)
    }

    /// Sleeps as the pacer says after `bytes` more compaction output: slower while the log's
    /// fsyncs are slow, faster again as level 0 deepens past its merge trigger.
    fn pace(&self, bytes: u64) {
        let l0 = self.snapshot().levels.first().map_or(0, Vec::len);
        let debt = super::pace::debt(l0, self.options.levels.l0_trigger);
        let pressure = self.wal.sync_pressure();
        let wait = match self.pacer.lock().as_mut() {
            Some(pacer) => pacer.wrote(bytes, pressure, debt),
            None => return,
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Moves a task's one table to its output level without rewriting it: the manifest and
    /// the open tables change level, the file stays.
    fn move_table(&self, task: &CompactionTask) -> Result<()> {
        let state = self.snapshot();
        let Some(table) = state
            .levels
            .iter()
            .flatten()
            .find(|t| task.inputs.contains(&t.meta.id))
            .cloned()
        else {
            return Ok(());
        };
        self.install(task, std::slice::from_ref(&table.meta), vec![table.clone()])?;
        self.metrics
            .compaction_moves
            .fetch_add(1, Ordering::Relaxed);
        self.count_level(task.output_level, |level| level.moves += 1);
        Ok(())
    }

    /// Deletes every record some drop covers: rotates the commit log and flushes the memtables
    /// (so the log segments holding them are deleted too: at once, or for a segment that
    /// records replayed from it still point into, by the flush worker once they are gone;
    /// never replayed again either way), then rewrites every table into the deepest level without those records (one major
    /// compaction), and forgets them in the row cache. Atomic: a crash leaves every record or
    /// none of them (the manifest swap), and the log cannot bring them back (they were
    /// flushed first). Records applied while it runs may stay. Returns how many records it
    /// dropped.
    pub(crate) fn drop_ranges(&self, ranges: &[RangeDrop]) -> Result<u64> {
        self.check_open()?;
        // The log segment holding the records is released by the flush, not kept until full.
        self.wal.rotate_now()?;
        self.freeze(true);
        // Ends by releasing every segment at or below the flushed sequence, also when nothing
        // was left to flush; a released segment kept as a spare still holds the dropped
        // records until written over, so the spares go too.
        self.flush_pending()?;
        self.wal.discard_spares()?;
        let _compacting = self.compaction_lock.lock();
        let (levels, _marked) = {
            let manifest = self.manifest.lock();
            let marked = self.compaction_output.mark(Busy::Everything);
            (manifest.levels.clone(), marked)
        };
        let dropped = match policy::full(&levels) {
            Some(task) => self.run_or_quarantine(&task, ranges)?,
            None => 0,
        };
        self.forget_cached(ranges);
        Ok(dropped)
    }

    /// Runs `task`; damage found on the way quarantines the damaged inputs.
    fn run_or_quarantine(&self, task: &CompactionTask, dropping: &[RangeDrop]) -> Result<u64> {
        match self.run_task(task, dropping) {
            Ok(dropped) => Ok(dropped),
            Err(e) if e.is_corruption() => {
                let state = self.snapshot();
                let inputs: Vec<Arc<SsTable>> = state
                    .levels
                    .iter()
                    .flatten()
                    .filter(|t| {
                        task.inputs.contains(&t.meta.id) || task.overlapping.contains(&t.meta.id)
                    })
                    .cloned()
                    .collect();
                self.quarantine_damaged(&inputs);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Merges the task's tables into its output level, leaving out tombstones past gc_grace
    /// (bottommost only) and records in `dropping`; returns how many it left out of the latter.
    fn run_task(&self, task: &CompactionTask, dropping: &[RangeDrop]) -> Result<u64> {
        let state = self.snapshot();
        let chosen: Vec<Arc<SsTable>> = state
            .levels
            .iter()
            .flatten()
            .filter(|t| task.inputs.contains(&t.meta.id) || task.overlapping.contains(&t.meta.id))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        let sources: Vec<Source> = chosen
            .iter()
            .map(|t| Box::new(TableIter::new(t.clone(), &[])) as Source)
            .collect();
        let gc_before =
            crate::wallclock::now_ms().saturating_sub(self.options.gc_grace.as_millis() as u64);
        let mut written = 0u64;
        let mut paced = 0u64;
        let mut outputs: Vec<TableMeta> = Vec::new();
        let mut builder: Option<TableBuilder> = None;
        let mut dropped = 0u64;
        // Winners left out, for the range trees (their entries only: never the values).
        let mut removed: Vec<Removed> = Vec::new();
        for item in MergeIter::new(sources) {
            let (ikey, record) = item?;
            if dropping
                .iter()
                .any(|d| d.covers(&record.tenant, record.ring_hash))
            {
                dropped += 1;
                removed.push(Removed::of(ikey, &record));
                continue;
            }
            if task.bottommost && self.may_purge(&record, gc_before) {
                let counter = if record.is_tombstone() {
                    &self.metrics.tombstones_dropped
                } else {
                    &self.metrics.expired_dropped
                };
                counter.fetch_add(1, Ordering::Relaxed);
                removed.push(Removed::of(ikey, &record));
                continue;
            }
            if builder.is_none() {
                builder = Some(self.new_table()?.2);
            }
            if let Some(b) = builder.as_mut() {
                b.add(&ikey, &record)?;
                let so_far = written + b.estimated_size();
                if so_far >= paced + THROTTLE_STEP {
                    // Paced every THROTTLE_STEP, not per output table: a table written at
                    // full speed and then a long sleep is a burst the foreground feels.
                    self.pace(so_far - paced);
                    paced = so_far;
                }
                if b.estimated_size() >= self.options.table_bytes {
                    if let Some(done) = builder.take() {
                        let meta = done.finish()?;
                        written += meta.file_bytes;
                        self.count_written(meta.file_bytes);
                        outputs.push(meta);
                    }
                }
            }
        }
        if let Some(done) = builder.take() {
            let meta = done.finish()?;
            self.count_written(meta.file_bytes);
            outputs.push(meta);
        }
        let vfs = &*self.options.vfs;
        vfs.sync_dir(&self.sst_dir)
            .map_err(|e| io_err("fsync", &self.sst_dir, e))?;
        let mut opened = Vec::with_capacity(outputs.len());
        for meta in &outputs {
            opened.push(SsTable::open(
                vfs,
                &self.sst_dir.join(table_file_name(meta.id)),
                meta.id,
            )?);
        }
        if removed.is_empty() {
            self.install(task, &outputs, opened)?;
        } else {
            self.install_removing(task, &outputs, opened, &removed)?;
        }
        self.metrics.compactions.fetch_add(1, Ordering::Relaxed);
        let read = |ids: &[u64]| -> u64 {
            chosen
                .iter()
                .filter(|t| ids.contains(&t.meta.id))
                .map(|t| t.meta.file_bytes)
                .sum()
        };
        let (upper, lower) = (read(&task.inputs), read(&task.overlapping));
        let written: u64 = outputs.iter().map(|t| t.file_bytes).sum();
        self.count_level(task.output_level, |level| {
            level.merges += 1;
            level.input_tables += task.inputs.len() as u64;
            level.read_upper_bytes += upper;
            level.read_lower_bytes += lower;
            level.written_bytes += written;
        });
        self.obsolete.add(chosen);
        drop(state);
        self.obsolete.delete_unread(vfs)?;
        Ok(dropped)
    }

    /// Whether a tombstone or an expired value may be purged: it stood for "no value"
    /// (deleted, or expired) since before `gc_before` (now − gc_grace), and the gate (if any)
    /// agrees that every replica holds its version (a repair of its range after it was
    /// written), so no replica still holding an older value can bring it back.
    pub(crate) fn may_purge(&self, record: &Record, gc_before: u64) -> bool {
        let Some(gone_since) = record.purge_after_ms() else {
            return false;
        };
        let written = record.version.timestamp_ms();
        gone_since < gc_before
            && self
                .options
                .tombstone_gate
                .as_ref()
                .is_none_or(|g| g.may_purge(&record.tenant, record.ring_hash, written))
    }

    /// Counts an output table as it is finished, so a long compaction shows its progress.
    fn count_written(&self, bytes: u64) {
        self.metrics
            .compaction_bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds one compaction into `level` to the per-level counters.
    fn count_level(&self, level: usize, add: impl FnOnce(&mut LevelCompactions)) {
        let mut levels = self.metrics.compaction_levels.lock();
        if levels.len() <= level {
            levels.resize(level + 1, LevelCompactions::default());
        }
        if let Some(counters) = levels.get_mut(level) {
            add(counters);
        }
    }

    /// Installs a result that left out some keys' winners, and takes those out of the range
    /// trees, with every stripe lock held: no write can fall between the install and the
    /// trees' update. A key whose winner is now another version (applied while the task
    /// ran, which replaced the removed entry then) keeps its entry. The row cache forgets the
    /// removed records and every stripe's generation moves, so no reader puts one back.
    fn install_removing(
        &self,
        task: &CompactionTask,
        outputs: &[TableMeta],
        opened: Vec<Arc<SsTable>>,
        removed: &[Removed],
    ) -> Result<()> {
        let _all = self.lock_all_stripes();
        self.install(task, outputs, opened)?;
        for r in removed {
            let replaced = match self.current(&r.ikey) {
                Ok(None) => false,
                Ok(Some(now)) => tree_entry(&r.ikey, &now) != r.entry,
                Err(e) => {
                    // The trees are rebuilt at the next open; the repair treats this key's
                    // segment as different until then.
                    tracing::warn!(error = %e, "range trees: a removed key could not be looked up");
                    true
                }
            };
            if !replaced {
                self.trees.toggle(&r.tenant, r.ring_hash, r.entry);
                self.cache.remove(&r.ikey);
            }
        }
        for stripe in self.stripes.iter() {
            stripe.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn install(
        &self,
        task: &CompactionTask,
        outputs: &[TableMeta],
        opened: Vec<Arc<SsTable>>,
    ) -> Result<()> {
        let mut manifest = self.manifest.lock();
        let edit = LevelEdit {
            removed: task
                .inputs
                .iter()
                .chain(&task.overlapping)
                .copied()
                .collect(),
            level: task.output_level,
        };
        let mut next = manifest.clone();
        edit.apply(&mut next.levels, outputs.to_vec());
        next.store(&*self.options.vfs, &self.dir)?;
        {
            let mut state = self.state.write();
            let mut s: State = (**state).clone();
            edit.apply(&mut s.levels, opened);
            *state = Arc::new(s);
        }
        *manifest = next;
        Ok(())
    }
}
