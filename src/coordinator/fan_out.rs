//! Calling every storage node of a list at once, each within a timeout: the shape of every
//! cluster-wide administration call (health of the node list, snapshots, tenant purges).

use std::time::Duration;

use crate::meta::NodeRecord;
use crate::rpc::auth::InternalChannel;
use crate::rpc::storage::storage_node_client::StorageNodeClient;

use super::Coordinator;

/// What one node answered (a node that could not be called, or did not answer in time, as an
/// UNAVAILABLE or DEADLINE_EXCEEDED status).
pub type NodeAnswer<T> = (NodeRecord, Result<T, tonic::Status>);

impl Coordinator {
    /// Calls every node in parallel, each within `timeout`.
    pub(super) async fn each_node<T, F, Fut>(
        &self,
        nodes: &[NodeRecord],
        timeout: Duration,
        call: F,
    ) -> Vec<NodeAnswer<T>>
    where
        F: Fn(StorageNodeClient<InternalChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let calls = nodes.iter().map(|n| {
            let address = format!("{}:{}", n.host, n.port);
            let client = self.pool.client(&n.node_id, &address);
            let call = client.map(&call);
            async move {
                let result = match call {
                    Ok(call) => match tokio::time::timeout(timeout, call).await {
                        Ok(r) => r.map(tonic::Response::into_inner),
                        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
                    },
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                (n.clone(), result)
            }
        });
        futures::future::join_all(calls).await
    }
}
