//! Hinted handoff (SEMANTICS.md, "Hinted handoff").
//!
//! - [`HintWriter`]: the write path hands it one hint per replica that missed a write; a task
//!   stores them in the metadata store in batches (whatever queued up while the last batch was
//!   being written, up to [`BATCH`]); a batch the store refused is tried again (backing off)
//!   until it is stored or the writer is drained past its deadline.
//! - [`HintWriter::drain`] (SIGTERM): waits for the write path's stragglers (replica calls still
//!   running after a reply, which may still produce hints), then closes the queue and waits for
//!   the writer task to store every queued hint and end, up to a deadline. The writer task and
//!   the stragglers are owned by the writer's trackers, so nothing of it runs after a drain
//!   that returned in time.
//! - A hint that cannot be kept (the queue is full, the store refused its batch to the end, or
//!   the drain ran out of time to store it) becomes a repair marker on the key's other replicas
//!   (`RecordRepairMarkers`, fsynced there), which survive this coordinator; anti-entropy
//!   repairs those keys first. Counted: `pairdb_hints_dropped_total{reason}` for hints not
//!   stored, `pairdb_repair_markers_recorded_total` for markers recorded, and
//!   `pairdb_hints_lost_total` for misses neither stored nor marked (no other replica took the
//!   marker), which only a full anti-entropy pass finds.
//! - [`spawn_replay`]: every interval, for each target with hints: hints past the max window or
//!   the max attempts are dropped, each leaving a repair marker (the targeted repair of
//!   `anti_entropy::targeted` fixes the key once the target is up); the rest are delivered in
//!   batches (`WriteBatch` with source HINT) to targets the ring knows and gossip does not
//!   report down, and each batch is deleted only after the target acknowledged it. A failed
//!   delivery counts one attempt per hint and waits for the next round. Hints of a deleted
//!   tenant's namespace (stored in the instant of its delete) are dropped, not delivered
//!   (`pairdb_hints_dropped_total{reason="tenant_deleted"}`); the target would refuse them
//!   anyway once the namespace is fenced there.
//! - A hint whose target the ring knows but which no longer owns its key (not a natural or
//!   pending owner at the tenant's write RF: a topology or RF change moved the key away) is not
//!   delivered there, where a cleanup would drop it: it is stored again for each node a write
//!   of the key goes to now, and deleted (`pairdb_hints_retargeted_total`). Topology changes
//!   hand such hints on when they commit (`topology::handoff`); this catches the rest (a
//!   leader that died between its commit and deleting them, a hint stored after the hand-off,
//!   a replica an RF lowering took out of the key's set). The owners that already hold the
//!   write take the copy as a no-op.
//! - A delivery carries the registry epoch its placement rests on (`ring_epoch`: the older of
//!   the ring's and the tenant record's), so a target whose cleanup fenced an older ring
//!   refuses it (`STALE_RING`) instead of taking a record into a range it dropped; the replay
//!   reads the registry again and places those hints anew in its next round, counting no
//!   attempt.
//!
//! Replaying is idempotent on the storage side (a record never replaces a version that
//! dominates it), so two coordinators replaying the same hint, or a replay racing a newer
//! write, never rolls a key back.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::meta::{Hint, MetaError, MetadataStore};
use crate::rpc::storage as pb;

use crate::ring::NodeId;

use super::ring_view::RingView;
use super::storage_pool::StoragePool;

/// Hints stored or delivered per round trip.
pub const BATCH: usize = 256;
/// Hints waiting to be stored; beyond this the write path drops them (and counts them).
const QUEUE: usize = 100_000;

fn now_ms() -> i64 {
    crate::wallclock::now_ms() as i64
}

/// What the writer task takes: a hint and the other replicas of its key (where a marker goes
/// if it cannot be stored).
type Queued = (Hint, Vec<String>);

/// Where repair markers for hints that cannot be kept are recorded.
#[derive(Clone)]
pub struct MarkerSink {
    pub pool: Arc<StoragePool>,
    pub ring: Arc<RingView>,
    /// Bound of one `RecordRepairMarkers` call.
    pub timeout: Duration,
}

/// Share of the drain timeout kept for recording markers after storing gave up.
const MARKER_SHARE: u32 = 4;

/// First wait before storing a refused batch again; doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Attempts to store one batch while the writer is not draining.
const STORE_ATTEMPTS: u32 = 5;

