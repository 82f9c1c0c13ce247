//! SSTables: immutable sorted files of records (format in `docs/sstable-format.md`).
//!
//! Reads go through a read-only memory map of the finished, fsynced file. Every block is
//! checked against its CRC32C before any byte of it is interpreted, and decoding is
//! bounds-checked, so a damaged file yields `ChecksumFailed`/`Corrupted`, never a wrong value.

mod block;
mod bloom;
mod builder;
mod index;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::codec::Reader;
use super::error::{EngineError, Result};
use super::types::Record;
use super::vfs::{Mapped, Vfs};
use crate::ring::HashRange;

use block::BlockCursor;
pub use block::TableFormat;
pub use bloom::{Bloom, FilterLayout, key_hash};
pub use builder::TableBuilder;
use index::BlockIndex;

/// "PDBSST01" as a little-endian u64 (every format version).
pub const MAGIC: u64 = u64::from_le_bytes(*b"PDBSST01");
/// 3 x (offset u64 + len u32) + version u32 + crc u32 + magic u64.
pub const FOOTER_LEN: usize = 3 * 12 + 4 + 4 + 8;

/// What the manifest and the planner know about a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    pub id: u64,
    pub file_bytes: u64,
    pub entries: u64,
    pub tombstones: u64,
    pub min_key: Vec<u8>,
    pub max_key: Vec<u8>,
    pub min_hash: u64,
    pub max_hash: u64,
}

impl TableMeta {
    pub fn empty(id: u64) -> Self {
        Self {
            id,
            file_bytes: 0,
            entries: 0,
            tombstones: 0,
            min_key: Vec::new(),
            max_key: Vec::new(),
            min_hash: u64::MAX,
            max_hash: 0,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.entries, self.tombstones, self.min_hash, self.max_hash] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for k in [&self.min_key, &self.max_key] {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k);
        }
    }

    fn decode(
        id: u64,
        file_bytes: u64,
        payload: &[u8],
    ) -> std::result::Result<Self, super::codec::CodecError> {
        let mut r = Reader::new(payload);
        Ok(Self {
            id,
            file_bytes,
            entries: r.u64()?,
            tombstones: r.u64()?,
            min_hash: r.u64()?,
            max_hash: r.u64()?,
            min_key: r.len_prefixed()?.to_vec(),
            max_key: r.len_prefixed()?.to_vec(),
        })
    }

    /// Whether the table's key range intersects `[lo, hi]`.
    pub fn overlaps(&self, lo: &[u8], hi: &[u8]) -> bool {
        self.min_key.as_slice() <= hi && lo <= self.max_key.as_slice()
    }

    /// Whether any record's ring hash could lie in one of the inclusive `pieces`.
    pub fn may_hold_hashes(&self, pieces: &[(u64, u64)]) -> bool {
        pieces
            .iter()
            .any(|(lo, hi)| self.min_hash <= *hi && *lo <= self.max_hash)
    }
}

/// File name of table `id`.
pub fn table_file_name(id: u64) -> String {
    format!("{id:012}.sst")
}

/// How far ahead of itself a [`TableIter`] has the kernel read a table (in two halves: when
/// the iterator enters the second half, the next window is asked for).
const SCAN_PREFETCH: u64 = 1 << 20;

/// An open SSTable.
pub struct SsTable {
    path: PathBuf,
    /// The file, mapped and advised random: a fault reads its page only. A point read's
    /// block is one page (blocks are page-aligned), and a [`TableIter`] (compaction, streaming,
    /// scans) asks for the next [`SCAN_PREFETCH`] bytes ahead of itself. The kernel's default
    /// is to read around a fault as far as the device's read-ahead (8 MiB on this machine's
    /// disk): with data larger than memory, point reads' read-arounds evicted the pages other
    /// reads needed (docs/benchmarks.md, "Data larger than memory"), and a compaction merging
    /// ten tables read 80 MiB around its faults into a page cache of 40 MiB, reclaim dropped
    /// those pages before the merge reached them, and the disk read 350 MB/s for a minute
    /// while the writers all but stopped ("Round 3, step 16").
    map: Mapped,
    index: BlockIndex,
    bloom: Bloom,
    /// The layout of the data blocks (the footer's version).
    format: TableFormat,
    pub meta: TableMeta,
}

