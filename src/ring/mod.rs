//! The consistent-hash ring: placement of keys on storage nodes (SEMANTICS.md, "Placement").
//!
//! Placement rule (the invariant everything else relies on):
//! - The ring is the 64-bit hash space. Node `n` owns `virtual_nodes` tokens,
//!   token `i` = xxh3_64("{n}#{i}").
//! - A key's position is xxh3_64(tenant_id ++ 0x00 ++ key) ([`key_position`]).
//! - The replicas of a position are found by walking clockwise from it: the first token
//!   strictly greater than the position (wrapping past `u64::MAX` to 0), then onwards, collecting
//!   distinct physical nodes until RF are found (RF capped by the number of nodes). So a token
//!   `t` whose predecessor is `p` is the first stop for exactly the positions in `[p, t)`, which
//!   is why every [`HashRange`] is half-open.
//! - Equal tokens of two nodes (a 2^-64 event) are ordered by node id, so every coordinator
//!   computes the same placement.
//!
//! Membership per state: natural owners are computed over the *members* (active, draining and
//! down nodes); pending owners over the ring as it will be once changes complete (active, down
//! and bootstrapping nodes; draining ones gone). See [`ReplicaPlan`] for how write and read
//! replica sets and the authoritative count follow from those.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::quorum::Consistency;

pub mod allocation;
pub mod plan;
pub mod simulate;

/// Default number of tokens per node whose tokens follow the xxh3 rule (random placement).
pub const RANDOM_VIRTUAL_NODES: u32 = 150;

/// Most tokens a node may have.
pub const MAX_VIRTUAL_NODES: u32 = 4096;

/// Default number of tokens per node under balanced allocation (chosen with the ring
/// simulator: docs/benchmarks.md, "Ring balance").
pub const BALANCED_VIRTUAL_NODES: u32 = 16;

/// Identifier of a storage node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lifecycle state of a node (SEMANTICS.md, "Node states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Authoritative owner of its ranges.
    Active,
    /// Joining: receives writes and reads for the ranges it will own, not yet authoritative.
    Bootstrapping,
    /// Leaving: still a member while it streams its ranges out; not authoritative.
    Draining,
    /// Unreachable according to gossip: still owns its ranges and counts as authoritative
    /// (writes to it become hints), but is not asked for reads.
    Down,
    /// An aborted addition kept for audit; not in the ring.
    Failed,
}

impl NodeState {
    /// Counted when computing natural owners.
    pub fn is_member(self) -> bool {
        matches!(self, Self::Active | Self::Draining | Self::Down)
    }
    /// Counted when computing owners after the pending changes complete.
    fn is_future_member(self) -> bool {
        matches!(self, Self::Active | Self::Down | Self::Bootstrapping)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Bootstrapping => "bootstrapping",
            Self::Draining => "draining",
            Self::Down => "down",
            Self::Failed => "failed",
        }
    }
}

/// A node as the ring sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingNode {
    pub id: NodeId,
    /// Number of tokens when they are derived ([`token`]); ignored when `tokens` is stored.
    pub virtual_nodes: u32,
    /// Tokens stored in the registry when the node was admitted (chosen by the allocator);
    /// `None`: the node's tokens are `token(id, 0..virtual_nodes)`.
    pub tokens: Option<Vec<u64>>,
    pub state: NodeState,
}

impl RingNode {
    /// A node whose tokens follow the xxh3 rule.
    pub fn derived(id: NodeId, virtual_nodes: u32, state: NodeState) -> Self {
        Self {
            id,
            virtual_nodes,
            tokens: None,
            state,
        }
    }

    /// The node's tokens: stored, or derived from its id.
    pub fn tokens(&self) -> Vec<u64> {
        match &self.tokens {
            Some(t) => t.clone(),
            None => (0..self.virtual_nodes)
                .map(|i| token(&self.id, i))
                .collect(),
        }
    }
}

/// Ring position of a tenant's key.
pub fn key_position(tenant_id: &str, key: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(tenant_id.as_bytes());
    h.update(&[0]);
    h.update(key);
    h.digest()
}

