//! The in-memory index of a table's data blocks: each block's last internal key, offset and
//! length, in flat arrays.
//!
//! A point read binary-searches it. Kept as one `Vec` of entries each owning its key, every
//! step of that search read an entry and then followed its pointer to the key: two cache
//! misses per step once the index is larger than the CPU's caches. Here the keys share one
//! buffer and the search reads `ends` (8 bytes a block, small enough to stay cached) and one
//! key; each entry also costs no allocation of its own (about 40 bytes less per block).
//!
//! Invariant: entry `i`'s key is `keys[ends[i - 1]..ends[i]]` (from 0 for the first), and
//! `ends` never decreases; [`BlockIndex::push`] is the only way entries are added.

/// Last keys, offsets and lengths of a table's data blocks, in block order.
#[derive(Debug, Default)]
pub struct BlockIndex {
    /// Every block's last key, one after the other.
    keys: Vec<u8>,
    /// Where each block's last key ends in `keys`.
    ends: Vec<usize>,
    /// Each block's (offset, length) in the file.
    blocks: Vec<(u64, u32)>,
}

impl BlockIndex {
    /// An empty index with room for `blocks` entries.
    pub fn with_capacity(blocks: usize) -> Self {
        Self {
            keys: Vec::new(),
            ends: Vec::with_capacity(blocks),
            blocks: Vec::with_capacity(blocks),
        }
    }

    /// Appends the next block: its last key, offset and length.
    pub fn push(&mut self, last_key: &[u8], offset: u64, len: u32) {
        self.keys.extend_from_slice(last_key);
        self.ends.push(self.keys.len());
        self.blocks.push((offset, len));
    }

    /// Gives back the spare capacity the pushes left (the index lives as long as its table).
    pub fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.blocks.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i`'s (offset, length) in the file.
    pub fn block(&self, i: usize) -> Option<(u64, u32)> {
        self.blocks.get(i).copied()
    }

    /// Block `i`'s last key (empty past the end).
    fn last_key(&self, i: usize) -> &[u8] {
        let start = match i {
            0 => 0,
            _ => self.ends.get(i - 1).copied().unwrap_or(0),
        };
        let end = self.ends.get(i).copied().unwrap_or(start);
        self.keys.get(start..end).unwrap_or_default()
    }

    /// The first block whose last key is >= `ikey`: the only block that can hold it, and
    /// where a scan from `ikey` starts (`len()` when every key is smaller).
    pub fn first_block_from(&self, ikey: &[u8]) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.last_key(mid) < ikey {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The search answers what a search over a plain list of (key, block) gives.
        #[test]
        fn finds_what_a_plain_list_finds(
            mut keys in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 0..6), 0..40),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 1..20),
        ) {
            let keys: Vec<Vec<u8>> = std::mem::take(&mut keys).into_iter().collect();
            let mut index = BlockIndex::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                index.push(k, i as u64 * 100, i as u32 + 1);
            }
            prop_assert_eq!(index.len(), keys.len());
            for (i, k) in keys.iter().enumerate() {
                prop_assert_eq!(index.last_key(i), k.as_slice());
                prop_assert_eq!(index.block(i), Some((i as u64 * 100, i as u32 + 1)));
            }
            prop_assert_eq!(index.block(keys.len()), None);
            for probe in probes.iter().chain(keys.iter()) {
                let expected = keys.partition_point(|k| k.as_slice() < probe.as_slice());
                prop_assert_eq!(index.first_block_from(probe), expected);
            }
        }
    }
}
