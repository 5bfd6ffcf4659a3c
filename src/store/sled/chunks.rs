//! Trace keys kept in chunks of consecutive keys: where each trace is in the log
//! (`trace_chunks`), and the indexes by run, experiment and session (`*_trace_chunks`).
//!
//! An entry per trace made these trees most of the store's cost, in time and in memory. sled
//! splits a leaf every 16 entries, and time-ordered keys always land in the newest leaf: two small
//! index entries cost more than the trace they point to (callgrind: 39k of 69k instructions per
//! trace); and sled 0.34 keeps each page's metadata in memory after the page is evicted, so an
//! entry per trace grew RSS by ~23 bytes per stored trace for as long as the process ran
//! (`tests/store_memory.rs`). Chunks of a fixed time width (schema 4's first cut: 100 ms) fixed
//! that at 1000 calls a second but not at other rates: at 10 a second a bucket holds one trace,
//! and at 14k a second it is a 39 KB value rewritten four times, which sled held on to (RSS +58 MB
//! after 1M traces). A chunk holds at most [`MAX_ENTRIES`] keys, whatever the rate:
//!
//! key = prefix ‖ the chunk's first trace key → entries sorted by trace key, each the 16-byte
//! trace key ‖ `V` bytes (a log location in `trace_chunks`; nothing in an index)
//!
//! The prefix is empty in `trace_chunks` (which must then hold no other prefix), and the
//! length-prefixed indexed value in an index (so no prefix is another's beginning). A
//! chunk holds the keys from its own up to the next chunk's, so walking chunks newest first and
//! each chunk's entries backwards lists traces in key order (UUIDv7: time order). A write merges
//! into the chunk each key falls in, the newest write of a trace winning, so writing a trace again
//! (a score added, the index restored after a crash) never lists it twice. A chunk grown past
//! [`MAX_ENTRIES`] is split: the new chunks are written first, then the old one cut down, so a
//! crash in between leaves keys in two chunks, never in none; readers skip such doubles and the
//! next write to the old chunk drops them. Only the recorder writes, one batch at a time, so the
//! read-merge-write needs no lock.

use std::collections::BTreeMap;
use std::ops::Bound;

use ::sled::{IVec, Tree};

use super::{join, TraceKey, TRACE_KEY_LEN};
use crate::store::StoreError;

/// Keys per chunk: 1.8 KB of locations, 1 KB of index. Every write of a batch rewrites the chunks
/// it touches, so smaller chunks write less (at 10 calls a second, one per batch: 11.8 KB written
/// per trace with 64, 20 KB with 128, 7.5 KB with 32); but sled keeps ~300 bytes for every leaf
/// it ever held, so fewer keys per chunk grow RSS faster (~1 byte per trace with 64, 2 with 32).
/// Either way sled's 16-entry leaves stay far below the 128 KB where it writes a page as a blob.
const MAX_ENTRIES: usize = 64;

/// A trace key and what is filed with it.
pub(super) type Entry<const V: usize> = (TraceKey, [u8; V]);

/// One chunked tree, its entries carrying `V` bytes each besides the trace key.
pub(super) struct Chunks<const V: usize> {
    tree: Tree,
}

/// Entries of one batch, gathered per prefix before the merge.
#[derive(Default)]
pub(super) struct Additions<const V: usize> {
    prefixes: BTreeMap<Vec<u8>, Vec<Entry<V>>>,
}

impl<const V: usize> Additions<V> {
    /// Files `trace` with `value` under `prefix`; a later addition of the same trace wins.
    pub(super) fn add(&mut self, prefix: &[u8], trace: &TraceKey, value: [u8; V]) {
        match self.prefixes.get_mut(prefix) {
            Some(entries) => entries.push((*trace, value)),
            None => {
                self.prefixes.insert(prefix.to_vec(), vec![(*trace, value)]);
            }
        }
    }
}

impl<const V: usize> Chunks<V> {
    pub(super) fn new(tree: Tree) -> Chunks<V> {
        Chunks { tree }
    }

    /// Merges `additions` into the stored chunks.
    pub(super) fn write(&self, additions: Additions<V>) -> Result<(), StoreError> {
        for (prefix, mut entries) in additions.prefixes {
            // Newest first, so that the stable sort keeps the newest of a trace's entries first
            // and `dedup` keeps it.
            entries.reverse();
            entries.sort_by_key(|(trace, _)| *trace);
            entries.dedup_by_key(|(trace, _)| *trace);
            self.write_sorted(&prefix, &entries)?;
        }
        Ok(())
    }