/// Queues hints for durable storage.
#[derive(Clone)]
pub struct HintWriter {
    sender: Option<mpsc::Sender<Queued>>,
    markers: Option<MarkerSink>,
    /// The writer task (one, while hints are enabled).
    work: TaskTracker,
    /// Background work of the write path that may still produce hints.
    stragglers: TaskTracker,
    /// Cancelled by [`HintWriter::drain`]: the queue takes nothing more, the writer stores
    /// what is queued and ends.
    closing: CancellationToken,
    /// Set by [`HintWriter::drain`]: refused batches are retried until this deadline.
    drain_deadline: Arc<parking_lot::Mutex<Option<Instant>>>,
}

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Hints still queued when the deadline passed (counted as dropped).
    pub lost: usize,
}

impl HintWriter {
    /// A writer that drops nothing it is given: hints go to `store` in batches. `None` when
    /// hints are disabled: [`HintWriter::hint`] then only counts the missed write.
    /// `markers`: where hints that cannot be kept are recorded instead (`None`: they are only
    /// counted).
    pub fn start(store: Option<Arc<dyn MetadataStore>>, markers: Option<MarkerSink>) -> HintWriter {
        let drain_deadline: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
        let work = TaskTracker::new();
        let closing = CancellationToken::new();
        let Some(store) = store else {
            return HintWriter {
                sender: None,
                markers: None,
                work,
                stragglers: TaskTracker::new(),
                closing,
                drain_deadline,
            };
        };
        let (sender, mut receiver) = mpsc::channel::<Queued>(QUEUE);
        let deadline = drain_deadline.clone();
        let sink = markers.clone();
        let closed = closing.clone();
        work.spawn(async move {
            let mut queued = Vec::with_capacity(BATCH);
            let mut closed_now = false;
            loop {
                let received = tokio::select! {
                    received = receiver.recv_many(&mut queued, BATCH) => received,
                    () = closed.cancelled(), if !closed_now => {
                        // What is queued is still received, then nothing.
                        receiver.close();
                        closed_now = true;
                        continue;
                    }
                };
                if received == 0 {
                    return;
                }
                let (batch, holders): (Vec<Hint>, Vec<Vec<String>>) = queued.drain(..).unzip();
                if !store_batch(&*store, &batch, &deadline).await {
                    let unkept: Vec<_> = batch.into_iter().zip(holders).collect();
                    record_markers(sink.as_ref(), &unkept).await;
                }
            }
        });
        HintWriter {
            sender: Some(sender),
            markers,
            work,
            stragglers: TaskTracker::new(),
            closing,
            drain_deadline,
        }
    }

    /// Whether missed writes become hints (false when hints are disabled).
    pub fn keeps_hints(&self) -> bool {
        self.sender.is_some()
    }

    /// Records that `target` missed `record`; `replicas` are the key's write replicas (the
    /// others get a repair marker if the hint cannot be kept).
    pub fn hint(&self, target: &str, record: &pb::Record, replicas: &[NodeId]) {
        metrics::counter!("pairdb_replica_misses_total").increment(1);
        let Some(sender) = &self.sender else {
            return;
        };
        let others: Vec<String> = replicas
            .iter()
            .filter(|r| r.as_str() != target)
            .map(|r| r.as_str().to_owned())
            .collect();
        let hint = Hint {
            id: 0,
            target_node: target.to_owned(),
            tenant_id: record.tenant_id.clone(),
            record: record.encode_to_vec(),
            created_at_ms: now_ms(),
            attempts: 0,
        };
        if let Err(refused) = sender.try_send((hint, others)) {
            let reason = match refused {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "shutdown",
            };
            tracing::warn!(target, tenant = %record.tenant_id, reason, "hint not queued; recording a repair marker instead");
            metrics::counter!("pairdb_hints_dropped_total", "reason" => reason).increment(1);
            let unkept = refused.into_inner();
            let sink = self.markers.clone();
            self.stragglers.spawn(async move {
                record_markers(sink.as_ref(), &[unkept]).await;
            });
        }
    }

