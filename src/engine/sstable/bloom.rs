//! Bloom filters over internal keys, about 0.04% false positives, in two layouts:
//!
//! - **Blocked** (tables of format 3, the default since 2026-12-06): a key's probes all fall in
//!   one 64-byte line, picked by the high half of its xxh3 hash (multiply-shift, no division);
//!   the low half, multiplied by an odd constant before each probe, gives 10 bit positions in
//!   the line. A look-up touches one cache line; the lines are stored 64-byte aligned. 18 bits
//!   per key: the number of keys per line varies, so a blocked filter needs about 2 bits per
//!   key more than a classic one for the same rate (measured: 0.042% at 18 bits, 0.086% at 16).
//! - **Classic** (formats 1 and 2): 16 bits per key and 11 probes (10 and 7 in tables written
//!   before 2026-12-06) spread over the whole filter by double hashing,
//!   bit_i = (h1 + i*h2) mod nbits: a look-up that finds the key, which every read of a stored
//!   key does, costs 11 divisions and 11 cache lines of a filter of 2 MB per million keys.
//!
//! Why so few false positives, not RocksDB's customary 1%: every write reads its key's
//! current version first (the winner rule), and a new key is looked up in every L0 table and
//! one table per level, up to about 20 filters. At 1% that sent about one new key in six to
//! read a data block it does not hold, a page fault when the block is not in memory; under a
//! memory limit those faults were the writers' largest source of memory reclaim
//! (docs/benchmarks.md, "Round 3, step 14"). The filters cost 2-2.25 bytes per key of memory.
//!
//! Encoding (the table's bloom block): classic `probes:u8 bits` with probes 1..=30; blocked
//! `0xB1 probes:u8 lines` with 64-byte lines. Which one a table has is read from its first
//! byte; a binary from before format 3 never sees a blocked filter, because it refuses the
//! table's format version first.

use xxhash_rust::xxh3::xxh3_64;

use crate::engine::codec::{CodecError, Reader};

const CLASSIC_BITS_PER_KEY: usize = 16;
const BLOCKED_BITS_PER_KEY: usize = 18;
const CLASSIC_PROBES: u8 = 11;
const BLOCKED_PROBES: u8 = 10;
/// First byte of a blocked filter's encoding (a classic filter starts with its probe count).
const BLOCKED_TAG: u8 = 0xB1;
/// Bits of a line: 64 bytes, one cache line.
const LINE_BITS: usize = 512;
/// Multiplier that moves a blocked filter's probe hash to its next position (odd, so every
/// step is a bijection of the 32-bit values).
const PROBE_STEP: u32 = 0x9E37_79B9;

/// The layout a table's filter is built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLayout {
    Classic,
    Blocked,
}

#[derive(Debug, Clone)]
pub enum Bloom {
    Classic { bits: Vec<u8>, probes: u8 },
    Blocked { lines: Vec<Line>, probes: u8 },
}

/// 64 bytes of a blocked filter, aligned so that it is one cache line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(align(64))]
pub struct Line([u64; 8]);

pub fn key_hash(ikey: &[u8]) -> u64 {
    xxh3_64(ikey)
}

