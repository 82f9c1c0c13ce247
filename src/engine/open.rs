//! Opening an engine: read the manifest (or its mirror), open the tables (quarantining the
//! unreadable), replay the commit log above the flushed sequence into a memtable, remove
//! orphaned files, start the flush, compaction and (batch_ms) sync workers.

use super::trees::RangeTrees;
use super::write::tree_entry;
use super::{
    Arc, AtomicBool, AtomicU64, CommitLog, Condvar, Core, DiskGuard, Duration, Engine, EngineError,
    EngineMetrics, EngineOptions, LogOptions, Manifest, Memtable, Mutex, Ordering, Path, Record,
    Result, RowCache, RwLock, STRIPES, SsTable, State, Stripe, SyncMode, Vfs, io_err, manifest,
    mpsc, table_file_name,
};
use crate::ring::HashRange;

impl Engine {
    /// Opens (or creates) the engine in `dir`.
    pub fn open(dir: impl AsRef<Path>, options: EngineOptions) -> Result<Engine> {
        let dir = dir.as_ref().to_path_buf();
        let sst_dir = dir.join("sst");
        let wal_dir = dir.join("wal");
        let vfs = options.vfs.clone();
        super::snapshot::check_not_restoring(&*vfs, &dir)?;
        vfs.create_dir_all(&sst_dir)
            .map_err(|e| io_err("create", &sst_dir, e))?;
        let loaded = Manifest::load(&*vfs, &dir)?;
        let manifest_damage = loaded
            .restored_from_mirror
            .map(|why| {
                format!(
                    "{} damaged ({why}), restored from {}",
                    manifest::FILE_NAME,
                    manifest::MIRROR_NAME
                )
            })
            .or(loaded
                .mirror_damaged
                .map(|why| format!("{} damaged ({why}), rewritten", manifest::MIRROR_NAME)));
        if let Some(damage) = &manifest_damage {
            tracing::error!(%damage, "a copy of the manifest was damaged; the disk is suspect");
        }
        let manifest = loaded.manifest.unwrap_or_else(|| Manifest {
            flushed_seq: 0,
            next_table_id: 1,
            levels: vec![Vec::new()],
            quarantined: Vec::new(),
        });
        let mut levels: Vec<Vec<Arc<SsTable>>> = Vec::new();
        for level in &manifest.levels {
            let mut tables = Vec::with_capacity(level.len());
            for meta in level {
                tables.push(SsTable::open(
                    &*vfs,
                    &sst_dir.join(table_file_name(meta.id)),
                    meta.id,
                )?);
            }
            levels.push(tables);
        }
        if levels.is_empty() {
            levels.push(Vec::new());
        }
        remove_orphans(&*vfs, &dir, &sst_dir, &manifest)?;
        let manifest_quarantine = manifest.quarantined.clone();
        if !manifest_quarantine.is_empty() {
            tracing::error!(
                tables = manifest_quarantine.len(),
                "quarantined tables: their key ranges are refused until repaired"
            );
        }

        let active = Arc::new(Memtable::new(super::memtable::flush_size(
            options.memtable_bytes,
        )));
        let log_options = LogOptions {
            vfs: vfs.clone(),
            sync: options.sync,
            segment_bytes: options.segment_bytes,
            after_seq: manifest.flushed_seq,
            skip_corrupt: options.skip_corrupt_log,
        };
        let (wal, replay) = replay_into(&active, &wal_dir, log_options)?;
        if replay.records > 0 {
            tracing::info!(
                records = replay.records,
                bytes = replay.bytes,
                torn = replay.torn_tails,
                "commit log replayed"
            );
        }
        let stripes = (0..STRIPES)
            .map(|_| Stripe {
                lock: Mutex::new(()),
                generation: AtomicU64::new(0),
            })
            .collect();
        let core = Arc::new(Core {
            disk: DiskGuard::new(vfs.clone(), &dir, options.disk),
            dir,
            sst_dir,
            cache: RowCache::new(options.cache_bytes),
            wal,
            state: RwLock::new(Arc::new(State {
                active,
                immutables: Vec::new(),
                levels,
            })),
            manifest: Mutex::new(manifest),
            stripes,
            trees: RangeTrees::default(),
            trees_complete: AtomicBool::new(false),
            metrics: EngineMetrics::default(),
            flush_lock: Mutex::new(()),
            compaction_lock: Mutex::new(()),
            compaction_output: Default::default(),
            ingests: Default::default(),
            obsolete: Default::default(),
            pacer: Mutex::new(super::compaction::pace::Pacer::new(
                options.compaction_bytes_per_sec,
            )),
            stall: Condvar::new(),
            stall_lock: Mutex::new(()),
            flush_signal: Mutex::new(None),
            compaction_signal: Mutex::new(None),
            closed: AtomicBool::new(false),
            replay,
            manifest_damage,
            has_quarantine: AtomicBool::new(!manifest_quarantine.is_empty()),
            quarantine: RwLock::new(manifest_quarantine),
            options,
        });
        core.build_trees();
        let engine = Engine {
            core,
            workers: Mutex::new(Vec::new()),
        };
        if engine.core.options.background {
            engine.start_workers()?;
        }
        if let SyncMode::BatchMs(ms) = engine.core.options.sync {
            engine.start_batch_syncer(ms)?;
        }
        Ok(engine)
    }

