//! The manifest: which SSTables are live at which level, and how far the commit log has been
//! flushed into them.
//!
//! ```text
//! MANIFEST := magic "PDBMAN01" version:u32 len:u32 crc32c(json):u32 json
//! ```
//! Replaced atomically: write `MANIFEST.tmp`, fsync it, rename over `MANIFEST`, fsync the
//! directory. A crash at any point leaves either the old or the new manifest, never a mix.
//!
//! Kept twice: every change is stored as `MANIFEST`, then the same bytes as `MANIFEST.mirror`
//! (each atomically as above), and the engine deletes a table or a log segment only after both
//! are stored. So whichever copy reads back intact lists only files that still exist, and
//! replaying the log from its `flushed_seq` loses nothing: a bit flip in one copy costs nothing
//! but a report ([`Loaded::restored_from_mirror`]). Load order: `MANIFEST` when intact (the
//! mirror is rewritten when it differs: a crash between the two stores, or damage), else the
//! mirror (and `MANIFEST` is rewritten from it). Both damaged, or `MANIFEST` damaged with no
//! mirror (a data dir from before the mirror), refuses to open.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::sstable::TableMeta;
use super::vfs::Vfs;

const MAGIC: &[u8; 8] = b"PDBMAN01";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 4;
pub const FILE_NAME: &str = "MANIFEST";
pub const MIRROR_NAME: &str = "MANIFEST.mirror";

