//! `pairdb bench`: a load generator against a gateway URL. `--concurrency` workers each keep one
//! request in flight for `--duration` (writes, reads or an even mix over `--keys` keys with
//! `--value-size`-byte string values at `--consistency`); reads first write every key once
//! (`--no-preload` skips that). `--rate N` paces the run at N requests per second in total
//! (open loop: a request's latency counts from when it was due). `--workload load` instead
//! writes every key once, in key order, `--batch` keys per `POST /v1/key-value/batch`, and
//! ends when all are written: a preload for large key sets, which the reads' preload uses
//! too. A batch that fails is sent again whole, up to three times.
//!
//! Latencies go into HDR histograms (one per worker, merged), a progress bar shows the running
//! rate, and the end prints throughput and p50/p90/p99/p99.9, or one JSON object with
//! `--json`. SIGINT or SIGTERM ends the run early, with the report of what ran.
//! `--latency-log FILE` also writes one line per request (due time in Unix µs, latency µs,
//! status), so a benchmark script can take percentiles over any span of one continuous load
//! (e.g. before and during a topology change).
//!
//! The request shapes are those of `../shared/bench/wrk/pairdb_*.lua`, so its numbers can be
//! compared with wrk's.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{BenchArgs, Connection, Workload};

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: String,
    pub consistency: String,
    pub concurrency: u32,
    pub seconds: f64,
    pub requests: u64,
    /// Requests that failed: not a 200 (for `load`: or with an item that did not succeed).
    pub errors: u64,
    pub requests_per_second: f64,
    pub latency_ms: BTreeMap<String, f64>,
    /// Answers by HTTP status (0 = no answer).
    pub statuses: BTreeMap<u16, u64>,
    /// `--workload load`: the keys written (each request carries up to `--batch` of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_per_second: Option<f64>,
}

/// Requests' latencies and answers, per worker, merged at the end.
struct Requests {
    histogram: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
}

impl Requests {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("histogram: {e}"))?,
            statuses: BTreeMap::new(),
        })
    }

    fn record(&mut self, micros: u64, status: u16) {
        self.histogram.saturating_record(micros);
        *self.statuses.entry(status).or_insert(0) += 1;
    }

    fn absorb(&mut self, other: Requests) -> anyhow::Result<()> {
        self.histogram
            .add(&other.histogram)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_insert(0) += n;
        }
        Ok(())
    }
}

