//! Merging sorted sources (memtables, SSTables) into one stream with one record per key: the
//! winner by the version rules (`Version::winner`), whatever source it came from.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use super::error::Result;
use super::memtable::Memtable;
use super::types::Record;

pub type Entry = (Vec<u8>, Arc<Record>);
pub type Source = Box<dyn Iterator<Item = Result<Entry>> + Send>;

/// Walks a memtable from a start key without borrowing it.
pub struct MemtableCursor {
    table: Arc<Memtable>,
    from: Vec<u8>,
    last: Option<Vec<u8>>,
}

impl MemtableCursor {
    pub fn new(table: Arc<Memtable>, from: &[u8]) -> Self {
        Self {
            table,
            from: from.to_vec(),
            last: None,
        }
    }
}

impl Iterator for MemtableCursor {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Self::Item> {
        let (key, record) = self.table.next_after(self.last.as_deref(), &self.from)?;
        self.last = Some(key.clone());
        Some(Ok((key, record)))
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
        match self.sources[source].next() {
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
