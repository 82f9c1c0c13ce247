//! Versions: vector clocks whose counters are hybrid-logical timestamps.
//!
//! A [`Version`] is a [`VectorClock`] `{coordinator_id: counter}`. Every counter a coordinator
//! issues comes from its [`HybridClock`]: `(milliseconds since 2020-01-01 UTC) << 12 | logical`,
//! strictly above everything that clock issued or observed before, also across restarts (the
//! clock resumes from a durable high-water mark, see [`HybridClock::tick`]). 41 bits of
//! milliseconds plus 12 logical bits keep every counter below 2^53, so the JSON wire form
//! `{"c1": 6934771630080}` survives JavaScript clients.
//!
//! Invariants (property-tested in `tests/vclock_props.rs`):
//! - `merge` is commutative, associative and idempotent, and its result dominates or equals
//!   both inputs.
//! - `compare` is antisymmetric: `a.compare(b) == Before` iff `b.compare(a) == After`.
//! - [`Version::precedence`] is a total order that extends dominance: if `a` dominates `b`, `a`
//!   takes precedence. Concurrent versions are ordered last-write-wins by their timestamp (the
//!   highest counter, which carries the writer's wall clock), then the writer's coordinator id,
//!   then the rest of the clock. Because it is one total order, the winner of a set of versions
//!   is the same whatever order they arrive in ([`Version::winner`]), which is what makes hints,
//!   repairs, streaming and retries order-insensitive.
//! - A version's timestamp is the physical part of its highest counter. A coordinator's new
//!   counter is above every counter of the causal context, so a version never has an older
//!   timestamp than a version it dominates.
//! - Clocks are bounded: [`VectorClock::prune`] drops the entries with the smallest counters
//!   (the oldest writers, as Riak prunes by entry age) past `max_entries`. Pruning never removes
//!   the highest counter, so the timestamp and winner rules still hold; a pruned descendant may
//!   compare as concurrent instead of after, and then last-write-wins picks it anyway because
//!   its timestamp is the newer one.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// 2020-01-01T00:00:00Z in milliseconds since the Unix epoch: counters count from here.
pub const CLOCK_EPOCH_MS: u64 = 1_577_836_800_000;
/// Low bits of a counter reserved for the logical part.
pub const LOGICAL_BITS: u32 = 12;
/// Entries a clock keeps by default before pruning the oldest.
pub const DEFAULT_MAX_ENTRIES: usize = 64;
/// Largest clock accepted from the wire (STORAGE.md limits).
pub const MAX_WIRE_ENTRIES: usize = 1000;
/// Longest coordinator id accepted in a clock.
pub const MAX_ID_BYTES: usize = 128;
/// How far ahead of the issued counters the durable high-water mark is moved each time: the
/// store is written about every 10 s under load, not once per write. It is also how far ahead
/// of the wall clock a restarted coordinator may resume (it resumes above the mark), so it stays
/// well inside the `max_clock_skew` other coordinators trust (60 s by default): a minute here
/// put a restarted coordinator's counters beyond its peers' trust, and its peers' later blind
/// writes then lost to its older ones (found by the fault suite, docs/reliability.md).
pub const DEFAULT_RESERVE_MS: u64 = 10_000;

/// Errors of clocks received from outside.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    #[error("vector clock has {entries} entries, more than the {max} allowed")]
    TooManyEntries { entries: usize, max: usize },
    #[error("coordinator id in vector clock is empty or longer than {max} bytes")]
    BadCoordinatorId { max: usize },
}

/// How two clocks relate causally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The left clock happened before the right one (the right dominates).
    Before,
    /// The left clock dominates the right one.
    After,
    Concurrent,
}

impl Causality {
    /// The same relation seen from the other side.
    pub fn reverse(self) -> Self {
        match self {
            Causality::Before => Causality::After,
            Causality::After => Causality::Before,
            other => other,
        }
    }
}

/// A vector clock. Entries with counter 0 are never stored, so two clocks are equal exactly
/// when their entries are equal.
///
/// Held as a vector of (coordinator id, counter) sorted by id with each id once: a clock has
/// a handful of entries, and every stored record carries one, so its size is the engine's
/// memory per record (a one-entry `BTreeMap` allocates a whole 11-slot node, about 400 bytes;
/// this, 32 bytes plus the id). Serialized as a map from id to counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VectorClock(Vec<(String, u64)>);

