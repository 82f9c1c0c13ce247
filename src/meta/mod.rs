//! The metadata store: tenants, the storage-node registry and hints, behind one trait with one
//! SQL implementation ([`SqlMetadataStore`]) for both PostgreSQL (production) and SQLite (the
//! embedded default), which pass the same test suite (`tests/meta_store.rs`).
//!
//! Invariants: tenant ids, node ids and migration ids are unique (creating one twice is `Exists`); hints come
//! back per target node in insertion order, and a hint is gone only after `delete_hints`.

mod sql;

use crate::ring::NodeState;

pub use sql::SqlMetadataStore;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("{what} {id:?} already exists")]
    Exists { what: &'static str, id: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("metadata store holds invalid data: {0}")]
    Corrupt(String),
    /// A conditional write found the data changed since it was read; read again and retry.
    #[error("{0} changed concurrently")]
    Changed(&'static str),
}

/// A tenant and its replication factor. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub tenant_id: String,
    pub replication_factor: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// 1 for the first tenant of this id, one more for each re-creation after a deletion.
    pub incarnation: u32,
    /// The registry epoch as of this read ([`Registry::epoch`]): the record reflects every
    /// replication-factor change committed at or below it (a change raises the epoch).
    /// Coordinators tag a client call with the lower of this and their ring's epoch, so a
    /// storage node fenced by a cleanup after an RF change refuses calls placed with the old
    /// RF. 0: unknown.
    pub registry_epoch: u64,
}

impl Tenant {
    /// The tenant's namespace on the storage nodes (records, placement, hints, idempotency
    /// keys): the id for the first incarnation, `id:N` for the N-th. Client ids cannot hold
    /// ':', so no incarnation's namespace is another tenant's.
    pub fn storage_id(&self) -> String {
        crate::limits::storage_tenant_id(&self.tenant_id, self.incarnation)
    }
}

/// A deleted tenant incarnation, whose records the storage nodes purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedTenant {
    pub storage_id: String,
    pub tenant_id: String,
    pub incarnation: u32,
    /// By the metadata store's clock.
    pub deleted_at_ms: i64,
}

/// One node of the registry as a conditional change saw it: id and state.
pub type RegistryEntry = (String, NodeState);

/// The registry as conditional changes compare it ([`MetadataStore::admit_node`]).
pub fn registry_view(nodes: &[NodeRecord]) -> Vec<RegistryEntry> {
    let mut view: Vec<RegistryEntry> = nodes.iter().map(|n| (n.node_id.clone(), n.state)).collect();
    view.sort_by(|a, b| a.0.cmp(&b.0));
    view
}

/// The node registry as of one moment, with its epoch: a counter the metadata store raises
/// with every change of the registry, so of two registries read, the one with the higher epoch
/// includes every change the other does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub epoch: u64,
    pub nodes: Vec<NodeRecord>,
}

/// Whether some node may still hold records of ranges it gave away: a node addition or an RF
/// lowering leaves them on the old owners until a cleanup drops them. Such a leftover copy is
/// a copy no repair compares, so while one may exist no tombstone may be purged: a later
/// change could give the range back to that node, and its old value would return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    pub registry_epoch: u64,
    /// The registry epoch of the last complete cleanup (0: none).
    pub cleaned_epoch: u64,
    /// Some node addition, removal or RF change ever completed.
    pub placement_changed: bool,
}

impl Leftovers {
    /// True when leftovers may exist: placement changed at some point, and the registry moved
    /// since the last complete cleanup (conservative: any registry change counts).
    pub fn may_exist(&self) -> bool {
        self.placement_changed && self.registry_epoch > self.cleaned_epoch
    }
}

/// A storage node in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub virtual_nodes: u32,
    /// The tokens chosen at admission (`ring::allocation`); `None` for a node whose tokens
    /// follow the xxh3 rule (registered before allocation, or under `token_allocation = random`).
    pub tokens: Option<Vec<u64>>,
    pub state: NodeState,
}

impl NodeRecord {
    /// The node as the ring places it.
    pub fn ring_node(&self) -> crate::ring::RingNode {
        crate::ring::RingNode {
            id: crate::ring::NodeId::new(self.node_id.clone()),
            virtual_nodes: self.virtual_nodes,
            tokens: self.tokens.clone(),
            state: self.state,
        }
    }
}