fn probe_bits(hash: u64, probes: u8, nbits: u64) -> impl Iterator<Item = u64> {
    let h1 = hash & 0xffff_ffff;
    let h2 = (hash >> 32) | 1;
    (0..u64::from(probes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % nbits)
}

/// The line of a blocked filter with `lines` lines that `hash` falls in (below `lines`).
fn line_of(hash: u64, lines: usize) -> usize {
    // Multiply-shift of the high 32 bits: (h * lines) / 2^32 < lines.
    (((hash >> 32) * lines as u64) >> 32) as usize
}

/// The bit positions within a line (0..512) of `hash`'s probes: the low 32 bits of the hash,
/// multiplied by [`PROBE_STEP`] before each probe, give their top 9 bits.
fn line_bits(hash: u64, probes: u8) -> impl Iterator<Item = usize> {
    let mut h = hash as u32;
    (0..probes).map(move |_| {
        h = h.wrapping_mul(PROBE_STEP);
        (h >> 23) as usize
    })
}

impl Line {
    fn set(&mut self, bit: usize) {
        if let Some(word) = self.0.get_mut(bit / 64) {
            *word |= 1 << (bit % 64);
        }
    }

    fn get(&self, bit: usize) -> bool {
        self.0
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }
}

impl Bloom {
    /// A filter that admits every key (a table being opened, before its filter is read).
    pub fn admit_all() -> Self {
        Bloom::Classic {
            bits: Vec::new(),
            probes: CLASSIC_PROBES,
        }
    }

    /// A filter holding `hashes` (from [`key_hash`]).
    pub fn build(hashes: &[u64], layout: FilterLayout) -> Self {
        match layout {
            FilterLayout::Classic => Self::build_classic(hashes),
            FilterLayout::Blocked => Self::build_blocked(hashes),
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "probe_bits yields bits below nbits, and bits has nbits / 8 bytes"
    )]
    fn build_classic(hashes: &[u64]) -> Self {
        let nbits = (hashes.len() * CLASSIC_BITS_PER_KEY).max(64).div_ceil(8) * 8;
        let mut bits = vec![0u8; nbits / 8];
        for &h in hashes {
            for bit in probe_bits(h, CLASSIC_PROBES, nbits as u64) {
                bits[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        Bloom::Classic {
            bits,
            probes: CLASSIC_PROBES,
        }
    }

    fn build_blocked(hashes: &[u64]) -> Self {
        let count = (hashes.len() * BLOCKED_BITS_PER_KEY)
            .div_ceil(LINE_BITS)
            .max(1);
        let mut lines = vec![Line::default(); count];
        for &h in hashes {
            if let Some(line) = lines.get_mut(line_of(h, count)) {
                for bit in line_bits(h, BLOCKED_PROBES) {
                    line.set(bit);
                }
            }
        }
        Bloom::Blocked {
            lines,
            probes: BLOCKED_PROBES,
        }
    }

    /// False means the key is certainly absent.
    pub fn may_contain(&self, hash: u64) -> bool {
        match self {
            Bloom::Blocked { lines, probes } => lines
                .get(line_of(hash, lines.len()))
                .is_none_or(|line| line_bits(hash, *probes).all(|bit| line.get(bit))),
            Bloom::Classic { bits, probes } => {
                let nbits = bits.len() as u64 * 8;
                if nbits == 0 {
                    return true;
                }
                probe_bits(hash, *probes, nbits).all(|bit| {
                    bits.get((bit / 8) as usize)
                        .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
                })
            }
        }
    }

    /// Classic: `probes:u8 bits...`; blocked: `0xB1 probes:u8 lines...`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Bloom::Classic { bits, probes } => {
                out.push(*probes);
                out.extend_from_slice(bits);
            }
            Bloom::Blocked { lines, probes } => {
                out.push(BLOCKED_TAG);
                out.push(*probes);
                for word in lines.iter().flat_map(|l| l.0) {
                    out.extend_from_slice(&word.to_le_bytes());
                }
            }
        }
    }

    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let first = r.u8()?;
        if first != BLOCKED_TAG {
            let probes = checked_probes(first)?;
            let bits = r.bytes(r.remaining())?.to_vec();
            return Ok(Bloom::Classic { bits, probes });
        }
        let probes = checked_probes(r.u8()?)?;
        let line_bytes = LINE_BITS / 8;
        if r.remaining() == 0 || r.remaining() % line_bytes != 0 {
            return Err(CodecError::Invalid("bloom lines"));
        }
        let lines = (0..r.remaining() / line_bytes)
            .map(|_| {
                let mut line = Line::default();
                for word in &mut line.0 {
                    *word = r.u64()?;
                }
                Ok(line)
            })
            .collect::<Result<_, CodecError>>()?;
        Ok(Bloom::Blocked { lines, probes })
    }
}

/// A probe count as stored (1..=30; anything else is damage).
fn checked_probes(probes: u8) -> Result<u8, CodecError> {
    if probes == 0 || probes > 30 {
        return Err(CodecError::Invalid("bloom probe count"));
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn false_positive_rate(layout: FilterLayout, keys: u32) -> f64 {
        let present: Vec<u64> = (0..keys).map(|i| key_hash(&i.to_le_bytes())).collect();
        let bloom = Bloom::build(&present, layout);
        assert!(
            present.iter().all(|h| bloom.may_contain(*h)),
            "{layout:?}: a key it holds was refused"
        );
        let mut buf = Vec::new();
        bloom.encode(&mut buf);
        let back = Bloom::decode(&buf).expect("decode");
        assert!(present.iter().all(|h| back.may_contain(*h)));
        let absent = 1_000_000u32;
        let false_positives = (keys..keys + absent)
            .filter(|i| back.may_contain(key_hash(&i.to_le_bytes())))
            .count();
        false_positives as f64 / f64::from(absent)
    }

    #[test]
    fn no_false_negatives_and_about_one_in_two_thousand_false_positives_in_both_layouts() {
        for keys in [10_000, 100_000] {
            let classic = false_positive_rate(FilterLayout::Classic, keys);
            assert!(classic < 0.0008, "classic, {keys} keys: {classic}");
            let blocked = false_positive_rate(FilterLayout::Blocked, keys);
            assert!(blocked < 0.0008, "blocked, {keys} keys: {blocked}");
        }
    }

    #[test]
    fn a_blocked_filter_looks_in_one_aligned_line() {
        let hashes: Vec<u64> = (0..5_000u32).map(|i| key_hash(&i.to_le_bytes())).collect();
        let Bloom::Blocked { lines, .. } = Bloom::build(&hashes, FilterLayout::Blocked) else {
            panic!("not blocked");
        };
        assert_eq!(
            lines.len(),
            (5_000 * BLOCKED_BITS_PER_KEY).div_ceil(LINE_BITS)
        );
        assert_eq!(lines.as_ptr() as usize % 64, 0);
        for h in hashes {
            assert!(line_of(h, lines.len()) < lines.len());
        }
    }

    #[test]
    fn damaged_encodings_are_refused() {
        let bloom = Bloom::build(&[1, 2, 3], FilterLayout::Blocked);
        let mut buf = Vec::new();
        bloom.encode(&mut buf);
        assert!(Bloom::decode(&buf[..buf.len() - 1]).is_err(), "cut line");
        assert!(Bloom::decode(&buf[..2]).is_err(), "no lines");
        assert!(Bloom::decode(&[BLOCKED_TAG, 0, 0]).is_err(), "no probes");
        assert!(Bloom::decode(&[0]).is_err(), "classic without probes");
        assert!(Bloom::decode(&[]).is_err(), "empty");
    }

    #[test]
    fn an_empty_filter_admits_everything() {
        let bloom = Bloom::admit_all();
        assert!(bloom.may_contain(0) && bloom.may_contain(u64::MAX));
    }
}
