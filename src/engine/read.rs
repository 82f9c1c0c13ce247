//! The read path: the row cache, then the active memtable, the frozen ones, L0 newest first and
//! the deeper levels, stopping at the first version found; merged iterators for scans.

use super::{
    Arc, Core, EngineError, HashRange, MemtableCursor, MergeIter, Ordering, Record, Result, Source,
    SsTable, State, TableIter, check_key, check_storage_tenant, internal_key, key_hash, sstable,
    table_file_name,
};

impl Core {
    /// Memtables then tables, newest first; the first record found is the winner.
    pub(super) fn lookup(&self, ikey: &[u8]) -> Result<Option<Arc<Record>>> {
        let state = self.snapshot();
        if let Some(r) = state.active.get(ikey) {
            return Ok(Some(r));
        }
        for m in &state.immutables {
            if let Some(r) = m.get(ikey) {
                return Ok(Some(r));
            }
        }
        if self.has_quarantine.load(Ordering::Acquire) {
            if let Some(q) = self.quarantine.read().iter().find(|q| q.covers(ikey)) {
                return Err(EngineError::Corrupted {
                    path: self.sst_dir.join(table_file_name(q.table_id)),
                    offset: 0,
                    reason: format!(
                        "key in the range of quarantined table {} ({}); refused until repaired",
                        q.table_id, q.reason
                    ),
                });
            }
        }
        let hash = key_hash(ikey);
        for (level, tables) in state.levels.iter().enumerate() {
            let candidates: &[Arc<SsTable>] = if level == 0 {
                tables
            } else {
                let i = tables.partition_point(|t| t.meta.max_key.as_slice() < ikey);
                tables.get(i..i + 1).unwrap_or(&[])
            };
            for table in candidates {
                if table.may_contain(ikey, hash) {
                    match table.get(ikey) {
                        Ok(Some(r)) => return Ok(Some(Arc::new(r))),
                        Ok(None) => {}
                        Err(e) if e.is_corruption() => {
                            self.quarantine_table(table, &e);
                            return Err(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(None)
    }

    pub(super) fn get(&self, tenant: &str, key: &[u8]) -> Result<Option<Arc<Record>>> {
        self.check_open()?;
        check_storage_tenant(tenant)?;
        check_key(key)?;
        self.metrics.reads.fetch_add(1, Ordering::Relaxed);
        let ikey = internal_key(tenant, key);
        if let Some(r) = self.cache.get(&ikey) {
            return Ok(Some(r));
        }
        let stripe = self.stripe(&ikey);
        let generation = stripe.generation.load(Ordering::Acquire);
        let found = self.lookup(&ikey)?;
        if let Some(r) = &found {
            let _guard = stripe.lock.lock();
            if stripe.generation.load(Ordering::Acquire) == generation {
                self.cache.insert(ikey, r.clone());
            }
        }
        Ok(found)
    }

    /// A merged stream from `from` over every memtable and the tables `keep` admits; table
    /// entries outside `range` are skipped undecoded (a key's hash is the same in every source,
    /// so filtering before the merge cannot change which version wins).
    /// A merged scan of the memtables and the tables `keep` admits. Damage found on the way
    /// quarantines the damaged tables among those (see [`Core::quarantine_damaged`]).
    pub(super) fn merge_from(
        self: &Arc<Self>,
        from: &[u8],
        ranges: Option<Arc<[HashRange]>>,
        keep: &dyn Fn(&sstable::TableMeta) -> bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Arc<Record>)>> + Send + use<> {
        let state = self.snapshot();
        let scanned: Vec<Arc<SsTable>> = state
            .levels
            .iter()
            .flatten()
            .filter(|t| keep(&t.meta))
            .cloned()
            .collect();
        let core = self.clone();
        self.merge_sources(&state, from, ranges, keep)
            .inspect(move |item| {
                if let Err(e) = item {
                    if e.is_corruption() {
                        core.quarantine_damaged(&scanned);
                    }
                }
            })
    }

    pub(super) fn merge_sources(
        &self,
        state: &State,
        from: &[u8],
        ranges: Option<Arc<[HashRange]>>,
        keep: &dyn Fn(&sstable::TableMeta) -> bool,
    ) -> MergeIter {
        let mut sources: Vec<Source> = Vec::new();
        for m in std::iter::once(&state.active).chain(&state.immutables) {
            sources.push(Box::new(
                MemtableCursor::new(m.clone(), from).in_hash_ranges(ranges.clone()),
            ));
        }
        for (level, tables) in state.levels.iter().enumerate() {
            let admitted: Vec<Arc<SsTable>> =
                tables.iter().filter(|t| keep(&t.meta)).cloned().collect();
            if level == 0 {
                for t in admitted {
                    sources.push(Box::new(
                        TableIter::new(t, from).in_hash_ranges(ranges.clone()),
                    ));
                }
            } else if !admitted.is_empty() {
                // Disjoint and sorted: one source per level.
                let from = from.to_vec();
                let ranges = ranges.clone();
                sources.push(Box::new(admitted.into_iter().flat_map(move |t| {
                    TableIter::new(t, &from).in_hash_ranges(ranges.clone())
                })));
            }
        }
        MergeIter::new(sources)
    }
}
