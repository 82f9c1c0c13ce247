//! Quorums: how many acks a request needs, and the one driver that collects them.
//!
//! Policy ([`Consistency::required`]): out of `A` authoritative replicas, ONE needs 1, QUORUM
//! needs floor(A/2)+1, ALL needs A. Only authoritative replicas' successes count (SEMANTICS.md);
//! others (bootstrapping, pending owners) are still called and reported.
//!
//! Driver ([`run`]): every call runs as its own task, bounded by the request deadline. The
//! driver returns as soon as `required` authoritative successes arrived ([`Decision::Reached`]),
//! or as soon as they no longer can because too many authoritative calls failed
//! ([`Decision::Unreachable`]), or at the deadline ([`Decision::TimedOut`]). Calls still running
//! then keep running: [`Stragglers::finish`] collects their outcomes (the write path uses that
//! to write hints for replicas that missed the write), and dropping it lets them finish unseen.
//! Every outcome names its replica, so errors carry counts and each replica's error.

use std::future::Future;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Consistency level of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    One,
    #[default]
    Quorum,
    All,
}

impl Consistency {
    /// Acks required out of `authoritative` replicas: ONE = 1, QUORUM = floor(A/2)+1, ALL = A.
    pub fn required(self, authoritative: usize) -> usize {
        match self {
            Consistency::One => authoritative.min(1),
            Consistency::Quorum => authoritative / 2 + usize::from(authoritative > 0),
            Consistency::All => authoritative,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::One => "one",
            Consistency::Quorum => "quorum",
            Consistency::All => "all",
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "one" => Ok(Self::One),
            "quorum" => Ok(Self::Quorum),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown consistency {other:?}: expected one, quorum or all"
            )),
        }
    }
}

/// One replica call handed to [`run`].
pub struct ReplicaCall<Id, F> {
    pub replica: Id,
    /// Whether a success from this replica counts toward the required acks.
    pub authoritative: bool,
    pub call: F,
}

/// How one replica call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaOutcome<T, E> {
    Ok(T),
    Err(E),
    /// No answer before the request deadline.
    TimedOut,
}

impl<T, E> ReplicaOutcome<T, E> {
    pub fn is_ok(&self) -> bool {
        matches!(self, ReplicaOutcome::Ok(_))
    }
}

/// The outcome of one replica, with who it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaResult<Id, T, E> {
    pub replica: Id,
    pub authoritative: bool,
    pub outcome: ReplicaOutcome<T, E>,
}

/// Why the driver returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `required` authoritative replicas succeeded.
    Reached,
    /// Enough authoritative replicas failed that `required` can no longer be reached (also
    /// returned at once when `required` is 0 or exceeds the authoritative replicas).
    Unreachable,
    /// The deadline passed first.
    TimedOut,
}

/// What the driver saw by the time it decided.
#[derive(Debug)]
pub struct QuorumRun<Id, T, E> {
    pub decision: Decision,
    pub required: usize,
    /// Authoritative successes received.
    pub acks: usize,
    /// Outcomes received so far, in arrival order.
    pub results: Vec<ReplicaResult<Id, T, E>>,
    /// Calls still running when the driver returned.
    pub stragglers: Stragglers<Id, T, E>,
}

impl<Id, T, E> QuorumRun<Id, T, E> {
    pub fn reached(&self) -> bool {
        self.decision == Decision::Reached
    }
}

/// Calls still running after the decision.
#[derive(Debug)]
pub struct Stragglers<Id, T, E> {
    waiting: Vec<bool>,
    receiver: mpsc::UnboundedReceiver<(usize, ReplicaOutcome<T, E>)>,
    replicas: Vec<(Id, bool)>,
}

