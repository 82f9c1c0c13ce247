//! Quorums: how many acks a request needs, and the one driver that collects them.
//!
//! Policy ([`Consistency::required`]): out of `A` authoritative replicas, ONE needs 1, QUORUM
//! needs floor(A/2)+1, ALL needs A. Only authoritative replicas' successes count (SEMANTICS.md);
//! others (bootstrapping, pending owners) are still called and reported.
//!
//! Driver ([`run`]): the calls run concurrently inside the caller's task (no task, channel or
//! timer per call: one deadline for all), bounded by the request deadline. The driver returns
//! as soon as `required` authoritative successes arrived ([`Decision::Reached`]), or as soon as
//! they no longer can because too many authoritative calls failed ([`Decision::Unreachable`]),
//! or at the deadline ([`Decision::TimedOut`]). Calls still running then keep running:
//! [`Stragglers::finish`] drives them and collects their outcomes (the write path uses that to
//! write hints for replicas that missed the write), and dropping it hands them to a task of
//! their own that lets them finish unseen (never cancelled before the deadline).
//! Every outcome names its replica, so errors carry counts and each replica's error.

use std::future::Future;
use std::pin::Pin;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
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
    type Err = UnknownConsistency;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "one" => Ok(Self::One),
            "quorum" => Ok(Self::Quorum),
            "all" => Ok(Self::All),
            other => Err(UnknownConsistency(other.to_owned())),
        }
    }
}

/// A consistency level that is not `one`, `quorum` or `all`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown consistency {0:?}: expected one, quorum or all")]
pub struct UnknownConsistency(pub String);

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
pub struct QuorumRun<Id, T: Send + 'static, E: Send + 'static> {
    pub decision: Decision,
    pub required: usize,
    /// Authoritative successes received.
    pub acks: usize,
    /// Outcomes received so far, in arrival order.
    pub results: Vec<ReplicaResult<Id, T, E>>,
    /// Calls still running when the driver returned.
    pub stragglers: Stragglers<Id, T, E>,
}

impl<Id, T: Send + 'static, E: Send + 'static> QuorumRun<Id, T, E> {
    pub fn reached(&self) -> bool {
        self.decision == Decision::Reached
    }
}

/// A running call, tagged with its index in the replica list.
type Running<T, E> = Pin<Box<dyn Future<Output = (usize, Result<T, E>)> + Send>>;

/// Calls still running after the decision.
pub struct Stragglers<Id, T: Send + 'static, E: Send + 'static> {
    running: FuturesUnordered<Running<T, E>>,
    /// Whether each call is still running.
    waiting: Vec<bool>,
    replicas: Vec<(Id, bool)>,
    /// The request deadline: one timer for every call.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<Id, T: Send + 'static, E: Send + 'static> std::fmt::Debug for Stragglers<Id, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stragglers")
            .field("running", &self.running.len())
            .finish()
    }
}

impl<Id: Clone, T: Send + 'static, E: Send + 'static> Stragglers<Id, T, E> {
    /// How many calls are still running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    fn result(&mut self, index: usize, outcome: ReplicaOutcome<T, E>) -> ReplicaResult<Id, T, E> {
        self.waiting[index] = false;
        let (replica, authoritative) = self.replicas[index].clone();
        ReplicaResult {
            replica,
            authoritative,
            outcome,
        }
    }

    /// The next call to end, or `None` when none is left or the deadline passed.
    async fn next(&mut self) -> Option<ReplicaResult<Id, T, E>> {
        let ended = tokio::select! {
            biased;
            ended = self.running.next() => ended,
            () = &mut self.deadline => None,
        };
        let (index, result) = ended?;
        Some(self.result(index, result.into()))
    }

    /// Waits for every remaining call (each is bounded by the request deadline) and returns
    /// their outcomes; calls still running at the deadline are cancelled and reported as
    /// timed out.
    pub async fn finish(mut self) -> Vec<ReplicaResult<Id, T, E>> {
        let mut results = Vec::with_capacity(self.len());
        while let Some(result) = self.next().await {
            results.push(result);
        }
        self.time_out_the_rest(results)
    }

    /// Like [`Self::finish`], but once `after` has passed, the replicas whose calls are still
    /// running are passed to `on_slow` (once; nothing is called when every call ended before).
    /// Returns the outcomes and the replicas passed to `on_slow`.
    pub async fn finish_noting_slow(
        mut self,
        after: std::time::Duration,
        on_slow: impl FnOnce(&[Id]),
    ) -> (Vec<ReplicaResult<Id, T, E>>, Vec<Id>) {
        let mut results = Vec::with_capacity(self.len());
        let slow_at = tokio::time::sleep(after);
        tokio::pin!(slow_at);
        let mut on_slow = Some(on_slow);
        let mut slow = Vec::new();
        loop {
            tokio::select! {
                biased;
                ended = self.next() => match ended {
                    Some(result) => results.push(result),
                    None => break,
                },
                () = &mut slow_at, if on_slow.is_some() => {
                    slow = self.still_waiting();
                    if let Some(note) = on_slow.take() {
                        note(&slow);
                    }
                }
            }
        }
        (self.time_out_the_rest(results), slow)
    }

    /// The replicas whose calls are still running.
    fn still_waiting(&self) -> Vec<Id> {
        self.waiting
            .iter()
            .zip(&self.replicas)
            .filter(|(waiting, _)| **waiting)
            .map(|(_, (id, _))| id.clone())
            .collect()
    }

    /// Cancels the calls still running and adds each as timed out to `results`.
    fn time_out_the_rest(
        mut self,
        mut results: Vec<ReplicaResult<Id, T, E>>,
    ) -> Vec<ReplicaResult<Id, T, E>> {
        self.running.clear();
        for index in 0..self.waiting.len() {
            if self.waiting[index] {
                results.push(self.result(index, ReplicaOutcome::TimedOut));
            }
        }
        results
    }
}