    /// Runs write-path work that may still produce hints (replica calls finishing after the
    /// reply); [`HintWriter::drain`] waits for it.
    pub fn spawn_straggler<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.stragglers.spawn(work);
    }

    /// Hints queued and not yet stored.
    pub fn queued(&self) -> usize {
        self.sender
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }

    /// Stores every hint queued or still to come from running stragglers, waiting at most
    /// `timeout`; the writer task has ended when it returns in time. Call once the server
    /// stopped taking requests.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        let deadline = Instant::now() + timeout;
        // Storing gives up early enough to leave time for markers of what it could not store.
        *self.drain_deadline.lock() = Some(deadline - timeout / MARKER_SHARE);
        self.stragglers.close();
        let _ = tokio::time::timeout_at(deadline, self.stragglers.wait()).await;
        self.closing.cancel();
        self.work.close();
        if tokio::time::timeout_at(deadline, self.work.wait())
            .await
            .is_ok()
        {
            return Drained { lost: 0 };
        }
        let lost = self.queued();
        if lost > 0 {
            tracing::error!(
                lost,
                "shutdown: hints not stored before the drain deadline; those keys need repair"
            );
            metrics::counter!("pairdb_hints_dropped_total", "reason" => "shutdown")
                .increment(lost as u64);
        }
        Drained { lost }
    }
}

/// Stores one batch, trying again with backoff while the store refuses it: up to
/// [`STORE_ATTEMPTS`] times, or until the drain deadline once draining (an attempt still
/// running then is abandoned; one that lands anyway only duplicates hints, which replay
/// tolerates). False when it gave up.
async fn store_batch(
    store: &dyn MetadataStore,
    batch: &[Hint],
    drain_deadline: &parking_lot::Mutex<Option<Instant>>,
) -> bool {
    let past_deadline = || drain_deadline.lock().is_some_and(|d| Instant::now() >= d);
    let mut wait = RETRY_FIRST;
    let mut attempt = 1;
    loop {
        let result = if past_deadline() {
            Err(MetaError::Unavailable(
                "the drain deadline passed".to_owned(),
            ))
        } else {
            let mut call = std::pin::pin!(store.store_hints(batch));
            loop {
                match tokio::time::timeout(DEADLINE_CHECK, &mut call).await {
                    Ok(result) => break result,
                    Err(_) if past_deadline() => {
                        break Err(MetaError::Unavailable(
                            "the drain deadline passed while storing".to_owned(),
                        ));
                    }
                    Err(_) => {}
                }
            }
        };
        match result {
            Ok(()) => {
                metrics::counter!("pairdb_hints_stored_total").increment(batch.len() as u64);
                return true;
            }
            Err(e) => {
                let draining = *drain_deadline.lock();
                let give_up = match draining {
                    Some(deadline) => Instant::now() + wait >= deadline,
                    None => attempt >= STORE_ATTEMPTS,
                };
                if give_up {
                    tracing::error!(error = %e, hints = batch.len(), "cannot store hints; recording repair markers instead");
                    metrics::counter!("pairdb_hints_dropped_total", "reason" => "store_failed")
                        .increment(batch.len() as u64);
                    return false;
                }
                tracing::warn!(error = %e, hints = batch.len(), attempt, "storing hints failed; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
                attempt += 1;
            }
        }
    }
}

/// How often a store call that has not finished checks the drain deadline.
const DEADLINE_CHECK: Duration = Duration::from_millis(100);

/// Records a repair marker for each hint on the other replicas of its key (grouped per node,
/// one call each). A hint no other replica took a marker for is counted as lost.
async fn record_markers(sink: Option<&MarkerSink>, unkept: &[(Hint, Vec<String>)]) {
    record_markers_via(sink.map(|s| (&*s.ring, &*s.pool, s.timeout)), unkept).await;
}

/// A durable record that `target` missed `record` (a read repair that could not be sent, a
/// hint that expired): a repair marker on the other nodes of the key's ring walk, which the
/// targeted repair works off as soon as `target` is up.
pub async fn mark_missed(
    ring: &RingView,
    pool: &StoragePool,
    timeout: Duration,
    missed: Vec<(String, pb::Record)>,
) {
    let unkept: Vec<(Hint, Vec<String>)> = missed
        .into_iter()
        .map(|(target, record)| {
            let others = marker_holders(ring, &target, &record);
            let hint = Hint {
                id: 0,
                tenant_id: record.tenant_id.clone(),
                record: record.encode_to_vec(),
                target_node: target,
                created_at_ms: now_ms(),
                attempts: 0,
            };
            (hint, others)
        })
        .collect();
    record_markers_via(Some((ring, pool, timeout)), &unkept).await;
}

/// Where a marker for `target` missing `record` is kept: the first nodes after the key's
/// position other than `target` (the key's other replicas at RF 3; any node keeps a marker
/// durably, and the targeted repair reads the key from its real owners).
fn marker_holders(ring: &RingView, target: &str, record: &pb::Record) -> Vec<String> {
    let position = crate::ring::key_position(&record.tenant_id, &record.key);
    ring.snapshot()
        .ring
        .natural_owners(position, MARKER_COPIES + 1)
        .into_iter()
        .filter(|n| n.as_str() != target)
        .take(MARKER_COPIES)
        .map(|n| n.as_str().to_owned())
        .collect()
}

/// Nodes a marker is recorded on.
const MARKER_COPIES: usize = 2;

async fn record_markers_via(
    sink: Option<(&RingView, &StoragePool, Duration)>,
    unkept: &[(Hint, Vec<String>)],
) {
    // One marker per hint (an undecodable hint has none), and which hints each node gets.
    let markers: Vec<Option<pb::RepairMarker>> = unkept
        .iter()
        .map(|(hint, _)| {
            let record = pb::Record::decode(hint.record.as_slice()).ok()?;
            Some(pb::RepairMarker {
                tenant_id: record.tenant_id,
                key: record.key,
                missed_node: hint.target_node.clone(),
                version: record.version,
            })
        })
        .collect();
    let mut per_node: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, (_, others)) in unkept.iter().enumerate() {
        if markers[i].is_some() {
            for node in others {
                per_node.entry(node.as_str()).or_default().push(i);
            }
        }
    }
    let mut marked = vec![false; unkept.len()];
    if let Some((ring, pool, timeout)) = sink {
        let snapshot = ring.snapshot();
        for (node, hints) in per_node {
            let Some(address) = snapshot.address(node) else {
                continue;
            };
            let Ok(mut client) = pool.client(node, address) else {
                continue;
            };
            let call = client.record_repair_markers(pb::RepairMarkersRequest {
                markers: hints.iter().filter_map(|i| markers[*i].clone()).collect(),
            });
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(_)) => {
                    metrics::counter!("pairdb_repair_markers_recorded_total")
                        .increment(hints.len() as u64);
                    for i in hints {
                        marked[i] = true;
                    }
                }
                Ok(Err(status)) => {
                    tracing::warn!(node, error = %status.message(), "repair markers refused")
                }
                Err(_) => tracing::warn!(node, "repair markers timed out"),
            }
        }
    }
    let lost = marked.iter().filter(|m| !**m).count();
    if lost > 0 {
        tracing::error!(
            lost,
            "missed writes neither hinted nor marked; only a full repair finds them"
        );
        metrics::counter!("pairdb_hints_lost_total").increment(lost as u64);
    }
}

