//! What the running compaction will write, for [`crate::engine::Core::ingest`]: an ingested
//! table may go to a level below L0 only where no compaction output can land on top of it.
//!
//! # Invariants
//! - Set under the manifest lock in the same critical section that reads the levels the
//!   task is picked from, and read by an ingest under the manifest lock it installs with. So
//!   an ingested table is either in the levels a task was picked from (and merged with it if
//!   it overlaps) or placed knowing the task.
//! - Cleared when the task is over (installed or failed): by then its outputs are in the
//!   manifest, where an ingest's overlap check sees them.

use parking_lot::Mutex;

use crate::engine::sstable::TableMeta;

use super::policy::CompactionTask;

/// Where the running compaction writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Every level (a major compaction, a range drop): nothing goes below L0 meanwhile.
    Everything,
    /// Tables of `level` within `[min_key, max_key]`.
    Range {
        level: usize,
        min_key: Vec<u8>,
        max_key: Vec<u8>,
    },
}

impl Busy {
    /// The output of `task` over `levels` (the layout it was picked from).
    pub(crate) fn of(task: &CompactionTask, levels: &[Vec<TableMeta>]) -> Busy {
        let tables: Vec<&TableMeta> = levels
            .iter()
            .flatten()
            .filter(|t| task.inputs.contains(&t.id) || task.overlapping.contains(&t.id))
            .collect();
        let min_key = tables.iter().map(|t| &t.min_key).min().cloned();
        let max_key = tables.iter().map(|t| &t.max_key).max().cloned();
        match (min_key, max_key) {
            (Some(min_key), Some(max_key)) => Busy::Range {
                level: task.output_level,
                min_key,
                max_key,
            },
            _ => Busy::Everything,
        }
    }

    /// Whether a table of `[min_key, max_key]` at `level` could end up under this output.
    pub(crate) fn blocks(&self, level: usize, min_key: &[u8], max_key: &[u8]) -> bool {
        match self {
            Busy::Everything => true,
            Busy::Range {
                level: out,
                min_key: lo,
                max_key: hi,
            } => *out == level && !(hi.as_slice() < min_key || lo.as_slice() > max_key),
        }
    }
}

/// The running compaction's output, if any.
#[derive(Debug, Default)]
pub(crate) struct RunningOutput(Mutex<Option<Busy>>);

impl RunningOutput {
    /// Records `busy` until the returned guard is dropped.
    pub(crate) fn mark(&self, busy: Busy) -> Marked<'_> {
        *self.0.lock() = Some(busy);
        Marked(self)
    }

    pub(crate) fn get(&self) -> Option<Busy> {
        self.0.lock().clone()
    }
}

/// Clears the running output when dropped.
pub(crate) struct Marked<'a>(&'a RunningOutput);

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        *self.0.0.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_blocks_its_output_level_over_its_key_range_only() {
        let busy = Busy::Range {
            level: 3,
            min_key: b"d".to_vec(),
            max_key: b"k".to_vec(),
        };
        assert!(busy.blocks(3, b"a", b"d"), "touching its first key");
        assert!(busy.blocks(3, b"e", b"f"), "inside");
        assert!(!busy.blocks(3, b"l", b"z"), "after it");
        assert!(!busy.blocks(2, b"e", b"f"), "another level");
        assert!(Busy::Everything.blocks(1, b"a", b"b"));
        let running = RunningOutput::default();
        {
            let _marked = running.mark(busy.clone());
            assert_eq!(running.get(), Some(busy));
        }
        assert_eq!(running.get(), None, "cleared when the task is over");
    }
}
