//! The engine's file system: every file operation the engine does (commit-log segments,
//! SSTables, the manifest, their directories, free-space queries) goes through [`Vfs`], so a
//! test can put the engine on a simulated disk ([`SimVfs`]) that crashes at any operation and
//! keeps only what a real disk would (crash-consistency issue). Production uses [`RealVfs`]:
//! thin calls to `std::fs`, `pwrite`, `fsync`, `mmap` and `statvfs`, nothing more per call than
//! a virtual dispatch.
//!
//! Semantics every implementation keeps (those of Linux file systems the engine relies on):
//! - data written to a file is durable only after `sync_data`/`sync_all` of that file;
//! - a file's name (create, rename, remove) is durable only after `sync_dir` of its directory;
//! - `rename` replaces the target atomically;
//! - a mapping ([`Mapped`]) of a file never changes after the map call (tables are immutable).

#[cfg(test)]
pub(crate) mod recording;
mod sim;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

pub use sim::SimVfs;

/// A file open for writing.
pub trait VFile: Send + Sync {
    /// Writes all of `buf` at `offset` (pwrite).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the written data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data and metadata (size) durable (fsync).
    fn sync_all(&self) -> io::Result<()>;
    /// Starts writing `len` bytes from `offset` to the device, after waiting for the writeback
    /// of the bytes before `offset` that earlier calls started (RocksDB's
    /// `strict_bytes_per_sync`). So a large file's dirty pages go out as it is written, never
    /// more than about two calls' worth at once, instead of in one burst at its fsync or in a
    /// deep queue: either way every other file's fsync would wait behind them (a fsync's
    /// device cache flush waits for every write in flight). Promises nothing about durability.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether writes bypass the page cache (`O_DIRECT`): then every write must start at a
    /// multiple of [`DIRECT_ALIGN`], cover a multiple of it, and come from a buffer aligned to
    /// it ([`BufferedWriter`] does all three).
    fn is_direct(&self) -> bool {
        false
    }
}

/// The alignment of offsets, lengths and buffers of writes to a direct file (the largest
/// logical block size of the devices pairdb runs on).
pub const DIRECT_ALIGN: usize = 4096;

/// Read-only contents of a whole file: a memory mapping, or bytes.
pub enum Mapped {
    Map(Mmap),
    Bytes(Arc<[u8]>),
}

impl Mapped {
    /// Tells the kernel the bytes will be read once, front to back (more read-ahead; pages
    /// dropped sooner). Only a hint: a failure is ignored.
    pub fn advise_sequential(&self) {
        if let Mapped::Map(m) = self {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
    }

    /// Takes back [`Mapped::advise_sequential`]: default read-ahead, pages aged as usual.
    pub fn advise_normal(&self) {
        if let Mapped::Map(m) = self {
            let _ = m.advise(memmap2::Advice::Normal);
        }
    }

    /// Tells the kernel the bytes will be read in small pieces at random (no read-around on a
    /// fault). Only a hint: a failure is ignored.
    pub fn advise_random(&self) {
        if let Mapped::Map(m) = self {
            let _ = m.advise(memmap2::Advice::Random);
        }
    }

    /// Asks the kernel to read `len` bytes from `offset` into the page cache now, in the
    /// background (clamped to the file). Only a hint: a failure is ignored.
    pub fn will_need(&self, offset: usize, len: usize) {
        if let Mapped::Map(m) = self {
            let len = len.min(m.len().saturating_sub(offset));
            if len > 0 {
                let _ = m.advise_range(memmap2::Advice::WillNeed, offset, len);
            }
        }
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Mapped::Map(m) => m,
            Mapped::Bytes(b) => b,
        }
    }
}

/// The file operations of the engine.
pub trait Vfs: Send + Sync + std::fmt::Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Paths of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    fn exists(&self, path: &Path) -> bool;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The whole file, mapped (the file must not change afterwards).
    fn map(&self, path: &Path) -> io::Result<Mapped>;
    /// The file's size in bytes.
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Creates a file for writing: a new one when `exclusive` (fails if it exists), else
    /// truncates an existing one.
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<Arc<dyn VFile>>;
    /// Creates a new file (fails if it exists) whose writes bypass the page cache where the
    /// file system allows it ([`VFile::is_direct`]); elsewhere a plain new file. For files
    /// written once, front to back, and read later through their own mapping: SSTables.
    fn create_direct(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        self.create(path, true)
    }
    /// Opens an existing file for writing.
    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn VFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// A second name for the file `from` (a hard link; `to` must not exist). Durable after
    /// `sync_dir` of `to`'s directory, like a create.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// How many names the file at `path` has (1 unless something hard-linked it).
    fn link_count(&self, path: &Path) -> io::Result<u64>;
    /// Makes the names in `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Used space of the file system holding `path`, in percent.
    fn usage_percent(&self, path: &Path) -> io::Result<f64>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealVfs;

/// The production file system, shared.
pub fn real() -> Arc<dyn Vfs> {
    Arc::new(RealVfs)
}