/// What [`Manifest::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// `None` for a new engine (no manifest yet).
    pub manifest: Option<Manifest>,
    /// Set when `MANIFEST` was damaged or missing and the mirror was used: why.
    pub restored_from_mirror: Option<String>,
    /// Set when the mirror was damaged (and rewritten from `MANIFEST`): why.
    pub mirror_damaged: Option<String>,
}

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

    /// Reads the manifest (see the module doc for which copy), and makes both copies equal
    /// again.
    pub fn load(vfs: &dyn Vfs, dir: &Path) -> Result<Loaded> {
        let primary = Self::load_copy(vfs, &Self::path(dir));
        let mirror = Self::load_copy(vfs, &dir.join(MIRROR_NAME));
        let mut loaded = Loaded {
            manifest: None,
            restored_from_mirror: None,
            mirror_damaged: None,
        };
        match (primary, mirror) {
            (Ok(None), Ok(None)) => return Ok(loaded),
            (Ok(Some(p)), Ok(m)) => {
                if m.as_ref() != Some(&p) {
                    p.store_copy(vfs, dir, MIRROR_NAME)?;
                }
                loaded.manifest = Some(p);
            }
            (Ok(Some(p)), Err(e)) => {
                p.store_copy(vfs, dir, MIRROR_NAME)?;
                loaded.mirror_damaged = Some(e.to_string());
                loaded.manifest = Some(p);
            }
            (Ok(None), Ok(Some(m))) => {
                m.store_copy(vfs, dir, FILE_NAME)?;
                loaded.restored_from_mirror = Some(format!("{FILE_NAME} is missing"));
                loaded.manifest = Some(m);
            }
            (Err(e), Ok(Some(m))) => {
                m.store_copy(vfs, dir, FILE_NAME)?;
                loaded.restored_from_mirror = Some(e.to_string());
                loaded.manifest = Some(m);
            }
            (Err(e), Ok(None)) => return Err(e),
            (Ok(None), Err(e)) => return Err(e),
            (Err(e), Err(m)) => {
                return Err(EngineError::Corrupted {
                    path: Self::path(dir),
                    offset: 0,
                    reason: format!(
                        "both copies of the manifest are damaged ({e}; {m}): the node cannot \
                         tell which tables are live; replace it from its replicas"
                    ),
                });
            }
        }
        Ok(loaded)
    }

    /// Reads one copy; `Ok(None)` when the file does not exist.
    fn load_copy(vfs: &dyn Vfs, path: &Path) -> Result<Option<Manifest>> {
        let bytes = match vfs.read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io(format!("read {}", path.display()), e)),
        };
        let corrupt = |offset: u64, reason: &str| EngineError::Corrupted {
            path: path.to_path_buf(),
            offset,
            reason: reason.to_owned(),
        };
        if bytes.len() < HEADER || bytes.get(..8) != Some(&MAGIC[..]) {
            return Err(corrupt(0, "bad manifest header"));
        }
        // Inside the HEADER bytes checked above.
        let word = |at: usize| {
            bytes
                .get(at..)
                .and_then(<[u8]>::first_chunk::<4>)
                .map_or(0, |w| u32::from_le_bytes(*w))
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
                path: path.to_path_buf(),
                offset: HEADER as u64,
            });
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| corrupt(HEADER as u64, &format!("manifest body: {e}")))
    }

    /// Atomically replaces both copies of the manifest in `dir`, `MANIFEST` first.
    pub fn store(&self, vfs: &dyn Vfs, dir: &Path) -> Result<()> {
        self.store_copy(vfs, dir, FILE_NAME)?;
        self.store_copy(vfs, dir, MIRROR_NAME)
    }

    /// Atomically replaces the copy `name`: `<name>.tmp`, fsync, rename, fsync the directory.
    fn store_copy(&self, vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<()> {
        let body = serde_json::to_vec(self)
            .map_err(|e| EngineError::io("encode manifest", std::io::Error::other(e)))?;
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let tmp = dir.join(format!("{name}.tmp"));
        let io = |what: &str, e| EngineError::io(format!("{what} {}", tmp.display()), e);
        let file = vfs.create(&tmp, false).map_err(|e| io("create", e))?;
        file.write_at(&bytes, 0).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        vfs.rename(&tmp, &dir.join(name))
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

    fn sample() -> Manifest {
        Manifest {
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
        }
    }

    fn clean(m: &Manifest) -> Loaded {
        Loaded {
            manifest: Some(m.clone()),
            restored_from_mirror: None,
            mirror_damaged: None,
        }
    }

    #[test]
    fn round_trips_in_both_copies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded = Manifest::load(&RealVfs, dir.path()).expect("load");
        assert_eq!(loaded.manifest, None);
        let m = sample();
        m.store(&RealVfs, dir.path()).expect("store");
        assert_eq!(
            Manifest::load(&RealVfs, dir.path()).expect("load"),
            clean(&m)
        );
        assert_eq!(
            fs::read(Manifest::path(dir.path())).expect("read"),
            fs::read(dir.path().join(MIRROR_NAME)).expect("read mirror")
        );
    }

    /// Every single-byte flip and every cut of either copy is detected; the other copy is used
    /// and both are equal again afterwards.
    #[test]
    fn damage_to_one_copy_is_detected_and_repaired_from_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        m.store(&RealVfs, dir.path()).expect("store");
        let primary = Manifest::path(dir.path());
        let mirror = dir.path().join(MIRROR_NAME);
        let original = fs::read(&primary).expect("read");
        let damaged_images = (0..original.len())
            .map(|i| {
                let mut b = original.clone();
                b[i] ^= 0x01;
                b
            })
            .chain((0..original.len()).map(|cut| original[..cut].to_vec()));
        for (n, image) in damaged_images.enumerate() {
            fs::write(&primary, &image).expect("damage");
            let loaded = Manifest::load(&RealVfs, dir.path()).expect("load from the mirror");
            assert_eq!(loaded.manifest.as_ref(), Some(&m), "image {n}");
            assert!(
                loaded.restored_from_mirror.is_some(),
                "image {n} not reported"
            );
            assert_eq!(fs::read(&primary).expect("read"), original, "image {n}");

            fs::write(&mirror, &image).expect("damage the mirror");
            let loaded = Manifest::load(&RealVfs, dir.path()).expect("load");
            assert_eq!(loaded.manifest.as_ref(), Some(&m), "mirror image {n}");
            assert!(
                loaded.mirror_damaged.is_some(),
                "mirror image {n} not reported"
            );
            assert_eq!(
                fs::read(&mirror).expect("read"),
                original,
                "mirror image {n}"
            );
        }
    }

    #[test]
    fn both_copies_damaged_refuse_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        sample().store(&RealVfs, dir.path()).expect("store");
        for name in [FILE_NAME, MIRROR_NAME] {
            let path = dir.path().join(name);
            let mut b = fs::read(&path).expect("read");
            b[30] ^= 0x40;
            fs::write(&path, &b).expect("damage");
        }
        let err = Manifest::load(&RealVfs, dir.path()).expect_err("must refuse");
        assert!(err.to_string().contains("both copies"), "{err}");
    }

    /// A data dir from before the mirror: `MANIFEST` alone is read, and the mirror is written.
    #[test]
    fn a_manifest_without_mirror_gets_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        m.store(&RealVfs, dir.path()).expect("store");
        fs::remove_file(dir.path().join(MIRROR_NAME)).expect("remove mirror");
        assert_eq!(
            Manifest::load(&RealVfs, dir.path()).expect("load"),
            clean(&m)
        );
        assert!(dir.path().join(MIRROR_NAME).exists());
    }
}
