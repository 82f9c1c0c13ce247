//! The checker: finds anomalies in a history and the final state.
//!
//! - `lost-write`: an acknowledged write is neither in the final state nor superseded. The
//!   final value of a key was written by some write X; any acknowledged write W that began
//!   after X was settled (acknowledged; never, when X's outcome is unknown) should have
//!   replaced it, when their replica sets must overlap (W_x + W_w > RF: a write at ONE and a
//!   later one at QUORUM may reach disjoint replicas, and then last-write-wins by clock decides,
//!   as in Cassandra). A key found absent needs a delete that was not settled before each
//!   acknowledged put began. Single-writer keys (QUORUM and ALL only): the final value is at
//!   least the last acknowledged one, unless its write has an unknown outcome and the last
//!   acknowledged one began within 10 s of that write's client giving up (as for `rollback`).
//! - `rollback`: a QUORUM/ALL read of a single-writer key returns an older value than a
//!   QUORUM/ALL write acknowledged before the read began (R + W > RF). A value whose write has
//!   an unknown outcome is no rollback: that write may take effect after later ones...
//! - `late-write`: ...unless it did so more than 10 s after its client gave up (a request
//!   kept alive in a coordinator long after its caller timed out).
//! - `foreign-read`: a read returns a value written to another tenant or key.
//! - `phantom-read`: a read returns a value no write of that key carried.
//! - `double-apply`: an acknowledged idempotent write sent again with the same key (a client
//!   that lost the answer) is applied again instead of answered as a duplicate with the first
//!   answer's version, unless an answer said `idempotency_skipped` (the store was unreachable
//!   and the write went on without it, as SEMANTICS.md wants). (A first try that failed after
//!   reaching some replicas and a retry that
//!   writes again is allowed: SEMANTICS.md, "the writes that did land stay (the client may retry
//!   with its idempotency key)"; both carry the same value.)
//! - `conflict-applied`: the final value of a key was written by a conditional write that was
//!   answered VERSION_CONFLICT (a refused condition writes nothing; a write beaten by a
//!   concurrent version may have landed on some replicas, but the version that beat it is
//!   newer and replaces it).
//! - `divergent-replicas`: after every fault is healed, the convergence window passed and one
//!   anti-entropy repair of the whole cluster completed, the natural replicas of a key hold
//!   different versions (or one holds nothing), before any read touched the key.

use std::collections::HashMap;

use serde::Serialize;

use crate::history::{FinalKey, Kind, Op, Outcome};
use crate::workload::{SW_SPAN, is_single_writer_key};

#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub kind: &'static str,
    pub tenant: String,
    pub key: String,
    pub what: String,
    /// Ids of the operations involved.
    pub ops: Vec<u64>,
    /// When (ms since the run began) it showed, for the timeline.
    pub at_ms: u64,
}

/// Replicas a write at `level` reached when acknowledged (RF 3).
fn acks(level: &str) -> u32 {
    match level {
        "one" => 1,
        "quorum" => 2,
        _ => 3,
    }
}

/// Whether two writes' replica sets must overlap (RF 3).
fn overlap(a: &Op, b: &Op) -> bool {
    acks(a.consistency) + acks(b.consistency) > 3
}

fn describe(op: &Op) -> String {
    format!(
        "#{} c{} {:?} {}={:?} {} [{}..{} ms] {:?}",
        op.id,
        op.client,
        op.kind,
        op.key,
        op.value,
        op.consistency,
        op.invoke_ms,
        op.complete_ms,
        op.outcome
    )
}

/// Checks the history and the final state. `shared_idempotency`: the coordinators share one
/// idempotency store (PostgreSQL + Redis). With `--sqlite` each coordinator keeps its own in
/// memory, so a resend that reaches the other coordinator is rightly written again, and
/// `double-apply` is not checked.
pub fn check(
    ops: &[Op],
    finals: &[FinalKey],
    end_ms: u64,
    shared_idempotency: bool,
) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    let mut by_key: HashMap<(&str, &str), Vec<&Op>> = HashMap::new();
    for op in ops {
        by_key
            .entry((op.tenant.as_str(), op.key.as_str()))
            .or_default()
            .push(op);
    }
    let writer_of: HashMap<u64, &Op> = ops
        .iter()
        .filter(|o| o.kind == Kind::Put)
        .filter_map(|o| o.value.map(|v| (v, o)))
        .collect();

    for op in ops.iter().filter(|o| o.kind == Kind::Get) {
        let Some(read) = op.read_value() else {
            continue;
        };
        let anomaly = |kind, what: String, ops: Vec<u64>| Anomaly {
            kind,
            tenant: op.tenant.clone(),
            key: op.key.clone(),
            what,
            ops,
            at_ms: op.complete_ms,
        };
        if read.tenant != op.tenant || read.key != op.key {
            anomalies.push(anomaly(
                "foreign-read",
                format!(
                    "read {}/{} returned a value of {}/{}: {}",
                    op.tenant,
                    op.key,
                    read.tenant,
                    read.key,
                    describe(op)
                ),
                vec![op.id],
            ));
            continue;
        }
        match writer_of.get(&read.id) {
            Some(w) if w.tenant == op.tenant && w.key == op.key => {}
            _ => anomalies.push(anomaly(
                "phantom-read",
                format!("value {} was never written: {}", read.id, describe(op)),
                vec![op.id],
            )),
        }
    }

    rollbacks(&by_key, &writer_of, &mut anomalies);
    if shared_idempotency {
        double_applies(ops, &mut anomalies);
    }
    for f in finals {
        let history = by_key
            .get(&(f.tenant.as_str(), f.key.as_str()))
            .cloned()
            .unwrap_or_default();
        lost_writes(f, &history, &writer_of, end_ms, &mut anomalies);
        conflicts_applied(f, &writer_of, end_ms, &mut anomalies);
        divergence(f, end_ms, &mut anomalies);
    }
    anomalies
}

