//! Changing a tenant's replication factor (SEMANTICS.md, "Replication-factor change"), up or
//! down. Raising: new replicas receive a copy of every key; reads and write acks use the old
//! replica set until the copy completed, writes go to the union meanwhile. Lowering: the
//! replicas that stay receive every old replica's records, so they hold the newest version of
//! every key; until then reads, writes and acks keep the old (larger) replica set.
//!
//! How: the change is a migration record (`replication_factor_change`, target RF) in the
//! metadata store. Every coordinator re-reads active migrations and changed tenants every
//! `metadata_refresh` ([`spawn_refresh`]) and writes a tenant's keys at `max(RF, target)`; the
//! walk that places replicas makes the old owners a prefix of the new ones, so that is the
//! union. After waiting long enough for every coordinator to write to the union, the
//! coordinator that accepted the change scans every storage node's records of the tenant and
//! sends each to the owners it gains (`WriteBatch` REPAIR: never rolls a newer version back),
//! then sets the tenant's RF and marks the migration completed. Reads switch to the new RF
//! only then. A node that does not answer or refuses for now (restarting, cut off, disk full)
//! has its records copied again from its first, with backoff, for up to `COPY_RETRY_WINDOW`
//! (2 min). A failed copy marks the migration failed and leaves the RF as it was; a copy cut
//! short by a restart resumes when a coordinator starts, or is taken over by another one
//! ([`super::lease`]).
//!
//! Invariant: a read at the new RF never misses a key written before: every key either was on
//! an old owner when the scan passed (and was copied) or was written after every coordinator
//! wrote to the union (for a lowering, the union is the old set itself).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prost::Message;

use crate::meta::{MetaError, Migration, MigrationKind, MigrationState, Tenant};
use crate::ring::NodeId;
use crate::ring::plan::{self, Proposed};
use crate::rpc::common;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::admission;
use super::errors::CoordError;
use super::lease::{Interrupted, LeaseGuard};

/// What an RF change's copy did: records sent, records scanned, bytes sent.
#[derive(Debug, Clone, Copy, Default)]
struct Copied {
    records: u64,
    scanned: u64,
    bytes: u64,
}

/// Records per scan batch and per copy batch.
const BATCH: u32 = 1000;
/// How long the copy keeps trying one node again after errors before the change fails.
const COPY_RETRY_WINDOW: Duration = Duration::from_secs(120);

/// Target RFs of the tenants whose replication factor is being raised.
#[derive(Default)]
pub struct PendingRf {
    targets: RwLock<HashMap<String, u32>>,
}

impl PendingRf {
    /// The RF writes for `tenant` use: the target while a raise is in progress.
    pub fn write_rf(&self, tenant: &Tenant) -> u32 {
        self.targets
            .read()
            .get(&tenant.tenant_id)
            .map_or(tenant.replication_factor, |t| {
                (*t).max(tenant.replication_factor)
            })
    }

    pub fn is_pending(&self, tenant_id: &str) -> bool {
        self.targets.read().contains_key(tenant_id)
    }

    fn set(&self, targets: HashMap<String, u32>) {
        *self.targets.write() = targets;
    }

    fn insert(&self, tenant_id: &str, target: u32) {
        self.targets.write().insert(tenant_id.to_owned(), target);
    }
}

/// Keeps pending RF changes and changed tenants current, every `every`, until the role stops.
pub fn spawn_refresh(core: Arc<Coordinator>, every: Duration) {
    let tasks = core.tasks.clone();
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            if let Err(e) = refresh(&core, every).await {
                tracing::warn!(error = %e, "cannot re-read tenants and migrations");
            }
        }
    });
}

