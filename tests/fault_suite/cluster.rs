//! The cluster under test: 5 storage nodes, 2 coordinators and 2 gateways, each a real `pairdb`
//! process in its own network namespace (see `lab`), with PostgreSQL and Redis in the hub (or
//! SQLite and in-memory idempotency with `--sqlite`). The last storage node keeps its data on a
//! small tmpfs the suite mounts, so its disk can be filled. Coordinators run under libfaketime
//! reading their offset from a file, so their wall clocks can be moved while they run.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backends::{Postgres, Redis, libfaketime};
use crate::lab::{HUB_IP, Lab, run};

pub const STORAGE: usize = 5;
pub const COORDINATORS: usize = 2;
pub const GATEWAYS: usize = 2;
/// Index of the spare storage process that joins and leaves the ring during a run (a new
/// node id and data dir each time it joins: j1, j2, ...).
pub const JOINER: usize = STORAGE + COORDINATORS + GATEWAYS;
const STORAGE_GRPC: u16 = 7000;
const STORAGE_HTTP: u16 = 7001;
const GOSSIP: u16 = 7946;
const COORD_GRPC: u16 = 7100;
const COORD_HTTP: u16 = 7101;
const GATEWAY_HTTP: u16 = 8080;
/// Size of the small filesystem under the last storage node.
const SMALL_DISK_MB: u64 = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Storage,
    Coordinator,
    Gateway,
}

/// One `pairdb` process of the cluster.
pub struct Proc {
    pub name: String,
    pub role: Role,
    namespace: String,
    pub ip: Ipv4Addr,
    /// The port that answers once the process is up.
    pub port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub paused: bool,
    log: PathBuf,
}

impl Proc {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("log {}: {e}", self.log.display()))?;
        // `ip netns exec` execs the command: the child's pid is pairdb's own (signals reach it).
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, &pairdb_binary()])
            .args(&self.args)
            .env("PAIRDB_NODE_CLUSTER_SECRET", CLUSTER_SECRET)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.name))?;
        self.child = Some(child);
        self.paused = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                return Err(format!(
                    "{} exited at start: {status}; log ends: {}",
                    self.name,
                    tail.join(" | ")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not start", self.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    pub fn pause(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.paused = false;
    }
}

/// Which metadata and idempotency stores the coordinators share.
pub enum Backends {
    Shared { _postgres: Postgres, _redis: Redis },
    Embedded,
}

pub struct Cluster {
    pub procs: Vec<Proc>,
    pub lab: Lab,
    /// Kept for its servers' lifetime (stopped on drop).
    _backends: Backends,
    pub dir: PathBuf,
    small_disk: PathBuf,
    /// libfaketime's offset file of each coordinator (None when libfaketime is missing).
    clock_files: Vec<Option<PathBuf>>,
    /// The joiner's current node id is `j{joiner_generation}`.
    joiner_generation: u32,
    /// Whether the joiner is in the ring (added, not removed since), as the registry last said
    /// (the nemesis reads it before each topology change).
    pub joiner_member: bool,
    /// Why the small disk could not be mounted (then its disk cannot be filled).
    pub small_disk_refused: Option<String>,
}

/// How a failure to build the suite's network begins (no namespaces, bridges or nftables).
pub const NO_NAMESPACES: &str = "the machine refused the suite's network namespaces";

/// `cleanup_grace` of the suite's coordinators, in seconds (24 h by default): above the
/// nemesis's longest pause (7 s), since a coordinator paused across a change and the cleanup's
/// drop could write to an old owner after it (docs/coordinator.md, "Cleanup").
const CLEANUP_GRACE_S: &str = "10";

/// The cluster secret of every process the suite starts.
pub const CLUSTER_SECRET: &str = "pairdb-fault-suite-cluster-secret";

/// A client of a storage node's RPCs, as the suite's checks use it.
pub type StorageClient = pairdb::rpc::storage::storage_node_client::StorageNodeClient<
    pairdb::rpc::auth::InternalChannel,