/// How long after its client gave up a write with an unknown outcome may still take effect:
/// the gateway's timeout (5 s) plus the coordinator's wait for an idempotency lock and its
/// replication rounds, with margin. Later than that is a `late-write`.
const LATE_MS: u64 = 10_000;

fn rollbacks(
    by_key: &HashMap<(&str, &str), Vec<&Op>>,
    writer_of: &HashMap<u64, &Op>,
    anomalies: &mut Vec<Anomaly>,
) {
    for ((tenant, key), history) in by_key {
        if !is_single_writer_key(key) {
            continue;
        }
        // Acknowledged strong writes, by completion time.
        let mut writes: Vec<&&Op> = history
            .iter()
            .filter(|o| o.kind == Kind::Put && o.acked_write() && o.is_strong())
            .collect();
        writes.sort_by_key(|o| o.complete_ms);
        // The newest value among the writes completed up to each position (reads look it up
        // by binary search: a soak holds millions of operations).
        let mut best: Vec<&Op> = Vec::with_capacity(writes.len());
        for w in &writes {
            let newer = best.last().is_none_or(|b| w.value > b.value);
            best.push(if newer { w } else { best[best.len() - 1] });
        }
        for read in history
            .iter()
            .filter(|o| o.kind == Kind::Get && o.acked() && o.is_strong())
        {
            let seen_id = read.read_value().map(|v| v.id);
            let seen = seen_id.map_or(0, |id| id % SW_SPAN);
            let done = writes.partition_point(|w| w.complete_ms < read.invoke_ms);
            let Some(w) = done.checked_sub(1).map(|i| best[i]) else {
                continue;
            };
            let acked = w.value.unwrap_or(0) % SW_SPAN;
            if seen >= acked {
                continue;
            }
            // A write whose outcome is unknown may take effect after later ones (it is
            // concurrent with everything after it began), but not long after its client gave up.
            let unknown = seen_id
                .and_then(|id| writer_of.get(&id))
                .filter(|x| !x.acked());
            let kind = match unknown {
                Some(x) if w.invoke_ms <= x.complete_ms + LATE_MS => continue,
                Some(_) => "late-write",
                None => "rollback",
            };
            let mut ops = vec![w.id, read.id];
            let mut what = format!(
                "read saw n={seen} after n={acked} was acknowledged: {} / {}",
                describe(w),
                describe(read)
            );
            if let Some(x) = unknown {
                ops.push(x.id);
                what.push_str(&format!(" / the write it saw: {}", describe(x)));
            }
            anomalies.push(Anomaly {
                kind,
                tenant: (*tenant).to_owned(),
                key: (*key).to_owned(),
                what,
                ops,
                at_ms: read.complete_ms,
            });
        }
    }
}

fn double_applies(ops: &[Op], anomalies: &mut Vec<Anomaly>) {
    let by_id: HashMap<u64, &Op> = ops.iter().map(|o| (o.id, o)).collect();
    for resend in ops.iter().filter(|o| o.acked()) {
        let Some(first) = resend.resend_of.and_then(|id| by_id.get(&id)) else {
            continue;
        };
        let duplicate = matches!(
            resend.outcome,
            Outcome::Ok {
                duplicate: true,
                ..
            }
        );
        // Served without the idempotency store (it was unreachable): the answer said that a
        // repeat would be written again (SEMANTICS.md: writes go on without the store).
        let warned = first.skipped_idempotency() || resend.skipped_idempotency();
        if !warned && (!duplicate || resend.clock() != first.clock()) {
            anomalies.push(Anomaly {
                kind: "double-apply",
                tenant: first.tenant.clone(),
                key: first.key.clone(),
                what: format!(
                    "an acknowledged idempotent write sent again was not answered as its duplicate: {} / {}",
                    describe(first),
                    describe(resend)
                ),
                ops: vec![first.id, resend.id],
                at_ms: resend.complete_ms,
            });
        }
    }
}

