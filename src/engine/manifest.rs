//! The manifest: which SSTables are live at which level, and how far the commit log has been
//! flushed into them.
//!
//! ```text
//! MANIFEST := magic "PDBMAN01" version:u32 len:u32 crc32c(json):u32 json
//! ```
//! Replaced atomically: write `MANIFEST.tmp`, fsync it, rename over `MANIFEST`, fsync the
//! directory. A crash at any point leaves either the old or the new manifest, never a mix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::sstable::TableMeta;
use super::vfs::Vfs;

const MAGIC: &[u8; 8] = b"PDBMAN01";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 4;
pub const FILE_NAME: &str = "MANIFEST";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Every commit-log record with sequence <= this is in a live SSTable.
    pub flushed_seq: u64,
    /// Next SSTable id to hand out.
    pub next_table_id: u64,
    /// Tables per level. L0: newest first (ranges may overlap). L1+: sorted by key, disjoint.
    pub levels: Vec<Vec<TableMeta>>,
    /// Tables taken out after corruption was found in them: their key ranges are refused
    /// (reads and writes) until a repair rebuilds them from other replicas.
    #[serde(default)]
    pub quarantined: Vec<Quarantined>,
}

/// A table taken out of service after corruption was found in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub table_id: u64,
    /// Internal keys `min_key..=max_key` of the table: answers for them may be missing.
    pub min_key: Vec<u8>,
    pub max_key: Vec<u8>,
    /// Ring hashes `min_hash..=max_hash` of its records (for the repair of the range).
    pub min_hash: u64,
    pub max_hash: u64,
    pub reason: String,
}

impl Quarantined {
    pub fn covers(&self, ikey: &[u8]) -> bool {
        self.min_key.as_slice() <= ikey && ikey <= self.max_key.as_slice()
    }
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads the manifest; `Ok(None)` when there is none yet (a new engine).
    pub fn load(vfs: &dyn Vfs, dir: &Path) -> Result<Option<Manifest>> {
        let path = Self::path(dir);
        let bytes = match vfs.read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io(format!("read {}", path.display()), e)),
        };
        let corrupt = |offset: u64, reason: &str| EngineError::Corrupted {
            path: path.clone(),
            offset,
            reason: reason.to_owned(),
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(corrupt(0, "bad manifest header"));
        }
        let word = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(a)
        };
        if word(8) != VERSION {
            return Err(corrupt(8, "unsupported manifest version"));
        }
        let len = word(12) as usize;
        let body = bytes
            .get(HEADER..HEADER + len)
            .filter(|_| bytes.len() == HEADER + len)
            .ok_or_else(|| corrupt(12, "manifest length does not match the file"))?;
        if crc32c::crc32c(body) != word(16) {
            return Err(EngineError::ChecksumFailed {
                path: path.clone(),
                offset: HEADER as u64,
            });
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| corrupt(HEADER as u64, &format!("manifest body: {e}")))
    }

    /// Atomically replaces the manifest in `dir`.
    pub fn store(&self, vfs: &dyn Vfs, dir: &Path) -> Result<()> {
        let body = serde_json::to_vec(self)
            .map_err(|e| EngineError::io("encode manifest", std::io::Error::other(e)))?;
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let tmp = dir.join("MANIFEST.tmp");
        let io = |what: &str, e| EngineError::io(format!("{what} {}", tmp.display()), e);
        let file = vfs.create(&tmp, false).map_err(|e| io("create", e))?;
        file.write_at(&bytes, 0).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        vfs.rename(&tmp, &Self::path(dir))
            .map_err(|e| io("rename", e))?;
        vfs.sync_dir(dir)
            .map_err(|e| EngineError::io(format!("fsync directory {}", dir.display()), e))
    }

    /// Ids of every live table.
    pub fn live_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels.iter().flatten().map(|t| t.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vfs::RealVfs;
    use std::fs;

    #[test]
    fn round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Manifest::load(&RealVfs, dir.path()).expect("load"), None);
        let m = Manifest {
            flushed_seq: 42,
            next_table_id: 7,
            levels: vec![vec![TableMeta::empty(3)], vec![]],
            quarantined: vec![Quarantined {
                table_id: 2,
                min_key: b"a".to_vec(),
                max_key: b"k".to_vec(),
                min_hash: 5,
                max_hash: 9,
                reason: "checksum".into(),
            }],
        };
        m.store(&RealVfs, dir.path()).expect("store");
        assert_eq!(Manifest::load(&RealVfs, dir.path()).expect("load"), Some(m));
        let path = Manifest::path(dir.path());
        let original = fs::read(&path).expect("read");
        for i in 0..original.len() {
            let mut b = original.clone();
            b[i] ^= 0x01;
            fs::write(&path, &b).expect("write");
            assert!(
                Manifest::load(&RealVfs, dir.path()).is_err(),
                "flip at {i} not detected"
            );
        }
        for cut in 0..original.len() {
            fs::write(&path, &original[..cut]).expect("write");
            assert!(
                Manifest::load(&RealVfs, dir.path()).is_err(),
                "cut at {cut} not detected"
            );
        }
    }
}
