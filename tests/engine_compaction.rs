//! Compaction keeps each key's winner and keeps tombstones until gc_grace (and only drops them
//! at the bottom level); many concurrent writers share fsyncs (group commit).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pairdb::engine::SyncMode;
use pairdb::engine::compaction::policy::LevelPolicy;
use pairdb::engine::{ApplyOutcome, Engine, EngineError, EngineOptions, Record};
use pairdb::limits::LimitError;
use pairdb::vclock::{VectorClock, Version, physical_counter};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn options(gc_grace: Duration) -> EngineOptions {
    EngineOptions {
        sync: SyncMode::Never,
        cache_bytes: 0,
        background: false,
        gc_grace,
        compaction_bytes_per_sec: None,
        levels: LevelPolicy {
            l0_trigger: 2,
            base_bytes: 1 << 30,
            l0_bytes: 1 << 30,
            multiplier: 10,
            max_levels: 4,
        },
        ..EngineOptions::default()
    }
}

fn v(entries: &[(&str, u64)]) -> Version {
    Version::new(VectorClock::from_entries(
        entries.iter().map(|(id, c)| (*id, *c)),
    ))
}

#[test]
fn compaction_keeps_the_winner_of_concurrent_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), options(Duration::from_secs(3600))).expect("open");
    let base = physical_counter(now_ms());
    // Concurrent versions: c2's is newer by last-write-wins. Written in both orders on two keys,
    // each version flushed into its own table before the next arrives.
    let older = v(&[("c1", base + 10)]);
    let newer = v(&[("c2", base + 20)]);
    for (key, first, second) in [("a", &older, &newer), ("b", &newer, &older)] {
        engine
            .apply(Record::put("t", key, first.clone(), format!("{key}-first")))
            .expect("apply");
        engine.flush().expect("flush");
        let outcome = engine
            .apply(Record::put(
                "t",
                key,
                second.clone(),
                format!("{key}-second"),
            ))
            .expect("apply");
        assert_eq!(outcome.is_applied(), second == &newer);
        engine.flush().expect("flush");
    }
    // A dominated write is ignored and a dominating one applied.
    let merged = v(&[("c1", base + 10), ("c2", base + 20), ("c3", base + 1)]);
    assert!(matches!(
        engine
            .apply(Record::put("t", "a", older.clone(), "stale"))
            .expect("apply"),
        ApplyOutcome::Ignored { .. }
    ));
    engine.compact_levels().expect("compact levels");
    engine.compact().expect("major compaction");
    let a = engine.get("t", b"a").expect("get").expect("a");
    let b = engine.get("t", b"b").expect("get").expect("b");
    assert_eq!(
        (a.version.clone(), a.value.as_deref()),
        (newer.clone(), Some(&b"a-second"[..]))
    );
    assert_eq!(
        (b.version.clone(), b.value.as_deref()),
        (newer.clone(), Some(&b"b-first"[..]))
    );
    assert_eq!(
        engine
            .apply(Record::put("t", "a", merged.clone(), "merged"))
            .expect("apply"),
        ApplyOutcome::Applied
    );
    engine.compact().expect("compact");
    assert_eq!(
        engine.get("t", b"a").expect("get").expect("a").version,
        merged
    );
    assert_eq!(engine.stats().sstables, 1);
}

fn write_and_delete(engine: &Engine, tombstone_age: Duration) {
    let put_at = physical_counter(now_ms() - tombstone_age.as_millis() as u64 - 1000);
    let del_at = physical_counter(now_ms() - tombstone_age.as_millis() as u64);
    for i in 0..100 {
        engine
            .apply(Record::put(
                "t",
                format!("k{i}"),
                v(&[("c1", put_at)]),
                "value",
            ))
            .expect("put");
    }
    engine.flush().expect("flush");
    for i in 0..50 {
        engine
            .apply(Record::tombstone(
                "t",
                format!("k{i}"),
                v(&[("c1", del_at)]),
            ))
            .expect("delete");
    }
    engine.flush().expect("flush");
}

