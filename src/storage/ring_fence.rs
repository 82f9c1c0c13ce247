//! The ring fence: the oldest ring (by registry epoch) whose writes and client reads this node
//! still takes (docs/coordinator.md, "Cleanup").
//!
//! Coordinators (and, for a stream, its sender) tag every batch with the epoch of the registry
//! it was placed on (`WriteBatchRequest.ring_epoch`). A cleanup raises this node's floor to the epoch of the
//! ring it verifies against *before* it verifies and drops anything (`FenceRing`). From then
//! on a client call placed on an older ring, one a stalled coordinator sends late or the
//! network delivers late, is refused with `STALE_RING` instead of landing in a range the node
//! is about to drop or dropped: its coordinator reads the registry again and places the
//! request anew. Every other write carries the epoch its placement rests on and is fenced the
//! same way (a hint replay, a repair, a read repair or a stream batch placed on an old ring
//! would put a record into a dropped range).
//!
//! Invariants:
//! - The floor only rises, and is durable before [`RingFence::raise`] returns
//!   (`<data dir>/ring-fence.json`, written through `json_file`): a restart keeps it.
//! - When `raise` returns, no write that the old floor admitted and the new one would
//!   refuse is still being applied: each write holds the gate (shared) from its check to the
//!   end of its apply, and `raise` takes it exclusively. So a cleanup's verification, which
//!   starts after the fence, sees every such write that was acknowledged.
//! - Floor 0 (never fenced) admits every call, also those with no epoch (0: unknown); a
//!   fenced node refuses calls with no epoch.
//!
//! The fence also remembers the newest ring any admitted write was placed on (`newest`,
//! `<data dir>/ring-newest.json`, durable before that write is applied). A cleanup's
//! `DropRanges` names the ring it verified against; a node that took a write placed on a newer
//! ring refuses it ([`RingFence::check_verified_ring`]). A drop is only ever sent for the ring the
//! registry holds, so a newer write means the drop is late: its cleanup was paused past its
//! lease, another coordinator finished the cleanup, and a later change may have given the
//! ranges back to this node, which the late drop would delete. A drop that may run holds
//! [`DropGuard`] until it is done: a write placed on a newer ring that comes meanwhile waits
//! for it (rare: only a late drop meets one), so the drop never takes it along.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, RwLock, RwLockReadGuard, watch};

pub const FILE_NAME: &str = "ring-fence.json";
/// Where the newest ring a write was placed on is kept.
pub const NEWEST_FILE_NAME: &str = "ring-newest.json";

/// A call placed on a ring older than the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this node takes calls placed on a ring of registry epoch {floor} or later; this one was placed on epoch {epoch} (0: unknown): read the registry again and place the request anew"
)]
pub struct StaleRing {
    pub epoch: u64,
    pub floor: u64,
}

#[derive(Debug)]
pub struct RingFence {
    path: PathBuf,
    floor: AtomicU64,
    /// Shared by each admitted write until it is applied; exclusive while raising.
    gate: RwLock<()>,
    newest_path: PathBuf,
    /// The newest ring (registry epoch) an admitted write was placed on; only rises.
    newest: AtomicU64,
    /// Held while a higher `newest` is written down.
    recording: Mutex<()>,
    /// The ring of the drop running now ([`NO_DROP`]: none); writes placed on a newer ring
    /// wait until it ends.
    dropping: watch::Sender<u64>,
    /// One drop at a time.
    drop_lock: Mutex<()>,
}

/// [`RingFence::dropping`] when no drop runs.
const NO_DROP: u64 = u64::MAX;

/// A drop of ranges verified against a ring no write here is newer than; writes placed on a
/// newer ring wait until it is dropped.
pub struct DropGuard<'a> {
    fence: &'a RingFence,
    _one: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for DropGuard<'_> {
    fn drop(&mut self) {
        self.fence.dropping.send_replace(NO_DROP);
    }
}

impl RingFence {
    /// Opens the fence stored in `dir` (floor 0 when there is none).
    pub fn open(dir: &Path) -> std::io::Result<RingFence> {
        let path = dir.join(FILE_NAME);
        let floor: u64 = super::json_file::load(&path)?;
        let newest_path = dir.join(NEWEST_FILE_NAME);
        let newest: u64 = super::json_file::load(&newest_path)?;
        Ok(RingFence {
            path,
            floor: AtomicU64::new(floor),
            gate: RwLock::new(()),
            newest_path,
            newest: AtomicU64::new(newest),
            recording: Mutex::new(()),
            dropping: watch::Sender::new(NO_DROP),
            drop_lock: Mutex::new(()),
        })
    }

    /// The newest ring an admitted write was placed on (0: none named one).
    pub fn newest(&self) -> u64 {
        self.newest.load(Ordering::Acquire)
    }

    /// Records that a write placed on the ring of `epoch` is about to be applied: durable on
    /// return when it raises [`RingFence::newest`] (rare: once per registry change).
    pub async fn note_placed(&self, epoch: u64) -> std::io::Result<()> {
        if epoch <= self.newest() {
            return Ok(());
        }
        let _one = self.recording.lock().await;
        if epoch <= self.newest() {
            return Ok(());
        }
        let path = self.newest_path.clone();
        tokio::task::spawn_blocking(move || super::json_file::store(&path, &epoch))
            .await
            .map_err(std::io::Error::other)??;
        self.newest.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Starts a drop of ranges verified against the ring of `epoch`, unless this node took a
    /// write placed on a newer ring (the drop is late; see the module doc). Hold the guard
    /// until the drop is done.
    pub async fn begin_drop(&self, epoch: u64) -> Result<DropGuard<'_>, StaleRing> {
        let one = self.drop_lock.lock().await;
        // No admitted write is between its check and its apply: `newest` is complete.
        let _writes = self.gate.write().await;
        self.check_verified_ring(epoch)?;
        self.dropping.send_replace(epoch);
        Ok(DropGuard {
            fence: self,
            _one: one,
        })
    }

