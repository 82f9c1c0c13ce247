//! Coalescing of concurrent replica calls to one storage node (like Cassandra's message
//! coalescing): client writes bound for a node queue up and go out as one `WriteBatch` (one
//! call, one engine batch, one fsync on the node), reads as one `ReadBatch`. Nothing waits on a
//! timer: a batch holds whatever queued while the node's previous batches were in flight, so a
//! lone request goes out at once and a busy node gets fewer, larger calls. Batches travel on the
//! node's `BatchStream` ([`crate::mux`]), not as an HTTP/2 stream each. One task per node and
//! kind builds the batches and drives the ones in flight (no task per batch).
//!
//! Invariants: every queued call gets exactly one answer (its share of the batch's outcome, or
//! the batch's error); at most `in_flight` ([`IN_FLIGHT`] by default) batches per node and kind
//! are outstanding; a batch holds at most [`MAX_RECORDS`] calls and about [`MAX_BYTES`] of
//! values.

use std::sync::Arc;
use std::time::Duration;

use crate::rpc::auth::InternalChannel;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::mux::MuxSlot;
use crate::rpc::common;
use crate::rpc::storage as pb;
use crate::rpc::storage::batch_call;
use crate::rpc::storage::batch_result::Result as Answer;
use crate::rpc::storage::storage_node_client::StorageNodeClient;

use crate::vclock::Version;

use super::replica_error::ReplicaError;

/// Batches outstanding per node and kind, by default (`coordinator.batch_in_flight`).
pub const IN_FLIGHT: usize = 1;
/// Calls per batch.
pub const MAX_RECORDS: usize = 256;
/// Value bytes per write batch (a 10 MiB value goes alone).
pub const MAX_BYTES: usize = 4 * 1024 * 1024;
/// Bound of one batch RPC (the callers' own deadlines are usually shorter).
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

type Reply<T> = oneshot::Sender<Result<T, ReplicaError>>;

/// One queued call: what to send, the request it serves (`rpc::trace`), where the answer goes.
struct Job<T, A> {
    call: T,
    request_id: Option<String>,
    reply: Reply<A>,
}

/// What a client call tells a storage node about the ring it was placed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingTag {
    /// `WriteBatchRequest.ring_digest` (0: unknown, forwarded by streams).
    pub digest: u64,
    /// `WriteBatchRequest.ring_epoch` / `ReadBatchRequest.ring_epoch`.
    pub epoch: u64,
}

/// A record and the ring it was placed on.
type WriteJob = Job<(pb::Record, RingTag), WriteAck>;
/// A read and the epoch of the ring it was placed on.
type ReadJob = Job<(pb::ReadRequest, u64), Option<pb::Record>>;

/// The calls, request ids and replies of a batch, each in call order.
fn split<T, A>(jobs: Vec<Job<T, A>>) -> (Vec<T>, Vec<String>, Vec<Reply<A>>) {
    let mut calls = Vec::with_capacity(jobs.len());
    let mut ids = Vec::new();
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        calls.push(job.call);
        ids.extend(job.request_id);
        replies.push(job.reply);
    }
    ids.dedup();
    (calls, ids, replies)
}

/// What a replica did with one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAck {
    /// The write is now the replica's version.
    Applied,
    /// The replica holds `stored`, which takes precedence over the write (durable there).
    Ignored { stored: Version },
}

impl WriteAck {
    fn from_answer(outcome: Option<&i32>, stored: Option<&common::Version>) -> WriteAck {
        if outcome.copied() == Some(pb::ApplyOutcome::IgnoredDominated as i32) {
            WriteAck::Ignored {
                stored: stored.map(Version::from).unwrap_or_default(),
            }
        } else {
            WriteAck::Applied
        }
    }
}

/// A node's batch stream, and the client that opens it again after it broke.
struct Link {
    node: String,
    client: StorageNodeClient<InternalChannel>,
    stream: MuxSlot<pb::BatchCall, pb::BatchResult>,
    /// `pairdb_coordinator_batch_seconds{node}`, looked up once rather than per batch.
    batch_seconds: metrics::Histogram,
    /// `pairdb_coordinator_batch_size{kind="write"}` and `{kind="read"}`, likewise.
    write_batch_size: metrics::Histogram,
    read_batch_size: metrics::Histogram,
}

impl Link {
    async fn call(
        &self,
        call: batch_call::Call,
        request_ids: Vec<String>,
    ) -> Result<Answer, ReplicaError> {
        let started = std::time::Instant::now();
        let answer = self.call_untimed(call, request_ids).await;
        self.batch_seconds.record(started.elapsed().as_secs_f64());
        answer
    }