/// Bits of a ring position that name its anti-entropy segment (`engine::trees`): the ring is
/// cut into 2^20 segments, and the balanced allocation places tokens on their boundaries so
/// that every range is a whole number of segments.
pub const SEGMENT_BITS: u32 = 20;
/// Width of a segment in ring positions.
pub const SEGMENT_WIDTH: u64 = 1 << (64 - SEGMENT_BITS);

/// The segment boundary nearest to `start + offset` that lies strictly inside the arc
/// `(start, start + width)`, as an offset from `start`; `None` when the arc holds none.
pub fn grid_offset(start: u64, offset: u64, width: u64) -> Option<u64> {
    let at = start.wrapping_add(offset);
    let down = at & !(SEGMENT_WIDTH - 1);
    let up = down.wrapping_add(SEGMENT_WIDTH);
    let inside = |p: u64| {
        let o = p.wrapping_sub(start);
        (o > 0 && o < width).then_some(o)
    };
    let (near, far) = if at - down < SEGMENT_WIDTH / 2 {
        (down, up)
    } else {
        (up, down)
    };
    inside(near).or_else(|| inside(far))
}

/// Token `index` of a node.
pub fn token(node: &NodeId, index: u32) -> u64 {
    xxh3_64(format!("{}#{}", node.0, index).as_bytes())
}

/// A half-open arc `[start, end)` of the ring. When `end <= start` the arc wraps past
/// `u64::MAX`; `start == end` is the whole ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HashRange {
    pub start: u64,
    pub end: u64,
}

impl HashRange {
    pub const FULL: HashRange = HashRange { start: 0, end: 0 };

    pub fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub fn contains(&self, position: u64) -> bool {
        if self.start < self.end {
            self.start <= position && position < self.end
        } else {
            position >= self.start || position < self.end
        }
    }

    /// Whether one of `ranges` contains `position`.
    pub fn any_contains(ranges: &[HashRange], position: u64) -> bool {
        ranges.iter().any(|r| r.contains(position))
    }

    /// Number of positions in the arc (2^64 for the whole ring).
    pub fn width(&self) -> u128 {
        if self.start < self.end {
            u128::from(self.end - self.start)
        } else {
            (1u128 << 64) - u128::from(self.start) + u128::from(self.end)
        }
    }

    /// The positions both arcs contain, as at most two arcs in ring order from `self.start`
    /// (two when each arc wraps into the other's ends). Empty when they do not overlap.
    pub fn intersection(&self, other: &HashRange) -> Vec<HashRange> {
        let mut out: Vec<HashRange> = Vec::new();
        for (a0, a1) in self.pieces() {
            for (b0, b1) in other.pieces() {
                let (lo, hi) = (a0.max(b0), a1.min(b1));
                if lo <= hi {
                    // `hi + 1` wraps to 0 at the top of the ring: [lo, 0) is the arc to the end.
                    out.push(HashRange::new(lo, hi.wrapping_add(1)));
                }
            }
        }
        // A piece that runs to the top of the ring and one that starts at 0 are one arc.
        let top = out.iter().position(|r| r.end == 0 && r.start != 0);
        let bottom = out.iter().position(|r| r.start == 0 && r.end != 0);
        if let (Some(t), Some(b)) = (top, bottom) {
            let joined = HashRange::new(out[t].start, out[b].end);
            out = out
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i != t && *i != b)
                .map(|(_, r)| r)
                .chain([joined])
                .collect();
        }
        out.sort_by_key(|r| r.start.wrapping_sub(self.start));
        out
    }

    /// The same arc as at most two non-wrapping pieces `(start, end_inclusive)`, for scans over
    /// sorted hashes.
    pub fn pieces(&self) -> Vec<(u64, u64)> {
        if self.start < self.end {
            vec![(self.start, self.end - 1)]
        } else if self.end == 0 {
            vec![(self.start, u64::MAX)]
        } else {
            vec![(self.start, u64::MAX), (0, self.end - 1)]
        }
    }
}

/// Sorted tokens of one set of nodes.
#[derive(Debug, Clone, Default)]
struct TokenTable {
    /// (token, index into `nodes`), sorted by token then node id.
    tokens: Vec<(u64, usize)>,
    nodes: Vec<NodeId>,
}