/// A write a replica missed: the encoded record (a `storage.Record` protobuf) for `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub id: i64,
    pub target_node: String,
    pub tenant_id: String,
    pub record: Vec<u8>,
    pub created_at_ms: i64,
    pub attempts: u32,
}

/// Where one stream of a node change got, as its sender last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCheckpoint {
    pub stream_id: String,
    /// The migration whose runner drives the stream (the leader of its plan).
    pub migration_id: String,
    /// Of the stream's ranges and target, as the sender computes it (opaque here).
    pub fingerprint: u64,
    /// The internal key of the last record the target acknowledged.
    pub last_key: Vec<u8>,
    pub keys: u64,
    pub bytes: u64,
}

/// What a migration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind {
    NodeAddition,
    NodeRemoval,
    ReplicationFactorChange,
    /// Old owners dropping ranges they no longer own (`subject`: one node id, or `*`).
    Cleanup,
    /// Anti-entropy over every range (`subject`: what it is limited to, `*` for nothing).
    Repair,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    Pending,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

macro_rules! names {
    ($ty:ty { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name stored and shown in the API.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }

            pub fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

impl MigrationKind {
    /// Whether it changes where data is placed (node and RF changes; not cleanups or repairs).
    pub fn changes_placement(self) -> bool {
        matches!(
            self,
            Self::NodeAddition | Self::NodeRemoval | Self::ReplicationFactorChange
        )
    }
}

names!(MigrationKind {
    NodeAddition = "node_addition",
    NodeRemoval = "node_removal",
    ReplicationFactorChange = "replication_factor_change",
    Cleanup = "cleanup",
    Repair = "repair",
});
names!(MigrationState {
    Pending = "pending",
    InProgress = "in_progress",
    Completed = "completed",
    Failed = "failed",
    Cancelled = "cancelled",
});

/// A migration record: a node joining or leaving, or a tenant's RF change (`subject` is the
/// node id or the tenant id), with its progress. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub migration_id: String,
    pub kind: MigrationKind,
    pub subject: String,
    pub state: MigrationState,
    pub keys_migrated: u64,
    pub total_keys: u64,
    /// For a replication-factor change: the RF the tenant moves to (0 otherwise).
    pub target_rf: u32,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// Why it failed, when it did.
    pub failure_reason: Option<String>,
    /// Bytes copied so far (streamed by node additions and removals, sent by RF changes).
    pub bytes_migrated: u64,
}

impl Migration {
    /// A migration that starts now in `state`, with no progress yet.
    pub fn begin(
        migration_id: String,
        kind: MigrationKind,
        subject: impl Into<String>,
        state: MigrationState,
    ) -> Self {
        let now = crate::wallclock::now_ms() as i64;
        Self {
            migration_id,
            kind,
            subject: subject.into(),
            state,
            keys_migrated: 0,
            total_keys: 0,
            target_rf: 0,
            started_at_ms: now,
            updated_at_ms: now,
            failure_reason: None,
            bytes_migrated: 0,
        }
    }
}

/// The last anti-entropy repair of one ring range, over every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRepair {
    pub range: crate::ring::HashRange,
    /// When the repair of the range began (milliseconds since the Unix epoch).
    pub repaired_at_ms: i64,
    /// Keys listed from the replicas in segments whose hashes differed.
    pub keys_compared: u64,
    /// Keys some replica was sent a newer version of.
    pub keys_fixed: u64,
    /// Every replica of every tenant answered and every difference was fixed.
    pub complete: bool,
}

/// Who carries a migration out, and what it was asked (see `coordinator::lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationLease {
    /// The coordinator that renews the lease (`None`: nobody yet).
    pub owner: Option<String>,
    /// Renewals so far: a beat that stops moving means its owner stopped.
    pub beat: i64,
    /// An operator asked to cancel it.
    pub cancel_requested: bool,
}

