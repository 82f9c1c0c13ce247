//! The range hash trees the engine keeps incrementally equal trees rebuilt from a scan: after
//! any sequence of writes, stale writes, deletes, ingested batches, flushes, compactions (which collect
//! tombstones past gc_grace), range drops and reopens (property test), and while writers race
//! compactions and drops on other threads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use pairdb::engine::SyncMode;
use pairdb::engine::compaction::policy::LevelPolicy;
use pairdb::engine::trees::{SEGMENTS, SegmentGroup, record_entry, segment_of};
use pairdb::engine::{Engine, EngineOptions, RangeDrop, Record};
use pairdb::ring::HashRange;
use pairdb::vclock::{VectorClock, Version, physical_counter};
use proptest::prelude::*;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// Tombstones written "two hours ago" are past this and collected by bottommost compactions;
/// those written now are not.
const GC_GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
enum Op {
    Put {
        tenant: usize,
        key: u8,
        counter: u64,
        old: bool,
    },
    Delete {
        tenant: usize,
        key: u8,
        counter: u64,
        old: bool,
    },
    DropRange {
        start: u64,
        end: u64,
        tenant: Option<usize>,
    },
    /// One `Engine::ingest` of these puts and deletes (tenant, key, counter, old, delete).
    Ingest {
        records: Vec<(usize, u8, u64, bool, bool)>,
    },
    Flush,
    CompactLevels,
    Compact,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3usize, any::<u8>(), 1..40u64, any::<bool>())
            .prop_map(|(tenant, key, counter, old)| Op::Put { tenant, key, counter, old }),
        4 => (0..3usize, any::<u8>(), 1..40u64, any::<bool>())
            .prop_map(|(tenant, key, counter, old)| Op::Delete { tenant, key, counter, old }),
        1 => (any::<u64>(), any::<u64>(), prop::option::of(0..TENANTS.len()))
            .prop_map(|(start, end, tenant)| Op::DropRange { start, end, tenant }),
        2 => prop::collection::vec((0..3usize, any::<u8>(), 1..40u64, any::<bool>(), any::<bool>()), 1..30)
            .prop_map(|records| Op::Ingest { records }),
        1 => Just(Op::Flush),
        1 => Just(Op::CompactLevels),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

fn options(background: bool) -> EngineOptions {
    EngineOptions {
        sync: SyncMode::Never,
        memtable_bytes: 4 * 1024,
        block_bytes: 512,
        table_bytes: 8 * 1024,
        levels: LevelPolicy {
            l0_trigger: 2,
            l0_bytes: 16 * 1024,
            base_bytes: 16 * 1024,
            multiplier: 4,
            max_levels: 3,
        },
        cache_bytes: 16 * 1024,
        compaction_bytes_per_sec: None,
        gc_grace: GC_GRACE,
        background,
        ..EngineOptions::default()
    }
}

/// A counter two hours old (`old`, so a tombstone is past gc_grace) or of this hour.
fn version(counter: u64, old: bool) -> Version {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let hour = now - now % 3_600_000;
    let base = physical_counter(if old { hour - 7_200_000 } else { hour });
    Version::new(VectorClock::from_entries([("c1", base + counter)]))
}

fn key_bytes(key: u8) -> Vec<u8> {
    format!("key-{key:03}").into_bytes()
}

/// The trees a scan of every winner gives.
fn rebuilt(engine: &Engine, tenant: &str) -> BTreeMap<u32, u64> {
    let mut segments: BTreeMap<u32, u64> = BTreeMap::new();
    for record in engine.scan_tenant(tenant).expect("scan") {
        let record = record.expect("scan item");
        *segments.entry(segment_of(record.ring_hash)).or_insert(0) ^= record_entry(&record);
    }
    segments.retain(|_, h| *h != 0);
    segments
}

