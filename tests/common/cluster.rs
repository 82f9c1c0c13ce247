//! Real multi-process clusters for coordinator tests: storage nodes gossiping on loopback and
//! `pairdb --role=coordinator` processes sharing one metadata store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pairdb::rpc::auth::InternalChannel;
use pairdb::rpc::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::{StorageNode, free_tcp_port, free_udp_port};

/// `n` storage nodes `s1..sn` gossiping with each other, data under `dir`.
pub fn start_storage(n: usize, dir: &Path) -> Vec<StorageNode> {
    start_storage_with_env(n, dir, &[])
}

/// [`start_storage`] with extra environment (`PAIRDB_STORAGE_*` settings) for every node.
pub fn start_storage_with_env(n: usize, dir: &Path, env: &[(&str, &str)]) -> Vec<StorageNode> {
    let gossip: Vec<SocketAddr> = (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_udp_port())))
        .collect();
    (0..n)
        .map(|i| {
            let seeds = gossip
                .iter()
                .filter(|a| **a != gossip[i])
                .copied()
                .collect();
            let data = dir.join(format!("s{}", i + 1));
            std::fs::create_dir_all(&data).expect("mkdir");
            StorageNode::start_with_env(
                &format!("s{}", i + 1),
                &data,
                Some((gossip[i], seeds)),
                env,
            )
        })
        .collect()
}

/// A storage node `id` that joins the gossip of `peers`, data under `dir/id`.
pub fn join_storage(id: &str, dir: &Path, peers: &[StorageNode]) -> StorageNode {
    join_storage_with_env(id, dir, peers, &[])
}

/// [`join_storage`] with extra environment (`PAIRDB_STORAGE_*` settings).
pub fn join_storage_with_env(
    id: &str,
    dir: &Path,
    peers: &[StorageNode],
    env: &[(&str, &str)],
) -> StorageNode {
    let gossip = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let seeds = peers
        .iter()
        .filter_map(|p| p.gossip.as_ref().map(|g| g.0))
        .collect();
    let data = dir.join(id);
    std::fs::create_dir_all(&data).expect("mkdir");
    StorageNode::start_with_env(id, &data, Some((gossip, seeds)), env)
}

/// `id@host:port` of each storage node, comma-separated.
pub fn storage_list(nodes: &[StorageNode]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}@{}", n.id, n.grpc))
        .collect::<Vec<_>>()
        .join(",")
}

/// A `pairdb --role=coordinator|gateway` process: `grpc` is its main listener (gRPC for a
/// coordinator, the HTTP API for a gateway).
pub struct RoleProcess {
    pub id: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl RoleProcess {
    /// Starts a coordinator and waits until its gRPC port answers. `env` adds
    /// `PAIRDB_COORDINATOR_*` settings.
    pub fn coordinator(
        id: &str,
        metadata_url: &str,
        idempotency_url: &str,
        storage: &[StorageNode],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> RoleProcess {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut args = vec![
            "--role=coordinator".to_owned(),
            format!("--node-id={id}"),
            format!("--listen={grpc}"),
            format!("--http-listen={http}"),
            format!("--metadata-url={metadata_url}"),
            format!("--idempotency-url={idempotency_url}"),
            "--log-level=info".to_owned(),
        ];
        // None: an empty registry (nodes join by themselves, or through the admin API).
        if !storage.is_empty() {
            args.push(format!("--storage-nodes={}", storage_list(storage)));
        }
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !env
            .iter()
            .any(|(k, _)| k == "PAIRDB_COORDINATOR_RING_REFRESH_MS")
        {
            env.push(("PAIRDB_COORDINATOR_RING_REFRESH_MS".into(), "500".into()));
        }
        let mut c = RoleProcess {
            id: id.to_owned(),
            grpc,
            http,
            args,
            env,
            child: None,
            log: log_dir.join(format!("{id}.log")),
        };
        c.spawn();
        c
    }

    /// A coordinator (SQLite metadata at `metadata_url`, in-memory idempotency) whose wall
    /// clock runs `offset` (libfaketime, e.g. "-5s" or "+2h") off; monotonic time untouched,
    /// so its timers work.
    pub fn skewed_coordinator(
        id: &str,
        metadata_url: &str,
        offset: &str,
        faketime: &str,
        storage: &[StorageNode],
        log_dir: &Path,
    ) -> RoleProcess {
        RoleProcess::coordinator(
            id,
            metadata_url,
            "memory://",
            storage,
            &[
                ("LD_PRELOAD", faketime),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ("FAKETIME_DONT_RESET", "1"),
            ],
            log_dir,
        )
    }

    /// Starts a gateway on a free port in front of `coordinators`, with extra flags and env.
    pub fn gateway(
        id: &str,
        coordinators: &[&RoleProcess],
        flags: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> RoleProcess {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let list: Vec<String> = coordinators.iter().map(|c| c.grpc.to_string()).collect();
        let mut args = vec![
            "--role=gateway".to_owned(),
            format!("--listen={listen}"),
            format!("--coordinators={}", list.join(",")),
        ];
        if !flags.iter().any(|f| f.starts_with("--log-level")) {
            args.push("--log-level=info".to_owned());
        }
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut g = RoleProcess {
            id: id.to_owned(),
            grpc: listen,
            http: listen,
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            log: log_dir.join(format!("{id}.log")),
        };
        g.spawn();
        g
    }

    /// Base URL of a gateway.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = super::pairdb_command()
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pairdb");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.grpc).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited at start: {status}\n{}",
                    self.id,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "coordinator {} did not start",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reap");
        }
    }

    /// Sends `signal` to the running process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    /// SIGSTOP: the process hangs with its sockets open.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`RoleProcess::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM and the exit status (an orderly stop).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        super::terminate(&mut child)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub async fn client(&self) -> CoordinatorClient<InternalChannel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        CoordinatorClient::new(super::authenticated(channel))
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}",
                self.id,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
