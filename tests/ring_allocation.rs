//! Token allocation (SEMANTICS.md, "Placement"): a joining node's tokens never move data
//! between the nodes already there, and rings grown one node at a time stay balanced.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::BTreeSet;

use pairdb::ring::allocation::{TokenAllocation, allocate_tokens, choose_tokens};
use pairdb::ring::simulate::ownership;
use pairdb::ring::{NodeId, NodeState, Ring, RingNode, moved_ranges};
use proptest::prelude::*;

/// Balance goal at RF 3 (docs/benchmarks.md, "Ring balance").
const MAX_OVER_MEAN: f64 = 1.05;
const MIN_OVER_MEAN: f64 = 0.95;

fn grow(ids: &[String], vnodes: u32, rfs: &[usize], derived_first: usize) -> Vec<RingNode> {
    let mut nodes: Vec<RingNode> = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let id = NodeId::new(id.clone());
        let tokens = if k < derived_first {
            None
        } else {
            let ring = Ring::new(nodes.iter().cloned());
            choose_tokens(&ring, &id, TokenAllocation::Balanced, vnodes, rfs)
        };
        nodes.push(RingNode {
            id,
            virtual_nodes: if k < derived_first { 64 } else { vnodes },
            tokens,
            state: NodeState::Active,
        });
    }
    nodes
}

fn spread(ring: &Ring, rf: usize) -> (f64, f64) {
    let loads: Vec<f64> = ownership(ring, rf).into_iter().map(|(_, l)| l).collect();
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
    (max / mean, min / mean)
}

fn ids(n: usize, salt: u32) -> Vec<String> {
    (0..n).map(|k| format!("node-{salt}-{k}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the ring (derived and allocated tokens mixed, any RFs), the new node's tokens
    /// only move ranges to the new node, and they are new, distinct tokens on segment
    /// boundaries.
    #[test]
    fn allocation_moves_data_only_to_the_new_node(
        salt in any::<u32>(),
        existing in 1usize..24,
        derived_first in 0usize..6,
        vnodes in 1u32..40,
        rfs in prop::collection::btree_set(1usize..6, 1..3),
    ) {
        let rfs: Vec<usize> = rfs.into_iter().collect();
        let nodes = grow(&ids(existing, salt), vnodes, &rfs, derived_first);
        let before = Ring::new(nodes.iter().cloned());
        let new = NodeId::new(format!("joiner-{salt}"));
        let placed = before.future_members();
        let tokens = allocate_tokens(&placed, &new, vnodes, &rfs);
        prop_assert_eq!(tokens.len(), vnodes as usize);
        let taken: BTreeSet<u64> = placed.iter().flat_map(|n| n.tokens.iter().copied()).collect();
        prop_assert!(tokens.iter().all(|t| !taken.contains(t)));
        prop_assert_eq!(tokens.iter().collect::<BTreeSet<_>>().len(), tokens.len());
        // On segment boundaries, whatever the existing tokens: ranges between allocated
        // tokens are whole anti-entropy segments.
        prop_assert!(tokens.iter().all(|t| t % pairdb::ring::SEGMENT_WIDTH == 0), "{:x?}", tokens);
        let mut after_nodes = nodes.clone();
        after_nodes.push(RingNode {
            id: new.clone(),
            virtual_nodes: vnodes,
            tokens: Some(tokens),
            state: NodeState::Active,
        });
        let after = Ring::new(after_nodes);
        for rf in [1usize, 2, 3, 5] {
            for m in moved_ranges(&before, &after, rf) {
                prop_assert_eq!(&m.to, &new, "rf {}: {:?}", rf, m);
            }
        }
    }

}

proptest! {
    // Each case grows a ring of up to 300 nodes: few cases keep this under a minute of CI.
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Rings grown one node at a time from 3 (any node ids) with balanced tokens stay within
    /// the balance goal at RF 3 from 10 nodes on, checked along the way.
    #[test]
    fn grown_rings_stay_balanced(salt in any::<u32>(), size in 10usize..300) {
        let nodes = grow(&ids(size, salt), pairdb::ring::BALANCED_VIRTUAL_NODES, &[3], 0);
        let mut ring_nodes = Vec::new();
        for (k, node) in nodes.into_iter().enumerate() {
            ring_nodes.push(node);
            let n = k + 1;
            if n >= 10 && (n % 23 == 0 || n == size) {
                let (max, min) = spread(&Ring::new(ring_nodes.iter().cloned()), 3);
                prop_assert!(max <= MAX_OVER_MEAN, "{} nodes: max/mean {:.4}", n, max);
                prop_assert!(min >= MIN_OVER_MEAN, "{} nodes: min/mean {:.4}", n, min);
            }
        }
    }
}

/// One growth from 3 to 300 nodes, checked every 25 nodes.
#[test]
fn a_ring_grown_to_300_nodes_stays_balanced() {
    let nodes = grow(&ids(300, 7), pairdb::ring::BALANCED_VIRTUAL_NODES, &[3], 0);
    for n in (25..=300).step_by(25) {
        let (max, min) = spread(&Ring::new(nodes[..n].iter().cloned()), 3);
        assert!(max <= MAX_OVER_MEAN, "{n} nodes: max/mean {max:.4}");
        assert!(min >= MIN_OVER_MEAN, "{n} nodes: min/mean {min:.4}");
    }
}
