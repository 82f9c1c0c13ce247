//! Running node changes: plan the transfers against the ring, start the streams on the
//! senders, poll them to the end (or roll back on a timeout, a cancel or a lost lease), then
//! make the ring final. Resumable: stream ids derive from the migration, so a coordinator that
//! takes a change over polls the same streams.
//!
//! Several node changes may be in progress at once, accepted by one coordinator or several.
//! They are planned together against their combined final ring ([`plan::plan_combined`]) and
//! made final together: the change of the smallest node id in progress (the leader) drives
//! every stream of the combined plan and, once all completed, makes every change final in one
//! registry update (`commit_node_changes`), conditional on the registry it planned against.
//! The runners of the other changes (followers) hold their leases and act on their cancel
//! flags while they wait. When the set of changes in progress differs from the one planned (a
//! change started, completed or rolled back), the leader leaves its streams to finish, waits
//! until every coordinator sees the new ring, and plans again; leadership moves with the set.
//! Stream ids derive from the leader's migration and the set, so a set planned again polls the
//! streams it had (resumed, or already completed) rather than copying again.
//!
//! Invariants: no ring between the one before the changes and the final one ever serves reads
//! (the commit is one transaction, and only over exactly the set that was streamed); a change
//! is rolled back only while it is still in progress in the registry (a conditional update),
//! so a rollback and a commit racing each other never both land; a change whose registry state
//! shows it rolled back is never made final by a resumed runner.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::Xxh3;

use crate::meta::{
    MetaError, Migration, MigrationKind, MigrationState, NodeRecord, StreamCheckpoint,
    registry_view,
};
use crate::ring::plan;
use crate::ring::{HashRange, NodeId, NodeState, Ring};
use crate::rpc::common;
use crate::rpc::storage as spb;

use crate::coordinator::Coordinator;
use crate::coordinator::errors::CoordError;
use crate::coordinator::hints;
use crate::coordinator::lease::{Interrupted, LeaseGuard};
use crate::coordinator::ring_view::Snapshot;
use crate::coordinator::stall::StallWatch;

use super::PROBE_TIMEOUT;

/// How often streams are polled and progress is recorded.
const POLL: Duration = Duration::from_millis(500);
/// How long a node change may stand in the registry without a migration before the leader
/// takes it for an acceptance that was cut short (accepting takes a health round, seconds).
const UNRECORDED_GRACE: Duration = Duration::from_secs(30);

/// One stream: the ranges one sender pushes to one receiver.
#[derive(Debug, Clone)]
pub(super) struct Transfer {
    stream_id: String,
    from: String,
    to: String,
    ranges: Vec<HashRange>,
    /// The digest of the ring it was planned on (`StartStreamingRequest.ring_digest`).
    ring_digest: u64,
    /// The registry epoch of that ring (`StartStreamingRequest.ring_epoch`): the target's ring
    /// fence refuses the stream's batches once a cleanup fenced a later ring.
    ring_epoch: u64,
    pub(super) estimated_keys: u64,
    keys_copied: u64,
    bytes_copied: u64,
    done: bool,
    /// The last acknowledged position the sender reported (kept in the metadata store, and
    /// passed back when the stream is asked for again).
    checkpoint: Option<spb::StreamCheckpoint>,
}

/// What streams copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Streamed {
    keys: u64,
    bytes: u64,
}

pub(super) enum PollError {
    /// The stream cannot finish: the change fails.
    Failed(String),
    /// The sender did not answer this time; counts as no progress.
    Unreachable(String),
}

/// The node changes a plan is made for: (node, state), ordered by node id.
type ChangeSet = Vec<(NodeId, NodeState)>;

/// The node changes in progress in `ring`, ordered by node id.
fn changes_in(ring: &Ring) -> ChangeSet {
    let mut changes = plan::node_changes(ring);
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    changes
}

/// The registry state of a change's node while the change is in progress.
fn in_progress_state(kind: MigrationKind) -> NodeState {
    match kind {
        MigrationKind::NodeAddition => NodeState::Bootstrapping,
        _ => NodeState::Draining,
    }
}

/// Where a node change stands in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    InProgress,
    /// Made final: the added node is a member, the removed one left the registry.
    Final,
    /// Put back: the added node failed (or was forgotten), the removed one is a member again.
    RolledBack,
}

