//! pairdb engine vs RocksDB vs fjall, side by side in one run (BENCHMARKS.md, section 2).
//!
//! Same workload for each store: 100-byte values, keys `key-{n:010}`; durable writes return only
//! after the write-ahead log is synced (pairdb `sync=always` with group commit; RocksDB
//! `WriteOptions::set_sync(true)`; fjall `persist(SyncData)` after each insert).
//!
//! Usage: pairdb-engine-bench [--seconds N] [--keys N] [--replay-mib N] [--only writes|reads|scan|replay]
//!        pairdb-engine-bench --only large [--keys N] [--writers N] [--memory-limit-mib N]
//!            [--pairdb-bin PATH] [--seconds N]   (data larger than memory; see large.rs)

/// The `pairdb` binary's allocator (src/main.rs), so the engine allocates here as it does in a
/// storage node. RocksDB's C++ allocations go to glibc's malloc either way.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cgroup;
mod large;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use pairdb::config::SyncMode;
use pairdb::engine::{Engine, EngineOptions, Record};
use pairdb::ring::{HashRange, key_position};
use pairdb::vclock::{VectorClock, Version, physical_counter};

const TENANT: &str = "bench";
const VALUE: [u8; 100] = [b'v'; 100];

fn key(n: u64) -> Vec<u8> {
    format!("key-{n:010}").into_bytes()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// xorshift64*: cheap, per-thread random keys.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One store under test.
trait Store: Send + Sync {
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()>;
    fn get(&self, key: &[u8]) -> Result<bool>;
    /// Records whose pairdb ring hash lies in `range` (pairdb: its hash-range scan; peers: a
    /// full scan hashing every key, the only way they can answer it).
    fn scan_hash_range(&self, range: HashRange) -> Result<u64>;
    /// Make loaded data reach the on-disk tables (flush + compact).
    fn settle(&self) -> Result<()>;
    /// Bytes of tables written so far by flushes and compactions (not the log); `None` when
    /// the store does not count them.
    fn table_bytes_written(&self) -> Option<u64> {
        None
    }
    /// What the store says about its own write stalls: (name, value) pairs for the report.
    fn stall_diagnostics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// Where the store's compaction writes went, per level, in its own words (for stderr).
    fn compaction_report(&self) -> String {
        String::new()
    }
}

struct Pairdb {
    engine: Engine,
    counter: AtomicU64,
}

impl Pairdb {
    fn open(dir: &Path, sync: SyncMode, cache_bytes: u64, memtable_bytes: usize) -> Result<Self> {
        Self::with_options(
            dir,
            EngineOptions {
                sync,
                cache_bytes,
                memtable_bytes,
                compaction_bytes_per_sec: None,
                ..EngineOptions::default()
            },
        )
    }

    /// `PAIRDB_TABLE_FORMAT=N` writes tables in format N (to measure one format against another);
    /// `PAIRDB_L0_BYTES=N` merges level 0 at N bytes instead of the policy's default (to
    /// measure a merge size without rebuilding), `PAIRDB_L0_TRIGGER=N` at N tables;
    /// `PAIRDB_MEMTABLE_BYTES=N` freezes memtables
    /// at N bytes of memory instead of the caller's size.
    fn with_options(dir: &Path, mut options: EngineOptions) -> Result<Self> {
        if let Ok(v) = std::env::var("PAIRDB_MEMTABLE_BYTES") {
            options.memtable_bytes = v
                .parse()
                .context("PAIRDB_MEMTABLE_BYTES: a number of bytes")?;
        }
        if let Ok(v) = std::env::var("PAIRDB_L0_BYTES") {
            options.levels.l0_bytes = v.parse().context("PAIRDB_L0_BYTES: a number of bytes")?;
        }
        if let Ok(v) = std::env::var("PAIRDB_L0_TRIGGER") {
            options.levels.l0_trigger =
                v.parse().context("PAIRDB_L0_TRIGGER: a number of tables")?;
        }
        if let Ok(v) = std::env::var("PAIRDB_TABLE_FORMAT") {
            options.table_format = v
                .parse()
                .ok()
                .and_then(pairdb::engine::TableFormat::from_version)
                .context("PAIRDB_TABLE_FORMAT: 1, 2 or 3")?;
        }
        Ok(Self {
            engine: Engine::open(dir, options)?,
            counter: AtomicU64::new(physical_counter(now_ms())),
        })
    }
}

impl Store for Pairdb {
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        let version = Version::new(VectorClock::from_entries([("c1", c)]));
        self.engine
            .apply(Record::put(TENANT, key.to_vec(), version, value.to_vec()))?;
        Ok(())
    }
    fn get(&self, key: &[u8]) -> Result<bool> {
        Ok(self.engine.get(TENANT, key)?.is_some())
    }
    fn scan_hash_range(&self, range: HashRange) -> Result<u64> {
        let mut n = 0;
        for r in self.engine.scan_hash_range(range) {
            r?;
            n += 1;
        }
        Ok(n)
    }
    fn settle(&self) -> Result<()> {
        self.engine.flush()?;
        self.engine.compact()?;
        Ok(())
    }
    fn table_bytes_written(&self) -> Option<u64> {
        let s = self.engine.stats();
        Some(s.flush_bytes_written + s.compaction_bytes_written)
    }
    fn compaction_report(&self) -> String {
        let s = self.engine.stats();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let mut out = format!(
            "pairdb flushes: {}, {:.0} MiB\nlevel | merges | moves | input tables | read upper MiB | read lower MiB | written MiB\n",
            s.flushes,
            mib(s.flush_bytes_written)
        );
        for (n, l) in s.compaction_levels.iter().enumerate() {
            out += &format!(
                "L{n} | {} | {} | {} | {:.0} | {:.0} | {:.0}\n",
                l.merges,
                l.moves,
                l.input_tables,
                mib(l.read_upper_bytes),
                mib(l.read_lower_bytes),
                mib(l.written_bytes)
            );
        }
        out
    }
    fn stall_diagnostics(&self) -> Vec<(&'static str, f64)> {
        let s = self.engine.stats();
        vec![
            ("write_stalls", s.write_stalls as f64),
            ("write_stall_ms", s.write_stall_micros as f64 / 1e3),
            (
                "longest_log_sync_ms",
                s.wal_longest_sync_micros as f64 / 1e3,
            ),
        ]
    }
}

