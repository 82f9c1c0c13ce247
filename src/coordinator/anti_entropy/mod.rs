//! Anti-entropy repair (SEMANTICS.md, "Anti-entropy"; docs/anti-entropy.md): every ring range
//! of every tenant is compared across its replicas through the storage nodes' range hash
//! trees, and each replica is sent the newest version of every key that differs
//! ([`compare`]).
//!
//! A repair is a migration of kind `repair` (subject `*`, or any of `tenant=<id>`, `node=<id>`
//! and `range=<start>-<end>` joined by commas), so it
//! has what migrations have: one coordinator runs it under a lease, another takes it over when
//! that one dies, an operator cancels it, and `pairdb admin migrations` shows its progress
//! (for a repair, `keys_migrated` counts (tenant, range) pairs done of `total_keys`, and
//! `bytes_migrated` the bytes exchanged). A repair goes tenant by tenant: every range of a
//! tenant is compared in one pass ([`compare::compare_and_fix`]), so each node scans a
//! tenant once per repair however many of its ranges differ. It starts on demand (`POST /v1/admin/repair`) and
//! every `repair_interval` ([`spawn_auto_repair`]). Keys a replica is known to have missed
//! (repair markers) are fixed sooner, as soon as it is up ([`targeted`]).
//!
//! Invariants:
//! - One repair at a time in the cluster (so one repairer per range): a second is refused
//!   with NODE_IN_USE naming the first; of two started at once the younger backs out.
//! - A repair runs against one ring: it does not start while a node change is in progress,
//!   and ends `failed` if the registry changes under it (the next cycle starts over).
//! - Each replica of a tenant's range is told the range was repaired as of the repair's start
//!   (minus the request timeout and the allowed clock skew) only when every replica answered
//!   and every difference was fixed: its compactions may then purge the tombstones written
//!   before that, once past gc_grace (`storage::repaired_ranges`). A range of an RF 1 tenant
//!   has nothing to compare and is marked too.
//! - The status of a range (`range_repairs`) is recorded only by a repair of every tenant, and
//!   counts as complete only when every replica of every tenant answered and every difference
//!   was fixed. Tenants whose replication factor is changing are skipped (incomplete). A
//!   repair limited to an arc compares each ring range it overlaps over the overlap only, and
//!   records the status of the ring ranges the arc covers whole.

pub mod compare;
pub mod targeted;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::meta::{Migration, MigrationKind, MigrationState, NodeRecord, RangeRepair, Tenant};
use crate::ring::{HashRange, NodeId, NodeState};
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::errors::CoordError;
use super::lease::{Interrupted, LeaseGuard};
use compare::{Compared, Pace, RangeWork, Replica, compare_and_fix};

/// The subject of a repair of everything.
const EVERYTHING: &str = "*";

/// What a repair is limited to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairScope {
    pub tenant: Option<String>,
    pub node: Option<String>,
    /// Only the positions of this arc.
    pub range: Option<HashRange>,
}

impl RepairScope {
    /// The migration subject naming this scope.
    pub fn subject(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.tenant {
            parts.push(format!("tenant={t}"));
        }
        if let Some(n) = &self.node {
            parts.push(format!("node={n}"));
        }
        if let Some(r) = &self.range {
            parts.push(format!("range={}-{}", r.start, r.end));
        }
        if parts.is_empty() {
            EVERYTHING.to_owned()
        } else {
            parts.join(",")
        }
    }

    /// The scope a subject names (anything unknown in it is ignored: a wider repair).
    pub fn parse(subject: &str) -> Self {
        let mut scope = Self::default();
        for part in subject.split(',') {
            if let Some(t) = part.strip_prefix("tenant=") {
                scope.tenant = Some(t.to_owned());
            } else if let Some(n) = part.strip_prefix("node=") {
                scope.node = Some(n.to_owned());
            } else if let Some(r) = part.strip_prefix("range=") {
                scope.range = r.split_once('-').and_then(|(start, end)| {
                    Some(HashRange::new(start.parse().ok()?, end.parse().ok()?))
                });
            }
        }
        scope
    }

