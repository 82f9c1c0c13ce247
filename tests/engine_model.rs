//! Model-based property test of the engine: random puts, deletes, stale writes, ingested
//! batches, reads, scans, flushes, compactions, hash-range drops and reopens against a BTreeMap holding each key's
//! winning version.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use pairdb::engine::SyncMode;
use pairdb::engine::compaction::policy::LevelPolicy;
use pairdb::engine::{ApplyOutcome, Engine, EngineOptions, RangeDrop, Record};
use pairdb::ring::HashRange;
use pairdb::vclock::{VectorClock, Version, physical_counter};
use proptest::prelude::*;

const TENANTS: [&str; 3] = ["acme", "globex", "acme2"];

#[derive(Debug, Clone)]
enum Op {
    Put {
        tenant: usize,
        key: u8,
        coord: u8,
        counter: u64,
        len: usize,
        /// Expires this many hours from now (never purged: the expiry lies ahead).
        expires_in_hours: Option<u8>,
    },
    Delete {
        tenant: usize,
        key: u8,
        coord: u8,
        counter: u64,
    },
    /// One `Engine::ingest` of these puts (tenant, key, coord, counter, len): keys new to the
    /// engine go into a table, the rest (and a key's second record) through the write path.
    Ingest {
        puts: Vec<(usize, u8, u8, u64, usize)>,
    },
    Get {
        tenant: usize,
        key: u8,
    },
    ScanTenant {
        tenant: usize,
    },
    ScanRange {
        start: u64,
        end: u64,
    },
    /// Several ranges in one pass (what a stream sends).
    ScanRanges {
        bounds: Vec<(u64, u64)>,
    },
    DropRange {
        start: u64,
        end: u64,
        /// Only this tenant's records (every tenant's when `None`).
        tenant: Option<usize>,
    },
    Flush,
    CompactLevels,
    Compact,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3usize, any::<u8>(), 0..3u8, 1..40u64, 0..300usize, prop::option::of(1..48u8))
            .prop_map(|(tenant, key, coord, counter, len, expires_in_hours)| Op::Put { tenant, key, coord, counter, len, expires_in_hours }),
        3 => (0..3usize, any::<u8>(), 0..3u8, 1..40u64)
            .prop_map(|(tenant, key, coord, counter)| Op::Delete { tenant, key, coord, counter }),
        2 => prop::collection::vec((0..3usize, any::<u8>(), 0..3u8, 1..40u64, 0..300usize), 1..40)
            .prop_map(|puts| Op::Ingest { puts }),
        4 => (0..3usize, any::<u8>()).prop_map(|(tenant, key)| Op::Get { tenant, key }),
        1 => (0..3usize).prop_map(|tenant| Op::ScanTenant { tenant }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(start, end)| Op::ScanRange { start, end }),
        1 => prop::collection::vec((any::<u64>(), any::<u64>()), 1..4)
            .prop_map(|bounds| Op::ScanRanges { bounds }),
        1 => (any::<u64>(), any::<u64>(), prop::option::of(0..TENANTS.len()))
            .prop_map(|(start, end, tenant)| Op::DropRange { start, end, tenant }),
        1 => Just(Op::Flush),
        1 => Just(Op::CompactLevels),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

fn options(cache: bool) -> EngineOptions {
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
            max_levels: 4,
        },
        cache_bytes: if cache { 16 * 1024 } else { 0 },
        compaction_bytes_per_sec: None,
        background: false,
        ..EngineOptions::default()
    }
}

fn key_bytes(key: u8) -> Vec<u8> {
    format!("key-{key:03}").into_bytes()
}

/// Counters are hybrid-logical: recent wall-clock time plus a small step, so tombstones are
/// younger than gc_grace and must survive compaction.
fn version(coord: u8, counter: u64) -> Version {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let base = physical_counter(now - now % 3_600_000);
    Version::new(VectorClock::from_entries([(
        format!("c{coord}"),
        base + counter,
    )]))
}

type Model = BTreeMap<(String, Vec<u8>), Record>;

