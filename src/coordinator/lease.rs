//! Leases on migrations: exactly one coordinator carries a migration out, another takes it
//! over when that one dies, and an operator's cancel reaches whoever runs it.
//!
//! The coordinator running a migration renews its lease every [`RENEW`] (`beat` + 1, `owner` =
//! itself, `renew_migration_lease`) from a keeper task, so a long step (a major compaction, a
//! slow scan) never lets it lapse. Every coordinator watches the beats of the active
//! migrations it does not run, each `metadata_refresh`, by its own monotonic clock (never by
//! comparing wall clocks of different machines): one whose beat did not move for
//! `stale_after` is claimed with a compare-and-set on the beat it saw (of two claimants one
//! wins) and resumed there ([`take_over_stale`]). A coordinator starting up resumes the
//! migrations it owned or that nobody owns, the same way.
//!
//! Invariants: a loop that lost its lease ([`LeaseGuard::lost`]) stops without touching the
//! registry or the streams (the new owner drives them), and the store never writes over the
//! end of a migration, so a late write of a loop that lost its lease cannot undo another's
//! end. A cancel request is a flag in the store that the owner sees at its next renewal
//! ([`LeaseGuard::cancel_requested`]) and acts on at its next step. A coordinator that stops
//! (SIGTERM) counts its leases as lost: its migrations end at their next step boundary and are
//! taken over like those of a coordinator that died.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::meta::{MetaError, Migration};

use super::Coordinator;
use super::stall::StallWatch;

/// How often a running migration's lease is renewed.
pub const RENEW: Duration = Duration::from_millis(500);

/// The lease of one migration this coordinator runs; renewal stops when it is dropped.
pub struct LeaseGuard {
    id: String,
    lost: CancellationToken,
    cancel: Arc<AtomicBool>,
    stop: CancellationToken,
    running: Arc<Mutex<HashSet<String>>>,
}

impl LeaseGuard {
    /// Another coordinator holds the lease now, or the migration ended elsewhere.
    pub fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// An operator asked to cancel the migration.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Resolves when the lease is lost.
    pub async fn lost_signal(&self) {
        self.lost.cancelled().await;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop.cancel();
        self.running.lock().remove(&self.id);
    }
}

/// Why a migration's work stopped before it completed.
pub(super) enum Interrupted {
    /// It cannot finish: roll back and mark it failed, with the reason.
    Failed(String),
    /// An operator cancelled it: roll back and mark it cancelled.
    Cancelled,
    /// Another coordinator runs it now: touch nothing.
    Lost,
    /// A step failed on something that may pass (the metadata store unavailable, a write
    /// that lost a race): work that can repeat its steps tries again while its lease holds;
    /// other work treats it as `Failed`.
    Transient(String),
}

impl From<super::errors::CoordError> for Interrupted {
    fn from(e: super::errors::CoordError) -> Self {
        match e {
            super::errors::CoordError::Unavailable(_) => Interrupted::Transient(e.to_string()),
            e => Interrupted::Failed(e.to_string()),
        }
    }
}

impl From<MetaError> for Interrupted {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Unavailable(_) | MetaError::Changed(_) => {
                Interrupted::Transient(e.to_string())
            }
            e => Interrupted::Failed(e.to_string()),
        }
    }
}

impl From<super::storage_pool::BadAddress> for Interrupted {
    fn from(e: super::storage_pool::BadAddress) -> Self {
        Interrupted::Failed(e.to_string())
    }
}

impl From<String> for Interrupted {
    fn from(e: String) -> Self {
        Interrupted::Failed(e)
    }
}

