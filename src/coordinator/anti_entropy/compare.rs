//! One tenant's data in the ring's ranges, compared across each range's replicas and fixed.
//!
//! 1. **Descend the trees.** Each replica answers the XOR of groups of its range-tree segments
//!    (`SegmentHashes`); groups whose XORs agree on every replica are done, the others are cut
//!    into [`FANOUT`] parts and asked again, down to single segments. Identical replicas cost
//!    one hash each. A segment the range covers only in part (tokens off the segment grid,
//!    from the random allocation) holds keys of the next range too: it is always listed.
//! 2. **Confirm them.** When few segments differ ([`RECHECK_MAX`]), their hashes are asked
//!    again after [`RECHECK_DELAY`]: writes that were in flight during the descent (applied on
//!    one replica, not yet on another) have landed by then, and segments that agree now hold
//!    nothing to fix. Under load, a repair of replicas that agree then lists nothing, instead
//!    of scanning the tenant on every node for a few writes in flight.
//! 3. **List the differing segments** of every range of the pass, one `ListSegments` call (one
//!    scan of the tenant) per node: (key, version digest) of every key there, assigned to the
//!    range it lies in.
//! 4. **Fix the keys whose digests differ** (or that some replica lacks): read each from the
//!    replica whose listed version takes precedence (the read path's rule) and write it to
//!    every replica that does not hold it, as a repair batch. The storage
//!    node's apply rule ignores it where something newer arrived meanwhile, so a repair never
//!    rolls a key back.
//!
//! A replica that fails a call ends the comparison of the ranges it serves with an error
//! (`RangeWork::failure`): what was fixed stays fixed, and those ranges are not counted as
//! repaired.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::rpc::auth::InternalChannel;
use bytes::Bytes;

use crate::engine::trees::{
    MAX_GROUPS, MAX_LISTED_SEGMENTS, SEGMENT_WIDTH, SEGMENTS, segment_of, segment_start,
    version_digest,
};
use crate::ring::{HashRange, key_position};
use crate::rpc::storage as pb;
use crate::rpc::storage::storage_node_client::StorageNodeClient;
use crate::vclock::Version;

/// Parts a differing group is cut into at each step of the descent. Each differing key costs
/// about FANOUT x log_FANOUT(segments) hashes per replica: 4 exchanges half the bytes of 16
/// (docs/benchmarks.md, "Anti-entropy") for twice the round trips (about 8 per range).
pub const FANOUT: u32 = 4;
/// Keys per `ReadBatch` and `WriteBatch` of the fix.
const FIX_CHUNK: usize = 256;
/// At most this many differing segments in a pass are confirmed before listing; with more, the
/// tenant is scanned anyway and asking again would only add bytes.
pub const RECHECK_MAX: usize = 1024;
/// How long writes in flight get to land before differing segments are asked again.
pub const RECHECK_DELAY: Duration = Duration::from_millis(300);

/// A replica of the range and its client.
#[derive(Clone)]
pub struct Replica {
    pub node: String,
    pub client: StorageNodeClient<InternalChannel>,
    /// The registry epoch of the ring it was chosen on: the fixes written to it carry it
    /// (`WriteBatchRequest.ring_epoch`), so a node fenced by a later cleanup refuses them
    /// instead of taking records into a range it dropped.
    pub ring_epoch: u64,
}

/// What comparing one tenant's range did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compared {
    /// Distinct keys listed in the differing segments.
    pub keys_compared: u64,
    /// Keys at least one replica was sent a newer version of.
    pub keys_fixed: u64,
    /// Segment hashes, listed entries and records exchanged, in bytes (protobuf-encoded).
    pub bytes: u64,
    /// Of those, the records written to replicas that lacked them (what any copy of those
    /// keys sends).
    pub bytes_written: u64,
}

/// A replica failed a call of the comparison.
#[derive(Debug, thiserror::Error)]
#[error("replica {node}: {call}: {status}")]
pub struct ReplicaFailed {
    pub node: String,
    pub call: &'static str,
    pub status: String,
}

/// Paces the repair's traffic to `bytes_per_sec` (0: unpaced).
pub struct Pace {
    bytes_per_sec: u64,
    started: Instant,
    spent: u64,
}

impl Pace {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec,
            started: Instant::now(),
            spent: 0,
        }
    }

    /// Counts `bytes` and sleeps until they are within the rate.
    pub async fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
        if self.bytes_per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.spent as f64 / self.bytes_per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

