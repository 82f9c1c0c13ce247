//! A simulated disk for crash tests (in the spirit of TigerBeetle's and FoundationDB's
//! simulators). It holds files in memory and records, per file, what was synced and what was
//! written since; per directory, which names were synced and which changes since. It can
//! crash at any operation: from then on every mutating operation fails (the process is dead),
//! and [`SimVfs::power_loss`] builds the disk a power loss could leave: the synced state plus
//! any subset of the unsynced writes (each torn to any length, in any order) and of the
//! unsynced directory changes. [`SimVfs::process_crash`] is a `kill -9`: the kernel keeps
//! everything written.
//!
//! Simplifications, each on the side of the engine's assumptions: directories themselves are
//! durable once created; a directory change that needs an earlier one it depends on (a rename
//! of a name that is not there) is dropped with it; free space is unlimited.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Mapped, VFile, Vfs};

#[derive(Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone)]
enum DirOp {
    Link {
        path: PathBuf,
        inode: u64,
    },
    Unlink {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        inode: u64,
    },
}

impl DirOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            DirOp::Link { path, .. } | DirOp::Unlink { path } => path.parent(),
            DirOp::Rename { to, .. } => to.parent(),
        }
    }

    /// Applies the change to `names`; false when it cannot apply (what it needs is missing).
    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) -> bool {
        match self {
            DirOp::Link { path, inode } => {
                names.insert(path.clone(), *inode);
            }
            DirOp::Unlink { path } => {
                names.remove(path);
            }
            DirOp::Rename { from, to, inode } => {
                if names.get(from) != Some(inode) {
                    return false;
                }
                names.remove(from);
                names.insert(to.clone(), *inode);
            }
        }
        true
    }
}

#[derive(Clone, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Changes since the last sync, in order.
    pending: Vec<FileOp>,
}

#[expect(
    clippy::indexing_slicing,
    reason = "the content was resized to cover the write"
)]
fn apply_file_op(content: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { offset, data } => {
            let start = *offset as usize;
            if content.len() < start + data.len() {
                content.resize(start + data.len(), 0);
            }
            content[start..start + data.len()].copy_from_slice(data);
        }
        FileOp::SetLen(len) => content.resize(*len as usize, 0),
    }
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// Directory changes not yet synced, in order.
    dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    /// Mutating operations so far.
    ops: u64,
    /// Operation index from which everything fails (the crash).
    crash_at: Option<u64>,
    /// Whether [`VFile::start_writeback`] fails (an I/O error of an earlier page's writeback,
    /// as `sync_file_range` reports it), without a crash.
    fail_writeback: bool,
}

impl State {
    /// Counts one mutating operation; fails once the crash happened.
    fn tick(&mut self) -> io::Result<()> {
        let index = self.ops;
        self.ops += 1;
        if self.crash_at.is_some_and(|at| index >= at) {
            return Err(io::Error::other("simulated crash"));
        }
        Ok(())
    }

    fn inode(&mut self, inode: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&inode)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such inode"))
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if self.dirs.contains(dir) => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory for {}", path.display()),
            )),
        }
    }
}

/// A small deterministic generator (xorshift64*): crash images depend only on the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// The simulated disk. Clones share the same disk.
#[derive(Clone, Default)]
pub struct SimVfs {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimVfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("SimVfs")
            .field("files", &s.names.len())
            .field("ops", &s.ops)
            .field("crash_at", &s.crash_at)
            .finish()
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    inode: u64,
}

impl VFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let op = FileOp::Write {
            offset,
            data: buf.to_vec(),
        };
        let inode = s.inode(self.inode)?;
        apply_file_op(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let op = FileOp::SetLen(len);
        let inode = s.inode(self.inode)?;
        apply_file_op(&mut inode.current, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let inode = s.inode(self.inode)?;
        inode.durable = inode.current.clone();
        inode.pending.clear();
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    /// Writeback changes nothing a crash keeps (only a sync does), so it is not a counted
    /// operation; it fails after the crash and while [`SimVfs::fail_writeback`] is on.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        let s = self.state.lock();
        if s.fail_writeback || s.crash_at.is_some_and(|at| s.ops >= at) {
            return Err(io::Error::other("simulated writeback error"));
        }
        Ok(())
    }
}

