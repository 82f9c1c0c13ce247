//! Throwaway PostgreSQL and Redis servers for tests, started from the machine's binaries on
//! free ports and stopped on drop. `start` returns `None` when the binaries are missing; callers
//! then skip with a message, or fail under CI=true ([`skip_or_fail`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Reports a skipped test, or panics under CI=true where every backend must be present.
pub fn skip_or_fail(test: &str, missing: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {missing} is missing"
    );
    eprintln!("SKIPPED {test}: {missing} not installed");
}

/// The libfaketime preload library, if installed (Debian's `faketime`).
pub fn libfaketime() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    host: String,
    pub port: u16,
}

fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn as_postgres_user(bin: &std::path::Path, tool: &str, args: &[&str]) -> std::process::Output {
    let is_root = nix::unistd::Uid::effective().is_root();
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    };
    cmd.args(args).output().expect("run a PostgreSQL tool")
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        Self::start_on("127.0.0.1")
    }

    /// A server listening on `host` (an address of the caller's network namespace).
    pub fn start_on(host: &str) -> Option<Postgres> {
        let bin = postgres_bin()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        if nix::unistd::Uid::effective().is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the data dir to postgres");
        }
        let data_s = data.to_str().expect("utf-8 path");
        let out = as_postgres_user(
            &bin,
            "initdb",
            &["-D", data_s, "-A", "trust", "-U", "postgres", "-N"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Clients from the server's own subnets too (a test network of namespaces).
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        rules.push_str("host all all samenet trust\n");
        std::fs::write(&hba, rules).expect("write pg_hba.conf");
        let port = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let opts = format!(
            "-p {port} -c listen_addresses={host} -c unix_socket_directories= -c fsync=off"
        );
        let log = data.join("postgres.log");
        let out = as_postgres_user(
            &bin,
            "pg_ctl",
            &[
                "-D",
                data_s,
                "-o",
                &opts,
                "-l",
                log.to_str().expect("utf-8"),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(Postgres {
            bin,
            data,
            _dir: dir,
            host: host.to_owned(),
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.host, self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data.to_str().unwrap_or_default().to_owned();
        let _ = as_postgres_user(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "stop"],
        );
    }
}

pub struct Redis {
    child: Child,
    host: String,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Option<Redis> {
        Self::start_on("127.0.0.1")
    }

    /// A server listening on `host` (an address of the caller's network namespace).
    pub fn start_on(host: &str) -> Option<Redis> {
        let port = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                host,
                // Reachable from a test network of namespaces, not only loopback.
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis {
            child,
            host: host.to_owned(),
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
