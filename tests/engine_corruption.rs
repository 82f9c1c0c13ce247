//! Corruption sweeps: torn commit-log tails at every offset, corrupt records in the middle of
//! the log, flipped bytes in SSTables and the manifest. No panic, no wrong value.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::fs;
use std::path::{Path, PathBuf};

use pairdb::engine::SyncMode;
use pairdb::engine::{Engine, EngineError, EngineOptions, Problem, Record, internal_key};
use pairdb::vclock::{VectorClock, Version, physical_counter};

const N: usize = 40;

fn options(skip_corrupt_log: bool) -> EngineOptions {
    EngineOptions {
        sync: SyncMode::Always,
        cache_bytes: 0,
        background: false,
        skip_corrupt_log,
        ..EngineOptions::default()
    }
}

fn key(i: usize) -> String {
    format!("key-{i:04}")
}

fn value(i: usize) -> Vec<u8> {
    format!("value-{i}-{}", "v".repeat(i % 17)).into_bytes()
}

fn write_records(dir: &Path) {
    let engine = Engine::open(dir, options(false)).expect("open");
    for i in 0..N {
        let v = Version::new(VectorClock::from_entries([(
            "c1",
            physical_counter(1_700_000_000_000) + i as u64,
        )]));
        engine
            .apply(Record::put("t", key(i), v, value(i)))
            .expect("apply");
    }
    engine.close().expect("close");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The newest non-empty log segment.
fn newest_segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| fs::metadata(p).map(|m| m.len() > 8).unwrap_or(false))
        .collect();
    segments.sort();
    segments.pop().expect("a segment with records")
}

/// How many of the records read back: they must be a prefix, with correct values.
fn readable_prefix(engine: &Engine) -> usize {
    let mut present = 0;
    let mut gap = false;
    for i in 0..N {
        match engine.get("t", key(i).as_bytes()).expect("get") {
            Some(r) => {
                assert!(!gap, "record {i} present after a missing one");
                assert_eq!(
                    r.value.as_deref(),
                    Some(value(i).as_slice()),
                    "wrong value for {i}"
                );
                present += 1;
            }
            None => gap = true,
        }
    }
    present
}

#[test]
fn torn_tail_at_every_offset_is_cut_and_recovered() {
    let base = tempfile::tempdir().expect("tempdir");
    write_records(base.path());
    let segment = newest_segment(base.path());
    let full = fs::read(&segment).expect("read segment");
    // Every offset of the last few records (about 60 bytes each).
    let from = full.len().saturating_sub(300);
    let mut last_present = 0;
    let mut torn_seen = 0;
    for cut in from..=full.len() {
        let work = tempfile::tempdir().expect("tempdir");
        copy_dir(base.path(), work.path());
        let seg = work
            .path()
            .join("wal")
            .join(segment.file_name().expect("name"));
        fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open")
            .set_len(cut as u64)
            .expect("truncate");
        let engine = Engine::open(work.path(), options(false))
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let present = readable_prefix(&engine);
        assert!(
            present >= last_present,
            "cut at {cut}: fewer records than a shorter cut"
        );
        last_present = present;
        if cut == full.len() {
            assert_eq!(present, N);
            assert_eq!(engine.stats().replay.torn_tails, 0);
        } else {
            // Zero at a frame boundary, one inside a frame.
            let torn = engine.stats().replay.torn_tails;
            assert!(torn <= 1, "cut at {cut}");
            torn_seen += torn;
        }
        // A second open after the cut sees a clean log.
        drop(engine);
        let again = Engine::open(work.path(), options(false)).expect("reopen");
        assert_eq!(readable_prefix(&again), present);
        assert_eq!(
            again.stats().replay.torn_tails,
            0,
            "cut at {cut}: tail not truncated"
        );
    }
    assert!(
        torn_seen > 200,
        "most cuts land inside a frame: {torn_seen}"
    );
}

#[test]
fn corrupt_middle_of_the_log_refuses_to_open_unless_told_to_skip() {
    let base = tempfile::tempdir().expect("tempdir");
    write_records(base.path());
    let segment = newest_segment(base.path());
    let mut bytes = fs::read(&segment).expect("read");
    // Inside the first record's payload (magic 8 + frame header 24); the records after it,
    // each appended after the one before was synced, show it had been acknowledged.
    bytes[8 + 24 + 3] ^= 0xff;
    fs::write(&segment, &bytes).expect("write");
    match Engine::open(base.path(), options(false)) {
        Err(EngineError::Corrupted { path, offset, .. }) => {
            assert_eq!(path, segment);
            assert_eq!(offset, 8);
        }
        Err(e) => panic!("expected a corruption error, got {e}"),
        Ok(_) => panic!("opened a log corrupt in the middle"),
    }
    let engine = Engine::open(base.path(), options(true)).expect("open with skip_corrupt_log");
    assert_eq!(engine.stats().replay.corrupt_skipped, 1);
    assert_eq!(
        readable_prefix(&engine),
        0,
        "nothing after the damage is trusted"
    );
}

