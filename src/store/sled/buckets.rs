//! Trace keys kept in time buckets: where each trace is in the log (`trace_buckets`), and the
//! indexes by run, experiment and session (`*_trace_buckets`).
//!
//! One sled entry per trace made these trees most of the store's cost, in time and in memory.
//! sled splits a leaf every 16 entries, and time-ordered keys always land in the newest leaf: two
//! small index entries cost more than the trace they point to (callgrind: 39k of 69k instructions
//! per trace), and sled 0.34 keeps each page's metadata in memory even after the page is evicted,
//! so an entry per trace grew RSS by ~23 bytes per stored trace for as long as the process ran
//! (`tests/store_memory.rs`). An entry here holds every trace that started within one
//! [`BUCKET_MS`] window (of one indexed value, for an index):
//!
//! key = prefix ‖ bucket number (u64, big-endian) → entries sorted by trace key, each the 16-byte
//! trace key ‖ `V` bytes (a log location in `trace_buckets`; nothing in an index)
//!
//! The prefix is empty in `trace_buckets`, and the length-prefixed indexed value in an index.
//! Buckets follow the trace id's own UUIDv7 timestamp, a monotone function of the key, so walking
//! buckets newest first and each bucket's entries backwards lists traces in key order, exactly
//! as one entry per trace did. A write merges into the stored bucket, the newest write of a trace
//! winning, so writing a trace again (a score added, the index restored after a crash) never
//! lists it twice. Only the recorder writes, one batch at a time, so the read-merge-write needs
//! no lock.

use std::collections::BTreeMap;

use ::sled::Tree;

use super::{TraceKey, TRACE_KEY_LEN};
use crate::store::StoreError;

/// Width of a bucket. At 10k calls a second a bucket holds 1,000 traces (16 KB of index, 28 KB
/// of locations); with a write every 25 ms it is rewritten four times, a few bytes per trace.
const BUCKET_MS: u64 = 100;

/// A trace key and what is filed with it.
pub(super) type Entry<const V: usize> = (TraceKey, [u8; V]);

/// One bucketed tree, its entries carrying `V` bytes each besides the trace key.
pub(super) struct Buckets<const V: usize> {
    tree: Tree,
}

/// Entries of one batch, gathered per bucket before the merge.
#[derive(Default)]
pub(super) struct Additions<const V: usize> {
    buckets: BTreeMap<Vec<u8>, Vec<Entry<V>>>,
}

impl<const V: usize> Additions<V> {
    /// Files `trace` with `value` under `prefix`; a later addition of the same trace wins.
    pub(super) fn add(&mut self, prefix: &[u8], trace: &TraceKey, value: [u8; V]) {
        let key = bucket_key(prefix, trace);
        self.buckets.entry(key).or_default().push((*trace, value));
    }
}

impl<const V: usize> Buckets<V> {
    pub(super) fn new(tree: Tree) -> Buckets<V> {
        Buckets { tree }
    }

    /// Merges `additions` into the stored buckets.
    pub(super) fn write(&self, additions: Additions<V>) -> Result<(), StoreError> {
        // Entry by entry, not a sled batch: see `insert_all` in `store/sled.rs`.
        for (key, mut entries) in additions.buckets {
            // Newest first, so that the stable sort keeps the newest of a trace's entries first
            // and `dedup` keeps it.
            entries.reverse();
            if let Some(stored) = self.tree.get(&key)? {
                entries.extend(entries_of::<V>(&stored));
            }
            entries.sort_by_key(|(trace, _)| *trace);
            entries.dedup_by_key(|(trace, _)| *trace);
            let mut value = Vec::with_capacity(entries.len() * (TRACE_KEY_LEN + V));
            for (trace, filed) in &entries {
                value.extend_from_slice(trace);
                value.extend_from_slice(filed);
            }
            self.tree.insert(key, value)?;
        }
        Ok(())
    }

    /// What is filed with `trace` under `prefix`.
    pub(super) fn get(
        &self,
        prefix: &[u8],
        trace: &TraceKey,
    ) -> Result<Option<[u8; V]>, StoreError> {
        let Some(stored) = self.tree.get(bucket_key(prefix, trace))? else {
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
        let last = bucket_key(&prefix, &before.unwrap_or([0xff; TRACE_KEY_LEN]));
        let buckets = self.tree.range(prefix..=last).rev();
        buckets.flat_map(move |bucket| {
            let entries: Vec<Result<Entry<V>, StoreError>> = match bucket {
                Ok((_, stored)) => entries_of::<V>(&stored)
                    .rev()
                    .filter(|(key, _)| before.is_none_or(|before| *key < before))
                    .map(Ok)
                    .collect(),
                Err(err) => vec![Err(err.into())],
            };
            entries
        })
    }

    /// Every entry of the tree, oldest first (with an empty prefix: in trace key order).
    pub(super) fn oldest(&self) -> impl Iterator<Item = Result<Entry<V>, StoreError>> + '_ {
        self.tree.iter().flat_map(|bucket| {
            let entries: Vec<Result<Entry<V>, StoreError>> = match bucket {
                Ok((_, stored)) => entries_of::<V>(&stored).map(Ok).collect(),
                Err(err) => vec![Err(err.into())],
            };
            entries
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

/// The entries of a stored bucket; a torn tail (never written by this code) is ignored.
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

/// `prefix` ‖ the bucket of the trace's start time (UUIDv7: the first 48 bits are Unix ms).
fn bucket_key(prefix: &[u8], trace: &TraceKey) -> Vec<u8> {
    let mut millis = [0u8; 8];
    millis[2..].copy_from_slice(&trace[..6]);
    let bucket = u64::from_be_bytes(millis) / BUCKET_MS;
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&bucket.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(millis: u64, n: u8) -> TraceKey {
        let mut key = [0; TRACE_KEY_LEN];
        key[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        key[15] = n;
        key
    }

    #[test]
    fn the_newest_write_of_a_trace_wins_and_order_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let buckets = Buckets::<1>::new(db.open_tree("t").unwrap());
        let keys: Vec<TraceKey> = (0..30)
            .map(|n| trace(1_700_000_000_000 + n * 17, n as u8))
            .collect();
        let mut first = Additions::default();
        for (n, key) in keys.iter().enumerate().rev() {
            first.add(&[], key, [n as u8]);
        }
        // The same trace twice in a batch: the later one wins.
        first.add(&[], &keys[3], [100]);
        buckets.write(first).unwrap();
        let mut second = Additions::default();
        second.add(&[], &keys[5], [200]);
        buckets.write(second).unwrap();

        assert_eq!(buckets.get(&[], &keys[3]).unwrap(), Some([100]));
        assert_eq!(buckets.get(&[], &keys[5]).unwrap(), Some([200]));
        assert_eq!(buckets.get(&[], &keys[7]).unwrap(), Some([7]));
        assert_eq!(
            buckets.get(&[], &trace(1_700_000_000_001, 9)).unwrap(),
            None
        );
        let oldest: Vec<TraceKey> = buckets.oldest().map(|e| e.unwrap().0).collect();
        assert_eq!(oldest, keys);
        let newest: Vec<TraceKey> = buckets
            .newest(Vec::new(), Some(keys[20]))
            .map(|e| e.unwrap().0)
            .collect();
        let expected: Vec<TraceKey> = keys[..20].iter().rev().copied().collect();
        assert_eq!(newest, expected);
    }
}
