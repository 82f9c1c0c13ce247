//! The transfer planner (`ring::plan`) against a naive per-key reference: random sequences of
//! writes, node additions, node removals (of live or dead nodes) and replication-factor
//! changes, with writes landing while a change is in progress. The reference tracks, for every
//! key, which nodes hold its newest version; a change's planned transfers are applied to it
//! range by range exactly as streams would (every record of the range the sender holds), then
//! the ring becomes the plan's final ring.
//!
//! Properties, after every change:
//! - writes that reached every replica: every final owner holds the newest version of every key
//!   a live old owner held;
//! - writes that reached only a quorum (hint lost): no key a live node held has fewer holders
//!   among its final owners than it had among its old owners, dead ones included (so a quorum
//!   write stays a quorum write), and an RF lowering leaves every staying replica with it;
//! - every sender is a live old member, every receiver a final member;
//! - while node changes are in progress another node change may start (planned with them),
//!   and RF changes and cleanups are refused;
//! - several additions and removals (of live or dead nodes) at once, planned together against
//!   their combined final ring (`plan_combined`) and completed at once, keep the same
//!   properties.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::{BTreeMap, BTreeSet};

use pairdb::ring::plan::{self, Proposed};
use pairdb::ring::{NodeId, NodeState, Ring, RingNode, key_position};
use proptest::prelude::*;

const TENANTS: [&str; 2] = ["t1", "t2"];
const KEYS_PER_TENANT: usize = 40;
const MAX_RF: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A write of one key reaching the replicas picked by `reach` (a bit mask over the write
    /// replicas; only in the quorum-write mode).
    Write { key: usize, reach: u8 },
    /// A node joins with `vnodes` tokens; `during` keys are written while it bootstraps.
    Add {
        vnodes: u32,
        during: Vec<(usize, u8)>,
    },
    /// A node leaves (dead: it cannot send); `during` keys are written while it drains.
    Remove {
        victim: prop::sample::Index,
        dead: bool,
        during: Vec<(usize, u8)>,
    },
    /// A tenant's RF changes.
    SetRf { tenant: usize, rf: usize },
    /// Nodes join (`adds`: their vnodes) and leave (`removes`: which, and whether dead) at
    /// once; `during` keys are written meanwhile.
    Several {
        adds: Vec<u32>,
        removes: Vec<(prop::sample::Index, bool)>,
        during: Vec<(usize, u8)>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let during = || prop::collection::vec((0..TENANTS.len() * KEYS_PER_TENANT, any::<u8>()), 0..4);
    prop_oneof![
        2 => (0..TENANTS.len() * KEYS_PER_TENANT, any::<u8>())
            .prop_map(|(key, reach)| Op::Write { key, reach }),
        2 => (2u32..8, during()).prop_map(|(vnodes, during)| Op::Add { vnodes, during }),
        2 => (any::<prop::sample::Index>(), any::<bool>(), during())
            .prop_map(|(victim, dead, during)| Op::Remove { victim, dead, during }),
        1 => (0..TENANTS.len(), 1..=MAX_RF).prop_map(|(tenant, rf)| Op::SetRf { tenant, rf }),
        2 => (
            prop::collection::vec(2u32..8, 0..3),
            prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..3),
            during(),
        )
            .prop_map(|(adds, removes, during)| Op::Several { adds, removes, during }),
    ]
}

/// The reference: nodes, tenants' RFs, and who holds each key's newest version.
struct Model {
    nodes: BTreeMap<String, u32>,
    rfs: [usize; 2],
    keys: Vec<(usize, u64)>,
    holders: Vec<BTreeSet<String>>,
    /// Keys whose newest version no live owner held at some change (it was only on a dead
    /// node): not checked again until written again.
    lost: Vec<bool>,
    /// Writes reach only a quorum of their replicas (picked by the op), not all of them.
    quorum_writes: bool,
    next_node: usize,
}

