//! Data larger than memory ("Performance round 3", item 2): a durable load of many keys into
//! pairdb's engine and RocksDB, each in its own child process inside a memory-limited cgroup,
//! with every cache at 1/8 of the data.
//!
//! What each child measures, the same way for both stores:
//! - durable write throughput over the whole load (keys in a scrambled order, so compaction
//!   merges overlapping tables instead of moving sorted runs down), the slowest second (and
//!   which second it was), the seconds under a quarter of the mean rate, the last quarter of
//!   the load against the whole, and the longest time no write completed;
//! - write amplification, during the load and with a flush and a full compaction after it,
//!   two ways over the bytes of keys and values written: the bytes written to the disk's
//!   block device (`/proc/diskstats`: the commit log, where each group commit writes the
//!   log's last page again, the tables, the file system's journal), and the table bytes the
//!   store's own counters give for flushes and compactions (RocksDB's statistics; pairdb's
//!   engine stats): leveled compaction's amplification, the figure RocksDB documents;
//! - space amplification: the directory's size after that compaction over the same bytes;
//! - uniform random point reads at 1 and 2 threads;
//! - peak resident memory of the process, and the group's peak (process plus page cache).
//!
//! pairdb runs with the storage node's defaults (group commit, compaction paced at 64 MiB/s)
//! except the cache size; RocksDB with its defaults, a synced WAL and an LRU block cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use pairdb::config::SyncMode;
use pairdb::engine::EngineOptions;

use crate::cgroup::{self, MemoryGroup};
use crate::{Pairdb, Rocks, Store, VALUE, dir_bytes, drive, key};

/// Bytes of one record as the user wrote it: `key-NNNNNNNNNN` and a 100-byte value.
const USER_BYTES_PER_KEY: u64 = 14 + VALUE.len() as u64;

/// The settings of one larger-than-memory run.
pub struct Plan {
    pub keys: u64,
    pub writers: usize,
    pub read_seconds: f64,
    pub memory_limit: u64,
    /// A `pairdb` binary to start as a storage node on the loaded data, for its memory use.
    pub pairdb_bin: Option<PathBuf>,
    /// Which stores run ("pairdb", "rocksdb"); the comparison table needs both.
    pub stores: Vec<String>,
    /// pairdb's `max_immutable_memtables`.
    pub frozen_memtables: usize,
}

impl Plan {
    fn user_bytes(&self) -> u64 {
        self.keys * USER_BYTES_PER_KEY
    }
    fn cache_bytes(&self) -> u64 {
        self.user_bytes() / 8
    }
}

