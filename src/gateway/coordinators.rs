//! The gateway's coordinator client: one lazily connected HTTP/2 channel per coordinator,
//! requests spread round-robin, and failover: when a coordinator cannot be reached (a transport
//! failure, which carries no pairdb `ErrorDetail`) the same request goes to the next one. A
//! coordinator's own answers, errors included, are final. A coordinator that failed, or timed
//! out (that request is answered 503, not retried: it may have run), is tried last for a second.
//!
//! Key-value calls travel on one long-lived `KeyValueStream` per coordinator ([`crate::mux`]),
//! matched to their results by id, instead of an HTTP/2 stream per request (that per-request
//! cost was a large share of the gateway's and coordinator's CPU). When that stream breaks, the
//! calls in flight on it fail as a transport failure and go to the next coordinator, as a unary
//! call on a reset connection would (so a write may be applied twice, with the same value; an
//! `Idempotency-Key` makes it exactly once); the next call opens a new stream.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::coordinator::errors::detail_in;
use crate::mux::{MuxError, MuxSlot};
use crate::rpc::coordinator::coordinator_client::CoordinatorClient;
use crate::rpc::coordinator::{self as pb, key_value_call, key_value_result};

const BACKOFF: Duration = Duration::from_secs(1);

pub type Client = CoordinatorClient<Channel>;

struct Member {
    address: String,
    client: Client,
    failed_at: Mutex<Option<Instant>>,
    /// The key-value stream to this coordinator.
    stream: MuxSlot<pb::KeyValueCall, pb::KeyValueResult>,
}

pub struct Coordinators {
    members: Vec<Arc<Member>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Coordinators {
    /// Channels to `addresses` (`host:port`), connected on first use.
    pub fn new(addresses: &[String], timeout: Duration) -> Result<Self, String> {
        let members = addresses
            .iter()
            .map(|address| {
                let endpoint = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|e| format!("bad coordinator address {address:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10));
                Ok(Arc::new(Member {
                    address: address.clone(),
                    client: CoordinatorClient::new(endpoint.connect_lazy())
                        .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES),
                    failed_at: Mutex::new(None),
                    stream: MuxSlot::default(),
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            members,
            next: AtomicUsize::new(0),
            timeout,
        })
    }

    /// Runs a unary `call` on a coordinator, failing over to the others on transport failures.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.with_failover(|member, _| {
            let answer = call(member.client.clone());
            async move { answer.await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Runs a key-value call on a coordinator's key-value stream, with failover.
    pub async fn key_value(
        &self,
        call: key_value_call::Call,
    ) -> Result<key_value_result::Result, tonic::Status> {
        // Copied only for attempts that may be followed by another (the value can be 10 MiB).
        let mut unsent = Some(call);
        let timeout = self.timeout;
        self.with_failover(|member, last| {
            let call = if last { unsent.take() } else { unsent.clone() };
            async move {
                match call {
                    Some(call) => member.key_value(call, timeout).await,
                    None => Err(tonic::Status::internal("key-value call already sent")),
                }
            }
        })
        .await
    }

    /// Runs `call(member, is_last_attempt)` on the members in order until one answers or
    /// fails other than by transport.
    async fn with_failover<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Arc<Member>, bool) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Healthy members first (in round-robin order), then the ones that failed recently.
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        order.sort_by_key(|i| self.members[*i].recently_failed());
        let mut last = tonic::Status::unavailable("no coordinators configured");
        for (attempt, i) in order.into_iter().enumerate() {
            let member = &self.members[i];
            match call(member.clone(), attempt + 1 == n).await {
                Ok(answer) => {
                    *member.failed_at.lock() = None;
                    return Ok(answer);
                }
                Err(status) if is_transport_failure(&status) => {
                    tracing::warn!(coordinator = %member.address, error = %status.message(), "coordinator unreachable; trying the next");
                    metrics::counter!("pairdb_gateway_coordinator_failovers_total").increment(1);
                    *member.failed_at.lock() = Some(Instant::now());
                    last = status;
                }
                Err(status) => {
                    if status.code() == tonic::Code::DeadlineExceeded {
                        // A coordinator that hangs is tried last for a while, but this request
                        // may have run there, so it is not sent again.
                        *member.failed_at.lock() = Some(Instant::now());
                    }
                    return Err(status);
                }
            }
        }
        Err(last)
    }
}

impl Member {
    fn recently_failed(&self) -> bool {
        self.failed_at
            .lock()
            .is_some_and(|at| at.elapsed() < BACKOFF)
    }

    /// Runs a key-value call on this coordinator's key-value stream (opened if needed).
    async fn key_value(
        &self,
        call: key_value_call::Call,
        timeout: Duration,
    ) -> Result<key_value_result::Result, tonic::Status> {
        let stream = self
            .stream
            .get(|calls| {
                let mut client = self.client.clone();
                async move { client.key_value_stream(calls).await }
            })
            .await?;
        let answer = stream
            .call(
                |id| pb::KeyValueCall {
                    id,
                    call: Some(call),
                },
                timeout,
            )
            .await;
        match answer.map(|a| a.result) {
            Ok(Some(key_value_result::Result::Error(detail))) => Err(tonic::Status::with_details(
                tonic::Code::Unknown,
                detail.message.clone(),
                detail.encode_to_vec().into(),
            )),
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(tonic::Status::internal("empty answer from the coordinator")),
            // Sent or not, the connection is gone: the next coordinator gets the call.
            Err(e @ (MuxError::Closed | MuxError::Broken)) => {
                Err(tonic::Status::unavailable(e.to_string()))
            }
            Err(MuxError::TimedOut) => Err(tonic::Status::deadline_exceeded(
                "the coordinator did not answer in time",
            )),
        }
    }
}

/// The request did not reach a coordinator, or its connection broke before the answer (safe
/// to send to another one).
fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && detail_in(status).is_none()
}
