//! Many calls over one long-lived gRPC bidirectional stream: every message carries an id that
//! its answer repeats, so concurrent calls share one HTTP/2 stream instead of opening one each
//! (per-stream work, headers and trailers, was a large share of the gateway's, coordinator's
//! and storage nodes' CPU; docs/benchmarks.md).
//!
//! Client side: [`MuxStream`] sends calls and a reader task hands each answer to the call
//! waiting for its id; [`MuxSlot`] keeps a peer's current stream and opens a new one after it
//! broke. Server side: [`serve`] runs every incoming call as its own task and sends answers back
//! as they complete (not in call order).
//!
//! Stopping (the server's role stops): [`serve`] reads no further call, waits until every call
//! it read was answered, and ends the stream with the [`DRAINED`] status. Answers travel before
//! that end on the same HTTP/2 stream, so a client call still waiting when it arrives was never
//! read: it did not run, and the client may send it elsewhere.
//!
//! Invariant: every call gets exactly one outcome: its answer, [`MuxError::Closed`] (the stream
//! was closed before the call was sent, or the server drained the stream without reading it: it
//! did not run), [`MuxError::Busy`] (the stream's bounded send queue stayed full until the
//! deadline: not sent, did not run), [`MuxError::Broken`] (the stream ended after the call was
//! sent: it may have run) or [`MuxError::TimedOut`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::{FutureExt, Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::shutdown::Tasks;

/// The message of the status that ends a stream its server drained (code `UNAVAILABLE`).
pub const DRAINED: &str = "pairdb: the peer is stopping; calls it did not answer did not run";

/// How long a drained stream waits for its peer to close its side.
const LINGER: Duration = Duration::from_secs(2);

fn drained() -> tonic::Status {
    tonic::Status::unavailable(DRAINED)
}

fn is_drained(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message() == DRAINED
}

/// A message that carries the id of the call it belongs to.
pub trait Tagged {
    fn tag(&self) -> u64;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("the stream was closed before the call was sent")]
    Closed,
    #[error("the stream ended before the answer")]
    Broken,
    #[error("the stream's send queue stayed full until the deadline; the call was not sent")]
    Busy,
    #[error("no answer in time")]
    TimedOut,
}

/// Calls waiting to be written to one stream; beyond this a caller waits (HTTP/2 flow control
/// holds the stream back) until its deadline.
const OUTGOING: usize = 1024;

type Waiting<Resp> = Mutex<HashMap<u64, oneshot::Sender<Result<Resp, MuxError>>>>;

/// One open stream to a peer.
pub struct MuxStream<Req, Resp> {
    /// Taken by the reader when the stream ended, which closes this side of it (the peer
    /// waits for that before it closes the connection).
    calls: Arc<Mutex<Option<mpsc::Sender<Req>>>>,
    waiting: Arc<Waiting<Resp>>,
    /// Set by the reader when the stream ended, before it drops the waiting calls.
    closed: Arc<AtomicBool>,
    next_id: AtomicU64,
}

impl<Req, Resp> MuxStream<Req, Resp>
where
    Req: Send + 'static,
    Resp: Tagged + Send + 'static,
{
    /// Opens a stream with `open` (the generated client's bidirectional call) and starts the
    /// task that reads answers.
    pub async fn open<F, Fut>(open: F) -> Result<Arc<Self>, tonic::Status>
    where
        F: FnOnce(ReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, tonic::Status>>,
    {
        let (calls, outgoing) = mpsc::channel(OUTGOING);
        let mut answers = open(ReceiverStream::new(outgoing)).await?.into_inner();
        let waiting: Arc<Waiting<Resp>> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (reader_waiting, reader_closed) = (waiting.clone(), closed.clone());
        let calls = Arc::new(Mutex::new(Some(calls)));
        let reader_calls = calls.clone();
        tokio::spawn(async move {
            let (why, unanswered) = loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let waiter = reader_waiting.lock().remove(&answer.tag());
                        if let Some(waiter) = waiter {
                            // A caller that timed out no longer listens.
                            let _ = waiter.send(Ok(answer));
                        }
                    }
                    Ok(None) => break ("ended by the peer".to_owned(), MuxError::Broken),
                    Err(status) if is_drained(&status) => {
                        break (status.message().to_owned(), MuxError::Closed);
                    }
                    Err(status) => break (status.message().to_owned(), MuxError::Broken),
                }
            };
            tracing::debug!(reason = %why, "multiplexed stream closed");
            reader_closed.store(true, Ordering::SeqCst);
            drop(reader_calls.lock().take());
            // Every call still waiting learns how the stream ended.
            for (_, waiter) in reader_waiting.lock().drain() {
                let _ = waiter.send(Err(unanswered));
            }
        });
        Ok(Arc::new(Self {
            calls,
            waiting,
            closed,
            next_id: AtomicU64::new(0),
        }))
    }

    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// Sends the call `make(id)` and waits up to `timeout` (in all) for its answer.
    pub async fn call(
        &self,
        make: impl FnOnce(u64) -> Req,
        timeout: Duration,
    ) -> Result<Resp, MuxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, result) = oneshot::channel();
        self.waiting.lock().insert(id, answer);
        // Registered before the check: if the reader closes after it, the final drain answers
        // this call; if before, the check sees it.
        let sender = self.calls.lock().clone().filter(|_| self.is_open());
        let sent = match sender {
            Some(sender) => match tokio::time::timeout_at(deadline, sender.send(make(id))).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(MuxError::Closed),
                Err(_) => Err(MuxError::Busy),
            },
            None => Err(MuxError::Closed),
        };
        if let Err(e) = sent {
            self.waiting.lock().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout_at(deadline, result).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(MuxError::Broken),
            Err(_) => {
                self.waiting.lock().remove(&id);
                Err(MuxError::TimedOut)
            }
        }
    }
}