fn failed(node: &str, call: &'static str, status: tonic::Status) -> ReplicaFailed {
    ReplicaFailed {
        node: node.to_owned(),
        call,
        status: format!("{} {}", status.code(), status.message()),
    }
}

/// One range of a tenant to compare: its replicas that answer, and what comparing it did.
pub struct RangeWork {
    pub range: HashRange,
    pub replicas: Vec<Replica>,
    pub done: Compared,
    /// Why it could not be compared or fixed completely (a replica failed a call).
    pub failure: Option<ReplicaFailed>,
    /// Whole segments whose hashes differ.
    leaves: Vec<u32>,
    /// Segments the range covers only in part (always listed).
    partial: Vec<u32>,
}

impl RangeWork {
    pub fn new(range: HashRange, replicas: Vec<Replica>) -> Self {
        Self {
            range,
            replicas,
            done: Compared::default(),
            failure: None,
            leaves: Vec::new(),
            partial: Vec::new(),
        }
    }
}

/// Compares `tenant`'s keys in every range of `works` across its replicas and fixes what
/// differs: each range's trees are descended on its own, then every node lists the differing
/// segments of all its ranges in one call (a listing scans the tenant once, whatever it
/// asks), then each range's differing keys are fixed.
/// `stop` is asked between steps (each range's descent, each node's listing, each chunk of
/// fixes): when it says so, the pass returns at once, with what it fixed so far fixed and the
/// rest untouched (the caller then must not count anything as repaired).
pub async fn compare_and_fix(
    tenant: &str,
    works: &mut [RangeWork],
    pace: &mut Pace,
    stop: &(dyn Fn() -> bool + Sync),
) {
    for work in works.iter_mut().filter(|w| w.replicas.len() >= 2) {
        if stop() {
            return;
        }
        match descend(tenant, work.range, &work.replicas, pace, &mut work.done).await {
            Ok((leaves, partial)) => (work.leaves, work.partial) = (leaves, partial),
            Err(e) => work.failure = Some(e),
        }
    }
    confirm(tenant, works, pace).await;
    // Per node: the replica it is of each range with leaves, and the union of those leaves.
    let mut nodes: BTreeMap<String, (Replica, Vec<u32>)> = BTreeMap::new();
    for work in works.iter().filter(|w| w.failure.is_none()) {
        for replica in &work.replicas {
            if work.leaves.is_empty() && work.partial.is_empty() {
                continue;
            }
            let slot = nodes
                .entry(replica.node.clone())
                .or_insert_with(|| (replica.clone(), Vec::new()));
            slot.1.extend_from_slice(&work.leaves);
            slot.1.extend_from_slice(&work.partial);
        }
    }
    let ranges = RangeIndex::new(works);
    // Per range: key -> what each of its replicas listed (None: no record of the key).
    let mut listed: Vec<BTreeMap<Bytes, Vec<Listed>>> = vec![BTreeMap::new(); works.len()];
    let mut listing_failed: BTreeMap<String, ReplicaFailed> = BTreeMap::new();
    for (node, (replica, mut leaves)) in nodes {
        if stop() {
            return;
        }
        leaves.sort_unstable();
        leaves.dedup();
        let mut bytes = 0;
        let mut entries = Vec::new();
        for chunk in leaves.chunks(MAX_LISTED_SEGMENTS) {
            match list_segments(tenant, &replica, chunk, &mut bytes).await {
                Ok(e) => entries.extend(e),
                Err(e) => {
                    listing_failed.insert(node.clone(), e);
                    break;
                }
            }
        }
        pace.spend(bytes).await;
        if listing_failed.contains_key(&node) {
            continue;
        }
        for entry in entries {
            let Some(w) = ranges.find(key_position(tenant, &entry.key)) else {
                continue;
            };
            let (Some(work), Some(keys)) = (works.get(w), listed.get_mut(w)) else {
                continue;
            };
            let Some(r) = work.replicas.iter().position(|x| x.node == node) else {
                continue;
            };
            let n = work.replicas.len();
            let version = entry
                .version
                .as_ref()
                .map(Version::from)
                .unwrap_or_default();
            let slot = keys.entry(entry.key).or_insert_with(|| vec![None; n]);
            if let Some(d) = slot.get_mut(r) {
                *d = Some((entry.digest, version));
            }
        }
        // The listing's bytes count once, against the ranges it served.
        if let Some(first) = works
            .iter_mut()
            .find(|w| w.failure.is_none() && w.replicas.iter().any(|x| x.node == node))
        {
            first.done.bytes += bytes;
        }
    }
    for (work, keys) in works.iter_mut().zip(listed) {
        if work.failure.is_some() || (work.leaves.is_empty() && work.partial.is_empty()) {
            continue;
        }
        if let Some(e) = work
            .replicas
            .iter()
            .find_map(|r| listing_failed.get(&r.node))
        {
            work.failure = Some(ReplicaFailed {
                node: e.node.clone(),
                call: e.call,
                status: e.status.clone(),
            });
            continue;
        }
        work.done.keys_compared = keys.len() as u64;
        let differing: Vec<(Bytes, Vec<Listed>)> = keys
            .into_iter()
            .filter(|(_, listed)| {
                let digest = |l: &Listed| l.as_ref().map(|(d, _)| *d);
                let first = listed.first().and_then(digest);
                first.is_none() || listed.iter().any(|l| digest(l) != first)
            })
            .collect();
        for chunk in differing.chunks(FIX_CHUNK) {
            if stop() {
                return;
            }
            if let Err(e) = fix(tenant, &work.replicas, chunk, &mut work.done, pace).await {
                work.failure = Some(e);
                break;
            }
        }
    }
}