fn standing(kind: MigrationKind, node: &str, registered: &[NodeRecord]) -> Standing {
    let state = registered
        .iter()
        .find(|n| n.node_id == node)
        .map(|n| n.state);
    match (kind, state) {
        (kind, Some(state)) if state == in_progress_state(kind) => Standing::InProgress,
        (MigrationKind::NodeAddition, Some(NodeState::Failed) | None) => Standing::RolledBack,
        (MigrationKind::NodeAddition, Some(_)) => Standing::Final,
        (_, None) => Standing::Final,
        (_, Some(_)) => Standing::RolledBack,
    }
}

/// What one round of a change ended with.
enum Round {
    /// The change is final (made so here, or by the leader).
    Final,
    /// The set of changes in progress moved, or the commit lost a race: plan again.
    Replan,
}

/// Stream ids of a plan: the leader's migration id, and when several changes are planned
/// together, a digest of the set, so a set planned again streams under new ids while the same
/// set resumed polls the same streams.
fn stream_prefix(leader: &Migration, changes: &ChangeSet) -> String {
    if changes.len() == 1 {
        return leader.migration_id.clone();
    }
    let mut digest = Xxh3::new();
    for (node, state) in changes {
        digest.update(node.as_str().as_bytes());
        digest.update(&[0]);
        digest.update(state.as_str().as_bytes());
        digest.update(&[0]);
    }
    format!("{}-g{:016x}", leader.migration_id, digest.digest())
}

/// Each change's share of a plan's streams, by migration id: a stream counts for the change
/// of its receiver (a joiner), else of its sender (a leaver), else the leader's. (copied,
/// estimated keys).
fn shares(
    transfers: &[Transfer],
    migrations: &HashMap<String, Migration>,
    leader: &Migration,
) -> HashMap<String, (Streamed, u64)> {
    let mut out: HashMap<String, (Streamed, u64)> = HashMap::new();
    for t in transfers {
        let owner = migrations
            .get(&t.to)
            .or_else(|| migrations.get(&t.from))
            .unwrap_or(leader);
        let share = out.entry(owner.migration_id.clone()).or_default();
        share.0.keys += t.keys_copied;
        share.0.bytes += t.bytes_copied;
        share.1 += t.estimated_keys;
    }
    out
}

impl Coordinator {
    /// Long enough for every coordinator to have re-read the registry.
    pub(super) fn settle_time(&self) -> Duration {
        self.options.metadata_refresh * 2 + Duration::from_secs(1)
    }