/// The nodes a write of one key goes to, and the registry epoch that placement rests on (the
/// older of the ring's and the tenant record's; a fenced node refuses a delivery older than
/// its fence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    pub nodes: Vec<String>,
    pub epoch: u64,
}

/// Limits of the replay loop.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    pub interval: Duration,
    pub max_window: Duration,
    pub max_attempts: u32,
    pub timeout: Duration,
}

/// Runs the replay loop as a task of `tasks` until the role stops (a round that started
/// finishes: each batch is deleted only after its delivery was acknowledged).
pub fn spawn_replay(
    store: Arc<dyn MetadataStore>,
    ring: Arc<RingView>,
    pool: Arc<StoragePool>,
    owners: Arc<super::Coordinator>,
    limits: ReplayLimits,
    tasks: &crate::shutdown::Tasks,
) {
    super::periodic::spawn_every(limits.interval, tasks, move || {
        let (store, ring, pool, owners) =
            (store.clone(), ring.clone(), pool.clone(), owners.clone());
        async move {
            let hinted = Hinted {
                store: &*store,
                ring: &ring,
                pool: &pool,
                owners: Some(&*owners),
            };
            if let Err(e) = replay_round(hinted, limits).await {
                tracing::warn!(error = %e, "hint replay round failed");
            }
        }
    });
}

/// What a replay works with.
#[derive(Clone, Copy)]
pub struct Hinted<'a> {
    pub store: &'a dyn MetadataStore,
    pub ring: &'a RingView,
    pub pool: &'a StoragePool,
    /// Who a hinted key's writes go to now (its ring and tenants); `None`: every hint goes
    /// to its target, owner or not.
    pub owners: Option<&'a super::Coordinator>,
}