/// A flipped byte anywhere in a table (every block: data, bloom, index, meta, footer): every
/// read returns the right value or a corruption error, never a wrong or missing value. Once a
/// read finds the damage the table is quarantined: the node reports it, and its key range is
/// refused (not served from older data) until repaired, also after a restart.
#[test]
fn flipped_sstable_bytes_give_errors_never_wrong_values() {
    let base = tempfile::tempdir().expect("tempdir");
    write_records(base.path());
    {
        let engine = Engine::open(base.path(), options(false)).expect("open");
        engine.flush().expect("flush");
    }
    let table_name = fs::read_dir(base.path().join("sst"))
        .expect("sst")
        .next()
        .expect("one table")
        .expect("entry")
        .file_name();
    let original = fs::read(base.path().join("sst").join(&table_name)).expect("read");
    let (mut refused_at_open, mut quarantined) = (0, 0);
    for pos in (0..original.len()).step_by(7) {
        let work = tempfile::tempdir().expect("tempdir");
        copy_dir(base.path(), work.path());
        let table = work.path().join("sst").join(&table_name);
        let mut bytes = original.clone();
        bytes[pos] ^= 0x40;
        fs::write(&table, &bytes).expect("flip");
        let engine = match Engine::open(work.path(), options(false)) {
            Ok(e) => e,
            Err(e) => {
                // Footer, index, bloom and meta are checked at open.
                assert!(e.is_corruption(), "{e}");
                refused_at_open += 1;
                continue;
            }
        };
        let mut found_damage = false;
        for i in 0..N {
            match engine.get("t", key(i).as_bytes()) {
                Ok(Some(r)) => {
                    assert!(
                        !found_damage,
                        "flip at {pos}: key {i} served after the quarantine"
                    );
                    assert_eq!(
                        r.value.as_deref(),
                        Some(value(i).as_slice()),
                        "flip at {pos}: wrong value for {i}"
                    );
                }
                Ok(None) => panic!("flip at {pos}: key {i} silently missing"),
                Err(e) => {
                    assert!(e.is_corruption(), "{e}");
                    found_damage = true;
                }
            }
        }
        if !found_damage {
            continue;
        }
        quarantined += 1;
        let problems = engine.problems();
        assert!(
            matches!(problems.as_slice(), [Problem::Quarantined(q)] if q.covers(&internal_key("t", key(0).as_bytes()))),
            "flip at {pos}: {problems:?}"
        );
        assert_eq!(engine.stats().quarantined_tables, 1);
        drop(engine);
        assert!(
            work.path().join("quarantine").join(&table_name).exists(),
            "the damaged file is kept aside"
        );
        let reopened = Engine::open(work.path(), options(false)).expect("reopen without the table");
        assert_eq!(
            reopened.problems().len(),
            1,
            "the quarantine survives a restart"
        );
        for i in 0..N {
            let read = reopened.get("t", key(i).as_bytes());
            assert!(
                read.as_ref().is_err_and(EngineError::is_corruption),
                "flip at {pos}: key {i} after the restart: {:?}",
                read.map(|r| r.map(|r| r.value.clone()))
            );
        }
    }
    assert!(
        refused_at_open > 0 && quarantined > 0,
        "{refused_at_open} / {quarantined}"
    );
}

/// A flipped byte anywhere in `MANIFEST`: the engine opens from the mirror, serves every
/// record, says the manifest was damaged, and has both copies whole again. Damage to both
/// copies refuses to open.
#[test]
fn a_flipped_manifest_byte_opens_from_the_mirror() {
    let base = tempfile::tempdir().expect("tempdir");
    write_records(base.path());
    {
        let engine = Engine::open(base.path(), options(false)).expect("open");
        engine.flush().expect("flush");
    }
    let manifest = base.path().join("MANIFEST");
    let original = fs::read(&manifest).expect("read");
    for pos in 0..original.len() {
        let mut bytes = original.clone();
        bytes[pos] ^= 0x01;
        fs::write(&manifest, &bytes).expect("flip");
        let engine = Engine::open(base.path(), options(false))
            .unwrap_or_else(|e| panic!("flip at {pos}: {e}"));
        assert_eq!(readable_prefix(&engine), N, "flip at {pos}");
        assert!(
            matches!(engine.problems().as_slice(), [Problem::ManifestDamaged(_)]),
            "flip at {pos}: {:?}",
            engine.problems()
        );
        drop(engine);
        assert_eq!(
            fs::read(&manifest).expect("read"),
            original,
            "flip at {pos}"
        );
    }
    let engine = Engine::open(base.path(), options(false)).expect("open repaired");
    assert_eq!(
        engine.problems(),
        Vec::new(),
        "repaired copies report nothing"
    );
    drop(engine);
    for name in ["MANIFEST", "MANIFEST.mirror"] {
        let path = base.path().join(name);
        let mut bytes = fs::read(&path).expect("read");
        bytes[40] ^= 0x01;
        fs::write(&path, &bytes).expect("flip");
    }
    let err = Engine::open(base.path(), options(false))
        .err()
        .expect("both copies damaged must refuse");
    assert!(matches!(err, EngineError::Corrupted { .. }), "{err}");
}

