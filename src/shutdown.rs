//! Process shutdown: SIGTERM or SIGINT cancels one token; the roles of the process stop in
//! order (gateway, then coordinator, then storage: `roles::run`), and each role owns its
//! background work through [`Tasks`], which a stop waits for.
//!
//! Invariant: every background task of a role is spawned through its [`Tasks`] and ends by
//! itself once [`Tasks::stop`] is cancelled (at its next step boundary), so a role that returns
//! from its stop has nothing of its own still running, except tasks still running when the wait's
//! bound passed, which are logged by count.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// The background work of one role: spawned here, told to stop by one token, waited for.
#[derive(Clone, Default)]
pub struct Tasks {
    stop: CancellationToken,
    tracker: TaskTracker,
    /// The tasks serving long-lived inbound streams (`mux::serve`).
    streams: TaskTracker,
    /// Mirrors the stop token for per-request paths ([`Tasks::stop_flag`]).
    stop_flag: Arc<OnceLock<Arc<AtomicBool>>>,
}

impl Tasks {
    /// Tasks that stop when `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            tracker: TaskTracker::new(),
            streams: TaskTracker::new(),
            stop_flag: Arc::default(),
        }
    }

    /// A flag set once the stop token is cancelled, read with one atomic load: polling the
    /// token takes a lock every caller shares, too much for a path run per request. Set by a
    /// task of this role started on first use (call it within the runtime), so it follows the
    /// token within a scheduling step.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop_flag
            .get_or_init(|| {
                let flag = Arc::new(AtomicBool::new(self.stop.is_cancelled()));
                let (set, stop) = (flag.clone(), self.stop.clone());
                self.tracker.spawn(async move {
                    stop.cancelled().await;
                    set.store(true, Ordering::Release);
                });
                flag
            })
            .clone()
    }

    /// Cancelled when the role stops: every task watches it.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `work` as a task of this role.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(work)
    }

    /// Runs blocking `work` on the blocking pool as a task of this role.
    pub fn spawn_blocking<F, T>(&self, work: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(work)
    }

    /// Runs blocking `work` as a task of this role on another runtime's blocking pool (the
    /// storage node's lowered background threads).
    pub fn spawn_blocking_on<F, T>(
        &self,
        work: F,
        runtime: &tokio::runtime::Handle,
    ) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking_on(work, runtime)
    }

    /// Runs the task that serves one long-lived inbound stream; see [`Tasks::streams_ended`].
    pub fn spawn_stream<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.streams.spawn(work)
    }

    /// Waits, once the stop token is cancelled, until every inbound stream ended (each drains
    /// and then waits for its peer to close its side), for at most `within`. The role's server
    /// closes its connections only after this.
    pub async fn streams_ended(&self, within: Duration) {
        self.stop.cancelled().await;
        self.streams.close();
        let _ = tokio::time::timeout(within, self.streams.wait()).await;
    }

    /// Cancels the stop token and waits up to `within` for every task (also those spawned
    /// meanwhile) to end. Returns how many still run (0: all ended).
    pub async fn stop_and_wait(&self, what: &str, within: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            let left = self.tracker.len();
            tracing::warn!(
                role = what,
                left,
                ?within,
                "background tasks still running after the stop bound; leaving them"
            );
            return left;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag follows the token once the watcher ran.
    #[tokio::test]
    async fn the_stop_flag_follows_the_token() {
        let tasks = Tasks::new(CancellationToken::new());
        let flag = tasks.stop_flag();
        tokio::task::yield_now().await;
        assert!(!flag.load(Ordering::Acquire));
        assert_eq!(tasks.stop_and_wait("test", Duration::from_secs(1)).await, 0);
        assert!(flag.load(Ordering::Acquire), "set before the watcher ended");
        assert!(
            tasks.stop_flag().load(Ordering::Acquire),
            "one flag per role"
        );
    }

    /// A task that watches the stop token ends within the wait; one that does not is counted.
    #[tokio::test(start_paused = true)]
    async fn stop_waits_for_tasks_that_watch_the_token() {
        let tasks = Tasks::new(CancellationToken::new());
        let stop = tasks.stop().clone();
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        tasks.spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_millis(100)).await; // finishing a step
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert_eq!(tasks.stop_and_wait("test", Duration::from_secs(1)).await, 0);
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));

        let stubborn = Tasks::new(CancellationToken::new());
        stubborn.spawn(tokio::time::sleep(Duration::from_secs(3600)));
        assert_eq!(
            stubborn.stop_and_wait("test", Duration::from_secs(1)).await,
            1
        );
    }
}
