//! Binary encoding of records, shared by the commit log and SSTables.
//!
//! All integers little-endian. Decoders never panic and never index unchecked: every read
//! goes through [`Reader`], which fails with [`CodecError`] on short or malformed input.
//!
//! ```text
//! body  := kind:u8 (1 put, 2 tombstone, 3 expiring put) ring_hash:u64
//!          [ expires_at_ms:u64 ]                    (expiring put only)
//!          clock_len:u16 { id_len:u8 id:bytes counter:u64 }*clock_len
//!          [ value_len:u32 value:bytes ]            (puts only)
//! log record payload := tenant_len:u16 tenant key_len:u32 key body
//! table entry (v1)   := ikey_len:u32 ikey body_len:u32 body
//!
//! body v2 (tables of format 2) := kind:u8 [ expires_at_ms:u64 ]
//!          clock_len:varint { id_len:u8 id:bytes counter:u64 }*clock_len
//!          [ value_len:varint value:bytes ]
//! ```
//! Body v2 drops the ring hash (it is xxh3 of the internal key, recomputed on read) and
//! writes its counts as LEB128 varints; counters stay fixed 8 bytes (hybrid timestamps near
//! 2^50 would take 8 as varints too). Table entries of format 2 are in `sstable::block`.

use bytes::Bytes;

use crate::vclock::{VectorClock, Version};

use super::types::{Record, internal_key, ring_position_of_internal_key, split_internal_key};

const KIND_PUT: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
const KIND_EXPIRING_PUT: u8 = 3;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("input ends early")]
    Truncated,
    #[error("malformed input: {0}")]
    Invalid(&'static str),
}

/// Bounds-checked little-endian reader.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        let slice = self.buf.get(self.pos..end).ok_or(CodecError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A `u32` length followed by that many bytes.
    pub fn len_prefixed(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }

    /// An unsigned LEB128 varint of at most 10 bytes that fits a `u64`.
    pub fn varint(&mut self) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(CodecError::Invalid("varint overflows 64 bits"));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::Invalid("varint longer than 10 bytes"))
    }

    /// A varint length that must fit `usize`, followed by that many bytes.
    pub fn varint_prefixed(&mut self) -> Result<&'a [u8], CodecError> {
        let n = usize::try_from(self.varint()?).map_err(|_| CodecError::Truncated)?;
        self.bytes(n)
    }
}

/// Appends `v` as an unsigned LEB128 varint (1 to 10 bytes).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The kind byte of a record. `validate` refuses tombstones with an expiry, so a tombstone
/// never loses one here.
fn kind_of(record: &Record) -> u8 {
    match (&record.value, record.expires_at_ms) {
        (None, _) => KIND_TOMBSTONE,
        (Some(_), None) => KIND_PUT,
        (Some(_), Some(_)) => KIND_EXPIRING_PUT,
    }
}

/// `{ id_len:u8 id counter:u64 }` for each clock entry.
fn put_clock_entries(record: &Record, out: &mut Vec<u8>) {
    for (id, counter) in record.version.clock.iter() {
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        put_u64(out, counter);
    }
}

/// `n` clock entries as `put_clock_entries` wrote them.
fn read_clock_entries(r: &mut Reader<'_>, n: usize) -> Result<Vec<(String, u64)>, CodecError> {
    // Each entry takes at least 9 bytes: a hostile count allocates no more than the input.
    let mut entries = Vec::with_capacity(n.min(r.remaining() / 9));
    for _ in 0..n {
        let len = r.u8()?;
        let id = std::str::from_utf8(r.bytes(usize::from(len))?)
            .map_err(|_| CodecError::Invalid("clock id is not UTF-8"))?;
        entries.push((id.to_owned(), r.u64()?));
    }
    Ok(entries)
}

/// Lengths are validated before encoding (key <= 1 KiB, value <= 10 MiB, clock <= 1000
/// entries, ids <= 128 bytes), so the narrowing casts below cannot truncate.
fn encode_body(record: &Record, out: &mut Vec<u8>) {
    let kind = kind_of(record);
    out.push(kind);
    put_u64(out, record.ring_hash);
    if let (KIND_EXPIRING_PUT, Some(at)) = (kind, record.expires_at_ms) {
        put_u64(out, at);
    }
    put_u16(out, record.version.clock.len() as u16);
    put_clock_entries(record, out);
    if let Some(v) = &record.value {
        put_u32(out, v.len() as u32);
        out.extend_from_slice(v);
    }
}

