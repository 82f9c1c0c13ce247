//! Token allocation: the tokens a joining node takes so that replica ownership evens out
//! (SEMANTICS.md, "Placement"; docs/placement.md).
//!
//! The allocator is pure: from the tokens of the nodes that will be in the ring, the replication
//! factors in use and the number of tokens wanted, it returns the new node's tokens. It never
//! changes another node's tokens, so adding a node only moves data *to* that node (every replica
//! set gains the new node and loses at most one other), whatever tokens it picks.
//!
//! Method (a greedy descent in the spirit of Cassandra's replication-aware allocator):
//! - The *load* of a node at replication factor `r` is the fraction of the ring it holds a
//!   replica of (the widths of the ranges whose first `r` distinct owners include it).
//! - Tokens are placed one at a time. A candidate is a range `[a, b)` of the current ring split
//!   at `a + u`: the new node takes `[a, a + u)` from the last replica of that range, and every
//!   earlier range whose walk now meets the new token before `r` distinct nodes takes the new
//!   node in place of its last replica.
//! - A candidate's cost, summed over the replication factors: the change of the squared
//!   distance of each node it takes from from its fair load `r / nodes` (taking from the most
//!   loaded pays most, from one below its fair load costs); the same for each token's load
//!   against its share of its node's fair load (so a node's tokens carry equal loads: a node
//!   whose tokens were uneven, or sat next to each other, could not be relieved evenly by later
//!   nodes); and the squared distance of what the new token brings from the new node's share
//!   per token, weighted by its number of tokens. The cost is a quadratic in `u`, solved
//!   exactly, so each range has one best split and one cost.
//! - The cheapest candidate over all ranges is taken. Placing a token mostly raises the other
//!   candidates' costs (the nodes and tokens taken from get closer to fair), so candidates sit
//!   in a heap with their last cost and are re-scored when they reach the top (lazy greedy):
//!   the one taken is always scored against the current ring. Ranges next to a placed token
//!   are re-scored at once because their replica sets changed.
//!
//! Invariants: the returned tokens are distinct, sorted, distinct from every existing token
//! and on segment boundaries (multiples of `SEGMENT_WIDTH`, so ranges between them are whole
//! anti-entropy segments);
//! the result depends only on the inputs (deterministic); with no informative replication factor
//! (fewer nodes than the smallest RF) the tokens split the widest ranges in half.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap};

use serde::{Deserialize, Serialize};

use super::{NodeId, Ring, SEGMENT_WIDTH, grid_offset};

/// 2^64 as a float: ring widths are handled as fractions of the ring.
const RING: f64 = 18_446_744_073_709_551_616.0;

/// How a joining node's tokens are chosen (`token_allocation` in the coordinator's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAllocation {
    /// Chosen by [`allocate_tokens`] and stored in the node's registry record.
    #[default]
    Balanced,
    /// The xxh3 rule (`token(id, i)`), nothing stored: the placement of earlier versions.
    Random,
}

impl TokenAllocation {
    /// `requested` tokens, or this allocation's default when 0.
    pub fn virtual_nodes(self, requested: u32) -> u32 {
        match (requested, self) {
            (0, Self::Balanced) => super::BALANCED_VIRTUAL_NODES,
            (0, Self::Random) => super::RANDOM_VIRTUAL_NODES,
            (v, _) => v,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "balanced" => Some(Self::Balanced),
            "random" => Some(Self::Random),
            _ => None,
        }
    }
}

/// The tokens to store for `new` joining `ring` with `vnodes` tokens, for the replication
/// factors `rfs` in use: `None` under [`TokenAllocation::Random`] (the tokens are derived).
/// Coordinators and the ring simulator both call this.
pub fn choose_tokens(
    ring: &Ring,
    new: &NodeId,
    policy: TokenAllocation,
    vnodes: u32,
    rfs: &[usize],
) -> Option<Vec<u64>> {
    match policy {
        TokenAllocation::Random => None,
        TokenAllocation::Balanced => {
            Some(allocate_tokens(&ring.future_members(), new, vnodes, rfs))
        }
    }
}

