//! The ring simulator behind `pairdb ring simulate`: grows a ring one node at a time with the
//! coordinators' own token choice ([`choose_tokens`]) and transfer planning ([`moved_ranges`]),
//! then adds or removes nodes, and measures at every step how evenly replicas are spread and how
//! much data moved. Pure: no cluster, no I/O.
//!
//! Measures, per replication factor: each node's *replica ownership* (the fraction of the ring
//! it holds a copy of), reported as max/mean and min/mean; the fraction of all copies a step
//! moved (`sum of moved range widths / (rf * ring)`), next to the ideal for an addition,
//! `1 / (nodes after)`; the number of ranges (tokens); and the time to plan the step (token
//! choice plus transfer plans).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::allocation::{TokenAllocation, choose_tokens};
use super::{NodeId, NodeState, Ring, RingNode, moved_ranges};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Nodes the ring is grown to, one at a time, before the measured steps.
    pub nodes: usize,
    pub vnodes: u32,
    /// Replication factors in use (the allocator balances for all of them).
    pub rfs: Vec<usize>,
    /// Nodes added one at a time after the ring is grown, each a measured step.
    pub add: usize,
    /// Nodes removed one at a time after that (spread around the node list), each a step.
    pub remove: usize,
    pub allocation: TokenAllocation,
}

/// Balance at one replication factor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Balance {
    pub rf: usize,
    /// Largest replica ownership over the mean.
    pub max_over_mean: f64,
    /// Smallest replica ownership over the mean.
    pub min_over_mean: f64,
    /// Fraction of all copies moved by the step that led here (0 for the grown ring).
    pub moved_fraction: f64,
}

/// The ring after one step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    /// "grown to N", "add nX", "remove nX".
    pub what: String,
    pub nodes: usize,
    pub ranges: usize,
    /// For an addition, the ideal fraction of copies moved: 1 / nodes.
    pub ideal_moved_fraction: Option<f64>,
    pub balance: Vec<Balance>,
    /// Time to choose the tokens and plan every RF's transfers for this step.
    #[serde(serialize_with = "millis")]
    pub planning: Duration,
    /// The slowest single addition while growing the ring (grown step only).
    #[serde(serialize_with = "millis")]
    pub slowest_growth_planning: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Replica ownership of every member node at replication factor `rf`, as fractions of the ring.
pub fn ownership(ring: &Ring, rf: usize) -> Vec<(NodeId, f64)> {
    let table = &ring.members;
    let mut load = vec![0.0f64; table.nodes.len()];
    let n = table.tokens.len();
    if n == 0 {
        return Vec::new();
    }
    for i in 0..n {
        let start = table.tokens[(i + n - 1) % n].0;
        let end = table.tokens[i].0;
        let width = match end.wrapping_sub(start) {
            0 => 1.0,
            w => w as f64 / 18_446_744_073_709_551_616.0,
        };
        for owner in table.owners(start, rf) {
            if let Some(idx) = table.nodes.iter().position(|id| *id == owner) {
                load[idx] += width;
            }
        }
    }
    table.nodes.iter().cloned().zip(load).collect()
}

fn balance(ring: &Ring, rf: usize, moved_fraction: f64) -> Balance {
    let loads: Vec<f64> = ownership(ring, rf).into_iter().map(|(_, l)| l).collect();
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
    Balance {
        rf,
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        min_over_mean: if mean > 0.0 { min / mean } else { 0.0 },
        moved_fraction,
    }
}

fn node_id(k: usize) -> NodeId {
    NodeId::new(format!("n{k}"))
}

/// Adds `id` to `nodes` with tokens chosen as a coordinator would; returns the time taken.
fn admit(nodes: &mut Vec<RingNode>, id: NodeId, scenario: &Scenario) -> Duration {
    let started = Instant::now();
    let ring = Ring::new(nodes.iter().cloned());
    let tokens = choose_tokens(
        &ring,
        &id,
        scenario.allocation,
        scenario.vnodes,
        &scenario.rfs,
    );
    nodes.push(RingNode {
        id,
        virtual_nodes: scenario.vnodes,
        tokens,
        state: NodeState::Active,
    });
    started.elapsed()
}