    /// Merges one prefix's entries, sorted and without doubles, chunk by chunk.
    fn write_sorted(&self, prefix: &[u8], mut entries: &[Entry<V>]) -> Result<(), StoreError> {
        while let Some((first, _)) = entries.first() {
            let (chunk, stored) = match self.chunk_of(prefix, first)? {
                Some((chunk, stored)) => (chunk.to_vec(), Some(stored)),
                // Older than every chunk of the prefix: a chunk of its own, up to the first.
                None => (join(prefix, first), None),
            };
            let end = self.next_start(prefix, &chunk)?;
            let within = entries.partition_point(|(trace, _)| end.is_none_or(|end| *trace < end));
            let (now, rest) = entries.split_at(within);
            self.merge_into(&chunk, stored.as_deref(), now, end)?;
            entries = rest;
        }
        Ok(())
    }

    /// Writes `stored` (minus doubles of a later chunk's keys, left by an interrupted split)
    /// merged with `added` under `chunk`, split if it grew too long.
    fn merge_into(
        &self,
        chunk: &[u8],
        stored: Option<&[u8]>,
        added: &[Entry<V>],
        end: Option<TraceKey>,
    ) -> Result<(), StoreError> {
        let mut merged: Vec<Entry<V>> = added.to_vec();
        if let Some(stored) = stored {
            merged.extend(
                entries_of::<V>(stored).filter(|(trace, _)| end.is_none_or(|end| *trace < end)),
            );
        }
        // `added` first: on a tie the stable sort keeps the new write, and `dedup` keeps it.
        merged.sort_by_key(|(trace, _)| *trace);
        merged.dedup_by_key(|(trace, _)| *trace);
        let prefix = &chunk[..chunk.len() - TRACE_KEY_LEN];
        // The newest chunk only grows at its end (calls in time order): its pieces are left
        // full. Elsewhere a key arrived out of order, and more may follow: even pieces leave
        // room, rather than a full chunk and a one-key chunk each time.
        let count = merged.len().div_ceil(MAX_ENTRIES);
        let piece_len = match end {
            None => MAX_ENTRIES,
            // `added` is never empty, so neither is `merged`; `max` keeps `chunks` from a panic
            // all the same.
            Some(_) => merged.len().div_ceil(count.max(1)).max(1),
        };
        let mut pieces = merged.chunks(piece_len);
        let head = pieces.next().unwrap_or_default();
        // The new chunks before the old one is cut down: a crash in between doubles keys rather
        // than losing them.
        for piece in pieces {
            self.tree.insert(join(prefix, &piece[0].0), encode(piece))?;
        }
        self.tree.insert(chunk, encode(head))?;
        Ok(())
    }

    /// The chunk `trace` falls in under `prefix`: the one with the greatest start not after it.
    fn chunk_of(
        &self,
        prefix: &[u8],
        trace: &TraceKey,
    ) -> Result<Option<(IVec, IVec)>, StoreError> {
        let found = self
            .tree
            .range(prefix.to_vec()..=join(prefix, trace))
            .next_back();
        Ok(found.transpose()?)
    }

    /// The start of the chunk after `chunk` under `prefix`, if any.
    fn next_start(&self, prefix: &[u8], chunk: &[u8]) -> Result<Option<TraceKey>, StoreError> {
        let after = (
            Bound::Excluded(chunk.to_vec()),
            Bound::Included(join(prefix, &[0xff; TRACE_KEY_LEN])),
        );
        match self.tree.range(after).next().transpose()? {
            Some((key, _)) => Ok(TraceKey::try_from(&key[prefix.len()..]).ok()),
            None => Ok(None),
        }
    }

