//! Gossip datagrams signed with the cluster secret: chitchat's UDP wire format followed by an
//! HMAC-SHA256 tag of it ([`ClusterSecret::gossip_tag`]).
//!
//! chitchat keeps its wire codec private, so the codec runs through a loopback pair: chitchat's
//! own UDP socket (`codec`, on an ephemeral 127.0.0.1 port) encodes an envelope by sending it to
//! `relay`, which signs the bytes and sends them from the public gossip socket; a verified
//! datagram from the public socket is handed to `codec` through `relay` to be decoded. Gossip is
//! a few small datagrams per node per 200 ms, so the extra loopback hop costs nothing measurable.
//!
//! # Invariants
//! - A datagram reaches chitchat only when its tag verifies: a node without the secret can
//!   neither join the membership nor change what the members say about each other.
//! - Only datagrams between `codec` and `relay` cross the loopback pair: each side drops what
//!   comes from any other address (another local process writing to the ephemeral ports).
//! - `pending` holds, in order, the peer address of every verified datagram handed to `codec`
//!   and not yet decoded, so a `recv` that chitchat cancels half-way leaves nothing misattributed
//!   (loopback UDP keeps order).
//! - A datagram that fails is dropped and counted (`pairdb_gossip_rejected_total`), never an
//!   error of the socket: chitchat ends its gossip on a transport error.
//! - A captured datagram can be replayed, but chitchat ignores states older than it holds, so a
//!   replay can only repeat what a member already said.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use tokio::net::UdpSocket as TokioUdp;

use crate::rpc::auth::{ClusterSecret, GOSSIP_TAG_LEN};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// How long an envelope may take to cross the loopback pair before it is dropped.
const CODEC_TIMEOUT: Duration = Duration::from_secs(1);

/// chitchat's UDP transport with every datagram signed.
pub struct SignedUdpTransport {
    pub secret: ClusterSecret,
}

#[async_trait]
impl Transport for SignedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = TokioUdp::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let codec = UdpSocket::open(loopback).await?;
        let relay = TokioUdp::bind(loopback)
            .await
            .context("failed to bind the gossip codec's loopback socket")?;
        Ok(Box::new(SignedUdpSocket {
            codec_addr: codec.local_addr()?,
            relay_addr: relay.local_addr()?,
            codec,
            relay,
            public,
            secret: self.secret.clone(),
            buf: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            pending: VecDeque::new(),
        }))
    }
}

struct SignedUdpSocket {
    public: TokioUdp,
    codec: UdpSocket,
    codec_addr: SocketAddr,
    relay: TokioUdp,
    relay_addr: SocketAddr,
    secret: ClusterSecret,
    buf: Box<[u8]>,
    /// Peers of the verified datagrams handed to `codec`, oldest first.
    pending: VecDeque<SocketAddr>,
}

/// The payload of a datagram signed with `secret`, or `None`.
fn verified<'a>(secret: &ClusterSecret, datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(GOSSIP_TAG_LEN)?;
    let (payload, tag) = datagram.split_at(split);
    secret.gossip_tag_matches(payload, tag).then_some(payload)
}

fn rejected(from: SocketAddr, why: &'static str) {
    metrics::counter!("pairdb_gossip_rejected_total").increment(1);
    tracing::debug!(from = %from, why, "gossip datagram dropped");
}

impl SignedUdpSocket {
    /// The wire bytes of `envelope`, encoded by chitchat's codec.
    async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Option<usize>> {
        self.codec.send(self.relay_addr, envelope).await?;
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        loop {
            let received =
                tokio::time::timeout_at(deadline, self.relay.recv_from(&mut self.buf)).await;
            match received {
                Err(_elapsed) => return Ok(None),
                Ok(Ok((len, from))) if from == self.codec_addr => return Ok(Some(len)),
                Ok(Ok((_, from))) => rejected(from, "not from the gossip codec"),
                Ok(Err(e)) if is_transient(&e) => {}
                Ok(Err(e)) => return Err(e).context("gossip codec socket failed"),
            }
        }
    }
}

