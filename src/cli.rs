//! Command line: `pairdb --role=...` with every role's flags, and the subcommands.
//!
//! Flags are all optional here: a flag that is not given leaves the value to the env var, the
//! config file or the default (see `config.rs`), so [`ServerArgs::overrides`] only carries what
//! was typed.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

pub use crate::config::Role;
use crate::config::{AuthMode, ConfigError, LogFormat, NodeAddress, SyncMode};

const AFTER_HELP: &str = "\
Every option is also a config-file key and an env var PAIRDB_<SECTION>_<KEY>, with the
precedence flag > env > file > default. Sections: [node] (roles, id, log_format, log_level,
cluster_secret), [storage], [coordinator], [gateway], [gateway.auth]. Examples:
  PAIRDB_NODE_ROLES=storage PAIRDB_NODE_ID=s1 PAIRDB_STORAGE_DATA_DIR=/var/lib/pairdb/s1
  PAIRDB_NODE_CLUSTER_SECRET=... (the same on every node of a cluster)
  PAIRDB_GATEWAY_AUTH_SECRET=... PAIRDB_COORDINATOR_METADATA_URL=postgres://...
Example configs: config/*.toml.

Examples:
  pairdb --role=storage --node-id=s1 --listen=127.0.0.1:7101 --data-dir=/var/lib/pairdb/s1
  pairdb --role=coordinator --node-id=c1 --listen=127.0.0.1:7201 --metadata-url=sqlite://meta.db \\
         --storage-nodes=s1@127.0.0.1:7101,s2@127.0.0.1:7102,s3@127.0.0.1:7103
  pairdb --role=gateway --listen=127.0.0.1:8080 --coordinators=127.0.0.1:7201 --auth=none
  pairdb dev";

/// pairdb: a distributed, multi-tenant key-value store.
#[derive(Debug, Parser)]
#[command(name = "pairdb", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole local cluster in one process: 3 storage nodes, a coordinator and a gateway,
    /// embedded metadata and idempotency stores, auth none.
    Dev(DevArgs),
    /// Mint JWTs for `--auth=token` gateways, with the secret of the config
    /// ([gateway.auth] secret or secret_file, or PAIRDB_GATEWAY_AUTH_SECRET).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Read and write keys through a gateway's HTTP API.
    Kv {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: KvCommand,
    },
    /// Tenants, storage nodes and migrations through a gateway's HTTP API.
    Admin {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Load generator against a gateway: throughput and latency percentiles.
    Bench(BenchArgs),
    /// Make a cluster CA (once, in --out-dir) and node certificates signed by it, for mutual
    /// TLS between roles and HTTPS on gateways (a test or small cluster).
    Cert(CertArgs),
    /// Rebuild a stopped storage node's data dir from a snapshot (its tables replace the
    /// engine's; the commit log is emptied). Then start the node and repair its ranges.
    Restore(RestoreArgs),
    /// Placement tools that need no cluster.
    Ring {
        #[command(subcommand)]
        command: RingCommand,
    },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The node's data dir (the node must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// A snapshot name (under DATA_DIR/snapshots/) or the path of a snapshot directory (one
    /// copied off the node: it holds SNAPSHOT.json, MANIFEST and sst/).
    #[arg(long)]
    pub snapshot: String,
    /// The node's gc_grace: a snapshot older than this is refused (values deleted since may
    /// come back once the other replicas purged their tombstones).
    #[arg(long, default_value = "10days", value_parser = humantime::parse_duration)]
    pub gc_grace: std::time::Duration,
    /// Restore a snapshot older than gc_grace anyway.
    #[arg(long)]
    pub allow_older_than_gc_grace: bool,
}

#[derive(Debug, Args)]
pub struct CertArgs {
    /// Where ca.pem/ca.key (made on the first run, reused after) and NAME.pem/NAME.key go.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// A node certificate per name (comma list), e.g. s1,s2,s3,c1,gw.
    #[arg(long = "node", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Extra subject names of every node certificate (DNS names or IP addresses, comma list):
    /// what HTTPS clients of a gateway check, e.g. localhost,127.0.0.1,pairdb.example.com.
    #[arg(long = "san", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// Days the node certificates are valid (the CA: at least 10 years).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Debug, Subcommand)]
pub enum RingCommand {
    /// Grow a ring one node at a time with the coordinators' own token choice, then add or
    /// remove nodes: replica ownership max/mean and min/mean per RF, copies moved per step,
    /// ranges, planning time.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Nodes the ring is grown to, one at a time, before the measured steps.
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Tokens per node (0: the allocation's default, 16 balanced or 150 random).
    #[arg(long, default_value_t = 0)]
    pub vnodes: u32,
    /// Replication factors in use, comma-separated.
    #[arg(long, default_value = "3", value_delimiter = ',')]
    pub rf: Vec<usize>,
    /// Nodes then added one at a time, each step measured.
    #[arg(long, default_value_t = 0)]
    pub add: usize,
    /// Nodes then removed one at a time, each step measured.
    #[arg(long, default_value_t = 0)]
    pub remove: usize,
    /// Token choice: balanced (the allocator) or random (the xxh3 rule).
    #[arg(long, default_value = "balanced", value_parser = ["balanced", "random"])]
    pub tokens: String,
    /// Print the steps as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the tools send requests.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// Gateway base URL.
    #[arg(
        long,
        env = "PAIRDB_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Tenant, sent as X-Tenant-ID (gateways with auth none).
    #[arg(long, env = "PAIRDB_TENANT", global = true)]
    pub tenant: Option<String>,
    /// Bearer token (gateways with auth token; mint one with `pairdb token issue`).
    #[arg(long, env = "PAIRDB_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// gateway besides the system's, e.g.
    /// `pairdb cert`'s ca.pem.
    #[arg(long, env = "PAIRDB_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Write a value (JSON if it parses as JSON, else a string).
    Put {
        key: String,
        value: String,
        #[arg(long)]
        consistency: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The value expires this many seconds after the write (1..=315360000).
        #[arg(long)]
        ttl_seconds: Option<u64>,
    },
    /// Read a key.
    Get {
        key: String,
        #[arg(long)]
        consistency: Option<String>,
    },
    /// Delete a key.
    Delete {
        key: String,
        #[arg(long)]
        consistency: Option<String>,
    },
    /// List keys in key order: one page as JSON, or with --all every key, one per line
    /// (`key<TAB>value` with --values).
    List {
        /// Only keys that start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys per page (1..=1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// The page after this cursor (from the previous page's answer).
        #[arg(long)]
        cursor: Option<String>,
        /// With the values.
        #[arg(long)]
        values: bool,
        /// Follow the cursors to the end and print the keys as lines.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        consistency: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Tenants: create, get, set-rf, list, delete.
    #[command(subcommand)]
    Tenants(TenantCommand),
    /// The storage nodes as a table (state, health, disk, keys, load, ownership) with the
    /// reasons a node is degraded; exit 3 when a node is not active and healthy.
    Nodes {
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Add a storage node (it must be running at ADDRESS); prints the migration.
    AddNode {
        node_id: String,
        /// host:port of the node's gRPC listener.
        address: String,
        #[arg(long = "vnodes")]
        virtual_nodes: Option<u32>,
        /// Follow the migration to its end with a progress bar; exit 1 unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a storage node: its ranges are streamed to the nodes that inherit them.
    RemoveNode {
        node_id: String,
        /// Remove even if fewer active nodes than the largest tenant RF remain.
        #[arg(long)]
        force: bool,
        /// Follow the migration to its end with a progress bar; exit 1 unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Old owners drop the ranges they no longer own, after verifying that a quorum of the new
    /// owners holds every key there; prints the cleanup (a migration of type cleanup).
    Cleanup {
        /// Only this node (default: every node).
        #[arg(long = "node")]
        node_id: Option<String>,
        /// Drop without verifying the new owners.
        #[arg(long)]
        force: bool,
        /// Follow the cleanup to its end with a progress bar; exit 1 unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Anti-entropy: compare every range across its replicas and send each replica the newest
    /// version of every key that differs; prints the repair (a migration of type repair).
    Repair {
        /// Only this tenant (default: every tenant).
        #[arg(long = "tenant-id")]
        tenant_id: Option<String>,
        /// Only the ranges this node replicates (default: every range).
        #[arg(long = "node")]
        node_id: Option<String>,
        /// Only the arc START-END of the ring (decimal positions, end exclusive, as
        /// `repair-status` prints them; default: the whole ring).
        #[arg(long)]
        range: Option<String>,
        /// Follow the repair to its end with a progress bar (ranges done), then print the
        /// keys it compared and fixed; exit 1 unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// The last repair of each range: when, keys compared and fixed, complete or not.
    RepairStatus,
    /// Take a snapshot named NAME on every storage node (hard links, no copy; all or none).
    Snapshot { name: String },
    /// The snapshots of the cluster as a table (nodes, tables, size, nodes missing one).
    Snapshots {
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshot NAME from every storage node.
    DeleteSnapshot { name: String },
    /// A migration's status.
    Migration { migration_id: String },
    /// Cancel a migration in progress: it is rolled back (state cancelled).
    Cancel {
        migration_id: String,
        /// Follow it to its end; exit 1 unless it ended cancelled.
        #[arg(long)]
        wait: bool,
    },
    /// The most recent migrations, newest first, each with a progress bar (keys, rate, ETA)
    /// and, for a failed one, the reason.
    Migrations {
        /// How many (default 20).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    Create {
        tenant_id: String,
        #[arg(long = "rf")]
        replication_factor: Option<u32>,
    },
    Get {
        tenant_id: String,
    },
    /// Change the replication factor.
    SetRf {
        tenant_id: String,
        replication_factor: u32,
    },
    /// Delete a tenant: it stops accepting requests, its records are purged from every node.
    Delete {
        tenant_id: String,
    },
    /// The tenants in id order, as a table (every page followed).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        /// Print JSON (`{"tenants": [...]}`) instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Writes,
    Reads,
    Mixed,
    /// Every key written once, in key order, `--batch` keys per request (`POST
    /// /v1/key-value/batch`); the run ends when all are written (`--duration` is not used).
    Load,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, value_enum, default_value = "writes")]
    pub workload: Workload,
    /// Distinct keys (k0..k{N-1}).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Bytes of each value (a JSON string of that many characters).
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// How long to run, e.g. 10s, 1m.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Requests per second in total, spread over the workers (0: as fast as they can). Each
    /// request's latency counts from when it was due, so a stall shows in the percentiles.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    #[arg(long, default_value = "quorum")]
    pub consistency: String,
    /// Do not write every key once before a reads or mixed run.
    #[arg(long)]
    pub no_preload: bool,
    /// Keys per batch request of `--workload load` and of the preload (the API's limit is 100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub batch: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write one line per request to this file: when it was due (Unix time, µs), its
    /// latency (µs) and HTTP status, so percentiles can be taken over any span afterwards.
    #[arg(long)]
    pub latency_log: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Print a new HS256 token for a tenant.
    Issue(TokenIssueArgs),
}

#[derive(Debug, Args)]
pub struct TokenIssueArgs {
    /// The tenant (the token's `sub`).
    #[arg(long)]
    pub tenant: String,
    /// An admin token (tenant and node administration).
    #[arg(long)]
    pub admin: bool,
    /// Lifetime, e.g. 30d, 12h, 90m.
    #[arg(long, default_value = "30d")]
    pub ttl: String,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the cluster keeps its data (kept across restarts).
    #[arg(long, default_value = ".pairdb-dev")]
    pub data_dir: PathBuf,
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub storage_nodes: u32,
}

/// Flags of the server roles.
#[derive(Debug, Args, Default)]
pub struct ServerArgs {
    /// Roles to run: gateway, coordinator, storage, or a comma list.
    #[arg(long, value_delimiter = ',', help_heading = "Process")]
    pub role: Vec<Role>,
    /// TOML config file (see config/).
    #[arg(long, help_heading = "Process")]
    pub config: Option<PathBuf>,
    /// Node id (storage node id; coordinator vector-clock id). Required for storage and coordinator.
    #[arg(long, help_heading = "Process")]
    pub node_id: Option<String>,
    /// Main listener of the one role given (gRPC for storage/coordinator, HTTP for gateway).
    /// With several roles use --storage-listen / --coordinator-listen / --gateway-listen.
    #[arg(long, help_heading = "Process")]
    pub listen: Option<SocketAddr>,
    /// Health and metrics HTTP listener of the one storage or coordinator role given
    /// [default: host of --listen, port + 1000].
    #[arg(long, help_heading = "Process")]
    pub http_listen: Option<SocketAddr>,
    /// Print the effective configuration (all layers merged) as TOML and exit.
    #[arg(long, help_heading = "Process")]
    pub print_config: bool,
    /// Validate the configuration of the given roles and exit (0 when valid).
    #[arg(long, help_heading = "Process")]
    pub check_config: bool,
    /// Log format.
    #[arg(long, value_enum, help_heading = "Process")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing env-filter syntax) [default: info].
    #[arg(long, help_heading = "Process")]
    pub log_level: Option<String>,
    /// Export spans to this OpenTelemetry collector (OTLP over gRPC, e.g.
    /// http://127.0.0.1:4317) [default: none, no export].
    #[arg(long, help_heading = "Process")]
    pub otlp_endpoint: Option<String>,
    /// Async runtime worker threads [default: 1 for a storage-only process, else one per core].
    #[arg(long, help_heading = "Process")]
    pub worker_threads: Option<usize>,
    /// File holding the cluster secret every internal call carries (or [node] cluster_secret /
    /// PAIRDB_NODE_CLUSTER_SECRET); the same on every node, at least 16 characters.
    #[arg(long, help_heading = "Process")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Mutual TLS between roles: the cluster CA (PEM; with --tls-cert-file and --tls-key-file;
    /// `pairdb cert` makes them).
    #[arg(long, help_heading = "Process")]
    pub tls_ca_file: Option<PathBuf>,
    /// Mutual TLS between roles: this node's certificate (PEM, signed by the cluster CA).
    #[arg(long, help_heading = "Process")]
    pub tls_cert_file: Option<PathBuf>,
    /// Mutual TLS between roles: this node's private key (PEM).
    #[arg(long, help_heading = "Process")]
    pub tls_key_file: Option<PathBuf>,

    /// Storage: gRPC listener [default: 127.0.0.1:7101].
    #[arg(long, help_heading = "Storage role")]
    pub storage_listen: Option<SocketAddr>,
    /// Storage: data directory (locked by one process) [default: data/storage].
    #[arg(long, help_heading = "Storage role")]
    pub data_dir: Option<PathBuf>,
    /// Storage: gossip listener (UDP) for node health.
    #[arg(long, help_heading = "Storage role")]
    pub gossip: Option<SocketAddr>,
    /// Storage and coordinator: gossip addresses of storage nodes (comma list).
    #[arg(long, value_delimiter = ',', help_heading = "Storage role")]
    pub seeds: Vec<String>,
    /// Storage: register this node through the coordinators on its first start (with
    /// --join-coordinators; a restart with its data never registers again).
    #[arg(long, help_heading = "Storage role")]
    pub join: bool,
    /// Storage: the coordinators' gRPC addresses a joining node registers through, host:port
    /// (comma list).
    #[arg(long, value_delimiter = ',', help_heading = "Storage role")]
    pub join_coordinators: Vec<String>,
    /// Storage: host:port others reach this node's gRPC listener at (e.g. its pod's DNS name)
    /// [default: --listen].
    #[arg(long, help_heading = "Storage role")]
    pub advertise: Option<String>,
    /// Storage: commit-log sync: always (group commit), batch_ms=N, never [default: always].
    #[arg(long, help_heading = "Storage role")]
    pub sync: Option<SyncMode>,
    /// Storage: open even if a commit-log segment is corrupt in the middle, dropping the rest
    /// of that segment (the error names the file and offset; use only after reading it).
    #[arg(long, help_heading = "Storage role")]
    pub skip_corrupt_log: bool,

    /// Coordinator: gRPC listener [default: 127.0.0.1:7201].
    #[arg(long, help_heading = "Coordinator role")]
    pub coordinator_listen: Option<SocketAddr>,
    /// Coordinator: metadata store, postgres://... or sqlite://path
    /// [default: sqlite://pairdb-metadata.db].
    #[arg(long, help_heading = "Coordinator role")]
    pub metadata_url: Option<String>,
    /// Coordinator: idempotency store, redis://... or memory:// [default: memory://].
    #[arg(long, help_heading = "Coordinator role")]
    pub idempotency_url: Option<String>,
    /// Coordinator: storage nodes seeding an empty registry, id@host:port (comma list).
    #[arg(long, value_delimiter = ',', help_heading = "Coordinator role")]
    pub storage_nodes: Vec<NodeAddress>,

    /// Gateway: HTTP listener [default: 127.0.0.1:8080].
    #[arg(long, help_heading = "Gateway role")]
    pub gateway_listen: Option<SocketAddr>,
    /// Gateway: coordinators' gRPC addresses, host:port (comma list) [default: 127.0.0.1:7201].
    #[arg(long, value_delimiter = ',', help_heading = "Gateway role")]
    pub coordinators: Vec<String>,
    /// Gateway: authentication mode [default: token].
    #[arg(long, value_enum, help_heading = "Gateway role")]
    pub auth: Option<AuthMode>,
    /// Gateway: HS256 secret file for --auth=token (or [gateway.auth] secret / env).
    #[arg(long, help_heading = "Gateway role")]
    pub auth_secret_file: Option<PathBuf>,
    /// Gateway: serve HTTPS with this certificate chain (PEM; with --https-key-file;
    /// reloaded on SIGHUP).
    #[arg(long, help_heading = "Gateway role")]
    pub https_cert_file: Option<PathBuf>,
    /// Gateway: the HTTPS certificate's private key (PEM).
    #[arg(long, help_heading = "Gateway role")]
    pub https_key_file: Option<PathBuf>,
    /// Gateway: writes per tenant per minute [default: 1000].
    #[arg(long, help_heading = "Gateway role")]
    pub write_rate_limit: Option<u32>,
    /// Gateway: reads per tenant per minute [default: 10000].
    #[arg(long, help_heading = "Gateway role")]
    pub read_rate_limit: Option<u32>,
}

/// The flag overrides, collected per config section.
#[derive(Default)]
struct Sections {
    node: Map<String, Value>,
    storage: Map<String, Value>,
    coordinator: Map<String, Value>,
    gateway: Map<String, Value>,
    auth: Map<String, Value>,
}

impl Sections {
    fn section(&mut self, role: Role) -> &mut Map<String, Value> {
        match role {
            Role::Storage => &mut self.storage,
            Role::Coordinator => &mut self.coordinator,
            Role::Gateway => &mut self.gateway,
        }
    }

    fn into_value(self) -> Value {
        let mut gateway = self.gateway;
        if !self.auth.is_empty() {
            gateway.insert("auth".to_owned(), Value::Object(self.auth));
        }
        json!({
            "node": self.node,
            "storage": self.storage,
            "coordinator": self.coordinator,
            "gateway": gateway,
        })
    }
}

impl ServerArgs {
    /// The configuration these flags select: defaults < `--config` file < env < flags.
    pub fn load_config(&self) -> Result<crate::config::Config, ConfigError> {
        crate::config::Config::load(self.config.as_deref(), &self.overrides()?)
    }

    /// The flags that were given, shaped like the config file.
    pub fn overrides(&self) -> Result<Value, ConfigError> {
        let mut m = Sections::default();
        if !self.role.is_empty() {
            m.node.insert("roles".to_owned(), json!(self.role));
        }
        if let Some(id) = &self.node_id {
            m.node.insert("id".to_owned(), json!(id));
        }
        if let Some(f) = self.log_format {
            m.node.insert("log_format".to_owned(), json!(f));
        }
        if let Some(l) = &self.log_level {
            m.node.insert("log_level".to_owned(), json!(l));
        }
        if let Some(n) = self.worker_threads {
            m.node.insert("worker_threads".to_owned(), json!(n));
        }
        if let Some(e) = &self.otlp_endpoint {
            m.node.insert("otlp_endpoint".to_owned(), json!(e));
        }
        for (key, file) in [
            ("cluster_secret_file", &self.cluster_secret_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                m.node.insert(key.to_owned(), json!(f));
            }
        }
        if self.listen.is_some() || self.http_listen.is_some() {
            let role = match self.role.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ConfigError::Invalid(
                        "--listen and --http-listen need --role".to_owned(),
                    ));
                }
                _ => {
                    return Err(ConfigError::Invalid(
                        "--listen is ambiguous with several roles: use --storage-listen, --coordinator-listen or --gateway-listen".to_owned(),
                    ));
                }
            };
            if let Some(l) = self.listen {
                m.section(role).insert("listen".to_owned(), json!(l));
            }
            if let Some(h) = self.http_listen {
                if role == Role::Gateway {
                    return Err(ConfigError::Invalid(
                        "--http-listen is for storage and coordinator: the gateway serves health and metrics on --listen".to_owned(),
                    ));
                }
                m.section(role).insert("http_listen".to_owned(), json!(h));
            }
        }
        let strings = |v: &[String]| json!(v);
        if let Some(l) = self.storage_listen {
            m.storage.insert("listen".to_owned(), json!(l));
        }
        if let Some(d) = &self.data_dir {
            m.storage.insert("data_dir".to_owned(), json!(d));
        }
        if self.join {
            m.storage.insert("join".to_owned(), json!(true));
        }
        if !self.join_coordinators.is_empty() {
            m.storage.insert(
                "join_coordinators".to_owned(),
                strings(&self.join_coordinators),
            );
        }
        if let Some(a) = &self.advertise {
            m.storage.insert("advertise".to_owned(), json!(a));
        }
        if let Some(g) = self.gossip {
            m.storage.insert("gossip".to_owned(), json!(g));
        }
        if !self.seeds.is_empty() {
            m.storage.insert("seeds".to_owned(), strings(&self.seeds));
            m.coordinator
                .insert("seeds".to_owned(), strings(&self.seeds));
        }
        if self.skip_corrupt_log {
            m.storage.insert("skip_corrupt_log".to_owned(), json!(true));
        }
        if let Some(s) = self.sync {
            m.storage.insert("sync".to_owned(), json!(s.to_string()));
        }
        if let Some(l) = self.coordinator_listen {
            m.coordinator.insert("listen".to_owned(), json!(l));
        }
        if let Some(u) = &self.metadata_url {
            m.coordinator.insert("metadata_url".to_owned(), json!(u));
        }
        if let Some(u) = &self.idempotency_url {
            m.coordinator.insert("idempotency_url".to_owned(), json!(u));
        }
        if !self.storage_nodes.is_empty() {
            let nodes: Vec<String> = self.storage_nodes.iter().map(|n| n.to_string()).collect();
            m.coordinator
                .insert("storage_nodes".to_owned(), json!(nodes));
        }
        if let Some(l) = self.gateway_listen {
            m.gateway.insert("listen".to_owned(), json!(l));
        }
        if !self.coordinators.is_empty() {
            m.gateway
                .insert("coordinators".to_owned(), strings(&self.coordinators));
        }
        if let Some(a) = self.auth {
            m.auth.insert("mode".to_owned(), json!(a));
        }
        if let Some(f) = &self.auth_secret_file {
            m.auth.insert("secret_file".to_owned(), json!(f));
        }
        if let Some(f) = &self.https_cert_file {
            m.gateway.insert("https_cert_file".to_owned(), json!(f));
        }
        if let Some(f) = &self.https_key_file {
            m.gateway.insert("https_key_file".to_owned(), json!(f));
        }
        if let Some(r) = self.write_rate_limit {
            m.gateway.insert("write_rate_limit".to_owned(), json!(r));
        }
        if let Some(r) = self.read_rate_limit {
            m.gateway.insert("read_rate_limit".to_owned(), json!(r));
        }
        Ok(m.into_value())
    }
}
