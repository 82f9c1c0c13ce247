//! Listener helpers shared by the roles. Every accepted connection gets `TCP_NODELAY`: gRPC and
//! HTTP/2 write a response as several small frames, and with Nagle's algorithm on, the last one
//! waits for the peer's delayed ACK (~40 ms on Linux), which dominated request latency before.

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