    /// What is filed with `trace` under `prefix`.
    pub(super) fn get(
        &self,
        prefix: &[u8],
        trace: &TraceKey,
    ) -> Result<Option<[u8; V]>, StoreError> {
        let Some((_, stored)) = self.chunk_of(prefix, trace)? else {
            return Ok(None);
        };
        let width = TRACE_KEY_LEN + V;
        let count = stored.len() / width;
        // Entries are sorted by key: a binary search over the fixed-width records.
        let at = |i: usize| &stored[i * width..(i + 1) * width];
        let (mut low, mut high) = (0, count);
        while low < high {
            let middle = (low + high) / 2;
            match at(middle)[..TRACE_KEY_LEN].cmp(&trace[..]) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return Ok(Some(split_entry::<V>(at(middle)).1)),
            }
        }
        Ok(None)
    }

    /// Entries filed under `prefix`, newest first, strictly before `before`.
    pub(super) fn newest<'a>(
        &'a self,
        prefix: Vec<u8>,
        before: Option<TraceKey>,
    ) -> impl Iterator<Item = Result<Entry<V>, StoreError>> + 'a {
        let last = join(&prefix, &before.unwrap_or([0xff; TRACE_KEY_LEN]));
        let chunks = self.tree.range(prefix..=last).rev();
        // Strictly decreasing keys: `before`, then each key listed, bounds the next.
        let mut bound = before;
        chunks.flat_map(move |chunk| {
            entries_in(chunk, Order::NewestFirst, |key| {
                let keep = bound.is_none_or(|bound| *key < bound);
                if keep {
                    bound = Some(*key);
                }
                keep
            })
        })
    }

    /// Every entry of the tree, oldest first (with an empty prefix: in trace key order).
    pub(super) fn oldest(&self) -> impl Iterator<Item = Result<Entry<V>, StoreError>> + '_ {
        // Strictly increasing keys: doubles of an interrupted split are skipped.
        let mut bound: Option<TraceKey> = None;
        self.tree.iter().flat_map(move |chunk| {
            entries_in(chunk, Order::OldestFirst, |key| {
                let keep = bound.is_none_or(|bound| *key > bound);
                if keep {
                    bound = Some(*key);
                }
                keep
            })
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    pub(super) fn clear(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        Ok(())
    }
}

enum Order {
    NewestFirst,
    OldestFirst,
}

/// The entries of a chunk as read from the tree, in `order`, those whose key `keep` accepts; a
/// failed read is one error.
fn entries_in<const V: usize>(
    chunk: ::sled::Result<(IVec, IVec)>,
    order: Order,
    mut keep: impl FnMut(&TraceKey) -> bool,
) -> Vec<Result<Entry<V>, StoreError>> {
    let stored = match chunk {
        Ok((_, stored)) => stored,
        Err(err) => return vec![Err(err.into())],
    };
    let entries = entries_of::<V>(&stored);
    let kept = |entry: &Entry<V>| keep(&entry.0);
    match order {
        Order::NewestFirst => entries.rev().filter(kept).map(Ok).collect(),
        Order::OldestFirst => entries.filter(kept).map(Ok).collect(),
    }
}

/// The entries of a stored chunk; a torn tail (never written by this code) is ignored.
fn entries_of<const V: usize>(stored: &[u8]) -> impl DoubleEndedIterator<Item = Entry<V>> + '_ {
    stored.chunks_exact(TRACE_KEY_LEN + V).map(split_entry::<V>)
}

fn split_entry<const V: usize>(entry: &[u8]) -> Entry<V> {
    let mut trace = [0; TRACE_KEY_LEN];
    let mut value = [0; V];
    trace.copy_from_slice(&entry[..TRACE_KEY_LEN]);
    value.copy_from_slice(&entry[TRACE_KEY_LEN..]);
    (trace, value)
}