/// The balance after going from `before` to `after`, with the fraction of copies moved per RF
/// and the time to plan those transfers.
fn measure(before: &Ring, after: &Ring, rfs: &[usize]) -> (Vec<Balance>, Duration) {
    let mut planning = Duration::ZERO;
    let balances = rfs
        .iter()
        .map(|&rf| {
            let started = Instant::now();
            let moves = moved_ranges(before, after, rf);
            planning += started.elapsed();
            let moved: f64 = moves
                .iter()
                .map(|m| m.range.width() as f64 / 18_446_744_073_709_551_616.0)
                .sum();
            balance(after, rf, moved / rf as f64)
        })
        .collect();
    (balances, planning)
}

/// Runs a scenario: the grown ring first, then one step per addition and removal.
pub fn run(scenario: &Scenario) -> Vec<Step> {
    let mut nodes: Vec<RingNode> = Vec::new();
    let mut slowest = Duration::ZERO;
    for k in 0..scenario.nodes {
        slowest = slowest.max(admit(&mut nodes, node_id(k), scenario));
    }
    let mut ring = Ring::new(nodes.iter().cloned());
    let mut steps = vec![Step {
        what: format!("grown to {}", scenario.nodes),
        nodes: ring.member_count(),
        ranges: ring.members.tokens.len(),
        ideal_moved_fraction: None,
        balance: scenario
            .rfs
            .iter()
            .map(|&rf| balance(&ring, rf, 0.0))
            .collect(),
        planning: Duration::ZERO,
        slowest_growth_planning: slowest,
    }];
    for k in scenario.nodes..scenario.nodes + scenario.add {
        let id = node_id(k);
        let choose = admit(&mut nodes, id.clone(), scenario);
        let after = Ring::new(nodes.iter().cloned());
        let (balance, plan) = measure(&ring, &after, &scenario.rfs);
        steps.push(Step {
            what: format!("add {id}"),
            nodes: after.member_count(),
            ranges: after.members.tokens.len(),
            ideal_moved_fraction: Some(1.0 / after.member_count() as f64),
            balance,
            planning: choose + plan,
            slowest_growth_planning: Duration::ZERO,
        });
        ring = after;
    }
    for r in 0..scenario.remove {
        if nodes.len() <= 1 {
            break;
        }
        // Spread the removals over the node list rather than taking the newest ones.
        let at = (r * 7919) % nodes.len();
        let gone = nodes.remove(at);
        let after = Ring::new(nodes.iter().cloned());
        let (balance, plan) = measure(&ring, &after, &scenario.rfs);
        steps.push(Step {
            what: format!("remove {}", gone.id),
            nodes: after.member_count(),
            ranges: after.members.tokens.len(),
            ideal_moved_fraction: None,
            balance,
            planning: plan,
            slowest_growth_planning: Duration::ZERO,
        });
        ring = after;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_sums_to_rf() {
        for allocation in [TokenAllocation::Random, TokenAllocation::Balanced] {
            let steps = run(&Scenario {
                nodes: 6,
                vnodes: 8,
                rfs: vec![1, 3],
                add: 1,
                remove: 1,
                allocation,
            });
            assert_eq!(steps.len(), 3);
            assert_eq!(steps[0].nodes, 6);
            assert_eq!(steps[1].nodes, 7);
            assert_eq!(steps[2].nodes, 6);
            let mut nodes = Vec::new();
            let scenario = Scenario {
                nodes: 0,
                vnodes: 8,
                rfs: vec![3],
                add: 0,
                remove: 0,
                allocation,
            };
            for k in 0..5 {
                admit(&mut nodes, node_id(k), &scenario);
            }
            let ring = Ring::new(nodes);
            for rf in [1, 2, 3] {
                let total: f64 = ownership(&ring, rf).iter().map(|(_, l)| l).sum();
                assert!((total - rf as f64).abs() < 1e-9, "rf {rf}: {total}");
            }
        }
    }
}