impl Serialize for VectorClock {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(id, c)| (id, c)))
    }
}

impl<'de> Deserialize<'de> for VectorClock {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(deserializer)?;
        Ok(Self::from_entries(map))
    }
}

impl VectorClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a clock from entries; zero counters are dropped, duplicate ids keep the maximum.
    /// One sort, not an insert per entry: a clock from the wire may hold any number of
    /// entries in any order before it is validated.
    pub fn from_entries<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let mut entries: Vec<(String, u64)> = entries
            .into_iter()
            .filter(|(_, counter)| *counter > 0)
            .map(|(id, counter)| (id.into(), counter))
            .collect();
        // By id, the largest counter of each id first: dedup keeps it.
        entries.sort_unstable_by(|(ia, ca), (ib, cb)| ia.cmp(ib).then(cb.cmp(ca)));
        entries.dedup_by(|later, kept| later.0 == kept.0);
        Self(entries)
    }

    /// The counter of `id` (0 when absent).
    pub fn get(&self, id: &str) -> u64 {
        self.position(id).map_or(0, |i| self.0[i].1)
    }

    fn position(&self, id: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(e, _)| e.as_str().cmp(id))
    }

    /// Sets `id` to `max(current, counter)`: entries only ever grow.
    pub fn raise(&mut self, id: String, counter: u64) {
        if counter == 0 {
            return;
        }
        match self.position(&id) {
            Err(at) => self.0.insert(at, (id, counter)),
            Ok(at) => {
                let slot = &mut self.0[at].1;
                *slot = (*slot).max(counter);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in coordinator-id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(id, c)| (id.as_str(), *c))
    }

    /// Heap bytes this clock holds (its entries and their ids), for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<(String, u64)>()
            + self.0.iter().map(|(id, _)| id.capacity()).sum::<usize>()
    }

    /// The highest counter and its coordinator (the largest id among equal counters).
    pub fn max_entry(&self) -> Option<(&str, u64)> {
        self.iter()
            .max_by(|(ia, ca), (ib, cb)| ca.cmp(cb).then_with(|| ia.cmp(ib)))
    }

    /// The highest counter, 0 for an empty clock.
    pub fn max_counter(&self) -> u64 {
        self.max_entry().map_or(0, |(_, c)| c)
    }

    /// Causal relation of `self` to `other`.
    pub fn compare(&self, other: &VectorClock) -> Causality {
        let (mut less, mut greater) = (false, false);
        let mut left = self.iter().peekable();
        let mut right = other.iter().peekable();
        loop {
            let (a, b) = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(_), None) => {
                    left.next();
                    (1, 0)
                }
                (None, Some(_)) => {
                    right.next();
                    (0, 1)
                }
                (Some((ka, ca)), Some((kb, cb))) => match ka.cmp(kb) {
                    Ordering::Less => {
                        let a = *ca;
                        left.next();
                        (a, 0)
                    }
                    Ordering::Greater => {
                        let b = *cb;
                        right.next();
                        (0, b)
                    }
                    Ordering::Equal => {
                        let (a, b) = (*ca, *cb);
                        left.next();
                        right.next();
                        (a, b)
                    }
                },
            };
            less |= a < b;
            greater |= a > b;
            if less && greater {
                return Causality::Concurrent;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// Pointwise maximum of the two clocks.
    pub fn merge(&self, other: &VectorClock) -> VectorClock {
        let mut merged = self.clone();
        merged.merge_from(other);
        merged
    }

    /// In-place pointwise maximum.
    pub fn merge_from(&mut self, other: &VectorClock) {
        for (id, counter) in other.iter() {
            self.raise(id.to_owned(), counter);
        }
    }

    /// Drops the entries with the smallest counters until at most `max_entries` remain (never
    /// fewer than one: the highest counter always stays).
    pub fn prune(&mut self, max_entries: usize) {
        let keep = max_entries.max(1);
        if self.0.len() <= keep {
            return;
        }
        let mut by_age: Vec<(u64, String)> =
            self.0.iter().map(|(id, c)| (*c, id.clone())).collect();
        by_age.sort();
        let excess = by_age.len() - keep;
        for (_, id) in by_age.into_iter().take(excess) {
            if let Ok(at) = self.position(&id) {
                self.0.remove(at);
            }
        }
    }

    /// Checks a clock received from the wire against the limits.
    pub fn validate(&self, max_entries: usize) -> Result<(), ClockError> {
        if self.0.len() > max_entries {
            return Err(ClockError::TooManyEntries {
                entries: self.0.len(),
                max: max_entries,
            });
        }
        if self
            .0
            .iter()
            .any(|(id, _)| id.is_empty() || id.len() > MAX_ID_BYTES)
        {
            return Err(ClockError::BadCoordinatorId { max: MAX_ID_BYTES });
        }
        Ok(())
    }

    fn counter_sum(&self) -> u128 {
        self.0.iter().map(|(_, c)| u128::from(*c)).sum()
    }
}