impl<Id, T: Send + 'static, E: Send + 'static> Drop for Stragglers<Id, T, E> {
    /// Calls nobody waits for any more still run to their end (or the deadline).
    fn drop(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let mut running = std::mem::take(&mut self.running);
        let deadline = self.deadline.deadline();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let all = async { while running.next().await.is_some() {} };
            let _ = tokio::time::timeout_at(deadline, all).await;
        });
    }
}

impl<T, E> From<Result<T, E>> for ReplicaOutcome<T, E> {
    fn from(result: Result<T, E>) -> Self {
        match result {
            Ok(value) => ReplicaOutcome::Ok(value),
            Err(err) => ReplicaOutcome::Err(err),
        }
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
    let running = FuturesUnordered::new();
    let mut replicas = Vec::with_capacity(calls.len());
    for (index, call) in calls.into_iter().enumerate() {
        replicas.push((call.replica, call.authoritative));
        let fut = call.call;
        running.push(Box::pin(async move { (index, fut.await) }) as Running<T, E>);
    }
    let mut authoritative_left = replicas.iter().filter(|(_, a)| *a).count();
    let mut stragglers = Stragglers {
        running,
        waiting: vec![true; replicas.len()],
        replicas,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
    };
    let mut acks = 0;
    let mut results = Vec::new();
    let decision = loop {
        if required > 0 && acks >= required {
            break Decision::Reached;
        }
        if required == 0 || acks + authoritative_left < required {
            break Decision::Unreachable;
        }
        if stragglers.is_empty() {
            break Decision::Unreachable;
        }
        let Some(result) = stragglers.next().await else {
            break Decision::TimedOut;
        };
        if result.authoritative {
            authoritative_left -= 1;
            acks += usize::from(result.outcome.is_ok());
        }
        results.push(result);
    };
    QuorumRun {
        decision,
        required,
        acks,
        results,
        stragglers,
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
    async fn stragglers_still_running_after_a_while_are_noted_once_and_still_finish() {
        let calls = vec![
            call("a", 10, Ok(1)),
            call("b", 50, Ok(2)),
            call("c", 400, Ok(3)),
            call("d", 60_000, Ok(4)),
        ];
        let first = run(calls, 1, deadline(2_000)).await;
        let start = Instant::now();
        let mut noted = Vec::new();
        let (rest, slow) = first
            .stragglers
            .finish_noting_slow(Duration::from_millis(250), |slow| {
                noted.push((start.elapsed(), slow.to_vec()));
            })
            .await;
        assert_eq!(
            noted,
            vec![(Duration::from_millis(250), vec!["c", "d"])],
            "b ended before 250 ms; c and d were still out then"
        );
        assert_eq!(slow, vec!["c", "d"]);
        let outcomes: Vec<_> = rest
            .iter()
            .map(|r| (r.replica, r.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("b", ReplicaOutcome::Ok(2)),
                ("c", ReplicaOutcome::Ok(3)),
                ("d", ReplicaOutcome::TimedOut)
            ]
        );

        // Every call ended in time: nothing is noted.
        let second = run(
            vec![call("a", 10, Ok(1)), call("b", 50, Ok(2))],
            1,
            deadline(2_000),
        )
        .await;
        let mut called = false;
        let (rest, slow) = second
            .stragglers
            .finish_noting_slow(Duration::from_millis(250), |_| called = true)
            .await;
        assert!(!called && slow.is_empty());
        assert_eq!(rest.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_stragglers_still_run_to_their_end() {
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        let straggler = ReplicaCall {
            replica: "c",
            authoritative: true,
            call: Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = done.send("c applied");
                Ok::<u32, &'static str>(3)
            }) as Call,
        };
        let calls = vec![call("a", 10, Ok(1)), call("b", 20, Ok(2)), straggler];
        let run = run(calls, 2, deadline(10_000)).await;
        assert_eq!(run.decision, Decision::Reached);
        drop(run);
        assert_eq!(finished.recv().await, Some("c applied"));
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
