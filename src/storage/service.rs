//! The `StorageNode` gRPC service over the engine. Engine calls block (fsync, file reads).
//! Reads that miss the row cache run on `spawn_blocking`. Writes run where [`WritePath`] says:
//! on a runtime with one worker (a storage-only process, the default) the worker applies them
//! itself, so the node is one event loop whose group commit takes the batches that arrived
//! during the previous sync; on a runtime with several workers (`pairdb dev`, several roles in
//! one process) they run on `spawn_blocking`, so no worker that other roles need waits on a
//! sync. Either way a write is acknowledged only after its log sync (`Engine::apply`), and
//! validation and the disk guard happen before anything touches the log.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{ApplyOutcome, Engine, EngineError, Problem, Record};
use crate::limits::{check_key, check_storage_tenant};
use crate::ring::HashRange;
use crate::rpc::auth::InternalAuth;
use crate::rpc::common;
use crate::rpc::storage as pb;
use crate::rpc::storage::storage_node_server::StorageNode;
use crate::vclock::Version;

use super::anti_entropy;
use super::background::BackgroundPool;
use super::cleanup;
use super::convert::{record_from_proto, record_to_proto};
use super::dropped_tenants::DroppedTenants;
use super::errors::{StorageError, invalid};
use super::gossip::{Gossip, Health};
use super::repair_markers::RepairMarkerLog;
use super::repaired_ranges::RepairedRanges;
use super::ring_fence::{RingFence, StaleRing};
use super::snapshots::{SnapshotInfo, Snapshots};
use super::streaming::StreamManager;
use super::throttle::Throttle;

/// Largest batch a `ScanRange` stream sends at once.
const MAX_SCAN_BATCH: usize = 1000;
/// Bytes of one scan batch (encoded), at most: a batch ends at either bound, so large values
/// never make a message the caller refuses (`rpc::MAX_MESSAGE_BYTES`).
const MAX_SCAN_BATCH_BYTES: usize = 4 << 20;
/// Batches of one `BatchStream` running at once (and answers waiting to be sent back).
const BATCH_RESULTS_QUEUE: usize = 256;
/// A stream's batch of at least this many bytes is ingested as one table
/// ([`Engine::ingest`]); a smaller one takes the write path, so small values do not leave a
/// table of a few kilobytes per batch.
const INGEST_MIN_BYTES: usize = 1 << 20;

pub struct StorageService {
    /// This service, for the tasks of a `BatchStream` (the server holds the only `Arc`).
    me: Weak<StorageService>,
    node_id: String,
    /// Requests served, for the load this node gossips.
    requests: AtomicU64,
    engine: Arc<Engine>,
    streams: StreamManager,
    gossip: Option<Arc<Gossip>>,
    /// Where client writes are applied.
    writes: WritePath,
    /// Lowered threads for what no client waits on: streams, repairs, hint replays, listings.
    background: Arc<BackgroundPool>,
    /// Keys other replicas missed without a hint (see `repair_markers`).
    markers: Arc<RepairMarkerLog>,
    /// Which tenants' ranges were repaired as of when (see `repaired_ranges`).
    repaired: Arc<RepairedRanges>,
    /// Namespaces of deleted tenants, never applied again (see `dropped_tenants`).
    dropped: Arc<DroppedTenants>,
    /// The oldest ring whose client calls this node takes (see `ring_fence`).
    fence: Arc<RingFence>,
    /// The pace of anti-entropy listings' scans (`repair_scan_rate_limit`; none: unpaced).
    listing_pace: Mutex<Option<Arc<Throttle>>>,
    /// The role's background work (streams); its stop token drains the batch streams.
    tasks: crate::shutdown::Tasks,
    /// Named snapshots of the data dir; the lock makes creates and deletes one at a time.
    snapshots: tokio::sync::Mutex<Snapshots>,
}

/// Where writes (single records and batches) are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePath {
    /// On the runtime worker that received the call. Only for a runtime with one worker: it
    /// waits for the log sync, and nothing else of this process runs meanwhile (a hand-off to
    /// a blocking thread and back costs two thread wake-ups per batch, which on the benchmark
    /// machine was ~15% of cluster PUT throughput; docs/benchmarks.md).
    Inline,
    /// On a blocking-pool thread, leaving the workers free.
    Blocking,
}

impl WritePath {
    /// `Inline` on a one-worker runtime, `Blocking` on any other (or outside a runtime).
    pub fn for_current_runtime() -> Self {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.metrics().num_workers() == 1 => Self::Inline,
            _ => Self::Blocking,
        }
    }

    async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, StorageError> {
        match self {
            Self::Inline => Ok(f()?),
            Self::Blocking => blocking(f).await,
        }
    }
}

