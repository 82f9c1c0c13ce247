//! Leveled compaction policy: a pure function from the table layout to the next task.
//!
//! Shape (RocksDB's classic leveled policy):
//! - L0 holds flushed memtables, newest first, ranges overlapping. When it has `l0_trigger`
//!   tables (default 4), all of L0 plus the overlapping L1 tables are merged into L1.
//! - L1.. are sorted runs of disjoint tables. Level n (n >= 1) targets
//!   `level1_bytes * multiplier^(n-1)` bytes (default 256 MiB, x10). The level most over its
//!   target (score = bytes / target > 1) gives its oldest table (lowest id), merged with the
//!   overlapping tables of level n+1.
//! - The output is "bottommost" when no deeper level overlaps its key range: only then may
//!   tombstones older than gc_grace be dropped (a deeper copy could otherwise resurrect).
//!
//! Invariant kept (tested by simulation): after each task, L1.. stay disjoint and sorted.

use crate::engine::sstable::TableMeta;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelPolicy {
    pub l0_trigger: usize,
    pub level1_bytes: u64,
    pub multiplier: u64,
    pub max_levels: usize,
}

impl Default for LevelPolicy {
    fn default() -> Self {
        Self {
            l0_trigger: 4,
            level1_bytes: 256 << 20,
            multiplier: 10,
            max_levels: 7,
        }
    }
}

impl LevelPolicy {
    pub fn target_bytes(&self, level: usize) -> u64 {
        let exp = u32::try_from(level.saturating_sub(1)).unwrap_or(u32::MAX);
        self.level1_bytes
            .saturating_mul(self.multiplier.saturating_pow(exp))
    }
}

/// One merge to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionTask {
    /// Tables taken from `input_level`.
    pub inputs: Vec<u64>,
    pub input_level: usize,
    /// Overlapping tables of `output_level` rewritten with them.
    pub overlapping: Vec<u64>,
    pub output_level: usize,
    /// No deeper level overlaps the merged range: tombstones past gc_grace may go.
    pub bottommost: bool,
}

fn key_span(tables: &[&TableMeta]) -> Option<(Vec<u8>, Vec<u8>)> {
    let lo = tables.iter().map(|t| t.min_key.clone()).min()?;
    let hi = tables.iter().map(|t| t.max_key.clone()).max()?;
    Some((lo, hi))
}

fn overlapping_ids(level: Option<&Vec<TableMeta>>, lo: &[u8], hi: &[u8]) -> Vec<u64> {
    level
        .map(|tables| {
            tables
                .iter()
                .filter(|t| t.overlaps(lo, hi))
                .map(|t| t.id)
                .collect()
        })
        .unwrap_or_default()
}

fn is_bottommost(levels: &[Vec<TableMeta>], output_level: usize, lo: &[u8], hi: &[u8]) -> bool {
    levels
        .iter()
        .skip(output_level + 1)
        .all(|l| l.iter().all(|t| !t.overlaps(lo, hi)))
}

fn task(
    levels: &[Vec<TableMeta>],
    inputs: Vec<&TableMeta>,
    input_level: usize,
    output_level: usize,
) -> Option<CompactionTask> {
    let (lo, hi) = key_span(&inputs)?;
    let overlapping = overlapping_ids(levels.get(output_level), &lo, &hi);
    // The merged range grows to cover the overlapping tables too.
    let mut span: Vec<&TableMeta> = inputs.clone();
    if let Some(out) = levels.get(output_level) {
        span.extend(out.iter().filter(|t| overlapping.contains(&t.id)));
    }
    let (lo, hi) = key_span(&span)?;
    Some(CompactionTask {
        inputs: inputs.iter().map(|t| t.id).collect(),
        input_level,
        overlapping,
        output_level,
        bottommost: is_bottommost(levels, output_level, &lo, &hi),
    })
}

/// The next compaction, if any level needs one.
pub fn pick(levels: &[Vec<TableMeta>], policy: &LevelPolicy) -> Option<CompactionTask> {
    let l0 = levels.first()?;
    if l0.len() >= policy.l0_trigger {
        return task(levels, l0.iter().collect(), 0, 1);
    }
    let last = policy.max_levels.saturating_sub(1);
    let (level, tables, _) = levels
        .iter()
        .enumerate()
        .skip(1)
        .take_while(|(n, _)| *n < last)
        .map(|(n, tables)| {
            let bytes: u64 = tables.iter().map(|t| t.file_bytes).sum();
            (n, tables, bytes as f64 / policy.target_bytes(n) as f64)
        })
        .filter(|(_, _, score)| *score > 1.0)
        .max_by(|a, b| a.2.total_cmp(&b.2))?;
    let oldest = tables.iter().min_by_key(|t| t.id)?;
    task(levels, vec![oldest], level, level + 1)
}