    /// What a repair of this scope compares of each of `ranges` (the ring's): (index of the
    /// ring range, arc), in ring order. Without an arc in the scope, every range whole.
    fn targets(&self, ranges: &[HashRange]) -> Vec<(usize, HashRange)> {
        ranges
            .iter()
            .enumerate()
            .flat_map(|(i, range)| match &self.range {
                None => vec![(i, *range)],
                Some(arc) => range
                    .intersection(arc)
                    .into_iter()
                    .map(|piece| (i, piece))
                    .collect(),
            })
            .collect()
    }

    /// What the repair covers, for its acceptance message.
    fn describe(&self) -> String {
        let mut what = "the ranges".to_owned();
        if let Some(n) = &self.node {
            what.push_str(&format!(" node {n} replicates"));
        }
        if let Some(r) = &self.range {
            what.push_str(&format!(" within [{}, {})", r.start, r.end));
        }
        match &self.tenant {
            Some(t) => what.push_str(&format!(" of tenant {t}")),
            None => what.push_str(" of every tenant"),
        }
        what
    }
}

/// What a repair did so far.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    ranges_done: u64,
    ranges: u64,
    compared: Compared,
    incomplete_ranges: u64,
}

impl Coordinator {
    /// Starts a repair of `scope`: 202 material, or NODE_IN_USE while a repair or a node
    /// change runs, TENANT_NOT_FOUND / NODE_NOT_FOUND for an unknown scope.
    pub async fn start_repair(
        self: &Arc<Self>,
        scope: RepairScope,
    ) -> Result<pb::RepairAccepted, CoordError> {
        if let Some(t) = &scope.tenant {
            self.tenant(t).await?;
        }
        let registered = self.meta.list_nodes().await?;
        if let Some(n) = &scope.node {
            registered
                .iter()
                .find(|r| &r.node_id == n && r.state == NodeState::Active)
                .ok_or_else(|| CoordError::NodeNotFound(n.clone()))?;
        }
        refuse_during_node_change(&registered)?;
        if let Some(running) = self.running_repair(None).await? {
            return Err(CoordError::NodeInUse(format!(
                "repair {} is running; one repair runs at a time",
                running.migration_id
            )));
        }
        let migration = Migration::begin(
            format!("repair-{}", uuid::Uuid::new_v4()),
            MigrationKind::Repair,
            scope.subject(),
            MigrationState::InProgress,
        );
        self.meta.create_migration(&migration).await?;
        // Two started at once both see none; the younger backs out.
        if let Some(older) = self.running_repair(Some(&migration)).await? {
            let why = format!(
                "repair {} started at the same time; one repair runs at a time",
                older.migration_id
            );
            self.meta
                .fail_migration(&migration.migration_id, &why)
                .await?;
            return Err(CoordError::NodeInUse(why));
        }
        let repair_id = migration.migration_id.clone();
        tracing::info!(repair = %repair_id, subject = %migration.subject, "repair accepted");
        self.clone().spawn_repair(migration);
        Ok(pb::RepairAccepted {
            repair_id,
            message: format!("comparing {} across its replicas", scope.describe()),
        })
    }

    /// The active repair other than `me` that started before it (any, without `me`).
    async fn running_repair(
        &self,
        me: Option<&Migration>,
    ) -> Result<Option<Migration>, CoordError> {
        Ok(self
            .meta
            .active_migrations()
            .await?
            .into_iter()
            .filter(|m| m.kind == MigrationKind::Repair)
            .find(|m| {
                me.is_none_or(|me| {
                    m.migration_id != me.migration_id
                        && (m.started_at_ms, &m.migration_id) < (me.started_at_ms, &me.migration_id)
                })
            }))
    }

    /// Carries on a repair left in progress by a coordinator that stopped (from the start).
    pub(super) fn resume_repair(self: &Arc<Self>, m: Migration) {
        tracing::info!(repair = %m.migration_id, "resuming a repair");
        self.clone().spawn_repair(m);
    }