/// What the coordinator needs to keep about the cluster.
#[tonic::async_trait]
pub trait MetadataStore: Send + Sync {
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), MetaError>;
    async fn create_tenant(
        &self,
        tenant_id: &str,
        replication_factor: u32,
    ) -> Result<Tenant, MetaError>;
    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, MetaError>;
    /// Up to `limit` tenants whose id sorts after `after` (all from the first when `None`),
    /// in id order: one page of the tenant list. The order is the store's collation of ids,
    /// the same for every page, so paging by the last id seen never skips or repeats one.
    async fn list_tenants(&self, after: Option<&str>, limit: u32)
    -> Result<Vec<Tenant>, MetaError>;
    /// Deletes the tenant (NotFound when there is none): its row goes, its incarnation joins
    /// the deleted ones (whose namespaces the storage nodes purge), its hints are dropped.
    /// Returns it as it was.
    async fn delete_tenant(&self, tenant_id: &str) -> Result<Tenant, MetaError>;
    /// How long ago (ms, by the store's own clock, which stamped the deletion) the last
    /// incarnation of `tenant_id` was deleted; `None` when none ever was.
    async fn ms_since_deleted(&self, tenant_id: &str) -> Result<Option<i64>, MetaError>;
    /// Every deleted tenant incarnation, oldest deletion first.
    async fn deleted_tenants(&self) -> Result<Vec<DeletedTenant>, MetaError>;
    /// Tenants created or changed at or after `since_ms` (for other coordinators' caches).
    async fn tenants_updated_since(&self, since_ms: i64) -> Result<Vec<Tenant>, MetaError>;
    /// Sets the RF and returns the tenant as it was before.
    async fn update_replication_factor(
        &self,
        tenant_id: &str,
        replication_factor: u32,
    ) -> Result<Tenant, MetaError>;
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, MetaError>;
    /// The registry and its epoch, read together (one snapshot).
    async fn registry(&self) -> Result<Registry, MetaError>;
    /// Whether nodes may hold records of ranges they gave away (see [`Leftovers`]).
    async fn leftovers(&self) -> Result<Leftovers, MetaError>;
    /// A cleanup of every node, skipping none, verified against the ring of registry `epoch`
    /// and completed: no node holds records of ranges it gave away up to it. Only rises.
    async fn record_cleaned_epoch(&self, epoch: u64) -> Result<(), MetaError>;
    async fn add_node(&self, node: &NodeRecord) -> Result<(), MetaError>;
    /// Adds `node` only if the registry is still exactly `seen` ([`registry_view`]), so a node's tokens are chosen against the registry it joins and no other topology
    /// change started meanwhile; `Changed` otherwise.
    async fn admit_node(&self, node: &NodeRecord, seen: &[RegistryEntry]) -> Result<(), MetaError>;
    /// Adds every node of a first registry in one transaction, only if the registry is still
    /// empty (`Changed` otherwise): a coordinator starting meanwhile reads no registry or the
    /// whole one, never a part of it.
    async fn seed_nodes(&self, nodes: &[NodeRecord]) -> Result<(), MetaError>;
    /// Sets a node's state only if the registry is still exactly `seen`; `Changed` otherwise.
    async fn set_node_state_if(
        &self,
        node_id: &str,
        state: NodeState,
        seen: &[RegistryEntry],
    ) -> Result<(), MetaError>;
    /// Makes several node changes final in one transaction, only if the registry is still
    /// exactly `seen` (`Changed` otherwise): `activate` become active, `remove` leave the
    /// registry. A reader sees the registry before all of them or after all of them.
    async fn commit_node_changes(
        &self,
        seen: &[RegistryEntry],
        activate: &[String],
        remove: &[String],
    ) -> Result<(), MetaError>;
    async fn set_node_state(&self, node_id: &str, state: NodeState) -> Result<(), MetaError>;
    async fn remove_node(&self, node_id: &str) -> Result<(), MetaError>;
    /// Stores hints durably (all or none).
    async fn store_hints(&self, hints: &[Hint]) -> Result<(), MetaError>;
    /// The oldest `limit` hints for `target_node`.
    async fn hints_for(&self, target_node: &str, limit: u32) -> Result<Vec<Hint>, MetaError>;
    /// The oldest `limit` hints for `target_node` with an id above `after_id` (paging without
    /// deleting).
    async fn hints_after(
        &self,
        target_node: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Hint>, MetaError>;
    async fn delete_hints(&self, ids: &[i64]) -> Result<(), MetaError>;
    async fn record_hint_attempt(&self, ids: &[i64]) -> Result<(), MetaError>;
    /// Number of hints kept per target node.
    async fn hint_counts(&self) -> Result<Vec<(String, u64)>, MetaError>;
    /// Records a new migration (`Exists` if the id is taken).
    async fn create_migration(&self, migration: &Migration) -> Result<(), MetaError>;
    async fn get_migration(&self, migration_id: &str) -> Result<Option<Migration>, MetaError>;
    /// Migrations that are pending or in progress.
    async fn active_migrations(&self) -> Result<Vec<Migration>, MetaError>;
    /// Marks an active migration failed, keeping its progress, with the reason (`Changed` for
    /// one that ended).
    async fn fail_migration(&self, migration_id: &str, reason: &str) -> Result<(), MetaError>;
    /// The `limit` most recently started migrations, newest first, in any state.
    async fn recent_migrations(&self, limit: u32) -> Result<Vec<Migration>, MetaError>;
    /// Moves an active migration to `state` with its progress (`NotFound` for an unknown id,
    /// `Changed` for one that ended: an end is never overwritten).
    async fn update_migration(
        &self,
        migration_id: &str,
        state: MigrationState,
        keys_migrated: u64,
        total_keys: u64,
        bytes_migrated: u64,
    ) -> Result<(), MetaError>;
    /// The lease of a migration (`None` for an unknown id).
    async fn migration_lease(
        &self,
        migration_id: &str,
    ) -> Result<Option<MigrationLease>, MetaError>;
    /// Renews `owner`'s lease on an active migration (taking it when nobody holds it): whether
    /// a cancel was requested, or `None` when the lease is lost (another coordinator holds it,
    /// or the migration ended).
    async fn renew_migration_lease(
        &self,
        migration_id: &str,
        owner: &str,
    ) -> Result<Option<bool>, MetaError>;
    /// Takes an active migration over for `owner` if its beat is still `seen_beat` (its owner
    /// stopped renewing); whether it was taken.
    async fn claim_migration(
        &self,
        migration_id: &str,
        owner: &str,
        seen_beat: i64,
    ) -> Result<bool, MetaError>;
    /// Asks the owner of an active migration to cancel it; false when it is not active.
    async fn request_cancel(&self, migration_id: &str) -> Result<bool, MetaError>;
    /// The durable high-water mark of a coordinator's clock (0 for a new coordinator).
    /// Stores (replaces) the checkpoint of `checkpoint.stream_id`.
    async fn store_stream_checkpoint(&self, checkpoint: &StreamCheckpoint)
    -> Result<(), MetaError>;
    /// The checkpoints of the streams `migration_id` drives.
    async fn stream_checkpoints(
        &self,
        migration_id: &str,
    ) -> Result<Vec<StreamCheckpoint>, MetaError>;
    /// Forgets the checkpoints of the streams `migration_id` drives (it ended).
    async fn delete_stream_checkpoints(&self, migration_id: &str) -> Result<(), MetaError>;
    /// Records (replaces) the last repair of each range, in one transaction.
    async fn record_range_repairs(&self, repairs: &[RangeRepair]) -> Result<(), MetaError>;
    /// Every range repair recorded, by range start.
    async fn range_repairs(&self) -> Result<Vec<RangeRepair>, MetaError>;
    /// Records (replaces) the keys repair `repair_id` compared and fixed so far.
    async fn record_repair_counts(
        &self,
        repair_id: &str,
        keys_compared: u64,
        keys_fixed: u64,
    ) -> Result<(), MetaError>;
    /// The keys repair `repair_id` compared and fixed; (0, 0) before it recorded any.
    async fn repair_counts(&self, repair_id: &str) -> Result<(u64, u64), MetaError>;
    async fn load_clock(&self, coordinator_id: &str) -> Result<u64, MetaError>;
    /// Raises the durable high-water mark (never lowers it).
    async fn store_clock(&self, coordinator_id: &str, high_water: u64) -> Result<(), MetaError>;
}
