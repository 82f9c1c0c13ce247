//! Helpers for tests that start real `pairdb` processes on 127.0.0.1 with free ports.
#![allow(dead_code)]

pub mod backends;
pub mod cluster;
pub mod coord;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pairdb::rpc::auth::{ClusterSecret, InternalChannel, internal_channel};
use pairdb::rpc::storage::storage_node_client::StorageNodeClient;
use tonic::transport::Channel;

/// The cluster secret of every process the tests start (`rpc::auth`).
pub const CLUSTER_SECRET: &str = "pairdb-tests-cluster-secret";

/// [`CLUSTER_SECRET`] as the clients take it.
pub fn cluster_secret() -> ClusterSecret {
    ClusterSecret::new(CLUSTER_SECRET).expect("a valid secret")
}

/// Internal authentication with the tests' secret and no TLS.
pub fn internal_auth() -> pairdb::rpc::auth::InternalAuth {
    pairdb::rpc::auth::InternalAuth {
        secret: cluster_secret(),
        tls: None,
    }
}

/// An HTTP client (reqwest's TLS runs on the ring provider, which a client installs first:
/// `reqwest::Client::new()` alone would panic).
pub fn http_client() -> reqwest::Client {
    pairdb::tools::client::http_builder(None)
        .expect("http client")
        .build()
        .expect("http client")
}

/// A `pairdb` command with the tests' cluster secret in its environment.
pub fn pairdb_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pairdb"));
    cmd.env("PAIRDB_NODE_CLUSTER_SECRET", CLUSTER_SECRET);
    cmd
}

/// `channel` with the tests' cluster secret on every call.
pub fn authenticated(channel: Channel) -> InternalChannel {
    internal_channel(channel, &cluster_secret())
}

/// Sends SIGTERM to `child` and waits (up to 30 s) for its exit status.
pub fn terminate(child: &mut Child) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports handed out by this test process (tests of one binary run in parallel).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A port P from 20000..32000 with `free(P)`, none of P..P+span handed out before by this
/// process.
/// The range lies below the kernel's ephemeral ports (32768..), so no outgoing connection or
/// unbound socket elsewhere can take the port between this check and the server's bind (with
/// port 0 that race made a restarted node fail to start now and then).
pub fn pick_port(span: u16, free: impl Fn(u16) -> bool) -> u16 {
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let port = 20_000 + ((seed >> 33) % u64::from(12_000 - span)) as u16;
        let ports = port..port + span;
        if ports.clone().any(|p| handed.contains(&p)) || !free(port) {
            continue;
        }
        handed.extend(ports);
        return port;
    }
    panic!("no free port below the ephemeral range");
}

pub fn tcp_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub fn udp_free(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    pick_port(1, tcp_free)
}

/// A UDP port free right now on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    pick_port(1, udp_free)
}

pub struct StorageNode {
    pub id: String,
    pub dir: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl StorageNode {
    /// Starts `pairdb --role=storage` and waits until its gRPC port answers.
    pub fn start(
        id: &str,
        dir: &Path,
        gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
    ) -> StorageNode {
        Self::start_with_env(id, dir, gossip, &[])
    }

    /// [`StorageNode::start`] with extra environment (`PAIRDB_STORAGE_*` settings), kept for
    /// restarts.
    pub fn start_with_env(
        id: &str,
        dir: &Path,
        gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
        env: &[(&str, &str)],
    ) -> StorageNode {
        let mut node = StorageNode {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            grpc: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            gossip,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut cmd = pairdb_command();
        cmd.args([
            "--role=storage",
            &format!("--node-id={}", self.id),
            &format!("--listen={}", self.grpc),
            &format!("--http-listen={}", self.http),
            &format!("--data-dir={}", self.dir.display()),
            "--log-level=warn",
        ]);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some((addr, seeds)) = &self.gossip {
            cmd.arg(format!("--gossip={addr}"));
            if !seeds.is_empty() {
                let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
                cmd.arg(format!("--seeds={}", seeds.join(",")));
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pairdb");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.grpc).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("storage node {} exited at start: {status}", self.id);
            }
            assert!(
                Instant::now() < deadline,
                "storage node {} did not start",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Starts the node again on the same addresses and data dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// SIGSTOP: the process stays but answers nothing until [`StorageNode::resume`].
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`StorageNode::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reap");
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        terminate(&mut c)
    }

    /// A client of the node, which takes client writes: like a coordinator would, it tells
    /// the node the deleted tenants first (none beyond those it knows; see
    /// `storage::dropped_tenants`).
    pub async fn client(&self) -> StorageNodeClient<InternalChannel> {
        let mut client = self.unconfirmed_client().await;
        client
            .drop_tenants(pairdb::rpc::storage::DropTenantsRequest {
                tenant_ids: vec![],
                complete: true,
            })
            .await
            .unwrap_or_else(|e| panic!("confirming {}: {e:?}", self.id));
        client
    }

    /// A client of the node that tells it nothing: a node that just started refuses its
    /// client writes (`TENANTS_UNCONFIRMED`). Connecting is retried for up to 2 s: a node
    /// restarted on its old port has been seen to reset the very first connection under a
    /// loaded test run.
    pub async fn unconfirmed_client(&self) -> StorageNodeClient<InternalChannel> {
        let endpoint = Channel::from_shared(format!("http://{}", self.grpc)).expect("uri");
        let mut tries = 0;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("connecting to {} failed ({e:?}); retrying", self.id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("connect to {}: {e:?}", self.id),
            }
        };
        StorageNodeClient::new(authenticated(channel))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The sum of a metric's series on `addr`'s `/metrics`: every line whose series is `series`
/// itself or `series{...}` (so labels in `series` pick one); 0 when there is none.
pub async fn metric_sum(addr: std::net::SocketAddr, series: &str) -> f64 {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(series)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => rest.rsplit_once('}')?.1,
                _ => return None,
            };
            value.trim().parse::<f64>().ok()
        })
        .fold(0.0, |sum, v| sum + v)
}

/// A raw HTTP/1.1 GET; the whole response (status line, headers, body) as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// A port P with P+1..=P+4 free too (the dev cluster's storage nodes and coordinator).
pub fn free_port_block() -> u16 {
    pick_port(5, |p| (p..p + 5).all(tcp_free))
}
