//! Ingest: a batch of records written straight into one table, not through the commit log,
//! the memtable, a flush and the merges of level 0. What a node that joins receives by
//! streaming is mostly keys it holds nowhere; written the usual way, each streamed byte was
//! written to the log, to a level-0 table and again by every merge on its way down (about
//! five times); ingested, it is written once into the deepest level where nothing overlaps
//! it, and the senders' interleaving runs, one per level, are merged into the last level
//! in one pass once the streams have stopped (docs/engine.md, "Ingest").
//!
//! # Invariants
//! - **An ingested table holds only keys the engine held nowhere when it became visible.**
//!   The keys are looked up and the table written and fsynced without locks (a client write
//!   sharing a stripe does not wait for the disk); then the batch's stripe locks are taken and
//!   stay taken until the table is installed. Each stripe's generation was read before the
//!   look-ups and a write moves it after its record became visible, so the keys of stripes
//!   whose generation moved are looked up again under the lock; if one of them is held now,
//!   the table is deleted and built again under the locks (counted in `ingest_rebuilds`).
//!   A key the engine holds takes the write path instead ([`Core::apply_batch`]: the winner
//!   rule, the log), and so does a key that appears twice in the batch, after the first.
//!   So where the table sits cannot change any read: its keys have no other version, and
//!   later versions of them land above it (the memtable, then L0, then merges that move
//!   data one level down at a time, or every level at once into the last).
//! - **It goes to the deepest level where no table overlaps its key range** and the running
//!   compaction does not write over that range ([`super::compaction::busy`]: a task records
//!   its output level and key range under the manifest lock it was picked under, and an
//!   ingest chooses under the manifest lock it installs with; a major compaction or a range
//!   drop blocks every level); where there is none, at the front of L0 like a flush. So L1..
//!   stay disjoint and sorted.
//! - **Durable before visible.** The table is fsynced, then its directory, then the manifest
//!   that lists it; the call returns after that (and after the log sync of the records that
//!   took the write path). A crash before the manifest leaves an unlisted file that the next
//!   open deletes, and no acknowledgement.
//! - The manifest's `flushed_seq` does not move: the table holds no commit-log record.
//! - The range trees take every ingested record under its stripe lock, as `apply` does; the
//!   row cache is not filled (streamed data is not what clients read next).

use super::compaction::busy::Busy;
use super::compaction::policy::Ingested;
use super::sstable::TableMeta;
use super::{ApplyOutcome, Arc, Core, LevelEdit, Ordering, Record, Result, SsTable, io_err};

/// What ingests did to the layout, for the compaction policy
/// ([`super::compaction::policy::Ingested`]) and for the next ingest's placement. Not kept
/// across a restart: a layout stacked then drains level by level.
#[derive(Debug, Default)]
pub(super) struct Ingests {
    /// When the last ingested table was installed.
    last: Option<std::time::Instant>,
    /// An ingest put a table in a level between L0 and the last since the last merge of
    /// every level.
    above_last: bool,
    /// Bytes ingested since the last merge of every level.
    bytes: u64,
}

impl Ingests {
    /// Whether a table of `bytes` may go above the last level: when the data below L0
    /// would then be at least half ingested since the last merge of every level, as on a
    /// node that joins. On a node that holds data already (a removal's inheritor) the levels
    /// above the last are the policy's, and an ingested table that cannot go to the last
    /// goes to L0, to be merged down with the others as flushes are: a small table alone in a
    /// level above large ones would cost a rewrite of the tables it overlaps at every level.
    fn may_stack(&self, levels: &[Vec<TableMeta>], bytes: u64) -> bool {
        let leveled: u64 = levels.iter().skip(1).flatten().map(|t| t.file_bytes).sum();
        2 * (self.bytes + bytes) >= leveled + bytes
    }

    fn installed(&mut self, level: usize, bytes: u64, max_levels: usize) {
        self.last = Some(std::time::Instant::now());
        self.bytes += bytes;
        self.above_last |= level >= 1 && level + 1 < max_levels.max(2);
    }

    /// A merge of every level into the last was picked: nothing stacked is left once it
    /// installs, and no ingest goes below L0 while it runs.
    pub(super) fn merging_all(&mut self) -> bool {
        self.bytes = 0;
        std::mem::take(&mut self.above_last)
    }

    pub(super) fn state(&self, quiet: std::time::Duration) -> Ingested {
        match self.last {
            _ if !self.above_last => Ingested::Nothing,
            Some(at) if at.elapsed() < quiet => Ingested::Arriving,
            _ => Ingested::Stopped,
        }
    }
}

