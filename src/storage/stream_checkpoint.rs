//! Where a range stream resumes after its sender restarted: the last record the target
//! acknowledged, kept in `<data dir>/streams/<stream id>.ckpt`.
//!
//! A stream stores its checkpoint after every batch the target acknowledged (a small file,
//! written to a temporary name, synced, renamed, directory synced), so a sender that crashes
//! and is asked for the same stream again sends at most the one batch that was in flight.
//!
//! The coordinator driving the stream keeps a copy in the metadata store (from the stream's
//! status, each poll) and passes it back when it asks for the stream again: a sender that lost
//! its file (a wiped `streams` directory) resumes from that copy, at most what was acknowledged
//! between two polls behind ([`furthest`] takes whichever got further).
//!
//! Invariants: a checkpoint is used only by a stream with the same id, ranges and target (its
//! fingerprint); a damaged or foreign file is ignored (the stream starts over, which only
//! sends records twice; the target applies each once by the version rules). A stream scans
//! all its ranges in one pass in internal-key order, so "after this key" names exactly what
//! is left.

use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::ring::HashRange;
use crate::rpc::storage as pb;

const MAGIC: &[u8; 8] = b"PDBSCK1\n";
/// Longest stream id accepted (ids name files).
const MAX_ID_BYTES: usize = 200;

/// How far a stream got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Of the stream's ranges and target: a checkpoint of another stream is never used.
    pub fingerprint: u64,
    /// The internal key of the last acknowledged record.
    pub last_key: Vec<u8>,
    /// Totals sent so far (the stream's counters go on from there).
    pub keys: u64,
    pub bytes: u64,
}

/// Stream ids name files: 1..=200 letters, digits, '-', '_' or '.', not starting with '.'.
pub fn valid_stream_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Longest `last_key` taken from a coordinator's copy (an internal key is far shorter).
const MAX_WIRE_KEY_BYTES: usize = 64 << 10;

impl From<&Checkpoint> for pb::StreamCheckpoint {
    fn from(c: &Checkpoint) -> Self {
        pb::StreamCheckpoint {
            fingerprint: c.fingerprint,
            last_key: c.last_key.clone().into(),
            keys: c.keys,
            bytes: c.bytes,
        }
    }
}

/// Where stream `fingerprint` resumes: the furthest of its own checkpoint and the
/// coordinator's copy (`given`), counting only those of this stream. A stream scans in
/// internal-key order, so the larger `last_key` is further.
pub fn furthest(
    own: Option<Checkpoint>,
    given: Option<&pb::StreamCheckpoint>,
    fingerprint: u64,
) -> Option<Checkpoint> {
    let given = given
        .filter(|g| g.fingerprint == fingerprint && g.last_key.len() <= MAX_WIRE_KEY_BYTES)
        .map(|g| Checkpoint {
            fingerprint,
            last_key: g.last_key.to_vec(),
            keys: g.keys,
            bytes: g.bytes,
        });
    match (own, given) {
        (Some(own), Some(given)) if given.last_key > own.last_key => Some(given),
        (Some(own), _) => Some(own),
        (None, given) => given,
    }
}

/// The fingerprint of a stream's ranges and target.
pub fn fingerprint(ranges: &[HashRange], target: &str) -> u64 {
    let mut h = Xxh3::new();
    for r in ranges {
        h.update(&r.start.to_le_bytes());
        h.update(&r.end.to_le_bytes());
    }
    h.update(target.as_bytes());
    h.digest()
}

fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.ckpt"))
}

fn encode(c: &Checkpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + c.last_key.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&c.fingerprint.to_le_bytes());
    out.extend_from_slice(&c.keys.to_le_bytes());
    out.extend_from_slice(&c.bytes.to_le_bytes());
    out.extend_from_slice(&(c.last_key.len() as u32).to_le_bytes());
    out.extend_from_slice(&c.last_key);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(data: &[u8]) -> Option<Checkpoint> {
    let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let rest = body.strip_prefix(MAGIC.as_slice())?;
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(rest.get(at..at + 8)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?))
    };
    let key_len = u32_at(24)? as usize;
    let last_key = rest.get(28..28 + key_len)?.to_vec();
    if rest.len() != 28 + key_len {
        return None;
    }
    Some(Checkpoint {
        fingerprint: u64_at(0)?,
        keys: u64_at(8)?,
        bytes: u64_at(16)?,
        last_key,
    })
}

/// The checkpoint of stream `id` if one with this fingerprint is stored.
pub fn load(dir: &Path, id: &str, fingerprint: u64) -> Option<Checkpoint> {
    let data = std::fs::read(path(dir, id)).ok()?;
    decode(&data).filter(|c| c.fingerprint == fingerprint)
}

/// Stores the checkpoint of stream `id` durably (replacing the previous one).
pub fn store(dir: &Path, id: &str, c: &Checkpoint) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{id}.ckpt.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&encode(c))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path(dir, id))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Forgets stream `id`'s checkpoint (it ended).
pub fn remove(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(path(dir, id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_furthest_checkpoint_of_the_stream_wins() {
        let own = Checkpoint {
            fingerprint: 7,
            last_key: b"acme\0k42".to_vec(),
            keys: 1500,
            bytes: 10,
        };
        let wire = |fingerprint, key: &[u8], keys| pb::StreamCheckpoint {
            fingerprint,
            last_key: key.to_vec().into(),
            keys,
            bytes: 20,
        };
        let further = wire(7, b"acme\0k9", 2000);
        let behind = wire(7, b"acme\0k1", 500);
        let foreign = wire(8, b"zzz", 9000);
        assert_eq!(
            furthest(Some(own.clone()), Some(&further), 7).map(|c| c.keys),
            Some(2000)
        );
        assert_eq!(
            furthest(Some(own.clone()), Some(&behind), 7),
            Some(own.clone())
        );
        assert_eq!(furthest(Some(own.clone()), Some(&foreign), 7), Some(own));
        assert_eq!(furthest(None, Some(&foreign), 7), None, "another stream's");
        assert_eq!(furthest(None, Some(&behind), 7).map(|c| c.keys), Some(500));
        let huge = wire(7, &vec![1; MAX_WIRE_KEY_BYTES + 1], 1);
        assert_eq!(furthest(None, Some(&huge), 7), None, "refused");
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Checkpoint {
            fingerprint: 7,
            last_key: b"acme\0k42".to_vec(),
            keys: 1500,
            bytes: 1 << 20,
        };
        store(dir.path(), "add-1-s1-s4", &c).expect("store");
        assert_eq!(load(dir.path(), "add-1-s1-s4", 7), Some(c.clone()));
        assert_eq!(load(dir.path(), "add-1-s1-s4", 8), None, "another stream's");
        let mut bytes = encode(&c);
        bytes[20] ^= 1;
        assert_eq!(decode(&bytes), None, "damaged");
        assert_eq!(decode(&encode(&c)[..10]), None, "short");
        remove(dir.path(), "add-1-s1-s4");
        assert_eq!(load(dir.path(), "add-1-s1-s4", 7), None);
    }

    #[test]
    fn stream_ids_are_file_names() {
        assert!(valid_stream_id("add-0b6f-s1-s4"));
        for bad in ["", "../x", ".hidden", "a/b", "a b", &"x".repeat(201)] {
            assert!(!valid_stream_id(bad), "{bad:?}");
        }
    }
}