/// The version of one write (or tombstone): its vector clock. The wall-clock timestamp is
/// carried inside the highest counter (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version {
    pub clock: VectorClock,
}

impl Version {
    pub fn new(clock: VectorClock) -> Self {
        Self { clock }
    }

    /// Wall-clock time of the write in milliseconds since the Unix epoch (0 for an empty clock).
    pub fn timestamp_ms(&self) -> u64 {
        match self.clock.max_counter() {
            0 => 0,
            c => (c >> LOGICAL_BITS) + CLOCK_EPOCH_MS,
        }
    }

    /// The coordinator that wrote this version (the owner of the highest counter).
    pub fn writer(&self) -> Option<&str> {
        self.clock.max_entry().map(|(id, _)| id)
    }

    /// Causal relation of `self` to `other`.
    pub fn compare(&self, other: &Version) -> Causality {
        self.clock.compare(&other.clock)
    }

    /// The total order used to pick winners: `Greater` means `self` wins over `other`.
    /// Dominance always wins; concurrent versions go by (timestamp with logical part, writer id,
    /// sum of counters, then the entries themselves). `Equal` only for equal clocks.
    pub fn precedence(&self, other: &Version) -> Ordering {
        match self.compare(other) {
            Causality::Equal => Ordering::Equal,
            Causality::After => Ordering::Greater,
            Causality::Before => Ordering::Less,
            Causality::Concurrent => self.lww_key_cmp(other),
        }
    }

    /// Last-write-wins key. It is consistent with dominance: if `a` dominates `b` then `a`'s max
    /// counter is >= `b`'s; when equal, `a`'s writer id is >= `b`'s; when also equal, `a`'s
    /// counter sum is strictly larger. That is why `precedence` is transitive.
    fn lww_key_cmp(&self, other: &Version) -> Ordering {
        let (a, b) = (self.clock.max_entry(), other.clock.max_entry());
        let (ac, aid) = a.map_or((0, ""), |(id, c)| (c, id));
        let (bc, bid) = b.map_or((0, ""), |(id, c)| (c, id));
        ac.cmp(&bc)
            .then_with(|| aid.cmp(bid))
            .then_with(|| self.clock.counter_sum().cmp(&other.clock.counter_sum()))
            .then_with(|| self.clock.0.iter().cmp(other.clock.0.iter()))
    }

    /// Whether `self` should replace `stored`: only when it takes precedence.
    pub fn supersedes(&self, stored: &Version) -> bool {
        self.precedence(stored) == Ordering::Greater
    }

    /// The winner of two versions (the same whichever is passed first).
    pub fn winner<'a>(a: &'a Version, b: &'a Version) -> &'a Version {
        if b.precedence(a) == Ordering::Greater {
            b
        } else {
            a
        }
    }
}

/// Milliseconds since the Unix epoch to the physical part of a counter.
pub fn physical_counter(now_ms: u64) -> u64 {
    now_ms.saturating_sub(CLOCK_EPOCH_MS) << LOGICAL_BITS
}

/// A counter the clock would issue and, when the durable high-water mark must move before the
/// counter may be used, the mark to persist first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub counter: u64,
    pub persist_high_water: Option<u64>,
}