/// Where a batch's records went.
struct Split {
    /// (internal key, index in the batch) of records whose key the engine held nowhere, in key
    /// order: the table.
    absent: Vec<(Vec<u8>, usize)>,
    /// Indices of the others: the write path.
    through_log: Vec<usize>,
}

/// A table written and fsynced but not listed in the manifest yet.
struct Built {
    meta: TableMeta,
    table: Arc<SsTable>,
    path: std::path::PathBuf,
}

impl Built {
    /// Deletes the unlisted table (nothing reads it; a failed delete leaves an orphan the
    /// next open deletes).
    fn discard(self, vfs: &dyn super::vfs::Vfs) {
        drop(self.table);
        let _ = vfs.remove(&self.path);
    }
}

impl Core {
    /// Writes `records` as one table where their keys are new to the engine and through the
    /// write path where they are not; returns one outcome per record, in order. Validates
    /// every record first: one bad record rejects the batch and changes nothing.
    pub(super) fn ingest(&self, records: Vec<Record>) -> Result<Vec<ApplyOutcome>> {
        self.check_open()?;
        records.iter().try_for_each(Record::validate)?;
        // Record by record, as the write path asks: a large batch of small records is not a
        // large write.
        records
            .iter()
            .try_for_each(|r| self.disk.check(r.size_estimate()))?;
        let mut keyed: Vec<(Vec<u8>, usize)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (r.internal_key(), i))
            .collect();
        keyed.sort();
        let mut stripes: Vec<usize> = keyed.iter().map(|(k, _)| self.stripe_index(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        // Optimistic: the look-ups and the table's write and fsync take no lock. Each stripe's
        // generation is read before the look-ups; a write moves it after its record became
        // visible, under the stripe lock, so a stripe whose generation is unchanged once its
        // lock is held had no write since (its look-ups still hold).
        let seen: Vec<u64> = stripes
            .iter()
            .filter_map(|i| self.stripes.get(*i))
            .map(|s| s.generation.load(Ordering::Acquire))
            .collect();
        let mut split = self.split(&keyed)?;
        let mut table = if split.absent.is_empty() {
            None
        } else {
            Some(self.build(&split.absent, &records)?)
        };
        // Ascending, one at a time: the order `lock_all_stripes` takes them in, and writers
        // hold one at most, so this cannot deadlock.
        let guards: Vec<_> = stripes
            .iter()
            .filter_map(|i| self.stripes.get(*i))
            .map(|s| s.lock.lock())
            .collect();
        let moved: Vec<usize> = stripes
            .iter()
            .zip(&seen)
            .filter(|(i, seen)| {
                self.stripes
                    .get(**i)
                    .is_some_and(|s| s.generation.load(Ordering::Acquire) != **seen)
            })
            .map(|(i, _)| *i)
            .collect();
        if !self.still_absent(&split.absent, &moved)? {
            // A write landed on one of the table's keys meanwhile, so the table may hold a
            // version older than it: built again, under the locks this time.
            if let Some(stale) = table.take() {
                stale.discard(&*self.options.vfs);
            }
            self.metrics.ingest_rebuilds.fetch_add(1, Ordering::Relaxed);
            split = self.split(&keyed)?;
            if !split.absent.is_empty() {
                table = Some(self.build(&split.absent, &records)?);
            }
        }
        // The table's records are applied; the others' outcomes come from the write path.
        let mut outcomes = vec![ApplyOutcome::Applied; records.len()];
        if let Some(table) = table {
            self.install_ingested(table)?;
            for (ikey, i) in &split.absent {
                if let Some(record) = records.get(*i) {
                    self.trees_replace(ikey, None, record);
                }
            }
            for i in &stripes {
                if let Some(stripe) = self.stripes.get(*i) {
                    stripe.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            self.metrics
                .writes_applied
                .fetch_add(split.absent.len() as u64, Ordering::Relaxed);
        }
        drop(guards);
        let mut records: Vec<Option<Record>> = records.into_iter().map(Some).collect();
        let rest: Vec<Record> = split
            .through_log
            .iter()
            .filter_map(|i| records.get_mut(*i).and_then(Option::take))
            .collect();
        if !rest.is_empty() {
            for (i, outcome) in split.through_log.iter().zip(self.apply_batch(rest)?) {
                if let Some(slot) = outcomes.get_mut(*i) {
                    *slot = outcome;
                }
            }
        }
        Ok(outcomes)
    }

    /// Whether every key of `absent` in a `moved` stripe (sorted) is still held nowhere
    /// (caller holds their stripe locks).
    fn still_absent(&self, absent: &[(Vec<u8>, usize)], moved: &[usize]) -> Result<bool> {
        if moved.is_empty() {
            return Ok(true);
        }
        for (ikey, _) in absent {
            if moved.binary_search(&self.stripe_index(ikey)).is_ok()
                && self.current(ikey)?.is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Sorts the batch's keys into new ones and the rest (caller holds their stripe locks).
    fn split(&self, keyed: &[(Vec<u8>, usize)]) -> Result<Split> {
        let mut split = Split {
            absent: Vec::with_capacity(keyed.len()),
            through_log: Vec::new(),
        };
        let mut previous: Option<&[u8]> = None;
        for (ikey, i) in keyed {
            let repeated = previous == Some(ikey.as_slice());
            previous = Some(ikey);
            if repeated || self.current(ikey)?.is_some() {
                split.through_log.push(*i);
            } else {
                split.absent.push((ikey.clone(), *i));
            }
        }
        Ok(split)
    }

    /// Writes the table and fsyncs it and its directory; nothing lists it yet.
    fn build(&self, absent: &[(Vec<u8>, usize)], records: &[Record]) -> Result<Built> {
        let (id, path, mut builder) = self.new_table()?;
        let vfs = &*self.options.vfs;
        let built = (|| {
            for (ikey, i) in absent {
                if let Some(record) = records.get(*i) {
                    builder.add(ikey, record)?;
                }
            }
            let meta = builder.finish()?;
            vfs.sync_dir(&self.sst_dir)
                .map_err(|e| io_err("fsync", &self.sst_dir, e))?;
            Ok((meta, SsTable::open(vfs, &path, id)?))
        })();
        match built {
            Ok((meta, table)) => Ok(Built { meta, table, path }),
            Err(e) => {
                // Unlisted, so nothing reads it.
                let _ = vfs.remove(&path);
                Err(e)
            }
        }
    }

    /// Lists the table in the manifest and makes it visible. A manifest that failed half-way
    /// may list the file, so on an error it stays (an unlisted file is deleted by the next
    /// open).
    fn install_ingested(&self, built: Built) -> Result<()> {
        let Built { meta, table, .. } = built;
        let mut manifest = self.manifest.lock();
        // Read under the manifest lock: a compaction picks its task and records its output
        // under the same lock, so this table is either in the layout the task was picked
        // from or placed where the task's output cannot land on top of it.
        let running = self.compaction_output.get();
        let mut ingests = self.ingests.lock();
        let bytes = meta.file_bytes;
        let level = ingest_level(
            &manifest.levels,
            &meta,
            self.options.levels.max_levels,
            running.as_ref(),
            ingests.may_stack(&manifest.levels, bytes),
        );
        let edit = LevelEdit {
            level,
            ..LevelEdit::default()
        };
        let mut next = manifest.clone();
        edit.apply(&mut next.levels, vec![meta]);
        next.store(&*self.options.vfs, &self.dir)?;
        {
            let mut state = self.state.write();
            let mut s = (**state).clone();
            edit.apply(&mut s.levels, vec![table]);
            *state = Arc::new(s);
        }
        *manifest = next;
        // Under the manifest lock, like a compaction's pick: it sees this table and its time.
        ingests.installed(level, bytes, self.options.levels.max_levels);
        drop(ingests);
        drop(manifest);
        self.metrics.count_ingested(level, bytes);
        self.signal(&self.compaction_signal);
        Ok(())
    }
}

impl super::EngineMetrics {
    fn count_ingested(&self, level: usize, bytes: u64) {
        let mut levels = self.ingested.lock();
        if levels.len() <= level {
            levels.resize(level + 1, (0, 0));
        }
        if let Some((tables, total)) = levels.get_mut(level) {
            *tables += 1;
            *total += bytes;
        }
    }
}

/// The deepest level below L0 (up to `max_levels - 1`; only the last unless `stack`) where
/// none of the tables overlaps `table`'s key range and the `running` compaction does not
/// write over that range; 0 (the front of L0) when there is none. A joining node's senders
/// stream sorted runs whose key ranges interleave, so each run takes a level of its own (the
/// last, then the ones above): nothing merges them while they arrive, and once ingests have
/// stopped for `ingest_quiet`, the policy merges the stacked runs into the last level in one
/// pass ([`super::compaction::policy::stacked`]), each byte written once more.
pub(super) fn ingest_level(
    levels: &[Vec<TableMeta>],
    table: &TableMeta,
    max_levels: usize,
    running: Option<&Busy>,
    stack: bool,
) -> usize {
    let last = max_levels.max(2) - 1;
    let shallowest = if stack { 1 } else { last };
    (shallowest..=last)
        .rev()
        .find(|level| {
            let free = levels.get(*level).is_none_or(|tables| {
                tables
                    .iter()
                    .all(|t| !t.overlaps(&table.min_key, &table.max_key))
            });
            free && running.is_none_or(|r| !r.blocks(*level, &table.min_key, &table.max_key))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(id: u64, min: &[u8], max: &[u8]) -> TableMeta {
        TableMeta {
            min_key: min.to_vec(),
            max_key: max.to_vec(),
            ..TableMeta::empty(id)
        }
    }

    #[test]
    fn an_ingested_table_goes_to_the_deepest_level_it_overlaps_nothing_in() {
        let new = table(9, b"d", b"f");
        assert_eq!(ingest_level(&[], &new, 4, None, true), 3, "an empty engine");
        let levels = vec![
            vec![table(1, b"a", b"z")],
            vec![],
            vec![table(2, b"a", b"c"), table(3, b"g", b"k")],
            vec![table(4, b"c", b"e")],
        ];
        assert_eq!(
            ingest_level(&levels, &new, 4, None, true),
            2,
            "between two tables of L2, whatever lies above"
        );
        let touching = table(9, b"c", b"f");
        assert_eq!(
            ingest_level(&levels, &touching, 4, None, true),
            1,
            "a shared key is an overlap"
        );
        let crowded = vec![
            vec![],
            vec![table(5, b"a", b"z")],
            vec![table(6, b"e", b"e")],
            vec![table(7, b"a", b"d")],
        ];
        assert_eq!(
            ingest_level(&crowded, &new, 4, None, true),
            0,
            "every level overlaps: L0"
        );
        let into_l2 = Busy::Range {
            level: 2,
            min_key: b"a".to_vec(),
            max_key: b"k".to_vec(),
        };
        assert_eq!(
            ingest_level(&levels, &new, 4, Some(&into_l2), true),
            1,
            "not where a running compaction writes"
        );
        let elsewhere = Busy::Range {
            level: 2,
            min_key: b"g".to_vec(),
            max_key: b"k".to_vec(),
        };
        assert_eq!(ingest_level(&levels, &new, 4, Some(&elsewhere), true), 2);
        assert_eq!(
            ingest_level(&[], &new, 4, Some(&Busy::Everything), true),
            0,
            "a major compaction or a range drop: L0"
        );
        assert_eq!(
            ingest_level(&levels, &new, 4, None, false),
            0,
            "not stacking: the last level or L0"
        );
        let gap = table(9, b"f", b"f");
        assert_eq!(ingest_level(&levels, &gap, 4, None, false), 3);
    }

    #[test]
    fn ingests_stack_above_the_last_level_only_where_the_data_is_mostly_ingested() {
        let sized = |id: u64, bytes: u64| TableMeta {
            file_bytes: bytes,
            ..table(id, b"a", b"z")
        };
        let mut ingests = Ingests::default();
        assert!(ingests.may_stack(&[], 10), "an empty node");
        // A node that joins: what it holds below L0 is what it was sent.
        ingests.installed(3, 100, 4);
        let joining = vec![vec![sized(1, 500)], vec![], vec![], vec![sized(2, 100)]];
        assert!(ingests.may_stack(&joining, 10), "L0 does not count");
        // A node that held 1,000 bytes before it was sent 100.
        let inheritor = vec![vec![], vec![], vec![sized(3, 100)], vec![sized(4, 1000)]];
        assert!(!ingests.may_stack(&inheritor, 10));
        assert_eq!(ingests.state(std::time::Duration::ZERO), Ingested::Nothing);
        ingests.installed(2, 100, 4);
        assert_eq!(ingests.state(std::time::Duration::ZERO), Ingested::Stopped);
        assert_eq!(
            ingests.state(std::time::Duration::from_secs(3600)),
            Ingested::Arriving
        );
        assert!(ingests.merging_all(), "it had stacked a table");
        assert!(!ingests.may_stack(&joining, 10), "its bytes count no more");
        assert_eq!(ingests.state(std::time::Duration::ZERO), Ingested::Nothing);
    }
}