struct RealFile {
    file: File,
    direct: bool,
}

impl RealFile {
    fn buffered(file: File) -> Self {
        Self {
            file,
            direct: false,
        }
    }
}

impl VFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn is_direct(&self) -> bool {
        self.direct
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // The call covers the file from its start to the step's end (see the trait's docs).
        let Some(end) = offset
            .checked_add(len)
            .and_then(|end| i64::try_from(end).ok())
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond i64",
            ));
        };
        // SAFETY: sync_file_range takes a file descriptor and three integers, no memory; the
        // descriptor belongs to `self.file`, which is open for the whole call. An invalid range
        // or descriptor is an error return (EINVAL/EBADF), never undefined behaviour. Tested
        // in `tests::write_behind_keeps_the_bytes`.
        let done = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                0,
                end,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Vfs for RealVfs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn map(&self, path: &Path) -> io::Result<Mapped> {
        let file = File::open(path)?;
        // SAFETY: the engine maps only files nobody changes while they are mapped: a table
        // file is mapped after it was completely written and fsynced, pairdb never writes to
        // or truncates it afterwards, and deleting it (after compaction) keeps the mapping
        // valid on Unix; a commit-log segment is mapped when the log is replayed at open, after
        // which pairdb never writes to it again, cuts a torn tail only past the last frame it
        // replayed (records replayed from it keep pointing into the mapping: no byte they
        // read goes), and deletes it only once no replayed record points into it
        // (`CommitLog::release_up_to`); the data dir's lock keeps other pairdb processes out.
        // Every read of the mapping is bounds-checked and checksummed. Exercised by the
        // sstable tests, the commit-log tests and the corruption sweeps in
        // tests/engine_corruption.rs.
        Ok(Mapped::Map(unsafe { Mmap::map(&file) }?))
    }

    fn create(&self, path: &Path, exclusive: bool) -> io::Result<Arc<dyn VFile>> {
        let mut options = OpenOptions::new();
        options.write(true);
        if exclusive {
            options.create_new(true);
        } else {
            options.create(true).truncate(true);
        }
        Ok(Arc::new(RealFile::buffered(options.open(path)?)))
    }

    fn create_direct(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        // O_DIRECT is switched on after the create, not passed to it: an open with O_CREAT
        // and O_DIRECT on a file system without direct I/O creates the file and then fails,
        // where this leaves a plain file to write buffered.
        let direct = fcntl(&file, FcntlArg::F_SETFL(OFlag::O_DIRECT)).is_ok();
        Ok(Arc::new(RealFile { file, direct }))
    }

    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        Ok(Arc::new(RealFile::buffered(
            OpenOptions::new().write(true).open(path)?,
        )))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn link_count(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.nlink())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn usage_percent(&self, path: &Path) -> io::Result<f64> {
        let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        let total = st.blocks() as f64;
        let free_for_users = st.blocks_available() as f64;
        let free_total = st.blocks_free() as f64;
        let used = total - free_total;
        let denominator = used + free_for_users;
        if denominator <= 0.0 {
            return Ok(0.0);
        }
        // As `df` counts it: blocks reserved for root count as unavailable.
        Ok(used / denominator * 100.0)
    }
}

/// A file being deleted is cut from its end by this much at a time before it is unlinked.
pub const DELETE_STEP: u64 = 8 << 20;

/// Deletes a file of `bytes` bytes by cutting it from the end [`DELETE_STEP`] at a time, then
/// unlinking it. On a file system mounted with `discard`, freed blocks are discarded as they
/// are freed, and one large discard holds the device queue: deleting a 256 MiB file at once
/// stalled another file's fdatasync 26-55 ms, in 8 MiB steps 1.5-2.5 ms, in the same total
/// time (`scripts/discard-stall.py`). Only for a file nothing maps and no other name links:
/// the cut would change what they see.
pub fn remove_in_steps(vfs: &dyn Vfs, path: &Path, bytes: u64) -> io::Result<()> {
    if bytes > DELETE_STEP {
        let file = vfs.open_write(path)?;
        let mut len = bytes;
        while len > DELETE_STEP {
            len -= DELETE_STEP;
            file.set_len(len)?;
        }
    }
    vfs.remove(path)
}

/// A position past the writer's buffer: a bug in [`BufferedWriter`], reported, not a panic.
fn overrun() -> io::Error {
    io::Error::other("buffered writer: position past its buffer")
}

/// Sequential writes to a [`VFile`] through a page-aligned buffer (what `BufWriter` does for a
/// `File`), optionally with write-behind: every `write_behind` bytes written, their writeback
/// starts ([`VFile::start_writeback`]), so the final fsync has little left to do.
///
/// To a direct file ([`VFile::is_direct`]) it writes only whole buffers at aligned offsets,
/// and at the end the rest padded with zeros to [`DIRECT_ALIGN`], then cuts the file back to
/// the bytes written: no write of it ever goes through the page cache.
pub struct BufferedWriter {
    file: Arc<dyn VFile>,
    /// Page-aligned (an anonymous mapping), a multiple of [`DIRECT_ALIGN`] long.
    buf: memmap2::MmapMut,
    /// Bytes of `buf` in use.
    len: usize,
    /// Bytes written to the file so far (where the buffer goes next).
    written: u64,
    /// Write-behind step (0: none), and where the bytes not yet handed to writeback start.
    write_behind: u64,
    behind_from: u64,
}

