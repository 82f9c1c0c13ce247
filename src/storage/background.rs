//! The storage node's background pool: blocking threads at a lower CPU priority
//! (`background_nice`, [`crate::priority`]) for work no client waits on: range streams'
//! scans, the records a stream, a repair or a hint replay writes, and anti-entropy listings.
//!
//! Invariants:
//! - Every thread of the pool is lowered when it starts and runs only background work for its
//!   whole life, so no request ever runs on a lowered thread (a shared pool's thread, once
//!   lowered, could not be raised back).
//! - The pool only changes where work runs, never what it does: what is acknowledged still
//!   waits for its fsync, and a write's apply rule is the engine's.
//! - Dropping the pool does not wait for running work (it is tracked by the role's
//!   [`crate::shutdown::Tasks`] through whoever awaits it).

use tokio::runtime::{Builder, Handle, Runtime};

use super::errors::StorageError;

/// The most threads the pool starts at once (streams' scans hold one each while they run).
const MAX_THREADS: usize = 64;

/// Blocking threads at `background_nice`.
pub struct BackgroundPool {
    /// `Some` until dropped (a runtime must be shut down without blocking inside another).
    runtime: Option<Runtime>,
    handle: Handle,
}

impl BackgroundPool {
    /// A pool whose threads run at `nice` (0: the process's own priority).
    pub fn new(nice: u8) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(MAX_THREADS)
            .thread_name("pairdb-background")
            .on_thread_start(move || crate::priority::lower_current_thread(nice))
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs blocking `work` on a background thread and waits for it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StorageError> {
        self.handle
            .spawn_blocking(work)
            .await
            .map_err(|e| StorageError::Internal(format!("background task failed: {e}")))
    }
}

impl BackgroundPool {
    /// Starts blocking `work` on a background thread as a task of `tasks` (a role's stop waits
    /// for it like for any of its tasks).
    pub fn spawn<T: Send + 'static>(
        &self,
        tasks: &crate::shutdown::Tasks,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        tasks.spawn_blocking_on(work, &self.handle)
    }
}

impl Drop for BackgroundPool {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_lowered_and_requests_do_not() {
        let before = crate::priority::current_thread_nice().unwrap();
        let pool = BackgroundPool::new(11).unwrap();
        let nice = pool
            .run(|| crate::priority::current_thread_nice().unwrap())
            .await
            .unwrap();
        assert_eq!(nice, 11.max(before));
        let request_thread =
            tokio::task::spawn_blocking(|| crate::priority::current_thread_nice().unwrap())
                .await
                .unwrap();
        assert_eq!(
            request_thread, before,
            "the shared blocking pool is untouched"
        );
    }

    #[tokio::test]
    async fn a_panic_in_background_work_is_an_internal_error() {
        let pool = BackgroundPool::new(0).unwrap();
        let result = pool.run(|| -> u32 { panic!("boom") }).await;
        assert!(matches!(result, Err(StorageError::Internal(_))));
    }
}
