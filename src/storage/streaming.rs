//! Range streaming: this node pushes every record of some hash ranges to a target node.
//!
//! Phases (the `StreamState` a caller sees):
//! - `copying`: a blocking scan of the engine (`scan_hash_ranges`: every range in one pass,
//!   bounded memory) feeds batches of at most 500 records, 4 MiB and one second of the
//!   throttle's rate ([`bulk_batch_bytes`]) that are sent with `WriteBatch(source = STREAM)`; the
//!   target writes a batch of 1 MiB or more as one table where its keys are new to it
//!   (`Engine::ingest`), not through its log;
//! - `streaming`: the bulk copy is done; live writes for the ranges that arrived meanwhile are
//!   sent (they are forwarded from the first moment of the stream, so nothing written during the
//!   copy is missed);
//! - `syncing`: the target is asked to flush (`Drain`), so the copy is in its SSTables;
//! - `completed`, or `failed` (with the error), or `stopped` by `StopStreaming`.
//!
//! The bulk copy is throttled by the node's `stream_rate_limit` when one is set
//! ([`super::throttle`]); live writes are not (they are foreground traffic already).
//!
//! Sending is idempotent (the target applies a record only if it wins by the version rules), so
//! a batch that failed because the target was briefly unreachable is simply sent again, with
//! backoff, from where it stopped; a stream gives up only after `RETRY_WINDOW` without progress.
//! The final `Drain` is retried the same way (it only flushes the target's memtables).
//! After every acknowledged batch the stream stores a checkpoint ([`super::stream_checkpoint`]):
//! asked for again after this node restarted, it goes on after it, sending at most the batch
//! that was in flight a second time (live writes queued then are not needed: coordinators
//! write them to the target directly, as a pending owner). The status reports that position
//! too; the coordinator keeps a copy in the metadata store and passes it back when it asks
//! again (`resume`), and the stream goes on from whichever of the two got further.
//!
//! Live forwarding is a second path, not the only one: the queue of live writes is bounded
//! ([`LIVE_QUEUE`]) and a write that finds it full is not forwarded (counted in
//! `pairdb_stream_live_forwards_dropped_total`), never making the write path wait; the
//! coordinators' write to the pending owner carries it (or its hint).
//!
//! So a write is forwarded only when that other path may be missing: a coordinator's batch
//! carries the digest of the ring it placed its records with (`ring_digest`), and a stream
//! planned on the same ring (its `StartStreaming` says which) does not forward that batch's
//! records; that coordinator wrote them to the target, or hinted them. Writes placed with
//! another ring (a coordinator that has not seen the change yet, or a newer one), with hints
//! off (digest 0), or from a stream, a repair or a hint replay are forwarded as before. Without
//! this the target applied about every write of its ranges twice during a change
//! (docs/benchmarks.md, "Streaming").
//!
//! Every batch carries the registry epoch of the ring the stream was planned on
//! (`StartStreaming.ring_epoch`): a target whose cleanup fenced a later ring refuses it
//! (`STALE_RING`), and the stream fails at once. Only a stream that outlived its change can
//! meet that (a cleanup overlaps no change), and its records would land in a range the target
//! dropped.
//!
//! Streams are tasks of the node's role ([`crate::shutdown::Tasks`]): when the node stops, each
//! ends where it is and keeps its checkpoint, so the coordinator that asks again after the
//! restart resumes it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::rpc::auth::{InternalAuth, InternalChannel};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineError, Record, internal_key};
use crate::ring::HashRange;
use crate::rpc::storage as pb;
use crate::rpc::storage::storage_node_client::StorageNodeClient;
use crate::shutdown::Tasks;

use super::background::BackgroundPool;
use super::dropped_tenants::DroppedTenants;
use super::stream_checkpoint::{self as checkpoint, Checkpoint};
use super::throttle::Throttle;

use super::convert::{record_to_proto, wire_size};