    async fn call_untimed(
        &self,
        call: batch_call::Call,
        request_ids: Vec<String>,
    ) -> Result<Answer, ReplicaError> {
        let stream = self
            .stream
            .get(|calls| {
                let mut client = self.client.clone();
                async move { client.batch_stream(calls).await }
            })
            .await
            .map_err(|s| ReplicaError::from_status(&self.node, &s))?;
        let answer = stream
            .call(
                |id| pb::BatchCall {
                    id,
                    call: Some(call),
                    request_ids,
                },
                BATCH_TIMEOUT,
            )
            .await
            .map_err(|e| ReplicaError::unavailable(&self.node, format!("batch: {e}")))?;
        match answer.result {
            Some(Answer::Error(detail)) => Err(ReplicaError::from_detail(&self.node, &detail)),
            Some(answer) => Ok(answer),
            None => Err(ReplicaError::unavailable(&self.node, "empty batch answer")),
        }
    }
}

/// The queues of one storage node.
pub struct NodeBatcher {
    writes: mpsc::Sender<WriteJob>,
    reads: mpsc::Sender<ReadJob>,
}

/// Calls waiting per node and kind. A full queue makes callers wait (their request deadline
/// bounds the wait), so a slow node holds at most this many calls in this coordinator's memory.
const QUEUE: usize = 4096;

impl NodeBatcher {
    /// Starts the node's batching tasks on `links`; they end when the batcher is dropped, after
    /// answering every call queued.
    pub fn start(
        node: String,
        client: StorageNodeClient<InternalChannel>,
        in_flight: usize,
        links: &tokio_util::task::TaskTracker,
    ) -> Arc<Self> {
        let (writes, write_queue) = mpsc::channel(QUEUE);
        let (reads, read_queue) = mpsc::channel(QUEUE);
        let in_flight = in_flight.max(1);
        let link = Arc::new(Link {
            batch_seconds: metrics::histogram!("pairdb_coordinator_batch_seconds", "node" => node.clone()),
            write_batch_size: metrics::histogram!("pairdb_coordinator_batch_size", "kind" => "write"),
            read_batch_size: metrics::histogram!("pairdb_coordinator_batch_size", "kind" => "read"),
            node,
            client,
            stream: MuxSlot::default(),
        });
        links.spawn(run_writes(link.clone(), write_queue, in_flight));
        links.spawn(run_reads(link, read_queue, in_flight));
        Arc::new(Self { writes, reads })
    }

    /// Applies `record`, placed on the ring `ring`, on the node, batched with concurrent
    /// writes.
    pub async fn write(
        &self,
        node: &str,
        record: pb::Record,
        ring: RingTag,
    ) -> Result<WriteAck, ReplicaError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            call: (record, ring),
            request_id: crate::rpc::trace::current(),
            reply,
        };
        self.writes
            .send(job)
            .await
            .map_err(|_| ReplicaError::unavailable(node, "batcher stopped"))?;
        answer
            .await
            .map_err(|_| ReplicaError::unavailable(node, "batch dropped"))?
    }

    /// Reads a key on the node, placed on the ring of `ring_epoch`, batched with concurrent
    /// reads.
    pub async fn read(
        &self,
        node: &str,
        request: pb::ReadRequest,
        ring_epoch: u64,
    ) -> Result<Option<pb::Record>, ReplicaError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            call: (request, ring_epoch),
            request_id: crate::rpc::trace::current(),
            reply,
        };
        self.reads
            .send(job)
            .await
            .map_err(|_| ReplicaError::unavailable(node, "batcher stopped"))?;
        answer
            .await
            .map_err(|_| ReplicaError::unavailable(node, "batch dropped"))?
    }
}

fn value_len(r: &pb::Record) -> usize {
    match &r.payload {
        Some(pb::record::Payload::Value(v)) => v.len(),
        _ => 0,
    }
}

