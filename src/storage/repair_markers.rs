//! Repair markers: a storage node's durable record of keys another replica missed without a
//! hint to bring them (SEMANTICS.md, "Trust boundaries": a coordinator that cannot keep a hint,
//! because its queue is full, its metadata store is down or it is stopping, records a marker on
//! the other replicas of the key instead). Anti-entropy repairs these keys first.
//!
//! Format of `<data dir>/repair-markers.log`: frames of `len: u32 LE | crc32c(payload): u32 LE |
//! payload` where the payload is one protobuf `RepairMarker`. Appends are fsynced before the
//! RPC answers. On open, frames are counted up to the first frame that is cut short or fails
//! its checksum (a torn tail from a crash mid-append); the file is cut there so later appends
//! follow the last whole frame.
//!
//! Invariant: every marker acknowledged is in a whole frame of the file, and `pending()` is the
//! number of whole frames.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use prost::Message;

use crate::rpc::storage::RepairMarker;

pub const FILE_NAME: &str = "repair-markers.log";

pub struct RepairMarkerLog {
    path: PathBuf,
    /// The file, and the number of whole frames in it.
    file: Mutex<(File, u64)>,
}

impl RepairMarkerLog {
    /// Opens (or creates) the log in `dir`, cutting a torn tail.
    pub fn open(dir: &Path) -> std::io::Result<RepairMarkerLog> {
        let path = dir.join(FILE_NAME);
        // Append mode: every write lands at the end, also after a torn tail was cut.
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (markers, whole) = parse(&bytes);
        if whole < bytes.len() {
            tracing::warn!(file = %path.display(), cut = bytes.len() - whole, "repair markers: torn tail cut");
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        Ok(RepairMarkerLog {
            path,
            file: Mutex::new((file, markers.len() as u64)),
        })
    }

    /// Appends `markers` and fsyncs; returns how many the node holds now.
    pub fn append(&self, markers: &[RepairMarker]) -> std::io::Result<u64> {
        let frames = frames(markers.iter());
        let mut guard = self.file.lock();
        let (file, count) = &mut *guard;
        file.write_all(&frames)?;
        file.sync_data()?;
        *count += markers.len() as u64;
        metrics::gauge!("pairdb_repair_markers_pending").set(*count as f64);
        Ok(*count)
    }

    /// Markers held.
    pub fn pending(&self) -> u64 {
        self.file.lock().1
    }

    /// Removes every marker equal to one of `done` (the targeted repair fixed them): the log is
    /// rewritten without them (temp file, fsync, rename, fsync of the directory), so a crash
    /// leaves the old log or the new one. Returns how many the node holds now.
    pub fn remove(&self, done: &[RepairMarker]) -> std::io::Result<u64> {
        let mut guard = self.file.lock();
        let (markers, _) = parse(&std::fs::read(&self.path)?);
        let kept: Vec<&RepairMarker> = markers.iter().filter(|m| !done.contains(m)).collect();
        if kept.len() == markers.len() {
            return Ok(guard.1);
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&frames(kept.iter().copied()))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        *guard = (file, kept.len() as u64);
        metrics::gauge!("pairdb_repair_markers_pending").set(guard.1 as f64);
        Ok(guard.1)
    }

    /// Every marker in the log (for the repair that consumes them, and tests).
    pub fn read_all(&self) -> std::io::Result<Vec<RepairMarker>> {
        let _guard = self.file.lock();
        Ok(parse(&std::fs::read(&self.path)?).0)
    }
}

/// The frames of `markers`, in order.
fn frames<'a>(markers: impl Iterator<Item = &'a RepairMarker>) -> Vec<u8> {
    let mut frames = Vec::new();
    for marker in markers {
        let payload = marker.encode_to_vec();
        frames.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frames.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frames.extend_from_slice(&payload);
    }
    frames
}

/// The markers of the whole frames at the start of `bytes`, and where they end.
fn parse(bytes: &[u8]) -> (Vec<RepairMarker>, usize) {
    let mut markers = Vec::new();
    let mut at = 0;
    while let Some((len, crc)) = bytes
        .get(at..)
        .and_then(<[u8]>::split_first_chunk::<4>)
        .and_then(|(len, rest)| Some((len, rest.first_chunk::<4>()?)))
    {
        let (len, crc) = (u32::from_le_bytes(*len) as usize, u32::from_le_bytes(*crc));
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Ok(marker) = RepairMarker::decode(payload) else {
            break;
        };
        markers.push(marker);
        at += 8 + len;
    }
    (markers, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(i: u8) -> RepairMarker {
        RepairMarker {
            tenant_id: "acme".into(),
            key: vec![b'k', i].into(),
            missed_node: "s3".into(),
            version: None,
        }
    }

    #[test]
    fn markers_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RepairMarkerLog::open(dir.path()).expect("open");
        assert_eq!(log.append(&[marker(1), marker(2)]).expect("append"), 2);
        drop(log);
        // A crash mid-append leaves half a frame.
        let path = dir.path().join(FILE_NAME);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&[40, 0, 0, 0, 1, 2]).expect("torn");
        drop(file);
        let log = RepairMarkerLog::open(dir.path()).expect("reopen");
        assert_eq!(log.pending(), 2);
        assert_eq!(log.append(&[marker(3)]).expect("append"), 3);
        let all = log.read_all().expect("read");
        assert_eq!(all, vec![marker(1), marker(2), marker(3)]);
        // Removing rewrites the log without them; appends follow, and a reopen agrees.
        assert_eq!(log.remove(&[marker(2)]).expect("remove"), 2);
        assert_eq!(log.append(&[marker(4)]).expect("append"), 3);
        drop(log);
        let log = RepairMarkerLog::open(dir.path()).expect("reopen");
        assert_eq!(
            log.read_all().expect("read"),
            vec![marker(1), marker(3), marker(4)]
        );
    }
}
