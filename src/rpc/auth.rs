//! Internal authentication with the cluster secret (OPERATIONS.md, "Internal authentication").
//!
//! Every gRPC call between roles (gateway -> coordinator -> storage, storage -> storage
//! streaming) carries the cluster secret in the [`SECRET_HEADER`] metadata entry, and every
//! role's gRPC server refuses a call without it, or with another, as `UNAUTHENTICATED` before any
//! handler runs. Gossip datagrams carry an HMAC-SHA256 of their bytes keyed by the same secret
//! ([`ClusterSecret::gossip_tag`]); a datagram without a valid tag is dropped.
//!
//! # Invariants
//! - The comparison takes the same time whatever the given value: both sides are hashed to
//!   SHA-256 first and the digests compared with `subtle`, so neither a prefix nor the secret's
//!   length leaks through timing.
//! - The secret is never logged: [`ClusterSecret`]'s `Debug` prints no part of it.
//! - Without TLS the secret crosses the internal network in clear text; it closes an open port to
//!   whoever does not know it, not to whoever can read the internal traffic.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::tls::InternalTls;

/// The metadata entry that carries the secret.
pub const SECRET_HEADER: &str = "x-pairdb-cluster-secret";
/// A shorter secret is refused at start.
pub const MIN_SECRET_LEN: usize = 16;
/// Bytes of a gossip datagram's tag (a full HMAC-SHA256).
pub const GOSSIP_TAG_LEN: usize = 32;

/// Why a configured secret cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretError {
    #[error("the cluster secret must be at least {MIN_SECRET_LEN} characters (it has {0})")]
    TooShort(usize),
    #[error(
        "the cluster secret must be printable ASCII without spaces (it travels in a gRPC header)"
    )]
    NotPrintable,
}

/// The shared secret of one cluster.
#[derive(Clone)]
pub struct ClusterSecret {
    header: MetadataValue<Ascii>,
    digest: [u8; 32],
    key: Vec<u8>,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// A secret from its text: at least [`MIN_SECRET_LEN`] characters of printable ASCII.
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::NotPrintable);
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(secret.len()));
        }
        let header = MetadataValue::try_from(secret).map_err(|_| SecretError::NotPrintable)?;
        Ok(Self {
            header,
            digest: Sha256::digest(secret.as_bytes()).into(),
            key: secret.as_bytes().to_vec(),
        })
    }

    /// The text of a fresh random secret: 64 hex digits (`pairdb dev`, whose roles share one
    /// process; `pairdb cert`-less test clusters).
    pub fn random_text() -> String {
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    }

    /// Whether `given` is this secret, in time independent of `given`.
    pub fn matches(&self, given: &[u8]) -> bool {
        let given: [u8; 32] = Sha256::digest(given).into();
        bool::from(self.digest.ct_eq(&given))
    }

    /// The HMAC-SHA256 of a gossip datagram's payload.
    pub fn gossip_tag(&self, payload: &[u8]) -> [u8; GOSSIP_TAG_LEN] {
        self.mac(GOSSIP_DOMAIN, payload)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the payload's HMAC (constant time).
    pub fn gossip_tag_matches(&self, payload: &[u8], tag: &[u8]) -> bool {
        self.mac(GOSSIP_DOMAIN, payload).verify_slice(tag).is_ok()
    }

    /// The HMAC-SHA256 of `payload` under this secret, for `domain` (what the tag is for: a tag
    /// made for one use never verifies for another).
    pub fn tag(&self, domain: &[u8], payload: &[u8]) -> [u8; 32] {
        self.mac(domain, payload).finalize().into_bytes().into()
    }

    /// Whether `tag` is `payload`'s HMAC for `domain`, or its first `tag.len()` (>= 16) bytes
    /// (constant time).
    pub fn tag_matches(&self, domain: &[u8], payload: &[u8], tag: &[u8]) -> bool {
        tag.len() >= 16 && self.mac(domain, payload).verify_truncated_left(tag).is_ok()
    }

    fn mac(&self, domain: &[u8], payload: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(domain);
        mac.update(payload);
        mac
    }
}

/// What gossip tags are for (the first bytes every gossip MAC covers).
const GOSSIP_DOMAIN: &[u8] = b"pairdb-gossip\0";

/// Client side: adds the secret to every call, and the id of the request the caller works for
/// (`rpc::trace`), if any.
#[derive(Clone, Debug)]
pub struct AttachSecret(ClusterSecret);