struct Rocks {
    db: rocksdb::DB,
    write: rocksdb::WriteOptions,
    /// Kept for its statistics (flush and compaction bytes).
    opts: rocksdb::Options,
}

impl Rocks {
    fn open(
        dir: &Path,
        sync: bool,
        cache_bytes: usize,
        write_buffer: Option<usize>,
    ) -> Result<Self> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.enable_statistics();
        if let Some(b) = write_buffer {
            opts.set_write_buffer_size(b);
        }
        let mut table = rocksdb::BlockBasedOptions::default();
        let cache = rocksdb::Cache::new_lru_cache(cache_bytes);
        table.set_block_cache(&cache);
        opts.set_block_based_table_factory(&table);
        let mut write = rocksdb::WriteOptions::default();
        write.set_sync(sync);
        Ok(Self {
            db: rocksdb::DB::open(&opts, dir)?,
            write,
            opts,
        })
    }
}

impl Store for Rocks {
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.put_opt(key, value, &self.write)?;
        Ok(())
    }
    fn get(&self, key: &[u8]) -> Result<bool> {
        Ok(self.db.get_pinned(key)?.is_some())
    }
    fn scan_hash_range(&self, range: HashRange) -> Result<u64> {
        let mut n = 0;
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            n += u64::from(range.contains(key_position(TENANT, &k)));
        }
        Ok(n)
    }
    fn settle(&self) -> Result<()> {
        self.db.flush()?;
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }
    fn table_bytes_written(&self) -> Option<u64> {
        use rocksdb::statistics::Ticker;
        Some(
            self.opts.get_ticker_count(Ticker::FlushWriteBytes)
                + self.opts.get_ticker_count(Ticker::CompactWriteBytes),
        )
    }
    fn compaction_report(&self) -> String {
        self.db
            .property_value("rocksdb.stats")
            .ok()
            .flatten()
            .unwrap_or_default()
    }
    fn stall_diagnostics(&self) -> Vec<(&'static str, f64)> {
        use rocksdb::statistics::Ticker;
        vec![(
            "write_stall_ms",
            self.opts.get_ticker_count(Ticker::StallMicros) as f64 / 1e3,
        )]
    }
}

