//! Bloom filter over internal keys: 16 bits per key and 11 probes (about 0.05% false
//! positives). Probes use double hashing of one xxh3 hash: bit_i = (h1 + i*h2) mod nbits.
//!
//! Why 16 bits and not RocksDB's customary 10 (1%): every write reads its key's current
//! version first (the winner rule), and a new key is looked up in every L0 table and one
//! table per level, up to about 20 filters. At 1% that sent about one new key in six to read a
//! data block it does not hold, a page fault when the block is not in memory; under a memory
//! limit those faults were the writers' largest source of memory reclaim (docs/benchmarks.md,
//! "Round 3, step 14"). The filters cost 2 bytes per key in memory instead of 1.25. Tables
//! keep their own probe count, so tables written before read as they were.

use xxhash_rust::xxh3::xxh3_64;

use crate::engine::codec::{CodecError, Reader};

const BITS_PER_KEY: usize = 16;
const PROBES: u8 = 11;

#[derive(Debug, Clone)]
pub struct Bloom {
    bits: Vec<u8>,
    probes: u8,
}

pub fn key_hash(ikey: &[u8]) -> u64 {
    xxh3_64(ikey)
}

fn probe_bits(hash: u64, probes: u8, nbits: u64) -> impl Iterator<Item = u64> {
    let h1 = hash & 0xffff_ffff;
    let h2 = (hash >> 32) | 1;
    (0..u64::from(probes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % nbits)
}

impl Bloom {
    /// A filter holding `hashes` (from [`key_hash`]).
    #[expect(
        clippy::indexing_slicing,
        reason = "probe_bits yields bits below nbits, and bits has nbits / 8 bytes"
    )]
    pub fn build(hashes: &[u64]) -> Self {
        let nbits = (hashes.len() * BITS_PER_KEY).max(64).div_ceil(8) * 8;
        let mut bits = vec![0u8; nbits / 8];
        for &h in hashes {
            for bit in probe_bits(h, PROBES, nbits as u64) {
                bits[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        Self {
            bits,
            probes: PROBES,
        }
    }

    /// False means the key is certainly absent.
    pub fn may_contain(&self, hash: u64) -> bool {
        let nbits = self.bits.len() as u64 * 8;
        if nbits == 0 {
            return true;
        }
        probe_bits(hash, self.probes, nbits).all(|bit| {
            self.bits
                .get((bit / 8) as usize)
                .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
        })
    }

    /// `probes:u8 bits...`
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.probes);
        out.extend_from_slice(&self.bits);
    }

    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let probes = r.u8()?;
        if probes == 0 || probes > 30 {
            return Err(CodecError::Invalid("bloom probe count"));
        }
        let bits = r.bytes(r.remaining())?.to_vec();
        Ok(Self { bits, probes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_about_one_in_two_thousand_false_positives() {
        let present: Vec<u64> = (0..10_000u32).map(|i| key_hash(&i.to_le_bytes())).collect();
        let bloom = Bloom::build(&present);
        assert!(present.iter().all(|h| bloom.may_contain(*h)));
        let false_positives = (10_000..110_000u32)
            .filter(|i| bloom.may_contain(key_hash(&i.to_le_bytes())))
            .count();
        let rate = false_positives as f64 / 100_000.0;
        assert!(rate < 0.0015, "false positive rate {rate}");
        let mut buf = Vec::new();
        bloom.encode(&mut buf);
        let back = Bloom::decode(&buf).expect("decode");
        assert!(present.iter().all(|h| back.may_contain(*h)));
    }
}
