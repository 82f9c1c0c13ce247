//! The gateway's coordinator client: one lazily connected HTTP/2 channel per coordinator,
//! requests spread round-robin, and failover: when a coordinator cannot be reached (a transport
//! failure, which carries no pairdb `ErrorDetail`) the same request goes to the next one. A
//! coordinator's own answers, errors included, are final. A coordinator that failed, or timed
//! out (that request is answered 503, not retried: it may have run), is tried last for a second.
//!
//! Key-value calls travel on one long-lived `KeyValueStream` per coordinator ([`crate::mux`]),
//! matched to their results by id, instead of an HTTP/2 stream per request (that per-request
//! cost was a large share of the gateway's and coordinator's CPU); the next call after a break
//! opens a new stream.
//!
//! Retries never duplicate or reorder a write (SEMANTICS.md, "Trust boundaries"): a key-value
//! call that never reached a coordinator (no stream could be opened, or the stream was closed
//! before the call was sent) goes to the next one. A call that was sent and then lost (the
//! stream broke, or no answer came in time) may have run: a read is sent again; a write or
//! delete is sent again only when it carries an idempotency key and both coordinators report
//! the same shared idempotency store (their `Health`), so the second coordinator replays or
//! waits for the first one's result instead of writing again. Otherwise the client gets 503
//! OUTCOME_UNKNOWN and decides.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use tokio::time::Instant;

use crate::mux::{MuxError, MuxSlot};
use crate::rpc::auth::{InternalAuth, InternalChannel};
use crate::rpc::coordinator::coordinator_client::CoordinatorClient;
use crate::rpc::coordinator::{self as pb, key_value_call, key_value_result};
use crate::rpc::detail::coordinator_detail;

const BACKOFF: Duration = Duration::from_secs(1);

pub type Client = CoordinatorClient<InternalChannel>;

struct Member {
    address: String,
    client: Client,
    failed_at: Mutex<Option<Instant>>,
    /// The key-value stream to this coordinator.
    stream: MuxSlot<pb::KeyValueCall, pb::KeyValueResult>,
    /// The idempotency store it reported (`HealthResponse.idempotency_store`), asked whenever a
    /// stream to it opens.
    idempotency_store: Arc<Mutex<Option<String>>>,
}

/// How one attempt on one coordinator failed.
enum Failure {
    /// The call never reached the coordinator: another one may take it.
    NotSent(tonic::Status),
    /// The call was sent and its connection broke before the answer: it may have run.
    Lost(tonic::Status),
    /// No answer in time: it may have run, and the coordinator may be hung.
    TimedOut(tonic::Status),
    /// The coordinator answered (an error): final.
    Answered(tonic::Status),
}

/// Whether a call that may have run on one coordinator may be sent to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Reads: always.
    Always,
    /// Writes and deletes with an idempotency key: when both share one idempotency store.
    IfSharedStore,
    /// Writes and deletes without one: never.
    Never,
}

/// How long the gateway waits for a coordinator's `Health` when it must know its store.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Coordinators {
    members: Vec<Arc<Member>>,
    next: AtomicUsize,
    timeout: Duration,
}

/// A configured coordinator address that no channel can be made for.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad coordinator address {address:?}: {reason}")]
pub struct BadCoordinatorAddress {
    pub address: String,
    pub reason: String,
}

impl Coordinators {
    /// Channels to `addresses` (`host:port`), connected on first use.
    pub fn new(
        addresses: &[String],
        timeout: Duration,
        auth: &InternalAuth,
    ) -> Result<Self, BadCoordinatorAddress> {
        let members = addresses
            .iter()
            .map(|address| {
                let endpoint = auth
                    .endpoint(address)
                    .map_err(|e| BadCoordinatorAddress {
                        address: address.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10));
                Ok(Arc::new(Member {
                    address: address.clone(),
                    client: CoordinatorClient::new(
                        auth.bounded_channel(&endpoint, delivery_bound(timeout)),
                    )
                    .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES),
                    failed_at: Mutex::new(None),
                    stream: MuxSlot::default(),
                    idempotency_store: Arc::default(),
                }))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        self.with_failover(Resend::Always, |member, _| {
            let answer = call(member.client.clone());
            async move {
                answer
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| {
                        if is_transport_failure(&status) {
                            Failure::NotSent(status)
                        } else if status.code() == tonic::Code::DeadlineExceeded {
                            Failure::TimedOut(status)
                        } else {
                            Failure::Answered(status)
                        }
                    })
            }
        })
        .await
    }

