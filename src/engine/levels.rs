//! One change to the engine's levels, applied alike to the manifest's table list and to the
//! open tables readers use.
//!
//! The manifest (`Vec<Vec<TableMeta>>`) is stored first, then the in-memory state
//! (`Vec<Vec<Arc<SsTable>>>`) is swapped; both must end the same. Editing them through one
//! [`LevelEdit`] keeps the rules in one place: removed tables leave every level, L0 stays
//! newest first, and L1.. stay sorted by their smallest key (disjoint ranges).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::sstable::{SsTable, TableMeta};

/// What a flush, compaction or quarantine changes.
#[derive(Debug, Clone, Default)]
pub struct LevelEdit {
    /// Tables that leave the levels (compaction inputs, a quarantined table).
    pub removed: BTreeSet<u64>,
    /// The level added tables go to, if any.
    pub level: usize,
}

/// Anything a level holds: the manifest's metadata or an open table.
pub trait LevelEntry {
    fn meta(&self) -> &TableMeta;
}

impl LevelEntry for TableMeta {
    fn meta(&self) -> &TableMeta {
        self
    }
}

impl LevelEntry for Arc<SsTable> {
    fn meta(&self) -> &TableMeta {
        &self.meta
    }
}

impl LevelEdit {
    /// Removes `removed` from every level, then adds `added` to `level`: at the front of L0
    /// (newest first; `added` itself newest first), or into L1.. keeping them sorted by their
    /// smallest key.
    pub fn apply<T: LevelEntry>(&self, levels: &mut Vec<Vec<T>>, added: Vec<T>) {
        for tables in levels.iter_mut() {
            tables.retain(|t| !self.removed.contains(&t.meta().id));
        }
        if added.is_empty() {
            return;
        }
        if levels.len() <= self.level {
            levels.resize_with(self.level + 1, Vec::new);
        }
        let Some(tables) = levels.get_mut(self.level) else {
            return; // unreachable: resized above
        };
        if self.level == 0 {
            let older = std::mem::replace(tables, added);
            tables.extend(older);
        } else {
            tables.extend(added);
            tables.sort_by(|a, b| a.meta().min_key.cmp(&b.meta().min_key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(id: u64, min_key: &[u8]) -> TableMeta {
        TableMeta {
            min_key: min_key.to_vec(),
            ..TableMeta::empty(id)
        }
    }

    fn ids(levels: &[Vec<TableMeta>]) -> Vec<Vec<u64>> {
        levels
            .iter()
            .map(|l| l.iter().map(|t| t.id).collect())
            .collect()
    }

    #[test]
    fn flushes_go_first_in_l0_and_compactions_keep_levels_sorted() {
        let mut levels = vec![vec![table(2, b"a"), table(1, b"a")]];
        LevelEdit::default().apply(&mut levels, vec![table(3, b"a")]);
        assert_eq!(ids(&levels), [vec![3, 2, 1]]);
        let compaction = LevelEdit {
            removed: [1, 2].into(),
            level: 2,
        };
        compaction.apply(&mut levels, vec![table(5, b"m"), table(4, b"c")]);
        assert_eq!(ids(&levels), [vec![3], vec![], vec![4, 5]]);
        let quarantine = LevelEdit {
            removed: [4].into(),
            level: 0,
        };
        quarantine.apply(&mut levels, Vec::new());
        assert_eq!(ids(&levels), [vec![3], vec![], vec![5]]);
    }
}
