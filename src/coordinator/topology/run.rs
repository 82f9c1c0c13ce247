//! Running a topology change: plan the transfers against the ring, start the streams on the
//! senders, poll them to the end (or roll back on a timeout, a cancel or a lost lease), then
//! make the ring final. Resumable: stream ids derive from the migration, so a coordinator that
//! takes a change over polls the same streams.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::meta::{MetaError, Migration, MigrationKind, MigrationState};
use crate::ring::plan::{self};
use crate::ring::{HashRange, NodeId, NodeState};
use crate::rpc::common;
use crate::rpc::storage as spb;

use crate::coordinator::Coordinator;
use crate::coordinator::errors::CoordError;
use crate::coordinator::hints;
use crate::coordinator::lease::{Interrupted, LeaseGuard};
use crate::coordinator::stall::StallWatch;

use super::PROBE_TIMEOUT;

/// How often streams are polled and progress is recorded.
const POLL: Duration = Duration::from_millis(500);

/// One stream: the ranges one sender pushes to one receiver.
#[derive(Debug, Clone)]
pub(super) struct Transfer {
    stream_id: String,
    from: String,
    to: String,
    ranges: Vec<HashRange>,
    pub(super) estimated_keys: u64,
    keys_copied: u64,
    bytes_copied: u64,
    done: bool,
}