#[test]
fn tombstones_survive_until_gc_grace() {
    // Young tombstones (1 s old, grace 1 h): kept by a major compaction.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), options(Duration::from_secs(3600))).expect("open");
    write_and_delete(&engine, Duration::from_secs(1));
    engine.compact().expect("compact");
    for i in 0..50 {
        let r = engine
            .get("t", format!("k{i}").as_bytes())
            .expect("get")
            .expect("tombstone kept");
        assert!(r.is_tombstone());
    }
    assert_eq!(engine.stats().tombstones_dropped, 0);

    // Old tombstones (2 h old, grace 1 h): dropped at the bottom, and the value they deleted
    // does not come back.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), options(Duration::from_secs(3600))).expect("open");
    write_and_delete(&engine, Duration::from_secs(7200));
    engine.compact().expect("compact");
    for i in 0..50 {
        assert_eq!(
            engine.get("t", format!("k{i}").as_bytes()).expect("get"),
            None,
            "k{i} resurrected"
        );
    }
    for i in 50..100 {
        assert!(
            engine
                .get("t", format!("k{i}").as_bytes())
                .expect("get")
                .is_some()
        );
    }
    assert_eq!(engine.stats().tombstones_dropped, 50);
}

#[test]
fn old_tombstones_stay_while_deeper_levels_hold_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = EngineOptions {
        levels: LevelPolicy {
            l0_trigger: 2,
            base_bytes: 20 * 1024,
            l0_bytes: 20 * 1024,
            multiplier: 100,
            max_levels: 4,
        },
        ..options(Duration::from_secs(3600))
    };
    let engine = Engine::open(dir.path(), opts).expect("open");
    let older = physical_counter(now_ms() - 4 * 3600 * 1000);
    let old = physical_counter(now_ms() - 3 * 3600 * 1000);
    // 50 KiB of values: L0 merges straight into the last level (L3) while it is small.
    for half in 0..2 {
        for i in 0..25 {
            let key = format!("k{:02}", half * 25 + i);
            engine
                .apply(Record::put("t", key, v(&[("c1", older)]), vec![b'v'; 1024]))
                .expect("put");
        }
        engine.flush().expect("flush");
    }
    engine.compact_levels().expect("leveled");
    let levels = engine.stats().levels;
    assert!(
        levels.len() == 4 && levels[3].0 > 0 && levels[1].0 == 0 && levels[2].0 == 0,
        "values must sit in L3: {levels:?}"
    );
    // An old tombstone (past gc_grace) reaches L2, the base level above 50 KiB in L3, while
    // L3 still holds the value: kept.
    engine
        .apply(Record::tombstone("t", "k10", v(&[("c1", old)])))
        .expect("delete");
    engine.flush().expect("flush");
    engine
        .apply(Record::put("t", "k99", v(&[("c1", old)]), "small"))
        .expect("put");
    engine.flush().expect("flush");
    engine.compact_levels().expect("leveled");
    assert!(
        engine.stats().levels[2].0 > 0,
        "the tombstone's table is in L2"
    );
    let k = engine
        .get("t", b"k10")
        .expect("get")
        .expect("tombstone kept above the value");
    assert!(k.is_tombstone());
    assert_eq!(engine.stats().tombstones_dropped, 0);
    // A major compaction reaches the bottom: now tombstone and value go together.
    engine.compact().expect("major");
    assert_eq!(engine.get("t", b"k10").expect("get"), None);
    assert_eq!(engine.stats().tombstones_dropped, 1);
    assert!(engine.get("t", b"k11").expect("get").is_some());
}

#[test]
fn concurrent_durable_writers_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(
        Engine::open(
            dir.path(),
            EngineOptions {
                sync: SyncMode::Always,
                memtable_bytes: 256 * 1024,
                ..EngineOptions::default()
            },
        )
        .expect("open"),
    );
    let writers = 16;
    let per_writer = 300;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0..per_writer {
                    let version = v(&[("c1", physical_counter(now_ms()) + i)]);
                    engine
                        .apply(Record::put(
                            "t",
                            format!("w{w}-{i}"),
                            version,
                            vec![7u8; 100],
                        ))
                        .expect("apply");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let stats = engine.stats();
    assert_eq!(stats.writes_applied, writers * per_writer);
    assert!(
        stats.wal_syncs < writers * per_writer,
        "group commit shares fsyncs: {} syncs",
        stats.wal_syncs
    );
    for w in 0..writers {
        for i in 0..per_writer {
            assert!(
                engine
                    .get("t", format!("w{w}-{i}").as_bytes())
                    .expect("get")
                    .is_some()
            );
        }
    }
    let scanned = engine.scan_tenant("t").expect("scan").count() as u64;
    assert_eq!(scanned, writers * per_writer);
}