impl Model {
    fn new(nodes: usize, vnodes: &[u32], rfs: [usize; 2], quorum_writes: bool) -> Self {
        let nodes: BTreeMap<String, u32> = (0..nodes)
            .map(|i| (format!("n{i}"), vnodes[i % vnodes.len()]))
            .collect();
        let keys: Vec<(usize, u64)> = (0..TENANTS.len())
            .flat_map(|t| {
                (0..KEYS_PER_TENANT)
                    .map(move |k| (t, key_position(TENANTS[t], format!("k{k}").as_bytes())))
            })
            .collect();
        let mut model = Self {
            holders: vec![BTreeSet::new(); keys.len()],
            lost: vec![false; keys.len()],
            nodes,
            rfs,
            keys,
            quorum_writes,
            next_node: 100,
        };
        // Every key starts written to every replica.
        let ring = model.ring(None);
        for k in 0..model.keys.len() {
            model.write(&ring, k, u8::MAX, true);
        }
        model
    }

    /// The ring of the model's nodes, with `changing` in the given state.
    fn ring(&self, changing: Option<(&str, NodeState)>) -> Ring {
        self.ring_with(&changing.into_iter().collect::<Vec<_>>())
    }

    /// The ring of the model's nodes, with each of `changing` in its state.
    fn ring_with(&self, changing: &[(&str, NodeState)]) -> Ring {
        Ring::new(self.nodes.iter().map(|(id, vnodes)| {
            let state = changing
                .iter()
                .find(|(c, _)| c == id)
                .map_or(NodeState::Active, |(_, s)| *s);
            RingNode::derived(NodeId::new(id.clone()), *vnodes, state)
        }))
    }

    /// The node `index` picks among the model's nodes.
    fn pick(&self, index: &prop::sample::Index) -> String {
        self.nodes
            .keys()
            .nth(index.index(self.nodes.len()))
            .cloned()
            .unwrap_or_default()
    }

    fn rfs_in_use(&self) -> BTreeSet<usize> {
        self.rfs.iter().copied().collect()
    }

    /// A new version of key `k`: it replaces the old one on the replicas it reaches (every
    /// write replica, or a quorum of the natural owners picked by `reach`), and every other
    /// node now holds a stale version.
    fn write(&mut self, ring: &Ring, k: usize, reach: u8, all: bool) {
        let (tenant, position) = self.keys[k];
        let plan = ring.plan(position, self.rfs[tenant]);
        let replicas: Vec<String> = plan.write_replicas().into_iter().map(|n| n.0).collect();
        let reached: BTreeSet<String> = if all || !self.quorum_writes {
            replicas.into_iter().collect()
        } else {
            // At least the quorum of the authoritative replicas, picked by the mask.
            let needed = plan.authoritative_count() / 2 + 1;
            let mut chosen: BTreeSet<String> = replicas
                .iter()
                .enumerate()
                .filter(|(i, _)| reach & (1 << i) != 0)
                .map(|(_, n)| n.clone())
                .collect();
            for (id, _) in &plan.natural {
                if chosen
                    .iter()
                    .filter(|c| plan.is_authoritative(&NodeId::new((*c).clone())))
                    .count()
                    >= needed
                {
                    break;
                }
                chosen.insert(id.0.clone());
            }
            chosen
        };
        self.holders[k] = reached;
        self.lost[k] = false;
    }

    fn owners(&self, ring: &Ring, k: usize, rf: usize) -> Vec<String> {
        ring.natural_owners(self.keys[k].1, rf)
            .into_iter()
            .map(|n| n.0)
            .collect()
    }