impl<Id: Clone, T, E> Stragglers<Id, T, E> {
    /// How many calls are still running.
    pub fn len(&self) -> usize {
        self.waiting.iter().filter(|w| **w).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for every remaining call (each is bounded by the request deadline) and returns
    /// their outcomes.
    pub async fn finish(mut self) -> Vec<ReplicaResult<Id, T, E>> {
        let mut results = Vec::with_capacity(self.len());
        while !self.is_empty() {
            let Some((index, outcome)) = self.receiver.recv().await else {
                break;
            };
            if !std::mem::replace(&mut self.waiting[index], false) {
                continue;
            }
            let (replica, authoritative) = self.replicas[index].clone();
            results.push(ReplicaResult {
                replica,
                authoritative,
                outcome,
            });
        }
        results
    }
}

/// Runs every call concurrently and decides as described in the module docs.
pub async fn run<Id, T, E, F>(
    calls: Vec<ReplicaCall<Id, F>>,
    required: usize,
    deadline: Instant,
) -> QuorumRun<Id, T, E>
where
    Id: Clone + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
    F: Future<Output = Result<T, E>> + Send + 'static,
{
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let mut replicas = Vec::with_capacity(calls.len());
    for (index, call) in calls.into_iter().enumerate() {
        replicas.push((call.replica, call.authoritative));
        let sender = sender.clone();
        let fut = call.call;
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout_at(deadline, fut).await {
                Ok(Ok(value)) => ReplicaOutcome::Ok(value),
                Ok(Err(err)) => ReplicaOutcome::Err(err),
                Err(_) => ReplicaOutcome::TimedOut,
            };
            // The receiver is gone only if nobody wants the outcome any more.
            let _ = sender.send((index, outcome));
        });
    }
    drop(sender);

    let mut waiting: Vec<bool> = vec![true; replicas.len()];
    let mut authoritative_left = replicas.iter().filter(|(_, a)| *a).count();
    let mut acks = 0;
    let mut results = Vec::new();
    let decision = loop {
        if required > 0 && acks >= required {
            break Decision::Reached;
        }
        if required == 0 || acks + authoritative_left < required {
            break Decision::Unreachable;
        }
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Err(_) => break Decision::TimedOut,
            Ok(None) => break Decision::Unreachable,
            Ok(Some((index, outcome))) => {
                waiting[index] = false;
                let (replica, authoritative) = replicas[index].clone();
                if authoritative {
                    authoritative_left -= 1;
                    acks += usize::from(outcome.is_ok());
                }
                results.push(ReplicaResult {
                    replica,
                    authoritative,
                    outcome,
                });
            }
        }
    };
    QuorumRun {
        decision,
        required,
        acks,
        results,
        stragglers: Stragglers {
            waiting,
            receiver,
            replicas,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn quorum_counts() {
        assert_eq!(Consistency::Quorum.required(0), 0);
        assert_eq!(Consistency::Quorum.required(1), 1);
        assert_eq!(Consistency::Quorum.required(2), 2);
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(5), 3);
        assert_eq!("quorum".parse::<Consistency>(), Ok(Consistency::Quorum));
        assert!("QUORUM".parse::<Consistency>().is_err());
    }

    type Call = std::pin::Pin<Box<dyn Future<Output = Result<u32, &'static str>> + Send>>;

    fn call(
        id: &'static str,
        after_ms: u64,
        result: Result<u32, &'static str>,
    ) -> ReplicaCall<&'static str, Call> {
        ReplicaCall {
            replica: id,
            authoritative: true,
            call: Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                result
            }),
        }
    }

    fn deadline(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test(start_paused = true)]
    async fn returns_as_soon_as_quorum_acked() {
        let start = Instant::now();
        let calls = vec![
            call("a", 10, Ok(1)),
            call("b", 20, Ok(2)),
            call("c", 5_000, Ok(3)),
        ];
        let run = run(calls, 2, deadline(10_000)).await;
        assert_eq!(run.decision, Decision::Reached);
        assert_eq!(run.acks, 2);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(run.stragglers.len(), 1);
        let rest = run.stragglers.finish().await;
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].replica, "c");
        assert_eq!(rest[0].outcome, ReplicaOutcome::Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn fails_early_once_quorum_is_impossible() {
        let start = Instant::now();
        let calls = vec![
            call("a", 10, Err("disk full")),
            call("b", 30, Err("down")),
            call("c", 5_000, Ok(3)),
        ];
        let run = run(calls, 2, deadline(10_000)).await;
        assert_eq!(run.decision, Decision::Unreachable);
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        assert_eq!(run.acks, 0);
        let errors: Vec<_> = run
            .results
            .iter()
            .map(|r| (r.replica, r.outcome.clone()))
            .collect();
        assert_eq!(
            errors,
            vec![
                ("a", ReplicaOutcome::Err("disk full")),
                ("b", ReplicaOutcome::Err("down"))
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_at_the_deadline_and_stragglers_time_out_too() {
        let start = Instant::now();
        let calls = vec![
            call("a", 10, Ok(1)),
            call("b", 60_000, Ok(2)),
            call("c", 60_000, Ok(3)),
        ];
        let run = run(calls, 3, deadline(1_000)).await;
        assert_eq!(run.decision, Decision::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_millis(1_000));
        assert_eq!(run.acks, 1);
        let rest = run.stragglers.finish().await;
        assert_eq!(rest.len(), 2);
        assert!(rest.iter().all(|r| r.outcome == ReplicaOutcome::TimedOut));
        assert_eq!(start.elapsed(), Duration::from_millis(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn non_authoritative_successes_do_not_count() {
        let mut pending_owner = call("boot", 1, Ok(9));
        pending_owner.authoritative = false;
        let calls = vec![pending_owner, call("a", 10, Ok(1)), call("b", 50, Ok(2))];
        let start = Instant::now();
        let run = run(calls, 2, deadline(1_000)).await;
        assert_eq!(run.decision, Decision::Reached);
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(run.results.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn impossible_requirements_fail_at_once() {
        let run = run(vec![call("a", 10, Ok(1))], 2, deadline(1_000)).await;
        assert_eq!(run.decision, Decision::Unreachable);
        assert!(run.results.is_empty());
        let run = super::run(Vec::<ReplicaCall<&str, Call>>::new(), 0, deadline(1_000)).await;
        assert_eq!(run.decision, Decision::Unreachable);
    }
}
