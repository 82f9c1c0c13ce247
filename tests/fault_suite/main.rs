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
mod history;
mod lab;
mod nemesis;
mod report;
mod workload;

use std::time::{Duration, Instant};

use pairdb::ring::{NodeId, NodeState, Ring, RingNode, key_position};
use pairdb::rpc::storage as spb;
use pairdb::vclock::Version;
use serde_json::Value;

use cluster::Cluster;
use history::{FinalKey, Outcome};
use nemesis::Nemesis;
use report::{AfterHealing, RunReport};
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
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
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
    runtime.block_on(wait_for_migration(&gateways, nemesis.migration.as_deref()))?;
    std::thread::sleep(CONVERGENCE);
    let (finals, after_healing) = runtime
        .block_on(final_state(&workload, &cluster))
        .map_err(|e| format!("{e}; faults injected: {:?}", nemesis.events))?;
    let ops = workload.ops();
    write_history(seed, &ops, &finals);
    let anomalies = checker::check(&ops, &finals, end_ms);
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

/// Waits until the last topology change finished (it resumes after coordinator restarts).
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

/// The ring as the registry has it now.
async fn current_ring(gateway: &str) -> Result<Ring, String> {
    let nodes = admin::storage_nodes(gateway).await?;
    let mut ring_nodes = Vec::new();
    for n in nodes {
        let state: NodeState = serde_json::from_value(n["status"].clone())
            .map_err(|e| format!("node state {}: {e}", n["status"]))?;
        let tokens = n["tokens"]
            .as_array()
            .ok_or_else(|| format!("node without tokens: {n}"))?
            .iter()
            .map(|t| t.as_str().and_then(|t| t.parse::<u64>().ok()))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| format!("unreadable tokens: {n}"))?;
        ring_nodes.push(RingNode {
            id: NodeId::new(n["node_id"].as_str().unwrap_or_default()),
            virtual_nodes: n["virtual_nodes"].as_u64().unwrap_or(0) as u32,
            tokens: Some(tokens),
            state,
        });
    }
    Ok(Ring::new(ring_nodes))
}