/// A task merging every table into the deepest level in use (at least L1): a major compaction.
pub fn full(levels: &[Vec<TableMeta>]) -> Option<CompactionTask> {
    let deepest = levels.iter().rposition(|l| !l.is_empty())?.max(1);
    let inputs: Vec<u64> = levels
        .iter()
        .take(deepest)
        .flatten()
        .map(|t| t.id)
        .collect();
    let overlapping: Vec<u64> = levels
        .get(deepest)
        .map(|l| l.iter().map(|t| t.id).collect())
        .unwrap_or_default();
    Some(CompactionTask {
        inputs,
        input_level: 0,
        overlapping,
        output_level: deepest,
        bottommost: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(id: u64, lo: u32, hi: u32, bytes: u64) -> TableMeta {
        let mut t = TableMeta::empty(id);
        t.min_key = lo.to_be_bytes().to_vec();
        t.max_key = hi.to_be_bytes().to_vec();
        t.file_bytes = bytes;
        t
    }

    fn disjoint_and_sorted(level: &[TableMeta]) -> bool {
        level.windows(2).all(|w| w[0].max_key < w[1].min_key)
    }

    /// Applies a task the way the worker does: inputs + overlapping replaced by outputs that
    /// split the merged key span into pieces of at most `file_bytes`.
    fn apply(
        levels: &mut Vec<Vec<TableMeta>>,
        t: &CompactionTask,
        next_id: &mut u64,
        file_bytes: u64,
    ) {
        let mut merged: Vec<TableMeta> = Vec::new();
        for level in levels.iter_mut() {
            level.retain(|x| {
                let taken = t.inputs.contains(&x.id) || t.overlapping.contains(&x.id);
                if taken {
                    merged.push(x.clone());
                }
                !taken
            });
        }
        let lo = merged
            .iter()
            .map(|m| u32::from_be_bytes(m.min_key[..4].try_into().expect("4 bytes")))
            .min()
            .expect("inputs");
        let hi = merged
            .iter()
            .map(|m| u32::from_be_bytes(m.max_key[..4].try_into().expect("4 bytes")))
            .max()
            .expect("inputs");
        let total: u64 = merged.iter().map(|m| m.file_bytes).sum();
        let pieces = total.div_ceil(file_bytes).max(1) as u32;
        let width = ((hi - lo) / pieces).max(1);
        while levels.len() <= t.output_level {
            levels.push(Vec::new());
        }
        let out = &mut levels[t.output_level];
        let mut start = lo;
        for p in 0..pieces {
            let end = if p + 1 == pieces {
                hi
            } else {
                (start + width - 1).min(hi)
            };
            *next_id += 1;
            out.push(table(*next_id, start, end, total / u64::from(pieces)));
            if end == hi {
                break;
            }
            start = end + 1;
        }
        out.sort_by(|a, b| a.min_key.cmp(&b.min_key));
    }

    #[test]
    fn simulation_keeps_levels_disjoint_and_bounded() {
        let policy = LevelPolicy {
            l0_trigger: 4,
            level1_bytes: 40,
            multiplier: 10,
            max_levels: 5,
        };
        let mut levels: Vec<Vec<TableMeta>> = vec![Vec::new()];
        let mut next_id = 0u64;
        let mut seed = 12345u32;
        for _ in 0..500 {
            // A flush: a random key span of 10 bytes into L0 (newest first).
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let lo = seed % 1_000_000;
            next_id += 1;
            levels[0].insert(0, table(next_id, lo, lo + 50_000, 10));
            let mut rounds = 0;
            while let Some(t) = pick(&levels, &policy) {
                assert!(t.output_level == t.input_level + 1);
                apply(&mut levels, &t, &mut next_id, 10);
                rounds += 1;
                assert!(rounds < 100, "compaction does not converge");
            }
            assert!(levels[0].len() < policy.l0_trigger);
            for (n, level) in levels.iter().enumerate().skip(1) {
                assert!(disjoint_and_sorted(level), "level {n} overlaps");
                let bytes: u64 = level.iter().map(|t| t.file_bytes).sum();
                if n + 1 < policy.max_levels {
                    assert!(bytes <= policy.target_bytes(n), "level {n} over target");
                }
            }
        }
        assert!(levels.len() >= 3, "data must reach deeper levels");
    }

    #[test]
    fn bottommost_only_without_deeper_overlap() {
        let levels = vec![
            vec![
                table(5, 0, 10, 1),
                table(6, 5, 20, 1),
                table(7, 0, 3, 1),
                table(8, 1, 2, 1),
            ],
            vec![table(3, 0, 8, 1)],
            vec![table(1, 100, 200, 1)],
        ];
        let policy = LevelPolicy::default();
        let t = pick(&levels, &policy).expect("L0 is full");
        assert_eq!(t.output_level, 1);
        assert_eq!(t.overlapping, vec![3]);
        assert!(t.bottommost);
        let levels = vec![
            levels[0].clone(),
            vec![table(3, 0, 8, 1)],
            vec![table(1, 15, 200, 1)],
        ];
        assert!(!pick(&levels, &policy).expect("task").bottommost);
        let f = full(&levels).expect("full");
        assert_eq!(f.output_level, 2);
        assert_eq!(f.inputs.len(), 5);
        assert_eq!(f.overlapping, vec![1]);
    }
}