/// Records per `WriteBatch` (bulk copy and forwarded live writes), at most.
const BATCH: usize = 500;
/// Bytes per `WriteBatch` (on the wire), at most: a batch is sent once it reaches either bound,
/// so large values never make a message the target refuses (`rpc::MAX_MESSAGE_BYTES`). Not
/// larger for the bulk copy either: batches of 8 MiB (fewer, larger ingested tables on the
/// target) raised the foreground p99 during a throttled change in each of three runs
/// alternated with 4 MiB (docs/benchmarks.md, "Streaming", 2026-12-07 evening): each batch is
/// a burst of scanning on the sender and of writing and fsyncing on the target.
const BATCH_BYTES: u64 = 4 << 20;
/// Bytes per bulk-copy batch, at least, however low the throttle.
const BULK_BATCH_BYTES_MIN: u64 = 64 << 10;

/// The bulk copy's batch bound in bytes: one second of the throttle's rate (so a batch never
/// waits on the throttle for longer than a second, and a resumed stream re-sends at most that
/// much), within [`BULK_BATCH_BYTES_MIN`]..=[`BATCH_BYTES`]: the maximum unthrottled or at
/// the default 8 MiB/s.
fn bulk_batch_bytes(rate: Option<u64>) -> u64 {
    rate.map_or(BATCH_BYTES, |r| r.clamp(BULK_BATCH_BYTES_MIN, BATCH_BYTES))
}

/// Live writes waiting to be forwarded per stream; beyond this they are not forwarded.
const LIVE_QUEUE: usize = 4096;
/// A stream fails after this long without a successful send.
const RETRY_WINDOW: Duration = Duration::from_secs(300);

struct Stream {
    id: String,
    ranges: Vec<HashRange>,
    /// Of the ranges and target: what its checkpoints are stored under.
    fingerprint: u64,
    state: Mutex<(pb::StreamState, String)>,
    keys: AtomicU64,
    bytes: AtomicU64,
    forwarded: AtomicU64,
    /// The last acknowledged position (reported in the status for the coordinator's copy).
    acked: Mutex<Option<Checkpoint>>,
    live: mpsc::Sender<Record>,
    /// The digest of the ring the stream was planned on (0: forward every live write).
    ring_digest: u64,
    /// The registry epoch of that ring, carried by every batch sent: a target fenced at a
    /// later one (a cleanup ran since the stream was planned) refuses them.
    ring_epoch: u64,
    cancel: CancellationToken,
}

impl Stream {
    fn status(&self) -> pb::StreamStatus {
        let (state, error) = self.state.lock().clone();
        pb::StreamStatus {
            stream_id: self.id.clone(),
            state: state as i32,
            keys_copied: self.keys.load(Ordering::Relaxed),
            bytes_copied: self.bytes.load(Ordering::Relaxed),
            writes_forwarded: self.forwarded.load(Ordering::Relaxed),
            error,
            checkpoint: self.acked.lock().as_ref().map(pb::StreamCheckpoint::from),
        }
    }

    fn set(&self, state: pb::StreamState, error: impl Into<String>) {
        *self.state.lock() = (state, error.into());
    }

    /// Queues a live write placed with the ring of `ring_digest` (0: unknown) while the stream
    /// forwards, unless the coordinator placed it on the stream's own ring (it then wrote the
    /// target itself). The check and the send happen under the state lock, so once the state
    /// leaves `streaming` no write can slip into the queue unseen.
    fn forward(&self, record: &Record, ring_digest: u64) {
        let state = self.state.lock();
        let forwarding = matches!(
            state.0,
            pb::StreamState::Copying | pb::StreamState::Streaming
        );
        if !forwarding || !HashRange::any_contains(&self.ranges, record.ring_hash) {
            return;
        }
        if ring_digest != 0 && ring_digest == self.ring_digest {
            metrics::counter!("pairdb_stream_live_writes_skipped_total").increment(1);
        } else if let Err(mpsc::error::TrySendError::Full(_)) = self.live.try_send(record.clone()) {
            metrics::counter!("pairdb_stream_live_forwards_dropped_total").increment(1);
        }
    }
}