/// An engine dir with two tables: the first holds the 40 records, the second one other key.
fn two_tables_one_damaged() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_records(dir.path());
    {
        let engine = Engine::open(dir.path(), options(false)).expect("open");
        engine.flush().expect("flush");
        let v = Version::new(VectorClock::from_entries([(
            "c1",
            physical_counter(1_700_000_000_000) + 1_000,
        )]));
        engine
            .apply(Record::put("t", "zz-other", v, "other"))
            .expect("apply");
        engine.flush().expect("flush");
    }
    let mut tables: Vec<PathBuf> = fs::read_dir(dir.path().join("sst"))
        .expect("sst")
        .map(|e| e.expect("entry").path())
        .collect();
    tables.sort();
    dir
}

/// Damages the first table of `dir` inside its first data block, in place (an open engine
/// maps its tables: it reads the damage at its next read of that block).
fn damage_first_table(dir: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let mut tables: Vec<PathBuf> = fs::read_dir(dir.join("sst"))
        .expect("sst")
        .map(|e| e.expect("entry").path())
        .collect();
    tables.sort();
    let damaged = tables.first().expect("the first table");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(damaged)
        .expect("open the table");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 20).expect("read");
    byte[0] ^= 0x40;
    file.write_all_at(&byte, 20).expect("flip");
}

/// The damaged table is out of service, its keys refused, the other table serving.
fn assert_quarantined(engine: &Engine) {
    assert!(
        matches!(engine.problems().as_slice(), [Problem::Quarantined(_)]),
        "{:?}",
        engine.problems()
    );
    assert!(
        engine.get("t", key(0).as_bytes()).is_err(),
        "a key of the damaged table is refused"
    );
    let other = engine
        .get("t", b"zz-other")
        .expect("the healthy table still serves");
    assert_eq!(
        other.and_then(|r| r.value.clone()).as_deref(),
        Some(&b"other"[..])
    );
}

/// A compaction that reads a damaged block fails, and the damaged input is quarantined (the
/// node reports it) instead of failing every later compaction silently.
#[test]
fn a_compaction_over_a_damaged_table_quarantines_it() {
    let dir = two_tables_one_damaged();
    let engine = Engine::open(dir.path(), options(false)).expect("open");
    damage_first_table(dir.path());
    let compacted = engine.compact();
    assert!(
        compacted.as_ref().is_err_and(EngineError::is_corruption),
        "{compacted:?}"
    );
    assert_quarantined(&engine);
    engine
        .compact()
        .expect("compaction works again without the damaged table");
}

/// A scan (range streaming, tenant scans) that reads a damaged block fails, and the damaged
/// table is quarantined.
#[test]
fn a_scan_over_a_damaged_table_quarantines_it() {
    let dir = two_tables_one_damaged();
    let engine = Engine::open(dir.path(), options(false)).expect("open");
    damage_first_table(dir.path());
    let scanned: Vec<_> = engine.scan_tenant("t").expect("scan").collect();
    assert!(
        scanned
            .iter()
            .any(|r| r.as_ref().is_err_and(EngineError::is_corruption)),
        "the scan must report the damage"
    );
    assert_quarantined(&engine);
}

/// Opening reads every table (the range trees are built from a scan): a damaged table is
/// quarantined at open, and the trees cover what the node still serves.
#[test]
fn a_damaged_table_found_at_open_is_quarantined_and_the_trees_cover_the_rest() {
    let dir = two_tables_one_damaged();
    damage_first_table(dir.path());
    let engine = Engine::open(dir.path(), options(false)).expect("open");
    assert_quarantined(&engine);
    let whole = pairdb::engine::SegmentGroup {
        first: 0,
        count: pairdb::engine::trees::SEGMENTS,
    };
    let hashes = engine
        .segment_hashes("t", &[whole])
        .expect("the trees are complete over what is served");
    let other = engine.get("t", b"zz-other").expect("get").expect("served");
    assert_eq!(hashes, vec![pairdb::engine::trees::record_entry(&other)]);
}
