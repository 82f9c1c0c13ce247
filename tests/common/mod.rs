//! Helpers for tests that start real `pairdb` processes on 127.0.0.1 with free ports.
#![allow(dead_code)]

pub mod backends;
pub mod cluster;
pub mod coord;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pairdb::rpc::storage::storage_node_client::StorageNodeClient;
use tonic::transport::Channel;

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

/// A TCP port free right now on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free tcp port")
}

/// A UDP port free right now on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

pub struct StorageNode {
    pub id: String,
    pub dir: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
    child: Option<Child>,
}

impl StorageNode {
    /// Starts `pairdb --role=storage` and waits until its gRPC port answers.
    pub fn start(
        id: &str,
        dir: &Path,
        gossip: Option<(SocketAddr, Vec<SocketAddr>)>,
    ) -> StorageNode {
        let mut node = StorageNode {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            grpc: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            gossip,
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pairdb"));
        cmd.args([
            "--role=storage",
            &format!("--node-id={}", self.id),
            &format!("--listen={}", self.grpc),
            &format!("--http-listen={}", self.http),
            &format!("--data-dir={}", self.dir.display()),
            "--log-level=warn",
        ]);
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

    pub async fn client(&self) -> StorageNodeClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        StorageNodeClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.kill9();
    }
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
    for _ in 0..200 {
        let p = free_tcp_port();
        if p > 60000 {
            continue;
        }
        if (0..=4).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no block of 5 free ports");
}