/// Health from disk usage and the engine's problems: a failed commit log (writes refused) is
/// unhealthy, a quarantined table (a key range refused until repaired) degraded.
pub fn node_status(
    disk_percent: f64,
    thresholds: &crate::engine::DiskThresholds,
    problems: &[Problem],
) -> pb::HealthStatus {
    let worst = problems
        .iter()
        .map(|p| match p {
            Problem::CommitLogFailed(_) => pb::HealthStatus::Unhealthy,
            Problem::Quarantined(_) | Problem::ManifestDamaged(_) => pb::HealthStatus::Degraded,
        })
        .chain([health_status(disk_percent, thresholds)])
        .max_by_key(|s| match s {
            pb::HealthStatus::Unhealthy => 2,
            pb::HealthStatus::Degraded => 1,
            _ => 0,
        });
    worst.unwrap_or(pb::HealthStatus::Healthy)
}

/// Health from disk usage: degraded from the warning mark (80% by default), unhealthy from
/// the full mark (95%: writes refused).
pub fn health_status(
    disk_percent: f64,
    thresholds: &crate::engine::DiskThresholds,
) -> pb::HealthStatus {
    if disk_percent >= thresholds.full_percent {
        pb::HealthStatus::Unhealthy
    } else if disk_percent >= thresholds.warn_percent {
        pb::HealthStatus::Degraded
    } else {
        pb::HealthStatus::Healthy
    }
}

/// The line that says why disk usage makes the node degraded or unhealthy (none below the
/// warning mark).
pub fn disk_problem(
    disk_percent: f64,
    thresholds: &crate::engine::DiskThresholds,
) -> Option<String> {
    match health_status(disk_percent, thresholds) {
        pb::HealthStatus::Unhealthy => Some(format!(
            "disk {disk_percent:.1}% full: every write refused (DISK_FULL) from {:.0}%",
            thresholds.full_percent
        )),
        pb::HealthStatus::Degraded => Some(format!(
            "disk {disk_percent:.1}% full: over the warning mark ({:.0}%); large writes refused \
             from {:.0}%, every write from {:.0}%",
            thresholds.warn_percent, thresholds.throttle_percent, thresholds.full_percent
        )),
        _ => None,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, StorageError> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Internal(format!("engine task failed: {e}")))?;
    Ok(result?)
}

/// Runs one call's body, counting it and recording its latency and outcome code.
async fn timed<T>(
    service: &StorageService,
    rpc: &'static str,
    body: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let started = Instant::now();
    let result = body.await;
    service.requests.fetch_add(1, Ordering::Relaxed);
    let code = match &result {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("{:?}", e.code()),
    };
    metrics::counter!("pairdb_storage_requests_total", "rpc" => rpc, "code" => code).increment(1);
    metrics::histogram!("pairdb_storage_request_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
    result
}

/// A handler's result as a unary RPC's: the error is encoded into a status here, once.
fn snapshot_to_pb(info: SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        name: info.name,
        node_id: info.node_id,
        created_at_ms: info.created_at_ms,
        tables: info.tables,
        bytes: info.bytes,
        entries: info.entries,
    }
}

/// A client call refused for its stale ring, counted.
fn refused_stale(e: StaleRing) -> StorageError {
    metrics::counter!("pairdb_storage_stale_ring_refused_total").increment(1);
    StorageError::StaleRing(e)
}

