//! The commit log: append-only segments of CRC32C-framed records, with group commit.
//!
//! ```text
//! segment := magic "PDBWAL02" frame*          file name: {segment_number:020}.log
//! frame   := payload_len:u32 crc:u32 seq:u64 durable:u64 payload
//!            crc = crc32c(seq_le ++ durable_le ++ payload)
//! ```
//! `durable` is the highest sequence that was synced when the frame was appended. Segments of
//! the first format (`PDBWAL01`, frames without `durable`) are still read.
//! Invariants:
//! - Sequence numbers are assigned in append order, strictly increasing across segments.
//! - A record is acknowledged only when `synced_seq >= seq` (sync = always): group commit makes
//!   one waiting writer the leader, which writes everything appended so far and fsyncs once for
//!   all of them, then wakes every waiter at once; appends continue while it syncs, and the
//!   writers that arrived meanwhile form the next batch.
//! - Rotation syncs the old segment completely before the new one takes writes, so an old
//!   segment is never torn; only the newest segment can end in a torn frame.
//! - Zeroed ahead: the active segment is kept filled with zeros (written and synced) up to
//!   `ZERO_AHEAD` bytes past its last frame, and frames are written over those zeros. An
//!   fdatasync then has no file size or block allocation to commit, only data: on ext4 that
//!   skips the journal commit every growing append needs, whose checkpoints stalled every
//!   syncing process on the disk for ~60 ms at once. Zeros after the last frame are the
//!   unused end of a segment, not a torn frame (a zeroed header is never a valid frame:
//!   sequences start at 1); a sealed or cleanly closed segment is trimmed to its frames.
//! - Recycled: a released segment (every record in it flushed, at least half a segment
//!   long) is kept as a spare, renamed `{last_seq}.spare` after the sequence of its last
//!   record (at most [`MAX_SPARES`]; the log's sequences continue above it even after a
//!   restart), and the next new segment is that file renamed
//!   back to a segment name, its magic rewritten. Its blocks are already allocated and
//!   written, so frames go over the old segment's frames with nothing to zero first: zeroing
//!   ahead doubled the log's disk writes (each byte written as a zero, then as a frame).
//!   Old frames never replay: every sequence in them is below every sequence written after
//!   the release, so the scan stops at the first of them (`sequence N after M`, below) as it
//!   stops at a torn frame, and they never vouch for a lost frame (that needs a sequence above
//!   the last valid one). Until the new frames pass the old file's size, zeroing ahead is not
//!   needed; past it, it works as above. A range drop rotates to a new file (also out of a
//!   recycled segment that holds no frame yet) and removes the spares, so no log file keeps
//!   its records' frames; a snapshot restore removes the spares with the log.
//! - Whole pages: every write to a segment (after its magic) starts and ends on a page of the
//!   page cache. The frames of the last, partly filled page are kept in memory and written
//!   again with the next frames, the page's rest as zeros. A write that covers a page only in
//!   part needs the page in memory: under memory pressure the kernel evicts the clean, zeroed
//!   pages ahead of the frames, and such a write then reads the page from the device first,
//!   behind whatever the device is writing, while the log's lock is held (reads of 40 ms and
//!   more under the larger-than-memory benchmark, with every writer waiting). Rewriting
//!   frames with the same bytes changes nothing on the device: the kernel writes whole pages
//!   back anyway.
//! - After an fsync error the log refuses every further append (the kernel may have dropped the
//!   dirty pages: retrying fsync would lie).
//! - Recovery follows one rule: what was synced before the last acknowledgement is never lost
//!   and never skipped; anything after the last sync may be cut. So it accepts every state a
//!   crash or power loss can leave, and only those:
//!   - a segment shorter than its magic (a crash while creating it, in any segment, not only
//!     the newest) holds no record: it is read as empty;
//!   - zeros from a frame boundary to the end are the unused end of the segment;
//!   - a bad frame in the newest segment (cut short, zeroed, torn, checksum) is cut together
//!     with everything after it, as long as no later valid frame claims (by its `durable`)
//!     that a record at or after the damage had been synced: then the damage lost
//!     acknowledged records, and opening fails naming the file and offset, unless
//!     `skip_corrupt` drops the rest of that segment. Unsynced frames may reach the disk in any
//!     order over the zeroed end (zeros, then later frames): those never claim more than what
//!     was synced, so they are cut. Limitation: damage to the very last synced frames that no
//!     later frame vouches for reads like a torn tail.
//!   - any bad frame in an older segment is corruption (rotation syncs a segment in full
//!     before the next one takes writes). `PDBWAL01` segments, which carry no `durable`, treat
//!     any valid frame after the damage as proof of corruption, as before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::options::SyncMode;

use bytes::Bytes;

use super::codec::{decode_log_record, decode_log_record_in, encode_log_record};
use super::error::{EngineError, Result};
use super::types::Record;
use super::vfs::{self, Mapped, VFile, Vfs};

const MAGIC: &[u8; 8] = b"PDBWAL02";
/// The first format: frames without the `durable` field.
const MAGIC_V1: &[u8; 8] = b"PDBWAL01";
const FRAME_HEADER: usize = 24;
const FRAME_HEADER_V1: usize = 16;
/// Largest payload a frame may claim (a 10 MiB value plus key and clock, with room).
const MAX_PAYLOAD: usize = 11 * 1024 * 1024;
/// Buffered bytes past which an append writes them to the file even without a sync.
const BUFFER_FLUSH_BYTES: usize = 1 << 20;
/// Zeros kept written past the last frame of the active segment (see the module docs).
const ZERO_AHEAD: u64 = 1 << 20;
/// Zeros are topped up to `ZERO_AHEAD` when fewer than this many are left.
const ZERO_AHEAD_LOW: u64 = 256 << 10;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
/// Released segments kept to become later segments (see the module docs).
const MAX_SPARES: usize = 1;
/// Extension of a spare: not a segment name, so recovery never reads one.
const SPARE_SUFFIX: &str = "spare";

/// A released segment kept for reuse: its path (`{last_seq:020}.spare`), size and the
/// sequence of its last record, below every sequence the log appends from then on.
struct Spare {
    path: PathBuf,
    bytes: u64,
    last_seq: u64,
}

struct Segment {
    path: PathBuf,
    last_seq: u64,
    /// Its size once sealed (what a deletion frees).
    bytes: u64,
    /// The mapping a replay read it through, alive while a replayed key or value points
    /// into it ([`decode_log_record_in`]); the file is not deleted before it is gone.
    replayed: Weak<Mapped>,
}

/// A replayed segment's mapping as the owner of the `Bytes` that slice it.
struct SegmentBytes(Arc<Mapped>);

impl AsRef<[u8]> for SegmentBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

struct Writer {
    file: Arc<dyn VFile>,
    path: PathBuf,
    /// Number of the current segment (file names count up from 1).
    number: u64,
    /// Bytes of frames in the file (not counting what `buf` holds past it): where the next
    /// frame goes.
    file_len: u64,
    /// Where `buf` starts in the file: the start of the page holding `file_len`. `buf` holds
    /// the file's bytes from there to `file_len` (already written), then the frames appended
    /// since (not yet written).
    buf_start: u64,
    /// The file's blocks are written from `file_len` up to here (when larger): zeros, or a
    /// recycled segment's old frames. A write below it changes neither the file's size nor
    /// its allocation, so an fdatasync has only data to write.
    prepared_to: u64,
    buf: Vec<u8>,
    next_seq: u64,
    /// The page cache's page size: the unit of every write after the magic.
    page: u64,
    /// Older segments, oldest first, kept until everything in them is flushed.
    sealed: Vec<Segment>,
    /// Released segments waiting to become the next segments.
    spares: Vec<Spare>,
    /// Whether the active segment is a recycled one (old frames past its own).
    recycled: bool,
}