/// Migrations first, then tenants: a raise finishes by setting the tenant's RF before marking
/// the migration completed, so a change that has left the pending set is always seen with its
/// new RF.
async fn refresh(core: &Coordinator, every: Duration) -> Result<(), MetaError> {
    let targets = core
        .meta
        .active_migrations()
        .await?
        .into_iter()
        .filter(|m| m.kind == MigrationKind::ReplicationFactorChange)
        .map(|m| (m.subject, m.target_rf))
        .collect();
    // A generous window: another coordinator's wall clock stamped the change.
    let since = crate::wallclock::now_ms() as i64 - (every.as_millis() as i64) * 5 - 10_000;
    let changed = core.meta.tenants_updated_since(since).await?;
    core.pending_rf.set(targets);
    // Deleted incarnations are served no more, by incarnation, not by time (clocks differ);
    // a re-created one is put back just below.
    core.tenants
        .forget_deleted(&core.meta.deleted_tenants().await?);
    for tenant in changed {
        core.tenants.put(tenant);
    }
    Ok(())
}

impl Coordinator {
    /// Carries on an RF change left in progress by a coordinator that stopped.
    pub(super) fn resume_rf_change(self: &Arc<Self>, m: Migration) {
        self.pending_rf.insert(&m.subject, m.target_rf);
        tracing::info!(migration = %m.migration_id, tenant = %m.subject, "resuming a replication-factor change");
        self.clone().spawn_copy(m);
    }

    /// Starts moving `tenant`'s RF to `target` (up or down); returns the migration's id.
    pub async fn change_replication_factor(
        self: &Arc<Self>,
        tenant: &Tenant,
        target: u32,
    ) -> Result<String, CoordError> {
        let migration = Migration {
            target_rf: target,
            ..Migration::begin(
                format!("rf-{}", uuid::Uuid::new_v4()),
                MigrationKind::ReplicationFactorChange,
                tenant.tenant_id.clone(),
                MigrationState::InProgress,
            )
        };
        self.meta.create_migration(&migration).await?;
        let proposed = Proposed::RfChange {
            tenant: &tenant.tenant_id,
        };
        if let Err(busy) =
            admission::still_alone(self.meta.as_ref(), Some(&migration), proposed).await
        {
            let reason = busy.to_string();
            self.meta
                .fail_migration(&migration.migration_id, &reason)
                .await?;
            return Err(CoordError::NodeInUse(reason));
        }
        self.pending_rf.insert(&tenant.tenant_id, target);
        let id = migration.migration_id.clone();
        self.clone().spawn_copy(migration);
        Ok(id)
    }