fn lost_writes(
    f: &FinalKey,
    history: &[&Op],
    writer_of: &HashMap<u64, &Op>,
    end_ms: u64,
    anomalies: &mut Vec<Anomaly>,
) {
    let acked_writes: Vec<&&Op> = history.iter().filter(|o| o.acked_write()).collect();
    let lost = |w: &Op, why: String| Anomaly {
        kind: "lost-write",
        tenant: f.tenant.clone(),
        key: f.key.clone(),
        what: format!("{why}: {}", describe(w)),
        ops: vec![w.id],
        at_ms: end_ms,
    };
    if is_single_writer_key(&f.key) {
        let last = acked_writes.iter().filter_map(|w| w.value).max();
        let final_n = f.value.map_or(0, |v| v % SW_SPAN);
        if let Some(last) = last.filter(|l| final_n < l % SW_SPAN) {
            if let Some(w) = writer_of.get(&last) {
                // As for reads: a final value whose write has an unknown outcome may have taken
                // effect after later writes, but not long after its client gave up.
                let unknown = f
                    .value
                    .and_then(|v| writer_of.get(&v))
                    .filter(|x| !x.acked());
                match unknown {
                    Some(x) if w.invoke_ms <= x.complete_ms + LATE_MS => {}
                    Some(x) => anomalies.push(Anomaly {
                        kind: "late-write",
                        ops: vec![w.id, x.id],
                        ..lost(
                            w,
                            format!(
                                "final n={final_n}, written by a write whose client gave up \
                                 more than {LATE_MS} ms before this began ({})",
                                describe(x)
                            ),
                        )
                    }),
                    None => anomalies.push(lost(w, format!("final n={final_n}"))),
                }
            }
        }
        return;
    }
    match f.value {
        Some(id) => {
            let Some(x) = writer_of.get(&id) else {
                return; // a phantom: reported by the read checks
            };
            let settled = x.settled_by();
            let later = acked_writes
                .iter()
                .filter(|w| w.id != x.id && w.invoke_ms > settled && overlap(w, x));
            for w in later {
                anomalies.push(lost(
                    w,
                    format!(
                        "final value {id} was written before this began ({})",
                        describe(x)
                    ),
                ));
            }
        }
        None => {
            let deletes: Vec<&&Op> = history
                .iter()
                .filter(|o| o.kind == Kind::Delete && o.may_have_applied())
                .collect();
            for w in acked_writes.iter().filter(|w| w.kind == Kind::Put) {
                let covered = deletes
                    .iter()
                    .any(|d| d.settled_by() > w.invoke_ms || !overlap(d, w));
                if !covered {
                    anomalies.push(lost(
                        w,
                        "key is absent and no delete came after this write".to_owned(),
                    ));
                }
            }
        }
    }
}

fn conflicts_applied(
    f: &FinalKey,
    writer_of: &HashMap<u64, &Op>,
    end_ms: u64,
    anomalies: &mut Vec<Anomaly>,
) {
    let Some(w) = f.value.and_then(|id| writer_of.get(&id)) else {
        return;
    };
    if w.conflicted() {
        anomalies.push(Anomaly {
            kind: "conflict-applied",
            tenant: f.tenant.clone(),
            key: f.key.clone(),
            what: format!(
                "the final value was written by a write answered VERSION_CONFLICT: {}",
                describe(w)
            ),
            ops: vec![w.id],
            at_ms: end_ms,
        });
    }
}

/// What conditional writers got (a measurement of the design, not an anomaly: see
/// docs/coordinator.md, "Conditional writes").
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConditionalStats {
    pub attempted: usize,
    pub succeeded: usize,
    pub conflicts: usize,
    pub unknown: usize,
    /// Successes beyond the first among writes with the same condition on the same key: two
    /// writers that both won from one version (one of the two updates is overwritten).
    pub concurrent_successes: usize,
}

pub fn conditional_stats(ops: &[Op]) -> ConditionalStats {
    let mut stats = ConditionalStats::default();
    let mut winners: HashMap<(&str, &str, String), usize> = HashMap::new();
    for op in ops.iter().filter(|o| o.condition.is_some()) {
        stats.attempted += 1;
        match &op.outcome {
            Outcome::Ok { .. } => {
                stats.succeeded += 1;
                let condition = op
                    .condition
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                *winners
                    .entry((op.tenant.as_str(), op.key.as_str(), condition))
                    .or_default() += 1;
            }
            Outcome::Fail { .. } if op.conflicted() => stats.conflicts += 1,
            Outcome::Fail { .. } => {}
            Outcome::Unknown { .. } => stats.unknown += 1,
        }
    }
    // `if_absent` is the same condition again after every delete: only `if_match` counts.
    stats.concurrent_successes = winners
        .iter()
        .filter(|((_, _, c), _)| c.contains("if_match"))
        .map(|(_, n)| n - 1)
        .sum();
    stats
}

fn divergence(f: &FinalKey, end_ms: u64, anomalies: &mut Vec<Anomaly>) {
    let versions: Vec<&Option<String>> = f.replicas.iter().map(|(_, _, v)| v).collect();
    let agree = versions.windows(2).all(|w| w[0] == w[1]);
    if !agree {
        anomalies.push(Anomaly {
            kind: "divergent-replicas",
            tenant: f.tenant.clone(),
            key: f.key.clone(),
            what: format!("replicas hold {:?}", f.replicas),
            ops: Vec::new(),
            at_ms: end_ms,
        });
    }
}