impl Writer {
    /// A writer for a segment that holds only its magic, its blocks written up to
    /// `prepared_to` ([`next_segment`]: more than 0 only for a recycled one).
    fn at_new_segment(&mut self, prepared_to: u64) {
        self.file_len = MAGIC.len() as u64;
        self.prepared_to = prepared_to;
        self.recycled = prepared_to > 0;
        self.buf_start = 0;
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
    }

    /// End of the buffered frames in the file.
    fn end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Bytes appended and not yet written.
    fn pending(&self) -> u64 {
        self.end() - self.file_len
    }
}

/// What recovery saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Torn tails cut from the newest segment.
    pub torn_tails: u64,
    /// Corrupt frames skipped with `skip_corrupt` (0 otherwise: corruption fails the open).
    pub corrupt_skipped: u64,
}

/// A group-commit leader's turn. However it ends (an error, or a panic unwinding through the
/// fsync), no leader is syncing any more, a new round starts, and every waiter wakes to find
/// its record durable or to take the next turn: none sleeps on a turn that will never end.
struct LeaderTurn<'a>(&'a CommitLog);

impl Drop for LeaderTurn<'_> {
    fn drop(&mut self) {
        self.0.syncing.store(false, Ordering::Release);
        self.0.sync_rounds.fetch_add(1, Ordering::AcqRel);
        atomic_wait::wake_all(&self.0.sync_rounds);
    }
}

/// The commit log of one engine.
pub struct CommitLog {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    sync: SyncMode,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    /// Group commit: whether a leader is syncing now.
    syncing: AtomicBool,
    /// Group commit: bumped after every sync; waiters sleep on it (a futex), and all wake at
    /// once to check `synced_seq` each on its own, none queued behind another for a lock.
    sync_rounds: AtomicU32,
    synced_seq: AtomicU64,
    /// The sequence of the last record appended (durable or not).
    appended_seq: AtomicU64,
    failed: AtomicBool,
    syncs: AtomicU64,
    longest_sync_micros: AtomicU64,
    /// Recent fsync times against their baseline (what compaction yields to).
    latency: super::sync_latency::SyncLatency,
}

fn segment_name(number: u64) -> String {
    format!("{number:020}.log")
}

fn sync_dir(vfs: &dyn Vfs, dir: &Path) -> Result<()> {
    vfs.sync_dir(dir)
        .map_err(|e| EngineError::io(format!("fsync directory {}", dir.display()), e))
}

fn log_err(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::CommitLog {
        path: path.to_path_buf(),
        source,
    }
}

fn create_segment(vfs: &dyn Vfs, dir: &Path, number: u64) -> Result<(Arc<dyn VFile>, PathBuf)> {
    let path = dir.join(segment_name(number));
    let file = vfs.create(&path, true).map_err(|e| log_err(&path, e))?;
    file.write_at(MAGIC, 0).map_err(|e| log_err(&path, e))?;
    file.sync_all().map_err(|e| log_err(&path, e))?;
    sync_dir(vfs, dir)?;
    Ok((file, path))
}

/// Segment `number`: a spare renamed to its name when there is one (its old frames stay
/// until written over; see the module docs), else a new file. The name is durable before
/// the segment takes a frame. Returns the file, its path and how far its blocks are already
/// written (the spare's size, down to a page; 0 for a new file).
fn next_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    number: u64,
    spare: Option<Spare>,
    page: u64,
) -> Result<(Arc<dyn VFile>, PathBuf, u64)> {
    let Some(spare) = spare else {
        let (file, path) = create_segment(vfs, dir, number)?;
        return Ok((file, path, 0));
    };
    let path = dir.join(segment_name(number));
    vfs.rename(&spare.path, &path)
        .map_err(|e| log_err(&spare.path, e))?;
    let file = vfs.open_write(&path).map_err(|e| log_err(&path, e))?;
    file.write_at(MAGIC, 0).map_err(|e| log_err(&path, e))?;
    file.sync_data().map_err(|e| log_err(&path, e))?;
    sync_dir(vfs, dir)?;
    Ok((file, path, spare.bytes - spare.bytes % page))
}

/// Extension of a released segment on its way out (not a segment name: recovery removes it).
const DELETING_SUFFIX: &str = "deleting";

/// Spares among the log directory's `entries`, largest first: up to [`MAX_SPARES`] are kept
/// (and returned), the rest removed, as is a spare whose name carries no sequence.
fn adopt_spares(vfs: &dyn Vfs, dir: &Path, entries: &[PathBuf]) -> Result<Vec<Spare>> {
    let mut spares: Vec<Spare> = Vec::new();
    let mut doomed: Vec<&PathBuf> = Vec::new();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some(SPARE_SUFFIX) {
            continue;
        }
        let last_seq = path
            .file_stem()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok());
        match last_seq {
            Some(last_seq) => spares.push(Spare {
                path: path.clone(),
                bytes: vfs.file_len(path).map_err(|e| log_err(path, e))?,
                last_seq,
            }),
            None => doomed.push(path),
        }
    }
    spares.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    let extra = spares.split_off(spares.len().min(MAX_SPARES));
    doomed.extend(extra.iter().map(|s| &s.path));
    if !doomed.is_empty() {
        for path in doomed {
            vfs.remove(path).map_err(|e| log_err(path, e))?;
        }
        sync_dir(vfs, dir)?;
    }
    Ok(spares)
}

/// Removes released segments a crash left on their way out, among the log directory's
/// `entries`.
fn remove_leftover_deletions(vfs: &dyn Vfs, dir: &Path, entries: &[PathBuf]) -> Result<()> {
    let mut removed = false;
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) == Some(DELETING_SUFFIX) {
            vfs.remove(path).map_err(|e| log_err(path, e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(vfs, dir)?;
    }
    Ok(())
}

/// How one segment's scan ended.
enum ScanEnd {
    Clean,
    /// Bad frame at `offset` that nothing valid follows.
    Torn {
        offset: u64,
        reason: String,
    },
    /// Bad frame at `offset` followed by a valid frame.
    Corrupt {
        offset: u64,
        reason: String,
    },
}

/// A segment's frame format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `PDBWAL01`: no `durable` field.
    V1,
    V2,
}

impl Format {
    fn header(self) -> usize {
        match self {
            Format::V1 => FRAME_HEADER_V1,
            Format::V2 => FRAME_HEADER,
        }
    }
}

/// One valid frame.
struct Frame<'a> {
    seq: u64,
    /// What was synced when it was appended (`None` in the first format).
    durable: Option<u64>,
    payload: &'a [u8],
    /// Offset of the next frame.
    next: usize,
}