#[test]
fn batch_sync_mode_syncs_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(
        dir.path(),
        EngineOptions {
            sync: SyncMode::BatchMs(5),
            ..EngineOptions::default()
        },
    )
    .expect("open");
    for i in 0..100 {
        engine
            .apply(Record::put(
                "t",
                format!("k{i}"),
                v(&[("c1", physical_counter(now_ms()) + i)]),
                "x",
            ))
            .expect("apply");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.stats().wal_syncs == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background sync within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        engine.stats().wal_syncs < 100,
        "writers must not sync one by one"
    );
}

#[test]
fn a_batch_is_validated_whole_and_synced_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), EngineOptions::default()).expect("open");
    let at = physical_counter(now_ms());
    let bad = vec![
        Record::put("t", "ok", v(&[("c1", at)]), "1"),
        Record::put("t", vec![b'k'; 5000], v(&[("c1", at)]), "1"),
    ];
    assert!(matches!(
        engine.apply_batch(bad),
        Err(EngineError::Limit(LimitError::KeyTooLarge { .. }))
    ));
    assert_eq!(
        engine.get("t", b"ok").expect("get"),
        None,
        "nothing of a rejected batch lands"
    );
    let syncs_before = engine.stats().wal_syncs;
    let good: Vec<Record> = (0..500)
        .map(|i| Record::put("t", format!("k{i}"), v(&[("c1", at + i)]), "x"))
        .collect();
    let outcomes = engine.apply_batch(good).expect("batch");
    assert!(outcomes.iter().all(ApplyOutcome::is_applied));
    assert_eq!(
        engine.stats().wal_syncs - syncs_before,
        1,
        "one fsync for the batch"
    );
    let again = engine
        .apply_batch(vec![Record::put("t", "k3", v(&[("c1", at)]), "old")])
        .expect("batch");
    assert_eq!(
        again,
        vec![ApplyOutcome::Ignored {
            stored: v(&[("c1", at + 3)])
        }],
        "an ignored record reports the version that beat it"
    );
}

/// Says yes only once told to, and remembers the write times it was asked about.
#[derive(Debug, Default)]
struct RecordingGate {
    open: std::sync::atomic::AtomicBool,
    asked: std::sync::Mutex<Vec<u64>>,
}

impl pairdb::engine::TombstoneGate for RecordingGate {
    fn may_purge(&self, _tenant: &str, _ring_hash: u64, written_ms: u64) -> bool {
        self.asked.lock().expect("lock").push(written_ms);
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// An expired value is purged like a tombstone written at its expiry: only at the bottom,
/// only `gc_grace` after the expiry, only once the gate (a repair of its range after the
/// version was written) agrees, and together with the older versions it shadows. Values
/// that expire later, or never, stay. Expiries survive the commit log and the tables.
#[test]
fn expired_values_go_after_gc_grace_and_the_gate_and_take_older_versions_along() {
    let hour = 3_600_000;
    let now = now_ms();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Arc::new(RecordingGate::default());
    let open = |gate: &Arc<RecordingGate>| {
        Engine::open(
            dir.path(),
            EngineOptions {
                tombstone_gate: Some(gate.clone()),
                ..options(Duration::from_secs(3600))
            },
        )
        .expect("open")
    };
    let written = now - 3 * hour;
    let at = |ms: u64| v(&[("c1", physical_counter(ms))]);
    let expiring = |key: &str, expires_at: Option<u64>| {
        Record::put("t", key.to_owned(), at(written), "value").expiring(expires_at)
    };
    {
        let engine = open(&gate);
        // "shadowed": an older value that never expires, pushed to the bottom level first.
        engine
            .apply(Record::put("t", "shadowed", at(written - hour), "old"))
            .expect("put");
        engine.compact().expect("compact");
        for record in [
            expiring("gone", Some(now - 2 * hour)),
            expiring("shadowed", Some(now - 2 * hour)),
            expiring("in-grace", Some(now - 10 * 60_000)),
            expiring("later", Some(now + hour)),
            expiring("never", None),
        ] {
            engine.apply(record).expect("put");
        }
    }
    // Reopened: the expiries came back from the commit log.
    let engine = open(&gate);
    let expiry = |key: &str| {
        engine
            .get("t", key.as_bytes())
            .expect("get")
            .map(|r| r.expires_at_ms)
    };
    assert_eq!(expiry("gone"), Some(Some(now - 2 * hour)));
    assert_eq!(expiry("never"), Some(None));

    // The gate says no: everything stays, the expired values with their expiry.
    engine.flush().expect("flush");
    engine.compact().expect("compact");
    assert_eq!(engine.stats().expired_dropped, 0);
    assert_eq!(expiry("gone"), Some(Some(now - 2 * hour)), "from a table");
    assert_eq!(
        engine
            .get("t", b"shadowed")
            .expect("get")
            .map(|r| r.value.clone()),
        Some(Some(bytes::Bytes::from_static(b"value"))),
        "the expired winner still shadows the older value"
    );
    assert!(
        gate.asked
            .lock()
            .expect("lock")
            .iter()
            .all(|w| *w == written),
        "the gate is asked about the version's write time"
    );

    // The gate agrees: the values expired for longer than gc_grace go, with what they shadow.
    gate.open.store(true, std::sync::atomic::Ordering::Release);
    engine.compact().expect("compact");
    assert_eq!(engine.stats().expired_dropped, 2);
    assert_eq!(engine.stats().tombstones_dropped, 0);
    assert_eq!(expiry("gone"), None);
    assert_eq!(
        expiry("shadowed"),
        None,
        "the older value did not come back"
    );
    assert_eq!(expiry("in-grace"), Some(Some(now - 10 * 60_000)));
    assert_eq!(expiry("later"), Some(Some(now + hour)));
    assert_eq!(expiry("never"), Some(None));
}

#[test]
fn a_tombstone_with_an_expiry_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), options(Duration::from_secs(3600))).expect("open");
    let r = engine.apply(Record::tombstone("t", "k", v(&[("c1", 1)])).expiring(Some(1)));
    assert!(matches!(r, Err(EngineError::InvalidArgument(_))), "{r:?}");
    assert_eq!(engine.get("t", b"k").expect("get"), None);
}

