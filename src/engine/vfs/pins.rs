//! Pages of a file kept resident and out of memory reclaim ([`super::VFile::pin_pages`]): the
//! commit log's pages from the page its next frame goes into to the end of the zeros written
//! ahead of it.
//!
//! Why: under a memory limit (a cgroup) every page-cache page the log writes is a page some
//! thread must reclaim memory for, and a freshly written log page is dirty until the next
//! fsync. When a reclaiming thread's batch off the end of the inactive list holds only such
//! pages, a cgroup-v1 kernel puts it to sleep for up to 100 ms (`reclaim_throttle`, reason
//! writeback), and a writer of the log is often that thread (docs/benchmarks.md, "Round 3,
//! step 14"). Locked pages sit on the unevictable list, which reclaim never scans: a write over
//! them takes no new page, and no reclaim batch holds them while they are dirty. Once a sync
//! made them clean and no frame will be written into them again, they are handed back.
//!
//! How: a shared, read-only mapping of the file that exists only to be locked (`mlock`) in
//! part; nothing ever reads through it. Locking needs `RLIMIT_MEMLOCK` room; without it the
//! call fails and the pages stay ordinary page cache (the caller stops asking).
//!
//! Invariants: the locked range is one run of whole pages, `lo..hi`, inside the mapping and
//! inside the file (a caller pins only bytes it has written); dropping the pins (the mapping)
//! unlocks everything.

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};
use parking_lot::Mutex;

/// The smallest mapping made; it doubles when a pin reaches past it.
const MIN_MAP_BYTES: u64 = 8 << 20;
/// Pages are handed back in runs of at least this many bytes: a munlock splits the mapping's
/// areas under the process's mmap lock, and the log syncs thousands of times a second, most
/// of them less than a page further on.
pub(crate) const UNPIN_STEP: u64 = 64 << 10;

/// The locked pages of one file.
#[derive(Default)]
pub(super) struct PagePins {
    state: Mutex<Option<Locked>>,
}

struct Locked {
    map: Mmap,
    /// Locked: `lo..hi`, page multiples (`lo == hi`: nothing).
    lo: u64,
    hi: u64,
}

fn page_size() -> u64 {
    (rustix::param::page_size() as u64).max(512)
}

