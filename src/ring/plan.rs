//! The transfer planner: which changes of the ring may run together, and which hash ranges a
//! change moves, from whom to whom (SEMANTICS.md, "Topology changes"). Pure: no I/O, so it is
//! property-tested against a per-key reference (tests/topology_plan.rs).
//!
//! A node change in progress is written in the ring itself: a `bootstrapping` node joins, a
//! `draining` node leaves. The final ring is the ring with every joiner active and every leaver
//! gone. A node change's transfers are, for every replication factor in use, the ranges whose
//! owners differ between the members now and the final ring ([`moved_ranges_with`]): each
//! receiver gets the range from the owner it replaces, or, when that owner cannot send (dead),
//! from every old owner that can.
//!
//! Invariants:
//! - After a node change's transfers, every final owner of every position holds every record a
//!   live old owner of the position held at its replica slot; when writes reached every owner,
//!   every final owner holds the newest version of every key.
//! - An RF change sends each record a node holds to the owners the new RF adds (raise), or to
//!   every owner that stays (lowering; a write may have reached only the leaving replicas).
//! - Node changes run together; nothing else runs with them. Every node change in progress is
//!   planned together against their combined final ring ([`plan_combined`]), which is valid
//!   when they complete at once (property-tested; the runner commits them in one registry
//!   update). An RF change's copy and a cleanup's drops are planned against a ring that does
//!   not move under them, so they wait for node changes and node changes wait for them. What
//!   would overlap is refused up front ([`may_start`]) with the reason, never accepted and then
//!   failed. RF changes of different tenants touch different keys and may run together.

use std::collections::{BTreeMap, BTreeSet};

use super::{HashRange, NodeId, NodeState, Ring, RingNode, moved_ranges_with};

/// One stream of a plan: the ranges one node sends to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeTransfer {
    pub from: NodeId,
    pub to: NodeId,
    /// Sorted, not overlapping.
    pub ranges: Vec<HashRange>,
}

/// What a node change needs: the ring once it completed, and the transfers still to run.
#[derive(Debug, Clone)]
pub struct NodeChangePlan {
    pub final_ring: Ring,
    pub transfers: Vec<RangeTransfer>,
}

/// A change an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposed<'a> {
    /// Adding or removing a storage node.
    NodeChange,
    /// Changing the replication factor of one tenant.
    RfChange { tenant: &'a str },
    /// Old owners dropping the ranges they no longer own.
    Cleanup,
}

/// A change in progress that is not written in the ring (node changes are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Running {
    RfChange { tenant: String },
    Cleanup { id: String },
}

/// Why a change cannot start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "node {node} is {state}: replication-factor changes and cleanups wait for node changes \
         to finish; wait for its migration (pairdb admin migrations)"
    )]
    NodeChangeInProgress { node: NodeId, state: &'static str },
    #[error(
        "a replication-factor change of tenant {tenant:?} is in progress: nodes are added or \
         removed, and ranges cleaned up, only when no replica set is being copied; wait for its \
         migration to finish (pairdb admin migrations)"
    )]
    RfChangeInProgress { tenant: String },
    #[error("a replication-factor change of tenant {tenant:?} is in progress")]
    SameTenant { tenant: String },
    #[error(
        "cleanup {id} is in progress: ranges are being dropped on the nodes that gave them \
         away; wait for it to finish (pairdb admin migrations)"
    )]
    CleanupInProgress { id: String },
}

/// The nodes joining or leaving in `ring`, with their states.
pub fn node_changes(ring: &Ring) -> Vec<(NodeId, NodeState)> {
    ring.nodes()
        .filter(|n| matches!(n.state, NodeState::Bootstrapping | NodeState::Draining))
        .map(|n| (n.id.clone(), n.state))
        .collect()
}

