//! One pooled gRPC channel per storage node (tonic channels multiplex requests over HTTP/2, so
//! one per node is enough), created lazily and replaced when a node's address changes, and the
//! node's request batcher on top of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::rpc::auth::{InternalAuth, InternalChannel};
use crate::rpc::storage::storage_node_client::StorageNodeClient;

use super::batcher::NodeBatcher;

type Batchers = HashMap<String, (String, Arc<NodeBatcher>)>;

/// A node's registered address is not a `host:port` a channel can be made for.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad address {address:?} for storage node {node}: {reason}")]
pub struct BadAddress {
    pub node: String,
    pub address: String,
    pub reason: String,
}

pub struct StoragePool {
    clients: RwLock<HashMap<String, (String, StorageNodeClient<InternalChannel>)>>,
    batchers: RwLock<Batchers>,
    batch_in_flight: usize,
    /// Carried by every call to a storage node.
    auth: InternalAuth,
    /// The batchers' link tasks ([`StoragePool::close`] waits for them).
    links: tokio_util::task::TaskTracker,
}

impl StoragePool {
    /// The cluster secret every call carries (also the key of the coordinators' own tags,
    /// e.g. listing cursors).
    pub fn secret(&self) -> &crate::rpc::auth::ClusterSecret {
        &self.auth.secret
    }

    /// A pool whose calls are authenticated with `auth`.
    pub fn new(auth: InternalAuth) -> Self {
        Self::with_batch_in_flight(super::batcher::IN_FLIGHT, auth)
    }

    /// A pool whose batchers keep at most `in_flight` batches outstanding per node and kind.
    pub fn with_batch_in_flight(in_flight: usize, auth: InternalAuth) -> Self {
        Self {
            auth,
            clients: RwLock::new(HashMap::new()),
            batchers: RwLock::new(HashMap::new()),
            batch_in_flight: in_flight,
            links: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Drops every batcher and waits up to `within` for their links to send what they hold
    /// (call after the requests and their stragglers ended). Returns whether all ended.
    pub async fn close(&self, within: Duration) -> bool {
        self.batchers.write().clear();
        self.links.close();
        tokio::time::timeout(within, self.links.wait())
            .await
            .is_ok()
    }

    /// A client for `node_id` at `address` (`host:port`).
    pub fn client(
        &self,
        node_id: &str,
        address: &str,
    ) -> Result<StorageNodeClient<InternalChannel>, BadAddress> {
        if let Some((addr, client)) = self.clients.read().get(node_id) {
            if addr == address {
                return Ok(client.clone());
            }
        }
        let endpoint = self
            .auth
            .endpoint(address)
            .map_err(|e| BadAddress {
                node: node_id.to_owned(),
                address: address.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = StorageNodeClient::new(self.auth.channel(&endpoint))
            .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES);
        self.clients
            .write()
            .insert(node_id.to_owned(), (address.to_owned(), client.clone()));
        Ok(client)
    }

    /// The batcher of `node_id` at `address` (`host:port`), started on first use.
    pub fn batcher(&self, node_id: &str, address: &str) -> Result<Arc<NodeBatcher>, BadAddress> {
        if let Some((addr, batcher)) = self.batchers.read().get(node_id) {
            if addr == address {
                return Ok(batcher.clone());
            }
        }
        let client = self.client(node_id, address)?;
        let mut batchers = self.batchers.write();
        match batchers.get(node_id) {
            Some((addr, batcher)) if addr == address => Ok(batcher.clone()),
            _ => {
                let batcher = NodeBatcher::start(
                    node_id.to_owned(),
                    client,
                    self.batch_in_flight,
                    &self.links,
                );
                batchers.insert(node_id.to_owned(), (address.to_owned(), batcher.clone()));
                Ok(batcher)
            }
        }
    }
}