fn apply(engine: &Engine, model: &mut Model, record: Record) -> Result<(), TestCaseError> {
    let slot = (record.tenant.clone(), record.key.to_vec());
    let expected = match model.get(&slot) {
        Some(current) if !record.version.supersedes(&current.version) => ApplyOutcome::Ignored {
            stored: current.version.clone(),
        },
        _ => ApplyOutcome::Applied,
    };
    let outcome = engine
        .apply(record.clone())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&outcome, &expected);
    if expected.is_applied() {
        model.insert(slot, record);
    }
    Ok(())
}

fn open(dir: &Path, cache: bool) -> Engine {
    Engine::open(dir, options(cache)).expect("open engine")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn engine_matches_the_model(
        ops in prop::collection::vec(op(), 1..300),
        cache in any::<bool>(),
        merge_stacked_runs_at_once in any::<bool>(),
    ) {
        // Runs that ingests stacked above the last level are merged at the first compaction
        // after an ingest, or held for the whole test.
        let model_options = || EngineOptions {
            ingest_quiet: if merge_stacked_runs_at_once {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            },
            ..options(cache)
        };
        let open = |dir: &Path| Engine::open(dir, model_options()).expect("open engine");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut engine = open(dir.path());
        let mut model: Model = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put { tenant, key, coord, counter, len, expires_in_hours } => {
                    let value = vec![b'a' + (counter % 26) as u8; len];
                    let version = version(coord, counter);
                    let expires_at = expires_in_hours
                        .map(|h| version.timestamp_ms() + 3_600_000 * u64::from(h));
                    let record = Record::put(TENANTS[tenant], key_bytes(key), version, value)
                        .expiring(expires_at);
                    apply(&engine, &mut model, record)?;
                }
                Op::Delete { tenant, key, coord, counter } => {
                    apply(&engine, &mut model, Record::tombstone(TENANTS[tenant], key_bytes(key), version(coord, counter)))?;
                }
                Op::Ingest { puts } => {
                    let records: Vec<Record> = puts.iter().map(|(tenant, key, coord, counter, len)| {
                        let value = vec![b'a' + (counter % 26) as u8; *len];
                        Record::put(TENANTS[*tenant], key_bytes(*key), version(*coord, *counter), value)
                    }).collect();
                    // The batch's outcomes are those of applying its records one by one.
                    let mut expected = Vec::with_capacity(records.len());
                    for record in &records {
                        let slot = (record.tenant.clone(), record.key.to_vec());
                        match model.get(&slot) {
                            Some(current) if !record.version.supersedes(&current.version) => {
                                expected.push(ApplyOutcome::Ignored { stored: current.version.clone() });
                            }
                            _ => {
                                expected.push(ApplyOutcome::Applied);
                                model.insert(slot, record.clone());
                            }
                        }
                    }
                    let outcomes = engine.ingest(records).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(outcomes, expected);
                }
                Op::Get { tenant, key } => {
                    // The cache-only path never answers something the model does not hold.
                    let cached = engine.get_cached(TENANTS[tenant], &key_bytes(key));
                    let want = model.get(&(TENANTS[tenant].to_owned(), key_bytes(key)));
                    if cached.is_some() {
                        prop_assert_eq!(cached.as_deref(), want);
                    }
                    let got = engine.get(TENANTS[tenant], &key_bytes(key)).expect("get");
                    prop_assert_eq!(got.as_deref(), want);
                    if cache && got.is_some() {
                        let again = engine.get_cached(TENANTS[tenant], &key_bytes(key));
                        prop_assert_eq!(again.as_deref(), want, "a read fills the cache");
                    }
                }
                Op::ScanTenant { tenant } => {
                    let got: Vec<Record> = engine.scan_tenant(TENANTS[tenant]).expect("scan")
                        .map(|r| r.map(|r| (*r).clone())).collect::<Result<_, _>>().expect("scan item");
                    let want: Vec<Record> = model.iter().filter(|((t, _), _)| t == TENANTS[tenant]).map(|(_, r)| r.clone()).collect();
                    prop_assert_eq!(got, want);
                }
                Op::ScanRange { start, end } => {
                    let range = HashRange::new(start, end);
                    let mut got: Vec<Record> = engine.scan_hash_range(range)
                        .map(|r| r.map(|r| (*r).clone())).collect::<Result<_, _>>().expect("scan item");
                    got.sort_by(|a, b| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
                    let want: Vec<Record> = model.values().filter(|r| range.contains(r.ring_hash)).cloned().collect();
                    prop_assert_eq!(got, want);
                }
                Op::ScanRanges { bounds } => {
                    let ranges: Vec<HashRange> =
                        bounds.iter().map(|(s, e)| HashRange::new(*s, *e)).collect();
                    let got: Vec<Record> = engine.scan_hash_ranges(&ranges)
                        .map(|r| r.map(|r| (*r).clone())).collect::<Result<_, _>>().expect("scan item");
                    // Key order, each record once even where ranges overlap.
                    let want: Vec<Record> = model.values()
                        .filter(|r| ranges.iter().any(|x| x.contains(r.ring_hash))).cloned().collect();
                    prop_assert_eq!(got, want);
                }
                Op::DropRange { start, end, tenant } => {
                    let range = HashRange::new(start, end);
                    let drop = RangeDrop {
                        tenants: tenant.map(|t| BTreeSet::from([TENANTS[t].to_owned()])),
                        ranges: vec![range],
                    };
                    let dropped = match tenant {
                        None => engine.drop_hash_ranges(&[range]),
                        Some(_) => engine.drop_ranges(std::slice::from_ref(&drop)),
                    }
                    .expect("drop range");
                    let before = model.len();
                    model.retain(|_, r| !drop.covers(&r.tenant, r.ring_hash));
                    prop_assert_eq!(dropped, (before - model.len()) as u64);
                }
                Op::Flush => engine.flush().expect("flush"),
                Op::CompactLevels => engine.compact_levels().expect("compact levels"),
                Op::Compact => engine.compact().expect("compact"),
                Op::Reopen => {
                    engine.close().expect("close");
                    drop(engine);
                    engine = open(dir.path());
                }
            }
        }
        // Everything survives a final reopen too, and nothing dropped comes back.
        drop(engine);
        let engine = open(dir.path());
        for ((tenant, key), record) in &model {
            let got = engine.get(tenant, key).expect("get");
            prop_assert_eq!(got.as_deref(), Some(record));
        }
        let mut all: Vec<Record> = engine.scan_hash_range(HashRange::FULL)
            .map(|r| r.map(|r| (*r).clone())).collect::<Result<_, _>>().expect("scan item");
        all.sort_by(|a, b| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
        prop_assert_eq!(all, model.values().cloned().collect::<Vec<_>>());
    }
}