/// One node already in the ring (or joining it) with its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedNode {
    pub id: NodeId,
    pub tokens: Vec<u64>,
}

/// The tokens node `new` should take: `count` tokens chosen against `existing` (the nodes that
/// will be in the ring, with their tokens) to even out ownership at the replication factors
/// `rfs` (the tenants' RFs; duplicates and zeros are ignored).
pub fn allocate_tokens(
    existing: &[PlacedNode],
    new: &NodeId,
    count: u32,
    rfs: &[usize],
) -> Vec<u64> {
    let mut ring = WorkRing::new(existing, new);
    let informative: BTreeSet<usize> = rfs
        .iter()
        .copied()
        .filter(|&r| r >= 1 && r <= ring.existing_nodes)
        .collect();
    let mut placed = Vec::with_capacity(count as usize);
    if ring.tokens.is_empty() {
        placed.extend(evenly_spaced(new, count));
    } else if informative.is_empty() {
        for _ in 0..count {
            match ring.widest_splittable() {
                Some(i) => {
                    let (a, w) = ring.range(i);
                    match grid_offset(a, w / 2, w) {
                        Some(o) => placed.push(ring.insert(a.wrapping_add(o))),
                        None => break,
                    }
                }
                None => break,
            }
        }
    } else {
        let rfs: Vec<usize> = informative.into_iter().collect();
        let mut greedy = Greedy::new(ring, rfs, count);
        for _ in 0..count {
            match greedy.place_best() {
                Some(t) => placed.push(t),
                None => break,
            }
        }
    }
    placed.sort_unstable();
    placed.dedup();
    placed
}

/// `count` tokens spread evenly around the ring from an offset derived from the node id (the
/// first node of a ring).
fn evenly_spaced(new: &NodeId, count: u32) -> Vec<u64> {
    let offset = super::token(new, 0) & !(SEGMENT_WIDTH - 1);
    let step = (u64::MAX / u64::from(count.max(1))) & !(SEGMENT_WIDTH - 1);
    (0..u64::from(count))
        .map(|k| offset.wrapping_add(k.wrapping_mul(step)))
        .collect()
}

/// The ring being built: sorted tokens with the index of their owner. Owner `NEW` is the node
/// being allocated.
#[derive(Debug, Clone)]
struct WorkRing {
    /// (token, owner), sorted by token; owners are indices into the node list, [`NEW`] last.
    tokens: Vec<(u64, usize)>,
    /// Number of distinct nodes other than the new one.
    existing_nodes: usize,
    /// Index of the new node.
    new: usize,
}