/// Why the bytes at an offset are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum FrameError {
    #[error("frame header cut short")]
    HeaderCut,
    #[error("frame claims {0} bytes")]
    Oversized(usize),
    #[error("implausible sequence")]
    ImplausibleSequence,
    #[error("frame payload cut short")]
    PayloadCut,
    #[error("checksum mismatch")]
    ChecksumMismatch,
}

/// Parses the frame at `pos`; `Err` says why it is bad.
/// With `min_seq`, frames whose sequence is below it are rejected before the checksum is
/// computed (a cheap filter when probing arbitrary offsets).
fn parse_frame(
    data: &[u8],
    pos: usize,
    format: Format,
    min_seq: Option<u64>,
) -> std::result::Result<Frame<'_>, FrameError> {
    let header_len = format.header();
    let header = data
        .get(pos..pos + header_len)
        .ok_or(FrameError::HeaderCut)?;
    // len u32, crc u32, seq u64, then (V2) durable u64. Decoded from fixed-size arrays: this
    // runs at every byte offset of a damaged segment when looking for later frames.
    let fixed: &[u8; FRAME_HEADER_V1] = header.first_chunk().ok_or(FrameError::HeaderCut)?;
    let [
        l0,
        l1,
        l2,
        l3,
        c0,
        c1,
        c2,
        c3,
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
    ] = *fixed;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let durable = match format {
        Format::V2 => {
            let tail: &[u8; 8] = header
                .get(FRAME_HEADER_V1..)
                .and_then(<[u8]>::first_chunk)
                .ok_or(FrameError::HeaderCut)?;
            Some(u64::from_le_bytes(*tail))
        }
        Format::V1 => None,
    };
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized(len));
    }
    if let Some(min) = min_seq {
        // A real frame at a later offset has a sequence above `min` and not absurdly far above.
        if seq < min || seq - min > data.len() as u64 {
            return Err(FrameError::ImplausibleSequence);
        }
    }
    let payload = data
        .get(pos + header_len..pos + header_len + len)
        .ok_or(FrameError::PayloadCut)?;
    // The checksum covers everything in the header after itself, then the payload.
    let after_crc = header.get(8..).ok_or(FrameError::HeaderCut)?;
    let actual = crc32c::crc32c_append(crc32c::crc32c(after_crc), payload);
    if actual != crc {
        return Err(FrameError::ChecksumMismatch);
    }
    Ok(Frame {
        seq,
        durable,
        payload,
        next: pos + header_len + len,
    })
}

/// Scans one segment's frames, calling `apply` for each valid record after `after_seq`.
fn scan_segment(
    path: &Path,
    data: &Bytes,
    after_seq: u64,
    last_seq: &mut u64,
    stats: &mut ReplayStats,
    apply: &mut dyn FnMut(u64, Record),
) -> Result<ScanEnd> {
    if data.len() < MAGIC.len() {
        // A crash while creating the segment (before its magic was synced): nothing in it was
        // ever written, let alone acknowledged.
        if MAGIC.starts_with(data) || MAGIC_V1.starts_with(data) || data.iter().all(|&b| b == 0) {
            return Ok(ScanEnd::Clean);
        }
        return Err(EngineError::Corrupted {
            path: path.to_path_buf(),
            offset: 0,
            reason: "not a pairdb commit-log segment (bad magic)".to_owned(),
        });
    }
    let format = match data.get(..MAGIC.len()).unwrap_or_default() {
        m if m == MAGIC => Format::V2,
        m if m == MAGIC_V1 => Format::V1,
        _ => {
            return Err(EngineError::Corrupted {
                path: path.to_path_buf(),
                offset: 0,
                reason: "not a pairdb commit-log segment (bad magic)".to_owned(),
            });
        }
    };
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let reason = match parse_frame(data, pos, format, None) {
            Ok(f) if f.seq <= *last_seq => format!("sequence {} after {last_seq}", f.seq),
            Ok(f) => match decode_log_record_in(data, f.payload) {
                Ok(record) => {
                    *last_seq = f.seq;
                    if f.seq > after_seq {
                        stats.records += 1;
                        stats.bytes += (f.next - pos) as u64;
                        apply(f.seq, record);
                    }
                    pos = f.next;
                    continue;
                }
                Err(e) => format!("undecodable record: {e}"),
            },
            Err(reason) => reason.to_string(),
        };
        if data.get(pos..).unwrap_or_default().iter().all(|&b| b == 0) {
            // The zeroed, never written end of the segment.
            return Ok(ScanEnd::Clean);
        }
        // Torn or corrupt? Corrupt when a later valid frame shows that a record at or after
        // the damage had been synced (first format: any later valid frame).
        let lost_synced = (pos + 1..data.len()).any(|p| {
            match parse_frame(data, p, format, Some(*last_seq + 1)) {
                Ok(f) if decode_log_record(f.payload).is_ok() => {
                    f.durable.is_none_or(|durable| durable > *last_seq)
                }
                _ => false,
            }
        });
        let offset = pos as u64;
        return Ok(if lost_synced {
            ScanEnd::Corrupt { offset, reason }
        } else {
            ScanEnd::Torn { offset, reason }
        });
    }
    Ok(ScanEnd::Clean)
}

/// A segment's bytes for replay: mapped (no copy out of the page cache, no fresh buffer to
/// fault in), read when it cannot be (an empty file cannot be mapped). The replayed records'
/// keys and values are slices of it (no copy either).
fn map_segment(vfs: &dyn Vfs, path: &Path) -> Result<Mapped> {
    match vfs.map(path) {
        Ok(mapped) => {
            mapped.advise_sequential();
            Ok(mapped)
        }
        Err(_) => vfs
            .read(path)
            .map(|bytes| Mapped::Bytes(bytes.into()))
            .map_err(|e| log_err(path, e)),
    }
}

/// The segments among the log directory's `entries` (by their names), oldest first.
fn segments_among(entries: Vec<PathBuf>) -> Vec<(u64, PathBuf)> {
    let mut segments = Vec::new();
    for path in entries {
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            segments.push((first, path));
        }
    }
    segments.sort();
    segments
}

/// How a commit log is opened.
#[derive(Clone)]
pub struct LogOptions {
    pub vfs: Arc<dyn Vfs>,
    pub sync: SyncMode,
    /// Segment size before rotation.
    pub segment_bytes: u64,
    /// Replay only records above this sequence (the manifest's flushed sequence).
    pub after_seq: u64,
    /// Drop the rest of a segment that is corrupt in the middle instead of refusing to open.
    pub skip_corrupt: bool,
}

