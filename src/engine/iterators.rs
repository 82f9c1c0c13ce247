//! Merging sorted sources (memtables, SSTables) into one stream with one record per key: the
//! winner by the version rules (`Version::winner`), whatever source it came from.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use super::error::Result;
use super::memtable::Memtable;
use super::types::Record;
use crate::ring::HashRange;

pub type Entry = (Vec<u8>, Arc<Record>);
pub type Source = Box<dyn Iterator<Item = Result<Entry>> + Send>;

/// Entries a memtable cursor visits per search (one `lower_bound`, then a walk): a search
/// costs a descent through up to 32 levels of cache misses, a step along the bottom level one.
const CURSOR_STRIDE: usize = 64;

/// Walks a memtable from a start key without borrowing it, a stride of entries at a time
/// ([`Memtable::fill_after`]). Like a table's iterator, it yields only the records whose ring
/// hash lies in `ranges` (when given). A record inserted while the cursor is alive is seen
/// when its key lies beyond the stride already taken, as with any concurrent scan.
pub struct MemtableCursor {
    table: Arc<Memtable>,
    from: Vec<u8>,
    ranges: Option<Arc<[HashRange]>>,
    buffered: VecDeque<Entry>,
    /// The last key visited; `None` before the first fill.
    last: Option<Vec<u8>>,
    done: bool,
}

impl MemtableCursor {
    pub fn new(table: Arc<Memtable>, from: &[u8]) -> Self {
        Self {
            table,
            from: from.to_vec(),
            ranges: None,
            buffered: VecDeque::new(),
            last: None,
            done: false,
        }
    }

    /// Only records whose ring hash lies in one of `ranges`.
    pub fn in_hash_ranges(mut self, ranges: Option<Arc<[HashRange]>>) -> Self {
        self.ranges = ranges;
        self
    }
}

impl Iterator for MemtableCursor {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Self::Item> {
        while self.buffered.is_empty() && !self.done {
            let ranges = self.ranges.as_deref();
            let keep =
                |r: &Record| ranges.is_none_or(|rs| HashRange::any_contains(rs, r.ring_hash));
            match self.table.fill_after(
                self.last.as_deref(),
                &self.from,
                CURSOR_STRIDE,
                &keep,
                &mut self.buffered,
            ) {
                Some(last) => self.last = Some(last),
                None => self.done = true,
            }
        }
        self.buffered.pop_front().map(Ok)
    }
}

struct Head {
    key: Vec<u8>,
    source: usize,
    record: Arc<Record>,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    // BinaryHeap is a max-heap: reverse so the smallest key (then lowest source) pops first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .key
            .cmp(&self.key)
            .then_with(|| other.source.cmp(&self.source))
    }
}

/// K-way merge; ends after the first error.
pub struct MergeIter {
    sources: Vec<Source>,
    heap: BinaryHeap<Head>,
    pending_error: Option<super::error::EngineError>,
    started: bool,
}

impl MergeIter {
    pub fn new(sources: Vec<Source>) -> Self {
        Self {
            sources,
            heap: BinaryHeap::new(),
            pending_error: None,
            started: false,
        }
    }

    fn pull(&mut self, source: usize) {
        match self.sources.get_mut(source).and_then(Iterator::next) {
            Some(Ok((key, record))) => self.heap.push(Head {
                key,
                source,
                record,
            }),
            Some(Err(e)) if self.pending_error.is_none() => self.pending_error = Some(e),
            Some(Err(_)) => {}
            None => {}
        }
    }
}