/// What one replica listed for a key: its version's digest and the version.
type Listed = Option<(u64, Version)>;

/// Finds which range of a pass a ring position lies in.
struct RangeIndex {
    /// (first, last, index of the range), sorted by first; wrapping ranges split in two.
    pieces: Vec<(u64, u64, usize)>,
}

impl RangeIndex {
    fn new(works: &[RangeWork]) -> Self {
        let mut pieces: Vec<(u64, u64, usize)> = works
            .iter()
            .enumerate()
            .flat_map(|(i, w)| w.range.pieces().into_iter().map(move |(a, b)| (a, b, i)))
            .collect();
        pieces.sort_unstable();
        Self { pieces }
    }

    fn find(&self, position: u64) -> Option<usize> {
        let at = self
            .pieces
            .partition_point(|(first, _, _)| *first <= position);
        let (first, last, i) = *self.pieces.get(at.checked_sub(1)?)?;
        (first <= position && position <= last).then_some(i)
    }
}

/// Asks the replicas again, after [`RECHECK_DELAY`], for the hashes of the differing segments
/// of the pass when there are at most [`RECHECK_MAX`]; those that agree now are dropped.
async fn confirm(tenant: &str, works: &mut [RangeWork], pace: &mut Pace) {
    let differing: usize = works.iter().map(|w| w.leaves.len()).sum();
    if differing == 0 || differing > RECHECK_MAX {
        return;
    }
    tokio::time::sleep(RECHECK_DELAY).await;
    for work in works
        .iter_mut()
        .filter(|w| w.failure.is_none() && !w.leaves.is_empty())
    {
        let groups: Vec<pb::SegmentGroup> = work
            .leaves
            .iter()
            .map(|&first| pb::SegmentGroup { first, count: 1 })
            .collect();
        match differing_groups(tenant, &work.replicas, &groups, pace, &mut work.done).await {
            Ok(still) => work.leaves = still.into_iter().map(|g| g.first).collect(),
            Err(e) => work.failure = Some(e),
        }
    }
}

/// The groups whose hashes are not the same on every replica.
async fn differing_groups(
    tenant: &str,
    replicas: &[Replica],
    groups: &[pb::SegmentGroup],
    pace: &mut Pace,
    done: &mut Compared,
) -> Result<Vec<pb::SegmentGroup>, ReplicaFailed> {
    let mut answers = Vec::with_capacity(replicas.len());
    for replica in replicas {
        answers.push(segment_hashes(tenant, replica, groups, done).await?);
    }
    pace.spend(8 * (groups.len() * replicas.len()) as u64).await;
    Ok(groups
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let first = answers.first().and_then(|a| a.get(*i));
            !answers.iter().all(|a| a.get(*i) == first)
        })
        .map(|(_, g)| *g)
        .collect())
}

/// Walks the range's trees on every replica down to the whole segments whose XORs differ;
/// returns them and the segments the range covers only in part.
async fn descend(
    tenant: &str,
    range: HashRange,
    replicas: &[Replica],
    pace: &mut Pace,
    done: &mut Compared,
) -> Result<(Vec<u32>, Vec<u32>), ReplicaFailed> {
    let (mut frontier, partial) = initial_groups(range);
    let mut leaves = Vec::new();
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for group in differing_groups(tenant, replicas, &frontier, pace, done).await? {
            if group.count == 1 {
                leaves.push(group.first);
            } else {
                next.extend(split(group));
            }
        }
        frontier = next;
    }
    leaves.sort_unstable();
    leaves.dedup();
    Ok((leaves, partial))
}

