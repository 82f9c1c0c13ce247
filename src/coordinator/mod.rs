//! The coordinator: the stateless brain of every request (SEMANTICS.md). It holds no data of its
//! own; tenants, the node registry, hints and its clock's high-water mark live in the metadata
//! store, idempotency keys in the idempotency store.
//!
//! Modules, one job each:
//! - [`ring_view`]: the ring from the registry, refreshed, with gossip's down marks;
//!   [`membership`]: gossip's view through `WatchHealth`; [`storage_pool`]: one channel per node.
//! - [`replicas`]: one storage call per replica, as futures for [`crate::quorum::run`], through
//!   [`batcher`], which coalesces concurrent calls to one node into `WriteBatch`/`ReadBatch`.
//! - [`write`] (put and tombstone fan-out, hints for misses), [`read`] (quorum read, winner,
//!   read repair), [`idempotent`] (the idempotency wrapper of writes).
//! - [`hints`]: durable hint writer and the replay loop; [`repair`]: the bounded repair queue;
//!   [`rf_change`]: raising a tenant's replication factor (copy to new replicas, then switch).
//! - [`topology`]: adding and removing storage nodes (stream ranges, then switch the ring);
//!   [`admission`]: a joining node's registry record and tokens.
//! - [`tenant_cache`], [`clock`] (HLC with a durable high-water mark), [`admin`] (tenants and
//!   the node list), [`service`] (the gRPC service), [`http`] (health and metrics).
//!
//! Invariants: a write is acknowledged only after `required` authoritative replicas applied it
//! (or durably hold a version that beats it); every replica that missed it gets a hint (when
//! hints are on), or a repair marker on the key's other replicas when the hint cannot be kept;
//! a version issued by this coordinator is above every counter it issued before, across
//! restarts, and no counter from outside moves its clock more than `max_clock_skew` ahead;
//! reads never wait for repair.

pub mod admin;
pub mod admission;
pub mod anti_entropy;
pub mod batcher;
pub mod cleanup;
pub mod clock;
pub mod conditional;
pub mod errors;
pub mod expiry;
pub mod fan_out;
pub mod hints;
pub mod http;
pub mod idempotent;
pub mod lease;
pub mod listing;
pub mod membership;
pub mod migration_metrics;
pub mod periodic;
pub mod read;
pub mod repair;
pub mod replica_error;
pub mod replicas;
pub mod rf_change;
pub mod ring_view;
pub mod service;
pub mod snapshots;
pub mod stall;
pub mod storage_pool;
pub mod tenant_cache;
pub mod tenant_confirm;
pub mod tenant_delete;
pub mod topology;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use crate::idempotency::IdempotencyStore;
use crate::meta::{MetadataStore, Tenant};
use crate::ring::allocation::TokenAllocation;

use clock::CoordinatorClock;
use errors::CoordError;
use hints::HintWriter;
use repair::RepairQueue;
use ring_view::RingView;
use storage_pool::StoragePool;
use tenant_cache::TenantCache;

/// Tunables of the request paths (from `[coordinator]` in the config).
#[derive(Debug, Clone)]
pub struct Options {
    pub request_timeout: Duration,
    pub max_clock_entries: usize,
    /// Share of QUORUM reads that ask every read replica (for read repair), 0..=1.
    pub read_repair_chance: f64,
    /// How often tenants, migrations and the registry are re-read from the metadata store.
    pub metadata_refresh: Duration,
    /// Node additions and removals without streaming progress for this long are rolled back.
    pub topology_timeout: Duration,
    /// Fewest active nodes a removal may leave without `force` (the largest tenant RF counts too).
    pub min_storage_nodes: usize,
    /// How hints are delivered (the replay loop, and a joining node's hints before it activates).
    pub hint_limits: hints::ReplayLimits,
    /// How far ahead of the clock a counter from outside may lie (see `clock`).
    pub max_clock_skew: Duration,
    /// How a joining node's tokens are chosen, and how many it gets by default.
    pub token_allocation: TokenAllocation,
    pub virtual_nodes: u32,
    /// Bytes per second an anti-entropy repair exchanges at most (0: unpaced).
    pub repair_rate_limit: u64,
}