struct Fjall {
    keyspace: fjall::Keyspace,
    items: fjall::PartitionHandle,
    durable: bool,
}

impl Fjall {
    fn open(dir: &Path, durable: bool, cache_bytes: u64) -> Result<Self> {
        let keyspace = fjall::Config::new(dir).cache_size(cache_bytes).open()?;
        let items = keyspace.open_partition("items", fjall::PartitionCreateOptions::default())?;
        Ok(Self {
            keyspace,
            items,
            durable,
        })
    }
}

impl Store for Fjall {
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.items.insert(key, value)?;
        if self.durable {
            self.keyspace.persist(fjall::PersistMode::SyncData)?;
        }
        Ok(())
    }
    fn get(&self, key: &[u8]) -> Result<bool> {
        Ok(self.items.get(key)?.is_some())
    }
    fn scan_hash_range(&self, range: HashRange) -> Result<u64> {
        let mut n = 0;
        for item in self.items.iter() {
            let (k, _) = item?;
            n += u64::from(range.contains(key_position(TENANT, &k)));
        }
        Ok(n)
    }
    fn settle(&self) -> Result<()> {
        self.items.rotate_memtable_and_wait()?;
        self.keyspace.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

struct Outcome {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `op` on `threads` threads for `seconds`, counting operations and latencies. The
/// threads are named `{label}.{n}`, so a syscall trace can tell the stores' writers apart.
fn drive(
    label: &str,
    threads: usize,
    seconds: f64,
    op: impl Fn(&mut Rng) -> Result<()> + Send + Sync,
) -> Result<Outcome> {
    let op = &op;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let results: Vec<Result<Histogram<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let worker = std::thread::Builder::new().name(format!("{label}.{t}"));
                worker.spawn_scoped(s, move || -> Result<Histogram<u64>> {
                    let mut hist = Histogram::<u64>::new(3)?;
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9ABC));
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        op(&mut rng)?;
                        hist.record(t0.elapsed().as_nanos() as u64)?;
                    }
                    Ok(hist)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.map_err(anyhow::Error::from).and_then(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
                })
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut total = Histogram::<u64>::new(3)?;
    for r in results {
        total.add(r?)?;
    }
    Ok(Outcome {
        ops_per_sec: total.len() as f64 / elapsed,
        p50_us: total.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: total.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

fn row(label: &str, p: &Outcome, r: &Outcome, f: &Outcome) {
    println!(
        "| {label} | {:.0} (p50 {:.0} / p99 {:.0} us) | {:.0} (p50 {:.0} / p99 {:.0} us) | {:.0} | {:.2}x | {:.2}x |",
        p.ops_per_sec,
        p.p50_us,
        p.p99_us,
        r.ops_per_sec,
        r.p50_us,
        r.p99_us,
        f.ops_per_sec,
        p.ops_per_sec / r.ops_per_sec,
        p.ops_per_sec / f.ops_per_sec
    );
}

/// The sync mode of pairdb's writes phase: `always` unless `PAIRDB_WRITES_SYNC=never`, an
/// experiment (what the same writers cost without any fsync), announced on stderr because the
/// phase's rows then do not measure durable writes.
fn pairdb_write_sync() -> Result<SyncMode> {
    match std::env::var("PAIRDB_WRITES_SYNC").as_deref() {
        Err(_) | Ok("always") => Ok(SyncMode::Always),
        Ok("never") => {
            eprintln!("PAIRDB_WRITES_SYNC=never: pairdb's writes are NOT synced in this run");
            Ok(SyncMode::Never)
        }
        Ok(other) => anyhow::bail!("PAIRDB_WRITES_SYNC: always or never, not {other:?}"),
    }
}

fn durable_writes(seconds: f64) -> Result<()> {
    println!("\n### Durable writes (100 B values, WAL synced before each write returns)\n");
    println!(
        "| writers | pairdb ops/s | RocksDB ops/s | fjall ops/s | pairdb/RocksDB | pairdb/fjall |"
    );
    println!("|---|---|---|---|---|---|");
    for writers in [1usize, 16, 64] {
        let (pd, rd, fd) = (
            tempfile::tempdir()?,
            tempfile::tempdir()?,
            tempfile::tempdir()?,
        );
        let seq = AtomicU64::new(0);
        let put_all = |name: &str, store: &dyn Store| {
            drive(&format!("{name}-{writers}"), writers, seconds, |_| {
                store.put(&key(seq.fetch_add(1, Ordering::Relaxed)), &VALUE)
            })
        };
        let pairdb = Pairdb::open(pd.path(), pairdb_write_sync()?, 64 << 20, 64 << 20)?;
        let p = put_all("pairdb", &pairdb)?;
        let st = pairdb.engine.stats();
        eprintln!(
            "pairdb: {} writes, {} fsyncs ({:.1} writes per fsync), {} flushes, {} write stalls ({} us)",
            st.writes_applied,
            st.wal_syncs,
            st.writes_applied as f64 / st.wal_syncs.max(1) as f64,
            st.flushes,
            st.write_stalls,
            st.write_stall_micros
        );
        let r = put_all("rocksdb", &Rocks::open(rd.path(), true, 64 << 20, None)?)?;
        let f = put_all("fjall", &Fjall::open(fd.path(), true, 64 << 20)?)?;
        row(&writers.to_string(), &p, &r, &f);
    }
    Ok(())
}

fn load(store: &dyn Store, keys: u64) -> Result<()> {
    let next = AtomicU64::new(0);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= keys {
                            return Ok(());
                        }
                        store.put(&key(n), &VALUE)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("loader panicked"))??;
        }
        Ok(())
    })?;
    store.settle()
}

