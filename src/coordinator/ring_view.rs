//! The coordinator's view of the cluster: the ring built from the node registry in the metadata
//! store, re-read every `ring_refresh` so coordinators sharing one store see each other's ring
//! changes within seconds, with gossip's `down` marks laid over it per request.
//!
//! Invariants: a plan is computed against one ring snapshot (an `Arc` swapped whole, never
//! mutated); a natural owner the registry calls `active` but gossip reports unreachable is
//! planned as `down`: still authoritative (it is expected back, its writes become hints), never
//! asked for reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::meta::{MetaError, MetadataStore, NodeRecord};
use crate::ring::{NodeState, ReplicaPlan, Ring, key_position};

use super::errors::CoordError;
use super::membership::Membership;

/// One registry snapshot: the ring and where each node listens.
#[derive(Default)]
pub struct Snapshot {
    pub ring: Ring,
    /// [`Ring::digest`] of `ring` (0 for the empty default).
    pub ring_digest: u64,
    pub nodes: Vec<NodeRecord>,
    addresses: HashMap<String, String>,
}

impl Snapshot {
    fn new(nodes: Vec<NodeRecord>) -> Self {
        let ring = Ring::new(nodes.iter().map(NodeRecord::ring_node));
        let addresses = nodes
            .iter()
            .map(|n| (n.node_id.clone(), format!("{}:{}", n.host, n.port)))
            .collect();
        Self {
            ring_digest: ring.digest(),
            ring,
            nodes,
            addresses,
        }
    }

    /// `host:port` of a node's gRPC listener.
    pub fn address(&self, node: &str) -> Option<&str> {
        self.addresses.get(node).map(String::as_str)
    }
}

pub struct RingView {
    store: Arc<dyn MetadataStore>,
    membership: Arc<Membership>,
    current: ArcSwap<Snapshot>,
}

impl RingView {
    /// Reads the registry once; fails if the metadata store cannot be read.
    pub async fn load(
        store: Arc<dyn MetadataStore>,
        membership: Arc<Membership>,
    ) -> Result<Arc<RingView>, MetaError> {
        let nodes = store.list_nodes().await?;
        Ok(Arc::new(RingView {
            store,
            membership,
            current: ArcSwap::from_pointee(Snapshot::new(nodes)),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Re-reads the registry now (after a local change, or from the refresh loop).
    pub async fn refresh(&self) -> Result<(), MetaError> {
        let nodes = self.store.list_nodes().await?;
        if nodes != self.current.load().nodes {
            tracing::info!(nodes = nodes.len(), "ring changed");
            self.current.store(Arc::new(Snapshot::new(nodes)));
        }
        Ok(())
    }

    /// Keeps refreshing every `every` until the role stops; a failed read keeps the last ring.
    pub fn spawn_refresh(self: &Arc<Self>, every: Duration, tasks: &crate::shutdown::Tasks) {
        let view = self.clone();
        super::periodic::spawn_every(every, tasks, move || {
            let view = view.clone();
            async move {
                if let Err(e) = view.refresh().await {
                    tracing::warn!(error = %e, "cannot re-read the node registry; keeping the last ring");
                }
            }
        });
    }

    /// The replica plan of `(tenant, key)` at replication factor `rf`, with gossip's down marks;
    /// UNAVAILABLE when the ring has no member nodes.
    pub fn plan(
        &self,
        snapshot: &Snapshot,
        tenant: &str,
        key: &[u8],
        rf: usize,
    ) -> Result<ReplicaPlan, CoordError> {
        let mut plan = snapshot.ring.plan(key_position(tenant, key), rf);
        if plan.natural.is_empty() {
            return Err(CoordError::Unavailable(
                "no storage nodes in the ring".to_owned(),
            ));
        }
        for (id, state) in plan.natural.iter_mut().chain(plan.pending.iter_mut()) {
            if *state == NodeState::Active && self.membership.is_down(id.as_str()) {
                *state = NodeState::Down;
            }
        }
        Ok(plan)
    }

    /// Whether the node takes writes now: up, and not reported unhealthy (see `membership`).
    pub fn accepts_writes(&self, node: &str) -> bool {
        !self.membership.is_down(node) && self.membership.accepts_writes(node)
    }

    /// Whether gossip reports the node unreachable.
    pub fn is_down(&self, node: &str) -> bool {
        self.membership.is_down(node)
    }
}