#[test]
fn tables_nothing_overlaps_below_move_down_and_keep_every_winner_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || EngineOptions {
        table_bytes: 4 * 1024,
        levels: LevelPolicy {
            l0_trigger: 2,
            base_bytes: 8 * 1024,
            l0_bytes: 8 * 1024,
            multiplier: 2,
            max_levels: 4,
        },
        ..options(Duration::from_secs(3600))
    };
    let engine = Engine::open(dir.path(), opts()).expect("open");
    let base = physical_counter(now_ms());
    // Ascending keys: every flush lies beyond what the levels hold, so once the data outgrows
    // the last level's share, tables move down instead of being rewritten.
    for batch in 0..40u64 {
        for i in 0..10 {
            let key = format!("k{:04}", batch * 10 + i);
            engine
                .apply(Record::put(
                    "t",
                    key,
                    v(&[("c1", base + batch)]),
                    vec![b'a'; 1024],
                ))
                .expect("put");
        }
        engine.flush().expect("flush");
        engine.compact_levels().expect("leveled");
    }
    let stats = engine.stats();
    assert!(
        stats.compaction_moves > 0,
        "no table moved: {:?}",
        stats.levels
    );
    // Newer versions of the first keys land in L0 and merge down over the moved tables.
    for i in 0..50 {
        engine
            .apply(Record::put(
                "t",
                format!("k{i:04}"),
                v(&[("c1", base + 100)]),
                "new",
            ))
            .expect("overwrite");
    }
    engine.flush().expect("flush");
    engine.compact_levels().expect("leveled");
    // The per-level counters add up to the totals, and say where the bytes went.
    let stats = engine.stats();
    let by_level = &stats.compaction_levels;
    let sum = |f: fn(&pairdb::engine::LevelCompactions) -> u64| by_level.iter().map(f).sum::<u64>();
    assert_eq!(sum(|l| l.written_bytes), stats.compaction_bytes_written);
    assert_eq!(sum(|l| l.moves), stats.compaction_moves);
    assert_eq!(sum(|l| l.merges), stats.compactions);
    assert_eq!(
        by_level.first().copied().unwrap_or_default(),
        Default::default(),
        "nothing writes into L0"
    );
    // L0 merges into L1, the shallowest level holding data; moves go deeper.
    let l1 = by_level.get(1).copied().unwrap_or_default();
    assert!(
        l1.merges > 0 && l1.input_tables >= l1.merges && l1.read_upper_bytes > 0,
        "{by_level:?}"
    );
    assert!(by_level.iter().skip(2).any(|l| l.moves > 0), "{by_level:?}");
    let check = |engine: &Engine| {
        for i in 0..400 {
            let got = engine
                .get("t", format!("k{i:04}").as_bytes())
                .expect("get")
                .expect("every key is there");
            let want: &[u8] = if i < 50 { b"new" } else { &[b'a'; 1024] };
            assert_eq!(got.value.as_deref(), Some(want), "k{i:04}");
        }
    };
    check(&engine);
    // A major compaction rewrites every level into the deepest over what it holds: bytes
    // read from the output level itself are counted too.
    let deepest = engine
        .stats()
        .levels
        .iter()
        .rposition(|l| l.0 > 0)
        .expect("tables");
    engine.compact().expect("major compaction");
    let after = engine.stats().compaction_levels[deepest];
    let before = stats
        .compaction_levels
        .get(deepest)
        .copied()
        .unwrap_or_default();
    assert_eq!(after.merges, before.merges + 1);
    assert!(
        after.read_lower_bytes > before.read_lower_bytes,
        "{after:?}"
    );
    assert!(after.written_bytes > before.written_bytes, "{after:?}");
    check(&engine);
    engine.close().expect("close");
    drop(engine);
    let engine = Engine::open(dir.path(), opts()).expect("reopen");
    check(&engine);
}