/// Which nodes each storage node's gossip reports down (its first `WatchHealth` message).
async fn gossip_views(storage: &[(String, std::net::SocketAddr)]) -> String {
    let mut views = Vec::new();
    for (name, addr) in storage {
        let view = async {
            let mut client = cluster::storage_client(*addr).await?;
            let mut stream = client
                .watch_health(spb::WatchHealthRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let first = stream
                .message()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream ended")?;
            let down: Vec<String> = first
                .members
                .iter()
                .filter(|m| !m.up)
                .map(|m| m.node_id.clone())
                .collect();
            Ok::<String, String>(format!("down {down:?}"))
        };
        let view = tokio::time::timeout(Duration::from_secs(3), view)
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        views.push(format!("{name}: {}", view.unwrap_or_else(|e| e)));
    }
    views.join("; ")
}

/// Reads at ALL per key after healing, one every 500 ms.
const FINAL_READ_ATTEMPTS: usize = 20;
/// Keys divergent before the repair that the report lists with their replicas.
const DIVERGENT_EXAMPLES: usize = 10;
/// How long the suite's repair after healing may take, retries included.
const REPAIR_WINDOW: Duration = Duration::from_secs(120);

/// The natural replicas of every key, read directly over the storage RPC.
struct Replicas {
    ring: Ring,
    clients: std::collections::HashMap<String, cluster::StorageClient>,
}

/// What each natural replica of a key holds: (node, value id or `None` for nothing or a
/// tombstone, version as text).
type Held = Vec<(String, Option<u64>, Option<String>)>;

impl Replicas {
    /// Connects to every storage node; the owners are those of the registry's ring now.
    async fn connect(cluster: &Cluster) -> Result<Self, String> {
        let ring = current_ring(&cluster.gateway_urls()[0]).await?;
        let mut clients = std::collections::HashMap::new();
        for (name, addr) in cluster.storage_addrs() {
            let client = cluster::storage_client(addr)
                .await
                .map_err(|e| format!("connect {name}: {e}"))?;
            clients.insert(name, client);
        }
        Ok(Self { ring, clients })
    }

    async fn held(&mut self, tenant: &str, key: &str) -> Result<Held, String> {
        let mut held = Vec::new();
        for owner in self
            .ring
            .natural_owners(key_position(tenant, key.as_bytes()), RF)
        {
            let client = self
                .clients
                .get_mut(owner.as_str())
                .ok_or("unknown owner")?;
            let record = client
                .read(spb::ReadRequest {
                    tenant_id: tenant.to_owned(),
                    key: key.as_bytes().to_vec().into(),
                })
                .await
                .map_err(|e| format!("read {tenant}/{key} on {owner}: {e}"))?
                .into_inner()
                .record;
            let (value, version) = record.map_or((None, None), |r| {
                let version = r
                    .version
                    .as_ref()
                    .map(|v| format!("{:?}", Version::from(v).clock));
                let value = match r.payload {
                    Some(spb::record::Payload::Value(v)) => serde_json::from_slice::<Value>(&v)
                        .ok()
                        .and_then(|v| workload::parse_value(&v))
                        .map(|v| v.id),
                    _ => None,
                };
                (value, version)
            });
            held.push((owner.as_str().to_owned(), value, version));
        }
        Ok(held)
    }
}

/// The key of each tenant that [`Replicas::plant_probes`] writes.
const PROBE_KEY: &str = "probe-0";
/// The value id of a probe (above every id the workload uses).
const PROBE_VALUE_ID: u64 = u64::MAX / 2;

impl Replicas {
    /// Writes one key per tenant to its first natural replica only, over the storage RPC: the
    /// state a write leaves when it reached one replica and its hint and repair marker were
    /// lost. Only a full anti-entropy repair can bring the other replicas to it, so the
    /// `divergent-replicas` check always has something to judge the repair by.
    async fn plant_probes(&mut self) -> Result<Vec<(String, String)>, String> {
        let mut probes = Vec::new();
        for tenant in workload::TENANTS {
            let owners = self
                .ring
                .natural_owners(key_position(tenant, PROBE_KEY.as_bytes()), RF);
            let owner = owners.first().ok_or("no owner for a probe")?;
            let client = self
                .clients
                .get_mut(owner.as_str())
                .ok_or("unknown owner")?;
            let value = serde_json::json!({"t": tenant, "k": PROBE_KEY, "id": PROBE_VALUE_ID});
            let record = spb::Record {
                tenant_id: tenant.to_owned(),
                key: PROBE_KEY.as_bytes().to_vec().into(),
                version: Some(pairdb::rpc::common::Version {
                    clock: vec![pairdb::rpc::common::ClockEntry {
                        coordinator_id: "probe".to_owned(),
                        counter: 1,
                    }],
                    timestamp_ms: 1,
                }),
                payload: Some(spb::record::Payload::Value(
                    value.to_string().into_bytes().into(),
                )),
                ring_hash: 0,
                expires_at_ms: 0,
            };
            let answer = client
                .write_batch(spb::WriteBatchRequest {
                    records: vec![record],
                    source: spb::BatchSource::Repair as i32,
                    ring_digest: 0,
                })
                .await
                .map_err(|e| format!("probe {tenant}/{PROBE_KEY} on {owner}: {e}"))?
                .into_inner();
            if answer.outcomes != [spb::ApplyOutcome::Applied as i32] {
                return Err(format!(
                    "probe {tenant}/{PROBE_KEY} on {owner} not applied: {:?}",
                    answer.outcomes
                ));
            }
            probes.push((tenant.to_owned(), PROBE_KEY.to_owned()));
        }
        Ok(probes)
    }
}

/// Whether every replica holds the same version (or every one nothing).
fn agree(held: &Held) -> bool {
    held.windows(2).all(|w| w[0].2 == w[1].2)
}

/// The final state: what the natural replicas of every key (and of the probes planted just
/// before) hold after an anti-entropy repair of the whole cluster and before any client read
/// touched the key (so read repair cannot have made them agree), then the key read at ALL
/// through a gateway (retried until it answers).
async fn final_state(
    workload: &Workload,
    cluster: &Cluster,
) -> Result<(Vec<FinalKey>, AfterHealing), String> {
    let mut replicas = Replicas::connect(cluster).await?;
    let mut keys = workload.final_keys();
    let mut after = AfterHealing::default();
    for (tenant, key) in &keys {
        let held = replicas.held(tenant, key).await?;
        if !agree(&held) {
            after.keys_divergent_before += 1;
            if after.divergent_before.len() < DIVERGENT_EXAMPLES {
                after
                    .divergent_before
                    .push(format!("{tenant}/{key}: {held:?}"));
            }
        }
    }
    keys.extend(replicas.plant_probes().await?);
    let deadline = tokio::time::Instant::now() + REPAIR_WINDOW;
    after.repair = admin::repair_everything(&cluster.gateway_urls()[0], deadline).await?;
    after.migrations = admin::migration_counts(&cluster.gateway_urls()[0]).await?;
    let mut held = Vec::new();
    for (tenant, key) in &keys {
        held.push(replicas.held(tenant, key).await?);
    }
    let mut finals = Vec::new();
    for ((tenant, key), replicas) in keys.into_iter().zip(held) {
        let mut answer = None;
        let mut last = None;
        for attempt in 0..FINAL_READ_ATTEMPTS {
            match workload.get(attempt % 2, &tenant, &key, "all").await {
                Outcome::Ok { clock, read, .. } => {
                    answer = Some((read.map(|r| r.id), clock));
                    break;
                }
                other => {
                    last = Some(other);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let Some((value, clock)) = answer else {
            let storage = cluster.storage_addrs();
            let nodes = admin::storage_nodes(&cluster.gateway_urls()[0]).await;
            let statuses: Vec<String> = nodes
                .unwrap_or_default()
                .iter()
                .map(|n| format!("{}={}", n["node_id"], n["status"]))
                .collect();
            return Err(format!(
                "{tenant}/{key}: no read at ALL succeeded after healing \
                 ({FINAL_READ_ATTEMPTS} attempts, last: {last:?}); coordinator's view: {}; \
                 gossip as each storage node sees it: {}; processes: {}",
                statuses.join(" "),
                gossip_views(&storage).await,
                cluster.process_states(),
            ));
        };
        finals.push(FinalKey {
            tenant,
            key,
            value,
            clock,
            replicas,
        });
    }
    Ok((finals, after))
}