impl CommitLog {
    /// Opens the log in `dir`, replaying every record with a sequence above
    /// `options.after_seq` into `apply`, then starts a fresh segment for new appends.
    pub fn open(
        dir: &Path,
        options: LogOptions,
        apply: &mut dyn FnMut(u64, Record),
    ) -> Result<(CommitLog, ReplayStats)> {
        let LogOptions {
            vfs,
            sync,
            segment_bytes,
            after_seq,
            skip_corrupt,
        } = options;
        vfs.create_dir_all(dir)
            .map_err(|e| EngineError::io(format!("create {}", dir.display()), e))?;
        let entries = vfs
            .list(dir)
            .map_err(|e| EngineError::io(format!("list {}", dir.display()), e))?;
        remove_leftover_deletions(&*vfs, dir, &entries)?;
        let mut spares = adopt_spares(&*vfs, dir, &entries)?;
        let segments = segments_among(entries);
        let mut stats = ReplayStats::default();
        // Last sequence seen in the log; segments not yet deleted may hold flushed records.
        let mut last_seq = 0;
        let mut sealed = Vec::new();
        let count = segments.len();
        let number = segments.last().map_or(1, |(n, _)| n + 1);
        for (i, (_, path)) in segments.into_iter().enumerate() {
            let newest = i + 1 == count;
            let mapping = Arc::new(map_segment(&*vfs, &path)?);
            let data = Bytes::from_owner(SegmentBytes(mapping.clone()));
            let data_len = data.len() as u64;
            stats.segments += 1;
            let end = scan_segment(&path, &data, after_seq, &mut last_seq, &mut stats, apply)?;
            // From here on the records replayed from it are what keeps it mapped (read at
            // random while they live in the memtable). A cut below shortens the file only past
            // the last frame replayed, so no byte they point to goes.
            mapping.advise_normal();
            let replayed = Arc::downgrade(&mapping);
            drop((data, mapping));
            let cut = match end {
                ScanEnd::Clean => None,
                ScanEnd::Torn { offset, reason } if newest => {
                    tracing::warn!(file = %path.display(), offset, %reason, "commit log: tail cut after the last valid frame (a write the stop tore, or a recycled segment's old frames)");
                    stats.torn_tails += 1;
                    Some(offset)
                }
                ScanEnd::Torn { offset, reason } | ScanEnd::Corrupt { offset, reason } => {
                    if !skip_corrupt {
                        return Err(EngineError::Corrupted {
                            path,
                            offset,
                            reason: format!(
                                "{reason}; records follow the damage (open with skip_corrupt_log to drop the rest of this segment)"
                            ),
                        });
                    }
                    tracing::error!(file = %path.display(), offset, %reason, "commit log: corrupt record, rest of segment dropped");
                    stats.corrupt_skipped += 1;
                    Some(offset)
                }
            };
            let bytes = cut.map_or(data_len, |offset| {
                offset.max(MAGIC.len() as u64).min(data_len)
            });
            if cut.is_some() {
                let file = vfs.open_write(&path).map_err(|e| log_err(&path, e))?;
                file.set_len(bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| log_err(&path, e))?;
            }
            sealed.push(Segment {
                path,
                last_seq,
                bytes,
                replayed,
            });
        }
        // Above every sequence a spare holds, whatever the manifest says: old frames in a
        // recycled segment must never read as new ones.
        let spare_seq = spares.iter().map(|s| s.last_seq).max().unwrap_or(0);
        let last_seq = last_seq.max(after_seq).max(spare_seq);
        let next_seq = last_seq + 1;
        let page = (rustix::param::page_size() as u64).max(512);
        let (file, path, prepared_to) = next_segment(&*vfs, dir, number, spares.pop(), page)?;
        let mut writer = Writer {
            file,
            path,
            number,
            file_len: 0,
            prepared_to: 0,
            buf_start: 0,
            buf: Vec::with_capacity(64 * 1024),
            next_seq,
            sealed,
            spares,
            recycled: false,
            page,
        };
        writer.at_new_segment(prepared_to);
        let log = CommitLog {
            vfs,
            dir: dir.to_path_buf(),
            sync,
            segment_bytes,
            writer: Mutex::new(writer),
            syncing: AtomicBool::new(false),
            sync_rounds: AtomicU32::new(0),
            synced_seq: AtomicU64::new(last_seq),
            appended_seq: AtomicU64::new(last_seq),
            failed: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            longest_sync_micros: AtomicU64::new(0),
            latency: Default::default(),
        };
        Ok((log, stats))
    }