impl TokenTable {
    fn build<'a>(nodes: impl Iterator<Item = &'a RingNode>) -> Self {
        let mut table = TokenTable::default();
        for node in nodes {
            let idx = table.nodes.len();
            table.nodes.push(node.id.clone());
            table
                .tokens
                .extend(node.tokens().into_iter().map(|t| (t, idx)));
        }
        let names = &table.nodes;
        table
            .tokens
            .sort_by(|a, b| a.0.cmp(&b.0).then_with(|| names[a.1].cmp(&names[b.1])));
        table
    }

    fn node_count(&self) -> usize {
        // Nodes with zero vnodes own nothing.
        self.tokens
            .iter()
            .map(|(_, i)| *i)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The first `rf` distinct nodes clockwise from `position`.
    fn owners(&self, position: u64, rf: usize) -> Vec<NodeId> {
        let mut owners: Vec<NodeId> = Vec::with_capacity(rf);
        if self.tokens.is_empty() || rf == 0 {
            return owners;
        }
        let start = self.tokens.partition_point(|(t, _)| *t <= position);
        let n = self.tokens.len();
        for step in 0..n {
            let (_, idx) = self.tokens[(start + step) % n];
            let id = &self.nodes[idx];
            if !owners.contains(id) {
                owners.push(id.clone());
                if owners.len() == rf {
                    break;
                }
            }
        }
        owners
    }
}

/// The ring: every known node with its state, and token tables for placement.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    nodes: BTreeMap<NodeId, RingNode>,
    members: TokenTable,
    future: TokenTable,
}

impl Ring {
    pub fn new(nodes: impl IntoIterator<Item = RingNode>) -> Self {
        let nodes: BTreeMap<NodeId, RingNode> =
            nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
        let members = TokenTable::build(nodes.values().filter(|n| n.state.is_member()));
        let future = TokenTable::build(nodes.values().filter(|n| n.state.is_future_member()));
        Self {
            nodes,
            members,
            future,
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &RingNode> {
        self.nodes.values()
    }

    /// A digest of every node's id, state and tokens, never 0: rings with equal digests place
    /// every key on the same natural and pending owners (up to a 2^-64 collision). Coordinators
    /// tag their writes with it, so a range stream planned on the same ring knows the target
    /// got them already (`WriteBatchRequest.ring_digest`).
    pub fn digest(&self) -> u64 {
        let mut h = Xxh3::new();
        for n in self.nodes.values() {
            h.update(&(n.id.as_str().len() as u64).to_le_bytes());
            h.update(n.id.as_str().as_bytes());
            h.update(n.state.as_str().as_bytes());
            h.update(&[0]);
            h.update(&n.virtual_nodes.to_le_bytes());
            match &n.tokens {
                Some(tokens) => {
                    h.update(&(tokens.len() as u64 + 1).to_le_bytes());
                    for t in tokens {
                        h.update(&t.to_le_bytes());
                    }
                }
                None => h.update(&0u64.to_le_bytes()),
            }
        }
        h.digest().max(1)
    }

    pub fn node(&self, id: &NodeId) -> Option<&RingNode> {
        self.nodes.get(id)
    }

    pub fn state(&self, id: &NodeId) -> Option<NodeState> {
        self.nodes.get(id).map(|n| n.state)
    }

    /// The nodes that will be in the ring once the pending changes complete, with their tokens:
    /// what a joining node's tokens are allocated against.
    pub fn future_members(&self) -> Vec<allocation::PlacedNode> {
        self.nodes
            .values()
            .filter(|n| n.state.is_future_member())
            .map(|n| allocation::PlacedNode {
                id: n.id.clone(),
                tokens: n.tokens(),
            })
            .collect()
    }

    /// Number of nodes that own ranges now.
    pub fn member_count(&self) -> usize {
        self.members.node_count()
    }

    /// The natural owners of a position: RF distinct members clockwise.
    pub fn natural_owners(&self, position: u64, rf: usize) -> Vec<NodeId> {
        self.members.owners(position, rf)
    }

    /// The arcs between consecutive member tokens, from the first token (one arc, the whole
    /// ring from its token, for a single token; none for an empty ring). Every position of an
    /// arc has the same natural owners at any replication factor.
    pub fn member_ranges(&self) -> Vec<HashRange> {
        let mut bounds: Vec<u64> = self.members.tokens.iter().map(|(t, _)| *t).collect();
        bounds.dedup();
        (0..bounds.len())
            .map(|i| HashRange::new(bounds[i], bounds[(i + 1) % bounds.len()]))
            .collect()
    }

    /// The arcs of the ring whose natural owners at replication factor `rf` do not include
    /// `node` (what a cleanup drops there), sorted, adjacent arcs merged. Empty when the ring
    /// has no members.
    pub fn ranges_not_owned(&self, node: &NodeId, rf: usize) -> Vec<HashRange> {
        let mut bounds: Vec<u64> = self.members.tokens.iter().map(|(t, _)| *t).collect();
        bounds.dedup();
        let mut out: Vec<HashRange> = Vec::new();
        for (i, &start) in bounds.iter().enumerate() {
            let end = bounds[(i + 1) % bounds.len()];
            if self.members.owners(start, rf).contains(node) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(HashRange::new(start, end)),
            }
        }
        // The arc ending at the first token and the one starting there are one range.
        if out.len() > 1 && out[out.len() - 1].end == out[0].start {
            if let Some(last) = out.pop() {
                out[0].start = last.start;
            }
        }
        out
    }

    /// The replica plan of a key for a tenant with replication factor `rf`.
    pub fn plan(&self, position: u64, rf: usize) -> ReplicaPlan {
        let natural = self.members.owners(position, rf);
        let future = self.future.owners(position, rf);
        let pending: Vec<NodeId> = future
            .into_iter()
            .filter(|id| !natural.contains(id))
            .collect();
        let with_state = |ids: Vec<NodeId>| -> Vec<(NodeId, NodeState)> {
            ids.into_iter()
                .filter_map(|id| self.state(&id).map(|s| (id, s)))
                .collect()
        };
        ReplicaPlan {
            requested_rf: rf,
            natural: with_state(natural),
            pending: with_state(pending),
        }
    }
}

/// Which nodes a request for one key goes to, and how many of their answers count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlan {
    pub requested_rf: usize,
    /// Natural owners in walk order, with their states.
    pub natural: Vec<(NodeId, NodeState)>,
    /// Nodes that will own the key once the pending topology changes complete.
    pub pending: Vec<(NodeId, NodeState)>,
}

