//! Clients with a recorded history, through both gateways:
//!
//! - single writers: each owns a few keys and writes them with increasing values at QUORUM or
//!   ALL, one operation at a time;
//! - multi writers: unique values and deletes on shared keys, at every consistency level;
//! - readers: ONE, QUORUM and ALL on every key but the set keys;
//! - conditional writers: read a shared `cas-*` key at QUORUM, then write it at QUORUM with
//!   `if_match` the version read (`if_absent` when there was none), never retried;
//! - a set writer: a new `set-*` key every 200 ms at ONE or QUORUM, never read before the end
//!   (what hints missed stays divergent until anti-entropy repairs it).
//!
//! Every write carries a value unique in the run (`{"t": tenant, "k": key, "id": n}`), so a read
//! names the write it saw. Half of the writes carry an `Idempotency-Key` and are retried through
//! the other gateway after a timeout or a 5xx (up to 3 tries); the others are never retried.
//! A fifth of the acknowledged idempotent writes are sent once more, as a client that lost the
//! answer would (recorded with `resend_of`). Two tenants use the same key names.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::history::{Kind, Op, Outcome, ReadValue};

pub const TENANTS: [&str; 2] = ["acme", "globex"];
pub const SINGLE_WRITERS: usize = 2;
pub const MULTI_WRITERS: usize = 3;
pub const READERS: usize = 3;
pub const CAS_WRITERS: usize = 2;
pub const SET_WRITERS: usize = 1;
/// The pause after each set write: a few hundred keys a minute, few enough to read them all at
/// the end.
const SET_PACE: Duration = Duration::from_millis(200);
const CAS_KEYS: usize = 2;
const KEYS_PER_SINGLE_WRITER: usize = 3;
const SHARED_KEYS: usize = 6;
/// Single-writer value ids: `writer * SW_SPAN + n`, n counting up from 1.
pub const SW_SPAN: u64 = 1_000_000;
const MW_BASE: u64 = 1_000_000_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A small deterministic generator (splitmix64): the suite's schedule comes from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Client `client`'s own stream of the run's seed.
    pub fn for_client(seed: u64, client: usize) -> Self {
        Rng(seed ^ ((client as u64 + 1) << 12))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The tenant and key names of single writer `w`.
pub fn single_writer_keys(w: usize) -> Vec<(String, String)> {
    (0..KEYS_PER_SINGLE_WRITER)
        .map(|k| (TENANTS[w % 2].to_owned(), format!("sw{w}-{k}")))
        .collect()
}

pub fn shared_keys() -> Vec<(String, String)> {
    TENANTS
        .iter()
        .flat_map(|t| (0..SHARED_KEYS).map(move |k| ((*t).to_owned(), format!("mw-{k}"))))
        .collect()
}

/// The keys conditional writers share.
pub fn cas_keys() -> Vec<(String, String)> {
    TENANTS
        .iter()
        .flat_map(|t| (0..CAS_KEYS).map(move |k| ((*t).to_owned(), format!("cas-{k}"))))
        .collect()
}

pub fn all_keys() -> Vec<(String, String)> {
    let mut keys: Vec<_> = (0..SINGLE_WRITERS).flat_map(single_writer_keys).collect();
    keys.extend(shared_keys());
    keys.extend(cas_keys());
    keys
}

pub fn is_single_writer_key(key: &str) -> bool {
    key.starts_with("sw")
}

/// A set writer's key: written once, and never read by any client before the final state is
/// taken, so no read repair touches it. Where its replicas missed the write, only hints and
/// anti-entropy can bring them together.
pub fn is_set_key(key: &str) -> bool {
    key.starts_with("set-")
}

/// An operation to append to the history (its id and completion time are added).
struct Recorded<'a> {
    client: usize,
    kind: Kind,
    tenant: &'a str,
    key: &'a str,
    value: Option<u64>,
    consistency: &'static str,
    idempotency_key: Option<String>,
    attempts: u32,
    resend_of: Option<u64>,
    condition: Option<Value>,
    invoke_ms: u64,
    outcome: Outcome,
}

pub struct Workload {
    gateways: Vec<String>,
    http: reqwest::Client,
    start: Instant,
    next_op: AtomicU64,
    next_value: AtomicU64,
    ops: Mutex<Vec<Op>>,
}