/// Every stream this node runs.
#[derive(Clone)]
pub struct StreamManager {
    engine: Arc<Engine>,
    /// Namespaces of deleted tenants: never sent.
    dropped: Arc<DroppedTenants>,
    /// Where streams keep their checkpoints (`<data dir>/streams`).
    checkpoints: Arc<PathBuf>,
    streams: Arc<Mutex<HashMap<String, Arc<Stream>>>>,
    /// The bandwidth limit shared by every stream started from now on (`None`: unlimited).
    throttle: Arc<Mutex<Option<Arc<Throttle>>>>,
    /// The node role's tasks: streams run as them.
    tasks: Tasks,
    /// Authenticates every call to a stream's target.
    auth: InternalAuth,
    /// Where the streams' scans run (lowered threads).
    background: Arc<BackgroundPool>,
}

impl StreamManager {
    pub fn new(
        engine: Arc<Engine>,
        dropped: Arc<DroppedTenants>,
        tasks: Tasks,
        auth: InternalAuth,
        background: Arc<BackgroundPool>,
    ) -> Self {
        Self {
            dropped,
            tasks,
            auth,
            background,
            checkpoints: Arc::new(engine.dir().join("streams")),
            engine,
            streams: Arc::new(Mutex::new(HashMap::new())),
            throttle: Arc::new(Mutex::new(None)),
        }
    }

    /// Limits what every stream started from now on sends together, in bytes per second
    /// (0: unlimited).
    pub fn set_rate_limit(&self, bytes_per_second: u64) {
        *self.throttle.lock() = Throttle::new(bytes_per_second).map(Arc::new);
    }

    /// Starts a stream (idempotent: a known id returns its status).
    pub fn start(&self, req: pb::StartStreamingRequest) -> Result<pb::StreamStatus, StreamError> {
        if req.stream_id.is_empty() || req.target_address.is_empty() || req.ranges.is_empty() {
            return Err(StreamError::BadRequest(
                "stream_id, target_address and at least one range are required".to_owned(),
            ));
        }
        if !checkpoint::valid_stream_id(&req.stream_id) {
            return Err(StreamError::BadRequest(
                "stream_id must be 1..=200 letters, digits, '-', '_' or '.' (not first)".to_owned(),
            ));
        }
        let endpoint = self
            .auth
            .endpoint(&req.target_address)
            .map_err(|e| {
                StreamError::BadRequest(format!("bad target address {:?}: {e}", req.target_address))
            })?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        let mut streams = self.streams.lock();
        if let Some(s) = streams.get(&req.stream_id) {
            return Ok(s.status());
        }
        let (live, live_rx) = mpsc::channel(LIVE_QUEUE);
        let ranges: Vec<HashRange> = req.ranges.iter().map(HashRange::from).collect();
        let fingerprint = checkpoint::fingerprint(&ranges, &req.target_node_id);
        // A stream this node ran before it restarted goes on after its last acknowledged batch
        // (by its own checkpoint, or the coordinator's copy when that got further).
        let own = checkpoint::load(&self.checkpoints, &req.stream_id, fingerprint);
        let resume = checkpoint::furthest(own, req.resume.as_ref(), fingerprint);
        if let Some(c) = &resume {
            tracing::info!(stream = %req.stream_id, keys = c.keys, "stream resumes from its checkpoint");
        }
        let stream = Arc::new(Stream {
            id: req.stream_id.clone(),
            ranges,
            fingerprint,
            state: Mutex::new((pb::StreamState::Copying, String::new())),
            keys: AtomicU64::new(resume.as_ref().map_or(0, |c| c.keys)),
            bytes: AtomicU64::new(resume.as_ref().map_or(0, |c| c.bytes)),
            forwarded: AtomicU64::new(0),
            acked: Mutex::new(resume.clone()),
            live,
            ring_digest: req.ring_digest,
            ring_epoch: req.ring_epoch,
            cancel: CancellationToken::new(),
        });
        streams.insert(req.stream_id.clone(), stream.clone());
        drop(streams);
        let status = stream.status();
        let client = StorageNodeClient::new(self.auth.channel(&endpoint));
        let engine = self.engine.clone();
        let throttle = self.throttle.lock().clone();
        let checkpoints = self.checkpoints.clone();
        let dropped = self.dropped.clone();
        let tasks = self.tasks.clone();
        let background = self.background.clone();
        let node_stop = tasks.stop().clone();
        self.tasks.spawn(async move {
            let sender = Sender {
                client,
                dropped,
                checkpoints: checkpoints.clone(),
                throttle,
                tasks,
                background,
            };
            let result = tokio::select! {
                r = run(engine, stream.clone(), sender, live_rx, resume) => r,
                () = stream.cancel.cancelled() => Err(StreamError::Stopped),
                () = node_stop.cancelled() => Err(StreamError::NodeStopping),
            };
            if matches!(result, Err(StreamError::NodeStopping)) {
                // The checkpoint stays: asked again after the restart, the stream goes on.
                tracing::info!(stream = %stream.id, "node stopping: stream paused at its checkpoint");
                stream.set(pb::StreamState::Stopped, "the node is stopping");
                return;
            }
            checkpoint::remove(&checkpoints, &stream.id);
            match result {
                Ok(()) => stream.set(pb::StreamState::Completed, ""),
                Err(e) if stream.cancel.is_cancelled() => {
                    stream.set(pb::StreamState::Stopped, e.to_string());
                }
                Err(e) => {
                    tracing::error!(stream = %stream.id, error = %e, "stream failed");
                    stream.set(pb::StreamState::Failed, e.to_string());
                }
            }
        });
        Ok(status)
    }

