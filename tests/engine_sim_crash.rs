//! Crash consistency on a simulated disk (`pairdb::engine::vfs::SimVfs`): the engine runs a
//! workload (puts, deletes, batches, ingested batches, flushes, compactions, hash-range drops, log rotations,
//! segment deletion) and crashes at a chosen file operation; the disk then keeps what a
//! `kill -9` keeps, or what a power loss may keep (the synced state plus any subset of unsynced
//! writes, torn and reordered, and of unsynced directory changes). Reopened without any flag,
//! the engine must open, every acknowledged write must be present or superseded by a newer
//! version, and a key of an acknowledged range drop must stay gone.
//!
//! - `a_crash_at_every_operation_of_a_scripted_workload`: every operation index, both kinds of
//!   crash, several power-loss images each.
//! - `crashes_at_random_points_of_random_workloads`: proptest (`PROPTEST_CASES`, default 2000
//!   here; CI runs the default).
//! - `a_failed_table_writeback_fails_the_flush_or_compaction_and_installs_nothing`: an I/O
//!   error without a crash, where a table's writeback starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use pairdb::engine::SyncMode;
use pairdb::engine::compaction::policy::LevelPolicy;
use pairdb::engine::vfs::{SimVfs, Vfs};
use pairdb::engine::{Engine, EngineOptions, Record};
use pairdb::ring::{HashRange, key_position};
use pairdb::vclock::{VectorClock, Version, physical_counter};
use proptest::prelude::*;

const DIR: &str = "/sim/engine";
const TENANT: &str = "t";

/// Small sizes, so a short workload rotates segments (at `segment_bytes`), flushes and
/// compacts.
fn small_options(disk: &SimVfs, segment_bytes: u64) -> EngineOptions {
    EngineOptions {
        sync: SyncMode::Always,
        segment_bytes,
        memtable_bytes: 4 * 1024,
        table_bytes: 4 * 1024,
        block_bytes: 512,
        levels: LevelPolicy {
            l0_trigger: 2,
            l0_bytes: 8 * 1024,
            base_bytes: 8 * 1024,
            multiplier: 4,
            max_levels: 4,
        },
        cache_bytes: 64 * 1024,
        compaction_bytes_per_sec: None,
        background: false,
        vfs: Arc::new(disk.clone()),
        ..EngineOptions::default()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        key: u8,
        len: u16,
    },
    /// One batch of `n` records of `kib` KiB each: more than the log buffers, so it reaches
    /// the file in several writes before one sync.
    Large {
        first: u8,
        n: u8,
        kib: u16,
    },
    Delete {
        key: u8,
    },
    Batch {
        first: u8,
        n: u8,
    },
    /// The same as `Batch`, through `Engine::ingest` (a table where the keys are new).
    Ingest {
        first: u8,
        n: u8,
    },
    /// Drops the ring hashes `[start << 56, (start + width) << 56)`.
    DropRange {
        start: u8,
        width: u8,
    },
    Flush,
    CompactLevels,
    Compact,
}

impl Step {
    /// The keys a write step writes.
    fn written_keys(&self) -> Vec<String> {
        let run = |first: u8, n: u8| (0..n).map(|j| key(first.wrapping_add(j))).collect();
        match self {
            Step::Put { key: k, .. } | Step::Delete { key: k } => vec![key(*k)],
            Step::Batch { first, n } | Step::Ingest { first, n } | Step::Large { first, n, .. } => {
                run(*first, *n)
            }
            _ => Vec::new(),
        }
    }
}

fn key(k: u8) -> String {
    format!("key-{k:03}")
}

fn drop_range(start: u8, width: u8) -> HashRange {
    let start = u64::from(start) << 56;
    HashRange::new(start, start.wrapping_add(u64::from(width.max(1)) << 56))
}

fn in_range(range: &HashRange, k: &str) -> bool {
    range.contains(key_position(TENANT, k.as_bytes()))
}

/// What a reopened engine must hold for a key.
#[derive(Debug, Clone)]
enum Expect {
    /// This version or a newer one (it was acknowledged).
    Written(Version),
    /// Nothing (an acknowledged range drop took it, and no write since was acknowledged).
    Dropped,
    /// This version or a newer one, or nothing: a range drop was cut by the crash.
    WrittenOrDropped(Version),
    /// Anything: a write to a dropped key was cut by the crash.
    Any,
}

/// What each key must hold after a crash.
type Acked = BTreeMap<String, Expect>;