fn point_reads(seconds: f64, keys: u64) -> Result<()> {
    println!("\n### Random point reads over {keys} keys (loaded, flushed and compacted first)\n");
    println!(
        "| cache, threads | pairdb ops/s | RocksDB ops/s | fjall ops/s | pairdb/RocksDB | pairdb/fjall |"
    );
    println!("|---|---|---|---|---|---|");
    let data_bytes = keys * 130;
    for (label, cache) in [
        ("hot", data_bytes * 2),
        ("cold (cache = 1/4 of data)", data_bytes / 4),
    ] {
        let (pd, rd, fd) = (
            tempfile::tempdir()?,
            tempfile::tempdir()?,
            tempfile::tempdir()?,
        );
        let p = Pairdb::open(pd.path(), SyncMode::Never, cache, 64 << 20)?;
        let r = Rocks::open(rd.path(), false, cache as usize, None)?;
        let f = Fjall::open(fd.path(), false, cache)?;
        let stores: [&dyn Store; 3] = [&p, &r, &f];
        for s in stores {
            load(s, keys)?;
        }
        for threads in [1usize, 2] {
            let mut outcomes = Vec::new();
            // Reader threads named per store, so a profile can take one store's alone.
            for (s, reader) in stores.into_iter().zip(["pdb-read", "rdb-read", "fj-read"]) {
                // Warm up the caches with the same access pattern, then measure.
                drive("warmup", threads, seconds / 2.0, |rng| {
                    s.get(&key(rng.next() % keys)).map(|_| ())
                })?;
                let found = AtomicU64::new(0);
                let o = drive(reader, threads, seconds, |rng| {
                    if s.get(&key(rng.next() % keys))? {
                        found.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })?;
                anyhow::ensure!(found.load(Ordering::Relaxed) > 0, "reads found nothing");
                outcomes.push(o);
            }
            row(
                &format!("{label}, {threads}"),
                &outcomes[0],
                &outcomes[1],
                &outcomes[2],
            );
        }
        let stats = p.engine.stats();
        let total = (stats.cache_hits + stats.cache_misses).max(1);
        println!(
            "\npairdb row-cache hit rate ({label}): {:.1}%\n",
            stats.cache_hits as f64 * 100.0 / total as f64
        );
    }
    Ok(())
}

fn hash_scan(keys: u64) -> Result<()> {
    println!("\n### Hash-range scan: a quarter of the ring over {keys} keys\n");
    println!("| store | records in range | seconds | records/s | pairdb/peer |");
    println!("|---|---|---|---|---|");
    let (pd, rd, fd) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let p = Pairdb::open(pd.path(), SyncMode::Never, 64 << 20, 64 << 20)?;
    let r = Rocks::open(rd.path(), false, 64 << 20, None)?;
    let f = Fjall::open(fd.path(), false, 64 << 20)?;
    let range = HashRange::new(1 << 62, 1 << 63);
    let mut rates = Vec::new();
    for (name, s) in [
        ("pairdb", &p as &dyn Store),
        ("RocksDB (full scan + hash)", &r),
        ("fjall (full scan + hash)", &f),
    ] {
        load(s, keys)?;
        let t0 = Instant::now();
        let n = s.scan_hash_range(range)?;
        let secs = t0.elapsed().as_secs_f64();
        rates.push((name, n, secs, n as f64 / secs));
    }
    let ours = rates[0].3;
    for (name, n, secs, rate) in rates {
        println!(
            "| {name} | {n} | {secs:.2} | {rate:.0} | {:.2}x |",
            ours / rate
        );
    }
    Ok(())
}

/// Writes every dirty page back (`sync(1)`): a timed open starts with a quiet disk.
fn flush_page_cache() -> Result<()> {
    let status = std::process::Command::new("sync").status()?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn replay(mib: u64) -> Result<()> {
    println!(
        "\n### Commit-log replay: {mib} MiB of log, 1000-byte values, opened cold after close\n"
    );
    println!("| store | log bytes | open seconds | MB/s | pairdb/peer |");
    println!("|---|---|---|---|---|");
    let value = [b'r'; 1000];
    let records = mib * 1024 * 1024 / 1060;
    let mut rows = Vec::new();
    {
        let dir = tempfile::tempdir()?;
        {
            let p = Pairdb::open(dir.path(), SyncMode::Never, 0, 8 << 30)?;
            for n in 0..records {
                p.put(&key(n), &value)?;
            }
            p.engine.close()?;
        }
        let bytes = dir_bytes(&dir.path().join("wal"));
        // The log was written without fsync: write it back now, so the timed open does not
        // share the disk with the kernel's writeback of it (RocksDB's writer syncs its log).
        flush_page_cache()?;
        let t0 = Instant::now();
        let p = Pairdb::open(dir.path(), SyncMode::Never, 0, 8 << 30)?;
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            p.engine.stats().replay.records == records,
            "replayed {} of {records}",
            p.engine.stats().replay.records
        );
        rows.push(("pairdb", bytes, secs));
    }
    {
        // RocksDB flushes its memtable on a clean close, so the writer runs in a child process
        // that syncs the WAL and is then killed: the next open must replay the log.
        let dir = tempfile::tempdir()?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--rocks-replay-writer",
                &dir.path().display().to_string(),
                &records.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("child stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        anyhow::ensure!(line.trim() == "READY", "RocksDB writer failed: {line:?}");
        child.kill()?;
        child.wait()?;
        let bytes = dir_bytes(dir.path());
        flush_page_cache()?;
        let t0 = Instant::now();
        let r = Rocks::open(dir.path(), false, 8 << 20, Some(8 << 30))?;
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(r.get(&key(records - 1))?, "RocksDB lost the last record");
        rows.push(("RocksDB", bytes, secs));
    }
    let ours = rows[0].1 as f64 / rows[0].2;
    for (name, bytes, secs) in rows {
        let rate = bytes as f64 / secs;
        println!(
            "| {name} | {bytes} | {secs:.2} | {:.0} | {:.2}x |",
            rate / 1e6,
            ours / rate
        );
    }
    Ok(())
}

/// Child process of the replay benchmark: fills RocksDB's WAL, syncs it, and waits to be killed.
fn rocks_replay_writer(dir: &str, records: u64) -> Result<()> {
    let r = Rocks::open(Path::new(dir), false, 8 << 20, Some(8 << 30))?;
    let value = [b'r'; 1000];
    for n in 0..records {
        r.put(&key(n), &value)?;
    }
    r.db.flush_wal(true)?;
    println!("READY");
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--rocks-replay-writer") {
        let dir = args.get(2).context("dir")?;
        let records: u64 = args.get(3).context("records")?.parse()?;
        return rocks_replay_writer(dir, records);
    }
    if args.get(1).map(String::as_str) == Some("--large-child") {
        return large::child(&args[2..]);
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seconds: f64 = flag("--seconds")
        .map(|s| s.parse())
        .transpose()
        .context("--seconds")?
        .unwrap_or(3.0);
    let keys: u64 = flag("--keys")
        .map(|s| s.parse())
        .transpose()
        .context("--keys")?
        .unwrap_or(1_000_000);
    let replay_mib: u64 = flag("--replay-mib")
        .map(|s| s.parse())
        .transpose()
        .context("--replay-mib")?
        .unwrap_or(1024);
    let only = flag("--only");
    if only.as_deref() == Some("large") {
        let keys = flag("--keys")
            .map_or(Ok(10_000_000), |s| s.parse())
            .context("--keys")?;
        let user_bytes = keys * 114;
        let plan = large::Plan {
            keys,
            writers: flag("--writers")
                .map_or(Ok(16), |s| s.parse())
                .context("--writers")?,
            read_seconds: seconds,
            // Half the data by default: neither the data nor its page cache fits.
            memory_limit: flag("--memory-limit-mib")
                .map(|s| s.parse::<u64>().map(|m| m << 20))
                .transpose()
                .context("--memory-limit-mib")?
                .unwrap_or(user_bytes / 2),
            pairdb_bin: flag("--pairdb-bin").map(Into::into),
            stores: flag("--stores")
                .unwrap_or_else(|| "pairdb,rocksdb".into())
                .split(',')
                .map(str::to_owned)
                .collect(),
            frozen_memtables: flag("--frozen-memtables")
                .map_or(Ok(EngineOptions::default().max_immutable_memtables), |s| {
                    s.parse()
                })
                .context("--frozen-memtables")?,
        };
        return large::run(&plan);
    }
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    println!(
        "## Engine benchmark: pairdb vs RocksDB (rocksdb crate 0.24) vs fjall 2 ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if run("writes") {
        durable_writes(seconds)?;
    }
    if run("reads") {
        point_reads(seconds, keys)?;
    }
    if run("scan") {
        hash_scan(keys)?;
    }
    if run("replay") {
        replay(replay_mib)?;
    }
    Ok(())
}