    fn spawn_repair(self: Arc<Self>, migration: Migration) {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let id = migration.migration_id.clone();
            let Some(lease) = self.take_lease(&id).await else {
                return;
            };
            let mut progress = Progress::default();
            let result = self.run_repair(&migration, &lease, &mut progress).await;
            let p = progress;
            let end = |state| {
                self.meta.update_migration(
                    &id,
                    state,
                    p.ranges_done,
                    p.ranges,
                    p.compared.bytes,
                )
            };
            let recorded = match result {
                Ok(()) => {
                    tracing::info!(repair = %id, ranges = p.ranges, incomplete = p.incomplete_ranges, keys_compared = p.compared.keys_compared, keys_fixed = p.compared.keys_fixed, bytes = p.compared.bytes, bytes_written = p.compared.bytes_written, "repair completed");
                    end(MigrationState::Completed).await
                }
                Err(Interrupted::Lost) => {
                    tracing::warn!(repair = %id, "repair left to the coordinator that took it over");
                    Ok(())
                }
                Err(Interrupted::Cancelled) => {
                    tracing::warn!(repair = %id, "repair cancelled; what it fixed stays fixed");
                    end(MigrationState::Cancelled).await
                }
                Err(Interrupted::Failed(e) | Interrupted::Transient(e)) => {
                    tracing::error!(repair = %id, error = %e, "repair failed");
                    self.meta.fail_migration(&id, &e).await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(repair = %id, error = %e, "cannot record the end of a repair");
            }
        });
    }

    async fn run_repair(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
        progress: &mut Progress,
    ) -> Result<(), Interrupted> {
        let scope = RepairScope::parse(&m.subject);
        let failed = |e: CoordError| Interrupted::Transient(e.to_string());
        let registry = self.meta.registry().await.map_err(|e| failed(e.into()))?;
        refuse_during_node_change(&registry.nodes)
            .map_err(|e| Interrupted::Failed(e.to_string()))?;
        // The ring compared on is the registry just read, not this coordinator's view of it
        // (which may lag); its epoch must hold until each tenant's ranges are marked.
        let planned = registry.epoch;
        let snapshot = super::ring_view::Snapshot::new(registry);
        let ring = &snapshot.ring;
        let ranges = ring.member_ranges();
        let targets = scope.targets(&ranges);
        let tenants: Vec<Tenant> = self
            .meta
            .tenants_updated_since(0)
            .await
            .map_err(|e| failed(e.into()))?
            .into_iter()
            .filter(|t| scope.tenant.as_ref().is_none_or(|s| *s == t.tenant_id))
            .collect();
        progress.ranges = (targets.len() * tenants.len()) as u64;
        let mut pace = Pace::new(self.options.repair_rate_limit);
        let started_ms = crate::wallclock::now_ms() as i64;
        let as_of = self.repaired_as_of(started_ms);
        // Per ring range: what comparing it did, whether every tenant's comparison was
        // complete, and whether all of it was compared for every tenant (a node scope skips
        // ranges the node does not replicate, an arc those it does not cover whole).
        let mut done = vec![Compared::default(); ranges.len()];
        let mut complete = vec![true; ranges.len()];
        // Of each ring range, the positions the scope's arcs cover.
        let mut compared = vec![0u128; ranges.len()];
        for (i, arc) in &targets {
            if let Some(w) = compared.get_mut(*i) {
                *w += arc.width();
            }
        }
        let mut covered: Vec<bool> = ranges
            .iter()
            .zip(&compared)
            .map(|(r, w)| scope.tenant.is_none() && *w == r.width())
            .collect();
        for tenant in &tenants {
            lease.check()?;
            let now = self.meta.registry().await.map_err(|e| failed(e.into()))?;
            if now.epoch != planned {
                return Err(Interrupted::Failed(
                    "the node registry or a replication factor changed during the repair; the \
                     next one starts over"
                        .to_owned(),
                ));
            }
            if self.pending_rf.is_pending(&tenant.tenant_id) {
                complete.iter_mut().for_each(|c| *c = false);
                progress.ranges_done += targets.len() as u64;
                continue;
            }
            // The arcs of this tenant to compare, with their ring range's index and owners.
            let mut works = Vec::new();
            let mut which = Vec::new();
            for &(i, arc) in &targets {
                let owners = ring.natural_owners(arc.start, tenant.replication_factor as usize);
                if let Some(node) = &scope.node {
                    if !owners.contains(&NodeId::new(node.clone())) {
                        if let Some(c) = covered.get_mut(i) {
                            *c = false;
                        }
                        continue;
                    }
                }
                let replicas = self.replicas(&snapshot, &owners);
                works.push(RangeWork::new(arc, replicas));
                which.push((i, owners));
            }
            let stop = || lease.check().is_err();
            // The records of the tenant's current incarnation (predecessors are purged, never
            // repaired).
            compare_and_fix(&tenant.storage_id(), &mut works, &mut pace, &stop).await;
            // Cancelled or taken over in the middle: nothing of this tenant counts as repaired,
            // and a cancelled repair's record keeps the keys it fixed.
            if let Err(stopped) = lease.check() {
                if matches!(stopped, Interrupted::Cancelled) {
                    for work in &works {
                        add(&mut progress.compared, work.done);
                    }
                    self.record_counts(m, progress).await?;
                }
                return Err(stopped);
            }
            // Each owner of a range every replica of which answered and got fixed learns it
            // was repaired (its tombstones written before `as_of` may then go).
            let mut marks: BTreeMap<String, Vec<spb::RepairedRange>> = BTreeMap::new();
            for (work, (i, owners)) in works.iter().zip(&which) {
                if let Some(d) = done.get_mut(*i) {
                    add(d, work.done);
                }
                let whole = work.failure.is_none() && work.replicas.len() == owners.len();
                if let Some(e) = &work.failure {
                    tracing::warn!(repair = %m.migration_id, tenant = %tenant.tenant_id, range = ?work.range, error = %e, "range not repaired");
                }
                if !whole {
                    if let Some(c) = complete.get_mut(*i) {
                        *c = false;
                    }
                    continue;
                }
                for owner in owners {
                    marks
                        .entry(owner.as_str().to_owned())
                        .or_default()
                        .push(spb::RepairedRange {
                            tenant_id: tenant.storage_id(),
                            range: Some(work.range.into()),
                            repaired_as_of_ms: as_of,
                        });
                }
            }
            if !marks.is_empty() && !self.may_mark(planned).await {
                // Not marked: nothing counts as repaired for tombstones yet.
                metrics::counter!("pairdb_repair_marks_withheld_total").increment(1);
                tracing::info!(repair = %m.migration_id, tenant = %tenant.tenant_id, "ranges not marked repaired: the registry moved since the repair read it, or nodes may still hold ranges they gave away (no cleanup since the last change), so no tombstone may go yet");
                marks.clear();
            }
            if !self.mark_repaired(&snapshot, marks).await {
                for (i, _) in &which {
                    if let Some(c) = complete.get_mut(*i) {
                        *c = false;
                    }
                }
            }
            progress.ranges_done += targets.len() as u64;
            for (_, work) in which.iter().zip(&works) {
                add(&mut progress.compared, work.done);
            }
            self.record_counts(m, progress).await?;
            self.meta
                .update_migration(
                    &m.migration_id,
                    MigrationState::InProgress,
                    progress.ranges_done,
                    progress.ranges,
                    progress.compared.bytes,
                )
                .await
                .map_err(|e| failed(e.into()))?;
        }
        let mut statuses = Vec::new();
        for (i, range) in ranges.iter().enumerate() {
            let (d, whole) = (
                done.get(i).copied().unwrap_or_default(),
                complete.get(i).copied().unwrap_or(false),
            );
            if compared.get(i).is_some_and(|w| *w > 0) {
                record_metrics(&d);
            }
            if !whole {
                progress.incomplete_ranges += 1;
            }
            if covered.get(i).copied().unwrap_or(false) {
                statuses.push(RangeRepair {
                    range: *range,
                    repaired_at_ms: started_ms,
                    keys_compared: d.keys_compared,
                    keys_fixed: d.keys_fixed,
                    complete: whole,
                });
            }
        }
        self.meta
            .record_range_repairs(&statuses)
            .await
            .map_err(|e| failed(e.into()))?;
        Ok(())
    }

    /// Records the keys the repair compared and fixed so far (`GET /v1/admin/repair/{id}`).
    async fn record_counts(&self, m: &Migration, progress: &Progress) -> Result<(), Interrupted> {
        self.meta
            .record_repair_counts(
                &m.migration_id,
                progress.compared.keys_compared,
                progress.compared.keys_fixed,
            )
            .await
            .map_err(|e| Interrupted::Transient(CoordError::from(e).to_string()))
    }

    /// The time a repair that began at `started_ms` vouches for: every tombstone written
    /// before it was on every replica the repair compared. Earlier than the start by the
    /// longest a write can still be on its way (the request timeout) and the clock skew
    /// coordinators allow, so a write timestamped before it cannot land after the comparison.
    fn repaired_as_of(&self, started_ms: i64) -> u64 {
        let margin = self.options.request_timeout + self.options.max_clock_skew;
        (started_ms.max(0) as u64).saturating_sub(margin.as_millis() as u64)
    }

    /// Whether ranges compared on the ring of registry epoch `planned` may count as repaired
    /// for tombstones: the registry is still at that epoch (the replicas compared are still
    /// every owner), and no node may hold records of ranges it gave away
    /// ([`crate::meta::Leftovers`]: such a copy is one no repair compares; a later change
    /// could give the range back to its holder after the tombstones were purged, and the old
    /// value would return). False when the store cannot tell.
    async fn may_mark(&self, planned: u64) -> bool {
        match self.meta.leftovers().await {
            Ok(leftovers) => leftovers.registry_epoch == planned && !leftovers.may_exist(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether a cleanup is pending; ranges not marked repaired");
                false
            }
        }
    }

    /// Tells each owner which of its tenants' ranges were repaired; false if one did not
    /// record it (its tombstones then wait for the next repair).
    async fn mark_repaired(
        &self,
        snapshot: &super::ring_view::Snapshot,
        repaired: BTreeMap<String, Vec<spb::RepairedRange>>,
    ) -> bool {
        let mut all = true;
        for (node, ranges) in repaired {
            let Some(address) = snapshot.address(&node) else {
                all = false;
                continue;
            };
            let call = match self.pool.client(&node, address) {
                Ok(mut client) => client
                    .mark_repaired(spb::MarkRepairedRequest {
                        ranges,
                        ring_epoch: snapshot.epoch,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = call {
                tracing::warn!(node = %node, error = %e, "cannot record repaired ranges; its tombstones wait for the next repair");
                all = false;
            }
        }
        all
    }

    /// The owners that answer (not marked down), with their clients.
    fn replicas(&self, snapshot: &super::ring_view::Snapshot, owners: &[NodeId]) -> Vec<Replica> {
        owners
            .iter()
            .filter(|o| !self.ring.is_down(o.as_str()))
            .filter_map(|o| {
                let address = snapshot.address(o.as_str())?;
                let client = self.pool.client(o.as_str(), address).ok()?;
                Some(Replica {
                    node: o.as_str().to_owned(),
                    client,
                    ring_epoch: snapshot.epoch,
                })
            })
            .collect()
    }
}

fn add(total: &mut Compared, c: Compared) {
    total.keys_compared += c.keys_compared;
    total.keys_fixed += c.keys_fixed;
    total.bytes += c.bytes;
    total.bytes_written += c.bytes_written;
}

fn record_metrics(c: &Compared) {
    metrics::counter!("pairdb_repair_keys_compared_total").increment(c.keys_compared);
    metrics::counter!("pairdb_repair_keys_fixed_total").increment(c.keys_fixed);
    metrics::counter!("pairdb_repair_bytes_total").increment(c.bytes);
    metrics::counter!("pairdb_repair_ranges_total").increment(1);
}

/// NODE_IN_USE while a node joins or leaves: ranges are moving, and trees compared then
/// would disagree about data still in flight.
fn refuse_during_node_change(registered: &[NodeRecord]) -> Result<(), CoordError> {
    match registered
        .iter()
        .find(|n| matches!(n.state, NodeState::Bootstrapping | NodeState::Draining))
    {
        Some(n) => Err(CoordError::NodeInUse(format!(
            "node {} is {}: a repair waits for node changes to end",
            n.node_id,
            n.state.as_str()
        ))),
        None => Ok(()),
    }
}

/// For the repair status and `/metrics`: the seconds since the oldest last complete repair
/// among the ranges of the current ring, and how many of them were never completely repaired
/// (their age is unknown: they count here, not in the age).
pub fn oldest_unrepaired(
    ranges: &[crate::ring::HashRange],
    repairs: &[RangeRepair],
    now_ms: i64,
) -> (f64, usize) {
    let mut oldest = 0i64;
    let mut never = 0usize;
    for range in ranges {
        let at = repairs
            .iter()
            .filter(|r| r.range == *range && r.complete)
            .map(|r| r.repaired_at_ms)
            .max();
        match at {
            Some(at) => oldest = oldest.max(now_ms - at),
            None => never += 1,
        }
    }
    (oldest.max(0) as f64 / 1000.0, never)
}

impl Coordinator {
    /// Repair `repair_id`: its migration and the keys it compared and fixed so far.
    /// MIGRATION_NOT_FOUND when the id names no repair.
    pub async fn get_repair(&self, repair_id: &str) -> Result<pb::RepairRun, CoordError> {
        let m = self
            .meta
            .get_migration(repair_id)
            .await?
            .filter(|m| m.kind == MigrationKind::Repair)
            .ok_or_else(|| CoordError::MigrationNotFound(repair_id.to_owned()))?;
        let (keys_compared, keys_fixed) = self.meta.repair_counts(repair_id).await?;
        Ok(pb::RepairRun {
            migration: Some(super::admin::migration_to_pb(m)),
            keys_compared,
            keys_fixed,
        })
    }

    /// The last repair of each range of the current ring.
    pub async fn repair_status(&self) -> Result<pb::RepairStatus, CoordError> {
        let ranges = self.ring.snapshot().ring.member_ranges();
        let repairs = self.meta.range_repairs().await?;
        let now = crate::wallclock::now_ms() as i64;
        let (oldest, never) = oldest_unrepaired(&ranges, &repairs, now);
        metrics::gauge!("pairdb_repair_oldest_unrepaired_seconds").set(oldest);
        metrics::gauge!("pairdb_repair_ranges_never_repaired").set(never as f64);
        let ranges = ranges
            .iter()
            .map(|range| {
                let last = repairs.iter().find(|r| r.range == *range);
                pb::RangeRepairStatus {
                    range: Some((*range).into()),
                    last_repaired_at: last
                        .map(|r| super::admin::rfc3339(r.repaired_at_ms))
                        .unwrap_or_default(),
                    keys_compared: last.map_or(0, |r| r.keys_compared),
                    keys_fixed: last.map_or(0, |r| r.keys_fixed),
                    complete: last.is_some_and(|r| r.complete),
                }
            })
            .collect();
        Ok(pb::RepairStatus {
            ranges,
            oldest_unrepaired_seconds: oldest,
            ranges_never_repaired: never as u32,
        })
    }
}

/// Starts a repair of everything every `interval` (measured from the start of the last one,
/// or from this coordinator's start when there was none), checking every `every`, until the
/// role stops. One that cannot
/// start (a repair or node change running) is tried at the next check.
pub fn spawn_auto_repair(core: Arc<Coordinator>, interval: Duration, every: Duration) {
    let tasks = core.tasks.clone();
    let since_ms = crate::wallclock::now_ms() as i64;
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            match repair_due(&core, interval, since_ms).await {
                Ok(false) => {}
                Ok(true) => match core.start_repair(RepairScope::default()).await {
                    Ok(accepted) => {
                        tracing::info!(repair = %accepted.repair_id, "scheduled repair started");
                    }
                    Err(e) => tracing::info!(error = %e, "scheduled repair cannot start yet"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot tell whether a repair is due"),
            }
        }
    });
}

/// Whether no full repair started within the last `interval` (none running either); with
/// none on record, an `interval` after `since_ms` (this coordinator's start: a new cluster
/// has nothing to repair yet).
async fn repair_due(
    core: &Coordinator,
    interval: Duration,
    since_ms: i64,
) -> Result<bool, CoordError> {
    let recent = core.meta.recent_migrations(100).await?;
    let now = crate::wallclock::now_ms() as i64;
    let last = recent
        .iter()
        .filter(|m| m.kind == MigrationKind::Repair && m.subject == EVERYTHING)
        .map(|m| (m.started_at_ms, m.state))
        .max_by_key(|(at, _)| *at);
    Ok(match last {
        Some((_, MigrationState::InProgress | MigrationState::Pending)) => false,
        Some((at, _)) => now >= at + interval.as_millis() as i64,
        None => now >= since_ms + interval.as_millis() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::HashRange;

    #[test]
    fn scopes_round_trip_through_their_subject() {
        let scope =
            |tenant: Option<&str>, node: Option<&str>, range: Option<HashRange>| RepairScope {
                tenant: tenant.map(str::to_owned),
                node: node.map(str::to_owned),
                range,
            };
        let arc = Some(HashRange::new(u64::MAX - 5, 7));
        for scope in [
            RepairScope::default(),
            scope(Some("acme"), None, None),
            scope(None, Some("node-2"), None),
            scope(Some("acme"), Some("node-2"), None),
            scope(None, None, arc),
            scope(Some("acme"), Some("node-2"), arc),
        ] {
            assert_eq!(RepairScope::parse(&scope.subject()), scope);
        }
        assert_eq!(RepairScope::default().subject(), "*");
    }

    #[test]
    fn an_arc_targets_the_overlap_of_each_ring_range() {
        let ranges = [
            HashRange::new(0, 100),
            HashRange::new(100, 200),
            HashRange::new(200, 0),
        ];
        let whole = RepairScope::default().targets(&ranges);
        assert_eq!(
            whole,
            ranges.iter().copied().enumerate().collect::<Vec<_>>()
        );
        let arc = RepairScope {
            range: Some(HashRange::new(150, 50)),
            ..Default::default()
        };
        assert_eq!(
            arc.targets(&ranges),
            vec![
                (0, HashRange::new(0, 50)),
                (1, HashRange::new(150, 200)),
                (2, HashRange::new(200, 0)),
            ]
        );
    }

    #[test]
    fn the_oldest_complete_repair_counts_and_never_repaired_ranges_are_counted() {
        let a = HashRange::new(0, 10);
        let b = HashRange::new(10, 0);
        let repairs = vec![
            RangeRepair {
                range: a,
                repaired_at_ms: 9_000,
                keys_compared: 0,
                keys_fixed: 0,
                complete: true,
            },
            RangeRepair {
                range: b,
                repaired_at_ms: 9_500,
                keys_compared: 0,
                keys_fixed: 0,
                complete: false,
            },
        ];
        assert_eq!(oldest_unrepaired(&[a, b], &repairs, 10_000), (1.0, 1));
        assert_eq!(oldest_unrepaired(&[a], &repairs, 10_000), (1.0, 0));
        assert_eq!(oldest_unrepaired(&[b], &repairs, 10_000), (0.0, 1));
    }
}
