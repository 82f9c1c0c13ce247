//! Socket helpers shared by the roles.
//!
//! Every accepted connection gets `TCP_NODELAY`: gRPC and HTTP/2 write a response as several
//! small frames, and with Nagle's algorithm on, the last one waits for the peer's delayed ACK
//! (~40 ms on Linux), which dominated request latency before.
//!
//! [`BoundedDelivery`] connects with `TCP_USER_TIMEOUT` set: bytes written to such a connection
//! reach the peer within the bound, or the kernel gives the connection up, drops what it still
//! had to send and resets it. Without it, a call sent into a network partition stays in the
//! sender's queue and is retransmitted when the partition heals, however late: a gateway's
//! write whose client had long been told "outcome unknown" ran 13 s after it was sent
//! (docs/reliability.md, finding 9). Invariant: bytes sent on such a connection at `t` reach
//! the peer's host before `t + bound`, or never (a peer process that is paused reads them when
//! it resumes: the bound is on the network, not on the peer).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

/// Accepted connections of `listener`, with `TCP_NODELAY` set, for tonic's `serve_with_incoming`.
pub fn incoming_nodelay(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        }
        accepted
    })
}

/// A connector for tonic channels (`Endpoint::connect_with_connector_lazy`) whose connections
/// have `TCP_NODELAY` and deliver what is written within `bound` or fail (module docs).
#[derive(Debug, Clone, Copy)]
pub struct BoundedDelivery {
    pub bound: Duration,
}

impl tower_service::Service<http::Uri> for BoundedDelivery {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let bound = self.bound;
        Box::pin(async move { connect_bounded(&uri, bound).await.map(TokioIo::new) })
    }
}

/// Connects to `uri`'s host and port (80 or 443 by its scheme when it names none) with
/// `TCP_NODELAY` and `TCP_USER_TIMEOUT` set to `bound`.
pub async fn connect_bounded(uri: &http::Uri, bound: Duration) -> std::io::Result<TcpStream> {
    let invalid = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {uri}"))
    };
    let host = uri.host().ok_or_else(|| invalid("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, _) => 80,
    };
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(bound))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_bounded_connection_has_its_options_set() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uri: http::Uri = format!("http://{addr}").parse().expect("uri");
        let stream = connect_bounded(&uri, Duration::from_millis(1_500))
            .await
            .expect("connect");
        let socket = socket2::SockRef::from(&stream);
        assert_eq!(
            socket.tcp_user_timeout().expect("getsockopt"),
            Some(Duration::from_millis(1_500))
        );
        assert!(stream.nodelay().expect("nodelay"));
        let no_host: http::Uri = "/path".parse().expect("uri");
        assert!(
            connect_bounded(&no_host, Duration::from_secs(1))
                .await
                .is_err()
        );
    }

    /// What the bound is for, on a path the test can hold back without a firewall: a peer that
    /// takes nothing. Its window closes, nothing written after that is acknowledged, and the
    /// kernel gives the connection up about `bound` later instead of probing forever: the
    /// writer's next write fails with `ETIMEDOUT` (without the option it blocks until the
    /// test's 60 s deadline).
    #[tokio::test]
    async fn bytes_the_peer_does_not_take_within_the_bound_fail_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uri: http::Uri = format!("http://{addr}").parse().expect("uri");
        let mut stream = connect_bounded(&uri, Duration::from_millis(500))
            .await
            .expect("connect");
        let (_peer, _) = listener.accept().await.expect("accept");
        let chunk = vec![0u8; 64 << 10];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let error = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the connection was never given up"
            );
            match tokio::time::timeout(Duration::from_millis(200), stream.write_all(&chunk)).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => break e,
            }
        };
        assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT), "{error}");
    }
}