/// xorshift64*: cheap per-worker key choice; quality is irrelevant here.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn client(conn: &Connection, concurrency: u32) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = &conn.tenant {
        headers.insert("X-Tenant-ID", t.parse().context("--tenant")?);
    }
    if let Some(t) = &conn.token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().context("--token")?,
        );
    }
    Ok(super::client::http_builder(conn.cacert.as_deref())?
        .default_headers(headers)
        .pool_max_idle_per_host(concurrency as usize)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// One request; returns the HTTP status (0 when there was no answer).
async fn one(
    client: &reqwest::Client,
    url: &str,
    write: bool,
    key: u64,
    value: &str,
    consistency: &str,
) -> u16 {
    let request = if write {
        client
            .post(format!("{url}/v1/key-value"))
            .header("Content-Type", "application/json")
            .body(format!(
                r#"{{"key":"k{key}","value":"{value}","consistency":"{consistency}"}}"#
            ))
    } else {
        client.get(format!(
            "{url}/v1/key-value?key=k{key}&consistency={consistency}"
        ))
    };
    match request.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            // Read the body so the connection goes back to the pool.
            let _ = r.bytes().await;
            status
        }
        Err(_) => 0,
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let duration = humantime::parse_duration(&args.duration)
        .with_context(|| format!("--duration {:?}", args.duration))?;
    let url = args.conn.url.trim_end_matches('/').to_owned();
    let client = client(&args.conn, args.concurrency)?;
    let value: Arc<str> = "x".repeat(args.value_size).into();
    let consistency: Arc<str> = args.consistency.clone().into();
    let keys = args.keys.max(1);

    // SIGINT or SIGTERM: workers finish the request in flight and stop.
    let stopped = crate::shutdown::on_signal().context("signal handlers")?;
    let target = LoadTarget {
        client: &client,
        url: &url,
        value: &value,
        consistency: &consistency,
        concurrency: args.concurrency,
    };
    if args.workload == Workload::Load {
        return load_report(args, &target, &stopped).await;
    }
    if !args.no_preload && args.workload != Workload::Writes {
        let batches = Batches::new(keys, args.batch);
        let hidden = indicatif::ProgressBar::hidden();
        let loaded = load(&target, &batches, &stopped, &hidden).await?;
        if loaded.failed > 0 || loaded.written < keys {
            anyhow::bail!(
                "preload wrote {} of {keys} keys ({} failed): {:?}",
                loaded.written,
                loaded.failed,
                loaded.requests.statuses
            );
        }
    }

    let done = Arc::new(AtomicU64::new(0));
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(duration.as_secs().max(1))
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let deadline = started + duration;
    let (log, log_writer) = match &args.latency_log {
        Some(path) => {
            let (tx, writer) = latency_log(path)?;
            (Some(tx), Some(writer))
        }
        None => (None, None),
    };
    // Due times as Unix time: the log's instants mapped through one reading of both clocks.
    let unix_at_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    let mut tasks = tokio::task::JoinSet::new();
    // With --rate: the interval between two requests of the whole run.
    let pace = (args.rate > 0).then(|| Duration::from_secs(1) / args.rate);
    let concurrency = args.concurrency;
    for worker in 0..args.concurrency {
        let (client, url, value, consistency, done, stopped, log) = (
            client.clone(),
            url.clone(),
            value.clone(),
            consistency.clone(),
            done.clone(),
            stopped.clone(),
            log.clone(),
        );
        let workload = args.workload;
        tasks.spawn(async move {
            let mut w = Requests::new()?;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64
                ^ (u64::from(worker) + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            // Paced: this worker's share of the rate, requests due on a fixed schedule.
            let every = pace.map(|p| p * concurrency);
            let mut due =
                Instant::now() + every.map_or(Duration::ZERO, |e| e * worker / concurrency);
            while Instant::now() < deadline && !stopped.is_cancelled() {
                let r = next(&mut rng);
                let write = match workload {
                    Workload::Writes | Workload::Load => true,
                    Workload::Reads => false,
                    Workload::Mixed => r & 1 == 0,
                };
                let sent = match every {
                    Some(every) => {
                        tokio::time::sleep_until(due.into()).await;
                        let at = due;
                        due += every;
                        at
                    }
                    None => Instant::now(),
                };
                let status = one(&client, &url, write, (r >> 1) % keys, &value, &consistency).await;
                let micros = sent.elapsed().as_micros().max(1) as u64;
                w.record(micros, status);
                if let Some(log) = &log {
                    let due = unix_at_start + sent.saturating_duration_since(started);
                    // The writer ends only when every sender is gone: a send cannot fail
                    // before that, and a line lost to a failed writer is reported at its join.
                    let _ = log.send((due.as_micros() as u64, micros, status));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<Requests, anyhow::Error>(w)
        });
    }
    let ticker = {
        let (progress, done) = (progress.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while Instant::now() < deadline {
                tick.tick().await;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let n = done.load(Ordering::Relaxed);
                progress.set_position(started.elapsed().as_secs());
                progress.set_message(format!("{n} requests, {:.0}/s", n as f64 / secs));
            }
        })
    };

    let mut all = Requests::new()?;
    while let Some(finished) = tasks.join_next().await {
        all.absorb(finished??)?;
    }
    let Requests {
        histogram,
        statuses,
    } = all;
    ticker.abort();
    drop(log);
    if let Some(writer) = log_writer {
        writer.await.context("latency log writer")??;
    }
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let requests = histogram.len();
    let errors = statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum();
    Ok(Report {
        workload: format!("{:?}", args.workload).to_lowercase(),
        consistency: args.consistency.clone(),
        concurrency: args.concurrency,
        seconds,
        requests,
        errors,
        requests_per_second: requests as f64 / seconds.max(0.001),
        latency_ms: percentiles(&histogram),
        statuses,
        keys_written: None,
        keys_per_second: None,
    })
}

fn percentiles(histogram: &Histogram<u64>) -> BTreeMap<String, f64> {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    BTreeMap::from([
        ("p50".to_owned(), ms(0.5)),
        ("p90".to_owned(), ms(0.9)),
        ("p99".to_owned(), ms(0.99)),
        ("p99.9".to_owned(), ms(0.999)),
        ("max".to_owned(), histogram.max() as f64 / 1000.0),
    ])
}

/// The key ranges of a load, handed out in key order: batch `i` is keys `i*size ..`.
struct Batches {
    keys: u64,
    size: u64,
    next: AtomicU64,
}

impl Batches {
    fn new(keys: u64, size: u64) -> Self {
        Self {
            keys,
            size: size.max(1),
            next: AtomicU64::new(0),
        }
    }

    /// The next batch's keys, or `None` once every key was handed out.
    fn take(&self) -> Option<std::ops::Range<u64>> {
        let first = self
            .next
            .fetch_add(1, Ordering::Relaxed)
            .checked_mul(self.size)?;
        (first < self.keys).then(|| first..self.keys.min(first.saturating_add(self.size)))
    }
}

/// What a load did: request latencies and statuses, keys written and keys not written.
struct Loaded {
    requests: Requests,
    /// Requests that were not a 200 with every item a success.
    failed_attempts: u64,
    written: u64,
    failed: u64,
}

impl Loaded {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            requests: Requests::new()?,
            failed_attempts: 0,
            written: 0,
            failed: 0,
        })
    }
}

/// Attempts per batch: a batch that got no answer, a non-200 or an item error is sent again
/// whole (a put of the same value again is harmless), at most this many times in all.
const LOAD_ATTEMPTS: u32 = 3;

/// Where and what a load writes.
struct LoadTarget<'a> {
    client: &'a reqwest::Client,
    url: &'a str,
    value: &'a str,
    consistency: &'a str,
    /// Batch requests in flight.
    concurrency: u32,
}