impl SimVfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mutating operations done so far (the crash points of a workload).
    pub fn operations(&self) -> u64 {
        self.state.lock().ops
    }

    /// Crash at mutating operation `index` (counted from the disk's creation): it and every
    /// later one fail.
    pub fn crash_at(&self, index: u64) {
        self.state.lock().crash_at = Some(index);
    }

    /// From now on, until turned off again, every start of a writeback fails (as an earlier
    /// page's failed writeback makes `sync_file_range` fail); nothing crashes.
    pub fn fail_writeback(&self, on: bool) {
        self.state.lock().fail_writeback = on;
    }

    /// Crash now.
    pub fn crash_now(&self) {
        let mut s = self.state.lock();
        s.crash_at = Some(s.ops);
    }

    /// The disk after a `kill -9`: everything written stays (the kernel had it).
    pub fn process_crash(&self) -> SimVfs {
        let s = self.state.lock();
        let names = s.names.clone();
        Self::image(&s, names, |inode, _| inode.current.clone())
    }

    /// The disk after a power loss: what was synced, plus, chosen by `seed`, any subset of the
    /// unsynced writes of each file (each torn to any length, applied in any order) and of
    /// the unsynced directory changes (in order, each kept or lost).
    pub fn power_loss(&self, seed: u64) -> SimVfs {
        let s = self.state.lock();
        let mut rng = Rng::new(seed);
        let mut names = s.durable_names.clone();
        for op in &s.dir_ops {
            if rng.coin() {
                op.apply(&mut names);
            }
        }
        Self::image(&s, names, |inode, rng_seed| {
            let mut rng = Rng::new(seed ^ rng_seed);
            let mut content = inode.durable.clone();
            let mut ops: Vec<FileOp> = inode
                .pending
                .iter()
                .filter(|_| rng.coin())
                .cloned()
                .collect();
            // Any order.
            for i in (1..ops.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                ops.swap(i, j);
            }
            for op in ops {
                let op = match op {
                    FileOp::Write { offset, mut data } => {
                        // Torn: any prefix of the write reached the disk.
                        let keep = rng.below(data.len() as u64 + 1) as usize;
                        data.truncate(if rng.coin() { data.len() } else { keep });
                        FileOp::Write { offset, data }
                    }
                    other => other,
                };
                apply_file_op(&mut content, &op);
            }
            content
        })
    }

    /// A fresh disk holding `names`, each with the content `content` gives its inode, all
    /// synced.
    fn image(
        s: &State,
        names: BTreeMap<PathBuf, u64>,
        content: impl Fn(&Inode, u64) -> Vec<u8>,
    ) -> SimVfs {
        let mut inodes = HashMap::new();
        for inode in names.values() {
            if let Some(old) = s.inodes.get(inode) {
                let bytes = content(old, *inode);
                inodes.insert(
                    *inode,
                    Inode {
                        durable: bytes.clone(),
                        current: bytes,
                        pending: Vec::new(),
                    },
                );
            }
        }
        let names: BTreeMap<PathBuf, u64> = names
            .into_iter()
            .filter(|(_, inode)| inodes.contains_key(inode))
            .collect();
        SimVfs {
            state: Arc::new(Mutex::new(State {
                inodes,
                next_inode: s.next_inode,
                durable_names: names.clone(),
                names,
                dir_ops: Vec::new(),
                dirs: s.dirs.clone(),
                ops: 0,
                crash_at: None,
                fail_writeback: false,
            })),
        }
    }

    fn handle(&self, inode: u64) -> Arc<dyn VFile> {
        Arc::new(SimFile {
            state: self.state.clone(),
            inode,
        })
    }

    fn not_found(path: &Path) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} not found", path.display()),
        )
    }
}

impl Vfs for SimVfs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        for ancestor in dir.ancestors() {
            s.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let s = self.state.lock();
        if !s.dirs.contains(dir) {
            return Err(Self::not_found(dir));
        }
        let files = s.names.keys().filter(|p| p.parent() == Some(dir));
        let dirs = s.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files.chain(dirs).cloned().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.state.lock();
        s.names.contains_key(path) || s.dirs.contains(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.state.lock();
        let inode = s.names.get(path).ok_or_else(|| Self::not_found(path))?;
        Ok(s.inodes
            .get(inode)
            .map(|i| i.current.clone())
            .unwrap_or_default())
    }

    fn map(&self, path: &Path) -> io::Result<Mapped> {
        Ok(Mapped::Bytes(self.read(path)?.into()))
    }