>;

/// A client of the storage node at `addr`, its calls carrying [`CLUSTER_SECRET`].
pub async fn storage_client(addr: std::net::SocketAddr) -> Result<StorageClient, String> {
    let secret =
        pairdb::rpc::auth::ClusterSecret::new(CLUSTER_SECRET).map_err(|e| e.to_string())?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(
        pairdb::rpc::storage::storage_node_client::StorageNodeClient::new(
            pairdb::rpc::auth::internal_channel(channel, &secret),
        ),
    )
}

/// The `pairdb` under test: this build's, or `PAIRDB_FAULT_SUITE_BIN` (a deliberately broken
/// build, to show that the checker catches it: scripts/fault-suite-mutants.sh).
fn pairdb_binary() -> String {
    std::env::var("PAIRDB_FAULT_SUITE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pairdb").to_owned())
}

impl Cluster {
    /// Creates the network, the backends and every process, and waits until each listens.
    /// Leaves the calling thread in the hub namespace (the suite's clients run there).
    pub fn start(dir: &Path, sqlite: bool) -> Result<Cluster, String> {
        let lab = Lab::create(JOINER + 1)
            .and_then(|lab| lab.enter_hub().map(|()| lab))
            .map_err(|e| format!("{NO_NAMESPACES}: {e}"))?;
        let hub = HUB_IP.to_string();
        let (backends, metadata_url, idempotency_url) = if sqlite {
            let url = format!("sqlite://{}", dir.join("meta.db").display());
            (Backends::Embedded, url, "memory://".to_owned())
        } else {
            let postgres = Postgres::start_on(&hub).ok_or("PostgreSQL is not installed")?;
            let redis = Redis::start_on(&hub).ok_or("redis-server is not installed")?;
            let (m, i) = (postgres.url(), redis.url());
            (
                Backends::Shared {
                    _postgres: postgres,
                    _redis: redis,
                },
                m,
                i,
            )
        };
        let small_disk = dir.join(format!("s{STORAGE}"));
        std::fs::create_dir_all(&small_disk).map_err(|e| e.to_string())?;
        let size = format!("size={SMALL_DISK_MB}m");
        let small_disk_refused = run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &size,
                "pdbfaults",
                &small_disk.to_string_lossy(),
            ],
        )
        .err();
        let mut cluster = Cluster {
            procs: Vec::new(),
            lab,
            _backends: backends,
            dir: dir.to_path_buf(),
            small_disk,
            clock_files: Vec::new(),
            joiner_generation: 1,
            joiner_member: false,
            small_disk_refused,
        };
        cluster.define(&metadata_url, &idempotency_url)?;
        for p in &mut cluster.procs {
            p.spawn()?;
        }
        Ok(cluster)
    }

    /// Arguments of a storage process `name` at lab index `i`, gossiping with the members.
    fn storage_args(&self, name: &str, i: usize) -> Result<Vec<String>, String> {
        let ip = self.lab.ip(i);
        let data = self.dir.join(name);
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let seeds: Vec<String> = (0..STORAGE)
            .filter(|j| *j != i)
            .map(|j| format!("{}:{GOSSIP}", self.lab.ip(j)))
            .collect();
        Ok(vec![
            "--role=storage".to_owned(),
            format!("--node-id={name}"),
            format!("--listen={ip}:{STORAGE_GRPC}"),
            format!("--http-listen={ip}:{STORAGE_HTTP}"),
            format!("--data-dir={}", data.display()),
            format!("--gossip={ip}:{GOSSIP}"),
            format!("--seeds={}", seeds.join(",")),
            "--log-level=warn".to_owned(),
        ])
    }

    fn define(&mut self, metadata_url: &str, idempotency_url: &str) -> Result<(), String> {
        let ip = |i: usize| self.lab.ip(i);
        let mut procs = Vec::new();
        for i in 0..STORAGE {
            let name = format!("s{}", i + 1);
            let args = self.storage_args(&name, i)?;
            procs.push(self.proc(&name, Role::Storage, i, STORAGE_GRPC, args, Vec::new()));
        }
        let storage_list: Vec<String> = (0..STORAGE)
            .map(|i| format!("s{}@{}:{STORAGE_GRPC}", i + 1, ip(i)))
            .collect();
        for c in 0..COORDINATORS {
            let i = STORAGE + c;
            let name = format!("c{}", c + 1);
            let args = vec![
                "--role=coordinator".to_owned(),
                format!("--node-id={name}"),
                format!("--listen={}:{COORD_GRPC}", ip(i)),
                format!("--http-listen={}:{COORD_HTTP}", ip(i)),
                format!("--metadata-url={metadata_url}"),
                format!("--idempotency-url={idempotency_url}"),
                format!("--storage-nodes={}", storage_list.join(",")),
                "--log-level=warn".to_owned(),
            ];
            let mut env = vec![
                (
                    "PAIRDB_COORDINATOR_RING_REFRESH_MS".to_owned(),
                    "500".to_owned(),
                ),
                // Old owners drop the ranges they gave away seconds after each change, so a
                // later change must move data that exists only on the new owners.
                (
                    "PAIRDB_COORDINATOR_CLEANUP_GRACE_S".to_owned(),
                    CLEANUP_GRACE_S.to_owned(),
                ),
            ];
            let clock_file = libfaketime().map(|lib| {
                let file = self.dir.join(format!("{name}.faketime"));
                let _ = std::fs::write(&file, "+0s\n");
                env.extend([
                    ("LD_PRELOAD".to_owned(), lib.to_owned()),
                    (
                        "FAKETIME_TIMESTAMP_FILE".to_owned(),
                        file.display().to_string(),
                    ),
                    ("FAKETIME_CACHE_DURATION".to_owned(), "1".to_owned()),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
                    ("FAKETIME_DONT_RESET".to_owned(), "1".to_owned()),
                ]);
                file
            });
            self.clock_files.push(clock_file);
            procs.push(self.proc(&name, Role::Coordinator, i, COORD_GRPC, args, env));
        }
        let coordinators: Vec<String> = (0..COORDINATORS)
            .map(|c| format!("{}:{COORD_GRPC}", ip(STORAGE + c)))
            .collect();
        for g in 0..GATEWAYS {
            let i = STORAGE + COORDINATORS + g;
            let name = format!("g{}", g + 1);
            let args = vec![
                "--role=gateway".to_owned(),
                format!("--listen={}:{GATEWAY_HTTP}", ip(i)),
                format!("--coordinators={}", coordinators.join(",")),
                "--auth=none".to_owned(),
                "--log-level=warn".to_owned(),
            ];
            let env = vec![
                (
                    "PAIRDB_GATEWAY_WRITE_RATE_LIMIT".to_owned(),
                    "100000000".to_owned(),
                ),
                (
                    "PAIRDB_GATEWAY_READ_RATE_LIMIT".to_owned(),
                    "100000000".to_owned(),
                ),
            ];
            procs.push(self.proc(&name, Role::Gateway, i, GATEWAY_HTTP, args, env));
        }
        let joiner = format!("j{}", self.joiner_generation);
        let args = self.storage_args(&joiner, JOINER)?;
        procs.push(self.proc(
            &joiner,
            Role::Storage,
            JOINER,
            STORAGE_GRPC,
            args,
            Vec::new(),
        ));
        self.procs = procs;
        Ok(())
    }

    /// Restarts the (unregistered) joiner as a new node, `j{n+1}` on an empty data dir; returns
    /// its id and address.
    pub fn renew_joiner(&mut self) -> Result<(String, SocketAddr), String> {
        self.procs[JOINER].kill9();
        self.joiner_generation += 1;
        let name = format!("j{}", self.joiner_generation);
        let args = self.storage_args(&name, JOINER)?;
        let mut p = self.proc(&name, Role::Storage, JOINER, STORAGE_GRPC, args, Vec::new());
        p.spawn()?;
        let addr = p.addr();
        self.procs[JOINER] = p;
        Ok((name, addr))
    }

    /// The joiner's current node id.
    pub fn joiner_id(&self) -> &str {
        &self.procs[JOINER].name
    }

    fn proc(
        &self,
        name: &str,
        role: Role,
        i: usize,
        port: u16,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Proc {
        Proc {
            name: name.to_owned(),
            role,
            namespace: self.lab.namespace(i).to_owned(),
            ip: self.lab.ip(i),
            port,
            args,
            env,
            child: None,
            paused: false,
            log: self.dir.join(format!("{name}.log")),
        }
    }

    pub fn indices(&self, role: Role) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|i| self.procs[*i].role == role)
            .collect()
    }

    pub fn gateway_urls(&self) -> Vec<String> {
        self.indices(Role::Gateway)
            .into_iter()
            .map(|i| format!("http://{}", self.procs[i].addr()))
            .collect()
    }

    /// Each process's kernel state (`/proc/<pid>/stat`: R, S, T stopped, Z exited) and the
    /// last line of its log, for failure messages.
    pub fn process_states(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let state = p.child.as_ref().map_or("not started".to_owned(), |c| {
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                        .ok()
                        .and_then(|s| {
                            s.rsplit_once(')')
                                .and_then(|(_, rest)| rest.split_whitespace().next())
                                .map(str::to_owned)
                        })
                        .unwrap_or_else(|| "gone".to_owned())
                });
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let last = log.lines().last().unwrap_or("").to_owned();
                format!("{} [{state}] {last}", p.name)
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    pub fn storage_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.indices(Role::Storage)
            .into_iter()
            .map(|i| (self.procs[i].name.clone(), self.procs[i].addr()))
            .collect()
    }

    /// Whether coordinator clocks can be moved (libfaketime installed).
    pub fn can_skew(&self) -> bool {
        self.clock_files.iter().all(Option::is_some)
    }

    /// Sets coordinator `c`'s wall-clock offset (libfaketime rereads it within a second).
    pub fn skew_clock(&self, c: usize, offset_s: i64) -> Result<(), String> {
        let file = self
            .clock_files
            .get(c)
            .and_then(Option::as_ref)
            .ok_or("no libfaketime")?;
        std::fs::write(file, format!("{offset_s:+}s\n")).map_err(|e| e.to_string())
    }

    /// Fills the small disk (a filler file leaving 512 KiB free), or removes the filler.
    pub fn fill_disk(&self, fill: bool) -> Result<(), String> {
        let filler = self.small_disk.join("filler");
        if !fill {
            return match std::fs::remove_file(&filler) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            };
        }
        let stat = nix::sys::statvfs::statvfs(&self.small_disk).map_err(|e| e.to_string())?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let keep = 512 * 1024;
        let file = std::fs::File::create(&filler).map_err(|e| e.to_string())?;
        // Written out: tmpfs allocates on write, not on set_len.
        use std::io::Write;
        let mut w = std::io::BufWriter::new(file);
        let chunk = vec![0xA5u8; 1 << 20];
        let mut left = free.saturating_sub(keep);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if w.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
        Ok(())
    }

    /// Heals every fault: network rules, paused and dead processes, clocks, the full disk.
    pub fn heal_all(&mut self) -> Result<(), String> {
        self.lab.heal()?;
        for c in 0..self.clock_files.len() {
            if self.clock_files[c].is_some() {
                self.skew_clock(c, 0)?;
            }
        }
        self.fill_disk(false)?;
        for p in &mut self.procs {
            if p.paused {
                p.resume();
            }
            if !p.is_running() {
                p.spawn()?;
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.resume();
            p.kill9();
        }
        if self.small_disk_refused.is_none() {
            let _ = run("umount", &["-l", &self.small_disk.to_string_lossy()]);
        }
    }
}