struct Body {
    ring_hash: u64,
    version: Version,
    value: Option<Bytes>,
    expires_at_ms: Option<u64>,
}

/// How a decoder turns the bytes of a key or value into an owned `Bytes`.
type ToBytes<'s> = &'s dyn Fn(&[u8]) -> Bytes;

fn decode_body(r: &mut Reader<'_>, to_bytes: ToBytes<'_>) -> Result<Body, CodecError> {
    let kind = r.u8()?;
    let ring_hash = r.u64()?;
    let expires_at_ms = match kind {
        KIND_EXPIRING_PUT => Some(r.u64()?),
        _ => None,
    };
    let n = r.u16()?;
    let entries = read_clock_entries(r, usize::from(n))?;
    let value = match kind {
        KIND_PUT | KIND_EXPIRING_PUT => Some(to_bytes(r.len_prefixed()?)),
        KIND_TOMBSTONE => None,
        _ => return Err(CodecError::Invalid("unknown record kind")),
    };
    Ok(Body {
        ring_hash,
        version: Version::new(VectorClock::from_entries(entries)),
        value,
        expires_at_ms,
    })
}

/// Appends the format-2 table body of `record` (no ring hash, varint counts).
pub fn encode_body_v2(record: &Record, out: &mut Vec<u8>) {
    let kind = kind_of(record);
    out.push(kind);
    if let (KIND_EXPIRING_PUT, Some(at)) = (kind, record.expires_at_ms) {
        put_u64(out, at);
    }
    put_varint(out, record.version.clock.len() as u64);
    put_clock_entries(record, out);
    if let Some(v) = &record.value {
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// The bytes [`encode_body_v2`] appends for `record`.
pub fn body_v2_len(record: &Record) -> usize {
    let clock = &record.version.clock;
    1 + if kind_of(record) == KIND_EXPIRING_PUT {
        8
    } else {
        0
    } + varint_len(clock.len() as u64)
        + clock.iter().map(|(id, _)| 1 + id.len() + 8).sum::<usize>()
        + record
            .value
            .as_ref()
            .map_or(0, |v| varint_len(v.len() as u64) + v.len())
}

/// The bytes [`put_varint`] writes for `v`.
pub fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Decodes a format-2 table body stored under `ikey` (the whole slice must be the body).
pub fn decode_table_body_v2(ikey: &[u8], body: &[u8]) -> Result<Record, CodecError> {
    let (tenant, key) = split_internal_key(ikey).ok_or(CodecError::Invalid("bad internal key"))?;
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    let expires_at_ms = match kind {
        KIND_EXPIRING_PUT => Some(r.u64()?),
        KIND_PUT | KIND_TOMBSTONE => None,
        _ => return Err(CodecError::Invalid("unknown record kind")),
    };
    let n = r.varint()?;
    if n > u64::from(u16::MAX) {
        return Err(CodecError::Invalid("clock longer than 65535 entries"));
    }
    let entries = read_clock_entries(&mut r, n as usize)?;
    let value = match kind {
        KIND_TOMBSTONE => None,
        _ => Some(Bytes::copy_from_slice(r.varint_prefixed()?)),
    };
    if r.remaining() != 0 {
        return Err(CodecError::Invalid("trailing bytes after record"));
    }
    Ok(Record {
        tenant: tenant.to_owned(),
        key: Bytes::copy_from_slice(key),
        version: Version::new(VectorClock::from_entries(entries)),
        value,
        ring_hash: ring_position_of_internal_key(ikey),
        expires_at_ms,
    })
}

/// Appends a commit-log payload for `record`.
pub fn encode_log_record(record: &Record, out: &mut Vec<u8>) {
    put_u16(out, record.tenant.len() as u16);
    out.extend_from_slice(record.tenant.as_bytes());
    put_u32(out, record.key.len() as u32);
    out.extend_from_slice(&record.key);
    encode_body(record, out);
}

/// Decodes a commit-log payload (the whole slice must be one record).
pub fn decode_log_record(payload: &[u8]) -> Result<Record, CodecError> {
    decode_log_record_with(payload, &Bytes::copy_from_slice)
}

/// [`decode_log_record`] for a `payload` that lies inside `whole`: the key and value are
/// slices of `whole` (no copy), which they keep alive.
pub fn decode_log_record_in(whole: &Bytes, payload: &[u8]) -> Result<Record, CodecError> {
    decode_log_record_with(payload, &|part| whole.slice_ref(part))
}

fn decode_log_record_with(payload: &[u8], to_bytes: ToBytes<'_>) -> Result<Record, CodecError> {
    let mut r = Reader::new(payload);
    let tlen = r.u16()?;
    let tenant = std::str::from_utf8(r.bytes(usize::from(tlen))?)
        .map_err(|_| CodecError::Invalid("tenant is not UTF-8"))?
        .to_owned();
    let key = to_bytes(r.len_prefixed()?);
    let body = decode_body(&mut r, to_bytes)?;
    if r.remaining() != 0 {
        return Err(CodecError::Invalid("trailing bytes after record"));
    }
    Ok(Record {
        tenant,
        key,
        version: body.version,
        value: body.value,
        ring_hash: body.ring_hash,
        expires_at_ms: body.expires_at_ms,
    })
}

/// Appends an SSTable entry for `record`.
#[expect(
    clippy::indexing_slicing,
    reason = "the length slot is the 4 bytes pushed just before"
)]
pub fn encode_table_entry(record: &Record, out: &mut Vec<u8>) {
    let ikey = internal_key(&record.tenant, &record.key);
    put_u32(out, ikey.len() as u32);
    out.extend_from_slice(&ikey);
    let len_at = out.len();
    put_u32(out, 0);
    encode_body(record, out);
    let body_len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&body_len.to_le_bytes());
}