/// One pass over every target with hints.
pub async fn replay_round(hinted: Hinted<'_>, limits: ReplayLimits) -> Result<(), MetaError> {
    let store = hinted.store;
    let counts = store.hint_counts().await?;
    let mut pending = 0;
    for (target, count) in &counts {
        metrics::gauge!("pairdb_hints_pending", "target" => target.clone()).set(*count as f64);
        pending += count;
    }
    metrics::gauge!("pairdb_hints_pending_total").set(pending as f64);
    let mut oldest_age_s = 0.0f64;
    for (target, _) in counts {
        if let Some(oldest) = store.hints_for(&target, 1).await?.first() {
            let age_s = (now_ms() - oldest.created_at_ms).max(0) as f64 / 1e3;
            oldest_age_s = oldest_age_s.max(age_s);
        }
        replay_target(hinted, &target, limits).await?;
    }
    // The backlog's age: how long the oldest undelivered hint has waited (0: none waits).
    metrics::gauge!("pairdb_hints_oldest_age_seconds").set(oldest_age_s);
    Ok(())
}

/// Delivers the hints for one target (skipped while gossip reports it down).
pub async fn replay_target(
    hinted: Hinted<'_>,
    target: &str,
    limits: ReplayLimits,
) -> Result<(), MetaError> {
    let Hinted {
        store, ring, pool, ..
    } = hinted;
    let oldest_kept = now_ms() - limits.max_window.as_millis() as i64;
    // Hints of a deleted tenant stored in the instant of its delete are dropped, not replayed.
    let deleted: HashSet<String> = store
        .deleted_tenants()
        .await?
        .into_iter()
        .map(|d| d.storage_id)
        .collect();
    loop {
        let hints = store.hints_for(target, BATCH as u32).await?;
        let fetched = hints.len();
        let (dead, hints): (Vec<Hint>, Vec<Hint>) = hints
            .into_iter()
            .partition(|h| of_deleted_tenant(&deleted, h));
        if !dead.is_empty() {
            let ids: Vec<i64> = dead.iter().map(|h| h.id).collect();
            store.delete_hints(&ids).await?;
            metrics::counter!("pairdb_hints_dropped_total", "reason" => "tenant_deleted")
                .increment(ids.len() as u64);
            tracing::debug!(
                target,
                dropped = ids.len(),
                "hints of deleted tenants dropped"
            );
        }
        let (expired, live): (Vec<Hint>, Vec<Hint>) = hints
            .into_iter()
            .partition(|h| h.created_at_ms < oldest_kept || h.attempts >= limits.max_attempts);
        if !expired.is_empty() {
            let ids: Vec<i64> = expired.iter().map(|h| h.id).collect();
            // Those keys need repair: a marker each, worked off once the target is up.
            let unkept: Vec<(Hint, Vec<String>)> = expired
                .into_iter()
                .filter_map(|h| {
                    let record = pb::Record::decode(h.record.as_slice()).ok()?;
                    let others = marker_holders(ring, target, &record);
                    Some((h, others))
                })
                .collect();
            record_markers_via(Some((ring, pool, limits.timeout)), &unkept).await;
            store.delete_hints(&ids).await?;
            tracing::warn!(
                target,
                dropped = ids.len(),
                "hints past the max window or attempts dropped; those keys need repair"
            );
            metrics::counter!("pairdb_hints_dropped_total", "reason" => "expired")
                .increment(ids.len() as u64);
        }
        if live.is_empty() {
            if fetched < BATCH {
                return Ok(());
            }
            continue;
        }
        let snapshot = ring.snapshot();
        let Some(address) = snapshot.address(target) else {
            return Ok(());
        };
        // Whether the target is up or not: a key it lost is not its to wait for.
        let (live, epoch) = retarget_moved(hinted, target, live, snapshot.epoch).await?;
        if live.is_empty() {
            if fetched < BATCH {
                return Ok(());
            }
            continue;
        }
        if !ring.accepts_writes(target) {
            return Ok(());
        }
        let ids: Vec<i64> = live.iter().map(|h| h.id).collect();
        let mut records = Vec::with_capacity(live.len());
        for hint in &live {
            match pb::Record::decode(hint.record.as_slice()) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::error!(hint = hint.id, error = %e, "undecodable hint dropped");
                    store.delete_hints(&[hint.id]).await?;
                }
            }
        }
        let delivered = match pool.client(target, address) {
            Ok(client) => deliver(client, records, epoch, limits.timeout).await,
            Err(e) => Err(DeliveryError::from(e)),
        };
        match delivered {
            Ok(()) => {
                store.delete_hints(&ids).await?;
                metrics::counter!("pairdb_hints_replayed_total").increment(ids.len() as u64);
                tracing::debug!(target, hints = ids.len(), "hints replayed");
            }
            Err(DeliveryError::StaleRing) => {
                // Not the hints' fault: read the registry again; the next round places them
                // on it (they may have moved to other owners).
                ring.refused_as_stale(epoch);
                tracing::info!(
                    target,
                    epoch,
                    "hint replay refused as placed on a stale ring"
                );
                if let Err(e) = ring.refresh().await {
                    tracing::warn!(error = %e, "cannot read the registry again");
                }
                return Ok(());
            }
            Err(e) => {
                store.record_hint_attempt(&ids).await?;
                tracing::debug!(target, error = %e, "hint delivery failed; will retry");
                return Ok(());
            }
        }
        if fetched < BATCH {
            return Ok(());
        }
    }
}