    /// Runs a key-value call on a coordinator's key-value stream, with failover.
    pub async fn key_value(
        &self,
        call: key_value_call::Call,
    ) -> Result<key_value_result::Result, tonic::Status> {
        let resend = match &call {
            key_value_call::Call::Read(_) | key_value_call::Call::List(_) => Resend::Always,
            key_value_call::Call::Write(w) if !w.idempotency_key.is_empty() => {
                Resend::IfSharedStore
            }
            key_value_call::Call::Delete(d) if !d.idempotency_key.is_empty() => {
                Resend::IfSharedStore
            }
            _ => Resend::Never,
        };
        // Copied only for attempts that may be followed by another (the value can be 10 MiB).
        let mut unsent = Some(call);
        let timeout = self.timeout;
        self.with_failover(resend, |member, last| {
            let call = if last { unsent.take() } else { unsent.clone() };
            async move {
                match call {
                    Some(call) => member.key_value(call, timeout).await,
                    None => Err(Failure::Answered(tonic::Status::internal(
                        "key-value call already sent",
                    ))),
                }
            }
        })
        .await
    }

    /// Runs `call(member, is_last_attempt)` on the members in order until one answers, or a
    /// failure may not be followed by another attempt (see [`Resend`]).
    async fn with_failover<T, F, Fut>(
        &self,
        resend: Resend,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut(Arc<Member>, bool) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Healthy members first (in round-robin order), then the ones that failed recently.
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        order.sort_by_key(|i| self.members[*i].recently_failed());
        let mut last = tonic::Status::unavailable("no coordinators configured");
        for (attempt, i) in order.iter().enumerate() {
            let member = &self.members[*i];
            let next = order.get(attempt + 1).map(|j| &self.members[*j]);
            let status = match call(member.clone(), attempt + 1 == n).await {
                Ok(answer) => {
                    *member.failed_at.lock() = None;
                    return Ok(answer);
                }
                Err(Failure::Answered(status)) => return Err(status),
                Err(Failure::NotSent(status)) => status,
                Err(Failure::TimedOut(status)) => {
                    // A coordinator that hangs is tried last for a while, but this request
                    // may have run there, so it is not sent again.
                    *member.failed_at.lock() = Some(Instant::now());
                    return Err(match resend {
                        Resend::Always => status,
                        _ => outcome_unknown(&member.address, "did not answer in time"),
                    });
                }
                Err(Failure::Lost(status)) => {
                    let may_resend = match (resend, next) {
                        (Resend::Always, _) => true,
                        (Resend::IfSharedStore, Some(next)) => member.shares_store_with(next).await,
                        _ => false,
                    };
                    if !may_resend {
                        *member.failed_at.lock() = Some(Instant::now());
                        metrics::counter!("pairdb_gateway_outcome_unknown_total").increment(1);
                        return Err(outcome_unknown(
                            &member.address,
                            "failed after the call was sent",
                        ));
                    }
                    status
                }
            };
            tracing::warn!(coordinator = %member.address, error = %status.message(), "coordinator unreachable; trying the next");
            metrics::counter!("pairdb_gateway_coordinator_failovers_total").increment(1);
            *member.failed_at.lock() = Some(Instant::now());
            last = status;
        }
        Err(last)
    }
}