/// A coordinator's hybrid logical clock.
///
/// Issued counters are strictly increasing, at least the physical time, and above every counter
/// observed. Across restarts: a counter is only used after a high-water mark >= it is durable
/// (`Tick::persist_high_water`, then [`HybridClock::persisted`]); a restarted clock resumes from
/// that mark, so it can never issue a counter <= one issued before the restart, even if the wall
/// clock went backwards. A tick that needs a new mark moves nothing until the mark is stored:
/// a failed reservation leaves the clock where it was.
///
/// The clock trusts what it is given: callers bound `observed` (see
/// [`counter_bound`]) so that no client or replica can push it ahead of the wall clock.
#[derive(Debug, Clone)]
pub struct HybridClock {
    last: u64,
    durable: u64,
    reserve: u64,
}

impl HybridClock {
    /// A clock resuming from the durable high-water mark (0 for a brand-new coordinator).
    pub fn resume(high_water: u64) -> Self {
        Self {
            last: high_water,
            durable: high_water,
            reserve: DEFAULT_RESERVE_MS << LOGICAL_BITS,
        }
    }

    /// The next counter at wall time `now_ms`, above `observed` (the highest trusted counter of
    /// the causal context and of the versions seen). Without `persist_high_water` the counter is
    /// issued at once; with it nothing changed yet: the caller stores the mark durably and then
    /// calls [`HybridClock::persisted`] before using the counter.
    pub fn tick(&mut self, now_ms: u64, observed: u64) -> Tick {
        let counter = physical_counter(now_ms)
            .max(self.last.saturating_add(1))
            .max(observed.saturating_add(1));
        if counter <= self.durable {
            self.last = counter;
            return Tick {
                counter,
                persist_high_water: None,
            };
        }
        Tick {
            counter,
            persist_high_water: Some(counter.saturating_add(self.reserve)),
        }
    }

    /// Records that `tick`'s high-water mark is durable: its counter is now issued.
    pub fn persisted(&mut self, tick: Tick) {
        if let Some(high_water) = tick.persist_high_water {
            self.durable = self.durable.max(high_water);
        }
        self.last = self.last.max(tick.counter);
    }

    /// The last counter issued or resumed from.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The durable high-water mark.
    pub fn durable(&self) -> u64 {
        self.durable
    }
}

/// The highest counter a coordinator accepts from outside (a client's context, a replica's
/// version) at wall time `now_ms` with `max_skew_ms` of allowed clock skew: anything above lies
/// further in the future than any honest clock can be.
pub fn counter_bound(now_ms: u64, max_skew_ms: u64) -> u64 {
    physical_counter(now_ms.saturating_add(max_skew_ms)) | ((1 << LOGICAL_BITS) - 1)
}

