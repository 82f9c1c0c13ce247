//! CPU priority of background threads: compaction, range streams, anti-entropy listings and
//! the writes they cause run below the requests a client waits for.
//!
//! Linux keeps a nice value per thread (not per process, despite POSIX), and the scheduler
//! shares a busy CPU among runnable threads by weight: a thread at nice 10 weighs about a
//! ninth of one at nice 0. Background work at nice 10 still gets every idle cycle and about
//! 10% of a core that requests want, so it slows down under load instead of stopping. This is
//! what RocksDB's low-priority pool and Cassandra's compaction threads do.
//!
//! Invariant: a thread is only ever lowered, never raised back (raising needs privileges a
//! storage node does not have), so only threads that run background work for their whole
//! life are lowered: the engine's compaction thread and the storage node's background pool
//! ([`crate::storage::background`]). A thread from a shared pool is never lowered.

/// The nice value background threads get by default (`background_nice`).
pub const DEFAULT_BACKGROUND_NICE: u8 = 10;

/// The highest nice value Linux has (the lowest priority).
pub const MAX_NICE: u8 = 19;

/// Lowers the calling thread's CPU priority to `nice` (0..=19; 0 leaves it as it is). A thread
/// already lower stays where it is. Failure is logged, not returned: background work runs
/// correctly at any priority, only with more effect on requests.
pub fn lower_current_thread(nice: u8) {
    if nice == 0 {
        return;
    }
    let nice = i32::from(nice.min(MAX_NICE));
    let tid = rustix::thread::gettid();
    let result = rustix::process::getpriority_process(Some(tid)).and_then(|current| {
        if current < nice {
            rustix::process::setpriority_process(Some(tid), nice)
        } else {
            Ok(())
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, nice, "cannot lower a background thread's CPU priority");
    }
}

/// The calling thread's nice value (for logs and tests).
pub fn current_thread_nice() -> std::io::Result<i32> {
    Ok(rustix::process::getpriority_process(Some(
        rustix::thread::gettid(),
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let before = current_thread_nice().unwrap();
        let lowered = std::thread::spawn(|| {
            lower_current_thread(12);
            current_thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, 12.max(before));
        assert_eq!(
            current_thread_nice().unwrap(),
            before,
            "other threads keep theirs"
        );
    }

    #[test]
    fn never_raises_a_thread_and_zero_leaves_it() {
        let (after_raise, after_zero) = std::thread::spawn(|| {
            lower_current_thread(15);
            lower_current_thread(5);
            let after_raise = current_thread_nice().unwrap();
            lower_current_thread(0);
            (after_raise, current_thread_nice().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(after_raise, 15);
        assert_eq!(after_zero, 15);
    }

    #[test]
    fn values_above_the_maximum_are_the_maximum() {
        let nice = std::thread::spawn(|| {
            lower_current_thread(40);
            current_thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(nice, i32::from(MAX_NICE));
    }
}