/// Ingests race writes of the same keys: two threads apply single records while a third
/// ingests batches of the same, fresh keys, every record at a random counter of one clock
/// entry (so versions are totally ordered). Each key must end at the largest counter any
/// thread wrote, before and after a reopen. An ingest that let a write in between its
/// look-up and its install would lose to an older write applied meanwhile.
#[test]
fn ingests_racing_writes_of_the_same_keys_keep_the_newest_version() {
    use std::sync::{Arc, Barrier};

    /// splitmix64: a fixed, well-spread pseudo-random counter per (thread, round, key).
    fn counter(thread: u64, round: usize, k: usize) -> u64 {
        let mut z =
            (thread << 40 | (round as u64) << 20 | k as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        1 + (z ^ (z >> 31)) % 1_000
    }

    const ROUNDS: usize = 60;
    const KEYS: usize = 48;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(Engine::open(dir.path(), options(true)).expect("open"));
    fn key(round: usize, k: usize) -> Vec<u8> {
        format!("r{round:03}-k{k:02}").into_bytes()
    }
    fn record(round: usize, k: usize, counter: u64) -> Record {
        let version = Version::new(VectorClock::from_entries([("c", counter)]));
        Record::put("acme", key(round, k), version, vec![b'v'; 200])
    }
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..3u64)
        .map(|thread| {
            let (engine, barrier) = (engine.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut written = Vec::new();
                for round in 0..ROUNDS {
                    let batch: Vec<(usize, u64)> =
                        (0..KEYS).map(|k| (k, counter(thread, round, k))).collect();
                    barrier.wait();
                    if thread == 0 {
                        let records = batch.iter().map(|(k, c)| record(round, *k, *c)).collect();
                        engine.ingest(records).expect("ingest");
                    } else {
                        for (k, c) in &batch {
                            engine.apply(record(round, *k, *c)).expect("apply");
                        }
                    }
                    written.extend(batch.into_iter().map(|(k, c)| ((round, k), c)));
                }
                written
            })
        })
        .collect();
    let mut newest = BTreeMap::new();
    for thread in threads {
        for (slot, counter) in thread.join().expect("writer thread") {
            let entry = newest.entry(slot).or_insert(0);
            *entry = counter.max(*entry);
        }
    }
    let check = |engine: &Engine, when: &str| {
        for (&(round, k), &counter) in &newest {
            let got = engine
                .get("acme", &key(round, k))
                .expect("get")
                .expect("stored");
            assert_eq!(
                got.version.clock.max_counter(),
                counter,
                "{when}: key {round}/{k} holds an older version than was written"
            );
        }
    };
    check(&engine, "before a reopen");
    let ingested: u64 = engine
        .stats()
        .ingested
        .iter()
        .map(|(tables, _)| tables)
        .sum();
    assert!(
        ingested > 0,
        "some keys were new to the engine when ingested"
    );
    close(engine);
    check(
        &Engine::open(dir.path(), options(true)).expect("reopen"),
        "after a reopen",
    );
}