/// Writes `n` records of `len` bytes to keys `first..` in one batch (`Engine::apply_batch`,
/// or `Engine::ingest` when `ingest`), at versions counting up from `version`; returns the
/// keys and versions written.
fn apply_batch(
    engine: &Engine,
    version: Version,
    (first, n): (u8, u8),
    len: usize,
    ingest: bool,
) -> pairdb::engine::Result<Vec<(String, Version)>> {
    let base = version.clock.max_counter();
    let written: Vec<(String, Version)> = (0..n)
        .map(|j| {
            let v = Version::new(VectorClock::from_entries([("c1", base + u64::from(j))]));
            (key(first.wrapping_add(j)), v)
        })
        .collect();
    let records = written
        .iter()
        .enumerate()
        .map(|(j, (k, v))| Record::put(TENANT, k.clone(), v.clone(), vec![b'a' + j as u8; len]))
        .collect();
    if ingest {
        engine.ingest(records).map(|_| written)
    } else {
        engine.apply_batch(records).map(|_| written)
    }
}

/// Runs `steps` on an engine on `disk` until the first error (the crash); returns what was
/// acknowledged and how many steps completed.
fn run(disk: &SimVfs, steps: &[Step], segment_bytes: u64) -> (Acked, usize) {
    let mut acked = Acked::new();
    let Ok(engine) = Engine::open(DIR, small_options(disk, segment_bytes)) else {
        return (acked, 0);
    };
    let mut completed = 0;
    let base = physical_counter(pairdb::wallclock::now_ms());
    for (i, step) in steps.iter().enumerate() {
        let version = Version::new(VectorClock::from_entries([("c1", base + i as u64 * 16)]));
        let done = match step {
            Step::Put { key: k, len } => {
                let value = vec![b'a' + (i % 26) as u8; usize::from(*len)];
                engine
                    .apply(Record::put(TENANT, key(*k), version.clone(), value))
                    .map(|_| vec![(key(*k), version)])
            }
            Step::Delete { key: k } => engine
                .apply(Record::tombstone(TENANT, key(*k), version.clone()))
                .map(|_| vec![(key(*k), version)]),
            Step::Batch { first, n } => {
                apply_batch(&engine, version.clone(), (*first, *n), 40, false)
            }
            Step::Ingest { first, n } => {
                apply_batch(&engine, version.clone(), (*first, *n), 40, true)
            }
            Step::Large { first, n, kib } => apply_batch(
                &engine,
                version.clone(),
                (*first, *n),
                usize::from(*kib) * 1024,
                false,
            ),
            Step::DropRange { start, width } => {
                let range = drop_range(*start, *width);
                match engine.drop_hash_ranges(&[range]) {
                    Ok(_) => {
                        for (k, expect) in acked.iter_mut() {
                            if in_range(&range, k) {
                                *expect = Expect::Dropped;
                            }
                        }
                        Ok(Vec::new())
                    }
                    Err(e) => {
                        for (k, expect) in acked.iter_mut() {
                            if let (true, Expect::Written(v)) = (in_range(&range, k), &*expect) {
                                *expect = Expect::WrittenOrDropped(v.clone());
                            }
                        }
                        Err(e)
                    }
                }
            }
            Step::Flush => engine.flush().map(|()| Vec::new()),
            Step::CompactLevels => engine.compact_levels().map(|()| Vec::new()),
            Step::Compact => engine.compact().map(|()| Vec::new()),
        };
        match done {
            Ok(written) => acked.extend(written.into_iter().map(|(k, v)| (k, Expect::Written(v)))),
            Err(_) => {
                // The cut write may have landed: a dropped key may be back.
                for k in step.written_keys() {
                    if let Some(expect @ Expect::Dropped) = acked.get_mut(&k) {
                        *expect = Expect::Any;
                    }
                }
                break;
            }
        }
        completed += 1;
    }
    (acked, completed)
}

/// Opens the engine on a crash image without any flag and checks every acknowledged write.
fn check(image: SimVfs, acked: &Acked, what: &str, segment_bytes: u64) -> Result<(), String> {
    let engine = Engine::open(DIR, small_options(&image, segment_bytes))
        .map_err(|e| format!("{what}: the engine does not open: {e}"))?;
    for (k, expect) in acked {
        let found = engine
            .get(TENANT, k.as_bytes())
            .map_err(|e| format!("{what}: reading {k}: {e}"))?;
        let at_least = |v: &Version| {
            found
                .as_ref()
                .is_some_and(|r| r.version.precedence(v) != Ordering::Less)
        };
        let fine = match expect {
            Expect::Written(v) => at_least(v),
            Expect::Dropped => found.is_none(),
            Expect::WrittenOrDropped(v) => found.is_none() || at_least(v),
            Expect::Any => true,
        };
        if !fine {
            return Err(format!(
                "{what}: {k} should be {expect:?}, found {:?}",
                found.map(|r| r.version.clone())
            ));
        }
    }
    // A second open after recovery sees the same (recovery leaves a clean state).
    drop(engine);
    Engine::open(DIR, small_options(&image, segment_bytes))
        .map(drop)
        .map_err(|e| format!("{what}: the second open fails: {e}"))
}