    pub(super) fn spawn_change(self: Arc<Self>, migration: Migration) {
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            let id = migration.migration_id.clone();
            let node = migration.subject.clone();
            let Some(lease) = self.take_lease(&id).await else {
                return;
            };
            match self.run_change(&migration, &lease).await {
                Ok(()) => {
                    if let Err(e) = self.record_final(&migration).await {
                        tracing::error!(migration = %id, node = %node, error = %e, "cannot record the end of a topology change");
                    }
                }
                Err(Interrupted::Lost) => {
                    let ended = self.meta.get_migration(&id).await.ok().flatten();
                    if ended.is_some_and(|m| m.state == MigrationState::Completed) {
                        tracing::info!(migration = %id, node = %node, "topology change made final with the others in progress");
                    } else {
                        tracing::warn!(migration = %id, node = %node, "topology change left to the coordinator that took it over");
                    }
                }
                Err(Interrupted::Cancelled) => {
                    tracing::warn!(migration = %id, node = %node, "topology change cancelled; rolling back");
                    self.end_rolled_back(&migration, None).await;
                }
                Err(Interrupted::Failed(e) | Interrupted::Transient(e)) => {
                    tracing::error!(migration = %id, node = %node, error = %e, "topology change failed; rolling back");
                    self.end_rolled_back(&migration, Some(e)).await;
                }
            }
        });
    }

    /// Carries change `m` to the end: rounds of (wait until every coordinator sees the ring,
    /// then lead or follow the changes in progress) until it is final. A round that failed on
    /// something that may pass (the metadata store unavailable, say at the commit) is tried
    /// again, its first step being to read where the change stands (a commit that landed
    /// before its answer was lost reads as final); only after `topology_timeout` of nothing
    /// but such failures does the change fail. The lease bounds this too: a store down for
    /// long loses it, and the change is taken over once the store is back.
    async fn run_change(&self, m: &Migration, lease: &LeaseGuard) -> Result<(), Interrupted> {
        let mut unrecorded_since = HashMap::new();
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settle_time()) => {}
                () = lease.lost_signal() => return Err(Interrupted::Lost),
            }
            match self.round(m, lease, &mut unrecorded_since).await {
                Ok(Round::Final) => return Ok(()),
                Ok(Round::Replan) => failing_since = None,
                Err(Interrupted::Transient(e)) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.options.topology_timeout {
                        return Err(Interrupted::Failed(e));
                    }
                    tracing::warn!(migration = %m.migration_id, node = %m.subject, error = %e, "a round of a topology change failed on something that may pass; trying again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round of change `m`: where it stands, then lead or follow the changes in progress.
    async fn round(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
        unrecorded_since: &mut HashMap<NodeId, Instant>,
    ) -> Result<Round, Interrupted> {
        lease.check()?;
        self.ring.refresh().await.map_err(CoordError::from)?;
        let snapshot = self.ring.snapshot();
        match standing(m.kind, &m.subject, &snapshot.nodes) {
            Standing::InProgress => {}
            Standing::Final => return Ok(Round::Final),
            Standing::RolledBack => {
                return Err(Interrupted::Failed(
                    "the change was rolled back before its coordinator stopped".to_owned(),
                ));
            }
        }
        let changes = changes_in(&snapshot.ring);
        let migrations = self.change_migrations(&changes).await?;
        // The leader is a change with a migration: one without (its acceptance was cut
        // short) has no runner.
        let leads = changes
            .iter()
            .find(|(n, _)| migrations.contains_key(n.as_str()))
            .is_some_and(|(n, _)| n.as_str() == m.subject);
        if !leads {
            return self.follow(lease, &changes).await;
        }
        if self
            .unrecorded_changes(&changes, &migrations, unrecorded_since)
            .await?
        {
            return Ok(Round::Replan);
        }
        self.lead(m, lease, &changes, &migrations, &snapshot).await
    }

    /// A follower waits for the leader to make the changes final, or for the set to move.
    async fn follow(&self, lease: &LeaseGuard, changes: &ChangeSet) -> Result<Round, Interrupted> {
        loop {
            lease.check()?;
            if changes_in(&self.ring.snapshot().ring) != *changes {
                return Ok(Round::Replan);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether some change in progress has no migration (`migrations`) yet: one being
    /// accepted right now, or one whose acceptance was cut short between the registry write
    /// and the migration record. The latter has nobody to run it: once this leader has seen it
    /// so for [`UNRECORDED_GRACE`] (`since`, kept across rounds), it is rolled back.
    async fn unrecorded_changes(
        &self,
        changes: &ChangeSet,
        migrations: &HashMap<String, Migration>,
        since: &mut HashMap<NodeId, Instant>,
    ) -> Result<bool, Interrupted> {
        let unrecorded: Vec<&(NodeId, NodeState)> = changes
            .iter()
            .filter(|(n, _)| !migrations.contains_key(n.as_str()))
            .collect();
        since.retain(|n, _| unrecorded.iter().any(|(u, _)| u == n));
        let now = Instant::now();
        for (node, state) in &unrecorded {
            let seen = *since.entry(node.clone()).or_insert(now);
            if now.duration_since(seen) >= UNRECORDED_GRACE {
                let kind = match state {
                    NodeState::Bootstrapping => MigrationKind::NodeAddition,
                    _ => MigrationKind::NodeRemoval,
                };
                tracing::warn!(node = %node, state = state.as_str(), "a node change without a migration (its acceptance was cut short); rolling it back");
                self.roll_back(kind, node.as_str()).await?;
            }
        }
        Ok(!unrecorded.is_empty())
    }

    /// The leader streams every transfer of the combined plan of `changes` (planned on `snapshot`;
    /// `migrations`, the migration of each), then makes them all final. Fails when a stream
    /// fails or no stream makes progress for `topology_timeout` (the streams are stopped).
    async fn lead(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
        changes: &ChangeSet,
        migrations: &HashMap<String, Migration>,
        snapshot: &Snapshot,
    ) -> Result<Round, Interrupted> {
        let mut transfers = self
            .plan_transfers(&stream_prefix(m, changes), snapshot)
            .await?;
        let mut stored: HashMap<String, StreamCheckpoint> = self
            .meta
            .stream_checkpoints(&m.migration_id)
            .await?
            .into_iter()
            .map(|c| (c.stream_id.clone(), c))
            .collect();
        for t in &mut transfers {
            t.checkpoint = stored.remove(&t.stream_id).map(|c| spb::StreamCheckpoint {
                fingerprint: c.fingerprint,
                last_key: c.last_key.into(),
                keys: c.keys,
                bytes: c.bytes,
            });
        }
        let mut progress = StallWatch::new((Streamed::default(), 0usize));
        loop {
            if lease.lost() {
                // The coordinator that took over drives the streams now.
                return Err(Interrupted::Lost);
            }
            if lease.cancel_requested() {
                self.stop_transfers(&transfers).await;
                return Err(Interrupted::Cancelled);
            }
            if changes_in(&self.ring.snapshot().ring) != *changes {
                // The streams are left to finish, not stopped: a set planned again that was
                // planned before (this one, back after a change rolled back) polls them again
                // under the same ids, where a stopped stream would stay stopped.
                tracing::info!(migration = %m.migration_id, "the node changes in progress moved; planning again");
                return Ok(Round::Replan);
            }
            for t in transfers.iter_mut().filter(|t| !t.done) {
                match self.poll_transfer(t, &m.migration_id).await {
                    Ok(()) => {}
                    Err(PollError::Failed(e)) => {
                        self.stop_transfers(&transfers).await;
                        return Err(Interrupted::Failed(e));
                    }
                    Err(PollError::Unreachable(e)) => {
                        tracing::debug!(from = %t.from, error = %e, "stream status unavailable");
                    }
                }
            }
            let copied = Streamed {
                keys: transfers.iter().map(|t| t.keys_copied).sum(),
                bytes: transfers.iter().map(|t| t.bytes_copied).sum(),
            };
            let done = transfers.iter().filter(|t| t.done).count();
            if done == transfers.len() {
                return self.commit(m, lease, changes, migrations, &transfers).await;
            }
            if progress.observe((copied, done)) {
                self.record_progress(m, migrations, &transfers).await?;
            } else if progress.still_for() > self.options.topology_timeout {
                self.stop_transfers(&transfers).await;
                return Err(Interrupted::Failed(format!(
                    "no streaming progress for {:?}",
                    self.options.topology_timeout
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Records each change's share of the streams' progress in its migration.
    async fn record_progress(
        &self,
        leader: &Migration,
        migrations: &HashMap<String, Migration>,
        transfers: &[Transfer],
    ) -> Result<(), Interrupted> {
        for (id, (copied, estimated)) in shares(transfers, migrations, leader) {
            let recorded = self
                .meta
                .update_migration(
                    &id,
                    MigrationState::InProgress,
                    copied.keys,
                    estimated.max(copied.keys),
                    copied.bytes,
                )
                .await;
            match recorded {
                Ok(()) => {}
                // Ended elsewhere (a coordinator that took over finished it).
                Err(MetaError::Changed(_)) if id == leader.migration_id => {
                    return Err(Interrupted::Lost);
                }
                // Another change ended (rolled back): the set moves, seen at the next poll.
                Err(MetaError::Changed(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Makes every change of `changes` final in one registry update, after the last look at
    /// their cancel flags and only if the registry still holds exactly that set in progress;
    /// `Replan` when it does not (or another change's cancel is pending: its runner rolls it
    /// back). Hints for keys a node gives away (all of a leaving node's) are copied to the
    /// keys' heirs before, and dropped after; a joining node gets its hints before it becomes
    /// active.
    async fn commit(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
        changes: &ChangeSet,
        migrations: &HashMap<String, Migration>,
        transfers: &[Transfer],
    ) -> Result<Round, Interrupted> {
        if lease.cancel_requested() || self.cancel_requested(&m.migration_id).await {
            return Err(Interrupted::Cancelled);
        }
        for other in migrations.values() {
            if other.migration_id != m.migration_id
                && self.cancel_requested(&other.migration_id).await
            {
                return Ok(Round::Replan);
            }
        }
        let registered = self.meta.list_nodes().await?;
        let before = Ring::new(registered.iter().map(NodeRecord::ring_node));
        if changes_in(&before) != *changes {
            return Ok(Round::Replan);
        }
        let pick = |state: NodeState| -> Vec<String> {
            changes
                .iter()
                .filter(|(_, s)| *s == state)
                .map(|(n, _)| n.as_str().to_owned())
                .collect()
        };
        let (joiners, leavers) = (pick(NodeState::Bootstrapping), pick(NodeState::Draining));
        // Every node that gives keys away hands on the hints it holds for them: a leaving
        // node all of its keys, a staying one the ranges a joining node takes from it.
        let mut givers = leavers.clone();
        for (target, _) in self.meta.hint_counts().await? {
            if !givers.contains(&target) && !joiners.contains(&target) {
                givers.push(target);
            }
        }
        let mut handed_by_stayers = Vec::new();
        for node in &givers {
            let handed = self.hand_off_hints(node, &before).await?;
            if handed.copies > 0 {
                tracing::info!(
                    node,
                    hints = handed.originals.len(),
                    copies = handed.copies,
                    "hints for keys a node gives away copied to the nodes inheriting them"
                );
            }
            if !leavers.contains(node) {
                handed_by_stayers.extend(handed.originals);
            }
        }
        self.ring.refresh().await.map_err(CoordError::from)?;
        for node in &joiners {
            let hinted = hints::Hinted {
                store: &*self.meta,
                ring: &self.ring,
                pool: &self.pool,
                owners: Some(self),
            };
            hints::replay_target(hinted, node, self.options.hint_limits).await?;
        }
        let seen = registry_view(&registered);
        match self
            .meta
            .commit_node_changes(&seen, &joiners, &leavers)
            .await
        {
            Ok(()) => {}
            Err(MetaError::Changed(_)) => return Ok(Round::Replan),
            Err(e) => return Err(e.into()),
        }
        // This coordinator's own view follows the registry before the change reads as
        // completed: whoever sees `completed` here and lists the nodes sees them active.
        self.ring.refresh().await.map_err(CoordError::from)?;
        for node in &leavers {
            self.drop_hints_for(node).await?;
        }
        // The keys they were for are no longer their targets' (dropped at cleanup).
        for ids in handed_by_stayers.chunks(1000) {
            self.meta.delete_hints(ids).await?;
        }
        let shares = shares(transfers, migrations, m);
        for other in migrations.values() {
            let (copied, _) = shares.get(&other.migration_id).copied().unwrap_or_default();
            self.mark_completed(&other.migration_id, copied).await?;
            tracing::info!(migration = %other.migration_id, node = %other.subject, kind = other.kind.as_str(), keys = copied.keys, bytes = copied.bytes, changes = changes.len(), "topology change completed");
            // Each may have led an earlier round.
            self.forget_checkpoints(&other.migration_id).await;
        }
        Ok(Round::Final)
    }

    /// The active migration of each change in `changes`, by node id.
    async fn change_migrations(
        &self,
        changes: &ChangeSet,
    ) -> Result<HashMap<String, Migration>, MetaError> {
        Ok(self
            .meta
            .active_migrations()
            .await?
            .into_iter()
            .filter(|a| {
                matches!(
                    a.kind,
                    MigrationKind::NodeAddition | MigrationKind::NodeRemoval
                ) && changes
                    .iter()
                    .any(|(n, s)| n.as_str() == a.subject && *s == in_progress_state(a.kind))
            })
            .map(|a| (a.subject.clone(), a))
            .collect())
    }

    /// Drops the stream checkpoints of the rounds `migration_id` led (its change ended).
    async fn forget_checkpoints(&self, migration_id: &str) {
        if let Err(e) = self.meta.delete_stream_checkpoints(migration_id).await {
            tracing::warn!(migration = migration_id, error = %e, "cannot drop the stream checkpoints of an ended change");
        }
    }

    /// Records a change that is final in the registry as completed (the leader that made it
    /// final did, unless it stopped in between); a node that left loses its last hints.
    async fn record_final(&self, m: &Migration) -> Result<(), CoordError> {
        self.forget_checkpoints(&m.migration_id).await;
        if m.kind == MigrationKind::NodeRemoval {
            self.drop_hints_for(&m.subject).await?;
        }
        self.ring.refresh().await?;
        let now = self.meta.get_migration(&m.migration_id).await?;
        if let Some(now) = now.filter(|n| n.state == MigrationState::InProgress) {
            let copied = Streamed {
                keys: now.keys_migrated,
                bytes: now.bytes_migrated,
            };
            self.mark_completed(&m.migration_id, copied).await?;
        }
        Ok(())
    }

    /// Records migration `id` completed with what it copied; one that already ended (another
    /// runner recorded it) is left as it is.
    async fn mark_completed(&self, id: &str, copied: Streamed) -> Result<(), MetaError> {
        let recorded = self
            .meta
            .update_migration(
                id,
                MigrationState::Completed,
                copied.keys,
                copied.keys,
                copied.bytes,
            )
            .await;
        match recorded {
            Ok(()) | Err(MetaError::Changed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts a change's node back as it was before the change, only while the change is still
    /// in progress in the registry (a conditional update, so it never undoes a commit that won
    /// the race); returns where the change stands after.
    pub(super) async fn roll_back(
        &self,
        kind: MigrationKind,
        node: &str,
    ) -> Result<Standing, MetaError> {
        for _ in 0..16 {
            let registered = self.meta.list_nodes().await?;
            let now = standing(kind, node, &registered);
            if now != Standing::InProgress {
                self.ring.refresh().await?;
                return Ok(now);
            }
            let back = match kind {
                MigrationKind::NodeAddition => NodeState::Failed,
                _ => NodeState::Active,
            };
            match self
                .meta
                .set_node_state_if(node, back, &registry_view(&registered))
                .await
            {
                Ok(()) => {
                    self.ring.refresh().await?;
                    return Ok(Standing::RolledBack);
                }
                Err(MetaError::Changed(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(MetaError::Changed("the node registry"))
    }

    /// Rolls back a change that failed (`failure`, the reason) or was cancelled (`None`), and
    /// records how it ended; a change made final before the rollback could land is recorded
    /// completed.
    async fn end_rolled_back(&self, m: &Migration, failure: Option<String>) {
        let id = m.migration_id.as_str();
        match self.roll_back(m.kind, &m.subject).await {
            Ok(Standing::Final) => {
                tracing::info!(
                    migration = id,
                    "the change was made final before it could be rolled back; recording it completed"
                );
                if let Err(e) = self.record_final(m).await {
                    tracing::error!(migration = id, error = %e, "cannot record the end of a topology change");
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                // The lease lapses now; the coordinator that takes the change over tries again.
                tracing::error!(migration = id, error = %e, "cannot roll the node registry back");
                return;
            }
        }
        self.forget_checkpoints(id).await;
        let recorded = match failure {
            Some(reason) => self.meta.fail_migration(id, &reason).await,
            None => {
                let progress = self
                    .meta
                    .get_migration(id)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| m.clone());
                self.meta
                    .update_migration(
                        id,
                        MigrationState::Cancelled,
                        progress.keys_migrated,
                        progress.total_keys,
                        progress.bytes_migrated,
                    )
                    .await
            }
        };
        if let Err(e) = recorded {
            tracing::error!(migration = id, error = %e, "cannot record the end of a rolled-back topology change");
        }
    }

    /// Asks the sender where its stream is. `StartStreaming` is idempotent (a known id returns
    /// its status), so polling with it also restarts a stream that a restarted sender forgot.
    pub(super) async fn poll_transfer(
        &self,
        t: &mut Transfer,
        driver: &str,
    ) -> Result<(), PollError> {
        let snapshot = self.ring.snapshot();
        let address = |node: &str| {
            snapshot
                .address(node)
                .map(str::to_owned)
                .ok_or_else(|| PollError::Failed(format!("{node} left the registry")))
        };
        let (from, to) = (address(&t.from)?, address(&t.to)?);
        let mut client = self
            .pool
            .client(&t.from, &from)
            .map_err(|e| PollError::Unreachable(e.to_string()))?;
        let status = client
            .start_streaming(spb::StartStreamingRequest {
                stream_id: t.stream_id.clone(),
                ranges: t
                    .ranges
                    .iter()
                    .map(|r| common::HashRange {
                        start: r.start,
                        end: r.end,
                    })
                    .collect(),
                target_node_id: t.to.clone(),
                target_address: to,
                resume: t.checkpoint.clone(),
                dropped_tenants: self.tenants.deleted_namespaces(),
                ring_digest: t.ring_digest,
                ring_epoch: t.ring_epoch,
            })
            .await
            .map_err(|s| PollError::Unreachable(s.message().to_owned()))?
            .into_inner();
        t.keys_copied = status.keys_copied;
        t.bytes_copied = status.bytes_copied;
        if status.checkpoint.is_some() && status.checkpoint != t.checkpoint {
            self.keep_checkpoint(t, driver, status.checkpoint.clone())
                .await;
        }
        match status.state() {
            spb::StreamState::Completed => t.done = true,
            spb::StreamState::Failed | spb::StreamState::Stopped => {
                return Err(PollError::Failed(format!(
                    "stream {} from {} to {}: {}",
                    t.stream_id, t.from, t.to, status.error
                )));
            }
            _ => {}
        }
        Ok(())
    }

    /// Keeps the position a stream reported in the metadata store (a sender that lost its own
    /// checkpoint resumes from it). Not kept: logged, the stream only resumes from further back.
    async fn keep_checkpoint(
        &self,
        t: &mut Transfer,
        driver: &str,
        reported: Option<spb::StreamCheckpoint>,
    ) {
        let Some(c) = &reported else {
            return;
        };
        let kept = self
            .meta
            .store_stream_checkpoint(&StreamCheckpoint {
                stream_id: t.stream_id.clone(),
                migration_id: driver.to_owned(),
                fingerprint: c.fingerprint,
                last_key: c.last_key.to_vec(),
                keys: c.keys,
                bytes: c.bytes,
            })
            .await;
        match kept {
            Ok(()) => t.checkpoint = reported,
            Err(e) => {
                tracing::warn!(stream = %t.stream_id, error = %e, "cannot keep a stream's checkpoint");
            }
        }
    }

    pub(super) async fn stop_transfers(&self, transfers: &[Transfer]) {
        let snapshot = self.ring.snapshot();
        for t in transfers.iter().filter(|t| !t.done) {
            let Some(address) = snapshot.address(&t.from) else {
                continue;
            };
            if let Ok(mut client) = self.pool.client(&t.from, address) {
                let stop = client.stop_streaming(spb::StreamStatusRequest {
                    stream_id: t.stream_id.clone(),
                });
                if let Err(e) = tokio::time::timeout(PROBE_TIMEOUT, stop).await {
                    tracing::warn!(stream = %t.stream_id, error = %e, "cannot stop a stream");
                }
            }
        }
    }

    /// The streams of the node changes in progress in `snapshot`'s ring, planned together
    /// ([`plan::plan_combined`]) for every replication factor in use, with ids under
    /// `stream_prefix`; nodes that are down or do not answer do not send.
    pub(super) async fn plan_transfers(
        &self,
        stream_prefix: &str,
        snapshot: &Snapshot,
    ) -> Result<Vec<Transfer>, CoordError> {
        let ring = &snapshot.ring;
        let health: HashMap<String, Option<u64>> = self
            .node_health()
            .await
            .into_iter()
            .map(|(n, h)| (n.node_id, h.map(|h| h.key_estimate)))
            .collect();
        let can_send = |n: &NodeId| {
            !self.ring.is_down(n.as_str()) && matches!(health.get(n.as_str()), Some(Some(_)))
        };
        let rfs = self.replication_factors().await?;
        let planned = plan::plan_combined(ring, &rfs, can_send);
        // A sender holds about min(rf, n)/n of the ring; its keys spread evenly over it.
        let members = ring.member_count().max(1) as u128;
        let share = rfs.iter().max().copied().unwrap_or(1).min(members as usize) as u128;
        Ok(planned
            .transfers
            .into_iter()
            .map(|t| {
                let width: u128 = t.ranges.iter().map(HashRange::width).sum();
                let keys = u128::from(health.get(t.from.as_str()).copied().flatten().unwrap_or(0));
                let estimated_keys = ((keys * width * members / share.max(1)) >> 64) as u64;
                Transfer {
                    stream_id: format!("{stream_prefix}-{}-{}", t.from, t.to),
                    from: t.from.0,
                    to: t.to.0,
                    ranges: t.ranges,
                    ring_digest: ring.digest(),
                    ring_epoch: snapshot.epoch,
                    estimated_keys,
                    keys_copied: 0,
                    bytes_copied: 0,
                    done: false,
                    checkpoint: None,
                }
            })
            .collect())
    }

    /// Every replication factor tenants use or are moving to.
    pub(super) async fn replication_factors(&self) -> Result<BTreeSet<usize>, CoordError> {
        // Every tenant was updated after the epoch.
        let tenants = self.meta.tenants_updated_since(i64::MIN).await?;
        let mut rfs: BTreeSet<usize> = tenants
            .iter()
            .map(|t| self.pending_rf.write_rf(t) as usize)
            .collect();
        rfs.extend(tenants.iter().map(|t| t.replication_factor as usize));
        Ok(rfs)
    }
}
