//! The entries of a data block, in either table format (docs/sstable-format.md).
//!
//! - Format 1: `ikey_len:u32 ikey body_len:u32 body` with the record body of the commit log
//!   (ring hash included).
//! - Format 2: `shared:varint unshared:varint suffix body_len:varint body_v2`. An entry's
//!   internal key is the first `shared` bytes of the previous entry's key in the same block
//!   followed by `suffix` (the first entry of a block shares nothing), and `body_v2` carries
//!   no ring hash: it is recomputed from the key. The tenant prefix, the 4-byte lengths and
//!   the hash cost a 100-byte value about 25 bytes in format 1.
//! - Format 3: the entries of format 2; the table's bloom filter is blocked (one cache line
//!   per key, `super::bloom`).
//!
//! Invariant: a [`BlockCursor`] yields exactly the (key, record) pairs [`encode_entry`]
//! appended, in order, for both formats; on any other bytes it yields an error, never a panic
//! and never a key it did not decode from the block.

use crate::engine::codec::{
    CodecError, RawEntry, Reader, body_v2_len, decode_table_body_v2, encode_body_v2,
    encode_table_entry, put_varint,
};
use crate::engine::types::{Record, ring_position_of_internal_key};

use super::bloom::FilterLayout;

/// The layout of a table's data blocks, from the version in its footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableFormat {
    /// Fixed-width lengths and the stored ring hash (tables written before format 2).
    V1,
    /// Keys sharing prefixes within a block, varint lengths, no stored ring hash.
    V2,
    /// Format 2's entries with a blocked bloom filter (a key's probes in one cache line).
    #[default]
    V3,
}

impl TableFormat {
    /// The version number in a table's footer.
    pub fn version(self) -> u32 {
        match self {
            TableFormat::V1 => 1,
            TableFormat::V2 => 2,
            TableFormat::V3 => 3,
        }
    }

    /// The format of a footer's version number, if this build reads it.
    pub fn from_version(version: u32) -> Option<TableFormat> {
        match version {
            1 => Some(TableFormat::V1),
            2 => Some(TableFormat::V2),
            3 => Some(TableFormat::V3),
            _ => None,
        }
    }

    /// The layout of the bloom filter a table of this format is written with.
    pub fn filter_layout(self) -> FilterLayout {
        match self {
            TableFormat::V1 | TableFormat::V2 => FilterLayout::Classic,
            TableFormat::V3 => FilterLayout::Blocked,
        }
    }
}

/// Appends `record` under `ikey` to a block whose previous entry's key is `prev_key` (empty
/// for a block's first entry). Keys must be strictly ascending within a block.
pub fn encode_entry(
    format: TableFormat,
    prev_key: &[u8],
    ikey: &[u8],
    record: &Record,
    out: &mut Vec<u8>,
) {
    match format {
        TableFormat::V1 => encode_table_entry(record, out),
        TableFormat::V2 | TableFormat::V3 => {
            let shared = prev_key
                .iter()
                .zip(ikey)
                .take_while(|(a, b)| a == b)
                .count();
            let suffix = ikey.get(shared..).unwrap_or_default();
            put_varint(out, shared as u64);
            put_varint(out, suffix.len() as u64);
            out.extend_from_slice(suffix);
            let body_len = body_v2_len(record);
            put_varint(out, body_len as u64);
            let body_at = out.len();
            encode_body_v2(record, out);
            debug_assert_eq!(out.len() - body_at, body_len);
        }
    }
}

/// Walks the entries of one block's payload (CRC already checked).
pub struct BlockCursor<'a> {
    format: TableFormat,
    reader: Reader<'a>,
    key: Vec<u8>,
}

/// One entry: its internal key (borrowed from the cursor until its next step) and its body,
/// still encoded.
pub struct Entry<'k, 'a> {
    format: TableFormat,
    pub ikey: &'k [u8],
    body: &'a [u8],
}

impl<'a> BlockCursor<'a> {
    pub fn new(format: TableFormat, payload: &'a [u8]) -> Self {
        Self {
            format,
            reader: Reader::new(payload),
            key: Vec::with_capacity(64),
        }
    }

    /// The next entry, or `None` after the last one.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, 'a>>, CodecError> {
        if self.reader.remaining() == 0 {
            return Ok(None);
        }
        let body = match self.format {
            TableFormat::V1 => {
                let raw = RawEntry::read(&mut self.reader)?;
                self.key.clear();
                self.key.extend_from_slice(raw.ikey);
                raw.body
            }
            TableFormat::V2 | TableFormat::V3 => {
                let shared = self.reader.varint()?;
                let shared = usize::try_from(shared)
                    .ok()
                    .filter(|s| *s <= self.key.len())
                    .ok_or(CodecError::Invalid("key shares more than the previous key"))?;
                let suffix = self.reader.varint_prefixed()?;
                self.key.truncate(shared);
                self.key.extend_from_slice(suffix);
                self.reader.varint_prefixed()?
            }
        };
        Ok(Some(Entry {
            format: self.format,
            ikey: &self.key,
            body,
        }))
    }
}

