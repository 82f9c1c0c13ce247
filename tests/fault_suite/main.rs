//! The fault-injection suite: a cluster of real `pairdb` processes (5 storage nodes, 2
//! coordinators, 2 gateways, PostgreSQL and Redis) in network namespaces of its own, clients
//! recording a history, a nemesis injecting crashes, pauses, partitions, packet loss, latency,
//! clock skew and a full disk, and a checker over the history and the healed final state
//! (docs/reliability.md).
//!
//! ```text
//! cargo test --test fault_suite                        # --quick: a fixed seed and a random one
//! cargo test --release --test fault_suite -- --soak 30m [--seed N] [--sqlite]
//! ```
//! Needs root (namespaces, nftables, a tmpfs mount), `ip`, `nft`, `mount`; libfaketime for
//! clock skew. Where something is missing it says so and skips, except under CI=true, where it
//! fails. Reports go to `target/fault-suite/` (report.json, report.html).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod admin;
#[path = "../common/backends.rs"]
#[allow(dead_code)]
mod backends;
mod checker;
mod cluster;
mod final_state;
mod history;
mod lab;
mod nemesis;
mod report;
mod workload;

use std::time::{Duration, Instant};

use cluster::Cluster;
use final_state::final_state;
use history::FinalKey;
use nemesis::Nemesis;
use report::RunReport;
use workload::Workload;

const FIXED_SEED: u64 = 20261201;
const QUICK_SECONDS: u64 = 60;
/// After healing: time for hints to replay before the final state is read (and the replicas
/// repaired).
const CONVERGENCE: Duration = Duration::from_secs(15);
const RF: usize = 3;

struct Args {
    seconds: u64,
    seeds: Vec<u64>,
    sqlite: bool,
    /// Only these fault kinds (`--faults kill,topology`); all by default.
    faults: Option<Vec<String>>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: QUICK_SECONDS,
        seeds: Vec::new(),
        sqlite: false,
        faults: None,
    };
    let mut soak = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {}
            "--soak" => {
                let d = it.next().ok_or("--soak needs a duration (e.g. 30m)")?;
                args.seconds = humantime::parse_duration(&d)
                    .map_err(|e| format!("--soak {d}: {e}"))?
                    .as_secs();
                soak = true;
            }
            "--seed" => {
                let s = it.next().ok_or("--seed needs a number")?;
                args.seeds
                    .push(s.parse().map_err(|e| format!("--seed {s}: {e}"))?);
            }
            "--sqlite" => args.sqlite = true,
            "--faults" => {
                let list = it
                    .next()
                    .ok_or("--faults needs a list (e.g. kill,topology)")?;
                args.faults = Some(list.split(',').map(str::to_owned).collect());
            }
            // What cargo's test runner passes along (filters, --nocapture, ...).
            _ => {}
        }
    }
    if args.seeds.is_empty() {
        let random = pairdb::wallclock::now_ms() ^ u64::from(std::process::id()) << 20;
        args.seeds = if soak {
            vec![random]
        } else {
            vec![FIXED_SEED, random]
        };
    }
    Ok(args)
}

/// What the suite needs from the machine; `Err` names what is missing.
fn prerequisites() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root (network namespaces, nftables and mounts need it)".to_owned());
    }
    for (tool, args) in [
        ("ip", &["-V"][..]),
        ("nft", &["--version"][..]),
        ("mount", &["--version"][..]),
    ] {
        lab::run(tool, args).map_err(|e| format!("{tool} is missing: {e}"))?;
    }
    Ok(())
}

fn main() {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fault suite: {e}");
            std::process::exit(2);
        }
    };
    if let Err(missing) = prerequisites() {
        if ci {
            eprintln!("fault suite FAILED: CI=true but {missing}");
            std::process::exit(1);
        }
        eprintln!("fault suite SKIPPED: {missing}");
        return;
    }
    let mut reports = Vec::new();
    for seed in &args.seeds {
        eprintln!("fault suite: seed {seed}, {} s of faults", args.seconds);
        match run_once(*seed, &args, ci) {
            Ok(Some(r)) => {
                eprintln!("fault suite: {}", r.summary());
                reports.push(r);
            }
            Ok(None) => {
                eprintln!("fault suite SKIPPED: {}", cluster::NO_NAMESPACES);
                return;
            }
            Err(e) => {
                eprintln!("fault suite FAILED (seed {seed}): {e}");
                std::process::exit(1);
            }
        }
    }
    let out = report_dir();
    let _ = std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&reports).unwrap_or_default(),
    );
    let _ = std::fs::write(out.join("report.html"), report::html(&reports));
    eprintln!("fault suite: report in {}", out.display());
    for r in &reports {
        for a in &r.anomalies {
            eprintln!(
                "ANOMALY seed {} {} {}/{}: {}",
                r.seed, a.kind, a.tenant, a.key, a.what
            );
        }
    }
    if reports.iter().any(|r| !r.anomalies.is_empty()) {
        std::process::exit(1);
    }
}