fn assert_trees_match(engine: &Engine) -> Result<(), TestCaseError> {
    for tenant in TENANTS {
        let kept = engine.tree_segments(tenant);
        let scanned = rebuilt(engine, tenant);
        prop_assert_eq!(&kept, &scanned, "tenant {}", tenant);
        let whole = engine
            .segment_hashes(
                tenant,
                &[SegmentGroup {
                    first: 0,
                    count: SEGMENTS,
                }],
            )
            .expect("segment hashes");
        prop_assert_eq!(whole, vec![scanned.values().fold(0, |a, h| a ^ h)]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn incremental_trees_equal_trees_rebuilt_from_a_scan(ops in prop::collection::vec(op(), 1..250)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut engine = Engine::open(dir.path(), options(false)).expect("open");
        for op in ops {
            match op {
                Op::Put { tenant, key, counter, old } => {
                    let value = vec![b'a' + (counter % 26) as u8; 40];
                    engine.apply(Record::put(TENANTS[tenant], key_bytes(key), version(counter, old), value)).expect("put");
                }
                Op::Delete { tenant, key, counter, old } => {
                    engine.apply(Record::tombstone(TENANTS[tenant], key_bytes(key), version(counter, old))).expect("delete");
                }
                Op::DropRange { start, end, tenant } => {
                    let drop = RangeDrop {
                        tenants: tenant.map(|t| BTreeSet::from([TENANTS[t].to_owned()])),
                        ranges: vec![HashRange::new(start, end)],
                    };
                    engine.drop_ranges(&[drop]).expect("drop");
                }
                Op::Ingest { records } => {
                    let records = records.into_iter().map(|(tenant, key, counter, old, delete)| {
                        let (tenant, key, version) = (TENANTS[tenant], key_bytes(key), version(counter, old));
                        if delete {
                            Record::tombstone(tenant, key, version)
                        } else {
                            Record::put(tenant, key, version, vec![b'a' + (counter % 26) as u8; 40])
                        }
                    });
                    engine.ingest(records.collect()).expect("ingest");
                }
                Op::Flush => engine.flush().expect("flush"),
                Op::CompactLevels => engine.compact_levels().expect("compact levels"),
                Op::Compact => engine.compact().expect("compact"),
                Op::Reopen => {
                    engine.close().expect("close");
                    drop(engine);
                    engine = Engine::open(dir.path(), options(false)).expect("reopen");
                }
            }
            assert_trees_match(&engine)?;
        }
    }
}

/// Writers on two threads (old tombstones among their writes, so compactions collect them)
/// while the main thread flushes, compacts and drops ranges: the trees never drift from the
/// data, whatever falls between a compaction's merge and its install.
#[test]
fn trees_stay_exact_while_writes_race_compactions_and_drops() {
    const WRITES: u64 = 4000;
    const ROUNDS: u64 = 12;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = EngineOptions {
        memtable_bytes: 32 * 1024,
        ..options(true)
    };
    let engine = Arc::new(Engine::open(dir.path(), options).expect("open"));
    // The writers go on until the main thread has raced them for ROUNDS rounds, however slow
    // the machine: a fixed number of writes could end before the first compaction.
    let raced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (engine, raced) = (engine.clone(), raced.clone());
            std::thread::spawn(move || {
                for i in 1.. {
                    if i > WRITES && raced.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    let key = key_bytes(((i * 7 + w * 13) % 200) as u8);
                    let tenant = TENANTS[(i % 3) as usize];
                    let counter = i * 2 + w;
                    let record = if i % 3 == 0 {
                        Record::tombstone(tenant, key, version(counter, i % 2 == 0))
                    } else {
                        Record::put(tenant, key, version(counter, i % 5 == 0), vec![b'v'; 64])
                    };
                    engine.apply(record).expect("apply");
                }
            })
        })
        .collect();
    let mut round = 0u64;
    while writers.iter().any(|w| !w.is_finished()) {
        round += 1;
        if round == ROUNDS {
            raced.store(true, std::sync::atomic::Ordering::Release);
        }
        engine.flush().expect("flush");
        if round % 3 == 0 {
            engine.compact().expect("compact");
        }
        if round % 5 == 0 {
            let start = round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let range = HashRange::new(start, start.wrapping_add(1 << 61));
            engine.drop_hash_ranges(&[range]).expect("drop");
        }
    }
    for w in writers {
        w.join().expect("writer");
    }
    assert!(
        engine.stats().tombstones_dropped > 0,
        "the test must collect tombstones"
    );
    assert_trees_match(&engine).expect("trees match the data");
}

/// Says yes only once told to (a range repaired after the tombstones were written).
#[derive(Debug, Default)]
struct Gate(std::sync::atomic::AtomicBool);

impl pairdb::engine::TombstoneGate for Gate {
    fn may_purge(&self, _tenant: &str, _ring_hash: u64, _written_ms: u64) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A tombstone past gc_grace stays through compactions until the gate agrees, and the trees
/// follow its purge.
#[test]
fn tombstones_past_gc_grace_wait_for_the_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Arc::new(Gate::default());
    let options = EngineOptions {
        tombstone_gate: Some(gate.clone()),
        ..options(false)
    };
    let engine = Engine::open(dir.path(), options).expect("open");
    engine
        .apply(Record::put("acme", "k", version(1, true), "v"))
        .expect("put");
    engine
        .apply(Record::tombstone("acme", "k", version(2, true)))
        .expect("delete");
    engine.flush().expect("flush");
    engine.compact().expect("compact");
    let kept = engine.get("acme", b"k").expect("get");
    assert!(kept.is_some_and(|r| r.is_tombstone()), "the gate said no");
    assert_eq!(engine.stats().tombstones_dropped, 0);
    gate.0.store(true, std::sync::atomic::Ordering::Release);
    engine.compact().expect("compact");
    assert_eq!(engine.get("acme", b"k").expect("get"), None);
    assert_eq!(engine.stats().tombstones_dropped, 1);
    assert!(
        engine.tree_segments("acme").is_empty(),
        "the trees follow the purge"
    );
}
