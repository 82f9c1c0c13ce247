//! Property tests of the ring against a naive reference implementation (SEMANTICS.md,
//! "Placement"), and of how ranges move when a node joins or leaves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::BTreeSet;

use pairdb::ring::{
    HashRange, NodeId, NodeState, Ring, RingNode, key_position, moved_ranges, moved_ranges_with,
    token,
};
use proptest::prelude::*;

/// Reference placement: order every token by its clockwise distance from the position (a token
/// equal to the position is the farthest: placement takes the first token *after* it), ties by
/// node id, and take distinct nodes.
fn naive_owners(nodes: &[(String, u32)], position: u64, rf: usize) -> Vec<String> {
    let mut tokens: Vec<(u64, &String)> = nodes
        .iter()
        .flat_map(|(id, vnodes)| {
            (0..*vnodes).map(move |i| {
                let t = token(&NodeId::new(id.clone()), i);
                (t.wrapping_sub(position).wrapping_sub(1), id)
            })
        })
        .collect();
    tokens.sort();
    let mut owners: Vec<String> = Vec::new();
    for (_, id) in tokens {
        if !owners.contains(id) {
            owners.push(id.clone());
        }
        if owners.len() == rf {
            break;
        }
    }
    owners
}

fn ring_of(nodes: &[(String, u32)]) -> Ring {
    Ring::new(nodes.iter().map(|(id, v)| RingNode {
        id: NodeId::new(id.clone()),
        virtual_nodes: *v,
        tokens: None,
        state: NodeState::Active,
    }))
}

fn ids(owners: Vec<NodeId>) -> Vec<String> {
    owners.into_iter().map(|n| n.0).collect()
}

fn node_set(max: usize) -> impl Strategy<Value = Vec<(String, u32)>> {
    prop::collection::btree_set("[a-z]{1,6}", 1..=max).prop_flat_map(|names| {
        let n = names.len();
        (Just(names), prop::collection::vec(1u32..40, n))
            .prop_map(|(names, vnodes)| names.into_iter().zip(vnodes).collect::<Vec<_>>())
    })
}