fn reply<T>(result: Result<T, StorageError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

/// The small durable sets a storage node keeps beside its engine, each in its own file of the
/// data dir.
pub struct Ledgers {
    pub markers: Arc<RepairMarkerLog>,
    pub repaired: Arc<RepairedRanges>,
    pub dropped: Arc<DroppedTenants>,
    pub fence: Arc<RingFence>,
}

impl StorageService {
    pub fn new(
        node_id: String,
        engine: Arc<Engine>,
        gossip: Option<Arc<Gossip>>,
        ledgers: Ledgers,
        tasks: crate::shutdown::Tasks,
        auth: InternalAuth,
        background: Arc<BackgroundPool>,
    ) -> Arc<Self> {
        let Ledgers {
            markers,
            repaired,
            dropped,
            fence,
        } = ledgers;
        metrics::gauge!("pairdb_repair_markers_pending").set(markers.pending() as f64);
        let snapshots = tokio::sync::Mutex::new(Snapshots::new(engine.dir(), &node_id));
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            snapshots,
            node_id,
            requests: AtomicU64::new(0),
            streams: StreamManager::new(
                engine.clone(),
                dropped.clone(),
                tasks.clone(),
                auth,
                background.clone(),
            ),
            background,
            tasks,
            engine,
            gossip,
            writes: WritePath::for_current_runtime(),
            markers,
            repaired,
            dropped,
            fence,
            listing_pace: Mutex::new(None),
        })
    }

    /// Paces anti-entropy listings' scans to `bytes_per_second` of records (0: unpaced).
    pub fn set_listing_rate_limit(&self, bytes_per_second: u64) {
        *self.listing_pace.lock() = Throttle::new(bytes_per_second).map(Arc::new);
    }

    /// Records deleted tenants' namespaces as dropped (durably): none of their records is
    /// applied or streamed from now on.
    fn fence(&self, namespaces: &[String]) -> Result<(), StorageError> {
        for t in namespaces {
            check_storage_tenant(t).map_err(|e| invalid(e.to_string()))?;
        }
        let added = self.dropped.add(namespaces).map_err(|e| {
            StorageError::Internal(format!("cannot record the dropped tenants: {e}"))
        })?;
        if added > 0 {
            tracing::info!(tenants = ?namespaces, "namespaces of deleted tenants fenced");
        }
        Ok(())
    }

    /// Admits a write placed on a ring of `epoch` (see `ring_fence`), and records that ring
    /// when it is the newest yet; hold the guard until it is applied.
    async fn admit(
        &self,
        epoch: u64,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, StorageError> {
        let admitted = self.fence.admit(epoch).await.map_err(refused_stale)?;
        self.fence.note_placed(epoch).await.map_err(|e| {
            StorageError::Internal(format!("cannot record the newest ring written: {e}"))
        })?;
        Ok(admitted)
    }

    /// Client writes and reads wait until the node knows every deleted tenant
    /// (`dropped_tenants`): before that it cannot tell a live namespace from one deleted while
    /// it was down.
    fn check_confirmed(&self) -> Result<(), StorageError> {
        if self.dropped.is_confirmed() {
            Ok(())
        } else {
            metrics::counter!("pairdb_storage_unconfirmed_requests_refused_total").increment(1);
            Err(StorageError::TenantsUnconfirmed)
        }
    }

    /// The node's range streams.
    pub fn streams(&self) -> &StreamManager {
        &self.streams
    }

    /// Where this service applies writes.
    pub fn write_path(&self) -> WritePath {
        self.writes
    }

    /// One call of a `BatchStream`: the same handlers as the unary batch RPCs; an error
    /// becomes the answer's `ErrorDetail` directly.
    async fn run_batch_call(&self, call: pb::BatchCall) -> pb::BatchResult {
        use pb::batch_call::Call;
        use pb::batch_result::Result as Answer;
        use tracing::Instrument;
        // The ids come from a peer: only well-formed ones are recorded, at most a few. One
        // call serves the requests of a coordinator's batch, so its span names them all.
        let ids: Vec<&str> = call
            .request_ids
            .iter()
            .filter(|id| crate::rpc::trace::valid(id))
            .take(8)
            .map(String::as_str)
            .collect();
        let span = tracing::info_span!("batch", request_ids = %ids.join(","));
        let work = async {
            match call.call {
                Some(Call::Write(req)) => self.write_records(req).await.map(Answer::Write),
                Some(Call::Read(req)) => self.read_records(req).await.map(Answer::Read),
                None => Err(invalid("empty batch call")),
            }
        };
        let answer = work.instrument(span).await;
        match &answer {
            // Expected once after a start, until a coordinator confirms the node.
            Err(e @ StorageError::TenantsUnconfirmed) => {
                tracing::debug!(request_ids = ?ids, error = %e, "batch call refused");
            }
            // A coordinator's stale ring: it places the request again.
            Err(e @ StorageError::StaleRing(_)) => {
                tracing::info!(request_ids = ?ids, error = %e, "batch call refused");
            }
            Err(e) => tracing::warn!(request_ids = ?ids, error = %e, "batch call failed"),
            Ok(_) => {}
        }
        pb::BatchResult {
            id: call.id,
            result: Some(answer.unwrap_or_else(|e| Answer::Error(e.detail()))),
        }
    }

    async fn apply(&self, record: Record) -> Result<pb::ApplyResponse, StorageError> {
        if self.dropped.contains(&record.tenant) {
            count_fenced(1);
            return Ok(pb::ApplyResponse {
                outcome: pb::ApplyOutcome::TenantDeleted as i32,
                stored_version: None,
            });
        }
        let engine = self.engine.clone();
        let candidate = record.clone();
        let outcome = self.writes.run(move || engine.apply(candidate)).await?;
        let stored_version = match &outcome {
            ApplyOutcome::Applied => {
                self.streams.forward(&record, 0);
                (&record.version).into()
            }
            ApplyOutcome::Ignored { stored } => stored.into(),
        };
        Ok(pb::ApplyResponse {
            outcome: outcome_to_proto(&outcome) as i32,
            stored_version: Some(stored_version),
        })
    }

    async fn apply_proto(
        &self,
        record: Option<pb::Record>,
    ) -> Result<pb::ApplyResponse, StorageError> {
        let record = record_from_proto(record.ok_or_else(|| invalid("missing record"))?)?;
        self.apply(record).await
    }

    /// `WriteBatch`, unary or on a `BatchStream`: validates every record, applies them with
    /// one log sync, forwards applied ones to running streams.
    async fn write_records(
        &self,
        req: pb::WriteBatchRequest,
    ) -> Result<pb::WriteBatchResponse, StorageError> {
        timed(self, "write_batch", async {
            let source = req.source();
            let req_ring_digest = req.ring_digest;
            if source == pb::BatchSource::Client {
                self.check_confirmed()?;
            }
            // Held until the batch is applied: a fence raised meanwhile waits for it. Every
            // batch was placed on a ring, a client's, a hint replay's, a repair's or a stream's,
            // and one placed on a ring older than a cleanup would put records into a range
            // this node dropped, where nothing reads them and a later change could bring them
            // back.
            let _admitted = self.admit(req.ring_epoch).await?;
            let records = req
                .records
                .into_iter()
                .map(record_from_proto)
                .collect::<Result<Vec<Record>, _>>()?;
            if source != pb::BatchSource::Client {
                // Client batches carry versions coordinators minted within their skew bound.
                count_far_ahead(source, &records);
            }
            // Records of dropped namespaces are answered TENANT_DELETED and never applied.
            let fenced = self
                .dropped
                .fenced(records.iter().map(|r| r.tenant.as_str()));
            let refused = fenced.iter().filter(|f| **f).count();
            if refused > 0 {
                count_fenced(refused);
            }
            let live: Vec<Record> = records
                .iter()
                .zip(&fenced)
                .filter(|(_, f)| !**f)
                .map(|(r, _)| r.clone())
                .collect();
            let engine = self.engine.clone();
            let applied = if live.is_empty() {
                Vec::new()
            } else if source == pb::BatchSource::Client {
                self.writes.run(move || engine.apply_batch(live)).await?
            } else if source == pb::BatchSource::Stream
                && live.iter().map(Record::size_estimate).sum::<usize>() >= INGEST_MIN_BYTES
            {
                // A stream's bulk copy: mostly keys this node holds nowhere yet.
                self.background.run(move || engine.ingest(live)).await??
            } else {
                // A repair's, a hint replay's or a small stream batch: no client waits on it.
                self.background
                    .run(move || engine.apply_batch(live))
                    .await??
            };
            let outcomes = merge_fenced(&fenced, applied);
            // Only a coordinator's digest says which ring placed the records.
            let ring_digest = match source {
                pb::BatchSource::Client => req_ring_digest,
                _ => 0,
            };
            for (r, o) in records.iter().zip(&outcomes) {
                if o.as_ref().is_some_and(ApplyOutcome::is_applied) {
                    self.streams.forward(r, ring_digest);
                }
            }
            let all_applied = outcomes
                .iter()
                .all(|o| o.as_ref().is_some_and(ApplyOutcome::is_applied));
            Ok(pb::WriteBatchResponse {
                outcomes: outcomes
                    .iter()
                    .map(|o| {
                        o.as_ref()
                            .map_or(pb::ApplyOutcome::TenantDeleted, outcome_to_proto)
                            as i32
                    })
                    .collect(),
                // Empty when every record was applied (the common case).
                stored: if all_applied {
                    Vec::new()
                } else {
                    outcomes.iter().map(stored_to_proto).collect()
                },
            })
        })
        .await
    }

    /// `ReadBatch`, unary or on a `BatchStream`. Rows in the cache are answered here; a batch
    /// with any miss goes to a blocking thread.
    async fn read_records(
        &self,
        req: pb::ReadBatchRequest,
    ) -> Result<pb::ReadBatchResponse, StorageError> {
        timed(self, "read_batch", async {
            if req.source() == pb::BatchSource::Client {
                self.check_confirmed()?;
                self.fence.check(req.ring_epoch).map_err(refused_stale)?;
            }
            let reads = req.reads;
            // A dropped namespace is answered as such (no record), whatever is left of it.
            let fenced = self
                .dropped
                .fenced(reads.iter().map(|r| r.tenant_id.as_str()));
            let cached: Option<Vec<pb::ReadResponse>> = reads
                .iter()
                .zip(&fenced)
                .map(|(r, fenced)| {
                    if *fenced {
                        return Some(deleted_tenant_answer());
                    }
                    self.engine
                        .get_cached(&r.tenant_id, &r.key)
                        .map(|rec| found_answer(Some(rec)))
                })
                .collect();
            if let Some(results) = cached {
                return Ok(pb::ReadBatchResponse { results });
            }
            let engine = self.engine.clone();
            let results = blocking(move || {
                reads
                    .iter()
                    .zip(fenced)
                    .map(|(r, fenced)| {
                        if fenced {
                            return Ok(deleted_tenant_answer());
                        }
                        engine.get(&r.tenant_id, &r.key).map(found_answer)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
            Ok(pb::ReadBatchResponse { results })
        })
        .await
    }

    /// Requests served so far (the gossip publisher turns it into requests per second).
    pub fn requests_served(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Disk-based health with the given load (requests per second).
    pub fn health(&self, load: f64) -> Health {
        let disk_percent = self.engine.stats().disk_usage_percent;
        Health {
            status: node_status(
                disk_percent,
                &self.engine.disk_thresholds(),
                &self.engine.problems(),
            ),
            disk_percent,
            load,
        }
    }
}

/// A read's answer: the stored record, if any.
fn found_answer(found: Option<Arc<Record>>) -> pb::ReadResponse {
    pb::ReadResponse {
        record: found.map(|rec| record_to_proto(&rec)),
        tenant_deleted: false,
    }
}

/// The answer to a read of a dropped namespace.
fn deleted_tenant_answer() -> pb::ReadResponse {
    pb::ReadResponse {
        record: None,
        tenant_deleted: true,
    }
}

/// Versions whose timestamp lies further ahead of this node's clock than any honest
/// coordinator's can (the coordinators' default `max_clock_skew`) are logged and counted
/// (`pairdb_storage_versions_far_ahead_total{source}`). They are still stored: a storage node
/// never refuses a version it may be the only holder of, and it has no clock to protect; the
/// coordinators refuse to adopt such counters.
fn count_far_ahead(source: pb::BatchSource, records: &[Record]) {
    let limit = crate::wallclock::now_ms().saturating_add(FAR_AHEAD_MS);
    let far = records
        .iter()
        .filter(|r| r.version.timestamp_ms() > limit)
        .count();
    if far > 0 {
        let source = source.as_str_name();
        metrics::counter!("pairdb_storage_versions_far_ahead_total", "source" => source)
            .increment(far as u64);
        tracing::warn!(
            source,
            records = far,
            "versions far ahead of this node's clock arrived"
        );
    }
}

/// See [`count_far_ahead`]: the coordinators' default `max_clock_skew`.
const FAR_AHEAD_MS: u64 = 60_000;

fn outcome_to_proto(o: &ApplyOutcome) -> pb::ApplyOutcome {
    match o {
        ApplyOutcome::Applied => pb::ApplyOutcome::Applied,
        ApplyOutcome::Ignored { .. } => pb::ApplyOutcome::IgnoredDominated,
    }
}

/// The `stored` entry of a batch answer: the version that beat an ignored record (none for
/// an applied or fenced one).
fn stored_to_proto(o: &Option<ApplyOutcome>) -> common::Version {
    match o {
        Some(ApplyOutcome::Ignored { stored }) => stored.into(),
        Some(ApplyOutcome::Applied) | None => common::Version::default(),
    }
}

/// The outcome of every record of a batch, in order: `None` for the fenced ones (a dropped
/// namespace), the engine's outcomes of the others in between.
fn merge_fenced(fenced: &[bool], applied: Vec<ApplyOutcome>) -> Vec<Option<ApplyOutcome>> {
    let mut applied = applied.into_iter();
    fenced
        .iter()
        .map(|f| if *f { None } else { applied.next() })
        .collect()
}

/// Counts records refused because their tenant was deleted (`pairdb_storage_writes_to_deleted_tenants_total`).
fn count_fenced(records: usize) {
    metrics::counter!("pairdb_storage_writes_to_deleted_tenants_total").increment(records as u64);
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl StorageNode for StorageService {
    async fn write(
        &self,
        req: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let body = async {
            self.check_confirmed()?;
            // A single write names no ring: a fenced node refuses it.
            let _admitted = self.admit(0).await?;
            self.apply_proto(req.into_inner().record).await
        };
        reply(timed(self, "write", body).await)
    }

    async fn read(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let pb::ReadRequest { tenant_id, key } = req.into_inner();
        let engine = self.engine.clone();
        let fenced = self.dropped.contains(&tenant_id);
        let body = async move {
            if fenced {
                return Ok(deleted_tenant_answer());
            }
            let found = blocking(move || engine.get(&tenant_id, &key)).await?;
            Ok(found_answer(found))
        };
        reply(timed(self, "read", body).await)
    }

    async fn read_batch(
        &self,
        req: Request<pb::ReadBatchRequest>,
    ) -> Result<Response<pb::ReadBatchResponse>, Status> {
        reply(self.read_records(req.into_inner()).await)
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let pb::DeleteRequest {
            tenant_id,
            key,
            version,
        } = req.into_inner();
        let body = async {
            self.check_confirmed()?;
            let _admitted = self.admit(0).await?;
            let version = version.ok_or_else(|| invalid("delete without a version"))?;
            self.apply(Record::tombstone(tenant_id, key, Version::from(&version)))
                .await
        };
        reply(timed(self, "delete", body).await)
    }

    async fn repair(
        &self,
        req: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let pb::RepairRequest { record, ring_epoch } = req.into_inner();
        let body = async {
            // Placed on the ring of the read that found the replica stale: fenced like it.
            let _admitted = self.admit(ring_epoch).await?;
            self.apply_proto(record).await
        };
        reply(timed(self, "repair", body).await)
    }

    async fn write_batch(
        &self,
        req: Request<pb::WriteBatchRequest>,
    ) -> Result<Response<pb::WriteBatchResponse>, Status> {
        reply(self.write_records(req.into_inner()).await)
    }

    type BatchStreamStream = ReceiverStream<Result<pb::BatchResult, Status>>;

    /// Runs every batch of the stream as its own task; results go back as they complete.
    async fn batch_stream(
        &self,
        req: Request<tonic::Streaming<pb::BatchCall>>,
    ) -> Result<Response<Self::BatchStreamStream>, Status> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| StorageError::Internal("the service is shutting down".to_owned()))?;
        Ok(Response::new(crate::mux::serve(
            req.into_inner(),
            BATCH_RESULTS_QUEUE,
            &self.tasks,
            move |call| {
                let me = me.clone();
                async move { me.run_batch_call(call).await }
            },
        )))
    }

    type ScanRangeStream = BoxStream<pb::ScanRangeBatch>;

    async fn scan_range(
        &self,
        req: Request<pb::ScanRangeRequest>,
    ) -> Result<Response<Self::ScanRangeStream>, Status> {
        let req = req.into_inner();
        let range = req
            .range
            .as_ref()
            .map(HashRange::from)
            .ok_or_else(|| invalid("missing range"))?;
        let batch_size = (req.batch_size as usize).clamp(1, MAX_SCAN_BATCH);
        let keys_only = req.keys_only;
        let (tx, rx) = mpsc::channel(4);
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(batch_size);
            let mut batch_bytes = 0;
            for item in engine.scan_hash_range(range) {
                match item {
                    Ok(r) if keys_only => batch.push(pb::Record {
                        tenant_id: r.tenant.clone(),
                        key: r.key.clone(),
                        version: Some((&r.version).into()),
                        payload: None,
                        ring_hash: r.ring_hash,
                        expires_at_ms: r.expires_at_ms.unwrap_or(0),
                    }),
                    Ok(r) => batch.push(record_to_proto(&r)),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(StorageError::from(e).into_status()));
                        return;
                    }
                }
                batch_bytes += batch.last().map_or(0, |r: &pb::Record| r.encoded_len());
                if batch.len() == batch_size || batch_bytes >= MAX_SCAN_BATCH_BYTES {
                    batch_bytes = 0;
                    let records = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                    if tx
                        .blocking_send(Ok(pb::ScanRangeBatch { records }))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(pb::ScanRangeBatch { records: batch }));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn start_streaming(
        &self,
        req: Request<pb::StartStreamingRequest>,
    ) -> Result<Response<pb::StreamStatus>, Status> {
        let req = req.into_inner();
        let started = self
            .fence(&req.dropped_tenants)
            .and_then(|()| self.streams.start(req).map_err(|e| invalid(e.to_string())));
        reply(started)
    }

    async fn get_stream_status(
        &self,
        req: Request<pb::StreamStatusRequest>,
    ) -> Result<Response<pb::StreamStatus>, Status> {
        let id = req.into_inner().stream_id;
        reply(
            self.streams
                .status(&id)
                .ok_or_else(|| invalid(format!("unknown stream {id:?}"))),
        )
    }

    async fn stop_streaming(
        &self,
        req: Request<pb::StreamStatusRequest>,
    ) -> Result<Response<pb::StreamStatus>, Status> {
        let id = req.into_inner().stream_id;
        reply(
            self.streams
                .stop(&id)
                .ok_or_else(|| invalid(format!("unknown stream {id:?}"))),
        )
    }

    async fn drain(
        &self,
        _req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let engine = self.engine.clone();
        reply(
            blocking(move || engine.flush())
                .await
                .map(|()| pb::DrainResponse { drained: true }),
        )
    }

    async fn segment_hashes(
        &self,
        req: Request<pb::SegmentHashesRequest>,
    ) -> Result<Response<pb::SegmentHashesResponse>, Status> {
        reply(anti_entropy::segment_hashes(self.engine.clone(), req.into_inner()).await)
    }

    type ListSegmentsStream =
        Pin<Box<dyn Stream<Item = Result<pb::ListSegmentsBatch, Status>> + Send>>;

    async fn list_segments(
        &self,
        req: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<Self::ListSegmentsStream>, Status> {
        let pace = self.listing_pace.lock().clone();
        let rx = anti_entropy::list_segments(
            self.engine.clone(),
            req.into_inner(),
            pace,
            &self.background,
            &self.tasks,
        )?;
        let stream = ReceiverStream::new(rx).map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn mark_repaired(
        &self,
        req: Request<pb::MarkRepairedRequest>,
    ) -> Result<Response<pb::MarkRepairedResponse>, Status> {
        let body = async {
            let req = req.into_inner();
            // Marks of a comparison on a ring older than one this node took writes on are late.
            self.fence
                .check_verified_ring(req.ring_epoch)
                .map_err(refused_stale)?;
            anti_entropy::mark_repaired(self.repaired.clone(), req).await
        };
        reply(body.await)
    }

    async fn compact(
        &self,
        _req: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let engine = self.engine.clone();
        reply(
            blocking(move || {
                engine.flush()?;
                engine.compact()?;
                Ok(engine.stats().tombstones_dropped)
            })
            .await
            .map(|tombstones_dropped| pb::CompactResponse { tombstones_dropped }),
        )
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let name = req.into_inner().name;
        // Held until the snapshot is complete: one create or delete at a time.
        let guard = self.snapshots.lock().await;
        let (owned, engine) = (guard.clone(), self.engine.clone());
        let taken = tokio::task::spawn_blocking(move || owned.create(&engine, &name))
            .await
            .map_err(|e| StorageError::Internal(format!("snapshot task failed: {e}")))
            .and_then(|r| r.map_err(StorageError::from));
        drop(guard);
        if let Ok(info) = &taken {
            tracing::info!(snapshot = %info.name, tables = info.tables, bytes = info.bytes, "snapshot taken");
        }
        reply(taken.map(snapshot_to_pb))
    }

    async fn list_snapshots(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let snapshots = self.snapshots.lock().await.clone();
        let listed = tokio::task::spawn_blocking(move || snapshots.list())
            .await
            .map_err(|e| StorageError::Internal(format!("snapshot task failed: {e}")))
            .and_then(|r| r.map_err(StorageError::from));
        reply(listed.map(|all| pb::ListSnapshotsResponse {
            snapshots: all.into_iter().map(snapshot_to_pb).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let name = req.into_inner().name;
        let guard = self.snapshots.lock().await;
        let owned = guard.clone();
        let deleted = tokio::task::spawn_blocking(move || owned.delete(&name))
            .await
            .map_err(|e| StorageError::Internal(format!("snapshot task failed: {e}")))
            .and_then(|r| r.map_err(StorageError::from));
        drop(guard);
        reply(deleted.map(snapshot_to_pb))
    }

    async fn record_repair_markers(
        &self,
        req: Request<pb::RepairMarkersRequest>,
    ) -> Result<Response<pb::RepairMarkersResponse>, Status> {
        let markers = req.into_inner().markers;
        let log = self.markers.clone();
        let body = async move {
            if markers.iter().any(|m| {
                check_storage_tenant(&m.tenant_id).is_err()
                    || check_key(&m.key).is_err()
                    || m.missed_node.is_empty()
            }) {
                return Err(invalid("repair marker with a bad tenant, key or node"));
            }
            let pending = blocking(move || {
                log.append(&markers)
                    .map_err(|e| EngineError::io("append repair markers", e))
            })
            .await?;
            Ok(pb::RepairMarkersResponse { pending })
        };
        reply(timed(self, "record_repair_markers", body).await)
    }

    async fn list_repair_markers(
        &self,
        req: Request<pb::ListRepairMarkersRequest>,
    ) -> Result<Response<pb::RepairMarkersRequest>, Status> {
        let limit = (req.into_inner().limit as usize).clamp(1, 10_000);
        let log = self.markers.clone();
        let body = async move {
            let markers = blocking(move || {
                log.read_all()
                    .map_err(|e| EngineError::io("read repair markers", e))
            })
            .await?;
            Ok(pb::RepairMarkersRequest {
                markers: markers.into_iter().take(limit).collect(),
            })
        };
        reply(timed(self, "list_repair_markers", body).await)
    }

    async fn clear_repair_markers(
        &self,
        req: Request<pb::RepairMarkersRequest>,
    ) -> Result<Response<pb::RepairMarkersResponse>, Status> {
        let done = req.into_inner().markers;
        let log = self.markers.clone();
        let body = async move {
            let pending = blocking(move || {
                log.remove(&done)
                    .map_err(|e| EngineError::io("remove repair markers", e))
            })
            .await?;
            Ok(pb::RepairMarkersResponse { pending })
        };
        reply(timed(self, "clear_repair_markers", body).await)
    }

    async fn held_versions(
        &self,
        req: Request<pb::HeldVersionsRequest>,
    ) -> Result<Response<pb::HeldVersionsResponse>, Status> {
        let body = async {
            let entries = cleanup::parse_held(req.into_inner())?;
            let engine = self.engine.clone();
            let held = blocking(move || cleanup::held(&engine, &entries)).await?;
            Ok(pb::HeldVersionsResponse { held })
        };
        reply(timed(self, "held_versions", body).await)
    }

    async fn drop_ranges(
        &self,
        req: Request<pb::DropRangesRequest>,
    ) -> Result<Response<pb::DropRangesResponse>, Status> {
        let body = async {
            let req = req.into_inner();
            let epoch = req.ring_epoch;
            let drops = cleanup::parse_drops(req)?;
            // A drop verified against a ring older than one this node took writes on is late;
            // writes on a newer ring that come while it runs wait for it.
            let _dropping = self.fence.begin_drop(epoch).await.map_err(refused_stale)?;
            let engine = self.engine.clone();
            blocking(move || cleanup::drop_ranges(&engine, &drops)).await
        };
        reply(timed(self, "drop_ranges", body).await)
    }

    async fn fence_ring(
        &self,
        req: Request<pb::FenceRingRequest>,
    ) -> Result<Response<pb::FenceRingResponse>, Status> {
        let body = async {
            let epoch = req.into_inner().epoch;
            if epoch == 0 {
                return Err(invalid("a ring fence needs an epoch above 0"));
            }
            let floor = self.fence.raise(epoch).await.map_err(|e| {
                StorageError::Internal(format!("cannot record the ring fence: {e}"))
            })?;
            Ok(pb::FenceRingResponse { floor })
        };
        reply(timed(self, "fence_ring", body).await)
    }

    async fn drop_tenants(
        &self,
        req: Request<pb::DropTenantsRequest>,
    ) -> Result<Response<pb::DropRangesResponse>, Status> {
        let body = async {
            let pb::DropTenantsRequest {
                tenant_ids: wanted,
                complete,
            } = req.into_inner();
            if wanted.len() > cleanup::MAX_DROP_ITEMS {
                return Err(invalid(format!(
                    "at most {} tenants per DropTenants call",
                    cleanup::MAX_DROP_ITEMS
                )));
            }
            for t in &wanted {
                check_storage_tenant(t).map_err(|e| invalid(e.to_string()))?;
            }
            // Fenced before the drop: nothing of them lands again, even while it runs.
            self.fence(&wanted)?;
            if complete {
                // Every deleted namespace is fenced now: client writes may be taken.
                self.dropped.confirm();
            }
            let engine = self.engine.clone();
            blocking(move || cleanup::drop_tenants(&engine, wanted)).await
        };
        reply(timed(self, "drop_tenants", body).await)
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let body = async {
            let req = req.into_inner();
            self.fence.check(req.ring_epoch).map_err(refused_stale)?;
            let listing = super::listing::ListKeys::parse(req)?;
            if self.dropped.contains(listing.tenant()) {
                return Ok(pb::ListKeysResponse {
                    tenant_deleted: true,
                    ..Default::default()
                });
            }
            let engine = self.engine.clone();
            blocking(move || listing.run(&engine)).await
        };
        reply(timed(self, "list_keys", body).await)
    }

    async fn health_check(
        &self,
        _req: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let stats = self.engine.stats();
        let problems = self.engine.problems();
        let thresholds = self.engine.disk_thresholds();
        let disk = disk_problem(stats.disk_usage_percent, &thresholds);
        Ok(Response::new(pb::HealthCheckResponse {
            node_id: self.node_id.clone(),
            status: node_status(stats.disk_usage_percent, &thresholds, &problems) as i32,
            problems: disk
                .into_iter()
                .chain(problems.iter().map(ToString::to_string))
                .collect(),
            disk_usage_percent: stats.disk_usage_percent,
            memtable_count: stats.memtables as u32,
            sstable_count: stats.sstables as u32,
            key_estimate: stats.key_estimate,
        }))
    }

    type WatchHealthStream = BoxStream<pb::MembershipUpdate>;

    async fn watch_health(
        &self,
        _req: Request<pb::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let gossip = self.gossip.clone();
        let node_id = self.node_id.clone();
        let health = self.health(0.0);
        let stop = self.tasks.stop().clone();
        // Not tracked: it ends with the stop (or when the watcher leaves), holding nothing.
        tokio::spawn(async move {
            let mut last: Option<Vec<pb::MemberHealth>> = None;
            let mut sent_at = std::time::Instant::now();
            loop {
                let members = match &gossip {
                    Some(g) => g.members().await,
                    None => vec![pb::MemberHealth {
                        node_id: node_id.clone(),
                        address: String::new(),
                        up: true,
                        status: health.status as i32,
                        disk_usage_percent: health.disk_percent,
                        load: health.load,
                    }],
                };
                let changed = last.as_ref().is_none_or(|l| {
                    l.len() != members.len()
                        || l.iter().zip(&members).any(|(a, b)| {
                            a.node_id != b.node_id || a.up != b.up || a.status != b.status
                        })
                });
                if changed || sent_at.elapsed() >= crate::rpc::WATCH_HEALTH_HEARTBEAT {
                    sent_at = std::time::Instant::now();
                    if tx
                        .send(Ok(pb::MembershipUpdate {
                            members: members.clone(),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = Some(members);
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    // The watchers follow another node.
                    () = stop.cancelled() => return,
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_disk_use() {
        let d = crate::engine::DiskThresholds::default();
        assert_eq!(health_status(0.0, &d), pb::HealthStatus::Healthy);
        assert_eq!(health_status(79.9, &d), pb::HealthStatus::Healthy);
        assert_eq!(health_status(80.0, &d), pb::HealthStatus::Degraded);
        assert_eq!(health_status(94.9, &d), pb::HealthStatus::Degraded);
        assert_eq!(health_status(95.0, &d), pb::HealthStatus::Unhealthy);
    }

    #[test]
    fn engine_problems_make_the_node_degraded_or_unhealthy() {
        let quarantined = Problem::Quarantined(crate::engine::Quarantined {
            table_id: 7,
            min_key: b"a".to_vec(),
            max_key: b"b".to_vec(),
            min_hash: 1,
            max_hash: 2,
            reason: "checksum".into(),
        });
        let failed = Problem::CommitLogFailed("fsync: EIO".into());
        assert_eq!(
            node_status(10.0, &crate::engine::DiskThresholds::default(), &[]),
            pb::HealthStatus::Healthy
        );
        assert_eq!(
            node_status(
                10.0,
                &crate::engine::DiskThresholds::default(),
                std::slice::from_ref(&quarantined)
            ),
            pb::HealthStatus::Degraded
        );
        assert_eq!(
            node_status(
                10.0,
                &crate::engine::DiskThresholds::default(),
                &[quarantined.clone(), failed]
            ),
            pb::HealthStatus::Unhealthy
        );
        assert_eq!(
            node_status(
                96.0,
                &crate::engine::DiskThresholds::default(),
                &[quarantined]
            ),
            pb::HealthStatus::Unhealthy
        );
    }

    #[test]
    fn writes_run_inline_only_on_a_one_worker_runtime() {
        let path_on = |workers: usize| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .build()
                .expect("runtime")
                .block_on(async { WritePath::for_current_runtime() })
        };
        assert_eq!(path_on(1), WritePath::Inline);
        assert_eq!(path_on(2), WritePath::Blocking);
        let current_thread = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async { WritePath::for_current_runtime() });
        assert_eq!(current_thread, WritePath::Inline);
        assert_eq!(WritePath::for_current_runtime(), WritePath::Blocking);
    }
}