    fn start_workers(&self) -> Result<()> {
        let mut workers = self.workers.lock();
        for (name, is_flush) in [("pairdb-flush", true), ("pairdb-compaction", false)] {
            let (tx, rx) = mpsc::channel::<()>();
            let slot = if is_flush {
                &self.core.flush_signal
            } else {
                &self.core.compaction_signal
            };
            *slot.lock() = Some(tx);
            let core = self.core.clone();
            let nice = if is_flush {
                0
            } else {
                self.core.options.compaction_nice
            };
            let handle = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    crate::priority::lower_current_thread(nice);
                    // Compaction's disk I/O goes below the writers' too (one knob for both:
                    // `compaction_nice` 0 leaves the thread as the process is).
                    if nice > 0 {
                        crate::priority::idle_current_thread_io();
                    }
                    core.worker_loop(rx, is_flush)
                })
                .map_err(|e| EngineError::io("spawn engine worker", e))?;
            workers.push(handle);
        }
        Ok(())
    }

    /// `sync = batch_ms=N`: fsync the log every N ms (writers do not wait for it).
    fn start_batch_syncer(&self, ms: u64) -> Result<()> {
        let core = self.core.clone();
        let handle = std::thread::Builder::new()
            .name("pairdb-log-sync".to_owned())
            .spawn(move || {
                while !core.closed.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(ms));
                    if let Err(e) = core.wal.sync_now() {
                        tracing::error!(error = %e, "periodic commit-log sync failed");
                        return;
                    }
                }
            })
            .map_err(|e| EngineError::io("spawn log syncer", e))?;
        self.workers.lock().push(handle);
        Ok(())
    }
}

/// Records handed from the log reader to the memtable inserter at a time.
const REPLAY_BATCH: usize = 1024;

/// Opens the commit log, replaying it into `active` on two threads: this one reads, checks and
/// decodes the frames, a second inserts the records into the memtable, in log order (a later
/// version of a key is inserted after the earlier one, as when it was written).
fn replay_into(
    active: &Memtable,
    wal_dir: &Path,
    log_options: LogOptions,
) -> Result<(CommitLog, super::wal::ReplayStats)> {
    std::thread::scope(|scope| {
        let (batches, received) = mpsc::sync_channel::<Vec<(u64, Record)>>(16);
        // Emptied batches go back to the reader: a reused buffer is in the cache, where a
        // new one would be fresh memory (a page fault and a cache miss per record stored).
        let (emptied, reusable) = mpsc::channel::<Vec<(u64, Record)>>();
        let inserter = scope.spawn(move || {
            for mut batch in received {
                for (seq, record) in batch.drain(..) {
                    active.insert(record.internal_key(), Arc::new(record), seq);
                }
                // Fails only once the reader is done.
                let _ = emptied.send(batch);
            }
        });
        let mut batch = Vec::with_capacity(REPLAY_BATCH);
        let opened = CommitLog::open(wal_dir, log_options, &mut |seq, record| {
            batch.push((seq, record));
            if batch.len() == REPLAY_BATCH {
                let next = reusable
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(REPLAY_BATCH));
                let full = std::mem::replace(&mut batch, next);
                // Fails only if the inserter died, whose panic the join below passes on.
                let _ = batches.send(full);
            }
        });
        if !batch.is_empty() {
            let _ = batches.send(batch);
        }
        drop(batches);
        if let Err(panic) = inserter.join() {
            std::panic::resume_unwind(panic);
        }
        opened
    })
}

