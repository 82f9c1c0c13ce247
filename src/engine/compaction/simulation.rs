//! A simulated load for the compaction policy: flushes of uniformly random keys arrive at a
//! steady rate, one compaction runs at a time at a fixed write speed (the engine has one
//! compaction worker), and the simulation counts what the policy makes the disk write.
//!
//! Keys are 4-byte big-endian numbers; a table covers `[min_key, max_key]` with its bytes
//! spread evenly over that span (uniformly random keys, every key written once, so a merge
//! keeps every byte). A flush covers the whole key space. Merge outputs are cut into tables of
//! at most `table_bytes` by integrating the inputs' densities over 1,024 slices of the merged
//! span.

use crate::engine::sstable::TableMeta;

use super::policy::CompactionTask;

/// The load and the machine.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Bytes of one flushed table.
    pub flush_bytes: u64,
    /// Bytes flushed over the whole load.
    pub total_bytes: u64,
    /// Largest merge output table.
    pub table_bytes: u64,
    /// Flushed bytes per second (the writers' pace in table bytes).
    pub ingest_per_sec: f64,
    /// Merge output bytes per second (the compaction's pace).
    pub compact_per_sec: f64,
}

/// What the load cost.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub flushed: u64,
    /// Merge output bytes until the last flush of the load.
    pub compacted_during_load: u64,
    /// Merge output bytes until nothing is left to do.
    pub compacted: u64,
    /// Tables moved down without a rewrite.
    pub moves: u64,
    pub merges: u64,
    /// Most L0 tables at once (what a point read may have to consult).
    pub max_l0: usize,
    /// Bytes per level at the end.
    pub level_bytes: Vec<u64>,
    /// Merge output bytes by output level, until nothing is left to do.
    pub written_into: Vec<u64>,
    /// Every layout after each task, checked by the caller's invariants.
    pub layouts_checked: usize,
}

impl Outcome {
    /// Table bytes written (flushes and merges) per flushed byte, during the load.
    pub fn write_amplification_during_load(&self) -> f64 {
        (self.flushed + self.compacted_during_load) as f64 / self.flushed.max(1) as f64
    }

    /// The same once the policy has nothing left to do.
    pub fn write_amplification(&self) -> f64 {
        (self.flushed + self.compacted) as f64 / self.flushed.max(1) as f64
    }
}

pub fn table(id: u64, lo: u32, hi: u32, bytes: u64) -> TableMeta {
    let mut t = TableMeta::empty(id);
    t.min_key = lo.to_be_bytes().to_vec();
    t.max_key = hi.to_be_bytes().to_vec();
    t.file_bytes = bytes;
    t
}

fn bound(key: &[u8]) -> u64 {
    key.get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, |b| u64::from(u32::from_be_bytes(b)))
}

/// The output tables of `task` on `levels` (ids from `next_id`), not yet installed.
fn merge_outputs(
    levels: &[Vec<TableMeta>],
    task: &CompactionTask,
    next_id: &mut u64,
    table_bytes: u64,
) -> Vec<TableMeta> {
    const SLICES: u64 = 1024;
    let merged: Vec<&TableMeta> = levels
        .iter()
        .flatten()
        .filter(|t| task.inputs.contains(&t.id) || task.overlapping.contains(&t.id))
        .collect();
    let Some(lo) = merged.iter().map(|t| bound(&t.min_key)).min() else {
        return Vec::new();
    };
    let hi = merged.iter().map(|t| bound(&t.max_key)).max().unwrap_or(lo);
    let width = ((hi - lo + 1) / SLICES).max(1);
    let mut outputs = Vec::new();
    let mut start = lo;
    let mut bytes = 0.0f64;
    let mut slice_lo = lo;
    while slice_lo <= hi {
        let slice_hi = (slice_lo + width - 1).min(hi);
        let slice_bytes: f64 = merged
            .iter()
            .map(|t| {
                let (a, b) = (bound(&t.min_key), bound(&t.max_key));
                let common = slice_hi.min(b) as f64 - slice_lo.max(a) as f64 + 1.0;
                if common <= 0.0 {
                    0.0
                } else {
                    t.file_bytes as f64 * common / (b - a + 1) as f64
                }
            })
            .sum();
        if bytes > 0.0 && bytes + slice_bytes > table_bytes as f64 {
            *next_id += 1;
            outputs.push(table(
                *next_id,
                start as u32,
                (slice_lo - 1) as u32,
                bytes as u64,
            ));
            start = slice_lo;
            bytes = 0.0;
        }
        bytes += slice_bytes;
        slice_lo = slice_hi + 1;
    }
    *next_id += 1;
    outputs.push(table(*next_id, start as u32, hi as u32, bytes as u64));
    outputs
}