/// The next write batch: the carried-over call or the first queued one, then whatever else is
/// queued, up to the batch bounds. Cancel-safe: the only await is the queue's `recv`.
async fn next_write_batch(
    queue: &mut mpsc::Receiver<WriteJob>,
    carry: &mut Option<WriteJob>,
) -> Option<Vec<WriteJob>> {
    let first = match carry.take() {
        Some(job) => job,
        None => queue.recv().await?,
    };
    let mut bytes = value_len(&first.call.0);
    let mut batch = vec![first];
    while batch.len() < MAX_RECORDS {
        match queue.try_recv() {
            Ok(job) => {
                bytes += value_len(&job.call.0);
                if bytes > MAX_BYTES {
                    *carry = Some(job);
                    break;
                }
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn send_writes(link: &Link, batch: Vec<WriteJob>) {
    let (placed, request_ids, replies) = split(batch);
    link.write_batch_size.record(placed.len() as f64);
    let (records, rings): (Vec<pb::Record>, Vec<RingTag>) = placed.into_iter().unzip();
    let digests: Vec<u64> = rings.iter().map(|r| r.digest).collect();
    let call = batch_call::Call::Write(pb::WriteBatchRequest {
        records,
        source: pb::BatchSource::Client as i32,
        ring_digest: batch_ring_digest(&digests),
        ring_epoch: oldest_epoch(rings.iter().map(|r| r.epoch)),
    });
    match link.call(call, request_ids).await {
        Ok(Answer::Write(answer)) => {
            for (i, reply) in replies.into_iter().enumerate() {
                let outcome = answer.outcomes.get(i);
                let ack = if outcome == Some(&(pb::ApplyOutcome::TenantDeleted as i32)) {
                    Err(ReplicaError::tenant_deleted(&link.node))
                } else {
                    Ok(WriteAck::from_answer(outcome, answer.stored.get(i)))
                };
                let _ = reply.send(ack);
            }
        }
        other => {
            let error = match other {
                Err(e) => e,
                Ok(_) => ReplicaError::unavailable(&link.node, "mismatched batch answer"),
            };
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// The ring digest a batch of records carries: theirs when all were placed with one ring, else
/// 0 (unknown; a ring refresh between two of them is rare).
fn batch_ring_digest(digests: &[u64]) -> u64 {
    match digests.split_first() {
        Some((first, rest)) if rest.iter().all(|d| d == first) => *first,
        _ => 0,
    }
}

/// The epoch a batch carries: its oldest call's, so a node fenced above any of them refuses
/// the batch (every caller then places its request again; rare: only after a ring change).
fn oldest_epoch(epochs: impl Iterator<Item = u64>) -> u64 {
    epochs.min().unwrap_or(0)
}

/// Sends the node's write batches, at most `in_flight` at once, from this one task.
async fn run_writes(link: Arc<Link>, mut queue: mpsc::Receiver<WriteJob>, in_flight: usize) {
    let mut carry = None;
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            batch = next_write_batch(&mut queue, &mut carry), if running.len() < in_flight => {
                let Some(batch) = batch else { break };
                running.push(send_writes(&link, batch));
            }
        }
    }
    while running.next().await.is_some() {}
}

async fn send_reads(link: &Link, jobs: Vec<ReadJob>) {
    let (placed, request_ids, replies) = split(jobs);
    link.read_batch_size.record(placed.len() as f64);
    let expected = placed.len();
    let ring_epoch = oldest_epoch(placed.iter().map(|(_, epoch)| *epoch));
    let call = batch_call::Call::Read(pb::ReadBatchRequest {
        reads: placed.into_iter().map(|(read, _)| read).collect(),
        source: pb::BatchSource::Client as i32,
        ring_epoch,
    });
    let result = match link.call(call, request_ids).await {
        Ok(Answer::Read(r)) if r.results.len() == expected => Ok(r.results),
        Ok(_) => Err(ReplicaError::unavailable(&link.node, "short read batch")),
        Err(e) => Err(e),
    };
    match result {
        Ok(results) => {
            for (reply, answer) in replies.into_iter().zip(results) {
                let _ = reply.send(if answer.tenant_deleted {
                    Err(ReplicaError::tenant_deleted(&link.node))
                } else {
                    Ok(answer.record)
                });
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Sends the node's read batches, at most `in_flight` at once, from this one task.
async fn run_reads(link: Arc<Link>, mut queue: mpsc::Receiver<ReadJob>, in_flight: usize) {
    let mut running = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(MAX_RECORDS);
    loop {
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            // recv_many is cancel-safe: nothing is taken from the queue unless it returns.
            n = queue.recv_many(&mut batch, MAX_RECORDS), if running.len() < in_flight => {
                if n == 0 {
                    break;
                }
                let jobs = std::mem::replace(&mut batch, Vec::with_capacity(MAX_RECORDS));
                running.push(send_reads(&link, jobs));
            }
        }
    }
    while running.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_carries_a_ring_digest_only_when_every_record_had_it() {
        assert_eq!(batch_ring_digest(&[7, 7, 7]), 7);
        assert_eq!(batch_ring_digest(&[7]), 7);
        assert_eq!(batch_ring_digest(&[7, 8, 7]), 0);
        assert_eq!(batch_ring_digest(&[0, 7]), 0);
        assert_eq!(batch_ring_digest(&[]), 0);
    }
}
