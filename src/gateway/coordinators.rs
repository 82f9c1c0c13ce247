//! The gateway's coordinator client: one lazily connected HTTP/2 channel per coordinator,
//! requests spread round-robin, and failover: when a coordinator cannot be reached (a transport
//! failure, which carries no pairdb `ErrorDetail`, so the request never ran there) the same
//! request goes to the next one. A coordinator's own answers, errors included, are final.
//! A coordinator that failed, or timed out (that request is answered 503, not retried: it may
//! have run), is tried last for a second.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::coordinator::errors::detail_in;
use crate::rpc::coordinator::coordinator_client::CoordinatorClient;

const BACKOFF: Duration = Duration::from_secs(1);

pub type Client = CoordinatorClient<Channel>;

struct Member {
    address: String,
    client: Client,
    failed_at: Mutex<Option<Instant>>,
}

pub struct Coordinators {
    members: Vec<Member>,
    next: AtomicUsize,
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
                Ok(Member {
                    address: address.clone(),
                    client: CoordinatorClient::new(endpoint.connect_lazy())
                        .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES),
                    failed_at: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            members,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `call` on a coordinator, failing over to the others on transport failures.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Healthy members first (in round-robin order), then the ones that failed recently.
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        order.sort_by_key(|i| self.members[*i].recently_failed());
        let mut last = tonic::Status::unavailable("no coordinators configured");
        for i in order {
            let member = &self.members[i];
            match call(member.client.clone()).await {
                Ok(response) => {
                    *member.failed_at.lock() = None;
                    return Ok(response.into_inner());
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
}

/// The request did not reach a coordinator (safe to send to another one).
fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && detail_in(status).is_none()
}