/// One SSTable entry with its body still encoded: lookups compare keys without decoding values.
pub struct RawEntry<'a> {
    pub ikey: &'a [u8],
    pub body: &'a [u8],
}

impl RawEntry<'_> {
    pub fn read<'a>(r: &mut Reader<'a>) -> Result<RawEntry<'a>, CodecError> {
        let ikey = r.len_prefixed()?;
        let body = r.len_prefixed()?;
        Ok(RawEntry { ikey, body })
    }

    /// The ring hash alone, without decoding the rest (hash-range scans skip most entries).
    pub fn ring_hash(&self) -> Result<u64, CodecError> {
        let mut r = Reader::new(self.body);
        r.u8()?;
        r.u64()
    }

    pub fn decode(&self) -> Result<Record, CodecError> {
        let (tenant, key) =
            split_internal_key(self.ikey).ok_or(CodecError::Invalid("bad internal key"))?;
        let mut r = Reader::new(self.body);
        let body = decode_body(&mut r, &Bytes::copy_from_slice)?;
        Ok(Record {
            tenant: tenant.to_owned(),
            key: Bytes::copy_from_slice(key),
            version: body.version,
            value: body.value,
            ring_hash: body.ring_hash,
            expires_at_ms: body.expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A put, a tombstone, an expiring put.
    fn samples() -> [Record; 3] {
        let v = Version::new(VectorClock::from_entries([("c1", 7u64), ("c2", 1 << 40)]));
        [
            Record::put("acme", "user:1", v.clone(), "{\"a\":1}"),
            Record::tombstone("acme", "user:1", v.clone()),
            Record::put("acme", "user:1", v, "{\"a\":1}").expiring(Some(1_900_000_000_000)),
        ]
    }

    #[test]
    fn records_round_trip() {
        for rec in samples() {
            let mut buf = Vec::new();
            encode_log_record(&rec, &mut buf);
            assert_eq!(decode_log_record(&buf), Ok(rec.clone()));
            let mut buf = Vec::new();
            encode_table_entry(&rec, &mut buf);
            let mut r = Reader::new(&buf);
            let raw = RawEntry::read(&mut r).expect("entry");
            assert_eq!(raw.decode(), Ok(rec.clone()));
            assert_eq!(raw.ring_hash(), Ok(rec.ring_hash));
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error_or_a_valid_record() {
        for rec in samples() {
            let mut buf = Vec::new();
            encode_log_record(&rec, &mut buf);
            for cut in 0..buf.len() {
                assert!(decode_log_record(&buf[..cut]).is_err(), "cut at {cut}");
            }
            for i in 0..buf.len() {
                let mut b = buf.clone();
                b[i] ^= 0xff;
                let _ = decode_log_record(&b); // must not panic
            }
        }
    }
}