impl Interceptor for AttachSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(SECRET_HEADER, self.0.header.clone());
        if let Some(id) = super::trace::current().and_then(|id| MetadataValue::try_from(id).ok()) {
            metadata.insert(super::trace::HEADER, id);
        }
        Ok(request)
    }
}

/// A channel to another role whose calls carry the secret.
pub type InternalChannel = InterceptedService<Channel, AttachSecret>;

/// Wraps `channel` so its calls carry `secret`.
pub fn internal_channel(channel: Channel, secret: &ClusterSecret) -> InternalChannel {
    InterceptedService::new(channel, AttachSecret(secret.clone()))
}

/// How this process authenticates its internal calls: the secret always, mutual TLS with the
/// cluster CA when configured (`rpc::tls`).
#[derive(Clone, Debug)]
pub struct InternalAuth {
    pub secret: ClusterSecret,
    pub tls: Option<InternalTls>,
}

impl InternalAuth {
    /// An endpoint for `address` (`host:port`): `https` with the node certificate when TLS is
    /// on, else `http`.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        match &self.tls {
            Some(tls) => {
                Endpoint::from_shared(format!("https://{address}"))?.tls_config(tls.client())
            }
            None => Endpoint::from_shared(format!("http://{address}")),
        }
    }

    /// A channel to `endpoint`, connected on first use, whose calls carry the secret.
    pub fn channel(&self, endpoint: &Endpoint) -> InternalChannel {
        internal_channel(endpoint.connect_lazy(), &self.secret)
    }

    /// [`Self::channel`] over connections that deliver what is sent within `bound` or fail
    /// ([`crate::net::BoundedDelivery`]): for calls that must not run long after their caller
    /// gave up on them.
    pub fn bounded_channel(&self, endpoint: &Endpoint, bound: Duration) -> InternalChannel {
        let connector = crate::net::BoundedDelivery { bound };
        internal_channel(
            endpoint.connect_with_connector_lazy(connector),
            &self.secret,
        )
    }
}

/// Server side: refuses a call that does not carry the secret.
#[derive(Clone, Debug)]
pub struct RequireSecret(ClusterSecret);

impl RequireSecret {
    pub fn new(secret: ClusterSecret) -> Self {
        Self(secret)
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get(SECRET_HEADER) {
            Some(given) if self.0.matches(given.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "internal call with a wrong cluster secret",
            )),
            None => Err(Status::unauthenticated(format!(
                "internal call without the cluster secret (the {SECRET_HEADER} header)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_unprintable_secrets_are_refused() {
        assert_eq!(
            ClusterSecret::new("short").err(),
            Some(SecretError::TooShort(5))
        );
        assert_eq!(
            ClusterSecret::new("sixteen chars  x").err(),
            Some(SecretError::NotPrintable)
        );
        assert_eq!(
            ClusterSecret::new("é-0123456789abcdef").err(),
            Some(SecretError::NotPrintable)
        );
        assert!(ClusterSecret::new("0123456789abcdef").is_ok());
    }

    #[test]
    fn only_the_secret_matches() {
        let s = ClusterSecret::new("0123456789abcdef").expect("valid");
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcdeF"));
        assert!(!s.matches(b"0123456789abcdef0"));
        assert!(!s.matches(b""));
        assert!(!format!("{s:?}").contains("0123"));
    }

    #[test]
    fn the_server_interceptor_lets_only_the_secret_in() {
        let s = ClusterSecret::new("0123456789abcdef").expect("valid");
        let other = ClusterSecret::new("fedcba9876543210").expect("valid");
        let mut require = RequireSecret::new(s.clone());
        let signed = AttachSecret(s).call(Request::new(())).expect("attach");
        assert!(require.call(signed).is_ok());
        let wrong = AttachSecret(other).call(Request::new(())).expect("attach");
        let refused = require.call(wrong).expect_err("wrong secret");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let bare = require.call(Request::new(())).expect_err("no secret");
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn gossip_tags_bind_payload_and_secret() {
        let s = ClusterSecret::new("0123456789abcdef").expect("valid");
        let other = ClusterSecret::new("fedcba9876543210").expect("valid");
        let tag = s.gossip_tag(b"syn");
        assert!(s.gossip_tag_matches(b"syn", &tag));
        assert!(!s.gossip_tag_matches(b"syN", &tag));
        assert!(!other.gossip_tag_matches(b"syn", &tag));
        assert!(!s.gossip_tag_matches(b"syn", &tag[..31]));
        let random = ClusterSecret::random_text();
        assert!(ClusterSecret::new(&random).is_ok());
        assert_ne!(random, ClusterSecret::random_text());
    }
}