impl Workload {
    pub fn new(gateways: Vec<String>, start: Instant) -> Arc<Workload> {
        let http = pairdb::tools::client::http_builder(None)
            .expect("http client")
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(8)
            .build()
            .expect("HTTP client");
        Arc::new(Workload {
            gateways,
            http,
            start,
            next_op: AtomicU64::new(0),
            next_value: AtomicU64::new(MW_BASE),
            ops: Mutex::new(Vec::new()),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Every key the final state covers: the fixed ones and each set key written (whatever
    /// the outcome: an unknown or failed write may have landed somewhere).
    pub fn final_keys(&self) -> Vec<(String, String)> {
        let mut keys = all_keys();
        let mut set_keys: Vec<(String, String)> = self
            .ops
            .lock()
            .iter()
            .filter(|o| o.kind == Kind::Put && is_set_key(&o.key))
            .map(|o| (o.tenant.clone(), o.key.clone()))
            .collect();
        set_keys.sort();
        set_keys.dedup();
        keys.extend(set_keys);
        keys
    }

    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().clone();
        ops.sort_by_key(|o| (o.invoke_ms, o.id));
        ops
    }

    /// Runs every client until `deadline`.
    pub async fn run(self: &Arc<Self>, deadline: Instant, seed: u64) {
        let mut tasks = Vec::new();
        for w in 0..SINGLE_WRITERS {
            let me = self.clone();
            let rng = Rng::for_client(seed, w);
            tasks.push(tokio::spawn(async move {
                me.single_writer(w, rng, deadline).await
            }));
        }
        for m in 0..MULTI_WRITERS {
            let me = self.clone();
            let client = SINGLE_WRITERS + m;
            let rng = Rng::for_client(seed, client);
            tasks.push(tokio::spawn(async move {
                me.multi_writer(client, rng, deadline).await
            }));
        }
        for r in 0..READERS {
            let me = self.clone();
            let client = SINGLE_WRITERS + MULTI_WRITERS + r;
            let rng = Rng::for_client(seed, client);
            tasks.push(tokio::spawn(async move {
                me.reader(client, rng, deadline).await
            }));
        }
        for c in 0..CAS_WRITERS {
            let me = self.clone();
            let client = SINGLE_WRITERS + MULTI_WRITERS + READERS + c;
            let rng = Rng::for_client(seed, client);
            tasks.push(tokio::spawn(async move {
                me.conditional_writer(client, rng, deadline).await
            }));
        }
        for s in 0..SET_WRITERS {
            let me = self.clone();
            let client = SINGLE_WRITERS + MULTI_WRITERS + READERS + CAS_WRITERS + s;
            let rng = Rng::for_client(seed, client);
            tasks.push(tokio::spawn(async move {
                me.set_writer(client, rng, deadline).await
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Writes a new key each time (`set-<client>-<n>`, the tenants in turn) at ONE or QUORUM.
    async fn set_writer(&self, client: usize, mut rng: Rng, deadline: Instant) {
        let mut n = 0usize;
        while Instant::now() < deadline {
            n += 1;
            let tenant = TENANTS[n % TENANTS.len()];
            let key = format!("set-{client}-{n}");
            let level = if rng.chance(50) { "one" } else { "quorum" };
            let idempotent = rng.chance(50);
            let value = self.next_value.fetch_add(1, Ordering::Relaxed);
            self.write(
                client,
                Kind::Put,
                tenant,
                &key,
                Some(value),
                level,
                idempotent,
                &mut rng,
            )
            .await;
            tokio::time::sleep(SET_PACE).await;
        }
    }

    /// Read a shared key at QUORUM, then write it at QUORUM only over the version read.
    async fn conditional_writer(&self, client: usize, mut rng: Rng, deadline: Instant) {
        let keys = cas_keys();
        while Instant::now() < deadline {
            let (tenant, key) = &keys[rng.below(keys.len() as u64) as usize];
            let gateway = rng.below(self.gateways.len() as u64) as usize;
            let invoke_ms = self.now_ms();
            let read = self.get(gateway, tenant, key, "quorum").await;
            let condition = match &read {
                Outcome::Ok {
                    found: true,
                    clock: Some(clock),
                    ..
                } => json!({"if_match": clock}),
                Outcome::Ok { found: false, .. } => json!("if_absent"),
                _ => Value::Null,
            };
            self.record(Recorded {
                client,
                kind: Kind::Get,
                tenant,
                key,
                value: None,
                consistency: "quorum",
                idempotency_key: None,
                attempts: 1,
                resend_of: None,
                condition: None,
                invoke_ms,
                outcome: read,
            });
            if condition.is_null() {
                continue;
            }
            let value = self.next_value.fetch_add(1, Ordering::Relaxed);
            let mut body = json!({
                "key": key,
                "value": {"t": tenant, "k": key, "id": value},
                "consistency": "quorum",
            });
            match &condition {
                Value::Object(c) => body["if_match"] = c["if_match"].clone(),
                _ => body["if_absent"] = json!(true),
            }
            let invoke_ms = self.now_ms();
            let outcome = self
                .send(gateway, reqwest::Method::POST, tenant, body, None)
                .await;
            self.record(Recorded {
                client,
                kind: Kind::Put,
                tenant,
                key,
                value: Some(value),
                consistency: "quorum",
                idempotency_key: None,
                attempts: 1,
                resend_of: None,
                condition: Some(condition),
                invoke_ms,
                outcome,
            });
        }
    }

    async fn single_writer(&self, w: usize, mut rng: Rng, deadline: Instant) {
        let keys = single_writer_keys(w);
        let mut n = 0u64;
        while Instant::now() < deadline {
            n += 1;
            let (tenant, key) = &keys[(n as usize) % keys.len()];
            let level = if rng.chance(80) { "quorum" } else { "all" };
            let idempotent = rng.chance(50);
            let id = w as u64 * SW_SPAN + n;
            self.write(
                w,
                Kind::Put,
                tenant,
                key,
                Some(id),
                level,
                idempotent,
                &mut rng,
            )
            .await;
        }
    }

    async fn multi_writer(&self, client: usize, mut rng: Rng, deadline: Instant) {
        let keys = shared_keys();
        while Instant::now() < deadline {
            let (tenant, key) = &keys[rng.below(keys.len() as u64) as usize];
            let level = ["one", "quorum", "quorum", "all"][rng.below(4) as usize];
            let idempotent = rng.chance(50);
            let (kind, value) = if rng.chance(15) {
                (Kind::Delete, None)
            } else {
                (
                    Kind::Put,
                    Some(self.next_value.fetch_add(1, Ordering::Relaxed)),
                )
            };
            self.write(
                client, kind, tenant, key, value, level, idempotent, &mut rng,
            )
            .await;
        }
    }

    async fn reader(&self, client: usize, mut rng: Rng, deadline: Instant) {
        let keys = all_keys();
        while Instant::now() < deadline {
            let (tenant, key) = &keys[rng.below(keys.len() as u64) as usize];
            let level = ["one", "quorum", "all"][rng.below(3) as usize];
            let gateway = rng.below(self.gateways.len() as u64) as usize;
            let invoke_ms = self.now_ms();
            let outcome = self.get(gateway, tenant, key, level).await;
            self.record(Recorded {
                client,
                kind: Kind::Get,
                tenant,
                key,
                value: None,
                consistency: level,
                idempotency_key: None,
                attempts: 1,
                resend_of: None,
                condition: None,
                invoke_ms,
                outcome,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        client: usize,
        kind: Kind,
        tenant: &str,
        key: &str,
        value: Option<u64>,
        level: &'static str,
        idempotent: bool,
        rng: &mut Rng,
    ) {
        let idem = idempotent.then(|| format!("idem-{client}-{}", rng.next()));
        let mut gateway = rng.below(self.gateways.len() as u64) as usize;
        let body = match kind {
            Kind::Put => json!({
                "key": key,
                "value": {"t": tenant, "k": key, "id": value},
                "consistency": level,
            }),
            _ => json!({"key": key, "consistency": level}),
        };
        let method = if kind == Kind::Put {
            reqwest::Method::POST
        } else {
            reqwest::Method::DELETE
        };
        let invoke_ms = self.now_ms();
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let outcome = self
                .send(
                    gateway,
                    method.clone(),
                    tenant,
                    body.clone(),
                    idem.as_deref(),
                )
                .await;
            let retry =
                idem.is_some() && attempts < 3 && matches!(outcome, Outcome::Unknown { .. });
            if !retry {
                break outcome;
            }
            gateway = (gateway + 1) % self.gateways.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let acked = matches!(outcome, Outcome::Ok { .. });
        let first = self.record(Recorded {
            client,
            kind,
            tenant,
            key,
            value,
            consistency: level,
            idempotency_key: idem.clone(),
            attempts,
            resend_of: None,
            condition: None,
            invoke_ms,
            outcome,
        });
        if acked && idem.is_some() && rng.chance(20) {
            gateway = rng.below(self.gateways.len() as u64) as usize;
            let invoke_ms = self.now_ms();
            let outcome = self
                .send(gateway, method, tenant, body, idem.as_deref())
                .await;
            self.record(Recorded {
                client,
                kind,
                tenant,
                key,
                value,
                consistency: level,
                idempotency_key: idem,
                attempts: 1,
                resend_of: Some(first),
                condition: None,
                invoke_ms,
                outcome,
            });
        }
    }

    /// Appends an operation to the history; returns its id.
    fn record(&self, r: Recorded<'_>) -> u64 {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let op = Op {
            id,
            client: r.client,
            kind: r.kind,
            tenant: r.tenant.to_owned(),
            key: r.key.to_owned(),
            value: r.value,
            consistency: r.consistency,
            idempotency_key: r.idempotency_key,
            attempts: r.attempts,
            resend_of: r.resend_of,
            condition: r.condition,
            invoke_ms: r.invoke_ms,
            complete_ms: self.now_ms(),
            outcome: r.outcome,
        };
        self.ops.lock().push(op);
        id
    }

    async fn send(
        &self,
        gateway: usize,
        method: reqwest::Method,
        tenant: &str,
        body: Value,
        idem: Option<&str>,
    ) -> Outcome {
        let url = format!("{}/v1/key-value", self.gateways[gateway]);
        let mut request = self
            .http
            .request(method, url)
            .header("x-tenant-id", tenant)
            .json(&body);
        if let Some(k) = idem {
            request = request.header("idempotency-key", k);
        }
        match request.send().await {
            Err(e) if e.is_connect() => Outcome::Fail {
                code: "CONNECT_FAILED".to_owned(),
            },
            Err(e) => Outcome::Unknown { why: e.to_string() },
            Ok(response) => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let code = body["error_code"]
                    .as_str()
                    .or(body["code"].as_str())
                    .unwrap_or("")
                    .to_owned();
                if status.is_success() {
                    Outcome::Ok {
                        clock: body.get("vector_clock").cloned(),
                        read: None,
                        found: true,
                        duplicate: body["is_duplicate"].as_bool().unwrap_or(false),
                        skipped: body["idempotency_skipped"].as_bool().unwrap_or(false),
                    }
                } else if status.is_client_error() {
                    Outcome::Fail {
                        code: format!("{} {code}", status.as_u16()),
                    }
                } else {
                    Outcome::Unknown {
                        why: format!("{} {code}", status.as_u16()),
                    }
                }
            }
        }
    }

    /// A read through a gateway.
    pub async fn get(&self, gateway: usize, tenant: &str, key: &str, level: &str) -> Outcome {
        let url = format!(
            "{}/v1/key-value?key={key}&consistency={level}",
            self.gateways[gateway]
        );
        let response = match self
            .http
            .get(url)
            .header("x-tenant-id", tenant)
            .send()
            .await
        {
            Err(e) if e.is_connect() => {
                return Outcome::Fail {
                    code: "CONNECT_FAILED".to_owned(),
                };
            }
            Err(e) => return Outcome::Unknown { why: e.to_string() },
            Ok(r) => r,
        };
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Outcome::Ok {
                clock: body.get("vector_clock").cloned(),
                read: parse_value(&body["value"]),
                found: true,
                duplicate: false,
                skipped: false,
            }
        } else if status.as_u16() == 404 && body["error_code"] == "KEY_NOT_FOUND" {
            Outcome::Ok {
                clock: None,
                read: None,
                found: false,
                duplicate: false,
                skipped: false,
            }
        } else {
            Outcome::Fail {
                code: format!("{} {}", status.as_u16(), body["error_code"]),
            }
        }
    }
}

/// The value id of a stored `{"t", "k", "id"}` (anything else: `id` 0, tenant and key as
/// found, which the checker reports).
pub fn parse_value(v: &Value) -> Option<ReadValue> {
    if v.is_null() {
        return None;
    }
    Some(ReadValue {
        tenant: v["t"].as_str().unwrap_or("?").to_owned(),
        key: v["k"].as_str().unwrap_or("?").to_owned(),
        id: v["id"].as_u64().unwrap_or(0),
    })
}
