//! The write path: validate, wait for room when too many memtables wait to be flushed, apply
//! under the key's stripe lock (the winner rule against the stored version), append to the
//! commit log, and acknowledge only once the log is durable up to the record.

use super::{ApplyOutcome, Arc, Core, Duration, Ordering, Record, Result, trees};

impl Core {
    pub(super) fn wait_for_flush_room(&self) {
        // The common case takes no lock: only stalled writers queue on `stall_lock`.
        if self.state.read().immutables.len() < self.options.max_immutable_memtables {
            return;
        }
        let started = std::time::Instant::now();
        let mut stalled = false;
        let mut guard = self.stall_lock.lock();
        while self.snapshot().immutables.len() >= self.options.max_immutable_memtables
            && !self.closed.load(Ordering::Acquire)
        {
            stalled = true;
            self.signal(&self.flush_signal);
            self.stall.wait_for(&mut guard, Duration::from_millis(50));
        }
        drop(guard);
        // Counted only when the writer waited (a flush may have finished since the check).
        if stalled {
            let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.metrics.write_stalls.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .write_stall_micros
                .fetch_add(waited, Ordering::Relaxed);
        }
    }

    pub(super) fn apply(&self, record: Record) -> Result<ApplyOutcome> {
        let (outcome, seq) = self.apply_unsynced(record)?;
        self.wal.wait_durable(seq)?;
        Ok(outcome)
    }

    /// Applies every record, then waits once for the log to be durable up to the last one.
    /// Records are validated before any is written, so a bad record rejects the whole batch.
    pub(super) fn apply_batch(&self, records: Vec<Record>) -> Result<Vec<ApplyOutcome>> {
        records.iter().try_for_each(Record::validate)?;
        let mut outcomes = Vec::with_capacity(records.len());
        let mut last = 0;
        for record in records {
            let (outcome, seq) = self.apply_unsynced(record)?;
            outcomes.push(outcome);
            last = last.max(seq);
        }
        self.wal.wait_durable(last)?;
        Ok(outcomes)
    }

    /// Compares, logs and inserts a record; returns the log sequence the caller must wait for
    /// before acknowledging: the record's own when it was written, the last appended one when it
    /// was ignored (the version that beat it may not be durable yet).
    pub(super) fn apply_unsynced(&self, record: Record) -> Result<(ApplyOutcome, u64)> {
        self.check_open()?;
        record.validate()?;
        self.disk.check(record.size_estimate())?;
        if self.options.background {
            self.wait_for_flush_room();
        }
        // Copied here, outside the stripe lock (an ignored write copies for nothing; rare).
        let record = record.with_own_buffers();
        let ikey = record.internal_key();
        let stripe = self.stripe(&ikey);
        let (seq, full) = {
            let _guard = stripe.lock.lock();
            let current = self.current(&ikey)?;
            if let Some(current) = current
                .as_ref()
                .filter(|c| !record.version.supersedes(&c.version))
            {
                self.metrics.writes_ignored.fetch_add(1, Ordering::Relaxed);
                // What wins may have been appended by a writer still waiting for its sync (or
                // be a replayed or flushed record, durable already): the ignored write is
                // acknowledged only once everything appended so far is durable, so an
                // acknowledgement never rests on a version a crash could still take back.
                let stored = current.version.clone();
                return Ok((ApplyOutcome::Ignored { stored }, self.wal.appended_seq()));
            }
            let record = Arc::new(record);
            let (seq, full) = {
                let state = self.state.read();
                let seq = self.wal.append(&record)?;
                state.active.insert(ikey.clone(), record.clone(), seq);
                (seq, state.active.is_full())
            };
            self.trees_replace(&ikey, current.as_deref(), &record);
            self.cache.insert(ikey, record);
            stripe.generation.fetch_add(1, Ordering::AcqRel);
            (seq, full)
        };
        self.metrics.writes_applied.fetch_add(1, Ordering::Relaxed);
        if full {
            self.freeze(false);
        }
        Ok((ApplyOutcome::Applied, seq))
    }

    /// The winner the write path compares against: the row cache, else the tables.
    pub(super) fn current(&self, ikey: &[u8]) -> Result<Option<Arc<Record>>> {
        match self.cache.peek(ikey) {
            Some(r) => Ok(Some(r)),
            None => self.lookup(ikey),
        }
    }

    /// Replaces `old`'s entry in the range trees by `new`'s (caller holds the key's stripe).
    pub(super) fn trees_replace(&self, ikey: &[u8], old: Option<&Record>, new: &Record) {
        if let Some(old) = old {
            self.trees
                .toggle(&old.tenant, old.ring_hash, tree_entry(ikey, old));
        }
        self.trees
            .toggle(&new.tenant, new.ring_hash, tree_entry(ikey, new));
    }
}

/// A record's entry hash in the range trees, its internal key already at hand.
pub(super) fn tree_entry(ikey: &[u8], record: &Record) -> u64 {
    trees::entry_hash(
        ikey,
        trees::version_digest(&record.version, record.is_tombstone()),
    )
}