    /// Applies the node changes in progress in `mid` (planned together with `plan_combined`,
    /// `dead` unable to send), with the writes `during` landing before the
    /// streams; returns the final ring and who held what when the streams started.
    fn node_change(
        &mut self,
        mid: &Ring,
        dead: &BTreeSet<String>,
        during: &[(usize, u8)],
    ) -> Result<(Ring, Vec<BTreeSet<String>>), TestCaseError> {
        // Another node change may join (planned together with these); nothing else may start.
        prop_assert!(plan::may_start(mid, &[], Proposed::NodeChange).is_ok());
        let rf_change = Proposed::RfChange { tenant: "t1" };
        prop_assert!(plan::may_start(mid, &[], rf_change).is_err());
        prop_assert!(plan::may_start(mid, &[], Proposed::Cleanup).is_err());

        let can_send = |n: &NodeId| !dead.contains(n.as_str());
        let planned = plan::plan_combined(mid, &self.rfs_in_use(), can_send);
        for &(k, reach) in during {
            self.write(mid, k, reach, false);
        }
        let live_members: BTreeSet<String> = mid
            .nodes()
            .filter(|n| n.state != NodeState::Bootstrapping && !dead.contains(n.id.as_str()))
            .map(|n| n.id.0.clone())
            .collect();
        for t in &planned.transfers {
            prop_assert!(
                live_members.contains(t.from.as_str()),
                "sender {} is not a live old member",
                t.from
            );
            prop_assert!(
                planned.final_ring.node(&t.to).is_some(),
                "receiver {} is not in the final ring",
                t.to
            );
        }
        // The streams: every record of a range its sender holds reaches the receiver. Holdings
        // are read before any stream ran (streams run in parallel).
        let before = self.holders.clone();
        for t in &planned.transfers {
            for (k, (_, position)) in self.keys.iter().enumerate() {
                if t.ranges.iter().any(|r| r.contains(*position))
                    && before[k].contains(t.from.as_str())
                {
                    self.holders[k].insert(t.to.0.clone());
                }
            }
        }
        Ok((planned.final_ring, before))
    }

