//! A test file system: the real one, recording every write and truncation, for tests that
//! check which writes the engine issues (whole pages, deletion in steps).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Mapped, VFile, Vfs};

/// The real file system, recording every `write_at` (file, offset, length).
#[derive(Debug, Default)]
pub struct RecordingVfs {
    pub writes: Arc<Mutex<Vec<(PathBuf, u64, usize)>>>,
    /// Every `set_len` (file, new length).
    pub truncations: Arc<Mutex<Vec<(PathBuf, u64)>>>,
}

struct RecordingFile {
    inner: Arc<dyn VFile>,
    path: PathBuf,
    writes: Arc<Mutex<Vec<(PathBuf, u64, usize)>>>,
    truncations: Arc<Mutex<Vec<(PathBuf, u64)>>>,
}

impl VFile for RecordingFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes
            .lock()
            .push((self.path.clone(), offset, buf.len()));
        self.inner.write_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.truncations.lock().push((self.path.clone(), len));
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.inner.sync_all()
    }
}

impl RecordingVfs {
    fn wrap(&self, path: &Path, inner: Arc<dyn VFile>) -> Arc<dyn VFile> {
        Arc::new(RecordingFile {
            inner,
            path: path.to_path_buf(),
            writes: self.writes.clone(),
            truncations: self.truncations.clone(),
        })
    }
}

impl Vfs for RecordingVfs {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        super::real().create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        super::real().list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        super::real().exists(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        super::real().read(path)
    }
    fn map(&self, path: &Path) -> std::io::Result<Mapped> {
        super::real().map(path)
    }
    fn create(&self, path: &Path, exclusive: bool) -> std::io::Result<Arc<dyn VFile>> {
        Ok(self.wrap(path, super::real().create(path, exclusive)?))
    }
    fn open_write(&self, path: &Path) -> std::io::Result<Arc<dyn VFile>> {
        Ok(self.wrap(path, super::real().open_write(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        super::real().rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        super::real().hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        super::real().remove(path)
    }
    fn link_count(&self, path: &Path) -> std::io::Result<u64> {
        super::real().link_count(path)
    }
    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        super::real().file_len(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        super::real().sync_dir(dir)
    }
    fn usage_percent(&self, path: &Path) -> std::io::Result<f64> {
        super::real().usage_percent(path)
    }
}