    pub fn status(&self, id: &str) -> Option<pb::StreamStatus> {
        self.streams.lock().get(id).map(|s| s.status())
    }

    pub fn stop(&self, id: &str) -> Option<pb::StreamStatus> {
        let stream = self.streams.lock().get(id).cloned()?;
        stream.cancel.cancel();
        {
            let mut state = stream.state.lock();
            if !matches!(
                state.0,
                pb::StreamState::Completed | pb::StreamState::Failed
            ) {
                *state = (pb::StreamState::Stopped, "stopped".to_owned());
            }
        }
        Some(stream.status())
    }

    /// Called after a record was applied locally, placed with the ring of `ring_digest` (0:
    /// unknown): streams whose ranges hold it send it on, unless planned on that ring.
    pub fn forward(&self, record: &Record, ring_digest: u64) {
        for stream in self.streams.lock().values() {
            stream.forward(record, ring_digest);
        }
    }
}

/// Why a stream could not start or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// `StartStreaming` was malformed.
    #[error("{0}")]
    BadRequest(String),
    #[error("target rejected a batch: {0}")]
    Rejected(String),
    #[error("target unreachable for {window:?}: {message}")]
    Unreachable { window: Duration, message: String },
    #[error("reading the ranges: {0}")]
    Scan(#[from] EngineError),
    #[error("{0} task failed: {1}")]
    Task(&'static str, String),
    #[error("target could not flush: {0}")]
    Flush(String),
    #[error("stopped")]
    Stopped,
    #[error("the node is stopping")]
    NodeStopping,
}

/// Sends one batch of `stream`, retrying with backoff while the target is unreachable.
async fn send(
    client: &StorageNodeClient<InternalChannel>,
    stream: &Stream,
    records: &[Record],
) -> Result<(), StreamError> {
    let request = pb::WriteBatchRequest {
        records: records.iter().map(record_to_proto).collect(),
        source: pb::BatchSource::Stream as i32,
        ring_digest: 0,
        ring_epoch: stream.ring_epoch,
    };
    let call = || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.write_batch(request).await }
    };
    match retried(call).await {
        Ok(_) => Ok(()),
        Err(Refusal::Invalid(message)) => Err(StreamError::Rejected(message)),
        Err(Refusal::Unreachable(message)) => Err(StreamError::Unreachable {
            window: RETRY_WINDOW,
            message,
        }),
    }
}