impl BufferedWriter {
    /// A writer with a buffer of `capacity` bytes rounded up to [`DIRECT_ALIGN`].
    pub fn new(file: Arc<dyn VFile>, capacity: usize) -> io::Result<Self> {
        let capacity = capacity.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        Ok(Self {
            file,
            buf: memmap2::MmapMut::map_anon(capacity)?,
            len: 0,
            written: 0,
            write_behind: 0,
            behind_from: 0,
        })
    }

    /// Starts the writeback of every `step` bytes once they are written (RocksDB's
    /// `bytes_per_sync`). Nothing to start for a direct file.
    pub fn with_write_behind(mut self, step: u64) -> Self {
        if !self.file.is_direct() {
            self.write_behind = step;
        }
        self
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let free = self.buf.get_mut(self.len..).ok_or_else(overrun)?;
            let (now, rest) = bytes.split_at(bytes.len().min(free.len()));
            free.get_mut(..now.len())
                .ok_or_else(overrun)?
                .copy_from_slice(now);
            self.len += now.len();
            bytes = rest;
            if self.len == self.buf.len() {
                self.write_buffer(self.len)?;
            }
        }
        Ok(())
    }

    /// Writes the first `bytes` bytes of the buffer (all of what is in use, maybe padded)
    /// and empties it.
    fn write_buffer(&mut self, bytes: usize) -> io::Result<()> {
        let out = self.buf.get(..bytes).ok_or_else(overrun)?;
        self.file.write_at(out, self.written)?;
        self.written += self.len as u64;
        self.len = 0;
        let pending = self.written - self.behind_from;
        if self.write_behind > 0 && pending >= self.write_behind {
            self.file.start_writeback(self.behind_from, pending)?;
            self.behind_from = self.written;
        }
        Ok(())
    }

    /// Writes what is buffered and hands back the file.
    pub fn into_file(mut self) -> io::Result<Arc<dyn VFile>> {
        if self.len > 0 {
            if self.file.is_direct() {
                let padded = self.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                self.buf
                    .get_mut(self.len..padded)
                    .ok_or_else(overrun)?
                    .fill(0);
                self.write_buffer(padded)?;
                self.file.set_len(self.written)?;
            } else {
                self.write_buffer(self.len)?;
            }
        }
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes through a write-behind writer of the real file system (which starts writeback
    /// every 4 KiB here, `sync_file_range` on each range) and reads every byte back after the
    /// final fsync; a range beyond what `sync_file_range` takes is an error, not a crash.
    #[test]
    fn write_behind_keeps_the_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t");
        let vfs = RealVfs;
        let file = vfs.create(&path, true).expect("create");
        let mut out = BufferedWriter::new(file, 1024)
            .expect("buffer")
            .with_write_behind(4096);
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in bytes.chunks(777) {
            out.write_all(chunk).expect("write");
        }
        let file = out.into_file().expect("flush");
        file.sync_all().expect("fsync");
        assert_eq!(vfs.read(&path).expect("read"), bytes);
        assert!(file.start_writeback(u64::MAX, 1).is_err());
    }

    /// Whether the file system of `dir` takes `O_DIRECT` opens, asked without `create_direct`.
    fn takes_direct_io(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = dir.join("probe");
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        let _ = fs::remove_file(&probe);
        opened
    }

    /// Writes through a direct file in pieces of every awkward size (totals below one
    /// alignment unit, exactly one buffer, a buffer and a byte, ...): every byte reads back
    /// and the file is exactly as long as what was written, not padded. With a misaligned
    /// write the kernel refuses it (EINVAL), so this also checks the alignment.
    #[test]
    fn direct_files_keep_exactly_the_bytes_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vfs = RealVfs;
        let direct_expected = takes_direct_io(dir.path());
        for (n, total) in [0usize, 1, 4095, 4096, 4097, 16_384, 16_385, 100_000]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(format!("t{n}"));
            let file = vfs.create_direct(&path).expect("create");
            assert_eq!(file.is_direct(), direct_expected, "{total} bytes");
            let mut out = BufferedWriter::new(file, 16_384).expect("buffer");
            let bytes: Vec<u8> = (0..total).map(|i| (i % 251) as u8 + 1).collect();
            for chunk in bytes.chunks(3_000) {
                out.write_all(chunk).expect("write");
            }
            let file = out.into_file().expect("finish");
            file.sync_all().expect("fsync");
            assert_eq!(vfs.read(&path).expect("read"), bytes, "{total} bytes");
        }
        assert!(
            vfs.create_direct(&dir.path().join("t0")).is_err(),
            "an existing name is refused"
        );
    }
}
