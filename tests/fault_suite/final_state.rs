//! The final state of a run, taken after healing: what every key's natural replicas hold
//! after one anti-entropy repair of the whole cluster (and what they held before it), then
//! each key read at ALL through a gateway (docs/reliability.md, "The checker").

use std::time::Duration;

use pairdb::ring::{NodeId, NodeState, Ring, RingNode, key_position};
use pairdb::rpc::storage as spb;
use pairdb::vclock::Version;
use serde_json::Value;

use crate::cluster::{self, Cluster};
use crate::history::{FinalKey, Outcome};
use crate::report::AfterHealing;
use crate::workload::{self, Workload};
use crate::{RF, admin};

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
    /// Each tenant's replication factor now (the nemesis may have changed one).
    rf: std::collections::HashMap<String, usize>,
    clients: std::collections::HashMap<String, cluster::StorageClient>,
}

/// What each natural replica of a key holds: (node, value id or `None` for nothing or a
/// tombstone, version as text).
type Held = Vec<(String, Option<u64>, Option<String>)>;

impl Replicas {
    /// Connects to every storage node; the owners are those of the registry's ring now, at
    /// each tenant's replication factor now.
    async fn connect(cluster: &Cluster) -> Result<Self, String> {
        let gateway = &cluster.gateway_urls()[0];
        let ring = current_ring(gateway).await?;
        let mut rf = std::collections::HashMap::new();
        for tenant in workload::TENANTS {
            rf.insert(tenant.to_owned(), admin::tenant_rf(gateway, tenant).await?);
        }
        let mut clients = std::collections::HashMap::new();
        for (name, addr) in cluster.storage_addrs() {
            let client = cluster::storage_client(addr)
                .await
                .map_err(|e| format!("connect {name}: {e}"))?;
            clients.insert(name, client);
        }
        Ok(Self { ring, rf, clients })
    }

    /// The natural owners of `tenant`'s `key`.
    fn owners(&self, tenant: &str, key: &str) -> Vec<NodeId> {
        let rf = self.rf.get(tenant).copied().unwrap_or(RF);
        self.ring
            .natural_owners(key_position(tenant, key.as_bytes()), rf)
    }

    async fn held(&mut self, tenant: &str, key: &str) -> Result<Held, String> {
        let mut held = Vec::new();
        for owner in self.owners(tenant, key) {
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
            let owners = self.owners(tenant, PROBE_KEY);
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
            // Placed on the ring the node is fenced at (a cleanup refuses older ones): asking
            // for a floor of 1 answers the floor in force, and changes nothing for
            // coordinators, whose calls name their ring's epoch (1 or more).
            let floor = client
                .fence_ring(spb::FenceRingRequest { epoch: 1 })
                .await
                .map_err(|e| format!("ring fence of {owner}: {e}"))?
                .into_inner()
                .floor;
            let answer = client
                .write_batch(spb::WriteBatchRequest {
                    ring_epoch: floor,
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
pub async fn final_state(
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
    let migrations = admin::migration_counts(&cluster.gateway_urls()[0]).await?;
    after.migrations = migrations.by_state;
    after.migration_failures = migrations.failures;
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
