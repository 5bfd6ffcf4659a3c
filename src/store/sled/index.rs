//! The trace indexes (by run, by experiment, by session), kept in time buckets.
//!
//! One sled entry per trace per index made index writes most of the store's cost: sled splits a
//! leaf every 16 entries, and time-ordered keys always land in the newest leaf, so two small
//! index entries cost more than the trace they point to (callgrind: 39k of 69k instructions per
//! trace). An entry here holds every trace of one indexed value that started within one
//! [`BUCKET_MS`] window:
//!
//! key = length-prefixed value ‖ bucket number (u64, big-endian) → trace keys, sorted, 16 bytes each
//!
//! Buckets follow the trace id's own UUIDv7 timestamp, so walking buckets newest first and each
//! bucket's keys backwards lists traces in exactly the order one entry per trace gave. A write
//! merges into the stored bucket (sorted, deduplicated), so writing a trace again — a score
//! added, the index restored after a crash — never lists it twice. Only the recorder writes, one
//! batch at a time, so the read-merge-write needs no lock.

use std::collections::BTreeMap;

use ::sled::Tree;

use super::{length_prefixed, TraceKey, TRACE_KEY_LEN};
use crate::store::StoreError;

/// Width of a bucket. At 10k calls a second a bucket holds 1,000 keys (16 KB); with a write
/// every 25 ms it is rewritten four times, a few bytes per trace.
const BUCKET_MS: u64 = 100;

/// One index tree.
pub(super) struct TraceIndex {
    tree: Tree,
}

/// Index entries of one batch, gathered per bucket before the merge.
#[derive(Default)]
pub(super) struct Additions {
    buckets: BTreeMap<Vec<u8>, Vec<TraceKey>>,
}

impl Additions {
    /// Files `trace` under `value`.
    pub(super) fn add(&mut self, value: &str, trace: &TraceKey) -> Result<(), StoreError> {
        let key = bucket_key(&length_prefixed(value)?, trace);
        self.buckets.entry(key).or_default().push(*trace);
        Ok(())
    }
}

impl TraceIndex {
    pub(super) fn new(tree: Tree) -> TraceIndex {
        TraceIndex { tree }
    }

    /// Merges `additions` into the stored buckets.
    pub(super) fn write(&self, additions: Additions) -> Result<(), StoreError> {
        // Entry by entry, not a sled batch: see `insert_all` in `store/sled.rs`.
        for (key, mut traces) in additions.buckets {
            if let Some(stored) = self.tree.get(&key)? {
                traces.extend(keys_of(&stored));
            }
            traces.sort_unstable();
            traces.dedup();
            self.tree.insert(key, traces.concat())?;
        }
        Ok(())
    }

    /// Trace keys filed under `value`, newest first, strictly before `before`.
    pub(super) fn newest<'a>(
        &'a self,
        value: &str,
        before: Option<TraceKey>,
    ) -> Result<impl Iterator<Item = Result<TraceKey, StoreError>> + 'a, StoreError> {
        let prefix = length_prefixed(value)?;
        let last = bucket_key(&prefix, &before.unwrap_or([0xff; TRACE_KEY_LEN]));
        let buckets = self.tree.range(prefix..=last).rev();
        Ok(buckets.flat_map(move |bucket| {
            let keys: Vec<Result<TraceKey, StoreError>> = match bucket {
                Ok((_, stored)) => keys_of(&stored)
                    .rev()
                    .filter(|key| before.is_none_or(|before| *key < before))
                    .map(Ok)
                    .collect(),
                Err(err) => vec![Err(err.into())],
            };
            keys
        }))
    }

    pub(super) fn clear(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        Ok(())
    }
}

/// The trace keys of a stored bucket; a torn tail (never written by this code) is ignored.
fn keys_of(stored: &[u8]) -> impl DoubleEndedIterator<Item = TraceKey> + '_ {
    stored
        .chunks_exact(TRACE_KEY_LEN)
        .filter_map(|chunk| TraceKey::try_from(chunk).ok())
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