/// Asks the target to flush what it received (`Drain`), retrying like [`send`]: a target cut
/// off for a while at the end of a stream must not fail the whole change.
async fn drain(client: &StorageNodeClient<InternalChannel>) -> Result<(), StreamError> {
    let call = || {
        let mut client = client.clone();
        async move { client.drain(pb::DrainRequest {}).await }
    };
    match retried(call).await {
        Ok(_) => Ok(()),
        Err(Refusal::Invalid(message) | Refusal::Unreachable(message)) => {
            Err(StreamError::Flush(message))
        }
    }
}

/// Why [`retried`] gave up.
enum Refusal {
    /// The target refused the request itself (`InvalidArgument`, or `STALE_RING`: the stream
    /// was planned on a ring older than a cleanup on the target): sending it again cannot help.
    Invalid(String),
    /// No success within [`RETRY_WINDOW`]; the last error.
    Unreachable(String),
}

/// Calls `call` until it succeeds; after any error but a refusal ([`Refusal::Invalid`]) it tries again with
/// backoff (50 ms doubling to 2 s), for at most [`RETRY_WINDOW`]. Only for idempotent calls.
async fn retried<T, F, Fut>(mut call: F) -> Result<T, Refusal>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if crate::rpc::detail::refused_for_good(&status) => {
                return Err(Refusal::Invalid(status.message().to_owned()));
            }
            Err(status) => {
                if started.elapsed() > RETRY_WINDOW {
                    return Err(Refusal::Unreachable(status.message().to_owned()));
                }
                tracing::warn!(error = %status.message(), "stream target unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn send_live(
    client: &StorageNodeClient<InternalChannel>,
    stream: &Stream,
    live: &mut mpsc::Receiver<Record>,
) -> Result<(), StreamError> {
    let mut pending = Vec::new();
    let mut pending_bytes = 0;
    while let Ok(r) = live.try_recv() {
        pending_bytes += wire_size(&r);
        pending.push(r);
        if pending.len() == BATCH || pending_bytes >= BATCH_BYTES {
            send(client, stream, &pending).await?;
            stream
                .forwarded
                .fetch_add(pending.len() as u64, Ordering::Relaxed);
            metrics::counter!("pairdb_stream_live_writes_forwarded_total")
                .increment(pending.len() as u64);
            pending.clear();
            pending_bytes = 0;
        }
    }
    if !pending.is_empty() {
        send(client, stream, &pending).await?;
        stream
            .forwarded
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        metrics::counter!("pairdb_stream_live_writes_forwarded_total")
            .increment(pending.len() as u64);
    }
    Ok(())
}

/// Where a stream's batches go, and what it needs to send them.
struct Sender {
    client: StorageNodeClient<InternalChannel>,
    /// Namespaces of deleted tenants, skipped by the scan.
    dropped: Arc<DroppedTenants>,
    checkpoints: Arc<PathBuf>,
    throttle: Option<Arc<Throttle>>,
    /// The node role's tasks (the scan runs as one, so a stop waits for it to let go of the
    /// engine).
    tasks: Tasks,
    /// The lowered threads the scan runs on.
    background: Arc<BackgroundPool>,
}

/// One batch of the bulk copy, with the internal key of its last record.
struct Batch {
    records: Vec<Record>,
    last_key: Vec<u8>,
}

async fn run(
    engine: Arc<Engine>,
    stream: Arc<Stream>,
    sender: Sender,
    mut live: mpsc::Receiver<Record>,
    resume: Option<Checkpoint>,
) -> Result<(), StreamError> {
    let Sender {
        client,
        dropped,
        checkpoints,
        throttle,
        tasks,
        background,
    } = sender;
    // Two batches (8 MiB) ahead of the send at most.
    let (batches_tx, mut batches) = mpsc::channel::<Result<Batch, EngineError>>(2);
    let batch_bytes_max = bulk_batch_bytes(throttle.as_deref().map(Throttle::rate));
    let ranges = stream.ranges.clone();
    let scan_engine = engine.clone();
    let producer = background.spawn(&tasks, move || {
        let after = resume.map(|c| c.last_key);
        let mut batch = Vec::with_capacity(BATCH);
        let mut batch_bytes = 0;
        let mut last_key = Vec::new();
        // One pass over the tables for every range (key order, not hash order).
        for item in scan_engine.scan_hash_ranges(&ranges) {
            let r = match item {
                Ok(r) => r,
                Err(e) => {
                    let _ = batches_tx.blocking_send(Err(e));
                    return;
                }
            };
            if dropped.contains(&r.tenant) {
                continue; // a deleted tenant's, purged here soon
            }
            let key = internal_key(&r.tenant, &r.key);
            if after.as_ref().is_some_and(|a| key <= *a) {
                continue; // sent before the restart
            }
            batch_bytes += wire_size(&r);
            batch.push((*r).clone());
            last_key = key;
            if batch.len() == BATCH || batch_bytes >= batch_bytes_max {
                batch_bytes = 0;
                let full = Batch {
                    records: std::mem::replace(&mut batch, Vec::with_capacity(BATCH)),
                    last_key: std::mem::take(&mut last_key),
                };
                if batches_tx.blocking_send(Ok(full)).is_err() {
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches_tx.blocking_send(Ok(Batch {
                records: batch,
                last_key,
            }));
        }
    });
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        let bytes: u64 = batch.records.iter().map(wire_size).sum();
        if let Some(t) = &throttle {
            t.take(bytes).await;
        }
        send(&client, &stream, &batch.records).await?;
        metrics::counter!("pairdb_stream_bytes_sent_total").increment(bytes);
        metrics::counter!("pairdb_stream_records_sent_total").increment(batch.records.len() as u64);
        let keys = stream
            .keys
            .fetch_add(batch.records.len() as u64, Ordering::Relaxed)
            + batch.records.len() as u64;
        let bytes = stream.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let saved = Checkpoint {
            fingerprint: stream.fingerprint,
            last_key: batch.last_key,
            keys,
            bytes,
        };
        *stream.acked.lock() = Some(saved.clone());
        let (dir, id) = (checkpoints.clone(), stream.id.clone());
        let stored = tokio::task::spawn_blocking(move || checkpoint::store(&dir, &id, &saved))
            .await
            .map_err(|e| StreamError::Task("checkpoint", e.to_string()))?;
        if let Err(e) = stored {
            // Only a resume after a crash needs it; without it the stream starts over.
            tracing::warn!(stream = %stream.id, error = %e, "cannot store the stream's checkpoint");
        }
        send_live(&client, &stream, &mut live).await?;
    }
    producer
        .await
        .map_err(|e| StreamError::Task("scan", e.to_string()))?;
    stream.set(pb::StreamState::Streaming, "");
    send_live(&client, &stream, &mut live).await?;
    stream.set(pb::StreamState::Syncing, "");
    // Writes queued before the state change are still in the queue: send them too.
    send_live(&client, &stream, &mut live).await?;
    drain(&client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_batch_holds_one_second_of_the_throttle_within_its_bounds() {
        assert_eq!(bulk_batch_bytes(None), BATCH_BYTES, "unthrottled");
        assert_eq!(
            bulk_batch_bytes(Some(8 << 20)),
            4 << 20,
            "the default 8 MiB/s"
        );
        assert_eq!(bulk_batch_bytes(Some(2 << 20)), 2 << 20);
        assert_eq!(bulk_batch_bytes(Some(100_000)), 100_000);
        assert_eq!(bulk_batch_bytes(Some(1)), BULK_BATCH_BYTES_MIN);
        assert_eq!(bulk_batch_bytes(Some(1 << 30)), BATCH_BYTES);
        assert!(BATCH_BYTES as usize * 2 < crate::rpc::MAX_MESSAGE_BYTES);
    }
}