/// Writes every key of `batches` once, until all are written or `stopped`; `progress` advances
/// by the keys of each written batch.
async fn load(
    target: &LoadTarget<'_>,
    batches: &Batches,
    stopped: &tokio_util::sync::CancellationToken,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Loaded> {
    let LoadTarget {
        client,
        url,
        value,
        consistency,
        concurrency,
    } = *target;
    let worker = || async {
        let mut done = Loaded::new()?;
        while !stopped.is_cancelled() {
            let Some(range) = batches.take() else {
                break;
            };
            let keys = range.end - range.start;
            let items = usize::try_from(keys)?;
            let body = batch_body(range, value, consistency);
            let mut ok = false;
            for _ in 0..LOAD_ATTEMPTS {
                let sent = Instant::now();
                let (status, succeeded) = batch_put(client, url, body.clone()).await;
                let micros = sent.elapsed().as_micros().max(1) as u64;
                done.requests.record(micros, status);
                if status == 200 && succeeded == items {
                    ok = true;
                    break;
                }
                done.failed_attempts += 1;
            }
            if ok {
                progress.inc(keys);
                done.written += keys;
            } else {
                done.failed += keys;
            }
        }
        Ok::<Loaded, anyhow::Error>(done)
    };
    let workers = futures::future::join_all((0..concurrency).map(|_| worker())).await;
    let mut total = Loaded::new()?;
    for w in workers {
        let w = w?;
        total.requests.absorb(w.requests)?;
        total.failed_attempts += w.failed_attempts;
        total.written += w.written;
        total.failed += w.failed;
    }
    Ok(total)
}

/// A `POST /v1/key-value/batch` body putting `value` under `k{n}` for every `n` of `keys`
/// (keys and value need no JSON escaping: digits, and the value is `x`s).
fn batch_body(keys: std::ops::Range<u64>, value: &str, consistency: &str) -> bytes::Bytes {
    let items: Vec<String> = keys
        .map(|n| format!(r#"{{"key":"k{n}","value":"{value}"}}"#))
        .collect();
    format!(
        r#"{{"items":[{}],"consistency":"{consistency}"}}"#,
        items.join(",")
    )
    .into()
}

/// One batch request: its HTTP status (0: no answer) and how many of its items succeeded.
async fn batch_put(client: &reqwest::Client, url: &str, body: bytes::Bytes) -> (u16, usize) {
    #[derive(serde::Deserialize)]
    struct Item {
        status: String,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Item>,
    }
    let sent = client
        .post(format!("{url}/v1/key-value/batch"))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await;
    let Ok(response) = sent else {
        return (0, 0);
    };
    let status = response.status().as_u16();
    match response.json::<Answer>().await {
        Ok(answer) => (
            status,
            answer
                .results
                .iter()
                .filter(|i| i.status == "success")
                .count(),
        ),
        // An error answer has no `results`; its status says what went wrong.
        Err(_) => (status, 0),
    }
}

/// `--workload load`: the load with a progress bar over the keys, reported like a run.
async fn load_report(
    args: &BenchArgs,
    target: &LoadTarget<'_>,
    stopped: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Report> {
    let keys = args.keys.max(1);
    let batches = Batches::new(keys, args.batch);
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(keys)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} keys, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let loaded = load(target, &batches, stopped, &progress).await?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let requests = loaded.requests.histogram.len();
    Ok(Report {
        workload: "load".to_owned(),
        consistency: args.consistency.clone(),
        concurrency: args.concurrency,
        seconds,
        requests,
        errors: loaded.failed_attempts,
        requests_per_second: requests as f64 / seconds.max(0.001),
        latency_ms: percentiles(&loaded.requests.histogram),
        statuses: loaded.requests.statuses,
        keys_written: Some(loaded.written),
        keys_per_second: Some(loaded.written as f64 / seconds.max(0.001)),
    })
}

type LogLine = (u64, u64, u16);

/// The `--latency-log` file and the task writing the lines sent to it; the task ends (flushed)
/// once every sender is dropped.
fn latency_log(
    path: &std::path::Path,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedSender<LogLine>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("--latency-log {}", path.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<LogLine>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::new(file);
        while let Some((due, micros, status)) = rx.blocking_recv() {
            writeln!(out, "{due} {micros} {status}")?;
        }
        out.flush()?;
        Ok(())
    });
    Ok((tx, writer))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} at {}, {} workers, {:.1} s: {} requests, {:.0}/s, {} errors",
            self.workload,
            self.consistency,
            self.concurrency,
            self.seconds,
            self.requests,
            self.requests_per_second,
            self.errors
        )?;
        let l = &self.latency_ms;
        let get = |k: &str| l.get(k).copied().unwrap_or(0.0);
        writeln!(
            f,
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            get("p50"),
            get("p90"),
            get("p99"),
            get("p99.9"),
            get("max")
        )?;
        write!(f, "statuses: {:?}", self.statuses)?;
        if let (Some(keys), Some(rate)) = (self.keys_written, self.keys_per_second) {
            write!(f, "\nkeys written: {keys}, {rate:.0}/s")?;
        }
        Ok(())
    }
}