/// A peer's current stream, opened on first use and again after it broke.
pub struct MuxSlot<Req, Resp> {
    current: ArcSwapOption<MuxStream<Req, Resp>>,
    /// Held while a stream is opened, so concurrent callers open one.
    opening: tokio::sync::Mutex<()>,
}

impl<Req, Resp> Default for MuxSlot<Req, Resp> {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
        }
    }
}

impl<Req, Resp> MuxSlot<Req, Resp>
where
    Req: Send + 'static,
    Resp: Tagged + Send + 'static,
{
    /// The open stream, or a new one from `open` (see [`MuxStream::open`]).
    pub async fn get<F, Fut>(&self, open: F) -> Result<Arc<MuxStream<Req, Resp>>, tonic::Status>
    where
        F: FnOnce(ReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, tonic::Status>>,
    {
        if let Some(open) = self.current.load_full().filter(|s| s.is_open()) {
            return Ok(open);
        }
        let _opening = self.opening.lock().await;
        if let Some(open) = self.current.load_full().filter(|s| s.is_open()) {
            return Ok(open);
        }
        let opened = MuxStream::open(open).await?;
        self.current.store(Some(opened.clone()));
        Ok(opened)
    }
}

/// Serves one incoming stream: every call runs through `handle`, as its own task unless its
/// answer is ready at the first poll (a read served from a cache); answers go back as they
/// complete. At most `queue` calls run at once and at most `queue` answers wait to
/// be read back; beyond that the stream is not read (HTTP/2 flow control holds the peer back).
/// Once the role stops (`tasks`) no further call is run; the answers end with [`DRAINED`] after
/// every call read before was answered. The task then reads (and drops, unrun) what the peer
/// sent before it saw that end, until the peer closes its side, for at most [`LINGER`]: it is
/// one of `tasks`' streams, which the role's server waits for before it closes its connections,
/// so no connection closes under calls in flight (a TCP reset would destroy the `DRAINED` end
/// before the peer read it). Once the peer no longer reads answers (its side of the stream is
/// gone), no further call is run, though some were read: they were sent long before.
pub fn serve<Req, Resp, H, Fut>(
    mut calls: impl Stream<Item = Result<Req, tonic::Status>> + Send + Unpin + 'static,
    queue: usize,
    tasks: &Tasks,
    handle: H,
) -> ReceiverStream<Result<Resp, tonic::Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    H: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let (answers, outgoing) = mpsc::channel(queue);
    let slots = Arc::new(tokio::sync::Semaphore::new(queue));
    let stop = tasks.stop().clone();
    let stopping = tasks.stop_flag();
    tasks.spawn_stream(async move {
        // Before each call, the stop is checked with one atomic load; the token itself (whose
        // polling takes a lock every stream of the role shares) is polled only while no call
        // is waiting, to wake the idle stream.
        let stopped = stop.cancelled_owned();
        tokio::pin!(stopped);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let next = if stopping.load(Ordering::Acquire) {
                None
            } else {
                tokio::select! {
                    biased;
                    next = calls.next() => Some(next),
                    () = &mut stopped => None,
                }
            };
            let call = match next {
                None => {
                    // Stopping: wait for every call in flight, then say the rest never ran.
                    drop(slot);
                    let all = u32::try_from(queue).unwrap_or(u32::MAX);
                    let _in_flight_done = slots.acquire_many(all).await;
                    let _ = answers.send(Err(drained())).await;
                    drop(answers);
                    let _ = tokio::time::timeout(LINGER, async {
                        while let Some(Ok(_unrun)) = calls.next().await {}
                    })
                    .await;
                    return;
                }
                Some(Some(Ok(call))) => call,
                Some(None) => return,
                Some(Some(Err(status))) => {
                    tracing::debug!(error = %status.message(), "multiplexed stream ended");
                    return;
                }
            };
            // The peer stopped listening (its connection went while the queue was full and the
            // stream unread): a call still buffered from it would run with nobody waiting, long
            // after its caller gave up (a late write). None of them runs.
            if answers.is_closed() {
                tracing::debug!(
                    "multiplexed stream's peer is gone; its buffered calls are dropped unrun"
                );
                return;
            }
            let mut answer = Box::pin(handle(call));
            if let Some(ready) = (&mut answer).now_or_never() {
                // An error means the peer hung up: nobody waits for this answer.
                let _ = answers.send(Ok(ready)).await;
                continue;
            }
            let answers = answers.clone();
            tokio::spawn(async move {
                // An error means the peer hung up: nobody waits for this answer.
                let _ = answers.send(Ok(answer.await)).await;
                drop(slot);
            });
        }
    });
    ReceiverStream::new(outgoing)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    /// Calls a peer sent before it went away, unread while the answers queue was full, never
    /// run: their callers gave up long ago (the fault suite's late-write).
    #[tokio::test]
    async fn calls_buffered_when_the_peer_goes_never_run() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        let tasks = Tasks::default();
        let answers = serve(
            UnboundedReceiverStream::new(incoming),
            1,
            &tasks,
            move |n: u64| {
                let counted = counted.clone();
                async move {
                    tokio::task::yield_now().await;
                    counted.fetch_add(1, Ordering::SeqCst);
                    n
                }
            },
        );
        for n in 0..10 {
            calls.send(Ok(n)).expect("queue a call");
        }
        // Nobody reads the answers: once they fill the queue, the stream is not read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = ran.load(Ordering::SeqCst);
        assert!(before < 10, "the unread stream held calls back: {before}");
        drop(answers);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            ran.load(Ordering::SeqCst),
            before,
            "a call ran after its peer went"
        );
    }

    /// No more than `queue` calls run at once; the rest wait unread, and every call is answered.
    #[tokio::test]
    async fn serve_bounds_the_calls_in_flight() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (running_h, most_h) = (running.clone(), most.clone());
        let tasks = Tasks::default();
        let mut answers = serve(
            UnboundedReceiverStream::new(incoming),
            2,
            &tasks,
            move |n: u64| {
                let (running, most) = (running_h.clone(), most_h.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    n * 10
                }
            },
        );
        for n in 0..8 {
            calls.send(Ok(n)).expect("send");
        }
        let mut got = Vec::new();
        for _ in 0..8 {
            got.push(answers.next().await.expect("an answer").expect("ok"));
        }
        got.sort_unstable();
        assert_eq!(got, (0..8).map(|n| n * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    /// A stop answers every call already running, runs none of the unread ones, and ends the
    /// stream with the drained status.
    #[tokio::test(start_paused = true)]
    async fn serve_drains_on_stop() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let ran = Arc::new(AtomicUsize::new(0));
        let tasks = Tasks::default();
        let counted = ran.clone();
        let mut answers = serve(
            UnboundedReceiverStream::new(incoming),
            2,
            &tasks,
            move |n: u64| {
                let ran = counted.clone();
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    n
                }
            },
        );
        for n in 0..5 {
            calls.send(Ok(n)).expect("send");
        }
        // Two calls run (the queue is 2); the others wait unread.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        tasks.stop().cancel();
        let mut got = Vec::new();
        let end = loop {
            match answers.next().await.expect("the stream ends with a status") {
                Ok(n) => got.push(n),
                Err(status) => break status,
            }
        };
        got.sort_unstable();
        assert_eq!(got, vec![0, 1], "the calls in flight are answered");
        assert!(is_drained(&end), "{end:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 2, "no unread call runs");
        assert!(answers.next().await.is_none());
    }

    /// Answers ready at once and answers that wait both come back, each to its own call.
    #[tokio::test]
    async fn serve_answers_ready_and_waiting_calls() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let mut answers = serve(
            UnboundedReceiverStream::new(incoming),
            4,
            &Tasks::default(),
            |n: u64| async move {
                if n % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n * 10
            },
        );
        for n in 0..20 {
            calls.send(Ok(n)).expect("send");
        }
        drop(calls);
        let mut got = Vec::new();
        while let Some(answer) = answers.next().await {
            got.push(answer.expect("ok"));
        }
        got.sort_unstable();
        assert_eq!(got, (0..20).map(|n| n * 10).collect::<Vec<_>>());
    }
}