    fn check(
        &mut self,
        old: &Ring,
        old_rfs: [usize; 2],
        new: &Ring,
        dead: &BTreeSet<String>,
        before: &[BTreeSet<String>],
    ) -> Result<(), TestCaseError> {
        for (k, &(tenant, _)) in self.keys.iter().enumerate() {
            let finals = self.owners(new, k, self.rfs[tenant]);
            let held_after = finals
                .iter()
                .filter(|n| self.holders[k].contains(*n))
                .count();
            let olds = self.owners(old, k, old_rfs[tenant]);
            let live_held_before = olds
                .iter()
                .filter(|n| before[k].contains(*n) && !dead.contains(n.as_str()))
                .count();
            if self.lost[k] {
                continue;
            }
            if live_held_before == 0 {
                self.lost[k] = true;
                continue;
            }
            if self.quorum_writes {
                // A dead leaving holder's copy is replaced from the live holders.
                let held_before = olds.iter().filter(|n| before[k].contains(*n)).count();
                prop_assert!(
                    held_after >= held_before.min(finals.len()),
                    "key {k}: {held_after} of its final owners {finals:?} hold it, {held_before} old owners {olds:?} did; holders {:?}",
                    self.holders[k]
                );
            } else {
                prop_assert_eq!(
                    held_after,
                    finals.len(),
                    "key {}: final owners {:?}, holders {:?}",
                    k,
                    finals,
                    self.holders[k]
                );
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let old = self.ring(None);
        let old_rfs = self.rfs;
        match op {
            Op::Write { key, reach } => {
                self.write(&old, *key, *reach, false);
                return Ok(());
            }
            Op::Add { vnodes, during } => {
                if self.nodes.len() >= 8 {
                    return Ok(());
                }
                let id = format!("n{}", self.next_node);
                self.next_node += 1;
                self.nodes.insert(id.clone(), *vnodes);
                let mid = self.ring(Some((&id, NodeState::Bootstrapping)));
                let none = BTreeSet::new();
                let (new, before) = self.node_change(&mid, &none, during)?;
                self.check(&old, old_rfs, &new, &none, &before)?;
            }
            Op::Remove {
                victim,
                dead,
                during,
            } => {
                // Removals keep at least as many nodes as the largest RF (the API's rule
                // without force).
                if self.nodes.len() <= self.rfs.iter().copied().max().unwrap_or(1) {
                    return Ok(());
                }
                let id = self.pick(victim);
                let mid = self.ring(Some((&id, NodeState::Draining)));
                let dead_ids: BTreeSet<String> = dead.then(|| id.clone()).into_iter().collect();
                let (new, before) = self.node_change(&mid, &dead_ids, during)?;
                self.nodes.remove(&id);
                for h in &mut self.holders {
                    h.remove(&id);
                }
                self.check(&old, old_rfs, &new, &dead_ids, &before)?;
            }
            Op::Several {
                adds,
                removes,
                during,
            } => {
                // Removals keep at least as many nodes as the largest RF; at most 8 nodes.
                let max_rf = self.rfs.iter().copied().max().unwrap_or(1);
                let mut leaving: BTreeMap<String, bool> = BTreeMap::new();
                for (victim, dead) in removes {
                    if self.nodes.len() - leaving.len() <= max_rf {
                        break;
                    }
                    leaving.entry(self.pick(victim)).or_insert(*dead);
                }
                let mut joining = Vec::new();
                for vnodes in adds {
                    if self.nodes.len() >= 8 {
                        break;
                    }
                    let id = format!("n{}", self.next_node);
                    self.next_node += 1;
                    self.nodes.insert(id.clone(), *vnodes);
                    joining.push(id);
                }
                if leaving.len() + joining.len() < 2 {
                    // One change or none: the single-change ops cover it; undo the additions.
                    for id in &joining {
                        self.nodes.remove(id);
                    }
                    return Ok(());
                }
                let changing: Vec<(&str, NodeState)> = joining
                    .iter()
                    .map(|id| (id.as_str(), NodeState::Bootstrapping))
                    .chain(leaving.keys().map(|id| (id.as_str(), NodeState::Draining)))
                    .collect();
                let mid = self.ring_with(&changing);
                let dead_ids: BTreeSet<String> = leaving
                    .iter()
                    .filter(|(_, dead)| **dead)
                    .map(|(id, _)| id.clone())
                    .collect();
                let (new, before) = self.node_change(&mid, &dead_ids, during)?;
                for id in leaving.keys() {
                    self.nodes.remove(id);
                    for h in &mut self.holders {
                        h.remove(id);
                    }
                }
                self.check(&old, old_rfs, &new, &dead_ids, &before)?;
            }
            Op::SetRf { tenant, rf } => {
                let before = self.holders.clone();
                for (k, &(t, position)) in self.keys.iter().enumerate() {
                    if t != *tenant {
                        continue;
                    }
                    let olds = old.natural_owners(position, self.rfs[t]);
                    let news = old.natural_owners(position, *rf);
                    // Every node's records are scanned; each holder copies to its targets.
                    for holder in &before[k] {
                        for target in
                            plan::rf_copy_targets(&olds, &news, &NodeId::new(holder.clone()))
                        {
                            self.holders[k].insert(target.0);
                        }
                    }
                }
                self.rfs[*tenant] = *rf;
                self.check(&old, old_rfs, &old, &BTreeSet::new(), &before)?;
            }
        }
        Ok(())
    }
}

fn scenario() -> impl Strategy<Value = (usize, Vec<u32>, [usize; 2], Vec<Op>)> {
    (
        3usize..7,
        prop::collection::vec(2u32..8, 1..4),
        (1..=3usize, 1..=3usize),
        prop::collection::vec(op(), 1..10),
    )
        .prop_map(|(n, vnodes, (a, b), ops)| (n, vnodes, [a, b], ops))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn writes_to_every_replica_reach_every_final_owner((nodes, vnodes, rfs, ops) in scenario()) {
        let mut model = Model::new(nodes, &vnodes, rfs, false);
        for (i, op) in ops.iter().enumerate() {
            model.apply(op).map_err(|e| TestCaseError::fail(format!("op {i} {op:?}: {e}")))?;
        }
    }

    #[test]
    fn quorum_writes_keep_their_quorum_through_every_change((nodes, vnodes, rfs, ops) in scenario()) {
        let mut model = Model::new(nodes, &vnodes, rfs, true);
        for (i, op) in ops.iter().enumerate() {
            model.apply(op).map_err(|e| TestCaseError::fail(format!("op {i} {op:?}: {e}")))?;
        }
    }
}
