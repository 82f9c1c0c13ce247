//! One pooled gRPC channel per storage node (tonic channels multiplex requests over HTTP/2, so
//! one per node is enough), created lazily and replaced when a node's address changes.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::RwLock;
use tonic::transport::{Channel, Endpoint};

use crate::rpc::storage::storage_node_client::StorageNodeClient;

/// Largest message to or from a storage node: a 10 MiB value plus its record.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
pub struct StoragePool {
    clients: RwLock<HashMap<String, (String, StorageNodeClient<Channel>)>>,
}

impl StoragePool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A client for `node_id` at `address` (`host:port`).
    pub fn client(
        &self,
        node_id: &str,
        address: &str,
    ) -> Result<StorageNodeClient<Channel>, String> {
        if let Some((addr, client)) = self.clients.read().get(node_id) {
            if addr == address {
                return Ok(client.clone());
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("bad address {address:?} for {node_id}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = StorageNodeClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.clients
            .write()
            .insert(node_id.to_owned(), (address.to_owned(), client.clone()));
        Ok(client)
    }
}