fn sample_positions(seed: u64, count: usize) -> Vec<u64> {
    (0..count as u64)
        .map(|i| {
            key_position(
                "tenant",
                &(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn placement_matches_the_reference(nodes in node_set(8), keys in prop::collection::vec(any::<u64>(), 1..50), rf in 1usize..5) {
        let ring = ring_of(&nodes);
        for pos in keys {
            prop_assert_eq!(ids(ring.natural_owners(pos, rf)), naive_owners(&nodes, pos, rf));
        }
    }

    #[test]
    fn positions_on_tokens_match_the_reference(nodes in node_set(5), rf in 1usize..4) {
        // Edge positions: exactly on a token, and one below it.
        let ring = ring_of(&nodes);
        for (id, v) in &nodes {
            for i in 0..*v {
                let t = token(&NodeId::new(id.clone()), i);
                for pos in [t, t.wrapping_sub(1)] {
                    prop_assert_eq!(ids(ring.natural_owners(pos, rf)), naive_owners(&nodes, pos, rf));
                }
            }
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_share_and_only_to_it(nodes in node_set(8), seed in any::<u64>()) {
        let mut with_new: Vec<(String, u32)> = nodes.iter().map(|(id, _)| (id.clone(), 150)).collect();
        let before = ring_of(&with_new);
        with_new.push(("newcomer".to_owned(), 150));
        let after = ring_of(&with_new);
        let positions = sample_positions(seed, 4000);
        let mut moved = 0usize;
        for &pos in &positions {
            let (old, new) = (before.natural_owners(pos, 1), after.natural_owners(pos, 1));
            if old != new {
                moved += 1;
                prop_assert_eq!(new[0].as_str(), "newcomer");
            }
            // With RF 3 the replica set only ever gains the newcomer.
            let (old3, new3) = (before.natural_owners(pos, 3), after.natural_owners(pos, 3));
            for n in &new3 {
                prop_assert!(old3.contains(n) || n.as_str() == "newcomer");
            }
        }
        let share = moved as f64 / positions.len() as f64;
        let expected = 1.0 / (nodes.len() + 1) as f64;
        prop_assert!(share > expected * 0.5 && share < expected * 1.6,
            "moved {share:.3} of keys, expected about {expected:.3}");
    }

    #[test]
    fn removing_a_node_moves_only_its_ranges(nodes in node_set(8), seed in any::<u64>(), victim in any::<prop::sample::Index>()) {
        prop_assume!(nodes.len() >= 2);
        let gone = victim.index(nodes.len());
        let before = ring_of(&nodes);
        let rest: Vec<_> = nodes.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| n.clone()).collect();
        let after = ring_of(&rest);
        let gone_id = &nodes[gone].0;
        for pos in sample_positions(seed, 500) {
            for rf in [1usize, 2, 3] {
                let old = ids(before.natural_owners(pos, rf));
                let new = ids(after.natural_owners(pos, rf));
                if !old.contains(gone_id) {
                    prop_assert_eq!(&old, &new);
                } else {
                    // Survivors keep the key; exactly the victim's slot is refilled.
                    for n in old.iter().filter(|n| *n != gone_id) {
                        prop_assert!(new.contains(n));
                    }
                }
            }
        }
    }

    #[test]
    fn moved_ranges_cover_exactly_the_keys_that_change_owners(nodes in node_set(6), seed in any::<u64>(), add in any::<bool>(), rf in 1usize..4) {
        let before_nodes: Vec<_> = nodes.clone();
        let mut after_nodes = nodes.clone();
        if add {
            after_nodes.push(("joiner".to_owned(), 30));
        } else if after_nodes.len() > 1 {
            after_nodes.remove(0);
        }
        let (before, after) = (ring_of(&before_nodes), ring_of(&after_nodes));
        let moves = moved_ranges(&before, &after, rf);
        for pos in sample_positions(seed, 400) {
            let old: BTreeSet<_> = ids(before.natural_owners(pos, rf)).into_iter().collect();
            let new: BTreeSet<_> = ids(after.natural_owners(pos, rf)).into_iter().collect();
            let gained: BTreeSet<_> = new.difference(&old).cloned().collect();
            let covering: Vec<_> = moves.iter().filter(|m| m.range.contains(pos)).collect();
            let receivers: BTreeSet<_> = covering.iter().map(|m| m.to.0.clone()).collect();
            prop_assert_eq!(&receivers, &gained, "position {}", pos);
            prop_assert_eq!(covering.len(), gained.len());
            for m in covering {
                prop_assert!(old.contains(&m.from.0), "sender {} must hold the range before", m.from);
            }
        }
    }

    #[test]
    fn a_dead_leaving_node_is_replaced_by_surviving_senders(nodes in node_set(6), seed in any::<u64>(), rf in 1usize..4) {
        prop_assume!(nodes.len() > 1);
        let dead = NodeId::new(nodes[0].0.clone());
        let before = ring_of(&nodes);
        let after = ring_of(&nodes[1..]);
        let moves = moved_ranges_with(&before, &after, rf, |n| *n != dead);
        for pos in sample_positions(seed, 400) {
            let old: BTreeSet<_> = ids(before.natural_owners(pos, rf)).into_iter().collect();
            let new: BTreeSet<_> = ids(after.natural_owners(pos, rf)).into_iter().collect();
            let survivors: BTreeSet<_> = old.iter().filter(|n| **n != dead.0).cloned().collect();
            let gained: BTreeSet<_> = new.difference(&old).cloned().collect();
            let covering: Vec<_> = moves.iter().filter(|m| m.range.contains(pos)).collect();
            let receivers: BTreeSet<_> = covering.iter().map(|m| m.to.0.clone()).collect();
            if survivors.is_empty() {
                prop_assert!(covering.is_empty(), "nobody holds position {} any more", pos);
            } else {
                prop_assert_eq!(&receivers, &gained, "position {}", pos);
            }
            for m in covering {
                prop_assert!(survivors.contains(&m.from.0), "sender {} must be a surviving owner", m.from);
            }
        }
    }

    #[test]
    fn ranges_not_owned_are_exactly_the_positions_a_node_does_not_replicate(nodes in node_set(6), seed in any::<u64>(), rf in 1usize..4, pick in any::<prop::sample::Index>()) {
        let ring = ring_of(&nodes);
        let node = NodeId::new(nodes[pick.index(nodes.len())].0.clone());
        let not_owned = ring.ranges_not_owned(&node, rf);
        let mut positions = sample_positions(seed, 300);
        // Token edges too: on a token, and one below it.
        for (id, v) in &nodes {
            for i in 0..*v {
                let t = token(&NodeId::new(id.clone()), i);
                positions.extend([t, t.wrapping_sub(1)]);
            }
        }
        for pos in positions {
            let owned = ring.natural_owners(pos, rf).contains(&node);
            let listed = not_owned.iter().any(|r| r.contains(pos));
            prop_assert_eq!(listed, !owned, "position {} (ranges {:?})", pos, not_owned);
        }
        for pair in not_owned.windows(2) {
            prop_assert!(pair[0].end != pair[1].start, "adjacent ranges not merged: {:?}", not_owned);
        }
    }

    #[test]
    fn hash_range_width_agrees_with_pieces(start in any::<u64>(), end in any::<u64>()) {
        let range = HashRange::new(start, end);
        let from_pieces: u128 = range.pieces().iter().map(|(lo, hi)| u128::from(hi - lo) + 1).sum();
        prop_assert_eq!(range.width(), from_pieces);
    }

    #[test]
    fn hash_range_pieces_agree_with_contains(start in any::<u64>(), end in any::<u64>(), probes in prop::collection::vec(any::<u64>(), 20)) {
        let range = HashRange::new(start, end);
        let pieces = range.pieces();
        for p in probes.into_iter().chain([start, end, start.wrapping_sub(1), end.wrapping_sub(1)]) {
            let in_pieces = pieces.iter().any(|(lo, hi)| *lo <= p && p <= *hi);
            prop_assert_eq!(range.contains(p), in_pieces);
        }
    }

    #[test]
    fn hash_range_intersection_holds_exactly_the_shared_positions(a in arc(), b in arc(), probes in prop::collection::vec(any::<u64>(), 20)) {
        let (a, b) = (HashRange::new(a.0, a.1), HashRange::new(b.0, b.1));
        let both = a.intersection(&b);
        prop_assert!(both.len() <= 2, "{:?}", both);
        let edges = [a.start, a.end, b.start, b.end]
            .into_iter()
            .flat_map(|p| [p, p.wrapping_sub(1), p.wrapping_add(1)]);
        for p in probes.into_iter().chain(edges).chain([0, u64::MAX]) {
            let holders = both.iter().filter(|r| r.contains(p)).count();
            prop_assert!(holders <= 1, "pieces overlap at {}: {:?}", p, both);
            prop_assert_eq!(a.contains(p) && b.contains(p), holders == 1, "at {}: {:?}", p, both);
        }
        let width: u128 = both.iter().map(HashRange::width).sum();
        prop_assert!(width <= a.width().min(b.width()));
        prop_assert_eq!(a.intersection(&HashRange::FULL).iter().map(HashRange::width).sum::<u128>(), a.width());
    }
}

/// An arc whose ends are often at the ring's edges (0, the top) or close to each other.
fn arc() -> impl Strategy<Value = (u64, u64)> {
    let end = prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        0u64..4,
        (u64::MAX - 3)..=u64::MAX,
        Just(1u64 << 63),
    ];
    (end.clone(), end)
}