/// Locks (`lock`) or unlocks `from..to` of `map`, a range of whole pages inside it.
fn set_locked(map: &Mmap, from: u64, to: u64, lock: bool) -> io::Result<()> {
    let (Ok(start), Ok(end)) = (usize::try_from(from), usize::try_from(to)) else {
        return Err(io::Error::other("pinned range beyond the address space"));
    };
    if start >= end {
        return Ok(());
    }
    if end > map.len() {
        return Err(io::Error::other("pinned range beyond its mapping"));
    }
    // A raw pointer, not a slice: the pages past the file's end are mapped but not readable.
    let ptr = map.as_ptr().wrapping_add(start).cast::<libc::c_void>();
    let len = end - start;
    // SAFETY: `ptr..ptr + len` lies inside `map` (checked above), a live mapping this
    // function borrows for the whole call. mlock and munlock change only whether the kernel
    // may reclaim those pages: they read and write no memory of this process, and an invalid
    // range is an error return (ENOMEM/EINVAL), never undefined behaviour. Tested in
    // `tests::pinned_pages_are_locked_and_handed_back`.
    let done = unsafe {
        if lock {
            libc::mlock(ptr, len)
        } else {
            libc::munlock(ptr, len)
        }
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl PagePins {
    /// Locks the whole pages of `file` that hold `offset..offset + len` (written bytes: inside
    /// the file), together with those locked before. A run not adjoining the locked one
    /// replaces it.
    pub(super) fn pin(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let page = page_size();
        let from = offset / page * page;
        let to = offset.saturating_add(len).next_multiple_of(page);
        if from >= to {
            return Ok(());
        }
        let mut state = self.state.lock();
        if let Some(locked) = state.as_mut() {
            if from > locked.hi || to < locked.lo {
                set_locked(&locked.map, locked.lo, locked.hi, false)?;
                locked.lo = from;
                locked.hi = from;
            }
        }
        let lo = state.as_ref().map_or(from, |l| l.lo.min(from));
        let hi = state.as_ref().map_or(to, |l| l.hi.max(to));
        let mapped = state.as_ref().map_or(0, |l| l.map.len() as u64);
        if hi > mapped {
            // A larger mapping, locked over the whole run before the old one goes (its
            // munmap unlocks only what no other locked mapping holds).
            let bytes = hi.max(mapped * 2).max(MIN_MAP_BYTES).next_multiple_of(page);
            let len = usize::try_from(bytes)
                .map_err(|_| io::Error::other("pinned range beyond the address space"))?;
            // SAFETY: nothing reads through this mapping (it exists to be locked, see the
            // module docs), so bytes changing under it (the log's own writes) or pages past
            // the file's end (unreadable) can do no harm. `set_locked` touches it only through
            // mlock and munlock.
            let map = unsafe { MmapOptions::new().len(len).map(file) }?;
            set_locked(&map, lo, hi, true)?;
            *state = Some(Locked { map, lo, hi });
            return Ok(());
        }
        if let Some(locked) = state.as_mut() {
            // Only what is not locked yet.
            if from < locked.lo {
                set_locked(&locked.map, from, locked.lo, true)?;
            }
            if to > locked.hi {
                set_locked(&locked.map, locked.hi.max(from), to, true)?;
            }
            locked.lo = lo;
            locked.hi = hi;
        }
        Ok(())
    }

    /// Hands the locked pages below `end` (rounded down to a page) back to reclaim, once they
    /// make a run of at least [`UNPIN_STEP`] (or `end` is past every locked page).
    pub(super) fn unpin_below(&self, end: u64) -> io::Result<()> {
        let end = end / page_size() * page_size();
        let mut state = self.state.lock();
        let Some(locked) = state.as_mut() else {
            return Ok(());
        };
        let to = end.min(locked.hi);
        if to <= locked.lo || (to - locked.lo < UNPIN_STEP && to < locked.hi) {
            return Ok(());
        }
        set_locked(&locked.map, locked.lo, to, false)?;
        locked.lo = to;
        Ok(())
    }

    /// The locked range, `lo..hi` (tests).
    #[cfg(test)]
    pub(super) fn locked(&self) -> Option<(u64, u64)> {
        self.state.lock().as_ref().map(|l| (l.lo, l.hi))
    }
}

/// Kibibytes locked (the `Locked:` field of /proc/self/smaps) in the mappings whose header
/// line (`start-end perms offset dev inode path`) `matches` (tests).
#[cfg(test)]
pub(crate) fn locked_kib_where(matches: impl Fn(&str) -> bool) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let is_header = |line: &str| {
        line.split_whitespace()
            .next()
            .and_then(|range| range.split_once('-'))
            .is_some_and(|(a, b)| {
                !a.is_empty()
                    && [a, b]
                        .iter()
                        .all(|n| n.chars().all(|c| c.is_ascii_hexdigit()))
            })
    };
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if is_header(line) {
            ours = matches(line);
        } else if ours && line.starts_with("Locked:") {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Kibibytes locked in the mapping of `pins` (locking part of a mapping splits it into
    /// several areas, each with its own line in smaps).
    fn locked_kib(pins: &PagePins) -> u64 {
        let Some((start, end)) = pins.state.lock().as_ref().map(|l| {
            let start = l.map.as_ptr() as usize;
            (start, start + l.map.len())
        }) else {
            return 0;
        };
        locked_kib_where(|line| {
            line.split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok())
                .is_some_and(|a| (start..end).contains(&a))
        })
    }

    #[test]
    fn pinned_pages_are_locked_and_handed_back() {
        let page = page_size();
        let mut file = tempfile::tempfile().expect("tempfile");
        let pages = 2 * UNPIN_STEP / page + 16;
        file.write_all(&vec![7u8; (pages * page) as usize])
            .expect("write");
        let pins = PagePins::default();
        let kib = |pages: u64| pages * page / 1024;
        let step = UNPIN_STEP / page;

        // Bytes 100..page+1 lie in pages 0 and 1.
        pins.pin(&file, 100, page - 99).expect("pin");
        assert_eq!(pins.locked(), Some((0, 2 * page)));
        assert_eq!(locked_kib(&pins), kib(2));
        // An adjoining run grows the locked one.
        pins.pin(&file, page, (step + 2) * page).expect("pin");
        assert_eq!(pins.locked(), Some((0, (step + 3) * page)));
        assert_eq!(locked_kib(&pins), kib(step + 3));
        // Less than a step below a byte of page 2: kept for now.
        pins.unpin_below(2 * page + 10).expect("unpin");
        assert_eq!(locked_kib(&pins), kib(step + 3));
        // A step's worth below page `step + 1`: handed back.
        pins.unpin_below((step + 1) * page).expect("unpin");
        assert_eq!(pins.locked(), Some(((step + 1) * page, (step + 3) * page)));
        assert_eq!(locked_kib(&pins), kib(2));
        // A run that does not adjoin replaces the locked one.
        pins.pin(&file, (2 * step + 9) * page, 1).expect("pin");
        assert_eq!(
            pins.locked(),
            Some(((2 * step + 9) * page, (2 * step + 10) * page))
        );
        assert_eq!(locked_kib(&pins), kib(1));
        // Everything handed back.
        pins.unpin_below(u64::MAX).expect("unpin");
        assert_eq!(locked_kib(&pins), 0);
    }
}