/// What a change's streams copied.
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
            tokio::select! {
                () = tokio::time::sleep(self.settle_time()) => {}
                () = lease.lost_signal() => return,
            }
            let streamed = self.stream_change(&migration, &lease).await;
            if lease.lost() || matches!(streamed, Err(Interrupted::Lost)) {
                tracing::warn!(migration = %id, node = %node, "topology change left to the coordinator that took it over");
                return;
            }
            // The last look at the cancel flag before the change becomes final.
            let cancelled = lease.cancel_requested() || self.cancel_requested(&id).await;
            match streamed {
                Ok(copied) if !cancelled => {
                    if let Err(e) = self.finish_change(&migration, copied).await {
                        tracing::error!(migration = %id, node = %node, error = %e, "cannot record the end of a topology change");
                    }
                }
                Ok(_) | Err(Interrupted::Cancelled) => {
                    tracing::warn!(migration = %id, node = %node, "topology change cancelled; rolling back");
                    self.undo_registration(migration.kind, &node).await;
                    let progress = self
                        .meta
                        .get_migration(&id)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(migration);
                    let recorded = self
                        .meta
                        .update_migration(
                            &id,
                            MigrationState::Cancelled,
                            progress.keys_migrated,
                            progress.total_keys,
                            progress.bytes_migrated,
                        )
                        .await;
                    if let Err(e) = recorded {
                        tracing::error!(migration = %id, error = %e, "cannot record a cancelled topology change");
                    }
                }
                Err(Interrupted::Lost) => {} // handled above
                Err(Interrupted::Failed(e)) => {
                    tracing::error!(migration = %id, node = %node, error = %e, "topology change failed; rolling back");
                    self.undo_registration(migration.kind, &node).await;
                    if let Err(e) = self.meta.fail_migration(&id, &e).await {
                        tracing::error!(migration = %id, error = %e, "cannot record a failed topology change");
                    }
                }
            }
        });
    }

    /// Switches the registry to the new topology and marks the migration completed.
    pub(super) async fn finish_change(
        &self,
        m: &Migration,
        copied: Streamed,
    ) -> Result<(), CoordError> {
        let node = m.subject.as_str();
        match m.kind {
            MigrationKind::NodeAddition => {
                self.ring.refresh().await?;
                hints::replay_target(
                    &*self.meta,
                    &self.ring,
                    &self.pool,
                    node,
                    self.options.hint_limits,
                )
                .await?;
                self.meta.set_node_state(node, NodeState::Active).await?;
            }
            _ => {
                // Before the node leaves the registry: the hand-off needs the ring it leaves.
                self.ring.refresh().await?;
                let handed = self.hand_off_hints(node).await?;
                if handed > 0 {
                    tracing::info!(
                        node,
                        hints = handed,
                        "hints of a leaving node handed to the nodes inheriting its keys"
                    );
                }
                match self.meta.remove_node(node).await {
                    // Already gone: a resumed change whose end was not recorded.
                    Ok(()) | Err(MetaError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.drop_hints_for(node).await?;
            }
        }
        self.meta
            .update_migration(
                &m.migration_id,
                MigrationState::Completed,
                copied.keys,
                copied.keys,
                copied.bytes,
            )
            .await?;
        self.ring.refresh().await?;
        tracing::info!(migration = %m.migration_id, node, kind = m.kind.as_str(), keys = copied.keys, bytes = copied.bytes, "topology change completed");
        Ok(())
    }

    /// Streams every range that changes hands; returns the keys copied. Fails when a stream
    /// fails or no stream makes progress for `topology_timeout` (the streams are stopped).
    pub(super) async fn stream_change(
        &self,
        m: &Migration,
        lease: &LeaseGuard,
    ) -> Result<Streamed, Interrupted> {
        self.ring.refresh().await.map_err(CoordError::from)?;
        let mut transfers = self.plan_transfers(&m.migration_id).await?;
        let total: u64 = transfers.iter().map(|t| t.estimated_keys).sum();
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
            for t in transfers.iter_mut().filter(|t| !t.done) {
                match self.poll_transfer(t).await {
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
                return Ok(copied);
            }
            if progress.observe((copied, done)) {
                let recorded = self
                    .meta
                    .update_migration(
                        &m.migration_id,
                        MigrationState::InProgress,
                        copied.keys,
                        total.max(copied.keys),
                        copied.bytes,
                    )
                    .await;
                match recorded {
                    Ok(()) => {}
                    // Ended elsewhere (a coordinator that took over finished it).
                    Err(MetaError::Changed(_)) => return Err(Interrupted::Lost),
                    Err(e) => return Err(e.into()),
                }
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

    /// Asks the sender where its stream is. `StartStreaming` is idempotent (a known id returns
    /// its status), so polling with it also restarts a stream that a restarted sender forgot.
    pub(super) async fn poll_transfer(&self, t: &mut Transfer) -> Result<(), PollError> {
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
            })
            .await
            .map_err(|s| PollError::Unreachable(s.message().to_owned()))?
            .into_inner();
        t.keys_copied = status.keys_copied;
        t.bytes_copied = status.bytes_copied;
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

    /// The streams the change in progress needs, planned ([`plan::plan_node_change`]) on the
    /// ring as this coordinator sees it now, for every replication factor in use; nodes that
    /// are down or do not answer do not send.
    pub(super) async fn plan_transfers(
        &self,
        migration_id: &str,
    ) -> Result<Vec<Transfer>, CoordError> {
        let before = self.ring.snapshot().ring.clone();
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
        let planned = plan::plan_node_change(&before, &rfs, can_send)
            .map_err(|r| CoordError::NodeInUse(r.to_string()))?;
        // A sender holds about min(rf, n)/n of the ring; its keys spread evenly over it.
        let members = before.member_count().max(1) as u128;
        let share = rfs.iter().max().copied().unwrap_or(1).min(members as usize) as u128;
        Ok(planned
            .transfers
            .into_iter()
            .map(|t| {
                let width: u128 = t.ranges.iter().map(HashRange::width).sum();
                let keys = u128::from(health.get(t.from.as_str()).copied().flatten().unwrap_or(0));
                let estimated_keys = ((keys * width * members / share.max(1)) >> 64) as u64;
                Transfer {
                    stream_id: format!("{migration_id}-{}-{}", t.from, t.to),
                    from: t.from.0,
                    to: t.to.0,
                    ranges: t.ranges,
                    estimated_keys,
                    keys_copied: 0,
                    bytes_copied: 0,
                    done: false,
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