/// Of `hints` for `target` (a node the ring knows), stores those whose key `target` no longer
/// owns again for the key's current write owners and deletes them; returns the others, and
/// the registry epoch their delivery rests on (the oldest placement among them; `ring_epoch`,
/// the ring's, for hints whose owners are not known).
async fn retarget_moved(
    hinted: Hinted<'_>,
    target: &str,
    hints: Vec<Hint>,
    ring_epoch: u64,
) -> Result<(Vec<Hint>, u64), MetaError> {
    let Some(owners) = hinted.owners else {
        return Ok((hints, ring_epoch));
    };
    let mut keep = Vec::with_capacity(hints.len());
    let mut epoch = ring_epoch;
    let mut moved = Vec::new();
    let mut copies = Vec::new();
    for hint in hints {
        let Ok(record) = pb::Record::decode(hint.record.as_slice()) else {
            keep.push(hint);
            continue;
        };
        match owners.write_owners(&record.tenant_id, &record.key).await {
            Some(now) if !now.nodes.iter().any(|n| n == target) => {
                copies.extend(now.nodes.into_iter().map(|owner| Hint {
                    id: 0,
                    target_node: owner,
                    attempts: 0,
                    ..hint.clone()
                }));
                moved.push(hint.id);
            }
            Some(now) => {
                epoch = epoch.min(now.epoch);
                keep.push(hint);
            }
            None => keep.push(hint),
        }
    }
    if !moved.is_empty() {
        // Copies first: a crash in between leaves both, which only delivers twice.
        hinted.store.store_hints(&copies).await?;
        hinted.store.delete_hints(&moved).await?;
        tracing::info!(
            target,
            hints = moved.len(),
            copies = copies.len(),
            "hints for keys their target no longer owns sent to the keys' owners instead"
        );
        metrics::counter!("pairdb_hints_retargeted_total").increment(moved.len() as u64);
    }
    Ok((keep, epoch))
}

/// Whether the hint holds a record of a deleted tenant's namespace (an undecodable one is
/// left to the replay, which drops it with its own message).
fn of_deleted_tenant(deleted: &HashSet<String>, hint: &Hint) -> bool {
    !deleted.is_empty()
        && pb::Record::decode(hint.record.as_slice()).is_ok_and(|r| deleted.contains(&r.tenant_id))
}

/// Why hints could not be delivered to their target (they stay queued).
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("bad address: {0}")]
    BadAddress(#[from] super::storage_pool::BadAddress),
    #[error("{0}")]
    Refused(String),
    /// The target's ring fence is above the epoch the delivery rests on (`STALE_RING`).
    #[error("refused as placed on a stale ring")]
    StaleRing,
    #[error("timed out")]
    TimedOut,
}

/// Sends `records` to a target in batches of at most `rpc::WRITE_BATCH_BYTES`, each within `timeout`,
/// tagged with the registry `epoch` their placement rests on.
async fn deliver(
    mut client: crate::rpc::storage::storage_node_client::StorageNodeClient<
        crate::rpc::auth::InternalChannel,
    >,
    records: Vec<pb::Record>,
    epoch: u64,
    timeout: Duration,
) -> Result<(), DeliveryError> {
    for batch in crate::rpc::byte_batches(records, crate::rpc::WRITE_BATCH_BYTES) {
        let call = client.write_batch(pb::WriteBatchRequest {
            records: batch,
            source: pb::BatchSource::Hint as i32,
            ring_digest: 0,
            ring_epoch: epoch,
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(status))
                if crate::rpc::detail::storage_code(&status) == pb::ErrorCode::StaleRing =>
            {
                return Err(DeliveryError::StaleRing);
            }
            Ok(Err(status)) => return Err(DeliveryError::Refused(status.message().to_owned())),
            Err(_) => return Err(DeliveryError::TimedOut),
        }
    }
    Ok(())
}