impl WorkRing {
    fn new(existing: &[PlacedNode], new: &NodeId) -> Self {
        let mut tokens = Vec::new();
        let mut ids: Vec<&NodeId> = existing
            .iter()
            .filter(|n| &n.id != new && !n.tokens.is_empty())
            .map(|n| &n.id)
            .collect();
        ids.sort();
        ids.dedup();
        for node in existing.iter().filter(|n| &n.id != new) {
            if let Ok(idx) = ids.binary_search(&&node.id) {
                tokens.extend(node.tokens.iter().map(|&t| (t, idx)));
            }
        }
        // Equal tokens are ordered by node id, as in the ring itself.
        tokens.sort_unstable();
        tokens.dedup_by_key(|(t, _)| *t);
        Self {
            tokens,
            existing_nodes: ids.len(),
            new: ids.len(),
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Range `i` is `[token[i-1], token[i])` (wrapping): its start and width.
    fn range(&self, i: usize) -> (u64, u64) {
        let end = self.tokens[i].0;
        let start = self.tokens[(i + self.len() - 1) % self.len()].0;
        let width = end.wrapping_sub(start);
        // A ring of one token: that range is the whole ring.
        (start, if width == 0 { u64::MAX } else { width })
    }

    fn owner(&self, i: usize) -> usize {
        self.tokens[i % self.len()].1
    }

    fn widest_splittable(&self) -> Option<usize> {
        (0..self.len())
            .filter(|&i| self.range(i).1 >= 2)
            .max_by_key(|&i| (self.range(i).1, std::cmp::Reverse(i)))
    }

    /// Adds a token of the new node; returns it.
    fn insert(&mut self, token: u64) -> u64 {
        let at = self.tokens.partition_point(|(t, _)| *t < token);
        self.tokens.insert(at, (token, self.new));
        token
    }

    /// Index of the range that ends at `end` and starts at `start`, if it still exists.
    fn find(&self, start: u64, end: u64) -> Option<usize> {
        let i = self.tokens.binary_search_by_key(&end, |(t, _)| *t).ok()?;
        (self.range(i).0 == start).then_some(i)
    }
}

/// Per replication factor: every range's replica set, which token brings each replica, and the
/// loads of nodes and tokens.
struct Ownership {
    r: usize,
    /// Replica sets, `r` entries per range in walk order (flattened).
    sets: Vec<usize>,
    /// For each entry of `sets`: the index of the token through which that node is a replica
    /// (its first token in the walk).
    via: Vec<usize>,
    /// Load of each node (fraction of the ring), the new node last.
    load: Vec<f64>,
    /// Load each token brings its node: the widths of the ranges it is the `via` token of.
    token_load: Vec<f64>,
    /// Tokens per node, the new node last.
    tokens_of: Vec<usize>,
}

impl Ownership {
    fn compute(ring: &WorkRing, r: usize) -> Self {
        let n = ring.len();
        let mut own = Self {
            r,
            sets: Vec::with_capacity(n * r),
            via: Vec::with_capacity(n * r),
            load: vec![0.0; ring.new + 1],
            token_load: vec![0.0; n],
            tokens_of: vec![0; ring.new + 1],
        };
        for &(_, o) in &ring.tokens {
            own.tokens_of[o] += 1;
        }
        for i in 0..n {
            let width = ring.range(i).1 as f64 / RING;
            let before = own.sets.len();
            for step in 0..n {
                let k = (i + step) % n;
                let o = ring.owner(k);
                if !own.sets[before..].contains(&o) {
                    own.sets.push(o);
                    own.via.push(k);
                    own.load[o] += width;
                    own.token_load[k] += width;
                    if own.sets.len() - before == r {
                        break;
                    }
                }
            }
            // Fewer than r distinct nodes cannot happen: r <= existing nodes.
            own.sets.resize(before + r, usize::MAX);
            own.via.resize(before + r, usize::MAX);
        }
        own
    }

    fn set(&self, i: usize) -> &[usize] {
        &self.sets[i * self.r..(i + 1) * self.r]
    }

    fn via(&self, i: usize) -> &[usize] {
        &self.via[i * self.r..(i + 1) * self.r]
    }
}

/// What a cost term is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// A node's load (the new node included).
    Node(usize),
    /// The load an existing token brings its node.
    Token(usize),
    /// The load the token being placed brings the new node.
    NewToken,
}

/// One term of a candidate's cost: `subject`, at factor index `f`, changes by
/// `constant + slope * u`.
#[derive(Debug, Clone, Copy)]
struct Term {
    f: usize,
    subject: Subject,
    constant: f64,
    slope: f64,
}

/// A candidate's best split: the offset into its range and its cost.
#[derive(Debug, Clone, Copy)]
struct Split {
    offset: u64,
    delta: f64,
}

/// A heap entry: the range `[start, end)` and its last known cost (lower is better; the heap
/// pops the lowest).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    delta: f64,
    start: u64,
    end: u64,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Reversed on `delta` so the max-heap pops the best (lowest) cost; ties by position.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .delta
            .total_cmp(&self.delta)
            .then_with(|| other.end.cmp(&self.end))
            .then_with(|| other.start.cmp(&self.start))
    }
}

struct Greedy {
    ring: WorkRing,
    owned: Vec<Ownership>,
    /// Tokens the new node will have.
    count: f64,
    /// Per factor: every node's fair load once the new node is in (`r / nodes`).
    fair: Vec<f64>,
    heap: BinaryHeap<Candidate>,
    terms: Vec<Term>,
    prefix: Vec<usize>,
}

