//! Crash test: a child process writes with `sync = always` from several threads and prints each
//! acknowledged key; the parent `kill -9`s it at random moments, many rounds on the same data
//! directory, reopens the engine, and checks that every acknowledged key is there with its
//! value.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pairdb::engine::SyncMode;
use pairdb::engine::compaction::policy::LevelPolicy;
use pairdb::engine::{Engine, EngineOptions, Record};
use pairdb::vclock::{VectorClock, Version, physical_counter};

const DIR_ENV: &str = "PAIRDB_CRASH_TEST_DIR";
const ROUND_ENV: &str = "PAIRDB_CRASH_TEST_ROUND";
const TENANT: &str = "crash";

fn options() -> EngineOptions {
    EngineOptions {
        sync: SyncMode::Always,
        // Small sizes so flushes, compactions and segment rotations happen under the kill.
        memtable_bytes: 64 * 1024,
        segment_bytes: 128 * 1024,
        table_bytes: 128 * 1024,
        levels: LevelPolicy {
            l0_trigger: 2,
            base_bytes: 512 * 1024,
            l0_bytes: 512 * 1024,
            multiplier: 4,
            max_levels: 4,
        },
        compaction_bytes_per_sec: None,
        ..EngineOptions::default()
    }
}

fn value_of(key: &str) -> Vec<u8> {
    format!("value-of-{key}-{}", "x".repeat(key.len() * 3)).into_bytes()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The child: runs until killed. Not a test on its own; the parent starts it.
#[test]
#[ignore = "child process of crash_recovery_keeps_every_acknowledged_write"]
fn crash_child_writer() {
    let dir = std::env::var(DIR_ENV).expect("started by the crash test");
    let round: u64 = std::env::var(ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round number");
    let engine = Arc::new(Engine::open(&dir, options()).expect("open"));
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let engine = engine.clone();
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let key = format!("r{round}-t{t}-{i}");
                    let version = Version::new(VectorClock::from_entries([(
                        format!("w{t}"),
                        physical_counter(now_ms()) + i,
                    )]));
                    engine
                        .apply(Record::put(TENANT, key.clone(), version, value_of(&key)))
                        .expect("apply");
                    let mut out = stdout.lock().expect("stdout");
                    use std::io::Write;
                    writeln!(out, "ACK {key} END").expect("print");
                    out.flush().expect("flush");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
}

#[test]
fn crash_recovery_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Vec<String> = Vec::new();
    let mut seed = now_ms() | 1;
    let rounds = 12;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| {
                    l.strip_prefix("ACK ")
                        .and_then(|l| l.strip_suffix(" END"))
                        .map(str::to_owned)
                })
                .collect::<Vec<String>>()
        });
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = 150 + seed % 600;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().expect("kill -9");
        child.wait().expect("reap child");
        let round_acks = reader.join().expect("reader");
        assert!(
            !round_acks.is_empty() || round > 0,
            "the child acknowledged nothing in {delay} ms"
        );
        acked.extend(round_acks);

        let engine = Engine::open(dir.path(), options()).expect("reopen after kill -9");
        for key in &acked {
            let got = engine.get(TENANT, key.as_bytes()).expect("get");
            let record =
                got.unwrap_or_else(|| panic!("round {round}: acknowledged key {key} lost"));
            assert_eq!(
                record.value.as_deref(),
                Some(value_of(key).as_slice()),
                "round {round}: {key}"
            );
        }
        engine.close().expect("close");
    }
    assert!(
        acked.len() > 100,
        "too few writes to mean anything: {}",
        acked.len()
    );
    eprintln!(
        "crash test: {} acknowledged writes over {rounds} kill -9 rounds all survived",
        acked.len()
    );
}