/// Ingests while the background compaction runs: another thread keeps writing keys at both
/// ends of the key space (`a…`, `z…`), so every flushed table and every merge of them spans
/// the middle, where batches of fresh keys (`m…`) are ingested, each a narrow table that
/// fits in the middle of any level. An ingested table placed at the level a running merge
/// writes to would end up inside one of its output tables' ranges (one spans from the last
/// `a` key to the first `z` key), and a read of its keys would look in that table only:
/// every key must read back at the version last written, before and after a major
/// compaction and a reopen.
#[test]
fn ingests_during_background_compactions_keep_every_key_readable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().expect("tempdir");
    let background = || EngineOptions {
        background: true,
        ..options(false)
    };
    let engine = Arc::new(Engine::open(dir.path(), background()).expect("open"));
    let put = |key: String, counter: u64| {
        let version = Version::new(VectorClock::from_entries([("c", counter)]));
        Record::put("acme", key.into_bytes(), version, vec![b'v'; 100])
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = BTreeMap::new();
            let mut counter = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let end = if counter % 2 == 0 { 'a' } else { 'z' };
                let key = format!("{end}{:05}", (counter * 7919) % 10_000);
                engine.apply(put(key.clone(), counter)).expect("apply");
                last.insert(key, counter);
                counter += 1;
            }
            last
        })
    };
    let mut ingested = BTreeMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut batch = 0u64;
    while std::time::Instant::now() < deadline {
        let records: Vec<Record> = (0..60u64)
            .map(|j| {
                let key = format!("m{batch:06}-{j:02}");
                ingested.insert(key.clone(), batch + 1);
                put(key, batch + 1)
            })
            .collect();
        engine.ingest(records).expect("ingest");
        batch += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut expected = writer.join().expect("writer");
    expected.extend(ingested);
    let deep: u64 = engine.stats().ingested.iter().skip(1).map(|(t, _)| t).sum();
    assert!(deep > 0, "some ingested tables went below L0");
    let check = |engine: &Engine, when: &str| {
        for (key, counter) in &expected {
            let got = engine.get("acme", key.as_bytes()).expect("get");
            let got = got.map(|r| r.version.clock.max_counter());
            assert_eq!(got, Some(*counter), "{when}: {key}");
        }
    };
    check(&engine, "after the writes");
    engine.compact().expect("compact");
    check(&engine, "after a major compaction");
    close(engine);
    check(
        &Engine::open(dir.path(), background()).expect("reopen"),
        "after a reopen",
    );
}