impl Greedy {
    fn new(ring: WorkRing, rfs: Vec<usize>, count: u32) -> Self {
        let owned = rfs.iter().map(|&r| Ownership::compute(&ring, r)).collect();
        let nodes_after = (ring.existing_nodes + 1) as f64;
        let mut greedy = Self {
            count: f64::from(count.max(1)),
            fair: rfs.iter().map(|&r| r as f64 / nodes_after).collect(),
            ring,
            owned,
            heap: BinaryHeap::new(),
            terms: Vec::new(),
            prefix: Vec::new(),
        };
        for i in 0..greedy.ring.len() {
            greedy.push(i);
        }
        greedy
    }

    fn push(&mut self, i: usize) {
        if let Some(split) = self.score(i) {
            let (start, _) = self.ring.range(i);
            // The range's own end token: `start + width` is not it when one token is the
            // whole ring (its width is reported as u64::MAX, one short of a full turn).
            let end = self.ring.tokens[i % self.ring.len()].0;
            self.heap.push(Candidate {
                delta: split.delta,
                start,
                end,
            });
        }
    }

    /// Takes the best candidate (lazily re-scored), inserts its token, refreshes the ownership
    /// and re-scores the ranges around it. `None` when no range can be split any more.
    fn place_best(&mut self) -> Option<u64> {
        let (i, split) = loop {
            let top = self.heap.pop()?;
            let Some(i) = self.ring.find(top.start, top.end) else {
                continue; // split since it was scored
            };
            let Some(split) = self.score(i) else {
                continue;
            };
            let fresh = Candidate {
                delta: split.delta,
                ..top
            };
            match self.heap.peek() {
                Some(next) if next > &fresh => self.heap.push(fresh),
                _ => break (i, split),
            }
        };
        let (start, _) = self.ring.range(i);
        let token = self.ring.insert(start.wrapping_add(split.offset));
        for o in &mut self.owned {
            *o = Ownership::compute(&self.ring, o.r);
        }
        // Ranges whose walk meets the new token changed replica sets: re-score a window of
        // them now (the largest RF's worth of distinct owners each way, and some).
        let at = self
            .ring
            .tokens
            .binary_search_by_key(&token, |(t, _)| *t)
            .unwrap_or(0);
        let reach = self.owned.iter().map(|o| o.r).max().unwrap_or(1) * 4 + 2;
        let n = self.ring.len();
        for k in 0..(2 * reach + 1).min(n) {
            self.push((at + n + k - reach.min(n)) % n);
        }
        Some(token)
    }

    /// The fair load of one token of node `node` at factor `f`: its node's fair load shared by
    /// its tokens (the new node's by the tokens it will have).
    fn token_share(&self, f: usize, node: usize) -> f64 {
        let tokens = if node == self.ring.new {
            self.count
        } else {
            self.owned[f].tokens_of[node].max(1) as f64
        };
        self.fair[f] / tokens
    }

    /// A term's cost as `weight * ((a + slope * u)^2 - b)`: the change of the squared distance
    /// of an existing node's load from its fair load, or of a token's load from its fair share
    /// (the new token's has no "before", so `b` = 0). Every term weighs `1 / r`, except the new
    /// token's, which weighs as many times more as the new node will have tokens: it stands for
    /// the new node's whole load (the new node's own total is not a term: with its load far
    /// below fair, it would reward any gain and drown out whom the gain is taken from). The
    /// weights were chosen with the ring simulator (docs/benchmarks.md, "Ring balance").
    fn quadratic(&self, t: &Term) -> (f64, f64, f64) {
        let own = &self.owned[t.f];
        let weight = 1.0 / own.r as f64;
        let (weight, over) = match t.subject {
            Subject::Node(k) => (weight, own.load[k] - self.fair[t.f]),
            Subject::Token(k) => (
                weight,
                own.token_load[k] - self.token_share(t.f, self.ring.owner(k)),
            ),
            Subject::NewToken => {
                let share = self.token_share(t.f, self.ring.new);
                return (weight * self.count, t.constant - share, 0.0);
            }
        };
        (weight, over + t.constant, over * over)
    }