/// Runs `steps` crashing at operation `at`, then checks a kill -9 image and `images`
/// power-loss images.
fn crash_and_check(
    steps: &[Step],
    segment_bytes: u64,
    at: u64,
    images: u64,
    seed: u64,
) -> Result<(), String> {
    let disk = SimVfs::new();
    disk.crash_at(at);
    let (acked, _) = run(&disk, steps, segment_bytes);
    let killed = format!("kill -9 at op {at}");
    check(disk.process_crash(), &acked, &killed, segment_bytes)?;
    for i in 0..images {
        let s = seed.wrapping_mul(31).wrapping_add(i);
        let what = format!("power loss at op {at} (image seed {s})");
        check(disk.power_loss(s), &acked, &what, segment_bytes)?;
    }
    Ok(())
}

/// Crashes `steps` at every operation index; the failures, if any.
fn sweep(steps: &[Step], segment_bytes: u64, images: u64) -> (u64, Vec<String>) {
    let full = SimVfs::new();
    let (_, completed) = run(&full, steps, segment_bytes);
    assert_eq!(
        completed,
        steps.len(),
        "the workload runs to the end without a crash"
    );
    let ops = full.operations();
    let failures = (0..=ops)
        .filter_map(|at| crash_and_check(steps, segment_bytes, at, images, at).err())
        .collect();
    (ops, failures)
}

fn assert_no_failures(ops: u64, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {} crash points fail; first: {}",
        failures.len(),
        ops + 1,
        failures[0]
    );
}

fn scripted() -> Vec<Step> {
    let mut steps = Vec::new();
    for round in 0..3u8 {
        for k in 0..12u8 {
            steps.push(Step::Put {
                key: k + round,
                len: 60 + u16::from(k) * 7,
            });
        }
        steps.push(Step::Batch {
            first: 5 * round,
            n: 6,
        });
        steps.push(Step::Delete { key: 3 + round });
        // Keys new to the engine and keys it holds, in one ingested batch.
        steps.push(Step::Ingest {
            first: 9 + 4 * round,
            n: 8,
        });
        // A drop while the memtable holds keys of its range (round 0) and after a flush.
        if round == 0 {
            steps.push(Step::DropRange {
                start: 0,
                width: 60,
            });
        }
        steps.push(Step::Flush);
        steps.push(Step::CompactLevels);
        steps.push(Step::DropRange {
            start: 80 * round + 60,
            width: 70,
        });
    }
    steps.push(Step::Put { key: 1, len: 300 });
    steps.push(Step::Compact);
    steps.push(Step::Delete { key: 1 });
    steps.push(Step::Put { key: 2, len: 10 });
    steps
}

#[test]
fn the_scripted_drops_take_keys_from_memtables_and_tables() {
    let disk = SimVfs::new();
    let (acked, _) = run(&disk, &scripted(), 2 * 1024);
    let dropped = acked
        .values()
        .filter(|e| matches!(e, Expect::Dropped))
        .count();
    assert!(
        dropped >= 4,
        "the script drops too little to test: {dropped}"
    );
}

#[test]
fn a_crash_at_every_operation_of_a_scripted_workload() {
    let (ops, failures) = sweep(&scripted(), 2 * 1024, 3);
    assert!(ops > 100, "the workload does many file operations: {ops}");
    assert_no_failures(ops, &failures);
}

