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
//! Invariant: every call gets exactly one outcome: its answer, [`MuxError::Closed`] (the stream
//! was closed before the call was sent: it did not run), [`MuxError::Broken`] (the stream ended
//! after the call was sent: it may have run) or [`MuxError::TimedOut`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::{FutureExt, Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::Streaming;

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
    #[error("no answer in time")]
    TimedOut,
}

type Waiting<Resp> = Mutex<HashMap<u64, oneshot::Sender<Resp>>>;

/// One open stream to a peer.
pub struct MuxStream<Req, Resp> {
    calls: mpsc::UnboundedSender<Req>,
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
        F: FnOnce(UnboundedReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, tonic::Status>>,
    {
        let (calls, outgoing) = mpsc::unbounded_channel();
        let mut answers = open(UnboundedReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let waiting: Arc<Waiting<Resp>> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (reader_waiting, reader_closed) = (waiting.clone(), closed.clone());
        tokio::spawn(async move {
            let why = loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let waiter = reader_waiting.lock().remove(&answer.tag());
                        if let Some(waiter) = waiter {
                            // A caller that timed out no longer listens.
                            let _ = waiter.send(answer);
                        }
                    }
                    Ok(None) => break "ended by the peer".to_owned(),
                    Err(status) => break status.message().to_owned(),
                }
            };
            tracing::debug!(reason = %why, "multiplexed stream closed");
            reader_closed.store(true, Ordering::SeqCst);
            // Dropping the senders tells every waiting call that the stream broke.
            reader_waiting.lock().clear();
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

    /// Sends the call `make(id)` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        make: impl FnOnce(u64) -> Req,
        timeout: Duration,
    ) -> Result<Resp, MuxError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, result) = oneshot::channel();
        self.waiting.lock().insert(id, answer);
        // Registered before the check: if the reader closes after it, the final drain answers
        // this call; if before, the check sees it.
        if !self.is_open() || self.calls.send(make(id)).is_err() {
            self.waiting.lock().remove(&id);
            return Err(MuxError::Closed);
        }
        match tokio::time::timeout(timeout, result).await {
            Ok(Ok(answer)) => Ok(answer),
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
        F: FnOnce(UnboundedReceiverStream<Req>) -> Fut,
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
pub fn serve<Req, Resp, H, Fut>(
    mut calls: impl Stream<Item = Result<Req, tonic::Status>> + Send + Unpin + 'static,
    queue: usize,
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
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let call = match calls.next().await {
                Some(Ok(call)) => call,
                None => return,
                Some(Err(status)) => {
                    tracing::debug!(error = %status.message(), "multiplexed stream ended");
                    return;
                }
            };
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

    use super::*;

    /// No more than `queue` calls run at once; the rest wait unread, and every call is answered.
    #[tokio::test]
    async fn serve_bounds_the_calls_in_flight() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (running_h, most_h) = (running.clone(), most.clone());
        let mut answers = serve(UnboundedReceiverStream::new(incoming), 2, move |n: u64| {
            let (running, most) = (running_h.clone(), most_h.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                n * 10
            }
        });
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

    /// Answers ready at once and answers that wait both come back, each to its own call.
    #[tokio::test]
    async fn serve_answers_ready_and_waiting_calls() {
        let (calls, incoming) = mpsc::unbounded_channel::<Result<u64, tonic::Status>>();
        let mut answers = serve(
            UnboundedReceiverStream::new(incoming),
            4,
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