/// Whether `next` may start while the ring's node changes and `running` are in progress.
/// Node changes (of different nodes) run together and exclude everything else; an RF change
/// excludes node changes, cleanups and another change of its tenant; a cleanup excludes every
/// other change.
pub fn may_start(ring: &Ring, running: &[Running], next: Proposed<'_>) -> Result<(), Refusal> {
    if next != Proposed::NodeChange {
        if let Some((node, state)) = node_changes(ring).into_iter().next() {
            return Err(Refusal::NodeChangeInProgress {
                node,
                state: state.as_str(),
            });
        }
    }
    for other in running {
        match (other, next) {
            (Running::Cleanup { id }, _) => {
                return Err(Refusal::CleanupInProgress { id: id.clone() });
            }
            (Running::RfChange { tenant }, Proposed::RfChange { tenant: t }) if tenant == t => {
                return Err(Refusal::SameTenant {
                    tenant: tenant.clone(),
                });
            }
            (Running::RfChange { .. }, Proposed::RfChange { .. }) => {}
            (Running::RfChange { tenant }, Proposed::NodeChange | Proposed::Cleanup) => {
                return Err(Refusal::RfChangeInProgress {
                    tenant: tenant.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The ring once every change in `ring` completed: joiners active, leavers gone.
pub fn final_ring(ring: &Ring) -> Ring {
    Ring::new(ring.nodes().filter_map(|n| match n.state {
        NodeState::Draining | NodeState::Failed => None,
        NodeState::Bootstrapping => Some(RingNode {
            state: NodeState::Active,
            ..n.clone()
        }),
        _ => Some(n.clone()),
    }))
}

/// Plans every node change in progress in `ring` together, against the combined final ring
/// (every joiner active, every leaver gone): the transfers that make the final owners hold
/// what the current members hold, when all the changes complete at once (no ring between the
/// current and the final one ever serves reads). Only members for which `can_send` holds send;
/// joiners never do.
pub fn plan_combined(
    ring: &Ring,
    rfs: &BTreeSet<usize>,
    can_send: impl Fn(&NodeId) -> bool,
) -> NodeChangePlan {
    let final_ring = final_ring(ring);
    let mut grouped: BTreeMap<(NodeId, NodeId), BTreeSet<HashRange>> = BTreeMap::new();
    for rf in rfs {
        for mv in moved_ranges_with(ring, &final_ring, *rf, &can_send) {
            grouped
                .entry((mv.from, mv.to))
                .or_default()
                .insert(mv.range);
        }
    }
    let transfers = grouped
        .into_iter()
        .map(|((from, to), ranges)| RangeTransfer {
            from,
            to,
            ranges: ranges.into_iter().collect(),
        })
        .collect();
    NodeChangePlan {
        final_ring,
        transfers,
    }
}

/// Where an RF change copies one record `holder` holds, given the key's replica set at the
/// old RF and at the new one. Raising: to the owners the new RF adds. Lowering: a holder in
/// the old set sends to every owner that stays (except itself); others send nothing.
pub fn rf_copy_targets(old: &[NodeId], new: &[NodeId], holder: &NodeId) -> Vec<NodeId> {
    if new.len() >= old.len() {
        new.iter().filter(|n| !old.contains(n)).cloned().collect()
    } else if old.contains(holder) {
        new.iter().filter(|n| *n != holder).cloned().collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState) -> RingNode {
        RingNode::derived(NodeId::new(id), 8, state)
    }

    #[test]
    fn node_changes_run_together_and_exclude_the_rest_by_name() {
        let ring = Ring::new([node("a", NodeState::Active), node("b", NodeState::Draining)]);
        assert_eq!(may_start(&ring, &[], Proposed::NodeChange), Ok(()));
        for next in [Proposed::RfChange { tenant: "t" }, Proposed::Cleanup] {
            let refused = may_start(&ring, &[], next).unwrap_err();
            assert!(
                refused.to_string().contains("node b is draining"),
                "{refused}"
            );
        }
    }

    #[test]
    fn rf_changes_block_node_changes_and_their_own_tenant_only() {
        let ring = Ring::new([node("a", NodeState::Active)]);
        let busy = vec![Running::RfChange {
            tenant: "acme".to_owned(),
        }];
        assert!(matches!(
            may_start(&ring, &busy, Proposed::NodeChange),
            Err(Refusal::RfChangeInProgress { .. })
        ));
        assert!(matches!(
            may_start(&ring, &busy, Proposed::RfChange { tenant: "acme" }),
            Err(Refusal::SameTenant { .. })
        ));
        assert_eq!(
            may_start(&ring, &busy, Proposed::RfChange { tenant: "other" }),
            Ok(())
        );
        assert!(matches!(
            may_start(&ring, &busy, Proposed::Cleanup),
            Err(Refusal::RfChangeInProgress { .. })
        ));
    }

    #[test]
    fn a_cleanup_excludes_every_other_change() {
        let ring = Ring::new([node("a", NodeState::Active)]);
        let busy = vec![Running::Cleanup {
            id: "cleanup-1".to_owned(),
        }];
        for next in [
            Proposed::NodeChange,
            Proposed::RfChange { tenant: "t" },
            Proposed::Cleanup,
        ] {
            let refused = may_start(&ring, &busy, next).unwrap_err();
            assert!(
                refused.to_string().contains("cleanup cleanup-1"),
                "{refused}"
            );
        }
        assert_eq!(may_start(&ring, &[], Proposed::Cleanup), Ok(()));
    }

    #[test]
    fn rf_copy_targets_raise_and_lower() {
        let ids = |v: &[&str]| v.iter().map(|s| NodeId::new(*s)).collect::<Vec<_>>();
        let (a, c) = (NodeId::new("a"), NodeId::new("c"));
        assert_eq!(
            rf_copy_targets(&ids(&["a"]), &ids(&["a", "b", "c"]), &a),
            ids(&["b", "c"])
        );
        assert_eq!(
            rf_copy_targets(&ids(&["a", "b", "c"]), &ids(&["a"]), &c),
            ids(&["a"])
        );
        assert!(rf_copy_targets(&ids(&["a", "b", "c"]), &ids(&["a"]), &a).is_empty());
        assert!(rf_copy_targets(&ids(&["a", "b"]), &ids(&["a"]), &NodeId::new("z")).is_empty());
    }
}