impl std::fmt::Debug for SsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsTable")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .finish()
    }
}

/// The fixed-size end of a table: (offset, length) of the index, bloom and meta blocks, the
/// format version, a CRC32C of everything before it, and the magic.
struct Footer {
    handles: [(u64, u32); 3],
    version: u32,
    crc: u32,
    /// CRC32C of the footer's bytes before its `crc` field.
    computed_crc: u32,
    magic: u64,
}

impl Footer {
    fn parse(bytes: &[u8]) -> std::result::Result<Self, super::codec::CodecError> {
        let mut r = Reader::new(bytes);
        let mut handle = || -> std::result::Result<(u64, u32), super::codec::CodecError> {
            Ok((r.u64()?, r.u32()?))
        };
        let handles = [handle()?, handle()?, handle()?];
        let version = r.u32()?;
        let checked = Reader::new(bytes).bytes(40)?;
        Ok(Footer {
            handles,
            version,
            crc: r.u32()?,
            computed_crc: crc32c::crc32c(checked),
            magic: r.u64()?,
        })
    }
}

impl SsTable {
    /// Opens and verifies footer, index, bloom filter and meta block.
    pub fn open(vfs: &dyn Vfs, path: &Path, id: u64) -> Result<Arc<SsTable>> {
        // Tables are immutable once written: mapped only after being written in full and
        // fsynced, never changed afterwards (see `RealVfs::map`).
        let map = vfs
            .map(path)
            .map_err(|e| EngineError::io(format!("map SSTable {}", path.display()), e))?;
        // Before the first read: the footer's fault would otherwise read megabytes around it.
        map.advise_random();
        let corrupt = |offset: u64, reason: &str| EngineError::Corrupted {
            path: path.to_path_buf(),
            offset,
            reason: reason.to_owned(),
        };
        let len = map.len();
        if len < FOOTER_LEN {
            return Err(corrupt(0, "file shorter than the footer"));
        }
        let footer_at = (len - FOOTER_LEN) as u64;
        let footer = map
            .get(len - FOOTER_LEN..)
            .and_then(|bytes| Footer::parse(bytes).ok())
            .ok_or_else(|| corrupt(footer_at, "unreadable footer"))?;
        if footer.magic != MAGIC {
            return Err(corrupt(footer_at, "bad magic: not a pairdb SSTable"));
        }
        if footer.computed_crc != footer.crc {
            return Err(EngineError::ChecksumFailed {
                path: path.to_path_buf(),
                offset: footer_at,
            });
        }
        let version = footer.version;
        let format = TableFormat::from_version(version)
            .ok_or_else(|| corrupt(footer_at, &format!("unsupported format version {version}")))?;
        let mut table = SsTable {
            path: path.to_path_buf(),
            map,
            index: BlockIndex::default(),
            bloom: Bloom::admit_all(),
            format,
            meta: TableMeta::empty(id),
        };
        let [
            (index_off, index_len),
            (bloom_off, bloom_len),
            (meta_off, meta_len),
        ] = footer.handles;
        // The filter, index and meta blocks are read in full just below: in one request.
        let tail = bloom_off.min(index_off).min(meta_off);
        table
            .map
            .will_need(usize::try_from(tail).unwrap_or(usize::MAX), len);

        let index_payload = table.block(index_off, index_len)?;
        let mut r = Reader::new(index_payload);
        let parse_index =
            |r: &mut Reader<'_>| -> std::result::Result<BlockIndex, super::codec::CodecError> {
                let n = r.u32()?;
                let mut index = BlockIndex::with_capacity((n as usize).min(1 << 20));
                for _ in 0..n {
                    let last_key = r.len_prefixed()?;
                    let offset = r.u64()?;
                    let len = r.u32()?;
                    index.push(last_key, offset, len);
                }
                index.shrink_to_fit();
                Ok(index)
            };
        let index = parse_index(&mut r).map_err(|e| corrupt(index_off, &format!("index: {e}")))?;
        let bloom = Bloom::decode(table.block(bloom_off, bloom_len)?)
            .map_err(|e| corrupt(bloom_off, &format!("bloom filter: {e}")))?;
        let meta = TableMeta::decode(id, len as u64, table.block(meta_off, meta_len)?)
            .map_err(|e| corrupt(meta_off, &format!("meta: {e}")))?;
        table.index = index;
        table.bloom = bloom;
        table.meta = meta;
        Ok(Arc::new(table))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout of the table's data blocks.
    pub fn format(&self) -> TableFormat {
        self.format
    }

