//! Histogram samples must not pile up in memory when nothing scrapes `/metrics`: the recorder
//! keeps every sample until it is folded into a summary, which the upkeep thread does.
//! Its own test binary, so no other test's allocations move the resident size.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::time::{Duration, Instant};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

#[test]
fn histogram_samples_stay_bounded_without_scrapes() {
    pairdb::metrics::handle().expect("recorder installed");
    let before = resident_bytes();
    // 8M samples over about five seconds: five upkeep rounds. Kept until a scrape, they took
    // 125 MiB here; with the upkeep about 38 MiB (a second of samples and the allocator's
    // slack).
    let started = Instant::now();
    for round in 0..50u32 {
        for i in 0..160_000u32 {
            metrics::histogram!("pairdb_test_upkeep_seconds").record(f64::from(i % 1000) * 1e-4);
        }
        let next = Duration::from_millis(100) * (round + 1);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "resident size grew {} MiB for 8M histogram samples",
        grown >> 20
    );
    // The samples were counted, not dropped.
    let text = pairdb::metrics::render();
    assert!(
        text.contains("pairdb_test_upkeep_seconds_count 8000000"),
        "{}",
        text.lines()
            .filter(|l| l.contains("upkeep"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