/// `target/fault-suite/`, created.
fn report_dir() -> std::path::PathBuf {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.parent().unwrap_or(tmp).join("fault-suite");
    let _ = std::fs::create_dir_all(&out);
    out
}

/// The whole history (one operation per line) and the final state, for a closer look.
fn write_history(seed: u64, ops: &[history::Op], finals: &[FinalKey]) {
    let lines: Vec<String> = ops
        .iter()
        .filter_map(|o| serde_json::to_string(o).ok())
        .collect();
    let dir = report_dir();
    let _ = std::fs::write(dir.join(format!("history-{seed}.jsonl")), lines.join("\n"));
    let _ = std::fs::write(
        dir.join(format!("final-{seed}.json")),
        serde_json::to_string_pretty(finals).unwrap_or_default(),
    );
}

/// One run; `Ok(None)` when this machine cannot build the suite's network (skipped outside CI).
fn run_once(seed: u64, args: &Args, ci: bool) -> Result<Option<RunReport>, String> {
    let (seconds, sqlite) = (args.seconds, args.sqlite);
    let mut dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // For debugging a run: its processes' logs and data stay (and are named on stderr).
    if std::env::var_os("PAIRDB_FAULT_SUITE_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!(
            "fault suite: logs and data kept in {}",
            dir.path().display()
        );
    }
    let mut cluster = match Cluster::start(dir.path(), sqlite) {
        Ok(c) => c,
        Err(e) if !ci && e.starts_with(cluster::NO_NAMESPACES) => {
            eprintln!("fault suite: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let (mut kinds, refused) = nemesis::available(&cluster);
    if let Some(only) = &args.faults {
        kinds.retain(|k| only.iter().any(|o| o == k.name()));
    }
    for (kind, why) in &refused {
        eprintln!(
            "fault suite: {} refused by this machine: {why}",
            kind.name()
        );
    }
    // What .ci/run installs or the machine must allow is a failure under CI when refused. A
    // kernel without netem is a property of the machine CI runs on: reported, not failed.
    let required = |k: &nemesis::FaultKind| *k != nemesis::FaultKind::Latency;
    if ci {
        if let Some((kind, why)) = refused.iter().find(|(k, _)| required(k)) {
            return Err(format!("CI=true but {} was refused: {why}", kind.name()));
        }
    }
    // Built after the cluster: its threads start in the hub namespace like this one.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let gateways = cluster.gateway_urls();
    runtime.block_on(setup(&gateways))?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workload = Workload::new(gateways.clone(), start);
    let mut nemesis = Nemesis::new(
        kinds,
        seed,
        start,
        runtime.handle().clone(),
        gateways.clone(),
    );
    let (cluster, nemesis_result) = std::thread::scope(|s| {
        let handle = s.spawn(move || {
            let result = nemesis.run(&mut cluster, deadline);
            (cluster, nemesis, result)
        });
        runtime.block_on(workload.run(deadline, seed));
        handle.join().map_err(|_| "the nemesis panicked".to_owned())
    })
    .map(|(c, n, r)| (c, r.map(|()| n)))?;
    let nemesis = nemesis_result?;
    let end_ms = workload.now_ms();
    for migration in [&nemesis.migration, &nemesis.rf_migration] {
        runtime.block_on(wait_for_migration(&gateways, migration.as_deref()))?;
    }
    std::thread::sleep(CONVERGENCE);
    let (finals, after_healing) = runtime
        .block_on(final_state(&workload, &cluster))
        .map_err(|e| format!("{e}; faults injected: {:?}", nemesis.events))?;
    let ops = workload.ops();
    write_history(seed, &ops, &finals);
    let anomalies = checker::check(&ops, &finals, end_ms, !sqlite);
    let refused = refused
        .into_iter()
        .map(|(k, why)| (k.name().to_owned(), why))
        .collect();
    let backends = if sqlite {
        "sqlite + memory"
    } else {
        "postgresql + redis"
    };
    drop(cluster);
    let mut report = RunReport::new(
        seed,
        seconds,
        backends,
        &ops,
        nemesis.events,
        refused,
        anomalies,
    );
    report.after_healing = after_healing;
    Ok(Some(report))
}

/// Waits for every storage node to be active, then creates the two tenants (RF 3).
async fn setup(gateways: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = admin::storage_nodes(&gateways[0]).await.unwrap_or_default();
        let active = nodes.iter().filter(|n| n["status"] == "active").count();
        if active == cluster::STORAGE {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {active} storage nodes active after 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for tenant in workload::TENANTS {
        admin::create_tenant(&gateways[0], tenant, RF).await?;
    }
    Ok(())
}

/// Waits until the last topology or RF change finished (they resume after coordinator
/// restarts).
async fn wait_for_migration(gateways: &[String], migration: Option<&str>) -> Result<(), String> {
    let Some(m) = migration else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = String::new();
    while Instant::now() < deadline {
        match admin::migration_state(&gateways[0], m).await {
            Ok(state) if state.finished() => return Ok(()),
            Ok(state) => last = state.to_string(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "migration {m} did not finish after healing: {last}"
    ))
}