/// The whole segments of `range` as groups to descend, and the segments it covers only in
/// part (to list at once).
fn initial_groups(range: HashRange) -> (Vec<pb::SegmentGroup>, Vec<u32>) {
    let mut groups = Vec::new();
    let mut partial = Vec::new();
    for (lo, hi) in range.pieces() {
        let (mut first, mut last) = (segment_of(lo), segment_of(hi));
        if lo != segment_start(first) {
            partial.push(first);
            first += 1;
        }
        if hi != segment_start(last).wrapping_add(SEGMENT_WIDTH - 1) {
            partial.push(last);
            last = last.wrapping_sub(1);
        }
        if first <= last && last < SEGMENTS {
            groups.push(pb::SegmentGroup {
                first,
                count: last - first + 1,
            });
        }
    }
    (groups, partial)
}

/// `group` cut into at most [`FANOUT`] consecutive parts.
fn split(group: pb::SegmentGroup) -> Vec<pb::SegmentGroup> {
    let size = group.count.div_ceil(FANOUT).max(1);
    let end = group.first + group.count;
    (group.first..end)
        .step_by(size as usize)
        .map(|first| pb::SegmentGroup {
            first,
            count: size.min(end - first),
        })
        .collect()
}

async fn segment_hashes(
    tenant: &str,
    replica: &Replica,
    groups: &[pb::SegmentGroup],
    done: &mut Compared,
) -> Result<Vec<u64>, ReplicaFailed> {
    let mut hashes = Vec::with_capacity(groups.len());
    for chunk in groups.chunks(MAX_GROUPS) {
        let answer = replica
            .client
            .clone()
            .segment_hashes(pb::SegmentHashesRequest {
                tenant_id: tenant.to_owned(),
                groups: chunk.to_vec(),
            })
            .await
            .map_err(|s| failed(&replica.node, "SegmentHashes", s))?
            .into_inner();
        if answer.hashes.len() != chunk.len() {
            return Err(ReplicaFailed {
                node: replica.node.clone(),
                call: "SegmentHashes",
                status: format!("{} hashes for {} groups", answer.hashes.len(), chunk.len()),
            });
        }
        done.bytes += 8 * chunk.len() as u64;
        hashes.extend(answer.hashes);
    }
    Ok(hashes)
}

async fn list_segments(
    tenant: &str,
    replica: &Replica,
    segments: &[u32],
    bytes: &mut u64,
) -> Result<Vec<pb::SegmentEntry>, ReplicaFailed> {
    let mut stream = replica
        .client
        .clone()
        .list_segments(pb::ListSegmentsRequest {
            tenant_id: tenant.to_owned(),
            segments: segments.to_vec(),
        })
        .await
        .map_err(|s| failed(&replica.node, "ListSegments", s))?
        .into_inner();
    let mut entries = Vec::new();
    while let Some(batch) = stream
        .message()
        .await
        .map_err(|s| failed(&replica.node, "ListSegments", s))?
    {
        *bytes += batch
            .entries
            .iter()
            .map(|e| prost::Message::encoded_len(e) as u64)
            .sum::<u64>();
        entries.extend(batch.entries);
    }
    Ok(entries)
}

fn digest_of(record: &pb::Record) -> u64 {
    let tombstone = matches!(record.payload, Some(pb::record::Payload::Tombstone(_)));
    version_digest(&record.version(), tombstone)
}

