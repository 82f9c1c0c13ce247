//! Writes to pairdb's engine alone: `writers` threads apply puts of 100-byte values to fresh
//! keys (`key-{n:010}`, one tenant, vector clocks of one coordinator) for `seconds`, with the
//! commit log synced before each write returns (`always`) or never synced (`never`: the CPU
//! cost of the write path without the disk's). Prints one line per (sync, writers):
//! `sync writers ops_per_sec`.
//!
//! Usage: pairdb-write-path-bench [--seconds N] [--rounds N]
//! Only the engine's public API as of commit d957cbb^ is used, so the same source builds
//! against the engine before and after the range trees.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use pairdb::config::SyncMode;
use pairdb::engine::{Engine, EngineOptions, Record};
use pairdb::vclock::{VectorClock, Version};

fn run(dir: &Path, sync: SyncMode, writers: usize, seconds: f64) -> Result<f64> {
    let options = EngineOptions {
        sync,
        compaction_bytes_per_sec: None,
        ..EngineOptions::default()
    };
    let engine = Engine::open(dir, options)?;
    let next = AtomicU64::new(0);
    let value = vec![b'v'; 100];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while Instant::now() < deadline {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let version = Version::new(VectorClock::from_entries([("c1", n + 1)]));
                        let key = format!("key-{n:010}").into_bytes();
                        engine.apply(Record::put("bench", key, version, value.clone()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("writer panicked")))?;
        }
        Ok(())
    })?;
    Ok(next.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: f64| -> f64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = flag("--seconds", 5.0);
    let rounds = flag("--rounds", 1.0) as usize;
    for _ in 0..rounds {
        for (name, sync) in [("never", SyncMode::Never), ("always", SyncMode::Always)] {
            for writers in [1, 16] {
                let dir = tempfile::tempdir()?;
                let ops = run(dir.path(), sync, writers, seconds)?;
                println!("{name} {writers} {ops:.0}");
            }
        }
    }
    Ok(())
}