    fn spawn_copy(self: Arc<Self>, migration: Migration) {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let id = migration.migration_id.clone();
            let Some(lease) = self.take_lease(&id).await else {
                return;
            };
            // Every coordinator writes to the union before the scan starts.
            tokio::select! {
                () = tokio::time::sleep(self.options.metadata_refresh * 2 + Duration::from_secs(1)) => {}
                () = lease.lost_signal() => return,
            }
            let result = self.copy_to_replicas(&migration, &lease).await;
            let cancelled = lease.cancel_requested() || self.cancel_requested(&id).await;
            let finished = match result {
                Ok(progress) if !cancelled => self.finish_rf_change(&migration, progress).await,
                Err(Interrupted::Lost) => {
                    tracing::warn!(migration = %id, "replication-factor change left to the coordinator that took it over");
                    Ok(())
                }
                Ok(progress) => self.cancel_rf_change(&migration, progress).await,
                Err(Interrupted::Cancelled) => {
                    self.cancel_rf_change(&migration, Copied::default()).await
                }
                Err(Interrupted::Failed(e) | Interrupted::Transient(e)) => {
                    tracing::error!(migration = %id, error = %e, "replication-factor change failed; the RF stays as it was");
                    self.meta.fail_migration(&id, &e).await
                }
            };
            if let Err(e) = finished {
                tracing::error!(migration = %id, error = %e, "cannot record the end of a replication-factor change");
            }
            self.pending_rf.targets.write().remove(&migration.subject);
        });
    }

    /// Records a cancelled RF change: the RF stays as it was (the copies made stay too; the
    /// next cleanup drops them).
    async fn cancel_rf_change(&self, m: &Migration, progress: Copied) -> Result<(), MetaError> {
        tracing::warn!(migration = %m.migration_id, tenant = %m.subject, "replication-factor change cancelled; the RF stays as it was");
        self.meta
            .update_migration(
                &m.migration_id,
                MigrationState::Cancelled,
                progress.records,
                progress.scanned,
                progress.bytes,
            )
            .await
    }

    /// Sets the new RF, then marks the migration completed (in that order; see [`refresh`]).
    async fn finish_rf_change(&self, m: &Migration, progress: Copied) -> Result<(), MetaError> {
        self.meta
            .update_replication_factor(&m.subject, m.target_rf)
            .await?;
        self.tenants.invalidate(&m.subject);
        self.meta
            .update_migration(
                &m.migration_id,
                MigrationState::Completed,
                progress.records,
                progress.scanned,
                progress.bytes,
            )
            .await?;
        tracing::info!(migration = %m.migration_id, tenant = %m.subject, rf = m.target_rf, copied = progress.records, "replication factor changed");
        Ok(())
    }

    /// Brings the replicas of the new RF up to date. Raising: every record of the tenant goes
    /// to the owners the new RF adds. Lowering: every old replica sends each of its records to
    /// the replicas that remain (except itself), so the remaining ones hold the newest version
    /// of every key before the leaving ones stop being read (a write that reached only the
    /// leaving replicas is not lost).
    async fn copy_to_replicas(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
    ) -> Result<Copied, Interrupted> {
        let tenant = self
            .meta
            .get_tenant(&m.subject)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("tenant {:?} is gone", m.subject))?;
        let old_rf = tenant.replication_factor as usize;
        // The records and placement of the tenant's current incarnation.
        let namespace = tenant.storage_id();
        // The registry as it is now, not this coordinator's view of it (which may lag): the
        // copies go to the owners of the ring the change runs on, and carry its epoch.
        let registry = self.meta.registry().await.map_err(|e| e.to_string())?;
        let snapshot = super::ring_view::Snapshot::new(registry);
        let epoch = super::write::placed_epoch(&snapshot, &tenant);
        let run = CopyRun {
            m,
            snapshot: &snapshot,
            namespace: &namespace,
            old_rf,
            epoch,
            lease,
        };
        let mut progress = Copied::default();
        for node in &snapshot.nodes {
            // A node that is restarting, cut off for a while or briefly full must not fail the
            // change: its records are copied again from its first (copies are repairs, so a
            // second one changes nothing), for as long as the lease holds and at most
            // `COPY_RETRY_WINDOW`.
            let started = Instant::now();
            let mut backoff = Duration::from_millis(100);
            let before = progress;
            loop {
                match self.copy_from(&run, node, &mut progress).await {
                    Ok(()) => break,
                    Err(CopyError::Interrupted(e)) => return Err(e),
                    Err(CopyError::Unreachable(e)) if started.elapsed() < COPY_RETRY_WINDOW => {
                        tracing::warn!(migration = %m.migration_id, node = %node.node_id, error = %e, "replication-factor change: copying again from a node after an error");
                        progress = before;
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = lease.lost_signal() => {}
                        }
                        lease.check()?;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(CopyError::Unreachable(e)) => return Err(Interrupted::Failed(e)),
                }
            }
        }
        Ok(progress)
    }

    /// Sends each record of `run`'s tenant that `node` holds to the owners it gains.
    async fn copy_from(
        &self,
        run: &CopyRun<'_>,
        node: &crate::meta::NodeRecord,
        progress: &mut Copied,
    ) -> Result<(), CopyError> {
        let Some(address) = run.snapshot.address(&node.node_id) else {
            return Ok(());
        };
        let unreachable =
            |what: &str, s: tonic::Status| CopyError::from_status(what, &node.node_id, s);
        let mut client = self
            .pool
            .client(&node.node_id, address)
            .map_err(|e| CopyError::Interrupted(Interrupted::Failed(e.to_string())))?;
        let mut stream = client
            .scan_range(spb::ScanRangeRequest {
                range: Some(common::HashRange { start: 0, end: 0 }),
                batch_size: BATCH,
                keys_only: false,
            })
            .await
            .map_err(|s| unreachable("scan of", s))?
            .into_inner();
        while let Some(batch) = stream
            .message()
            .await
            .map_err(|s| unreachable("scan of", s))?
        {
            run.lease.check().map_err(CopyError::Interrupted)?;
            let mut gained: HashMap<NodeId, Vec<spb::Record>> = HashMap::new();
            for record in batch
                .records
                .into_iter()
                .filter(|r| r.tenant_id == run.namespace)
            {
                progress.scanned += 1;
                let placed = |rf: usize| {
                    self.ring
                        .plan(run.snapshot, run.namespace, &record.key, rf)
                        .map(|p| p.write_replicas())
                        .map_err(|e| CopyError::Interrupted(Interrupted::Failed(e.to_string())))
                };
                let old = placed(run.old_rf)?;
                let new = placed(run.m.target_rf as usize)?;
                let holder = NodeId::new(node.node_id.clone());
                for target in plan::rf_copy_targets(&old, &new, &holder) {
                    gained.entry(target).or_default().push(record.clone());
                }
            }
            for (target, records) in gained {
                let address = run.snapshot.address(target.as_str()).ok_or_else(|| {
                    CopyError::Interrupted(Interrupted::Failed(format!(
                        "{} is not in the registry",
                        target.as_str()
                    )))
                })?;
                let n = records.len() as u64;
                let bytes: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
                self.pool
                    .client(target.as_str(), address)
                    .map_err(|e| CopyError::Interrupted(Interrupted::Failed(e.to_string())))?
                    .write_batch(spb::WriteBatchRequest {
                        records,
                        source: spb::BatchSource::Repair as i32,
                        ring_digest: 0,
                        ring_epoch: run.epoch,
                    })
                    .await
                    .map_err(|s| CopyError::from_status("copy to", target.as_str(), s))?;
                progress.records += n;
                progress.bytes += bytes;
            }
            self.meta
                .update_migration(
                    &run.m.migration_id,
                    MigrationState::InProgress,
                    progress.records,
                    progress.scanned,
                    progress.bytes,
                )
                .await
                .map_err(|e| CopyError::Interrupted(Interrupted::Failed(e.to_string())))?;
        }
        Ok(())
    }
}

/// What one RF change's copy works with.
struct CopyRun<'a> {
    m: &'a Migration,
    /// The registry the copy runs on.
    snapshot: &'a super::ring_view::Snapshot,
    /// The tenant's current incarnation.
    namespace: &'a str,
    old_rf: usize,
    /// The epoch the copies are placed on (`WriteBatchRequest.ring_epoch`).
    epoch: u64,
    lease: &'a LeaseGuard,
}

/// Why copying one node's records stopped.
enum CopyError {
    /// A node did not answer or refused for now (down, cut off, disk full): copy again.
    Unreachable(String),
    /// The change cannot go on this way (or was cancelled, or taken over).
    Interrupted(Interrupted),
}

impl CopyError {
    /// A storage RPC's error: a refusal that another try cannot change (bad request, a ring
    /// older than the node's fence) ends the change; any other is worth another try.
    fn from_status(what: &str, node: &str, status: tonic::Status) -> CopyError {
        let message = format!("{what} {node}: {}", status.message());
        if crate::rpc::detail::refused_for_good(&status) {
            CopyError::Interrupted(Interrupted::Failed(message))
        } else {
            CopyError::Unreachable(message)
        }
    }
}