impl Options {
    /// The oldest ring a key-value request is placed on ([`ring_view::RingView::fresh`]): one
    /// refresh period and half a second. The refresh loop keeps the ring younger than that
    /// unless this process stalled; and it stays below the time a cleanup waits after a
    /// change for every coordinator to switch rings (`2 x metadata_refresh + 1 s`).
    pub fn ring_max_age(&self) -> Duration {
        self.metadata_refresh + Duration::from_millis(500)
    }
}

/// Everything a request needs, shared by the gRPC service and the background loops.
pub struct Coordinator {
    pub id: String,
    pub options: Options,
    pub meta: Arc<dyn MetadataStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    pub idempotency_breaker: idempotent::Breaker,
    pub tenants: TenantCache,
    pub clock: CoordinatorClock,
    pub pool: Arc<StoragePool>,
    pub ring: Arc<RingView>,
    pub hints: HintWriter,
    pub repairs: RepairQueue,
    /// Tells storage nodes that just started the deleted tenants (`tenant_confirm`).
    pub confirmations: Arc<tenant_confirm::Confirmations>,
    /// Tenants whose replication factor is being raised, and to what.
    pub pending_rf: rf_change::PendingRf,
    /// Reads served, for spreading `read_repair_chance` evenly.
    pub reads_served: std::sync::atomic::AtomicU64,
    /// The migrations this coordinator runs, and the leases it watches.
    pub leases: lease::Leases,
    /// The role's background work (loops, migrations, cleanups), stopped and waited for when
    /// the role stops; its stop token also drains the key-value streams.
    pub tasks: crate::shutdown::Tasks,
}

/// Resumes the migrations this coordinator ran before it stopped, or that nobody runs
/// ([`lease::resume_own`]); those of other coordinators are taken over only when their lease
/// goes stale ([`lease::take_over_stale`], from [`lease::spawn_watch`]).
pub fn resume_migrations(core: &Arc<Coordinator>) {
    let core = core.clone();
    core.tasks.clone().spawn(async move {
        if let Err(e) = lease::resume_own(&core).await {
            tracing::warn!(error = %e, "cannot list migrations to resume");
        }
    });
}

impl Coordinator {
    /// The tenant, or TENANT_NOT_FOUND; UNAVAILABLE when the store is down and it is not cached.
    pub async fn tenant(&self, tenant_id: &str) -> Result<Tenant, CoordError> {
        self.tenants
            .get(tenant_id)
            .await?
            .ok_or_else(|| CoordError::TenantNotFound(tenant_id.to_owned()))
    }

    /// The live tenant whose storage namespace is `namespace` (a record's, a hint's or a
    /// repair marker's `tenant_id`); `None` for a deleted incarnation or a deleted tenant,
    /// whose records are never repaired nor handed on.
    pub async fn tenant_of_namespace(&self, namespace: &str) -> Result<Option<Tenant>, CoordError> {
        let Some((id, incarnation)) = crate::limits::parse_storage_tenant(namespace) else {
            return Ok(None);
        };
        match self.tenants.get(id).await? {
            Some(t) if t.incarnation == incarnation => Ok(Some(t)),
            _ => Ok(None),
        }
    }
}

impl Coordinator {
    /// Every node a write of `key` in `tenant`'s namespace goes to on `snapshot`: natural and
    /// pending owners at the tenant's write RF (the larger one while an RF raise runs).
    pub fn write_owners_on(
        &self,
        snapshot: &ring_view::Snapshot,
        tenant: &Tenant,
        key: &[u8],
    ) -> Vec<String> {
        let rf = self.pending_rf.write_rf(tenant) as usize;
        let position = crate::ring::key_position(&tenant.storage_id(), key);
        snapshot
            .ring
            .plan(position, rf)
            .write_replicas()
            .into_iter()
            .map(|n| n.as_str().to_owned())
            .collect()
    }
}

impl Coordinator {
    /// Every node a write of `key` in storage namespace `namespace` goes to now, with the
    /// epoch that placement rests on; `None` when that is not known (no such tenant, the
    /// metadata store did not answer): a hint then goes to its target.
    pub async fn write_owners(&self, namespace: &str, key: &[u8]) -> Option<hints::Owners> {
        let tenant = self.tenant_of_namespace(namespace).await.ok()??;
        let snapshot = self.ring.snapshot();
        Some(hints::Owners {
            nodes: self.write_owners_on(&snapshot, &tenant, key),
            epoch: write::placed_epoch(&snapshot, &tenant),
        })
    }
}