impl ReplicaPlan {
    /// True when the tenant's RF exceeds the number of member nodes.
    pub fn rf_capped(&self) -> bool {
        self.natural.len() < self.requested_rf
    }

    /// Whether acks from this node count toward the required number. Natural owners that are
    /// active or down count. If no natural owner is active or down (every one is draining, e.g.
    /// RF 1 while its node leaves), the draining natural owners count, so the key stays writable
    /// during the drain.
    pub fn is_authoritative(&self, node: &NodeId) -> bool {
        let strict = self.strict_authoritative_count() > 0;
        self.natural.iter().any(|(id, state)| {
            id == node
                && (matches!(state, NodeState::Active | NodeState::Down)
                    || (!strict && *state == NodeState::Draining))
        })
    }

    fn strict_authoritative_count(&self) -> usize {
        self.natural
            .iter()
            .filter(|(_, s)| matches!(s, NodeState::Active | NodeState::Down))
            .count()
    }

    /// A: the number of authoritative replicas.
    pub fn authoritative_count(&self) -> usize {
        match self.strict_authoritative_count() {
            0 => self.natural.len(),
            a => a,
        }
    }

    /// Acks required at `level`.
    pub fn required(&self, level: Consistency) -> usize {
        level.required(self.authoritative_count())
    }