    /// The best split of range `i` and its cost; `None` when the range is too narrow to split.
    fn score(&mut self, i: usize) -> Option<Split> {
        let (start, width) = self.ring.range(i);
        if width < 2 {
            return None;
        }
        let w = width as f64 / RING;
        let new = self.ring.new;
        let n = self.ring.len();
        self.terms.clear();
        for f in 0..self.owned.len() {
            let r = self.owned[f].r;
            // The new token is always a term: one that brings nothing costs its whole share.
            add_term(&mut self.terms, f, Subject::NewToken, 0.0, 0.0);
            // The split part [a, a+u): the walk is the new token, then range i's.
            self.take(f, i, 0.0, 1.0);
            // Earlier ranges whose walk reaches the new token before r distinct nodes.
            self.prefix.clear();
            for back in 1..n {
                let j = (i + n - back) % n;
                let o = self.ring.owner(j);
                if !self.prefix.contains(&o) {
                    self.prefix.push(o);
                }
                if self.prefix.len() >= r {
                    break;
                }
                if self.prefix.contains(&new) {
                    continue; // the new node comes earlier in this walk: nothing changes
                }
                let wj = self.ring.range(j).1 as f64 / RING;
                self.take(f, j, wj, 0.0);
            }
        }
        // Cost: sum over terms of weight * ((a + s u)^2 - b), minimized over u (a quadratic).
        let mut num = 0.0;
        let mut den = 0.0;
        for t in &self.terms {
            let (weight, a, _) = self.quadratic(t);
            num += weight * t.slope * a;
            den += weight * t.slope * t.slope;
        }
        let min_u = 1.0 / RING;
        let max_u = (width - 1) as f64 / RING;
        let best = if den > 0.0 {
            (-num / den).clamp(min_u, max_u)
        } else {
            w / 2.0
        };
        // The token goes on the segment boundary nearest the best split; it is scored there.
        let offset = ((best * RING) as u64).clamp(1, width - 1);
        let offset = grid_offset(start, offset, width)?;
        let u = offset as f64 / RING;
        let delta: f64 = self
            .terms
            .iter()
            .map(|t| {
                let (weight, a, b) = self.quadratic(t);
                let after = a + t.slope * u;
                weight * (after * after - b)
            })
            .sum();
        Some(Split { offset, delta })
    }

    /// Range `j`'s positions covered (`constant + slope * u` of them) now meet the new token
    /// before the rest of their walk: the new token brings them to the new node, taken from the
    /// new node's later token if it already was a replica, else from the last replica.
    fn take(&mut self, f: usize, j: usize, constant: f64, slope: f64) {
        let own = &self.owned[f];
        let r = own.r;
        let new = self.ring.new;
        let (set, via) = (own.set(j), own.via(j));
        add_term(&mut self.terms, f, Subject::NewToken, constant, slope);
        match set.iter().position(|&o| o == new) {
            Some(k) => {
                let later = via[k];
                add_term(&mut self.terms, f, Subject::Token(later), -constant, -slope);
            }
            None => {
                let (dropped, through) = (set[r - 1], via[r - 1]);
                add_term(
                    &mut self.terms,
                    f,
                    Subject::Node(dropped),
                    -constant,
                    -slope,
                );
                add_term(
                    &mut self.terms,
                    f,
                    Subject::Token(through),
                    -constant,
                    -slope,
                );
            }
        }
    }
}