/// Reads each differing key of `chunk` from the replica whose listed version wins, and
/// writes it to the replicas that do not hold it.
async fn fix(
    tenant: &str,
    replicas: &[Replica],
    chunk: &[(Bytes, Vec<Listed>)],
    done: &mut Compared,
    pace: &mut Pace,
) -> Result<(), ReplicaFailed> {
    // The replica each key is read from: the one whose listed version takes precedence.
    let source: Vec<Option<usize>> = chunk
        .iter()
        .map(|(_, listed)| {
            listed
                .iter()
                .enumerate()
                .filter_map(|(r, l)| l.as_ref().map(|(_, v)| (r, v)))
                .max_by(|a, b| a.1.precedence(b.1))
                .map(|(r, _)| r)
        })
        .collect();
    let mut winners: Vec<Option<pb::Record>> = vec![None; chunk.len()];
    for (r, replica) in replicas.iter().enumerate() {
        let held: Vec<usize> = (0..chunk.len())
            .filter(|&i| source.get(i).copied().flatten() == Some(r))
            .collect();
        if held.is_empty() {
            continue;
        }
        let reads = held
            .iter()
            .filter_map(|&i| chunk.get(i))
            .map(|(key, _)| pb::ReadRequest {
                tenant_id: tenant.to_owned(),
                key: key.clone(),
            })
            .collect();
        let answer = replica
            .client
            .clone()
            .read_batch(pb::ReadBatchRequest {
                reads,
                source: pb::BatchSource::Repair as i32,
                ring_epoch: replica.ring_epoch,
            })
            .await
            .map_err(|s| failed(&replica.node, "ReadBatch", s))?
            .into_inner();
        for (&i, result) in held.iter().zip(answer.results) {
            let Some(record) = result.record else {
                continue;
            };
            if record.tenant_id != tenant || chunk.get(i).is_none_or(|(k, _)| *k != record.key) {
                return Err(ReplicaFailed {
                    node: replica.node.clone(),
                    call: "ReadBatch",
                    status: "answered another key than asked".to_owned(),
                });
            }
            done.bytes += prost::Message::encoded_len(&record) as u64;
            if let Some(slot) = winners.get_mut(i) {
                *slot = Some(record);
            }
        }
    }
    let mut fixed = vec![false; chunk.len()];
    for (r, replica) in replicas.iter().enumerate() {
        let mut records = Vec::new();
        let mut which = Vec::new();
        for (i, ((_, listed), winner)) in chunk.iter().zip(&winners).enumerate() {
            let Some(winner) = winner else { continue };
            let held = listed.get(r).and_then(|l| l.as_ref().map(|(d, _)| *d));
            if held != Some(digest_of(winner)) {
                records.push(winner.clone());
                which.push(i);
            }
        }
        if records.is_empty() {
            continue;
        }
        let bytes: u64 = records
            .iter()
            .map(|r| prost::Message::encoded_len(r) as u64)
            .sum();
        pace.spend(bytes).await;
        done.bytes += bytes;
        done.bytes_written += bytes;
        let answer = replica
            .client
            .clone()
            .write_batch(pb::WriteBatchRequest {
                records,
                source: pb::BatchSource::Repair as i32,
                ring_digest: 0,
                ring_epoch: replica.ring_epoch,
            })
            .await
            .map_err(|s| failed(&replica.node, "WriteBatch", s))?
            .into_inner();
        for (i, outcome) in which.iter().zip(answer.outcomes) {
            if outcome == pb::ApplyOutcome::Applied as i32 {
                if let Some(f) = fixed.get_mut(*i) {
                    *f = true;
                }
            }
        }
    }
    done.keys_fixed += fixed.iter().filter(|f| **f).count() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_on_the_grid_is_whole_segments() {
        let range = HashRange::new(segment_start(10), segment_start(20));
        let (groups, partial) = initial_groups(range);
        assert_eq!(
            groups,
            vec![pb::SegmentGroup {
                first: 10,
                count: 10
            }]
        );
        assert!(partial.is_empty());
    }

    #[test]
    fn a_range_off_the_grid_lists_its_edge_segments() {
        let range = HashRange::new(segment_start(10) + 5, segment_start(20) + 5);
        let (groups, partial) = initial_groups(range);
        assert_eq!(
            groups,
            vec![pb::SegmentGroup {
                first: 11,
                count: 9
            }]
        );
        assert_eq!(partial, vec![10, 20]);
    }

    #[test]
    fn a_wrapping_range_is_two_spans() {
        let range = HashRange::new(segment_start(SEGMENTS - 2), segment_start(3));
        let (groups, partial) = initial_groups(range);
        assert_eq!(
            groups,
            vec![
                pb::SegmentGroup {
                    first: SEGMENTS - 2,
                    count: 2
                },
                pb::SegmentGroup { first: 0, count: 3 },
            ]
        );
        assert!(partial.is_empty());
        let (whole, _) = initial_groups(HashRange::FULL);
        assert_eq!(
            whole,
            vec![pb::SegmentGroup {
                first: 0,
                count: SEGMENTS
            }]
        );
    }

    #[test]
    fn splitting_covers_the_group_exactly() {
        for count in [1u32, 2, 15, 16, 17, 1000, SEGMENTS] {
            let parts = split(pb::SegmentGroup { first: 7, count });
            assert!(parts.len() <= FANOUT as usize);
            assert_eq!(parts.iter().map(|p| p.count).sum::<u32>(), count);
            let mut next = 7;
            for p in parts {
                assert_eq!(p.first, next);
                assert!(p.count >= 1);
                next += p.count;
            }
        }
    }
}