impl Iterator for MergeIter {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            for i in 0..self.sources.len() {
                self.pull(i);
            }
        }
        if let Some(e) = self.pending_error.take() {
            self.heap.clear();
            self.sources.clear();
            return Some(Err(e));
        }
        let first = self.heap.pop()?;
        self.pull(first.source);
        let mut winner = first.record;
        while self.heap.peek().is_some_and(|h| h.key == first.key) {
            if let Some(dup) = self.heap.pop() {
                if dup.record.version.supersedes(&winner.version) {
                    winner = dup.record;
                }
                self.pull(dup.source);
            }
        }
        if let Some(e) = self.pending_error.take() {
            self.heap.clear();
            self.sources.clear();
            return Some(Err(e));
        }
        Some(Ok((first.key, winner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::{VectorClock, Version};

    fn entry(key: &str, coord: &str, counter: u64) -> Result<Entry> {
        let r = Record::put(
            "t",
            key.to_owned(),
            Version::new(VectorClock::from_entries([(coord, counter)])),
            coord.to_owned(),
        );
        Ok((r.internal_key(), Arc::new(r)))
    }

    fn source(entries: Vec<Result<Entry>>) -> Source {
        Box::new(entries.into_iter())
    }

    #[test]
    fn merge_keeps_the_winner_whichever_source_holds_it() {
        for flip in [false, true] {
            let newer = vec![entry("a", "c2", 20), entry("b", "c1", 5)];
            let older = vec![
                entry("a", "c1", 10),
                entry("b", "c9", 50),
                entry("c", "c1", 1),
            ];
            let sources = if flip {
                vec![source(older), source(newer)]
            } else {
                vec![source(newer), source(older)]
            };
            let merged: Vec<(String, String)> = MergeIter::new(sources)
                .map(|e| e.expect("entry"))
                .map(|(_, r)| {
                    (
                        String::from_utf8_lossy(&r.key).into_owned(),
                        r.writer_for_test(),
                    )
                })
                .collect();
            assert_eq!(
                merged,
                vec![
                    ("a".into(), "c2".into()),
                    ("b".into(), "c9".into()),
                    ("c".into(), "c1".into())
                ]
            );
        }
    }

    #[test]
    fn merge_stops_at_the_first_error() {
        let failing: Source = Box::new(
            vec![entry("a", "c1", 1), Err(crate::engine::EngineError::Closed)].into_iter(),
        );
        let items: Vec<_> =
            MergeIter::new(vec![failing, source(vec![entry("b", "c1", 1)])]).collect();
        assert!(items.iter().any(|i| i.is_err()));
        assert!(items.last().is_some_and(|i| i.is_err()));
    }

    proptest::proptest! {
        /// Against a sorted model: the cursor yields exactly the keys >= `from` whose ring
        /// hash lies in the ranges, in order, whatever the stride boundaries.
        #[test]
        fn a_memtable_cursor_yields_what_a_sorted_filter_would(
            keys in proptest::collection::btree_set(0u16..2000, 0..400),
            from in 0u16..2100,
            cut in proptest::option::of((proptest::num::u64::ANY, proptest::num::u64::ANY)),
        ) {
            let table = Arc::new(Memtable::new(usize::MAX));
            let mut model = Vec::new();
            for (seq, k) in keys.iter().enumerate() {
                let (ikey, record) = entry(&format!("{k:05}"), "c", 1).expect("entry");
                model.push((ikey.clone(), record.ring_hash));
                table.insert(ikey, record, seq as u64 + 1);
            }
            model.sort();
            let start = Record::put(
                "t",
                format!("{from:05}"),
                Version::new(VectorClock::from_entries([("c", 1)])),
                "",
            )
            .internal_key();
            let ranges: Option<Arc<[HashRange]>> =
                cut.map(|(a, b)| Arc::from(vec![HashRange::new(a, b)]));
            let expected: Vec<Vec<u8>> = model
                .iter()
                .filter(|(k, _)| *k >= start)
                .filter(|(_, h)| ranges.as_deref().is_none_or(|rs| rs[0].contains(*h)))
                .map(|(k, _)| k.clone())
                .collect();
            let got: Vec<Vec<u8>> = MemtableCursor::new(table, &start)
                .in_hash_ranges(ranges)
                .map(|e| e.expect("entry").0)
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    impl Record {
        fn writer_for_test(&self) -> String {
            self.version.writer().unwrap_or_default().to_owned()
        }
    }
}