/// The parent: runs one child per store, each in a fresh group, and prints the comparison.
pub fn run(plan: &Plan) -> Result<()> {
    let user = plan.user_bytes();
    println!(
        "\n### Larger than memory: {} keys ({:.2} GB of keys and values), {} writers, caches {} MiB, memory limit {} MiB\n",
        plan.keys,
        user as f64 / 1e9,
        plan.writers,
        plan.cache_bytes() >> 20,
        plan.memory_limit >> 20
    );
    let base = tempfile::tempdir()?;
    let mut results = Vec::new();
    for store in plan.stores.iter().map(String::as_str) {
        let dir = base.path().join(store);
        let group = MemoryGroup::create(
            &format!("pairdb-bench-{}-{store}", std::process::id()),
            plan.memory_limit,
        )?;
        let mut fields = run_child(plan, store, &dir, &group)?;
        fields.insert("group_peak_bytes".into(), group.peak_bytes()? as f64);
        eprintln!("{store}: {fields:?}");
        results.push((store, fields));
        if store == "pairdb"
            && let Some(bin) = &plan.pairdb_bin
        {
            let group = MemoryGroup::create(
                &format!("pairdb-bench-{}-node", std::process::id()),
                plan.memory_limit,
            )?;
            let node = storage_node_memory(bin, &dir, plan.cache_bytes(), &group)?;
            println!(
                "A storage node (`{}`) opened on pairdb's {} keys in {:.1} s; RSS then {} MiB, peak {} MiB (cache {} MiB).\n",
                bin.display(),
                plan.keys,
                node.open_secs,
                node.rss >> 20,
                node.hwm >> 20,
                plan.cache_bytes() >> 20
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    match results.as_slice() {
        [("pairdb", _), ("rocksdb", _)] => print_table(plan, &results),
        _ => {
            for (store, fields) in &results {
                println!("{store}:");
                for (k, v) in fields {
                    println!("- {k}: {v:.2}");
                }
            }
        }
    }
    Ok(())
}

fn run_child(
    plan: &Plan,
    store: &str,
    dir: &Path,
    group: &MemoryGroup,
) -> Result<BTreeMap<String, f64>> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .arg("--large-child")
        .arg(store)
        .arg(dir)
        .arg(group.procs_file())
        .args([
            plan.keys.to_string(),
            plan.writers.to_string(),
            plan.read_seconds.to_string(),
            plan.cache_bytes().to_string(),
            plan.frozen_memtables.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{store} child failed: {}",
        output.status
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("{store} child printed no result: {text}"))?;
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("key=value")?;
            Ok((k.to_string(), v.parse::<f64>()?))
        })
        .collect()
}

/// A table row: label, result field, how to print it, whether higher is better.
type Row = (&'static str, &'static str, fn(f64) -> String, bool);

fn print_table(plan: &Plan, results: &[(&str, BTreeMap<String, f64>)]) {
    let get = |i: usize, k: &str| results[i].1.get(k).copied().unwrap_or(f64::NAN);
    let mib = |b: f64| format!("{:.0} MiB", b / (1 << 20) as f64);
    println!("| measure | pairdb | RocksDB | pairdb/RocksDB |");
    println!("|---|---|---|---|");
    let rows: [Row; 18] = [
        (
            "durable writes/s, whole load",
            "load_ops",
            |v| format!("{v:.0}"),
            true,
        ),
        ("load seconds", "load_secs", |v| format!("{v:.1}"), false),
        (
            "slowest second (writes)",
            "slowest_second",
            |v| format!("{v:.0}"),
            true,
        ),
        (
            "seconds under a quarter of the mean rate",
            "slow_seconds",
            |v| format!("{v:.0}"),
            false,
        ),
        (
            "last quarter of the load, writes/s",
            "last_quarter_ops",
            |v| format!("{v:.0}"),
            true,
        ),
        (
            "write p99 (us)",
            "write_p99_us",
            |v| format!("{v:.0}"),
            false,
        ),
        (
            "longest write (ms)",
            "write_max_ms",
            |v| format!("{v:.1}"),
            false,
        ),
        (
            "longest time without a completed write (ms)",
            "longest_gap_ms",
            |v| format!("{v:.1}"),
            false,
        ),
        (
            "flush + full compaction (s)",
            "settle_secs",
            |v| format!("{v:.1}"),
            false,
        ),
        (
            "disk writes / user bytes, the load",
            "write_amp_load",
            |v| format!("{v:.2}"),
            false,
        ),
        (
            "table writes / user bytes, the load",
            "table_amp_load",
            |v| format!("{v:.2}"),
            false,
        ),
        (
            "disk writes / user bytes, load + flush + full compaction",
            "write_amp",
            |v| format!("{v:.2}"),
            false,
        ),
        (
            "table writes / user bytes, load + flush + full compaction",
            "table_amp",
            |v| format!("{v:.2}"),
            false,
        ),
        (
            "space amplification",
            "space_amp",
            |v| format!("{v:.2}"),
            false,
        ),
        (
            "point reads/s, 1 thread",
            "reads_1",
            |v| format!("{v:.0}"),
            true,
        ),
        (
            "point reads/s, 2 threads",
            "reads_2",
            |v| format!("{v:.0}"),
            true,
        ),
        (
            "peak RSS (MiB)",
            "hwm_bytes",
            |v| format!("{:.0}", v / (1 << 20) as f64),
            false,
        ),
        (
            "group peak, RSS + page cache (MiB)",
            "group_peak_bytes",
            |v| format!("{:.0}", v / (1 << 20) as f64),
            false,
        ),
    ];
    for (label, k, fmt, higher_is_better) in rows {
        let (p, r) = (get(0, k), get(1, k));
        let ratio = if higher_is_better { p / r } else { r / p };
        let ratio = if ratio.is_finite() {
            format!(
                "{ratio:.2}x{}",
                if higher_is_better {
                    ""
                } else {
                    " (RocksDB/pairdb)"
                }
            )
        } else {
            "-".to_string()
        };
        println!("| {label} | {} | {} | {ratio} |", fmt(p), fmt(r));
    }
    println!(
        "\nMemory limit {} on each process (cgroup), caches {} (pairdb row cache, RocksDB block cache).",
        mib(plan.memory_limit as f64),
        mib(plan.cache_bytes() as f64)
    );
}

/// The child: joins its group, loads, settles, reads, and prints one `RESULT k=v ...` line.
pub fn child(args: &[String]) -> Result<()> {
    let arg = |i: usize| args.get(i).with_context(|| format!("child argument {i}"));
    let name = arg(0)?.as_str();
    let dir = PathBuf::from(arg(1)?);
    cgroup::join(Path::new(arg(2)?))?;
    let keys: u64 = arg(3)?.parse()?;
    let writers: usize = arg(4)?.parse()?;
    let read_seconds: f64 = arg(5)?.parse()?;
    let cache: u64 = arg(6)?.parse()?;
    let frozen: usize = arg(7)?.parse()?;
    std::fs::create_dir_all(&dir)?;
    let opened: Box<dyn Store> = match name {
        "pairdb" => Box::new(Pairdb::with_options(
            &dir,
            EngineOptions {
                sync: SyncMode::Always,
                cache_bytes: cache,
                max_immutable_memtables: frozen,
                // Data larger than memory: tables bypass the page cache (step 11).
                direct_table_writes: true,
                ..EngineOptions::default()
            },
        )?),
        "rocksdb" => Box::new(Rocks::open(&dir, true, cache as usize, None)?),
        other => anyhow::bail!("unknown store {other}"),
    };
    let store = opened.as_ref();
    let mut out = BTreeMap::new();
    let written_before = device_bytes_written(&dir)?;
    let load = durable_load(store, keys, writers)?;
    out.insert("load_secs", load.secs);
    out.insert("load_ops", keys as f64 / load.secs);
    out.insert("slowest_second", load.slowest_second);
    out.insert("slowest_second_at", load.slowest_second_at);
    out.insert("slow_seconds", load.slow_seconds);
    out.insert("last_quarter_ops", load.last_quarter_ops);
    out.insert("write_p99_us", load.p99_us);
    out.insert("write_max_ms", load.max_ms);
    out.insert("longest_gap_ms", load.longest_gap_ms);
    out.insert("load_start_monotonic_ms", load.start_monotonic_ms);
    out.insert(
        "longest_gap_end_monotonic_ms",
        load.longest_gap_end_monotonic_ms,
    );
    for (field, value) in store.stall_diagnostics() {
        out.insert(field, value);
    }
    let user = (keys * USER_BYTES_PER_KEY) as f64;
    out.insert(
        "write_amp_load",
        (device_bytes_written(&dir)? - written_before) as f64 / user,
    );
    let tables = |store: &dyn Store| {
        store
            .table_bytes_written()
            .map_or(f64::NAN, |b| b as f64 / user)
    };
    out.insert("table_amp_load", tables(store));
    eprintln!(
        "{name}: compaction during the load\n{}",
        store.compaction_report()
    );
    let t0 = Instant::now();
    store.settle()?;
    out.insert("settle_secs", t0.elapsed().as_secs_f64());
    out.insert(
        "write_amp",
        (device_bytes_written(&dir)? - written_before) as f64 / user,
    );
    out.insert("table_amp", tables(store));
    out.insert("space_amp", dir_bytes(&dir) as f64 / user);
    for threads in [1usize, 2] {
        drive("warmup", threads, read_seconds / 2.0, |rng| {
            store.get(&key(rng.next() % keys)).map(|_| ())
        })?;
        let missing = AtomicU64::new(0);
        let o = drive("reader", threads, read_seconds, |rng| {
            if !store.get(&key(rng.next() % keys))? {
                missing.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?;
        anyhow::ensure!(
            missing.load(Ordering::Relaxed) == 0,
            "{} reads found no value",
            missing.load(Ordering::Relaxed)
        );
        out.insert(
            if threads == 1 { "reads_1" } else { "reads_2" },
            o.ops_per_sec,
        );
    }
    let (rss, hwm) = memory_of(std::process::id())?;
    out.insert("rss_bytes", rss as f64);
    out.insert("hwm_bytes", hwm as f64);
    drop(opened);
    let fields: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", fields.join(" "));
    Ok(())
}

struct Load {
    secs: f64,
    slowest_second: f64,
    /// Which second of the load was the slowest (0 = the first).
    slowest_second_at: f64,
    /// Seconds of the load with fewer than a quarter of its mean writes per second.
    slow_seconds: f64,
    last_quarter_ops: f64,
    p99_us: f64,
    max_ms: f64,
    longest_gap_ms: f64,
    /// When the load started, in CLOCK_MONOTONIC milliseconds.
    start_monotonic_ms: f64,
    /// When the longest gap ended, in CLOCK_MONOTONIC milliseconds (bpftrace's `nsecs`).
    longest_gap_end_monotonic_ms: f64,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
fn monotonic_ns() -> Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// Writes keys `0..keys` once each, in a scrambled order, from `writers` threads.
fn durable_load(store: &dyn Store, keys: u64, writers: usize) -> Result<Load> {
    let order = Scramble::new(keys)?;
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let start_monotonic_ns = monotonic_ns()?;
    let start = Instant::now();
    let last_completion = AtomicU64::new(0);
    let longest_gap = AtomicU64::new(0);
    let longest_gap_end = AtomicU64::new(0);
    let mut secs = 0.0;
    let (hists, per_second) = std::thread::scope(|s| -> Result<(Vec<Histogram<u64>>, Vec<u64>)> {
        let sampler = s.spawn(|| {
            let mut per_second = Vec::new();
            let mut before = 0;
            let mut tick = start;
            while !finished.load(Ordering::Relaxed) {
                tick += Duration::from_secs(1);
                std::thread::sleep(tick.saturating_duration_since(Instant::now()));
                let now = done.load(Ordering::Relaxed);
                per_second.push(now - before);
                before = now;
            }
            per_second
        });
        let workers: Vec<_> = (0..writers)
            .map(|_| {
                s.spawn(|| -> Result<Histogram<u64>> {
                    let mut hist = Histogram::<u64>::new(3)?;
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= keys {
                            return Ok(hist);
                        }
                        let t0 = Instant::now();
                        store.put(&key(order.at(n)), &VALUE)?;
                        let end = start.elapsed().as_nanos() as u64;
                        hist.record(t0.elapsed().as_nanos() as u64)?;
                        done.fetch_add(1, Ordering::Relaxed);
                        let previous = last_completion.fetch_max(end, Ordering::Relaxed);
                        let gap = end.saturating_sub(previous);
                        if longest_gap.fetch_max(gap, Ordering::Relaxed) < gap {
                            longest_gap_end.store(end, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let hists = workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?)
            .collect::<Result<Vec<_>>>();
        // Before the sampler's last tick, which ends up to a second later.
        secs = start.elapsed().as_secs_f64();
        finished.store(true, Ordering::Relaxed);
        let per_second = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        Ok((hists?, per_second))
    })?;
    let mut total = Histogram::<u64>::new(3)?;
    for h in hists {
        total.add(h)?;
    }
    // The last sample covers a partial second: leave it out of the slowest second.
    let full = &per_second[..per_second.len().saturating_sub(1)];
    let quarter = &per_second[per_second.len() * 3 / 4..];
    Ok(Load {
        secs,
        slowest_second: full.iter().copied().min().unwrap_or(0) as f64,
        slowest_second_at: full
            .iter()
            .enumerate()
            .min_by_key(|&(_, n)| *n)
            .map_or(0.0, |(at, _)| at as f64),
        slow_seconds: {
            let mean = full.iter().sum::<u64>() / (full.len().max(1) as u64);
            full.iter().filter(|&&n| n < mean / 4).count() as f64
        },
        last_quarter_ops: quarter.iter().sum::<u64>() as f64 / quarter.len().max(1) as f64,
        p99_us: total.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: total.max() as f64 / 1e6,
        longest_gap_ms: longest_gap.load(Ordering::Relaxed) as f64 / 1e6,
        start_monotonic_ms: start_monotonic_ns as f64 / 1e6,
        longest_gap_end_monotonic_ms: (start_monotonic_ns + longest_gap_end.load(Ordering::Relaxed))
            as f64
            / 1e6,
    })
}

/// A bijection of `0..n` (`i * p mod n` with `p` prime to `n`): every key once, scattered.
struct Scramble {
    n: u64,
    p: u64,
}

impl Scramble {
    fn new(n: u64) -> Result<Self> {
        let p = 2_654_435_761; // prime
        anyhow::ensure!(n > 0 && gcd(p, n) == 1, "{n} keys: pick another multiplier");
        Ok(Self { n, p })
    }
    fn at(&self, i: u64) -> u64 {
        ((u128::from(i) * u128::from(self.p)) % u128::from(self.n)) as u64
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Bytes written so far to the block device holding `dir` (`/proc/diskstats`, sectors of
/// 512 bytes), by anyone: the benchmark is the only heavy writer. Not `/proc/self/io`'s
/// `write_bytes`, which charges a whole large folio each time a synced page is written
/// again, so a log that group-commits into pages zeroed ahead (pairdb's) reads several times
/// what reaches the disk.
fn device_bytes_written(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stats = std::fs::read_to_string("/proc/diskstats")?;
    let sectors = stats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[0] == major.to_string() && f[1] == minor.to_string())
        .with_context(|| format!("device {major}:{minor} not in /proc/diskstats"))?[9]
        .parse::<u64>()?;
    Ok(sectors * 512)
}

/// (VmRSS, VmHWM) of a process, bytes.
fn memory_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} for {pid}"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

struct NodeMemory {
    open_secs: f64,
    rss: u64,
    hwm: u64,
}

/// Starts `pairdb --role=storage` on the loaded directory inside `group`, waits for its
/// `/healthz`, reads its memory, and stops it.
fn storage_node_memory(
    bin: &Path,
    dir: &Path,
    cache: u64,
    group: &MemoryGroup,
) -> Result<NodeMemory> {
    let port = free_port()?;
    let http = free_port()?;
    let mut child = std::process::Command::new(bin)
        .args(["--role=storage", "--node-id=large"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--data-dir={}", dir.display()))
        .env("PAIRDB_STORAGE_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("PAIRDB_STORAGE_CACHE_BYTES", cache.to_string())
        .env(
            "PAIRDB_NODE_CLUSTER_SECRET",
            "pairdb-engine-bench-secret-0123456789",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let outcome = (|| -> Result<NodeMemory> {
        std::fs::write(group.procs_file(), pid.to_string())?;
        let t0 = Instant::now();
        while !healthy(http) {
            anyhow::ensure!(child.try_wait()?.is_none(), "the storage node exited");
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(300),
                "no /healthz in 300 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let open_secs = t0.elapsed().as_secs_f64();
        let (rss, hwm) = memory_of(pid)?;
        Ok(NodeMemory {
            open_secs,
            rss,
            hwm,
        })
    })();
    child.kill().ok();
    child.wait().ok();
    outcome
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let mut reply = String::new();
    s.write_all(request.as_bytes()).is_ok()
        && s.read_to_string(&mut reply).is_ok()
        && reply.starts_with("HTTP/1.1 200")
}