impl Entry<'_, '_> {
    /// The record's ring position alone, without decoding the rest (hash-range scans skip
    /// most entries).
    pub fn ring_hash(&self) -> Result<u64, CodecError> {
        match self.format {
            TableFormat::V1 => RawEntry {
                ikey: self.ikey,
                body: self.body,
            }
            .ring_hash(),
            TableFormat::V2 | TableFormat::V3 => Ok(ring_position_of_internal_key(self.ikey)),
        }
    }

    pub fn decode(&self) -> Result<Record, CodecError> {
        match self.format {
            TableFormat::V1 => RawEntry {
                ikey: self.ikey,
                body: self.body,
            }
            .decode(),
            TableFormat::V2 | TableFormat::V3 => decode_table_body_v2(self.ikey, self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::{VectorClock, Version};

    fn records() -> Vec<Record> {
        let v = Version::new(VectorClock::from_entries([("c1", 7u64), ("c2", 1 << 50)]));
        let mut out = vec![
            Record::put("acme", "", v.clone(), ""),
            Record::put("acme", "user:1", v.clone(), "{\"a\":1}"),
            Record::tombstone("acme", "user:10", v.clone()),
            Record::put("acme", "user:2", v.clone(), vec![7u8; 300])
                .expiring(Some(1_900_000_000_000)),
            Record::put("acme:2", "user:1", v, "x"),
        ];
        out.sort_by_key(Record::internal_key);
        out
    }

    fn encode(format: TableFormat, records: &[Record]) -> Vec<u8> {
        let mut block = Vec::new();
        let mut prev = Vec::new();
        for r in records {
            let ikey = r.internal_key();
            encode_entry(format, &prev, &ikey, r, &mut block);
            prev = ikey;
        }
        block
    }

    fn decode_all(format: TableFormat, block: &[u8]) -> Result<Vec<Record>, CodecError> {
        let mut cursor = BlockCursor::new(format, block);
        let mut out = Vec::new();
        while let Some(entry) = cursor.next_entry()? {
            let record = entry.decode()?;
            assert_eq!(entry.ring_hash()?, record.ring_hash);
            assert_eq!(entry.ikey, record.internal_key().as_slice());
            out.push(record);
        }
        Ok(out)
    }

    #[test]
    fn both_formats_give_back_what_was_written() {
        let records = records();
        for format in [TableFormat::V1, TableFormat::V2, TableFormat::V3] {
            let block = encode(format, &records);
            assert_eq!(
                decode_all(format, &block),
                Ok(records.clone()),
                "{format:?}"
            );
        }
    }

    #[test]
    fn format_2_is_smaller() {
        let records = records();
        let v1 = encode(TableFormat::V1, &records).len();
        let v2 = encode(TableFormat::V2, &records).len();
        // Per entry: 6 bytes of lengths, 8 of ring hash, a byte of clock length, and the
        // shared key prefixes.
        assert!(v2 + 15 * records.len() <= v1, "v1 {v1} bytes, v2 {v2}");
    }

    #[test]
    fn damaged_blocks_fail_or_decode_never_panic() {
        let records = records();
        let block = encode(TableFormat::V2, &records);
        for cut in 0..block.len() {
            let decoded = decode_all(TableFormat::V2, &block[..cut]);
            assert!(decoded.is_err() || decoded.is_ok_and(|d| d.len() < records.len()));
        }
        for i in 0..block.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = block.clone();
                b[i] ^= flip;
                let _ = decode_all(TableFormat::V2, &b);
            }
        }
    }

    #[test]
    fn a_key_cannot_share_more_than_its_predecessor_holds() {
        // shared = 3 on a block's first entry.
        let block = [3u8, 1, b'k', 1, 2];
        let mut cursor = BlockCursor::new(TableFormat::V2, &block);
        assert!(cursor.next_entry().is_err());
    }

    #[test]
    fn body_lengths_are_known_before_encoding() {
        for record in records() {
            let mut body = Vec::new();
            encode_body_v2(&record, &mut body);
            assert_eq!(body_v2_len(&record), body.len(), "{record:?}");
        }
    }

    #[test]
    fn varints_round_trip_and_refuse_overflow() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(crate::engine::codec::varint_len(v), buf.len(), "{v}");
            assert_eq!(Reader::new(&buf).varint(), Ok(v));
        }
        let too_big = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&too_big).varint().is_err());
        let too_long = [0x80u8; 11];
        assert!(Reader::new(&too_long).varint().is_err());
    }
}