    fn create(&self, path: &Path, exclusive: bool) -> io::Result<Arc<dyn VFile>> {
        let mut s = self.state.lock();
        s.tick()?;
        s.parent_exists(path)?;
        if let Some(&inode) = s.names.get(path) {
            if exclusive {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            let file = s.inode(inode)?;
            file.current.clear();
            file.pending.push(FileOp::SetLen(0));
            drop(s);
            return Ok(self.handle(inode));
        }
        let inode = s.next_inode;
        s.next_inode += 1;
        s.inodes.insert(inode, Inode::default());
        s.names.insert(path.to_path_buf(), inode);
        s.dir_ops.push(DirOp::Link {
            path: path.to_path_buf(),
            inode,
        });
        drop(s);
        Ok(self.handle(inode))
    }

    fn open_write(&self, path: &Path) -> io::Result<Arc<dyn VFile>> {
        let s = self.state.lock();
        let inode = *s.names.get(path).ok_or_else(|| Self::not_found(path))?;
        drop(s);
        Ok(self.handle(inode))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let inode = s.names.remove(from).ok_or_else(|| Self::not_found(from))?;
        s.names.insert(to.to_path_buf(), inode);
        s.dir_ops.push(DirOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            inode,
        });
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        s.parent_exists(to)?;
        let inode = *s.names.get(from).ok_or_else(|| Self::not_found(from))?;
        if s.names.contains_key(to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", to.display()),
            ));
        }
        s.names.insert(to.to_path_buf(), inode);
        s.dir_ops.push(DirOp::Link {
            path: to.to_path_buf(),
            inode,
        });
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        s.names.remove(path).ok_or_else(|| Self::not_found(path))?;
        s.dir_ops.push(DirOp::Unlink {
            path: path.to_path_buf(),
        });
        Ok(())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let s = self.state.lock();
        let inode = s.names.get(path).ok_or_else(|| Self::not_found(path))?;
        Ok(s.inodes.get(inode).map_or(0, |i| i.current.len() as u64))
    }

    fn link_count(&self, path: &Path) -> io::Result<u64> {
        let s = self.state.lock();
        let inode = s.names.get(path).ok_or_else(|| Self::not_found(path))?;
        Ok(s.names.values().filter(|i| *i == inode).count() as u64)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        s.tick()?;
        let ops = std::mem::take(&mut s.dir_ops);
        let mut kept = Vec::new();
        for op in ops {
            if op.dir() == Some(dir) {
                op.apply(&mut s.durable_names);
            } else {
                kept.push(op);
            }
        }
        s.dir_ops = kept;
        Ok(())
    }

    fn usage_percent(&self, _path: &Path) -> io::Result<f64> {
        Ok(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_data_and_names_survive_every_power_loss() {
        let disk = SimVfs::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).expect("dir");
        let a = disk.create(&dir.join("a"), true).expect("create");
        a.write_at(b"hello", 0).expect("write");
        a.sync_data().expect("sync");
        disk.sync_dir(dir).expect("sync dir");
        a.write_at(b"HELLO world", 0).expect("write");
        let b = disk.create(&dir.join("b"), true).expect("create");
        b.write_at(b"unsynced", 0).expect("write");
        b.sync_data().expect("sync (the name is not synced)");
        let mut saw_b = false;
        let mut saw_torn = false;
        for seed in 0..200 {
            let image = disk.power_loss(seed);
            let a = image.read(&dir.join("a")).expect("a is durable");
            // The synced "hello" with any prefix of the unsynced write over it.
            let (old, new) = (b"hello".as_slice(), b"HELLO world".as_slice());
            let explained = (0..=new.len()).any(|k| {
                let mut expect = new[..k].to_vec();
                expect.extend_from_slice(old.get(k..).unwrap_or_default());
                a == expect
            });
            assert!(explained, "{:?}", String::from_utf8_lossy(&a));
            saw_torn |= a.len() > 5 && a.len() < 11;
            if let Ok(b) = image.read(&dir.join("b")) {
                assert_eq!(b, b"unsynced", "synced data of a name that survived");
                saw_b = true;
            }
        }
        assert!(saw_b && saw_torn, "the choices must vary with the seed");
        // A kill -9 keeps everything.
        let killed = disk.process_crash();
        assert_eq!(killed.read(&dir.join("a")).expect("a"), b"HELLO world");
    }

    #[test]
    fn a_crash_fails_every_later_mutation() {
        let disk = SimVfs::new();
        disk.create_dir_all(Path::new("/d")).expect("dir");
        let f = disk.create(Path::new("/d/f"), true).expect("create");
        disk.crash_now();
        assert!(f.write_at(b"x", 0).is_err());
        assert!(disk.sync_dir(Path::new("/d")).is_err());
        assert!(
            disk.read(Path::new("/d/f")).is_ok(),
            "reads of a dead process do not matter"
        );
    }
}