impl Core {
    /// Builds the range trees from a scan of every winner (before any write is taken), on
    /// several threads that each take a slice of the ring (the trees are locked per shard;
    /// every key lies in one slice). A damaged table found on the way is quarantined (like
    /// any scan that meets one) and the build starts over without it, so the trees cover what
    /// the node can serve.
    fn build_trees(self: &Arc<Self>) {
        let started = std::time::Instant::now();
        let attempts = self.snapshot().levels.iter().map(Vec::len).sum::<usize>() + 1;
        let slices = ring_slices(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        );
        for _ in 0..attempts {
            self.trees.clear();
            let scans: Vec<std::result::Result<u64, EngineError>> = std::thread::scope(|scope| {
                let workers: Vec<_> = slices
                    .iter()
                    .map(|slice| scope.spawn(move || self.add_to_trees(*slice)))
                    .collect();
                workers
                    .into_iter()
                    .map(|w| {
                        w.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            });
            let mut keys = 0u64;
            let mut failure = None;
            for scan in scans {
                match scan {
                    Ok(n) => keys += n,
                    // A corruption first: it is the one a new attempt gets past.
                    Err(e) if failure.is_none() || e.is_corruption() => failure = Some(e),
                    Err(_) => {}
                }
            }
            match failure {
                None => {
                    self.trees_complete.store(true, Ordering::Release);
                    tracing::info!(
                        keys,
                        threads = slices.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "range trees built"
                    );
                    return;
                }
                // The damaged table is quarantined now: build again without it.
                Some(e) if e.is_corruption() => {
                    tracing::error!(error = %e, "a damaged table met while building the range trees; building again without it");
                }
                Some(e) => {
                    tracing::error!(error = %e, "range trees incomplete: anti-entropy skips this node until it restarts");
                    return;
                }
            }
        }
        tracing::error!("range trees incomplete: damaged tables kept turning up");
    }

    /// Adds every winner whose ring position lies in `slice` to the trees; returns how many.
    fn add_to_trees(self: &Arc<Self>, slice: HashRange) -> Result<u64> {
        let mut keys = 0u64;
        for item in self.merge_from(&[], Some(Arc::from([slice])), &|_| true) {
            // Every source skips the other slices' records.
            let (ikey, record) = item?;
            self.trees
                .toggle(&record.tenant, record.ring_hash, tree_entry(&ikey, &record));
            keys += 1;
        }
        Ok(keys)
    }
}

/// The ring cut into `n` equal slices (at most 8), which cover it exactly once.
fn ring_slices(n: usize) -> Vec<HashRange> {
    let n = n.clamp(1, 8) as u128;
    let bound = |i: u128| ((i << 64) / n) as u64;
    (0..n)
        .map(|i| HashRange::new(bound(i), bound(i + 1)))
        .collect()
}

/// Deletes table files the manifest does not list (a crash between writing a table and
/// installing it) and leftover manifest temp files.
pub(super) fn remove_orphans(
    vfs: &dyn Vfs,
    dir: &Path,
    sst_dir: &Path,
    manifest: &Manifest,
) -> Result<()> {
    let live: std::collections::HashSet<u64> = manifest.live_ids().collect();
    let entries = vfs.list(sst_dir).map_err(|e| io_err("list", sst_dir, e))?;
    for path in entries {
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sst"))
            .and_then(|n| n.parse::<u64>().ok());
        if id.is_none_or(|id| !live.contains(&id)) {
            vfs.remove(&path)
                .map_err(|e| io_err("remove orphan", &path, e))?;
        }
    }
    for name in [manifest::FILE_NAME, manifest::MIRROR_NAME] {
        let tmp = dir.join(format!("{name}.tmp"));
        if vfs.exists(&tmp) {
            vfs.remove(&tmp).map_err(|e| io_err("remove", &tmp, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_slices_cover_every_position_once() {
        for n in [0, 1, 2, 3, 7, 8, 64] {
            let slices = ring_slices(n);
            assert_eq!(slices.len(), n.clamp(1, 8));
            for position in [
                0,
                1,
                u64::MAX / 3,
                1 << 63,
                (1 << 63) - 1,
                u64::MAX - 1,
                u64::MAX,
            ] {
                let holders = slices.iter().filter(|s| s.contains(position)).count();
                assert_eq!(holders, 1, "{n} slices, position {position}");
            }
            let width: u128 = slices.iter().map(HashRange::width).sum();
            assert_eq!(width, 1u128 << 64, "{n} slices");
        }
    }
}