/// Adds `constant + slope * u` to `subject`'s change at factor `f`.
fn add_term(terms: &mut Vec<Term>, f: usize, subject: Subject, constant: f64, slope: f64) {
    match terms.iter_mut().find(|t| t.f == f && t.subject == subject) {
        Some(t) => {
            t.constant += constant;
            t.slope += slope;
        }
        None => terms.push(Term {
            f,
            subject,
            constant,
            slope,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grow(nodes: usize, vnodes: u32, rfs: &[usize]) -> Vec<PlacedNode> {
        let mut placed: Vec<PlacedNode> = Vec::new();
        for k in 0..nodes {
            let id = NodeId::new(format!("n{k}"));
            let tokens = allocate_tokens(&placed, &id, vnodes, rfs);
            placed.push(PlacedNode { id, tokens });
        }
        placed
    }

    #[test]
    fn tokens_are_distinct_new_and_counted() {
        let placed = grow(12, 16, &[3]);
        let mut all = BTreeSet::new();
        for node in &placed {
            assert_eq!(node.tokens.len(), 16, "{}", node.id);
            for t in &node.tokens {
                assert!(all.insert(*t), "token {t} taken twice");
            }
        }
    }

    #[test]
    fn a_node_with_one_token_can_be_joined() {
        // One token is the whole ring; the proptest found that its candidate was lost and the
        // joiner got no token at all.
        for rfs in [&[1][..], &[1, 3], &[3]] {
            let placed = grow(2, 1, rfs);
            assert_eq!(placed[1].tokens.len(), 1, "rfs {rfs:?}");
            assert_ne!(placed[0].tokens, placed[1].tokens);
        }
    }

    #[test]
    fn allocation_is_deterministic() {
        assert_eq!(grow(8, 8, &[1, 3]), grow(8, 8, &[1, 3]));
    }

    /// The cost of going from `before` to `after` (one more token of the new node, which will
    /// have `count`), computed from scratch as the allocator defines it (`Greedy::quadratic`).
    fn cost(before: &WorkRing, after: &WorkRing, rfs: &[usize], count: u32) -> f64 {
        let nodes_after = (before.existing_nodes + 1) as f64;
        let count = f64::from(count);
        rfs.iter()
            .map(|&r| {
                let (b, a) = (Ownership::compute(before, r), Ownership::compute(after, r));
                let fair = r as f64 / nodes_after;
                let nodes: f64 = (0..before.new)
                    .map(|k| (a.load[k] - fair).powi(2) - (b.load[k] - fair).powi(2))
                    .sum();
                let share = |owner: usize| {
                    if owner == before.new {
                        fair / count
                    } else {
                        fair / b.tokens_of[owner] as f64
                    }
                };
                let (mut tokens, mut new_token) = (0.0, 0.0);
                for (k, &(t, owner)) in after.tokens.iter().enumerate() {
                    let now = a.token_load[k] - share(owner);
                    tokens += match before.tokens.binary_search_by_key(&t, |(t, _)| *t) {
                        Ok(old) => now * now - (b.token_load[old] - share(owner)).powi(2),
                        Err(_) => {
                            new_token = now * now;
                            now * now
                        }
                    };
                }
                (nodes + tokens + (count - 1.0) * new_token) / r as f64
            })
            .sum()
    }

    #[test]
    fn a_split_scores_what_a_full_recomputation_measures() {
        let placed = grow(9, 6, &[2, 3]);
        let new = NodeId::new("joiner");
        let ring = WorkRing::new(&placed, &new);
        let mut greedy = Greedy::new(ring.clone(), vec![2, 3], 6);
        // Two tokens in, so the new node already holds ranges when the rest are scored.
        greedy.place_best();
        greedy.place_best();
        for i in 0..greedy.ring.len() {
            let Some(split) = greedy.score(i) else {
                continue;
            };
            let mut after = greedy.ring.clone();
            let (start, _) = after.range(i);
            after.insert(start.wrapping_add(split.offset));
            let measured = cost(&greedy.ring, &after, &[2, 3], 6);
            assert!(
                (measured - split.delta).abs() < 1e-9,
                "range {i}: scored {} measured {measured}",
                split.delta
            );
        }
    }

    #[test]
    fn first_node_spreads_its_tokens() {
        let tokens = allocate_tokens(&[], &NodeId::new("a"), 4, &[3]);
        assert_eq!(tokens.len(), 4);
        let gaps: Vec<u64> = (0..4)
            .map(|i| tokens[(i + 1) % 4].wrapping_sub(tokens[i]))
            .collect();
        assert!(
            gaps.iter().all(|g| *g >= u64::MAX / 4 - SEGMENT_WIDTH),
            "{gaps:?}"
        );
        assert!(tokens.iter().all(|t| t % SEGMENT_WIDTH == 0), "{tokens:x?}");
    }
}
