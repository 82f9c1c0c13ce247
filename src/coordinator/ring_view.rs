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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::meta::{MetaError, MetadataStore, NodeRecord, Registry};
use crate::ring::{NodeState, ReplicaPlan, Ring, key_position};

use super::errors::CoordError;
use super::membership::Membership;

/// One registry snapshot: the ring and where each node listens.
#[derive(Default)]
pub struct Snapshot {
    pub ring: Ring,
    /// [`Ring::digest`] of `ring` (0 for the empty default).
    pub ring_digest: u64,
    /// The registry's epoch (0 for the empty default): what storage nodes' ring fence compares.
    pub epoch: u64,
    pub nodes: Vec<NodeRecord>,
    addresses: HashMap<String, String>,
}

impl Snapshot {
    pub(crate) fn new(registry: Registry) -> Self {
        let Registry { epoch, nodes } = registry;
        let ring = Ring::new(nodes.iter().map(NodeRecord::ring_node));
        let addresses = nodes
            .iter()
            .map(|n| (n.node_id.clone(), format!("{}:{}", n.host, n.port)))
            .collect();
        Self {
            ring_digest: ring.digest(),
            epoch,
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

/// How long a request waits for [`RingView::fresh`] to re-read the registry.
pub const REREAD_TIMEOUT: Duration = Duration::from_millis(500);

pub struct RingView {
    store: Arc<dyn MetadataStore>,
    membership: Arc<Membership>,
    current: ArcSwap<Snapshot>,
    /// When `current` was last replaced by a different registry (or first loaded), on this
    /// process's monotonic clock.
    changed_at: Mutex<Instant>,
    /// When the registry was last read (changed or not), or [`RingView::fresh`] last tried
    /// to read it, whether that worked or not.
    checked_at: Mutex<Instant>,
    /// Held by the one request that re-reads a registry found too old ([`RingView::fresh`]).
    rereading: tokio::sync::Mutex<()>,
    /// A storage node refused a call placed on `current` (`STALE_RING`): the next
    /// [`RingView::fresh`] reads the registry again whatever its age.
    refused: AtomicBool,
}

impl RingView {
    /// Reads the registry once; fails if the metadata store cannot be read.
    pub async fn load(
        store: Arc<dyn MetadataStore>,
        membership: Arc<Membership>,
    ) -> Result<Arc<RingView>, MetaError> {
        let registry = store.registry().await?;
        Ok(Arc::new(RingView {
            store,
            membership,
            current: ArcSwap::from_pointee(Snapshot::new(registry)),
            changed_at: Mutex::new(Instant::now()),
            checked_at: Mutex::new(Instant::now()),
            rereading: tokio::sync::Mutex::new(()),
            refused: AtomicBool::new(false),
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
        let registry = self.store.registry().await?;
        let held = self.current.load();
        if registry.epoch != held.epoch || registry.nodes != held.nodes {
            tracing::info!(
                nodes = registry.nodes.len(),
                epoch = registry.epoch,
                "ring changed"
            );
            self.current.store(Arc::new(Snapshot::new(registry)));
            *self.changed_at.lock() = Instant::now();
        }
        *self.checked_at.lock() = Instant::now();
        Ok(())
    }

    /// The ring as last read, read again first when that was more than `max_age` ago: a
    /// coordinator that was stalled (SIGSTOP, a frozen VM, a starved refresh loop) does not
    /// place requests on the ring it had before the stall. Concurrent callers wait for one
    /// read. When the registry cannot be read within [`REREAD_TIMEOUT`], the last ring serves
    /// (counted in `pairdb_coordinator_stale_ring_total`) and no request tries again for
    /// `max_age`: the metadata store being down costs one request in that time half a second,
    /// and does not stop the request paths.
    pub async fn fresh(&self, max_age: Duration) -> Arc<Snapshot> {
        let due =
            || self.refused.load(Ordering::Acquire) || self.checked_at.lock().elapsed() > max_age;
        if !due() {
            return self.snapshot();
        }
        let _one = self.rereading.lock().await;
        if due() {
            // The ring stays due until the read is done (`refresh` marks it checked), so a
            // caller that comes meanwhile waits for it instead of taking the old ring.
            let reread = tokio::time::timeout(REREAD_TIMEOUT, self.refresh()).await;
            self.refused.store(false, Ordering::Release);
            if !matches!(reread, Ok(Ok(()))) {
                *self.checked_at.lock() = Instant::now();
                metrics::counter!("pairdb_coordinator_stale_ring_total").increment(1);
                tracing::warn!(
                    "cannot re-read a registry older than {max_age:?}; serving the last ring"
                );
            }
        }
        self.snapshot()
    }

    /// A storage node refused a call placed on the ring of `epoch` as stale (`STALE_RING`):
    /// unless the ring was read again since, the next [`RingView::fresh`] reads it again.
    pub fn refused_as_stale(&self, epoch: u64) {
        metrics::counter!("pairdb_coordinator_stale_ring_refusals_total").increment(1);
        if self.current.load().epoch <= epoch {
            self.refused.store(true, Ordering::Release);
        }
    }

    /// How long this coordinator has served the registry it holds now, on its own monotonic
    /// clock: no other node's wall clock enters it.
    pub fn unchanged_for(&self) -> Duration {
        self.changed_at.lock().elapsed()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::SqlMetadataStore;

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            host: "127.0.0.1".into(),
            port: 7000,
            virtual_nodes: 8,
            tokens: None,
            state: NodeState::Active,
        }
    }

    /// A registry of one node (`s1`) in SQLite under `dir`, and a view of it.
    async fn one_node_view(dir: &std::path::Path) -> (Arc<dyn MetadataStore>, Arc<RingView>) {
        let url = format!("sqlite://{}", dir.join("meta.db").display());
        let store: Arc<dyn MetadataStore> =
            Arc::new(SqlMetadataStore::connect(&url).await.expect("store"));
        store.add_node(&node("s1")).await.expect("add s1");
        let view = RingView::load(store.clone(), Arc::new(Membership::default()))
            .await
            .expect("load");
        (store, view)
    }

    /// Two requests after a stall (the ring older than `max_age`): both wait for the one read
    /// of the registry and are placed on the ring it found. The second used to see the read
    /// in progress as done and take the ring from before the stall.
    #[tokio::test]
    async fn requests_that_find_a_read_of_the_registry_under_way_wait_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, view) = one_node_view(dir.path()).await;
        let max_age = Duration::from_millis(50);
        tokio::time::sleep(max_age * 2).await;
        store.add_node(&node("s2")).await.expect("add s2");
        let (first, second) = tokio::join!(view.fresh(max_age), view.fresh(max_age));
        assert_eq!(first.nodes.len(), 2);
        assert_eq!(
            second.nodes.len(),
            2,
            "the second request took the old ring"
        );
    }

    /// The time a registry is held (what a cleanup's settle wait counts on this coordinator's
    /// own clock) grows across refreshes that find nothing new and starts again at a change.
    #[tokio::test]
    async fn the_time_a_registry_is_held_starts_again_only_at_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, view) = one_node_view(dir.path()).await;
        let pause = Duration::from_millis(300);
        tokio::time::sleep(pause).await;
        view.refresh().await.expect("refresh");
        assert!(view.unchanged_for() >= pause, "{:?}", view.unchanged_for());

        store.add_node(&node("s2")).await.expect("add s2");
        view.refresh().await.expect("refresh");
        assert_eq!(view.snapshot().nodes.len(), 2);
        assert!(view.unchanged_for() < pause, "{:?}", view.unchanged_for());
    }

    /// A refusal of a call placed on the ring held (`STALE_RING`) makes the next request read
    /// the registry again however young the ring is, and picks up a new epoch even when the
    /// nodes look the same; a refusal of an older ring's call, once a newer one is held, does
    /// not.
    #[tokio::test]
    async fn a_stale_ring_refusal_makes_the_next_request_read_the_registry_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, view) = one_node_view(dir.path()).await;
        let held = view.snapshot().epoch;
        assert!(held > 0);
        // A state change and back: the same nodes, a newer registry.
        store
            .set_node_state("s1", NodeState::Draining)
            .await
            .expect("state");
        store
            .set_node_state("s1", NodeState::Active)
            .await
            .expect("state");
        let hour = Duration::from_secs(3600);
        assert_eq!(view.fresh(hour).await.epoch, held, "young: not read again");
        view.refused_as_stale(held);
        let now = view.fresh(hour).await;
        assert!(now.epoch > held, "read again after the refusal");
        view.refused_as_stale(held);
        store.add_node(&node("s2")).await.expect("add s2");
        assert_eq!(
            view.fresh(hour).await.nodes.len(),
            1,
            "a late refusal of an older ring's call reads nothing again"
        );
    }

    /// A ring read longer ago than the caller allows is read again before it serves; a young
    /// one is served as it is (no refresh loop runs here).
    #[tokio::test]
    async fn a_ring_older_than_allowed_is_read_again_before_it_serves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, view) = one_node_view(dir.path()).await;
        store.add_node(&node("s2")).await.expect("add s2");
        let young = view.fresh(Duration::from_secs(3600)).await;
        assert_eq!(young.nodes.len(), 1, "read again although young");
        let old = view.fresh(Duration::ZERO).await;
        assert_eq!(
            old.nodes.len(),
            2,
            "served an old ring without reading it again"
        );
    }
}