/// Installs a task: its tables leave, `outputs` join the output level (a move: the input
/// itself does).
fn install(levels: &mut Vec<Vec<TableMeta>>, task: &CompactionTask, outputs: Vec<TableMeta>) {
    let mut moved = Vec::new();
    for level in levels.iter_mut() {
        level.retain(|t| {
            let taken = task.inputs.contains(&t.id) || task.overlapping.contains(&t.id);
            if taken && task.is_move() {
                moved.push(t.clone());
            }
            !taken
        });
    }
    if levels.len() <= task.output_level {
        levels.resize_with(task.output_level + 1, Vec::new);
    }
    if let Some(out) = levels.get_mut(task.output_level) {
        out.extend(moved);
        out.extend(outputs);
        out.sort_by(|a, b| a.min_key.cmp(&b.min_key));
    }
}

/// Runs `load` under `pick`, calling `check` on every layout a task leaves.
pub fn simulate(
    load: Load,
    pick: &dyn Fn(&[Vec<TableMeta>]) -> Option<CompactionTask>,
    check: &mut dyn FnMut(&[Vec<TableMeta>], &CompactionTask),
) -> Outcome {
    let mut levels: Vec<Vec<TableMeta>> = vec![Vec::new()];
    let mut next_id = 0u64;
    let mut out = Outcome::default();
    let flush_every = load.flush_bytes as f64 / load.ingest_per_sec;
    let mut next_flush = flush_every;
    let mut running: Option<(f64, CompactionTask, Vec<TableMeta>)> = None;
    let mut now = 0.0f64;
    loop {
        // Start what can start now; moves land at once, so several may in a row.
        while running.is_none() {
            let Some(task) = pick(&levels) else { break };
            start(
                &mut levels,
                task,
                &mut next_id,
                &load,
                now,
                &mut out,
                &mut running,
                check,
            );
        }
        let loading = out.flushed < load.total_bytes;
        let done_at = running.as_ref().map(|r| r.0);
        now = match (loading, done_at) {
            (true, Some(end)) if end <= next_flush => end,
            (true, _) => next_flush,
            (false, Some(end)) => end,
            (false, None) => break,
        };
        if running.as_ref().is_some_and(|r| r.0 <= now) {
            if let Some((_, task, outputs)) = running.take() {
                install(&mut levels, &task, outputs);
                check(&levels, &task);
                out.layouts_checked += 1;
            }
        } else {
            next_id += 1;
            if let Some(l0) = levels.first_mut() {
                l0.insert(0, table(next_id, 0, u32::MAX, load.flush_bytes));
                out.max_l0 = out.max_l0.max(l0.len());
            }
            out.flushed += load.flush_bytes;
            next_flush += flush_every;
        }
    }
    out.level_bytes = levels
        .iter()
        .map(|l| l.iter().map(|t| t.file_bytes).sum())
        .collect();
    out
}

/// Starts `task` at `now`: a move lands at once, a merge when its outputs are written.
#[allow(clippy::too_many_arguments)]
fn start(
    levels: &mut Vec<Vec<TableMeta>>,
    task: CompactionTask,
    next_id: &mut u64,
    load: &Load,
    now: f64,
    out: &mut Outcome,
    running: &mut Option<(f64, CompactionTask, Vec<TableMeta>)>,
    check: &mut dyn FnMut(&[Vec<TableMeta>], &CompactionTask),
) {
    if task.is_move() {
        install(levels, &task, Vec::new());
        check(levels, &task);
        out.layouts_checked += 1;
        out.moves += 1;
        return;
    }
    let outputs = merge_outputs(levels, &task, next_id, load.table_bytes);
    let bytes: u64 = outputs.iter().map(|t| t.file_bytes).sum();
    out.compacted += bytes;
    if out.written_into.len() <= task.output_level {
        out.written_into.resize(task.output_level + 1, 0);
    }
    if let Some(into) = out.written_into.get_mut(task.output_level) {
        *into += bytes;
    }
    if out.flushed < load.total_bytes {
        out.compacted_during_load += bytes;
    }
    out.merges += 1;
    *running = Some((now + bytes as f64 / load.compact_per_sec, task, outputs));
}