/// Closes the engine the test's threads shared (they are done with it).
fn close(engine: std::sync::Arc<Engine>) {
    std::sync::Arc::try_unwrap(engine)
        .ok()
        .expect("the only handle")
        .close()
        .expect("close");
}

/// A stream's batch sent again after its acknowledgement was lost (the connection cut after
/// the target installed the table): the second ingest finds every key, writes no table and
/// changes no version.
#[test]
fn an_ingest_sent_again_after_a_lost_acknowledgement_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), true);
    let records: Vec<Record> = (0..50u8)
        .map(|k| Record::put("acme", key_bytes(k), version(0, 5), vec![b'x'; 100]))
        .collect();
    let tables = |engine: &Engine| -> u64 { engine.stats().ingested.iter().map(|(t, _)| t).sum() };
    let first = engine.ingest(records.clone()).expect("ingest");
    assert!(first.iter().all(ApplyOutcome::is_applied));
    assert_eq!(tables(&engine), 1);
    let again = engine.ingest(records.clone()).expect("ingest again");
    let ignored = ApplyOutcome::Ignored {
        stored: version(0, 5),
    };
    assert!(again.iter().all(|o| *o == ignored), "{again:?}");
    assert_eq!(tables(&engine), 1, "no second table");
    for record in &records {
        let got = engine.get("acme", &record.key).expect("get");
        assert_eq!(got.as_deref(), Some(record));
    }
}

/// A joining node's three senders each stream a sorted run, and the runs interleave in key
/// order. Ingested, each run takes a level of its own (the deepest none of its tables
/// overlaps), nothing merges them while ingests arrive, and once none came for
/// `ingest_quiet`, one merge takes every level into the last: each byte is written once more,
/// where draining the levels one into the next rewrote it at every level it passed.
#[test]
fn interleaved_ingested_runs_wait_for_the_streams_then_merge_into_the_last_level_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let quiet = Duration::from_secs(2);
    let engine = Engine::open(
        dir.path(),
        EngineOptions {
            ingest_quiet: quiet,
            ..options(false)
        },
    )
    .expect("open");
    let (senders, batches, per_batch) = (3usize, 20usize, 50usize);
    let all: Vec<Record> = (0..senders * batches * per_batch)
        .map(|i| {
            let key = format!("k{i:05}").into_bytes();
            Record::put("acme", key, version(1, i as u64 + 1), vec![b'v'; 200])
        })
        .collect();
    // Sender s streams the keys i with i % 3 == s, 50 per batch, in key order; the three
    // streams take turns, batch by batch.
    for batch in 0..batches {
        for sender in 0..senders {
            let records = (0..per_batch)
                .map(|j| all[senders * (per_batch * batch + j) + sender].clone())
                .collect();
            let outcomes = engine.ingest(records).expect("ingest");
            assert!(outcomes.iter().all(ApplyOutcome::is_applied));
        }
    }
    let stats = engine.stats();
    let ingested: u64 = stats.ingested.iter().map(|(_, bytes)| bytes).sum();
    let tables_per_level: Vec<u64> = stats.ingested.iter().map(|(tables, _)| *tables).collect();
    assert_eq!(
        tables_per_level,
        vec![0, 20, 20, 20],
        "one run per level, none in L0"
    );
    engine.compact_levels().expect("compact");
    assert_eq!(
        engine.stats().compaction_bytes_written,
        0,
        "nothing merged while ingests arrive"
    );
    std::thread::sleep(quiet + Duration::from_millis(100));
    engine.compact_levels().expect("compact");
    let stats = engine.stats();
    let written = stats.compaction_bytes_written;
    assert!(
        written > 0 && written * 4 <= ingested * 5,
        "the runs merged in one pass: {written} bytes written for {ingested} ingested"
    );
    let levels: Vec<usize> = stats.levels.iter().map(|(tables, _, _)| *tables).collect();
    assert!(
        levels.iter().rev().skip(1).all(|t| *t == 0),
        "everything in the last level: {levels:?}"
    );
    for record in &all {
        let got = engine.get("acme", &record.key).expect("get");
        assert_eq!(got.as_deref(), Some(record));
    }
}