    /// The checksummed block at `offset` (its length includes the 4-byte CRC), without the CRC.
    fn block(&self, offset: u64, len: u32) -> Result<&[u8]> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let (payload, crc) = start
            .checked_add(len as usize)
            .and_then(|end| self.map.get(start..end))
            .and_then(<[u8]>::split_last_chunk::<4>)
            .ok_or_else(|| EngineError::Corrupted {
                path: self.path.clone(),
                offset,
                reason: "block outside the file".to_owned(),
            })?;
        if crc32c::crc32c(payload) != u32::from_le_bytes(*crc) {
            return Err(EngineError::ChecksumFailed {
                path: self.path.clone(),
                offset,
            });
        }
        Ok(payload)
    }

    fn corrupt_block(&self, block: usize, reason: String) -> EngineError {
        EngineError::Corrupted {
            path: self.path.clone(),
            offset: self.index.block(block).map_or(0, |(offset, _)| offset),
            reason,
        }
    }

    /// Whether the bloom filter admits the key (`hash` from [`key_hash`]).
    pub fn may_contain(&self, ikey: &[u8], hash: u64) -> bool {
        ikey >= self.meta.min_key.as_slice()
            && ikey <= self.meta.max_key.as_slice()
            && self.bloom.may_contain(hash)
    }

    /// The record stored under `ikey`, if any.
    pub fn get(&self, ikey: &[u8]) -> Result<Option<Record>> {
        let idx = self.index.first_block_from(ikey);
        let Some((offset, len)) = self.index.block(idx) else {
            return Ok(None);
        };
        let payload = self.block(offset, len)?;
        let mut cursor = BlockCursor::new(self.format, payload);
        while let Some(raw) = cursor
            .next_entry()
            .map_err(|e| self.corrupt_block(idx, e.to_string()))?
        {
            match raw.ikey.cmp(ikey) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => {
                    return raw
                        .decode()
                        .map(Some)
                        .map_err(|e| self.corrupt_block(idx, e.to_string()));
                }
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Decodes every entry of block `idx` with key >= `from` (and ring hash in `ranges`).
    fn decode_block(
        &self,
        idx: usize,
        from: &[u8],
        ranges: Option<&[HashRange]>,
    ) -> Result<VecDeque<(Vec<u8>, Arc<Record>)>> {
        let Some((offset, len)) = self.index.block(idx) else {
            return Ok(VecDeque::new());
        };
        let payload = self.block(offset, len)?;
        let mut cursor = BlockCursor::new(self.format, payload);
        let mut out = VecDeque::new();
        while let Some(raw) = cursor
            .next_entry()
            .map_err(|e| self.corrupt_block(idx, e.to_string()))?
        {
            if raw.ikey < from {
                continue;
            }
            if let Some(ranges) = ranges {
                let hash = raw
                    .ring_hash()
                    .map_err(|e| self.corrupt_block(idx, e.to_string()))?;
                if !HashRange::any_contains(ranges, hash) {
                    continue;
                }
            }
            let record = raw
                .decode()
                .map_err(|e| self.corrupt_block(idx, e.to_string()))?;
            out.push_back((raw.ikey.to_vec(), Arc::new(record)));
        }
        Ok(out)
    }

    pub fn block_count(&self) -> usize {
        self.index.len()
    }
}

/// Iterates a table's records from a start key, one decoded block in memory at a time.
pub struct TableIter {
    table: Arc<SsTable>,
    next_block: usize,
    from: Vec<u8>,
    ranges: Option<Arc<[HashRange]>>,
    buffered: VecDeque<(Vec<u8>, Arc<Record>)>,
    failed: bool,
    /// The end of what the iterator has asked the kernel to read ahead.
    prefetched_until: u64,
}

impl TableIter {
    pub fn new(table: Arc<SsTable>, from: &[u8]) -> Self {
        let next_block = table.index.first_block_from(from);
        Self {
            table,
            next_block,
            from: from.to_vec(),
            ranges: None,
            buffered: VecDeque::new(),
            failed: false,
            prefetched_until: 0,
        }
    }

    /// Has the kernel read the next [`SCAN_PREFETCH`] bytes from block `idx` on, once the
    /// iterator is within half of that of the end of what it asked for before.
    fn prefetch_from(&mut self, idx: usize) {
        let Some((offset, len)) = self.table.index.block(idx) else {
            return;
        };
        let end = offset + u64::from(len);
        if end + SCAN_PREFETCH / 2 > self.prefetched_until {
            let to = end.max(offset + SCAN_PREFETCH);
            self.table.map.will_need(
                usize::try_from(offset).unwrap_or(usize::MAX),
                usize::try_from(to - offset).unwrap_or(usize::MAX),
            );
            self.prefetched_until = to;
        }
    }

    /// Only records whose ring hash lies in one of `ranges` (the others are skipped
    /// undecoded).
    pub fn in_hash_ranges(mut self, ranges: Option<Arc<[HashRange]>>) -> Self {
        self.ranges = ranges;
        self
    }
}

impl Iterator for TableIter {
    type Item = Result<(Vec<u8>, Arc<Record>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return Some(Ok(item));
            }
            if self.failed || self.next_block >= self.table.block_count() {
                return None;
            }
            self.prefetch_from(self.next_block);
            match self
                .table
                .decode_block(self.next_block, &self.from, self.ranges.as_deref())
            {
                Ok(entries) => {
                    self.buffered = entries;
                    self.next_block += 1;
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vfs::RealVfs;
    use crate::vclock::{VectorClock, Version};

    fn rec(i: u32) -> Record {
        let v = Version::new(VectorClock::from_entries([("c", u64::from(i) + 1)]));
        if i % 7 == 0 {
            Record::tombstone("t", format!("key{i:05}"), v)
        } else {
            Record::put("t", format!("key{i:05}"), v, vec![b'x'; (i % 50) as usize])
        }
    }

    fn build_in(dir: &Path, n: u32, format: TableFormat) -> Arc<SsTable> {
        let path = dir.join(table_file_name(1));
        let _ = std::fs::remove_file(&path);
        let mut b = TableBuilder::create(&RealVfs, &path, 1, 512, format, true).expect("create");
        for i in 0..n {
            let r = rec(i);
            b.add(&r.internal_key(), &r).expect("add");
        }
        let meta = b.finish().expect("finish");
        assert_eq!(meta.entries, u64::from(n));
        SsTable::open(&RealVfs, &path, 1).expect("open")
    }

    #[test]
    fn point_reads_and_iteration_return_what_was_written() {
        for format in [TableFormat::V1, TableFormat::V2, TableFormat::V3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let table = build_in(dir.path(), 1000, format);
            assert_eq!(table.format(), format);
            reads_back(&table);
        }
    }

    #[test]
    fn hash_range_scans_see_the_recomputed_ring_hash() {
        for format in [TableFormat::V1, TableFormat::V2, TableFormat::V3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let table = build_in(dir.path(), 1000, format);
            let half = HashRange::new(0, u64::MAX / 2);
            let ranges: Arc<[HashRange]> = Arc::from(vec![half]);
            let got: Vec<_> = TableIter::new(table.clone(), b"")
                .in_hash_ranges(Some(ranges))
                .map(|r| r.expect("iter").1.key.clone())
                .collect();
            let expected: Vec<_> = (0..1000)
                .map(rec)
                .filter(|r| half.contains(r.ring_hash))
                .map(|r| r.key)
                .collect();
            assert!(!expected.is_empty() && expected.len() < 1000);
            assert_eq!(got, expected, "{format:?}");
        }
    }

    #[test]
    fn each_format_keeps_its_filter_layout_and_the_filter_refuses_absent_keys() {
        for format in [TableFormat::V1, TableFormat::V2, TableFormat::V3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let table = build_in(dir.path(), 1000, format);
            let layout = match table.bloom {
                Bloom::Classic { .. } => FilterLayout::Classic,
                Bloom::Blocked { .. } => FilterLayout::Blocked,
            };
            assert_eq!(layout, format.filter_layout(), "{format:?}");
            // Absent keys between the stored ones, so the key range admits them all and the
            // filter alone decides: 0.05-0.1% of 9,990 expected.
            let admitted = (0..999u32)
                .flat_map(|i| (0..10).map(move |j| format!("key{i:05}-{j}")))
                .map(|key| Record::tombstone("t", key, Version::default()).internal_key())
                .filter(|k| table.may_contain(k, key_hash(k)))
                .count();
            assert!(admitted < 30, "{format:?}: {admitted} absent keys admitted");
        }
    }

    #[test]
    fn a_table_of_a_later_format_is_refused_by_its_version_before_its_filter_is_read() {
        // What a binary from before format 3 does with a format-3 table: refuses it whole.
        let dir = tempfile::tempdir().expect("tempdir");
        let table = build_in(dir.path(), 100, TableFormat::V3);
        let path = table.path().to_path_buf();
        drop(table);
        let mut bytes = std::fs::read(&path).expect("read");
        let footer = bytes.len() - FOOTER_LEN;
        bytes[footer + 36..footer + 40].copy_from_slice(&4u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[footer..footer + 40]);
        bytes[footer + 40..footer + 44].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let refused = SsTable::open(&RealVfs, &path, 1).expect_err("version 4 opened");
        assert!(
            refused.to_string().contains("unsupported format version 4"),
            "{refused}"
        );
    }

    #[test]
    fn format_2_tables_are_smaller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = build_in(dir.path(), 1000, TableFormat::V1).meta.file_bytes;
        let v2 = build_in(dir.path(), 1000, TableFormat::V2).meta.file_bytes;
        assert!(v2 * 10 < v1 * 8, "format 1: {v1} bytes, format 2: {v2}");
    }

    fn reads_back(table: &Arc<SsTable>) {
        assert!(table.block_count() > 10);
        for i in 0..1000 {
            let r = rec(i);
            assert!(table.may_contain(&r.internal_key(), key_hash(&r.internal_key())));
            assert_eq!(table.get(&r.internal_key()).expect("get"), Some(r));
        }
        assert_eq!(table.get(&rec(5000).internal_key()).expect("get"), None);
        let from = rec(500).internal_key();
        let rest: Vec<_> = TableIter::new(table.clone(), &from)
            .map(|r| r.expect("iter"))
            .collect();
        assert_eq!(rest.len(), 500);
        assert_eq!(*rest[0].1, rec(500));
        assert_eq!(
            table.meta.tombstones,
            (0..1000).filter(|i| i % 7 == 0).count() as u64
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// With page-sized blocks, padding between blocks is at most 1/16 of a page and only up
        /// to a page boundary; blocks of small entries start on pages, so one of at most a page
        /// lies in one page (a cold point read faults in one page); no block holds more than
        /// two pages before its last entry; and everything reads back, whatever the sizes of the
        /// entries.
        #[test]
        fn page_sized_blocks_start_on_pages_and_read_back(
            sizes in proptest::prop_oneof![
                proptest::collection::vec(0usize..100, 1..400),
                proptest::collection::vec(
                    proptest::prop_oneof![0usize..200, 200usize..1500, 1500usize..10_000],
                    1..400,
                ),
            ],
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(table_file_name(1));
            let records: Vec<Record> = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| {
                    let v = Version::new(VectorClock::from_entries([("c", i as u64 + 1)]));
                    Record::put("t", format!("key{i:05}"), v, vec![b'v'; size])
                })
                .collect();
            let mut b = TableBuilder::create(&RealVfs, &path, 1, 4096, TableFormat::V2, false)
                .expect("create");
            for r in &records {
                b.add(&r.internal_key(), r).expect("add");
            }
            b.finish().expect("finish");
            let table = SsTable::open(&RealVfs, &path, 1).expect("open");
            let small = sizes.iter().all(|&size| size < 100);
            let largest = sizes.iter().max().copied().unwrap_or(0) as u64;
            let mut padding = 0u64;
            for i in 0..table.block_count() {
                let (offset, len) = table.index.block(i).expect("block");
                if small {
                    proptest::prop_assert_eq!(offset % 4096, 0, "block {} at {}", i, offset);
                    if len <= 4096 {
                        proptest::prop_assert!(offset / 4096 == (offset + u64::from(len) - 1) / 4096);
                    }
                }
                // Two pages and the last entry (its value and at most 100 bytes of key,
                // version and header), never more.
                proptest::prop_assert!(
                    u64::from(len) <= 2 * 4096 + largest + 100,
                    "block {} of {} bytes, largest value {}", i, len, largest
                );
                if let Some((next, _)) = table.index.block(i + 1) {
                    let gap = next - (offset + u64::from(len));
                    proptest::prop_assert!(gap <= 256, "padding {}", gap);
                    if gap > 0 {
                        proptest::prop_assert_eq!(next % 4096, 0);
                    }
                    padding += gap;
                }
            }
            let data_end = table
                .index
                .block(table.block_count() - 1)
                .map_or(0, |(o, l)| o + u64::from(l));
            proptest::prop_assert!(padding * 15 <= data_end, "{} of {} bytes padding", padding, data_end);
            for r in &records {
                let got = table.get(&r.internal_key()).expect("get");
                proptest::prop_assert_eq!(got.as_ref(), Some(r));
            }
            let all: Vec<_> = TableIter::new(table.clone(), b"")
                .map(|r| r.expect("iter").1.key.clone())
                .collect();
            let expected: Vec<_> = records.iter().map(|r| r.key.clone()).collect();
            proptest::prop_assert_eq!(all, expected);
        }
    }

    /// Entries a little over a page long (8 KiB values) take a block each: a block that grew
    /// into the next page whenever more than 1/16 of a page was left held about a hundred of
    /// them (1.4 MB), whose CRC a point read checked each time (half a storage node's CPU under
    /// the streaming benchmark's load).
    #[test]
    fn values_of_eight_kib_take_a_block_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(table_file_name(1));
        let mut b =
            TableBuilder::create(&RealVfs, &path, 1, 4096, TableFormat::V3, false).expect("create");
        let records: Vec<Record> = (0..300u64)
            .map(|i| {
                let v = Version::new(VectorClock::from_entries([("c", i + 1)]));
                Record::put("t", format!("key{i:05}"), v, vec![b'v'; 8192])
            })
            .collect();
        for r in &records {
            b.add(&r.internal_key(), r).expect("add");
        }
        b.finish().expect("finish");
        let table = SsTable::open(&RealVfs, &path, 1).expect("open");
        assert_eq!(table.block_count(), records.len());
        let file = std::fs::metadata(&path).expect("stat").len();
        let data = 300 * 8192;
        assert!(file < data + data / 20, "{file} bytes for {data} of values");
        for r in &records {
            assert_eq!(table.get(&r.internal_key()).expect("get").as_ref(), Some(r));
        }
    }

    #[test]
    fn flipped_bytes_never_return_wrong_values() {
        for format in [TableFormat::V1, TableFormat::V2, TableFormat::V3] {
            flipped_bytes_never_return_wrong_values_in(format);
        }
    }

    fn flipped_bytes_never_return_wrong_values_in(format: TableFormat) {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = build_in(dir.path(), 200, format);
        let path = table.path().to_path_buf();
        drop(table);
        let original = std::fs::read(&path).expect("read");
        for pos in (0..original.len()).step_by(37) {
            let mut bytes = original.clone();
            bytes[pos] ^= 0x5a;
            std::fs::write(&path, &bytes).expect("write");
            let Ok(table) = SsTable::open(&RealVfs, &path, 1) else {
                continue;
            };
            for i in 0..200 {
                let r = rec(i);
                if let Ok(Some(found)) = table.get(&r.internal_key()) {
                    assert_eq!(found, r, "byte {pos} flipped gave a wrong value");
                }
            }
        }
    }
}
