//! `pairdb ring simulate`: prints what [`crate::ring::simulate`] measures, as a table or JSON.

use crate::cli::SimulateArgs;
use crate::ring::allocation::TokenAllocation;
use crate::ring::simulate::{Scenario, Step, run};

/// Largest replication factor a tenant may have (as the API allows).
const MAX_RF: usize = 10;
/// Largest ring simulated: growing it one node at a time is quadratic.
const MAX_NODES: usize = 10_000;

pub fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let allocation = TokenAllocation::parse(&args.tokens)
        .ok_or_else(|| anyhow::anyhow!("--tokens must be balanced or random"))?;
    if args.rf.iter().any(|&r| !(1..=MAX_RF).contains(&r)) {
        anyhow::bail!("--rf values must be 1..={MAX_RF}");
    }
    if args.vnodes > crate::ring::MAX_VIRTUAL_NODES {
        anyhow::bail!("--vnodes must be 0..={}", crate::ring::MAX_VIRTUAL_NODES);
    }
    if args.nodes.saturating_add(args.add) > MAX_NODES {
        anyhow::bail!("--nodes plus --add must be at most {MAX_NODES}");
    }
    let scenario = Scenario {
        nodes: args.nodes,
        vnodes: allocation.virtual_nodes(args.vnodes),
        rfs: args.rf.clone(),
        add: args.add,
        remove: args.remove,
        allocation,
    };
    let steps = run(&scenario);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&steps)?);
        return Ok(());
    }
    println!(
        "{} tokens, {} per node, RF {:?}",
        args.tokens, scenario.vnodes, scenario.rfs
    );
    println!(
        "{:<16} {:>6} {:>8} {:>4} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "step", "nodes", "ranges", "rf", "max/mean", "min/mean", "moved", "ideal", "plan ms"
    );
    for step in &steps {
        print_step(step);
    }
    Ok(())
}

fn print_step(step: &Step) {
    let plan = step.planning.max(step.slowest_growth_planning);
    for b in &step.balance {
        let ideal = step
            .ideal_moved_fraction
            .map_or("-".to_owned(), |f| format!("{f:.4}"));
        println!(
            "{:<16} {:>6} {:>8} {:>4} {:>9.4} {:>9.4} {:>8.4} {:>8} {:>10.1}",
            step.what,
            step.nodes,
            step.ranges,
            b.rf,
            b.max_over_mean,
            b.min_over_mean,
            b.moved_fraction,
            ideal,
            plan.as_secs_f64() * 1000.0
        );
    }
}