/// How long bytes sent to a coordinator may stay unacknowledged before the connection is given
/// up (`TCP_USER_TIMEOUT`): under the call timeout, so a call cut off by a partition either
/// reached the coordinator before the gateway answered OUTCOME_UNKNOWN for it, or never will
/// (docs/reliability.md, finding 9). Never under 500 ms, so a short timeout does not make a
/// busy moment of the network fatal to every call on the connection.
fn delivery_bound(timeout: Duration) -> Duration {
    (timeout * 4 / 5).max(Duration::from_millis(500))
}

/// The OUTCOME_UNKNOWN answer for a write or delete that may have run on `address`.
fn outcome_unknown(address: &str, what: &str) -> tonic::Status {
    let detail = pb::ErrorDetail {
        code: pb::ErrorCode::OutcomeUnknown as i32,
        message: format!(
            "the coordinator at {address} {what}: the write may or may not have been applied \
             (retry with an Idempotency-Key to be safe)"
        ),
        ..Default::default()
    };
    tonic::Status::with_details(
        tonic::Code::Unavailable,
        detail.message.clone(),
        detail.encode_to_vec().into(),
    )
}

impl Member {
    fn recently_failed(&self) -> bool {
        self.failed_at
            .lock()
            .is_some_and(|at| at.elapsed() < BACKOFF)
    }

    /// Asks the coordinator which idempotency store it uses and remembers the answer.
    async fn describe(client: Client, into: Arc<Mutex<Option<String>>>) {
        let mut client = client;
        let asked = tokio::time::timeout(DESCRIBE_TIMEOUT, client.health(pb::HealthRequest {}));
        if let Ok(Ok(answer)) = asked.await {
            *into.lock() = Some(answer.into_inner().idempotency_store);
        }
    }

    /// Whether this member and `next` reported the same shared idempotency store (asking
    /// `next` now if it never said).
    async fn shares_store_with(&self, next: &Member) -> bool {
        let Some(mine) = self.idempotency_store.lock().clone() else {
            return false;
        };
        if next.idempotency_store.lock().is_none() {
            Self::describe(next.client.clone(), next.idempotency_store.clone()).await;
        }
        let theirs = next.idempotency_store.lock().clone();
        mine.starts_with("shared:") && theirs.as_deref() == Some(mine.as_str())
    }

    /// Runs a key-value call on this coordinator's key-value stream (opened if needed).
    async fn key_value(
        &self,
        call: key_value_call::Call,
        timeout: Duration,
    ) -> Result<key_value_result::Result, Failure> {
        let stream = self
            .stream
            .get(|calls| {
                let mut client = self.client.clone();
                let store = self.idempotency_store.clone();
                async move {
                    let opened = client.key_value_stream(calls).await;
                    if opened.is_ok() {
                        tokio::spawn(Self::describe(client, store));
                    }
                    opened
                }
            })
            .await
            .map_err(Failure::NotSent)?;
        let request_id = crate::rpc::trace::current().unwrap_or_default();
        let answer = stream
            .call(
                |id| pb::KeyValueCall {
                    id,
                    call: Some(call),
                    request_id,
                },
                timeout,
            )
            .await;
        match answer.map(|a| a.result) {
            Ok(Some(key_value_result::Result::Error(detail))) => {
                Err(Failure::Answered(tonic::Status::with_details(
                    tonic::Code::Unknown,
                    detail.message.clone(),
                    detail.encode_to_vec().into(),
                )))
            }
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(Failure::Answered(tonic::Status::internal(
                "empty answer from the coordinator",
            ))),
            Err(e @ (MuxError::Closed | MuxError::Busy)) => {
                Err(Failure::NotSent(tonic::Status::unavailable(e.to_string())))
            }
            Err(e @ MuxError::Broken) => {
                Err(Failure::Lost(tonic::Status::unavailable(e.to_string())))
            }
            Err(MuxError::TimedOut) => Err(Failure::TimedOut(tonic::Status::deadline_exceeded(
                "the coordinator did not answer in time",
            ))),
        }
    }
}

/// The request did not reach a coordinator, or its connection broke before the answer (safe
/// to send to another one).
fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && coordinator_detail(status).is_none()
}
