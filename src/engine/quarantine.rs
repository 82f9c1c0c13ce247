//! A table found damaged leaves the levels (manifest first, then the open tables, through one
//! `LevelEdit`) and its file moves to `quarantine/`; its key range is refused until repaired.

use super::{
    Arc, Core, EngineError, LevelEdit, Ordering, Quarantined, Result, SsTable, State, TableIter,
    table_file_name,
};

impl Core {
    /// After a read over several tables found damage (a merge does not say which table it
    /// was reading): reads each of `tables` in full and quarantines the damaged ones.
    pub(super) fn quarantine_damaged(&self, tables: &[Arc<SsTable>]) {
        for table in tables {
            let damage = TableIter::new(table.clone(), &[]).find_map(Result::err);
            if let Some(e) = damage.filter(EngineError::is_corruption) {
                self.quarantine_table(table, &e);
            }
        }
    }

    /// Takes a table in which corruption was found out of service: out of the manifest (durably
    /// first) and the read path, its file moved to `quarantine/`, its key range refused from
    /// now on (also after a restart) until a repair rebuilds it from other replicas. Best
    /// effort: if the manifest cannot be written the table stays and the next read that finds
    /// the damage tries again.
    pub(super) fn quarantine_table(&self, table: &Arc<SsTable>, why: &EngineError) {
        let id = table.meta.id;
        let entry = Quarantined {
            table_id: id,
            min_key: table.meta.min_key.clone(),
            max_key: table.meta.max_key.clone(),
            min_hash: table.meta.min_hash,
            max_hash: table.meta.max_hash,
            reason: why.to_string(),
        };
        {
            let mut manifest = self.manifest.lock();
            if !manifest.live_ids().any(|live| live == id) {
                return;
            }
            let edit = LevelEdit {
                removed: [id].into(),
                level: 0,
            };
            let mut next = manifest.clone();
            edit.apply(&mut next.levels, Vec::new());
            next.quarantined.push(entry.clone());
            if let Err(e) = next.store(&*self.options.vfs, &self.dir) {
                tracing::error!(table = id, error = %e, "cannot record the quarantine of a corrupt table");
                return;
            }
            {
                let mut state = self.state.write();
                let mut s: State = (**state).clone();
                edit.apply(&mut s.levels, Vec::new());
                *state = Arc::new(s);
            }
            *manifest = next;
            self.quarantine.write().push(entry);
            self.has_quarantine.store(true, Ordering::Release);
        }
        metrics::counter!("pairdb_engine_tables_quarantined_total").increment(1);
        let kind = match why {
            EngineError::ChecksumFailed { .. } => "checksum",
            _ => "structure",
        };
        metrics::counter!("pairdb_engine_checksum_failures_total", "kind" => kind).increment(1);
        tracing::error!(table = id, error = %why, "corrupt SSTable quarantined; its key range is refused until repaired");
        let vfs = &*self.options.vfs;
        let dir = self.dir.join("quarantine");
        let moved = vfs
            .create_dir_all(&dir)
            .and_then(|()| vfs.rename(table.path(), &dir.join(table_file_name(id))));
        if let Err(e) = moved {
            tracing::warn!(table = id, error = %e, "corrupt SSTable left in place (out of the manifest)");
        }
    }
}