impl LeaseGuard {
    /// `Lost` or `Cancelled` when the work must stop now.
    pub(super) fn check(&self) -> Result<(), Interrupted> {
        if self.lost() {
            Err(Interrupted::Lost)
        } else if self.cancel_requested() {
            Err(Interrupted::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// This coordinator's view of the leases: what it runs, and the beats it saw of the others.
#[derive(Default)]
pub struct Leases {
    running: Arc<Mutex<HashSet<String>>>,
    seen: Mutex<HashMap<String, StallWatch<i64>>>,
}

impl Leases {
    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().contains(id)
    }
}

impl Coordinator {
    /// Takes (or keeps) the lease of migration `id` and renews it in the background while the
    /// guard lives; `None` when another coordinator holds it or the migration ended.
    pub(super) async fn hold_lease(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<Option<LeaseGuard>, MetaError> {
        let Some(cancel) = self.meta.renew_migration_lease(id, &self.id).await? else {
            return Ok(None);
        };
        if !self.leases.running.lock().insert(id.to_owned()) {
            // Already run here (a resume racing a takeover): one loop is enough.
            return Ok(None);
        }
        let guard = LeaseGuard {
            id: id.to_owned(),
            lost: CancellationToken::new(),
            cancel: Arc::new(AtomicBool::new(cancel)),
            stop: CancellationToken::new(),
            running: self.leases.running.clone(),
        };
        let (lost, flag, stop) = (guard.lost.clone(), guard.cancel.clone(), guard.stop.clone());
        let core = self.clone();
        let id = id.to_owned();
        // Renewals may fail for a while (the store is down); past half the takeover delay
        // another coordinator may have taken over, so the lease counts as lost.
        let give_up = self.stale_after() / 2;
        let role_stop = self.tasks.stop().clone();
        self.tasks.spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RENEW) => {}
                    () = stop.cancelled() => return,
                    () = role_stop.cancelled() => {
                        // The role stops: the work ends at its next step, touching nothing,
                        // and the beat stands still, so another coordinator (or this one after
                        // its restart) takes the migration over.
                        tracing::info!(migration = %id, "stopping: leaving the migration to a takeover");
                        lost.cancel();
                        return;
                    }
                }
                match core.meta.renew_migration_lease(&id, &core.id).await {
                    Ok(Some(cancel)) => {
                        last_renewed = Instant::now();
                        if cancel {
                            flag.store(true, Ordering::Release);
                        }
                    }
                    Ok(None) => {
                        tracing::warn!(migration = %id, "lease lost: another coordinator runs the migration, or it ended");
                        lost.cancel();
                        return;
                    }
                    Err(e) if last_renewed.elapsed() > give_up => {
                        tracing::warn!(migration = %id, error = %e, "lease not renewed in time; leaving the migration to others");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(migration = %id, error = %e, "lease renewal failed; retrying")
                    }
                }
            }
        });
        Ok(Some(guard))
    }

    /// [`Coordinator::hold_lease`] for a migration's task: `None` (logged) when it cannot
    /// run here; another coordinator runs it or will take it over.
    pub(super) async fn take_lease(self: &Arc<Self>, id: &str) -> Option<LeaseGuard> {
        match self.hold_lease(id).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(migration = id, error = %e, "cannot take the lease of a migration; another coordinator will");
                None
            }
        }
    }

    /// How long a beat must stand still before its migration is taken over: a few refresh
    /// intervals, and never under a few renewals.
    pub(super) fn stale_after(&self) -> Duration {
        (self.options.metadata_refresh * 3).max(RENEW * 6)
    }

    /// Resumes migration `m` here (its lease is this coordinator's now).
    fn resume(self: &Arc<Self>, m: Migration) {
        use crate::meta::MigrationKind as K;
        match m.kind {
            K::ReplicationFactorChange => self.resume_rf_change(m),
            K::NodeAddition | K::NodeRemoval => self.resume_change(m),
            K::Cleanup => self.resume_cleanup(m),
            K::Repair => self.resume_repair(m),
        }
    }
}

/// At start: resumes the active migrations this coordinator owned (a restart cut them short)
/// or that nobody owns; those of other coordinators are left to [`take_over_stale`].
pub async fn resume_own(core: &Arc<Coordinator>) -> Result<(), MetaError> {
    for m in core.meta.active_migrations().await? {
        let Some(lease) = core.meta.migration_lease(&m.migration_id).await? else {
            continue;
        };
        if lease.owner.as_deref().is_some_and(|o| o != core.id) {
            continue;
        }
        if core
            .meta
            .claim_migration(&m.migration_id, &core.id, lease.beat)
            .await?
        {
            core.resume(m);
        }
    }
    Ok(())
}

/// Checks the leases of the other coordinators' migrations every `every` until the role stops
/// ([`take_over_stale`]).
pub fn spawn_watch(core: Arc<Coordinator>, every: Duration) {
    let tasks = core.tasks.clone();
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            if let Err(e) = take_over_stale(&core).await {
                tracing::warn!(error = %e, "cannot check the leases of migrations");
            }
        }
    });
}

/// Takes over every active migration whose lease stood still for `stale_after` (its owner died
/// or lost the store), as this coordinator saw it over its own checks.
pub async fn take_over_stale(core: &Arc<Coordinator>) -> Result<(), MetaError> {
    let stale_after = core.stale_after();
    let active = core.meta.active_migrations().await?;
    core.leases
        .seen
        .lock()
        .retain(|id, _| active.iter().any(|m| &m.migration_id == id));
    let stale: Vec<Migration> = active
        .into_iter()
        .filter(|m| !core.leases.is_running(&m.migration_id))
        .collect();
    for m in stale {
        let Some(lease) = core.meta.migration_lease(&m.migration_id).await? else {
            continue;
        };
        let still_for = {
            let mut seen = core.leases.seen.lock();
            let beat = seen
                .entry(m.migration_id.clone())
                .or_insert_with(|| StallWatch::new(lease.beat));
            beat.observe(lease.beat);
            beat.still_for()
        };
        if still_for < stale_after {
            continue;
        }
        if core
            .meta
            .claim_migration(&m.migration_id, &core.id, lease.beat)
            .await?
        {
            tracing::warn!(migration = %m.migration_id, kind = m.kind.as_str(), previous_owner = ?lease.owner, "taking over a migration whose coordinator stopped renewing its lease");
            core.leases.seen.lock().remove(&m.migration_id);
            core.resume(m);
        }
    }
    Ok(())
}