/// The format versions in the footers of the tables in `dir`'s sst directory.
fn table_formats(dir: &std::path::Path) -> Vec<u32> {
    let mut formats = Vec::new();
    for entry in std::fs::read_dir(dir.join("sst")).expect("sst dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read table");
        // Footer: 3 x (u64 + u32), then the version (docs/sstable-format.md).
        let at = bytes.len() - 52 + 36;
        formats.push(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
    }
    formats.sort();
    formats
}

#[test]
fn tables_of_format_1_are_read_and_compacted_into_format_2() {
    use pairdb::engine::TableFormat;
    upgrade_reads_and_compacts(TableFormat::V1, TableFormat::V2);
}

#[test]
fn tables_of_format_2_are_read_and_compacted_into_format_3() {
    use pairdb::engine::TableFormat;
    upgrade_reads_and_compacts(TableFormat::V2, TableFormat::V3);
}

/// A node writes tables in `old` (a rolling upgrade), then the upgraded node reads them next
/// to its own `new` tables (absent keys too: each table answers with its own filter), and
/// compaction rewrites them all in `new`.
fn upgrade_reads_and_compacts(old: pairdb::engine::TableFormat, new: pairdb::engine::TableFormat) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = physical_counter(now_ms());
    let with_format = |format| EngineOptions {
        table_format: format,
        ..options(Duration::from_secs(3600))
    };
    // Written by a node still on the old format: values, and tombstones.
    {
        let engine = Engine::open(dir.path(), with_format(old)).expect("open");
        for i in 0..500u64 {
            let key = format!("key{i:04}");
            let record = if i % 5 == 0 {
                Record::tombstone("t", key, v(&[("c1", base + i)]))
            } else {
                Record::put("t", key, v(&[("c1", base + i)]), format!("old-{i}"))
            };
            engine.apply(record).expect("apply");
        }
        engine.flush().expect("flush");
    }
    assert_eq!(table_formats(dir.path()), vec![old.version()]);
    // The upgraded node reads them, and overwrites every third key in the new format.
    let engine = Engine::open(dir.path(), with_format(new)).expect("reopen");
    for i in (0..500u64).step_by(3) {
        let key = format!("key{i:04}");
        let version = v(&[("c1", base + 1000 + i)]);
        engine
            .apply(Record::put("t", key, version, format!("new-{i}")))
            .expect("apply");
    }
    engine.flush().expect("flush");
    assert_eq!(
        table_formats(dir.path()),
        vec![old.version(), new.version()]
    );
    let expected = |i: u64| -> Option<String> {
        if i % 3 == 0 {
            Some(format!("new-{i}"))
        } else if i % 5 == 0 {
            None
        } else {
            Some(format!("old-{i}"))
        }
    };
    let check = |engine: &Engine| {
        for i in 0..500u64 {
            let got = engine
                .get("t", format!("key{i:04}").as_bytes())
                .expect("get")
                .and_then(|r| r.value.clone())
                .map(|v| String::from_utf8(v.to_vec()).unwrap());
            assert_eq!(got, expected(i), "key{i:04}");
            let absent = format!("key{i:04}-absent");
            assert!(engine.get("t", absent.as_bytes()).expect("get").is_none());
        }
        let scanned = engine.scan_tenant("t").expect("scan").count();
        assert_eq!(scanned, 500, "tombstones are kept within gc_grace");
    };
    check(&engine);
    engine.compact().expect("compact");
    assert!(
        table_formats(dir.path())
            .iter()
            .all(|f| *f == new.version())
    );
    check(&engine);
    drop(engine);
    check(&Engine::open(dir.path(), with_format(new)).expect("reopen"));
}