/// A batch larger than the log's buffer reaches the file in several writes before its one
/// sync: a power loss may keep a later write and lose an earlier one (zeros, then frames).
/// Those frames were never synced, so recovery cuts them instead of refusing to open.
#[test]
fn unsynced_writes_of_a_large_batch_landing_out_of_order_are_cut() {
    let steps = vec![
        Step::Put { key: 1, len: 100 },
        Step::Put { key: 2, len: 100 },
        Step::Large {
            first: 10,
            n: 5,
            kib: 500,
        },
        Step::Put { key: 3, len: 100 },
    ];
    let (ops, failures) = sweep(&steps, 64 << 20, 8);
    assert_no_failures(ops, &failures);
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..24, 1u16..400).prop_map(|(key, len)| Step::Put { key, len }),
        2 => (0u8..24).prop_map(|key| Step::Delete { key }),
        2 => (0u8..24, 1u8..8).prop_map(|(first, n)| Step::Batch { first, n }),
        2 => (0u8..40, 1u8..12).prop_map(|(first, n)| Step::Ingest { first, n }),
        1 => Just(Step::Flush),
        1 => Just(Step::CompactLevels),
        1 => Just(Step::Compact),
        1 => (any::<u8>(), 1u8..128).prop_map(|(start, width)| Step::DropRange { start, width }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn crashes_at_random_points_of_random_workloads(
        steps in prop::collection::vec(step(), 1..60),
        crash_fraction in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let full = SimVfs::new();
        let (_, completed) = run(&full, &steps, 2 * 1024);
        prop_assert_eq!(completed, steps.len());
        let at = (full.operations() as f64 * crash_fraction) as u64;
        if let Err(e) = crash_and_check(&steps, 2 * 1024, at, 2, seed) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// Options under which a flush or a compaction writes one table of more than 1 MiB, the
/// step at which table writes hand their bytes to writeback.
fn large_table_options(disk: &SimVfs) -> EngineOptions {
    EngineOptions {
        memtable_bytes: 64 << 20,
        table_bytes: 64 << 20,
        levels: LevelPolicy {
            l0_trigger: 8,
            l0_bytes: 64 << 20,
            base_bytes: 64 << 20,
            multiplier: 4,
            max_levels: 4,
        },
        ..small_options(disk, 64 << 20)
    }
}

/// Writes 40 records of 32 KiB (1.3 MB, over the 1 MiB writeback step) to `{prefix}0..39`.
fn write_large_batch(engine: &Engine, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let version = Version::new(VectorClock::from_entries([(
        "c1",
        physical_counter(pairdb::wallclock::now_ms()),
    )]));
    let written: Vec<(String, Vec<u8>)> = (0..40u8)
        .map(|i| (format!("{prefix}{i}"), vec![b'a' + i % 26; 32 * 1024]))
        .collect();
    let records = written
        .iter()
        .map(|(k, v)| Record::put(TENANT, k.clone(), version.clone(), v.clone()))
        .collect();
    engine.apply_batch(records).expect("durable write");
    written
}

fn assert_reads_back(engine: &Engine, written: &[(String, Vec<u8>)], what: &str) {
    for (k, v) in written {
        let found = engine.get(TENANT, k.as_bytes()).expect("read");
        assert_eq!(
            found.as_ref().and_then(|r| r.value.as_deref()),
            Some(v.as_slice()),
            "{what}: {k}"
        );
    }
}

/// An error starting a table's writeback (`sync_file_range` reports an earlier page's failed
/// writeback there) fails the flush or compaction writing that table, which installs nothing:
/// the tables stay as they were, every write still reads back, and the half-written file is
/// not in the manifest (the next open removes it). Once the disk works again the same flush
/// and compaction succeed, and everything survives a `kill -9`.
#[test]
fn a_failed_table_writeback_fails_the_flush_or_compaction_and_installs_nothing() {
    let disk = SimVfs::new();
    let engine = Engine::open(DIR, large_table_options(&disk)).expect("open");
    let mut written = write_large_batch(&engine, "a");

    disk.fail_writeback(true);
    assert!(engine.flush().is_err(), "the flush's writeback failed");
    assert_eq!(engine.stats().sstables, 0, "no table installed");
    assert_reads_back(&engine, &written, "after the failed flush");
    disk.fail_writeback(false);
    engine.flush().expect("flush once the disk works");
    assert_eq!(engine.stats().sstables, 1);

    written.extend(write_large_batch(&engine, "b"));
    engine.flush().expect("second flush");
    let before = engine.stats().levels;
    assert_eq!(before[0].0, 2, "two tables in L0: {before:?}");
    disk.fail_writeback(true);
    assert!(
        engine.compact().is_err(),
        "the compaction's writeback failed"
    );
    assert_eq!(engine.stats().levels, before, "the levels are unchanged");
    assert_reads_back(&engine, &written, "after the failed compaction");
    disk.fail_writeback(false);
    engine.compact().expect("compaction once the disk works");
    assert_eq!(engine.stats().sstables, 1, "{:?}", engine.stats().levels);
    assert_reads_back(&engine, &written, "after the compaction");

    let image = disk.process_crash();
    drop(engine);
    let reopened = Engine::open(DIR, large_table_options(&image)).expect("reopen");
    assert_reads_back(&reopened, &written, "after kill -9");
    let files = image
        .list(&std::path::Path::new(DIR).join("sst"))
        .expect("list");
    assert_eq!(files.len(), 1, "only the live table is left: {files:?}");
}