    pub fn check_healthy(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(EngineError::CommitLog {
                path: self.dir.clone(),
                source: std::io::Error::other(
                    "an earlier fsync failed; the log takes no more writes",
                ),
            });
        }
        Ok(())
    }

    fn fail(&self, path: &Path, e: std::io::Error) -> EngineError {
        self.failed.store(true, Ordering::Release);
        log_err(path, e)
    }

    /// Marks the log failed, as a failed fsync does.
    #[cfg(test)]
    pub fn mark_failed_for_tests(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Appends a record (buffered) and returns its sequence number. Durable only after
    /// [`CommitLog::wait_durable`].
    #[expect(
        clippy::indexing_slicing,
        reason = "the header slots lie inside the FRAME_HEADER bytes pushed just before"
    )]
    pub fn append(&self, record: &Record) -> Result<u64> {
        self.check_healthy()?;
        let mut w = self.writer.lock();
        let seq = w.next_seq;
        let start = w.buf.len();
        w.buf.extend_from_slice(&[0u8; FRAME_HEADER]);
        encode_log_record(record, &mut w.buf);
        let payload_len = w.buf.len() - start - FRAME_HEADER;
        w.buf[start + 8..start + 16].copy_from_slice(&seq.to_le_bytes());
        let durable = self.synced_seq.load(Ordering::Acquire);
        w.buf[start + 16..start + 24].copy_from_slice(&durable.to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&w.buf[start + 8..start + FRAME_HEADER]),
            &w.buf[start + FRAME_HEADER..],
        );
        w.buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        w.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        w.next_seq += 1;
        self.appended_seq.store(seq, Ordering::Release);
        if w.end() >= self.segment_bytes {
            self.rotate(&mut w)?;
        } else if w.pending() >= BUFFER_FLUSH_BYTES as u64 {
            self.write_buffer_and_zero_ahead(&mut w)?;
        }
        Ok(seq)
    }

    /// Writes the appended frames as whole pages (see the module docs): from the start of the
    /// page that holds the last written frame's end, to the end of the page that holds the new
    /// frames' end, zeros after them. Keeps the new last page's frames for the next write.
    fn write_buffer(&self, w: &mut Writer) -> Result<()> {
        if w.pending() == 0 {
            return Ok(());
        }
        let end = w.end();
        let padded = end.next_multiple_of(w.page);
        let frames = w.buf.len();
        w.buf.resize(frames + (padded - end) as usize, 0);
        let written = w.file.write_at(&w.buf, w.buf_start);
        w.buf.truncate(frames);
        if let Err(e) = written {
            let path = w.path.clone();
            return Err(self.fail(&path, e));
        }
        w.file_len = end;
        w.prepared_to = w.prepared_to.max(padded);
        let last_page = end - end % w.page;
        w.buf.drain(..(last_page - w.buf_start) as usize);
        w.buf_start = last_page;
        Ok(())
    }

    /// Writes the buffer for the file to keep (not to seal): tops the zeros up when low.
    fn write_buffer_and_zero_ahead(&self, w: &mut Writer) -> Result<()> {
        self.write_buffer(w)?;
        if w.prepared_to < w.file_len + ZERO_AHEAD_LOW {
            self.zero_ahead(w);
        }
        Ok(())
    }

    /// Writes zeros after the last frame, up to `ZERO_AHEAD` past it (at most to the segment
    /// size); the next fsync makes them durable with the frames before them. Only speed
    /// depends on it: a failure is logged and appends go on growing the file.
    fn zero_ahead(&self, w: &mut Writer) {
        let from = w.prepared_to.max(w.file_len);
        let to = (w.file_len + ZERO_AHEAD)
            .min(self.segment_bytes.max(w.file_len))
            .next_multiple_of(w.page);
        let mut at = from;
        while at < to {
            let n = ZEROS.len().min((to - at) as usize);
            if let Err(e) = w.file.write_at(ZEROS.get(..n).unwrap_or_default(), at) {
                tracing::warn!(file = %w.path.display(), error = %e, "commit log: zeroing ahead failed");
                return;
            }
            at += n as u64;
        }
        w.prepared_to = to;
    }

    /// Cuts the zeros after the last frame and syncs the segment in full (size included).
    fn seal(&self, w: &mut Writer) -> Result<()> {
        self.write_buffer(w)?;
        let path = w.path.clone();
        if w.prepared_to > w.file_len {
            w.file
                .set_len(w.file_len)
                .map_err(|e| self.fail(&path, e))?;
            w.prepared_to = 0;
        }
        w.file.sync_all().map_err(|e| self.fail(&path, e))?;
        self.synced_seq.fetch_max(w.next_seq - 1, Ordering::AcqRel);
        Ok(())
    }

    /// Trims and syncs the active segment: a clean close leaves no zeroed end behind.
    pub fn close(&self) -> Result<()> {
        self.check_healthy()?;
        let mut w = self.writer.lock();
        self.seal(&mut w)
    }

    /// Seals the current segment (written and fsynced in full) and starts the next one.
    fn rotate(&self, w: &mut Writer) -> Result<()> {
        self.seal(w)?;
        let last = w.next_seq - 1;
        let bytes = w.file_len;
        let spare = w.spares.pop();
        let (file, new_path, prepared_to) =
            next_segment(&*self.vfs, &self.dir, w.number + 1, spare, w.page)?;
        w.number += 1;
        let old_path = std::mem::replace(&mut w.path, new_path);
        w.file = file;
        w.at_new_segment(prepared_to);
        w.sealed.push(Segment {
            path: old_path,
            last_seq: last,
            bytes,
            replayed: Weak::new(),
        });
        Ok(())
    }

    /// Seals the active segment and starts a new file as the next one, unless it holds no
    /// frame yet and is not a recycled segment, and deletes the spares: once what it holds is
    /// flushed, [`CommitLog::release_up_to`] deletes it instead of keeping it until it fills,
    /// and no file of the log keeps a released segment's old frames (a range drop must not
    /// leave the dropped records' log on disk; it discards the spares its flush makes).
    pub fn rotate_now(&self) -> Result<()> {
        self.check_healthy()?;
        let spares = {
            let mut w = self.writer.lock();
            let spares = std::mem::take(&mut w.spares);
            if w.end() > MAGIC.len() as u64 || w.recycled {
                self.rotate(&mut w)?;
            }
            spares
        };
        self.remove_spares(spares)
    }

    /// Makes everything appended so far durable with one fsync.
    pub fn sync_now(&self) -> Result<()> {
        let (file, path, upto) = {
            let mut w = self.writer.lock();
            self.write_buffer_and_zero_ahead(&mut w)?;
            (w.file.clone(), w.path.clone(), w.next_seq - 1)
        };
        if self.sync != SyncMode::Never {
            let started = std::time::Instant::now();
            file.sync_data().map_err(|e| self.fail(&path, e))?;
            let took = started.elapsed();
            metrics::histogram!("pairdb_engine_log_sync_seconds").record(took.as_secs_f64());
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.latency.record(took);
            self.longest_sync_micros.fetch_max(
                u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        self.synced_seq.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// The sequence of the last record appended so far, durable or not. Everything a reader
    /// can see in a memtable was appended at or below it.
    pub fn appended_seq(&self) -> u64 {
        self.appended_seq.load(Ordering::Acquire)
    }

    /// Waits until `seq` is durable as the sync mode promises: with `always`, by group commit;
    /// with `batch_ms`/`never`, returns at once (the batch syncer or nobody makes it durable).
    /// Fails once an fsync has failed, even for a `seq` synced before: nothing is acknowledged
    /// by a log that may have lost writes.
    pub fn wait_durable(&self, seq: u64) -> Result<()> {
        self.check_healthy()?;
        if self.sync != SyncMode::Always {
            return Ok(());
        }
        loop {
            // Read before the checks: a sync that ends after them changes it, so the wait
            // below returns at once instead of missing the wake-up.
            let round = self.sync_rounds.load(Ordering::Acquire);
            if self.synced_seq.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            self.check_healthy()?;
            if self
                .syncing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // The leader: one fsync for everything appended so far, by anyone.
                let turn = LeaderTurn(self);
                let result = self.sync_now();
                drop(turn);
                result?;
                continue;
            }
            // A leader is syncing; it bumps the round and wakes everyone when done.
            atomic_wait::wait(&self.sync_rounds, round);
        }
    }

    /// Releases sealed segments whose every record has sequence <= `flushed_seq`, except those
    /// that replayed records still point into (a later call releases them): the largest is
    /// kept as a spare while fewer than [`MAX_SPARES`] are kept, the others are deleted.
    pub fn release_up_to(&self, flushed_seq: u64) -> Result<usize> {
        let (doomed, spare_slots) = {
            let mut w = self.writer.lock();
            let (mut gone, keep): (Vec<Segment>, Vec<Segment>) = std::mem::take(&mut w.sealed)
                .into_iter()
                .partition(|s| s.last_seq <= flushed_seq && s.replayed.strong_count() == 0);
            w.sealed = keep;
            gone.sort_by_key(|s| std::cmp::Reverse(s.bytes));
            (gone, MAX_SPARES.saturating_sub(w.spares.len()))
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        // Out of the log's names first, durably: a crash from here on leaves files that
        // recovery removes or keeps as spares, never a shortened segment that would read as
        // corruption, nor a spare under a segment's name.
        let mut deleting = Vec::with_capacity(doomed.len());
        let mut spares = Vec::new();
        for segment in &doomed {
            let spare = spares.len() < spare_slots && segment.bytes >= self.segment_bytes / 2;
            let to = if spare {
                self.dir
                    .join(format!("{:020}.{SPARE_SUFFIX}", segment.last_seq))
            } else {
                segment.path.with_extension(DELETING_SUFFIX)
            };
            self.vfs
                .rename(&segment.path, &to)
                .map_err(|e| log_err(&segment.path, e))?;
            if spare {
                spares.push(Spare {
                    path: to,
                    bytes: segment.bytes,
                    last_seq: segment.last_seq,
                });
            } else {
                deleting.push((to, segment.bytes));
            }
        }
        sync_dir(&*self.vfs, &self.dir)?;
        self.writer.lock().spares.extend(spares);
        for (path, bytes) in &deleting {
            vfs::remove_in_steps(&*self.vfs, path, *bytes).map_err(|e| log_err(path, e))?;
        }
        sync_dir(&*self.vfs, &self.dir)?;
        Ok(doomed.len())
    }

    /// Deletes the spares: a released segment's old frames stay in its spare until written
    /// over, so a range drop, which promises its records' disk back, removes them.
    pub fn discard_spares(&self) -> Result<()> {
        let spares = std::mem::take(&mut self.writer.lock().spares);
        self.remove_spares(spares)
    }

    fn remove_spares(&self, spares: Vec<Spare>) -> Result<()> {
        if spares.is_empty() {
            return Ok(());
        }
        for spare in &spares {
            vfs::remove_in_steps(&*self.vfs, &spare.path, spare.bytes)
                .map_err(|e| log_err(&spare.path, e))?;
        }
        sync_dir(&*self.vfs, &self.dir)
    }

    /// Recent fsync time over its baseline, at least 1 ([`super::sync_latency`]).
    pub fn sync_pressure(&self) -> f64 {
        self.latency.pressure()
    }

    /// The longest fsync of [`CommitLog::sync_now`] so far (microseconds).
    pub fn longest_sync_micros(&self) -> u64 {
        self.longest_sync_micros.load(Ordering::Relaxed)
    }

    /// Number of fsyncs issued (group commit shares them).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Segment files currently on disk, oldest first (sealed ones, then the active one).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        let w = self.writer.lock();
        let mut paths: Vec<PathBuf> = w.sealed.iter().map(|s| s.path.clone()).collect();
        paths.push(w.path.clone());
        paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vfs::DELETE_STEP;
    use crate::engine::vfs::recording::RecordingVfs;
    use crate::vclock::{VectorClock, Version};
    use std::fs;

    fn rec(i: u64) -> Record {
        Record::put(
            "t",
            format!("k{i}"),
            Version::new(VectorClock::from_entries([("c", i + 1)])),
            format!("v{i}"),
        )
    }

    fn test_options(segment_bytes: u64) -> LogOptions {
        LogOptions {
            vfs: vfs::real(),
            sync: SyncMode::Always,
            segment_bytes,
            after_seq: 0,
            skip_corrupt: false,
        }
    }

    fn replay(dir: &Path, after: u64) -> Result<(Vec<(u64, Record)>, ReplayStats)> {
        let mut seen = Vec::new();
        let (_log, stats) = CommitLog::open(
            dir,
            LogOptions {
                after_seq: after,
                ..test_options(1 << 20)
            },
            &mut |s, r| seen.push((s, r)),
        )?;
        Ok((seen, stats))
    }

    /// Options of a log on a [`RecordingVfs`], and the recorder.
    fn recording_options(segment_bytes: u64) -> (Arc<RecordingVfs>, LogOptions) {
        let recording = Arc::new(RecordingVfs::default());
        let options = LogOptions {
            vfs: recording.clone(),
            ..test_options(segment_bytes)
        };
        (recording, options)
    }

    /// A write that covers part of a page reads the page first when memory pressure evicted
    /// it (see the module docs), so after a new segment's magic the log writes whole pages
    /// only: frames synced one by one, batches over the buffer's size, zeroing ahead, and
    /// rotations. And the log still replays every record.
    #[test]
    fn every_write_after_the_magic_covers_whole_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (recording, options) = recording_options(4 << 20);
        let writes = recording.writes.clone();
        let mut appended = Vec::new();
        {
            let (log, _) = CommitLog::open(dir.path(), options, &mut |_, _| {}).expect("open");
            let big = |i: u64| {
                let mut r = rec(i);
                r.value = Some(vec![b'x'; 50_000 + (i as usize % 7) * 999].into());
                r
            };
            // Small frames synced one or two at a time, then 2 MB appended without a sync
            // (written when the buffer passes its size), then enough to rotate three times.
            for i in 0..600 {
                let r = if (300..340).contains(&i) || i >= 400 {
                    big(i)
                } else {
                    rec(i)
                };
                let seq = log.append(&r).expect("append");
                if !(300..340).contains(&i) && i % 3 != 0 {
                    log.wait_durable(seq).expect("durable");
                }
                appended.push(r);
            }
            log.close().expect("close");
            assert!(log.segment_paths().len() > 2, "the test must rotate");
        }
        let page = rustix::param::page_size() as u64;
        let writes = writes.lock().clone();
        assert!(writes.len() > 300);
        for (path, offset, len) in writes {
            let magic = offset == 0 && len == MAGIC.len();
            assert!(
                magic || (offset % page == 0 && len as u64 % page == 0),
                "{}: a write of {len} bytes at {offset} is not whole pages",
                path.display()
            );
        }
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(stats.torn_tails, 0);
        let seen: Vec<Record> = seen.into_iter().map(|(_, r)| r).collect();
        assert_eq!(seen, appended);
    }

    /// A released segment leaves the log's names first, is then cut from its end at most
    /// `DELETE_STEP` at a time (a large discard at once stalls every fsync on the disk), and
    /// is gone at the end; one a crash left on its way out is removed when the log opens,
    /// and replay never sees it.
    #[test]
    fn released_segments_are_cut_in_steps_and_leftovers_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (recording, options) = recording_options(20 << 20);
        let truncations = recording.truncations.clone();
        let (log, _) = CommitLog::open(dir.path(), options, &mut |_, _| {}).expect("open");
        let mut big = rec(0);
        big.value = Some(vec![b'x'; 1 << 20].into());
        let mut last = 0;
        for _ in 0..45 {
            last = log.append(&big).expect("append");
        }
        log.wait_durable(last).expect("durable");
        let sealed = log.segment_paths();
        assert_eq!(
            sealed.len(),
            3,
            "two sealed segments of about 20 MiB and the active one"
        );
        truncations.lock().clear();
        assert_eq!(log.release_up_to(last).expect("release"), 2);
        let cut_in_steps = |path: &Path| {
            let lens: Vec<u64> = truncations
                .lock()
                .iter()
                .filter(|(p, _)| p == path)
                .map(|(_, l)| *l)
                .collect();
            assert!(
                lens.len() >= 2,
                "{} was not cut in steps: {lens:?}",
                path.display()
            );
            assert!(lens.windows(2).all(|w| w[0] - w[1] <= DELETE_STEP));
            assert!(!path.exists());
        };
        // One is deleted, the other kept as the spare.
        let spares = spare_paths(dir.path());
        assert_eq!(spares.len(), 1, "{spares:?}");
        let deleted: Vec<&PathBuf> = sealed[..2].iter().filter(|p| !p.exists()).collect();
        assert_eq!(deleted.len(), 2, "both left the log's names");
        let deleting: Vec<PathBuf> = deleted
            .iter()
            .map(|p| p.with_extension(DELETING_SUFFIX))
            .filter(|d| truncations.lock().iter().any(|(p, _)| p == d))
            .collect();
        assert_eq!(deleting.len(), 1, "one deleted: {deleting:?}");
        cut_in_steps(&deleting[0]);
        // A range drop's discard cuts the spare in steps too.
        log.discard_spares().expect("discard");
        cut_in_steps(&spares[0]);
        drop(log);
        let leftover = dir.path().join(format!("{:020}.{DELETING_SUFFIX}", 1));
        fs::write(&leftover, b"PDBWAL02 torn by a crash").expect("leftover");
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(stats.corrupt_skipped + stats.torn_tails, 0);
        assert!(seen.len() < 45, "the released records are gone");
        assert!(!leftover.exists(), "the open removes what a crash left");
    }

    /// The spares in a log directory.
    fn spare_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(SPARE_SUFFIX))
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn appended_records_replay_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(durable_log(dir.path(), 1 << 20, 10));
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen.len(), 10);
        assert_eq!(stats.torn_tails, 0);
        for (i, (seq, r)) in seen.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert_eq!(r, &rec(i as u64));
        }
        // Records at or below the flushed sequence are skipped.
        let (seen, _) = replay(dir.path(), 4).expect("replay");
        assert_eq!(seen.first().map(|(s, _)| *s), Some(5));
    }

    /// Group commit with many writers: every `wait_durable` returns once its record is
    /// synced (none is left asleep), and the writers share fsyncs.
    #[test]
    fn concurrent_writers_share_fsyncs_and_all_return_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) =
            CommitLog::open(dir.path(), test_options(1 << 20), &mut |_, _| {}).expect("open");
        const WRITERS: u64 = 16;
        const EACH: u64 = 200;
        std::thread::scope(|scope| {
            for w in 0..WRITERS {
                let log = &log;
                scope.spawn(move || {
                    for i in 0..EACH {
                        let seq = log.append(&rec(w * EACH + i)).expect("append");
                        log.wait_durable(seq).expect("durable");
                        assert!(log.synced_seq.load(Ordering::Acquire) >= seq);
                    }
                });
            }
        });
        assert!(
            log.sync_count() < WRITERS * EACH,
            "{} fsyncs for {} writes",
            log.sync_count(),
            WRITERS * EACH
        );
        drop(log);
        let (seen, _) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen.len() as u64, WRITERS * EACH);
    }

    /// A leader whose turn ends in a panic (unwinding through its fsync) still hands over: the
    /// writer waiting on that turn wakes, takes the next one and gets its record synced.
    #[test]
    fn a_leader_turn_that_ends_in_a_panic_still_hands_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) =
            CommitLog::open(dir.path(), test_options(1 << 20), &mut |_, _| {}).expect("open");
        let seq = log.append(&rec(0)).expect("append");
        // A leader in the middle of its fsync.
        log.syncing.store(true, Ordering::Release);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| log.wait_durable(seq));
            std::thread::sleep(std::time::Duration::from_millis(50));
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _turn = LeaderTurn(&log);
                panic!("the fsync panicked");
            }));
            assert!(unwound.is_err());
            waiter
                .join()
                .expect("waiter")
                .expect("durable after the handover");
        });
        assert!(log.synced_seq.load(Ordering::Acquire) >= seq);
    }

    /// A new log holding `records` durable records.
    fn durable_log(dir: &Path, segment_bytes: u64, records: u64) -> CommitLog {
        let (log, _) =
            CommitLog::open(dir, test_options(segment_bytes), &mut |_, _| {}).expect("open");
        for i in 0..records {
            let seq = log.append(&rec(i)).expect("append");
            log.wait_durable(seq).expect("sync");
        }
        log
    }

    /// Ten durable records in a log that is then dropped without `close` (a crash).
    fn crashed_log(dir: &Path) -> PathBuf {
        let log = durable_log(dir, 1 << 20, 10);
        log.segment_paths().pop().expect("active segment")
    }

    #[test]
    fn zeroed_end_of_a_crashed_segment_is_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = crashed_log(dir.path());
        let bytes = fs::read(&segment).expect("read");
        assert_eq!(bytes.len(), 1 << 20, "zeroed ahead up to the segment size");
        assert_eq!(bytes.last(), Some(&0));
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen.len(), 10);
        assert_eq!(stats.torn_tails, 0);
    }

    #[test]
    fn a_frame_cut_short_before_the_zeros_is_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = crashed_log(dir.path());
        let mut bytes = fs::read(&segment).expect("read");
        let end = bytes.iter().rposition(|&b| b != 0).expect("frames") + 1;
        // The last few bytes of the last frame never reached the disk.
        bytes[end - 5..end].fill(0);
        fs::write(&segment, &bytes).expect("write");
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen.len(), 9);
        assert_eq!(stats.torn_tails, 1);
        // Cut past the records replayed from it, whose values still read through the mapping
        // the cut shortened.
        assert!(fs::metadata(&segment).expect("stat").len() < end as u64);
        for (i, (_, record)) in seen.iter().enumerate() {
            assert_eq!(record.value.as_deref(), Some(format!("v{i}").as_bytes()));
        }
    }

    #[test]
    fn replayed_records_keep_their_segment_until_they_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        durable_log(dir.path(), 300, 20).close().expect("close");
        let mut seen = Vec::new();
        let (log, _) =
            CommitLog::open(dir.path(), test_options(300), &mut |_, r| seen.push(r)).expect("open");
        assert_eq!(seen.len(), 20);
        let replayed = log.segment_paths().len() - 1;
        assert!(replayed > 2, "{replayed} segments");
        // Everything is flushed, but the records point into the segments' mappings: only a
        // segment no record was replayed from (an empty one) may go.
        assert!(log.release_up_to(u64::MAX).expect("release") <= 1);
        assert!(log.segment_paths().len() >= replayed);
        let values: Vec<Bytes> = seen.iter().filter_map(|r| r.value.clone()).collect();
        drop(seen);
        // Values alone keep their segments; a deleted one would fault (SIGBUS) or read zeros.
        assert!(log.release_up_to(u64::MAX).expect("release") <= 1);
        for (i, value) in values.iter().enumerate() {
            assert_eq!(&value[..], format!("v{i}").as_bytes());
        }
        drop(values);
        assert!(log.release_up_to(u64::MAX).expect("release") >= replayed - 1);
        assert_eq!(
            log.segment_paths().len(),
            1,
            "only the active segment is left"
        );
    }

    #[test]
    fn close_and_rotation_trim_the_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = durable_log(dir.path(), 300, 20);
        log.close().expect("close");
        let paths = log.segment_paths();
        assert!(paths.len() > 2, "rotated: {paths:?}");
        for path in paths
            .iter()
            .filter(|p| fs::metadata(p).map(|m| m.len() > 8).unwrap_or(false))
        {
            let bytes = fs::read(path).expect("read");
            assert_ne!(bytes.last(), Some(&0), "{} ends in zeros", path.display());
        }
        drop(log);
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen.len(), 20);
        assert_eq!(stats.torn_tails, 0);
    }

    #[test]
    fn rotation_and_release_delete_flushed_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = durable_log(dir.path(), 256, 20);
        let before = log.segment_paths().len();
        assert!(before > 3, "small segments must rotate, got {before}");
        log.release_up_to(10).expect("release");
        let after = log.segment_paths();
        assert!(after.len() < before);
        drop(log);
        let (seen, _) = replay(dir.path(), 10).expect("replay");
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (11..=20).collect::<Vec<_>>());
    }

    /// Offsets of the frames of a segment (after its magic).
    fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
        let mut offsets = Vec::new();
        let mut pos = MAGIC.len();
        while let Ok(f) = parse_frame(bytes, pos, Format::V2, None) {
            offsets.push(pos);
            pos = f.next;
        }
        offsets
    }

    #[test]
    fn a_segment_shorter_than_its_magic_is_empty_wherever_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = durable_log(dir.path(), 1 << 20, 10);
        let number = log.writer.lock().number;
        drop(log);
        // A crash right after creating the next segment (0 bytes), then one more right after
        // creating another (part of its magic): both are older segments at the next open.
        fs::write(dir.path().join(segment_name(number + 1)), b"").expect("empty segment");
        fs::write(dir.path().join(segment_name(number + 2)), b"PDB").expect("short segment");
        let (seen, stats) = replay(dir.path(), 0).expect("a crash while creating a segment");
        assert_eq!(seen.len(), 10);
        assert_eq!(stats.torn_tails, 0);
        let (seen, _) = replay(dir.path(), 0).expect("and again after the restart");
        assert_eq!(seen.len(), 10);
        // Bytes that are not a prefix of the magic are not a crash's doing.
        fs::write(dir.path().join(segment_name(number + 9)), b"junk").expect("junk");
        assert!(matches!(
            replay(dir.path(), 0),
            Err(EngineError::Corrupted { .. })
        ));
    }

    #[test]
    fn unsynced_frames_that_landed_after_a_hole_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = durable_log(dir.path(), 1 << 20, 10);
        // Five more appended while nothing after record 10 was synced; the power fails while
        // their pages reach the disk in another order: the first never lands (zeros).
        for i in 10..15 {
            log.append(&rec(i)).expect("append");
        }
        log.sync_now().expect("write them out");
        let segment = log.segment_paths().pop().expect("segment");
        drop(log);
        let mut bytes = fs::read(&segment).expect("read");
        let frames = frame_offsets(&bytes);
        assert_eq!(frames.len(), 15);
        bytes[frames[10]..frames[11]].fill(0);
        fs::write(&segment, &bytes).expect("write");
        let (seen, stats) = replay(dir.path(), 0).expect("a power loss leaves this state");
        assert_eq!(seen.len(), 10, "what was synced stays, the rest is cut");
        assert_eq!(stats.torn_tails, 1);
    }

    #[test]
    fn a_lost_frame_that_later_frames_vouch_for_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = durable_log(dir.path(), 1 << 20, 10);
        let segment = log.segment_paths().pop().expect("segment");
        drop(log);
        let mut bytes = fs::read(&segment).expect("read");
        let frames = frame_offsets(&bytes);
        // Record 5 was synced (record 6 was appended after that): losing it is corruption.
        bytes[frames[4]..frames[5]].fill(0);
        fs::write(&segment, &bytes).expect("write");
        match replay(dir.path(), 0) {
            Err(EngineError::Corrupted { offset, .. }) => assert_eq!(offset, frames[4] as u64),
            other => panic!("expected corruption, got {:?}", other.map(|(s, _)| s.len())),
        }
    }

    /// Record `i` with `size` bytes of value.
    fn sized(i: u64, size: usize) -> Record {
        let mut r = rec(i);
        r.value = Some(vec![b'a' + (i % 26) as u8; size].into());
        r
    }

    /// Appends records of `size` bytes, each synced, until the log's active segment changes;
    /// returns the last sequence.
    fn fill_until_rotation(log: &CommitLog, next: &mut u64, size: usize) -> u64 {
        let active = log.segment_paths().pop();
        let mut last = 0;
        while log.segment_paths().pop() == active {
            last = log.append(&sized(*next, size)).expect("append");
            log.wait_durable(last).expect("durable");
            *next += 1;
        }
        last
    }

    /// A log of 1 MiB segments opened on an empty `dir`.
    fn empty_log(dir: &Path) -> CommitLog {
        CommitLog::open(dir, test_options(1 << 20), &mut |_, _| {})
            .expect("open")
            .0
    }

    #[test]
    fn a_released_segment_is_recycled_without_zeros_and_its_old_frames_never_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = empty_log(dir.path());
        let mut next = 0;
        fill_until_rotation(&log, &mut next, 10_000);
        let released = fill_until_rotation(&log, &mut next, 10_000);
        assert_eq!(log.release_up_to(released).expect("release"), 2);
        let spares = spare_paths(dir.path());
        assert_eq!(spares.len(), 1, "one kept, one deleted: {spares:?}");
        let spare_len = fs::metadata(&spares[0]).expect("stat").len();
        fill_until_rotation(&log, &mut next, 10_000);
        assert!(
            spare_paths(dir.path()).is_empty(),
            "the rotation took the spare"
        );
        let recycled = log.segment_paths().pop().expect("active");
        // Records of another size, so old and new frames do not line up.
        let mut written = Vec::new();
        for _ in 0..5 {
            let r = sized(next, 3_000);
            let seq = log.append(&r).expect("append");
            log.wait_durable(seq).expect("durable");
            written.push((seq, r));
            next += 1;
        }
        drop(log); // a crash: no close, no trim
        let bytes = fs::read(&recycled).expect("read");
        assert_eq!(bytes.len() as u64, spare_len, "written over, not grown");
        let tail = &bytes[bytes.len() - 4096..];
        assert!(
            tail.iter().any(|&b| b != 0),
            "the old frames are still there: nothing was zeroed"
        );
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(stats.corrupt_skipped, 0);
        assert_eq!(
            stats.torn_tails, 1,
            "the old frames are cut like a torn tail"
        );
        assert!(
            seen.iter().all(|(seq, _)| *seq > released),
            "nothing released replays"
        );
        assert_eq!(seen.len() as u64, next - released);
        assert_eq!(&seen[seen.len() - 5..], &written[..]);
        // The cut is durable: the next open finds a clean log with the same records.
        let (again, stats) = replay(dir.path(), 0).expect("replay again");
        assert_eq!(stats.torn_tails, 0);
        assert_eq!(again, seen);
    }

    #[test]
    fn a_spare_outlives_a_restart_and_later_sequences_stay_above_its_frames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = empty_log(dir.path());
        let mut next = 0;
        let released = fill_until_rotation(&log, &mut next, 10_000);
        assert_eq!(log.release_up_to(released).expect("release"), 1);
        log.close().expect("close");
        drop(log);
        let spare = spare_paths(dir.path()).pop().expect("a spare");
        // Every segment gone and nothing flushed on record (a manifest that lags): the only
        // thing that still knows how far sequences went is the spare's name.
        for path in segments_among(
            fs::read_dir(dir.path())
                .expect("list")
                .map(|e| e.expect("e").path())
                .collect(),
        ) {
            fs::remove_file(path.1).expect("remove");
        }
        let (log, _) =
            CommitLog::open(dir.path(), test_options(1 << 20), &mut |_, _| {}).expect("open");
        assert!(!spare.exists(), "the new segment is the spare");
        let seq = log.append(&sized(1000, 100)).expect("append");
        log.wait_durable(seq).expect("durable");
        assert!(
            seq > released,
            "sequence {seq} at or below the spare's {released}"
        );
        drop(log);
        let (seen, stats) = replay(dir.path(), 0).expect("replay");
        assert_eq!(stats.corrupt_skipped, 0);
        assert_eq!(seen, vec![(seq, sized(1000, 100))]);
    }

    #[test]
    fn segments_of_the_first_format_still_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = MAGIC_V1.to_vec();
        for i in 0..3u64 {
            let seq = i + 1;
            let mut payload = Vec::new();
            encode_log_record(&rec(i), &mut payload);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), &payload);
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc.to_le_bytes());
            bytes.extend_from_slice(&seq.to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        fs::write(dir.path().join(segment_name(1)), &bytes).expect("write");
        let (seen, _) = replay(dir.path(), 0).expect("replay");
        assert_eq!(seen, (0..3).map(|i| (i + 1, rec(i))).collect::<Vec<_>>());
    }
}