    /// Whether ranges or marks verified against the ring of `epoch` are current: not when this
    /// node took a write placed on a newer ring (they are late; see the module doc).
    pub fn check_verified_ring(&self, epoch: u64) -> Result<(), StaleRing> {
        let newest = self.newest();
        if epoch >= newest {
            Ok(())
        } else {
            Err(StaleRing {
                epoch,
                floor: newest,
            })
        }
    }

    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Whether a call placed on a ring of `epoch` may be served now.
    pub fn check(&self, epoch: u64) -> Result<(), StaleRing> {
        let floor = self.floor();
        if floor == 0 || epoch >= floor {
            Ok(())
        } else {
            Err(StaleRing { epoch, floor })
        }
    }

    /// Admits a write placed on a ring of `epoch`: hold the guard until it is applied. While
    /// a drop verified against an older ring runs, waits for it to end.
    pub async fn admit(&self, epoch: u64) -> Result<RwLockReadGuard<'_, ()>, StaleRing> {
        loop {
            let guard = self.gate.read().await;
            self.check(epoch)?;
            if epoch <= *self.dropping.borrow() {
                return Ok(guard);
            }
            let mut ended = self.dropping.subscribe();
            if epoch <= *ended.borrow_and_update() {
                return Ok(guard);
            }
            drop(guard);
            // The sender is the fence's own: this wait ends when the drop does.
            let _ = ended.changed().await;
        }
    }

    /// Raises the floor to `epoch` (never lowers it), after every admitted write in flight
    /// was applied; durable on return. Returns the floor in force.
    pub async fn raise(&self, epoch: u64) -> std::io::Result<u64> {
        let _exclusive = self.gate.write().await;
        let floor = self.floor();
        if epoch <= floor {
            return Ok(floor);
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || super::json_file::store(&path, &epoch))
            .await
            .map_err(std::io::Error::other)??;
        self.floor.store(epoch, Ordering::Release);
        tracing::info!(from = floor, to = epoch, "ring fence raised");
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn the_floor_only_rises_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fence = RingFence::open(dir.path()).expect("open");
        assert_eq!(fence.check(0), Ok(()), "an unfenced node takes every call");
        assert_eq!(fence.raise(7).await.expect("raise"), 7);
        assert_eq!(fence.raise(5).await.expect("raise"), 7, "never lowered");
        assert_eq!(fence.check(7), Ok(()));
        assert_eq!(fence.check(9), Ok(()));
        assert_eq!(fence.check(6), Err(StaleRing { epoch: 6, floor: 7 }));
        assert_eq!(
            fence.check(0),
            Err(StaleRing { epoch: 0, floor: 7 }),
            "a fenced node refuses calls that name no ring"
        );
        let reopened = RingFence::open(dir.path()).expect("reopen");
        assert_eq!(reopened.floor(), 7);
        assert!(reopened.check(6).is_err());
    }

    #[tokio::test]
    async fn a_raise_waits_for_the_writes_admitted_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fence = Arc::new(RingFence::open(dir.path()).expect("open"));
        let admitted = fence.admit(3).await.expect("admitted");
        let raising = tokio::spawn({
            let fence = fence.clone();
            async move { fence.raise(4).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !raising.is_finished(),
            "the raise waits for the admitted write"
        );
        assert_eq!(fence.floor(), 0);
        drop(admitted);
        assert_eq!(raising.await.expect("join").expect("raise"), 4);
        assert!(fence.admit(3).await.is_err(), "refused once raised");
        assert!(fence.admit(4).await.is_ok());
    }

    #[tokio::test]
    async fn a_drop_verified_on_a_ring_older_than_a_write_is_refused_also_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fence = RingFence::open(dir.path()).expect("open");
        assert_eq!(
            fence.check_verified_ring(0),
            Ok(()),
            "no write named a ring yet"
        );
        fence.note_placed(6).await.expect("note");
        fence.note_placed(4).await.expect("note");
        assert_eq!(fence.newest(), 6, "only rises");
        assert_eq!(fence.check_verified_ring(6), Ok(()));
        assert_eq!(fence.check_verified_ring(7), Ok(()));
        assert_eq!(
            fence.check_verified_ring(5),
            Err(StaleRing { epoch: 5, floor: 6 })
        );
        let reopened = RingFence::open(dir.path()).expect("reopen");
        assert_eq!(reopened.newest(), 6);
        assert!(reopened.check_verified_ring(5).is_err());
        assert_eq!(reopened.floor(), 0, "recording writes fences nothing");
    }

    #[tokio::test]
    async fn a_write_on_a_newer_ring_waits_for_a_running_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fence = Arc::new(RingFence::open(dir.path()).expect("open"));
        fence.note_placed(5).await.expect("note");
        let dropping = fence.begin_drop(5).await.expect("a current drop");
        let newer = tokio::spawn({
            let fence = fence.clone();
            async move {
                let _admitted = fence.admit(6).await.expect("admitted");
                fence.note_placed(6).await.expect("note");
            }
        });
        drop(
            fence
                .admit(5)
                .await
                .expect("a write on the drop's ring goes on"),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!newer.is_finished(), "the newer write waits for the drop");
        assert_eq!(fence.newest(), 5);
        drop(dropping);
        newer.await.expect("join");
        assert_eq!(fence.newest(), 6);
        assert!(fence.begin_drop(5).await.is_err(), "late now");
    }

    #[test]
    fn a_damaged_fence_file_is_an_error_not_an_open_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), b"not json").expect("write");
        assert!(RingFence::open(dir.path()).is_err());
    }
}