#[async_trait]
impl Socket for SignedUdpSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.public
            .local_addr()
            .context("failed to get the gossip socket's address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let Some(len) = self.encode(envelope).await? else {
            tracing::debug!(to = %to, "gossip message lost in the codec");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let Some(payload) = self.buf.get(..len) else {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let mut datagram = Vec::with_capacity(len + GOSSIP_TAG_LEN);
        datagram.extend_from_slice(payload);
        datagram.extend_from_slice(&self.secret.gossip_tag(payload));
        match self.public.send_to(&datagram, to).await {
            Ok(num_bytes_sent) => Ok(SendOutcome { num_bytes_sent }),
            // A peer that is gone, or a datagram too big: this message is lost, gossip goes on.
            Err(e) => {
                tracing::debug!(error = %e, to = %to, "gossip send failed");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if self.pending.is_empty() {
                let (len, from) = match self.public.recv_from(&mut self.buf).await {
                    Ok(received) => received,
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(e).context("gossip socket failed"),
                };
                let datagram = self.buf.get(..len).unwrap_or_default();
                let Some(payload) = verified(&self.secret, datagram) else {
                    rejected(from, "no valid signature");
                    continue;
                };
                self.relay
                    .send_to(payload, self.codec_addr)
                    .await
                    .context("gossip codec socket failed")?;
                self.pending.push_back(from);
            }
            let decoded = self.codec.recv().await?;
            if decoded.from_addr != self.relay_addr {
                rejected(decoded.from_addr, "not from the gossip relay");
                continue;
            }
            if let Some(from_addr) = self.pending.pop_front() {
                return Ok(RecvOutcome {
                    from_addr,
                    ..decoded
                });
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::OutOfMemory
            | std::io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_datagrams_signed_with_the_secret_verify() {
        let ours = ClusterSecret::new("0123456789abcdef").expect("valid");
        let theirs = ClusterSecret::new("fedcba9876543210").expect("valid");
        let sign = |secret: &ClusterSecret, payload: &[u8]| {
            let mut d = payload.to_vec();
            d.extend_from_slice(&secret.gossip_tag(payload));
            d
        };
        let good = sign(&ours, b"chitchat bytes");
        assert_eq!(verified(&ours, &good), Some(&b"chitchat bytes"[..]));
        assert_eq!(verified(&ours, &sign(&theirs, b"chitchat bytes")), None);
        assert_eq!(verified(&ours, b"chitchat bytes"), None);
        assert_eq!(verified(&ours, &[]), None);
        let mut flipped = good.clone();
        if let Some(b) = flipped.first_mut() {
            *b ^= 1;
        }
        assert_eq!(verified(&ours, &flipped), None);
    }

    /// Two sockets of one secret exchange an envelope through the whole path (codec, signature,
    /// relay); a socket of another secret's datagrams never come out.
    #[tokio::test]
    async fn envelopes_cross_between_members_only() {
        let ours = ClusterSecret::new("0123456789abcdef").expect("valid");
        let theirs = ClusterSecret::new("fedcba9876543210").expect("valid");
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let transport = |secret: &ClusterSecret| SignedUdpTransport {
            secret: secret.clone(),
        };
        let mut a = transport(&ours).open(any).await.expect("a");
        let mut b = transport(&ours).open(any).await.expect("b");
        let mut stranger = transport(&theirs).open(any).await.expect("stranger");
        let b_addr = b.local_addr().expect("addr");
        let envelope = || ChitchatEnvelope {
            version: chitchat::ProtocolVersion::V1,
            message: chitchat::ChitchatMessage::BadCluster,
        };
        stranger.send(b_addr, envelope()).await.expect("send");
        a.send(b_addr, envelope()).await.expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .expect("b receives")
            .expect("recv");
        assert_eq!(got.from_addr, a.local_addr().expect("addr"));
        assert_eq!(got.envelope, envelope());
        // Nothing else arrives: the stranger's datagram was dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b.recv())
                .await
                .is_err()
        );
    }
}
