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

/// `ioprio_set`/`ioprio_get` constants (linux/ioprio.h).
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
/// The idle I/O class (`IOPRIO_CLASS_IDLE`), as [`thread_io_class`] reports it.
pub const IO_CLASS_IDLE: libc::c_int = 3;

/// Puts the calling thread's disk I/O in the idle class: an I/O scheduler with priorities
/// (mq-deadline, BFQ) serves its reads and direct writes only when no request of a higher
/// class waits, so a compaction's table writes never queue ahead of a commit-log fsync.
/// Only direct I/O and reads carry the thread's class (buffered writes reach the disk from
/// the kernel's flusher threads). Failure is logged, not returned.
pub fn idle_current_thread_io() {
    // SAFETY: ioprio_set takes three integers and no memory; who = this thread (0 under
    // IOPRIO_WHO_PROCESS is the caller). A bad value is an error return, never undefined
    // behaviour. Tested in `tests::idle_io_class_applies_to_the_calling_thread_only`.
    let done = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if done != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot put a background thread's disk I/O in the idle class");
    }
}

/// The I/O priority class of thread `tid` of this process, 0 for the calling thread (0: none
/// set, 1 realtime, 2 best effort, 3 idle).
pub fn thread_io_class(tid: i32) -> std::io::Result<i32> {
    // SAFETY: as in `idle_current_thread_io`: integers only, errors are return values.
    let prio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    if prio < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((prio as i32) >> IOPRIO_CLASS_SHIFT)
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
    fn idle_io_class_applies_to_the_calling_thread_only() {
        let before = thread_io_class(0).unwrap();
        let idled = std::thread::spawn(|| {
            idle_current_thread_io();
            thread_io_class(0).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(idled, IO_CLASS_IDLE);
        assert_eq!(thread_io_class(0).unwrap(), before);
        assert_ne!(before, IO_CLASS_IDLE);
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