/// The clock of a new write by `coordinator_id`: the causal context merged, the coordinator's
/// own entry set to `max(own + 1, counter)` (the counter came from [`HybridClock::tick`] with
/// `observed = context.max_counter()`), then pruned to `max_entries`.
pub fn next_version(
    context: &VectorClock,
    coordinator_id: &str,
    counter: u64,
    max_entries: usize,
) -> Version {
    let mut clock = context.clone();
    let own = counter.max(context.get(coordinator_id).saturating_add(1));
    clock.raise(coordinator_id.to_owned(), own);
    clock.prune(max_entries);
    Version::new(clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vc(entries: &[(&str, u64)]) -> VectorClock {
        VectorClock::from_entries(entries.iter().map(|(i, c)| (*i, *c)))
    }

    #[test]
    fn compare_basic_relations() {
        let a = vc(&[("c1", 1)]);
        let b = vc(&[("c1", 2)]);
        let c = vc(&[("c2", 1)]);
        assert_eq!(a.compare(&a), Causality::Equal);
        assert_eq!(a.compare(&b), Causality::Before);
        assert_eq!(b.compare(&a), Causality::After);
        assert_eq!(a.compare(&c), Causality::Concurrent);
        assert_eq!(VectorClock::new().compare(&a), Causality::Before);
    }

    #[test]
    fn zero_entries_are_not_stored() {
        assert_eq!(vc(&[("c1", 0)]), VectorClock::new());
    }

    #[test]
    fn json_wire_form_is_an_object_of_counters() {
        let v = Version::new(vc(&[("coord-a", 7), ("coord-b", 3)]));
        let json = serde_json::to_string(&v).expect("serialize");
        assert_eq!(json, r#"{"coord-a":7,"coord-b":3}"#);
        let back: Version = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, v);
        // Any order in, zero counters dropped: equal clocks compare equal.
        let unordered: Version =
            serde_json::from_str(r#"{"coord-b":3,"z":0,"coord-a":7}"#).expect("parse");
        assert_eq!(unordered, v);
    }

    #[test]
    fn concurrent_versions_resolve_by_timestamp_then_writer() {
        let older = Version::new(vc(&[("z", physical_counter(CLOCK_EPOCH_MS + 1000))]));
        let newer = Version::new(vc(&[("a", physical_counter(CLOCK_EPOCH_MS + 2000))]));
        assert_eq!(Version::winner(&older, &newer), &newer);
        assert_eq!(Version::winner(&newer, &older), &newer);
        let same_a = Version::new(vc(&[("a", 4096)]));
        let same_b = Version::new(vc(&[("b", 4096)]));
        assert_eq!(Version::winner(&same_a, &same_b), &same_b);
        assert_eq!(newer.timestamp_ms(), CLOCK_EPOCH_MS + 2000);
        assert_eq!(newer.writer(), Some("a"));
    }

    #[test]
    fn hybrid_clock_asks_to_persist_ahead_and_resumes_above() {
        let mut clock = HybridClock::resume(0);
        let t = clock.tick(CLOCK_EPOCH_MS + 10, 0);
        let hw = t.persist_high_water.expect("first tick must persist");
        assert!(hw > t.counter);
        clock.persisted(t);
        let t2 = clock.tick(CLOCK_EPOCH_MS + 11, 0);
        assert!(t2.counter > t.counter);
        assert_eq!(t2.persist_high_water, None);
        // Restart with the wall clock an hour behind: still above everything issued.
        let mut restarted = HybridClock::resume(hw);
        let t3 = restarted.tick(CLOCK_EPOCH_MS, 0);
        assert!(t3.counter > t2.counter);
    }

    #[test]
    fn a_reservation_that_was_not_stored_moves_nothing() {
        let mut clock = HybridClock::resume(0);
        let now = CLOCK_EPOCH_MS + 10_000;
        let first = clock.tick(now, 0);
        clock.persisted(first);
        // A huge observed counter asks for a mark that cannot be stored: the caller drops it.
        let poisoned = clock.tick(now, u64::MAX >> 1);
        assert!(poisoned.persist_high_water.is_some());
        assert_eq!(
            clock.last(),
            first.counter,
            "the clock moved before its mark was stored"
        );
        let next = clock.tick(now, 0);
        assert_eq!(next.counter, first.counter + 1);
        assert_eq!(next.persist_high_water, None);
    }

    #[test]
    fn the_bound_allows_the_skew_and_nothing_beyond() {
        let now = CLOCK_EPOCH_MS + 1_000_000;
        let bound = counter_bound(now, 60_000);
        assert!(physical_counter(now + 60_000) <= bound);
        assert!(physical_counter(now + 60_001) > bound);
    }

    #[test]
    fn next_version_dominates_its_context() {
        let ctx = vc(&[("c1", 5), ("c2", 9)]);
        let mut clock = HybridClock::resume(0);
        let tick = clock.tick(CLOCK_EPOCH_MS, ctx.max_counter());
        let v = next_version(&ctx, "c1", tick.counter, DEFAULT_MAX_ENTRIES);
        assert_eq!(v.clock.compare(&ctx), Causality::After);
        assert_eq!(v.writer(), Some("c1"));
    }

    #[test]
    fn prune_keeps_the_newest_entries() {
        let mut c = vc(&[("a", 1), ("b", 5), ("c", 3), ("d", 9)]);
        c.prune(2);
        assert_eq!(c, vc(&[("b", 5), ("d", 9)]));
    }

    #[test]
    fn validate_rejects_oversized_clocks() {
        let big = VectorClock::from_entries((1..=5u64).map(|i| (format!("c{i}"), i)));
        assert!(matches!(
            big.validate(4),
            Err(ClockError::TooManyEntries { entries: 5, max: 4 })
        ));
        assert!(big.validate(5).is_ok());
        assert!(vc(&[(&"x".repeat(129), 1)]).validate(10).is_err());
    }
}