fn encode<const V: usize>(entries: &[Entry<V>]) -> Vec<u8> {
    let mut value = Vec::with_capacity(entries.len() * (TRACE_KEY_LEN + V));
    for (trace, filed) in entries {
        value.extend_from_slice(trace);
        value.extend_from_slice(filed);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, ::sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    fn chunks(db: &::sled::Db, name: &str) -> Chunks<1> {
        Chunks::new(db.open_tree(name).unwrap())
    }

    fn trace(n: u64) -> TraceKey {
        let mut key = [0; TRACE_KEY_LEN];
        key[..8].copy_from_slice(&n.to_be_bytes());
        key
    }

    /// A small deterministic generator (xorshift), so a failure can be replayed.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Equal lists, or a short message at the first difference (the lists are long).
    fn same(actual: &[(u64, u8)], expected: &[(u64, u8)]) {
        let first = actual.iter().zip(expected).position(|(a, e)| a != e);
        assert!(
            first.is_none() && actual.len() == expected.len(),
            "{} listed, {} expected; first difference at {first:?}: {:?} vs {:?}",
            actual.len(),
            expected.len(),
            first.map(|i| &actual[i.saturating_sub(2)..(i + 3).min(actual.len())]),
            first.map(|i| &expected[i.saturating_sub(2)..(i + 3).min(expected.len())]),
        );
    }

    fn listed(chunks: &Chunks<1>, prefix: &[u8], before: Option<u64>) -> Vec<(u64, u8)> {
        chunks
            .newest(prefix.to_vec(), before.map(trace))
            .map(|entry| {
                let (key, [value]) = entry.unwrap();
                (u64::from_be_bytes(key[..8].try_into().unwrap()), value)
            })
            .collect()
    }

    #[test]
    fn chunks_list_get_and_overwrite_like_a_sorted_map() {
        // Mostly newer keys in order, as a gateway writes, with older ones rewritten (a score
        // added) and some older than anything stored. Three prefixes share one tree, as index
        // values do; the empty prefix has a tree of its own, as locations do.
        let (_dir, db) = open();
        let (indexed, all) = (chunks(&db, "index"), chunks(&db, "all"));
        let prefixes: [&[u8]; 3] = [
            b"\x00\x00\x00\x01a",
            b"\x00\x00\x00\x02ab",
            b"\x00\x00\x00\x01b",
        ];
        let mut model: [BTreeMap<u64, u8>; 4] = Default::default();
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        let mut newest = 10_000u64;
        for round in 0..60u8 {
            let (mut by_prefix, mut unprefixed) = (Additions::default(), Additions::default());
            for _ in 0..random.below(300) {
                let key = match random.below(10) {
                    0 => random.below(newest + 1),
                    1 => random.below(10_000),
                    _ => {
                        newest += 1 + random.below(3);
                        newest
                    }
                };
                let which = random.below(3) as usize;
                by_prefix.add(prefixes[which], &trace(key), [round]);
                model[which].insert(key, round);
                unprefixed.add(&[], &trace(key), [round]);
                model[3].insert(key, round);
            }
            indexed.write(by_prefix).unwrap();
            all.write(unprefixed).unwrap();
        }
        let trees = [&indexed, &indexed, &indexed, &all];
        let prefixes = [prefixes[0], prefixes[1], prefixes[2], b""];
        for ((chunks, prefix), model) in trees.iter().zip(prefixes).zip(&model) {
            let expected: Vec<(u64, u8)> = model.iter().rev().map(|(k, v)| (*k, *v)).collect();
            same(&listed(chunks, prefix, None), &expected);
            let cut = *model.keys().nth(model.len() / 2).unwrap();
            let before: Vec<(u64, u8)> =
                expected.iter().copied().filter(|(k, _)| *k < cut).collect();
            same(&listed(chunks, prefix, Some(cut)), &before);
            for (key, value) in model.iter().step_by(7) {
                assert_eq!(chunks.get(prefix, &trace(*key)).unwrap(), Some([*value]));
            }
            assert_eq!(chunks.get(prefix, &trace(newest + 1)).unwrap(), None);
        }
        let oldest: Vec<u64> = all
            .oldest()
            .map(|entry| u64::from_be_bytes(entry.unwrap().0[..8].try_into().unwrap()))
            .collect();
        assert_eq!(oldest, model[3].keys().copied().collect::<Vec<_>>());
        for chunks in [&indexed, &all] {
            for entry in chunks.tree.iter() {
                let (_, stored) = entry.unwrap();
                assert!(
                    stored.len() <= MAX_ENTRIES * (TRACE_KEY_LEN + 1),
                    "a chunk too long"
                );
            }
        }
        let total = model[3].len();
        assert!(
            all.tree.len() <= total / (MAX_ENTRIES / 2),
            "{} chunks for {total} keys",
            all.tree.len()
        );
    }

    #[test]
    fn a_split_cut_short_by_a_crash_lists_each_key_once() {
        let (_dir, db) = open();
        let chunks = chunks(&db, "all");
        let mut additions = Additions::default();
        for n in 0..100 {
            additions.add(&[], &trace(n), [1]);
        }
        chunks.write(additions).unwrap();
        // As if a split had written its new chunk and died before cutting the old one down.
        let doubled: Vec<Entry<1>> = (50..100).map(|n| (trace(n), [1])).collect();
        chunks.tree.insert(trace(50), encode(&doubled)).unwrap();
        let all: Vec<(u64, u8)> = (0..100).rev().map(|n| (n, 1)).collect();
        assert_eq!(listed(&chunks, &[], None), all);
        assert_eq!(chunks.oldest().count(), 100);
        // The next write to the old chunk drops its doubles.
        let mut additions = Additions::default();
        additions.add(&[], &trace(10), [2]);
        chunks.write(additions).unwrap();
        let first = chunks.tree.get(trace(0)).unwrap().unwrap();
        assert_eq!(first.len(), 50 * (TRACE_KEY_LEN + 1));
        assert_eq!(chunks.get(&[], &trace(10)).unwrap(), Some([2]));
        assert_eq!(chunks.get(&[], &trace(70)).unwrap(), Some([1]));
    }
}