    /// Natural owners plus pending owners: every node a write goes to.
    pub fn write_replicas(&self) -> Vec<NodeId> {
        self.natural
            .iter()
            .chain(self.pending.iter())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Natural owners plus bootstrapping pending owners, minus down nodes: every node a read
    /// may ask, in walk order.
    pub fn read_replicas(&self) -> Vec<NodeId> {
        self.natural
            .iter()
            .chain(
                self.pending
                    .iter()
                    .filter(|(_, s)| *s == NodeState::Bootstrapping),
            )
            .filter(|(_, s)| *s != NodeState::Down)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// One hash range that changes hands between two rings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeMove {
    pub range: HashRange,
    /// A node that holds the range's data before the change.
    pub from: NodeId,
    /// The node that owns the range after the change but did not before.
    pub to: NodeId,
}

/// The hash ranges whose replica sets (natural owners at replication factor `rf`) differ
/// between `before` and `after`, each with the node that must receive it and the node that
/// sends it. Senders are the nodes that lose the range, paired in walk order with the receivers;
/// when fewer nodes lose it than gain it (the RF was capped before), the first remaining owner
/// sends. Adjacent arcs with the same sender and receiver are merged.
pub fn moved_ranges(before: &Ring, after: &Ring, rf: usize) -> Vec<RangeMove> {
    moved_ranges_with(before, after, rf, |_| true)
}

/// [`moved_ranges`] where only nodes for which `can_send` holds may send (a dead node being
/// removed cannot): an unusable sender is replaced by every old owner of the arc that can send
/// (each may lack writes the others have); a receiver that replaces nobody (the RF was capped)
/// gets the arc from the first old owner that can send; an arc no old owner can send is left
/// out (its data is gone with the dead nodes).
pub fn moved_ranges_with(
    before: &Ring,
    after: &Ring,
    rf: usize,
    can_send: impl Fn(&NodeId) -> bool,
) -> Vec<RangeMove> {
    let mut boundaries: Vec<u64> = before
        .members
        .tokens
        .iter()
        .chain(after.members.tokens.iter())
        .map(|(t, _)| *t)
        .collect();
    boundaries.sort_unstable();
    boundaries.dedup();
    let mut moves: Vec<RangeMove> = Vec::new();
    for (i, &start) in boundaries.iter().enumerate() {
        let end = boundaries[(i + 1) % boundaries.len()];
        let old = before.members.owners(start, rf);
        let new = after.members.owners(start, rf);
        if old.is_empty() {
            continue;
        }
        let lost: Vec<&NodeId> = old.iter().filter(|n| !new.contains(n)).collect();
        let gained = new.iter().filter(|n| !old.contains(n));
        for (k, to) in gained.enumerate() {
            let senders: Vec<&NodeId> = match lost.get(k).copied() {
                Some(paired) if can_send(paired) => vec![paired],
                // The owner it replaces is dead, and no one node is known to hold everything
                // that one held (a write may have reached only some replicas): every live old
                // owner sends, so the receiver gets the newest version any of them holds.
                Some(_) => old.iter().filter(|n| can_send(n)).collect(),
                // It replaces nobody (the RF was capped by the node count): one more copy.
                None => old.iter().find(|n| can_send(n)).into_iter().collect(),
            };
            for from in senders {
                let range = HashRange::new(start, end);
                match moves
                    .iter_mut()
                    .rev()
                    .find(|m| m.from == *from && m.to == *to)
                {
                    Some(prev) if prev.range.end == start && prev.range.start != start => {
                        prev.range.end = end;
                    }
                    _ => moves.push(RangeMove {
                        range,
                        from: from.clone(),
                        to: to.clone(),
                    }),
                }
            }
        }
    }
    moves.sort();
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState) -> RingNode {
        RingNode::derived(NodeId::new(id), RANDOM_VIRTUAL_NODES, state)
    }

    fn active(ids: &[&str]) -> Ring {
        Ring::new(ids.iter().map(|id| node(id, NodeState::Active)))
    }

    #[test]
    fn the_digest_follows_every_node_state_and_token() {
        let base = Ring::new([node("s1", NodeState::Active), node("s2", NodeState::Active)]);
        let same = Ring::new([node("s2", NodeState::Active), node("s1", NodeState::Active)]);
        assert_eq!(
            base.digest(),
            same.digest(),
            "order of construction does not matter"
        );
        let joining = Ring::new([
            node("s1", NodeState::Active),
            node("s2", NodeState::Active),
            node("s3", NodeState::Bootstrapping),
        ]);
        let draining = Ring::new([
            node("s1", NodeState::Active),
            node("s2", NodeState::Draining),
        ]);
        let mut tokens = node("s2", NodeState::Active);
        tokens.tokens = Some(vec![1, 2, 3]);
        let stored = Ring::new([node("s1", NodeState::Active), tokens]);
        let digests = [
            base.digest(),
            joining.digest(),
            draining.digest(),
            stored.digest(),
        ];
        let distinct: BTreeSet<u64> = digests.iter().copied().collect();
        assert_eq!(distinct.len(), digests.len(), "{digests:?}");
        assert!(digests.iter().all(|d| *d != 0), "0 means unknown");
    }

    #[test]
    fn key_position_separates_tenants() {
        assert_ne!(key_position("a", b"k"), key_position("b", b"k"));
        assert_ne!(key_position("ab", b"c"), key_position("a", b"bc"));
        assert_eq!(key_position("t", b"k"), xxh3_64(b"t\0k"));
    }

    #[test]
    fn replicas_are_distinct_and_capped() {
        let ring = active(&["s1", "s2", "s3"]);
        let plan = ring.plan(key_position("t", b"k"), 5);
        assert_eq!(plan.natural.len(), 3);
        assert!(plan.rf_capped());
        let ids: BTreeSet<_> = plan.natural.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(plan.required(Consistency::Quorum), 2);
        assert_eq!(plan.required(Consistency::All), 3);
        assert_eq!(plan.required(Consistency::One), 1);
    }

    #[test]
    fn hash_range_wraps() {
        let r = HashRange::new(u64::MAX - 1, 2);
        assert!(r.contains(u64::MAX) && r.contains(0) && r.contains(1));
        assert!(!r.contains(2) && !r.contains(5));
        assert!(HashRange::FULL.contains(12345));
        assert_eq!(r.pieces(), vec![(u64::MAX - 1, u64::MAX), (0, 1)]);
        assert_eq!(HashRange::new(5, 0).pieces(), vec![(5, u64::MAX)]);
    }

    #[test]
    fn bootstrapping_node_is_pending_not_authoritative() {
        let ring = Ring::new([
            node("s1", NodeState::Active),
            node("s2", NodeState::Active),
            node("s3", NodeState::Active),
            node("s4", NodeState::Bootstrapping),
        ]);
        let mut saw_pending = false;
        for k in 0..200u32 {
            let plan = ring.plan(key_position("t", &k.to_be_bytes()), 2);
            assert_eq!(plan.authoritative_count(), 2);
            assert!(!plan.is_authoritative(&NodeId::new("s4")));
            if plan.pending.iter().any(|(id, _)| id.as_str() == "s4") {
                saw_pending = true;
                assert!(plan.write_replicas().contains(&NodeId::new("s4")));
                assert!(plan.read_replicas().contains(&NodeId::new("s4")));
            }
        }
        assert!(saw_pending);
    }

    #[test]
    fn down_node_counts_but_is_not_read() {
        let ring = Ring::new([
            node("s1", NodeState::Down),
            node("s2", NodeState::Active),
            node("s3", NodeState::Active),
        ]);
        let plan = ring.plan(key_position("t", b"k"), 3);
        assert_eq!(plan.authoritative_count(), 3);
        assert!(!plan.read_replicas().contains(&NodeId::new("s1")));
        assert!(plan.write_replicas().contains(&NodeId::new("s1")));
    }

    #[test]
    fn draining_node_hands_its_range_to_a_pending_owner() {
        let ring = Ring::new([
            node("s1", NodeState::Draining),
            node("s2", NodeState::Active),
        ]);
        // RF 1: keys owned by s1 are pending on s2; s1 alone counts so writes keep working.
        let mut saw = false;
        for k in 0..100u32 {
            let plan = ring.plan(key_position("t", &k.to_be_bytes()), 1);
            if plan.natural[0].0.as_str() == "s1" {
                saw = true;
                assert_eq!(plan.pending[0].0.as_str(), "s2");
                assert_eq!(plan.authoritative_count(), 1);
                assert!(plan.is_authoritative(&NodeId::new("s1")));
            }
        }
        assert!(saw);
    }

    #[test]
    fn adding_to_an_empty_ring_moves_nothing() {
        assert!(moved_ranges(&Ring::default(), &active(&["s1"]), 1).is_empty());
    }
}
