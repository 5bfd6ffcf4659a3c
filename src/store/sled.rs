//! The embedded store on sled.
//!
//! Layout: one tree per record kind, never one per run.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `trace_chunks` | a chunk's first trace key (16 raw bytes of the UUIDv7 id, big-endian, so time-ordered) | up to 64 consecutive trace keys, each with where the trace (bodies included) is in `traces.log` (see `log`, `chunks`) |
//! | `run_trace_chunks` | run id ‖ first trace key | up to 64 consecutive trace keys of the run (see `chunks`) |
//! | `session_trace_chunks` | session ‖ first trace key | likewise, by session |
//! | `experiment_trace_chunks` | experiment ‖ first trace key | likewise, by experiment |
//! | `experiment_runs` | experiment ‖ run id | empty |
//! | `runs` | run id | [`Run`] with its sketches |
//! | `experiments` | experiment name | [`Experiment`] |
//! | `meta` | `schema_version` | u32, big-endian (4; 3 kept a `traces` tree entry per trace and indexes in 100 ms buckets, 2 the trace itself in that tree, 1 also an index entry per trace) |
//!
//! In index keys the first part is length-prefixed (u32, big-endian), so one part's bytes can
//! never run into the next and a prefix scan for "ab" never sees "abc". Values are a one-byte
//! codec version followed by JSON. Bodies are kept raw (never parsed into a tree), so decoding a
//! trace for a listing costs little more than its head.
//! Scores live inside their trace (and are aggregated into the run), so they need no tree.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod chunks;
mod log;

use ::sled::{Config, Db, Tree};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::{Batch, Store, StoreError, TracePage, TraceQuery};
use crate::runs::{Experiment, Run};
use crate::trace::{Trace, TraceSummary};
use chunks::{Additions, Chunks};
use log::{Location, Records, TraceLog, LOCATION_LEN};

/// The on-disk layout version; a database with a newer one is refused, not misread.
pub const SCHEMA_VERSION: u32 = 4;
/// The index trees of schemas 1 (an entry per trace) and 2 to 3 (100 ms buckets), dropped when
/// such a database is opened; crash recovery rebuilds the indexes from the traces.
const OLD_INDEXES: [&str; 6] = [
    "run_traces",
    "session_traces",
    "experiment_traces",
    "run_trace_buckets",
    "session_trace_buckets",
    "experiment_trace_buckets",
];
/// Schemas 1 to 3 kept an entry per trace here; its traces move to `trace_chunks` at open.
const OLD_TRACES_TREE: &str = "traces";
const SCHEMA_KEY: &[u8] = b"schema_version";
/// 1 after a clean close, 0 while in use: a 0 at start means the last run crashed.
const CLEAN_KEY: &[u8] = b"clean_shutdown";
/// Leads every stored value, so the value encoding can change without a schema migration.
const CODEC_VERSION: u8 = 1;
/// Leads an old `traces` value that is a [`Location`] in the trace log, not the trace itself.
const LOCATED: u8 = 2;
const TRACE_KEY_LEN: usize = 16;

type TraceKey = [u8; TRACE_KEY_LEN];
/// The trace indexes file trace keys alone.
type TraceIndex = Chunks<0>;

pub struct SledStore {
    db: Db,
    log: TraceLog,
    /// Where each trace is in the log.
    locations: Chunks<LOCATION_LEN>,
    run_traces: TraceIndex,
    session_traces: TraceIndex,
    experiment_traces: TraceIndex,
    experiment_runs: Tree,
    runs: Tree,
    experiments: Tree,
    /// The last batch's record buffer, emptied, for the next batch: a fresh buffer per batch had
    /// every page of it faulted in as the records were written, 55% of the recorder's page
    /// faults in a closed loop (perf, `page-faults`).
    spare_records: Mutex<Records>,
}

/// A record buffer that grew past this (a batch of large traces) is let go, not kept.
const SPARE_RECORDS_MAX_BYTES: usize = 2 * 1024 * 1024;

impl SledStore {
    /// Opens (or creates) the database at `path` with a page cache of `cache_capacity_bytes`.
    pub fn open(path: &Path, cache_capacity_bytes: u64) -> Result<SledStore, StoreError> {
        let db = open_db(path, cache_capacity_bytes)?;
        let found = check_schema(&db, path)?;
        let tree = |name: &str| db.open_tree(name);
        let store = SledStore {
            log: TraceLog::open(path)?,
            locations: Chunks::new(tree("trace_chunks")?),
            run_traces: Chunks::new(tree("run_trace_chunks")?),
            session_traces: Chunks::new(tree("session_trace_chunks")?),
            experiment_traces: Chunks::new(tree("experiment_trace_chunks")?),
            experiment_runs: tree("experiment_runs")?,
            runs: tree("runs")?,
            experiments: tree("experiments")?,
            spare_records: Mutex::default(),
            db,
        };
        store.move_old_traces_tree()?;
        if found < SCHEMA_VERSION {
            // Only now, with everything moved: an older flowgate must refuse the store instead
            // of misreading it, and a crash before this point redoes the move.
            let meta = store.db.open_tree("meta")?;
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            store.db.flush()?;
        }
        Ok(store)
    }

    /// The schema version of the store at `path`, read without upgrading it (`None`: no version
    /// stored, a new or foreign database). For tools that must not change what they inspect.
    pub fn stored_schema(path: &Path) -> Result<Option<u32>, StoreError> {
        let db = open_db(path, 1024 * 1024)?;
        read_schema(&db.open_tree("meta")?)
    }

    /// Moves the traces of schemas 1 to 3 (a `traces` tree entry per trace: a location in the
    /// log, or in schemas 1 and 2 the trace itself, which goes to the log now) into
    /// `trace_chunks`, then drops the old tree. Moving twice (a crash before the drop) only
    /// files the same traces again.
    fn move_old_traces_tree(&self) -> Result<(), StoreError> {
        const PER_BATCH: usize = 10_000;
        let exists = self
            .db
            .tree_names()
            .iter()
            .any(|name| name == OLD_TRACES_TREE.as_bytes());
        if !exists {
            return Ok(());
        }
        let old = self.db.open_tree(OLD_TRACES_TREE)?;
        let mut moved = 0u64;
        let mut entries = old.iter().peekable();
        while entries.peek().is_some() {
            let mut records = Records::default();
            let mut inline = Vec::new();
            let mut located = Additions::default();
            for entry in entries.by_ref().take(PER_BATCH) {
                let (key, value) = entry?;
                let Ok(key) = TraceKey::try_from(key.as_ref()) else {
                    tracing::warn!(key = ?key, "skipping a trace with a malformed key");
                    continue;
                };
                match value.split_first() {
                    Some((&LOCATED, at)) => match Location::from_bytes(at) {
                        Some(at) => located.add(&[], &key, at.to_bytes()),
                        None => {
                            tracing::warn!(
                                err = %corrupt_trace(&key, "", format!("a location of {} bytes", at.len())),
                                "skipping an unreadable trace"
                            );
                            continue;
                        }
                    },
                    // Schema 2: the encoded trace itself, exactly a log record's payload.
                    _ => inline.push((
                        key,
                        records.push(&key, |bytes| {
                            bytes.extend_from_slice(&value);
                            Ok(())
                        })?,
                    )),
                }
                moved += 1;
            }
            if !records.is_empty() {
                let start = self.log.append(&records)?;
                for (key, at) in inline {
                    located.add(&[], &key, TraceLog::placed(start, at).to_bytes());
                }
            }
            self.locations.write(located)?;
        }
        // The log first: sled must not hold a location whose record is not yet on disk.
        self.log.sync()?;
        self.db.flush()?;
        self.db.drop_tree(OLD_TRACES_TREE)?;
        self.db.flush()?;
        tracing::info!(
            traces = moved,
            "store upgraded: trace locations are filed in chunks"
        );
        Ok(())
    }

    /// The summary of one trace; `None` for an index entry whose trace is gone, or a trace that
    /// cannot be read (said in the log: one lost record must not hide the rest).
    fn summary(
        &self,
        key: &TraceKey,
        at: Option<[u8; LOCATION_LEN]>,
    ) -> Result<Option<TraceSummary>, StoreError> {
        let at = match at {
            Some(at) => at,
            None => match self.locations.get(&[], key)? {
                Some(at) => at,
                None => return Ok(None),
            },
        };
        match self.load(key, &at) {
            Ok(trace) => Ok(Some(trace.summary())),
            Err(err) => {
                tracing::warn!(%err, "skipping an unreadable trace");
                Ok(None)
            }
        }
    }

    /// The trace at `at` in the log.
    fn load(&self, key: &TraceKey, at: &[u8; LOCATION_LEN]) -> Result<Trace, StoreError> {
        let at = Location::from_bytes(at)
            .ok_or_else(|| corrupt_trace(key, "", "its location".into()))?;
        let payload = self
            .log
            .read(key, at)
            .map_err(|reason| corrupt_trace(key, "", reason))?;
        decode_trace(key, &payload)
    }

    /// Trace keys newest first, strictly before `before`, from the most selective index the
    /// query allows; with the trace's location when the listing had it at hand.
    fn newest_keys<'a>(
        &'a self,
        query: &TraceQuery,
        before: Option<TraceKey>,
    ) -> Result<Box<dyn Iterator<Item = Result<Listed, StoreError>> + 'a>, StoreError> {
        let index = [
            (&self.session_traces, &query.session),
            (&self.run_traces, &query.run),
            (&self.experiment_traces, &query.experiment),
        ]
        .into_iter()
        .find_map(|(tree, value)| value.as_deref().map(|value| (tree, value)));
        let Some((tree, value)) = index else {
            let all = self.locations.newest(Vec::new(), before);
            return Ok(Box::new(
                all.map(|entry| entry.map(|(key, at)| (key, Some(at)))),
            ));
        };
        let keys = tree.newest(length_prefixed(value)?, before);
        Ok(Box::new(
            keys.map(|entry| entry.map(|(key, [])| (key, None))),
        ))
    }

    /// An empty record buffer with room for `bytes`: the last batch's, when it was kept.
    fn record_buffer(&self, bytes: usize) -> Records {
        let mut records = std::mem::take(&mut *self.lock_spare_records());
        records.clear_and_reserve(bytes);
        records
    }

    fn keep_record_buffer(&self, records: Records) {
        if records.capacity() <= SPARE_RECORDS_MAX_BYTES {
            *self.lock_spare_records() = records;
        }
    }

    fn lock_spare_records(&self) -> std::sync::MutexGuard<'_, Records> {
        // A poisoned lock only means a panic elsewhere; a buffer is still a buffer.
        self.spare_records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn trace_writes(trace: &Trace, writes: &mut Writes) -> Result<(), StoreError> {
        let key = trace_key(&trace.id)?;
        // One record with its bodies, in the log; sled gets where it is.
        let at = writes
            .records
            .push(&key, |bytes| encode_into(bytes, "trace", trace))?;
        writes.traces.push((key, at));
        Self::index_writes(trace, &key, writes)
    }

    /// The index entries that find a trace by run, experiment and session.
    fn index_writes(trace: &Trace, key: &TraceKey, writes: &mut Writes) -> Result<(), StoreError> {
        writes
            .run_traces
            .add(&length_prefixed(&trace.run_id)?, key, []);
        writes
            .experiment_traces
            .add(&length_prefixed(&trace.experiment)?, key, []);
        if let Some(session) = &trace.session {
            writes
                .session_traces
                .add(&length_prefixed(session)?, key, []);
        }
        Ok(())
    }

    fn apply_indexes(&self, writes: Writes) -> Result<(), StoreError> {
        self.run_traces.write(writes.run_traces)?;
        self.session_traces.write(writes.session_traces)?;
        self.experiment_traces.write(writes.experiment_traces)?;
        Ok(())
    }
}

/// A listed trace key, with its location if the listing read it already.
type Listed = (TraceKey, Option<[u8; LOCATION_LEN]>);

/// How long to wait for another holder of the database lock to let go: a previous flowgate
/// (or sled's own background I/O of one just closed) that is still finishing.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_db(path: &Path, cache_capacity_bytes: u64) -> Result<Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match try_open_db(path, cache_capacity_bytes) {
            Err(StoreError::Open {
                source: ::sled::Error::Io(io),
                ..
            }) if io.to_string().contains("could not acquire lock")
                && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

fn try_open_db(path: &Path, cache_capacity_bytes: u64) -> Result<Db, StoreError> {
    let config = Config::new()
        .path(path)
        .cache_capacity(cache_capacity_bytes)
        // No background flusher: every write goes through the recorder, which flushes within
        // `flush_interval` of it, so the thread would only add sled's log cleaning, which pages
        // nodes back into memory past `cache_capacity` and keeps them (after 900k traces, +23 MB
        // of RSS within a minute of idling; +41 MB after 2.7M, still growing) to save ~2% of the
        // file (`tests/store_memory.rs`).
        .flush_every_ms(None);
    let open_error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    // sled can panic on some damaged files; the user should get the same advice as for any
    // other failure to open, not a crash.
    match catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(opened) => opened.map_err(open_error),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "sled panicked".to_owned());
            Err(open_error(::sled::Error::ReportableBug(reason)))
        }
    }
}

/// The stored schema version (a new database gets the current one); a newer one is refused.
/// Moving to the current version is [`SledStore::open`]'s, once the old traces are moved.
fn check_schema(db: &Db, path: &Path) -> Result<u32, StoreError> {
    let meta = db.open_tree("meta")?;
    let Some(found) = read_schema(&meta)? else {
        meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
        return Ok(SCHEMA_VERSION);
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: PathBuf::from(path),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION {
        drop_old_indexes(db, &meta)?;
    }
    Ok(found)
}

/// The schema version in `meta`, if one is stored.
fn read_schema(meta: &::sled::Tree) -> Result<Option<u32>, StoreError> {
    let Some(stored) = meta.get(SCHEMA_KEY)? else {
        return Ok(None);
    };
    <[u8; 4]>::try_from(stored.as_ref())
        .map(|bytes| Some(u32::from_be_bytes(bytes)))
        .map_err(|_| StoreError::Corrupt {
            what: "schema version".into(),
            reason: format!("{} bytes, not 4", stored.len()),
        })
}

/// Drops the indexes of an older schema and marks the last session unclean, so the recorder's
/// start-up recovery rebuilds them (in chunks) from the traces.
fn drop_old_indexes(db: &Db, meta: &::sled::Tree) -> Result<(), StoreError> {
    for name in OLD_INDEXES {
        db.drop_tree(name)?;
    }
    meta.insert(CLEAN_KEY, &[0])?;
    tracing::info!("store upgraded: the trace indexes are rebuilt from the traces");
    Ok(())
}

impl Store for SledStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut writes = Writes {
            // Most traces (small bodies) fit: no regrowth.
            records: self.record_buffer(batch.traces.len() * 4096),
            ..Writes::default()
        };
        for trace in &batch.traces {
            // One bad id (a recorder bug) must not cost the rest of the batch.
            if let Err(err) = Self::trace_writes(trace, &mut writes) {
                tracing::warn!(trace_id = %trace.id, error = %err, "trace not stored");
            }
        }
        for run in &batch.runs {
            writes
                .runs
                .push((run.id.as_bytes().to_vec(), encode("run", run)?));
            writes.experiment_runs.push((
                join(&length_prefixed(&run.experiment)?, run.id.as_bytes()),
                Vec::new(),
            ));
        }
        for experiment in &batch.experiments {
            writes.experiments.push((
                experiment.name.as_bytes().to_vec(),
                encode("experiment", experiment)?,
            ));
        }
        // Records, then their indexes, aggregates last. A crash in between can keep traces whose
        // index entries were lost: the next start restores those (`recover_traces`) and
        // recomputes the aggregates.
        if !writes.records.is_empty() {
            let start = self.log.append(&writes.records)?;
            let mut located = Additions::default();
            for (key, at) in std::mem::take(&mut writes.traces) {
                located.add(&[], &key, TraceLog::placed(start, at).to_bytes());
            }
            self.locations.write(located)?;
        }
        self.keep_record_buffer(writes.records);
        self.run_traces
            .write(std::mem::take(&mut writes.run_traces))?;
        self.session_traces
            .write(std::mem::take(&mut writes.session_traces))?;
        self.experiment_traces
            .write(std::mem::take(&mut writes.experiment_traces))?;
        insert_all(&self.runs, writes.runs)?;
        insert_all(&self.experiment_runs, writes.experiment_runs)?;
        insert_all(&self.experiments, writes.experiments)?;
        Ok(())
    }

    fn trace(&self, id: &str) -> Result<Option<Trace>, StoreError> {
        let key = trace_key(id)?;
        let Some(at) = self.locations.get(&[], &key)? else {
            return Ok(None);
        };
        self.load(&key, &at).map(Some)
    }

    fn traces(&self, query: &TraceQuery) -> Result<TracePage, StoreError> {
        let before = match &query.cursor {
            Some(cursor) => Some(trace_key(cursor).map_err(|_| StoreError::InvalidCursor {
                cursor: cursor.clone(),
            })?),
            None => None,
        };
        let mut traces = Vec::new();
        if query.limit == 0 {
            return Ok(TracePage {
                traces,
                next_cursor: None,
            });
        }
        for listed in self.newest_keys(query, before)? {
            let (key, at) = listed?;
            let Some(summary) = self.summary(&key, at)? else {
                continue;
            };
            // Stale index entries (a trace re-written with other tags) fail this and are skipped.
            if matches(query, &summary) {
                traces.push(summary);
                if traces.len() > query.limit {
                    break;
                }
            }
        }
        let next_cursor = if traces.len() > query.limit {
            traces.truncate(query.limit);
            traces.last().map(|last| last.id.clone())
        } else {
            None
        };
        Ok(TracePage {
            traces,
            next_cursor,
        })
    }

    fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.runs
            .get(id.as_bytes())?
            .map(|bytes| decode_run(id.as_bytes(), &bytes))
            .transpose()
    }

    fn runs(&self, experiment: Option<&str>) -> Result<Vec<Run>, StoreError> {
        let Some(experiment) = experiment else {
            return self
                .runs
                .iter()
                .map(|entry| {
                    entry
                        .map_err(StoreError::from)
                        .and_then(|(k, v)| decode_run(&k, &v))
                })
                .collect();
        };
        let prefix = length_prefixed(experiment)?;
        let mut runs = Vec::new();
        for entry in self.experiment_runs.scan_prefix(&prefix) {
            let (key, _) = entry?;
            if let Some(run) = self.run(&String::from_utf8_lossy(&key[prefix.len()..]))? {
                if run.experiment == experiment {
                    runs.push(run);
                }
            }
        }
        Ok(runs)
    }

    fn experiment(&self, name: &str) -> Result<Option<Experiment>, StoreError> {
        self.experiments
            .get(name.as_bytes())?
            .map(|bytes| {
                decode(&bytes).map_err(|reason| StoreError::Corrupt {
                    what: format!("experiment {name:?}"),
                    reason,
                })
            })
            .transpose()
    }

    fn experiments(&self) -> Result<Vec<Experiment>, StoreError> {
        self.experiments
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(&value).map_err(|reason| StoreError::Corrupt {
                    what: format!("experiment {:?}", String::from_utf8_lossy(&key)),
                    reason,
                })
            })
            .collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        // The log first: sled must not hold a location whose record is not yet on disk.
        self.log.sync()?;
        self.db.flush()?;
        Ok(())
    }

    fn closed_cleanly(&self) -> Result<bool, StoreError> {
        // A new database has nothing to recompute: count it as clean.
        Ok(match self.db.open_tree("meta")?.get(CLEAN_KEY)? {
            Some(flag) => flag.as_ref() == [1],
            None => self.locations.is_empty(),
        })
    }

    fn open_session(&self) -> Result<bool, StoreError> {
        let clean = self.closed_cleanly()?;
        self.db.open_tree("meta")?.insert(CLEAN_KEY, &[0])?;
        self.db.flush()?;
        Ok(clean)
    }

    fn close_session(&self) -> Result<(), StoreError> {
        self.log.sync()?;
        self.db.open_tree("meta")?.insert(CLEAN_KEY, &[1])?;
        self.db.flush()?;
        Ok(())
    }

    fn for_each_trace(&self, visit: &mut dyn FnMut(Trace)) -> Result<u64, StoreError> {
        let mut unreadable = 0;
        for entry in self.locations.oldest() {
            let (key, at) = entry?;
            match self.load(&key, &at) {
                Ok(trace) => visit(trace),
                Err(err) => {
                    tracing::warn!(%err, "skipping an unreadable trace");
                    unreadable += 1;
                }
            }
        }
        Ok(unreadable)
    }

    fn recover_traces(&self, visit: &mut dyn FnMut(Trace)) -> Result<(), StoreError> {
        const PER_BATCH: usize = 1000;
        // Rebuilt from the traces, which are the record of truth.
        self.run_traces.clear()?;
        self.session_traces.clear()?;
        self.experiment_traces.clear()?;
        let mut writes = Writes::default();
        let mut pending = 0;
        for entry in self.locations.oldest() {
            let (key, at) = entry?;
            let trace = match self.load(&key, &at) {
                Ok(trace) => trace,
                Err(err) => {
                    tracing::warn!(%err, "skipping an unreadable trace");
                    continue;
                }
            };
            Self::index_writes(&trace, &key, &mut writes)?;
            pending += 1;
            if pending == PER_BATCH {
                self.apply_indexes(std::mem::take(&mut writes))?;
                pending = 0;
            }
            visit(trace);
        }
        self.apply_indexes(writes)
    }

    fn replace_aggregates(
        &self,
        runs: &[Run],
        experiments: &[Experiment],
    ) -> Result<(), StoreError> {
        self.runs.clear()?;
        self.experiment_runs.clear()?;
        self.experiments.clear()?;
        let batch = Batch {
            traces: Vec::new(),
            runs: runs.to_vec(),
            experiments: experiments.to_vec(),
        };
        self.apply(&batch)
    }
}

/// The entries of one [`Store::apply`], per tree.
#[derive(Default)]
struct Writes {
    /// The batch's trace records, for the log.
    records: Records,
    /// Each trace's place among `records`.
    traces: Vec<(TraceKey, Location)>,
    run_traces: Additions<0>,
    session_traces: Additions<0>,
    experiment_traces: Additions<0>,
    runs: Entries,
    experiment_runs: Entries,
    experiments: Entries,
}

/// Keys and values to insert into one tree.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Inserts one entry at a time, not as a sled `Batch`: sled 0.34 seals and writes its I/O buffer
/// before and after every batch (two `pwrite`s, two `sync_file_range`s and two jobs for its I/O
/// thread pool, each waking all seven of its threads), which at 1000 calls a second was ~350
/// small writes a second. Nothing needs a batch's all-or-nothing: every entry stands alone, a
/// trace is the record of truth, and after a crash the next start rebuilds the indexes and
/// aggregates from the traces (`recover_traces`).
fn insert_all(tree: &Tree, entries: Entries) -> Result<(), StoreError> {
    for (key, value) in entries {
        tree.insert(key, value)?;
    }
    Ok(())
}

fn matches(query: &TraceQuery, summary: &TraceSummary) -> bool {
    let wanted = |filter: &Option<String>, actual: Option<&str>| match filter {
        Some(filter) => actual == Some(filter.as_str()),
        None => true,
    };
    wanted(&query.experiment, Some(&summary.experiment))
        && wanted(&query.run, Some(&summary.run_id))
        && wanted(&query.session, summary.session.as_deref())
}

fn trace_key(id: &str) -> Result<TraceKey, StoreError> {
    Uuid::try_parse(id)
        .map(|uuid| *uuid.as_bytes())
        .map_err(|_| StoreError::InvalidTraceId { id: id.to_owned() })
}

fn length_prefixed(part: &str) -> Result<Vec<u8>, StoreError> {
    let len = u32::try_from(part.len()).map_err(|_| StoreError::KeyTooLong { len: part.len() })?;
    let mut key = Vec::with_capacity(4 + part.len() + TRACE_KEY_LEN);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(part.as_bytes());
    Ok(key)
}

fn join(prefix: &[u8], suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + suffix.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(suffix);
    key
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    // Most records (a run with its sketches) fit: no regrowth.
    let mut bytes = Vec::with_capacity(4096);
    encode_into(&mut bytes, what, value)?;
    Ok(bytes)
}

fn encode_into<T: Serialize>(
    bytes: &mut Vec<u8>,
    what: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    bytes.push(CODEC_VERSION);
    serde_json::to_writer(bytes, value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&CODEC_VERSION, json)) => serde_json::from_slice(json).map_err(|err| err.to_string()),
        Some((version, _)) => Err(format!("unknown codec version {version}")),
        None => Err("empty value".to_owned()),
    }
}

fn decode_trace(key: &[u8], bytes: &[u8]) -> Result<Trace, StoreError> {
    decode(bytes).map_err(|reason| corrupt_trace(key, "", reason))
}

fn corrupt_trace(key: &[u8], part: &str, reason: String) -> StoreError {
    let id = Uuid::from_slice(key)
        .map(|uuid| uuid.to_string())
        .unwrap_or_else(|_| format!("{key:02x?}"));
    StoreError::Corrupt {
        what: format!("trace {id}{part}"),
        reason,
    }
}

fn decode_run(key: &[u8], bytes: &[u8]) -> Result<Run, StoreError> {
    decode(bytes).map_err(|reason| StoreError::Corrupt {
        what: format!("run {:?}", String::from_utf8_lossy(key)),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Latency, Score, Usage};

    const CACHE: u64 = 8 * 1024 * 1024;

    fn open(dir: &tempfile::TempDir) -> SledStore {
        SledStore::open(&dir.path().join("db"), CACHE).unwrap()
    }

    /// A time-ordered id for the n-th trace (UUIDv7 layout: the timestamp leads).
    fn trace_id(n: u64) -> String {
        let millis = 1_700_000_000_000 + n;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        bytes[8] = 0x80;
        bytes[15] = n as u8;
        Uuid::from_bytes(bytes).to_string()
    }

    fn trace(n: u64, experiment: &str, run: &str, session: Option<&str>) -> Trace {
        Trace {
            id: trace_id(n),
            session: session.map(str::to_owned),
            started_at_ms: 1_700_000_000_000 + n,
            ended_at_ms: 1_700_000_000_010 + n,
            experiment: experiment.into(),
            run_id: run.into(),
            provider: Some("mock".into()),
            requested_model: Some("mock/echo".into()),
            endpoint: "chat.completions".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            latency: Latency {
                total_ms: 10.0,
                upstream_ms: Some(9.0),
                overhead_ms: 1.0,
                ttft_ms: None,
            },
            usage: Usage {
                input_tokens: Some(3),
                output_tokens: Some(4),
                cached_input_tokens: None,
                cache_write_input_tokens: None,
                source: "provider".into(),
            },
            cache: "miss".into(),
            request_body: Some(crate::trace::Captured::json(
                &serde_json::json!({"messages": [n]}),
            )),
            response_body: Some(crate::trace::Captured::text("hello", true)),
            ..Trace::default()
        }
    }

    /// 25 traces 1 ms apart: experiments alternate a/b, runs cycle r0..r2, sessions s0/s1 on
    /// even n.
    fn sample() -> Vec<Trace> {
        sample_spaced(1)
    }

    /// As [`sample`], `step_ms` apart.
    fn sample_spaced(step_ms: u64) -> Vec<Trace> {
        (0..25)
            .map(|n| {
                let session = (n % 2 == 0).then(|| format!("s{}", n % 4 / 2));
                trace(
                    n * step_ms,
                    ["a", "b"][n as usize % 2],
                    &format!("r{}", n % 3),
                    session.as_deref(),
                )
            })
            .collect()
    }

    fn page_all(store: &SledStore, mut query: TraceQuery) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let page = store.traces(&query).unwrap();
            assert!(page.traces.len() <= query.limit);
            ids.extend(page.traces.into_iter().map(|t| t.id));
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => return ids,
            }
        }
    }

    fn expected(traces: &[Trace], keep: impl Fn(&Trace) -> bool) -> Vec<String> {
        traces
            .iter()
            .rev()
            .filter(|t| keep(t))
            .map(|t| t.id.clone())
            .collect()
    }

    #[test]
    fn trace_round_trips_with_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let original = trace(1, "a", "r1", Some("s"));
        store
            .apply(&Batch {
                traces: vec![original.clone()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.trace(&original.id).unwrap(), Some(original.clone()));
        assert_eq!(store.trace(&trace_id(2)).unwrap(), None);
        let page = store
            .traces(&TraceQuery {
                limit: 10,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(page.traces, vec![original.summary()]);
    }

    #[test]
    fn each_batch_appends_its_own_records_only() {
        // The record buffer is kept from one batch to the next: nothing of the last batch may be
        // written again, and every trace must still read back.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let log_len = || {
            std::fs::metadata(dir.path().join("db").join("traces.log"))
                .unwrap()
                .len()
        };
        let mut grew = Vec::new();
        for n in 1..=3 {
            let before = log_len();
            store
                .apply(&Batch {
                    traces: vec![trace(n, "a", "r1", None)],
                    ..Batch::default()
                })
                .unwrap();
            grew.push(log_len() - before);
        }
        assert!(grew[0] > 0);
        assert_eq!(grew, vec![grew[0]; 3], "bytes appended by each batch");
        for n in 1..=3 {
            assert_eq!(
                store.trace(&trace_id(n)).unwrap(),
                Some(trace(n, "a", "r1", None))
            );
        }
    }

    #[test]
    fn traces_take_a_sled_entry_per_64_not_one_each() {
        // sled keeps memory for every page it ever held: an entry per trace grew RSS without
        // end (`tests/store_memory.rs`).
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let traces: Vec<Trace> = (0..1000).map(|n| trace(n, "a", "r0", Some("s"))).collect();
        for batch in traces.chunks(25) {
            store
                .apply(&Batch {
                    traces: batch.to_vec(),
                    ..Batch::default()
                })
                .unwrap();
        }
        for tree in [
            "trace_chunks",
            "run_trace_chunks",
            "session_trace_chunks",
            "experiment_trace_chunks",
        ] {
            assert_eq!(store.db.open_tree(tree).unwrap().len(), 16, "{tree}");
        }
        let listed = store
            .traces(&TraceQuery {
                limit: 1000,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(listed.traces.len(), 1000);
        assert_eq!(
            store.trace(&traces[517].id).unwrap().as_ref(),
            Some(&traces[517])
        );
    }

    #[test]
    fn rewriting_a_trace_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut original = trace(1, "a", "r1", Some("s"));
        store
            .apply(&Batch {
                traces: vec![original.clone()],
                ..Batch::default()
            })
            .unwrap();
        original.scores.push(Score {
            name: "exact_match".into(),
            value: 1.0,
            comment: None,
            at_ms: 5,
        });
        original.request_body = None;
        original.response_body = None;
        store
            .apply(&Batch {
                traces: vec![original.clone()],
                ..Batch::default()
            })
            .unwrap();
        store
            .apply(&Batch {
                traces: vec![original.clone()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.trace(&original.id).unwrap(), Some(original));
        let query = TraceQuery {
            run: Some("r1".into()),
            limit: 10,
            ..TraceQuery::default()
        };
        assert_eq!(store.traces(&query).unwrap().traces.len(), 1);
    }

    #[test]
    fn pagination_covers_every_filter() {
        for (step_ms, limit, chunk) in [(1, 3, 25), (37, 1, 4), (37, 7, 3), (250, 2, 5)] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir);
            let traces = sample_spaced(step_ms);
            // Batches land newest first, as when long streams end after short calls.
            for batch in traces.chunks(chunk).rev() {
                store
                    .apply(&Batch {
                        traces: batch.to_vec(),
                        ..Batch::default()
                    })
                    .unwrap();
            }
            check_every_filter(&store, &traces, limit);
        }
    }

    fn check_every_filter(store: &SledStore, traces: &[Trace], limit: usize) {
        let traces = traces.to_vec();
        let query =
            |experiment: Option<&str>, run: Option<&str>, session: Option<&str>| TraceQuery {
                experiment: experiment.map(str::to_owned),
                run: run.map(str::to_owned),
                session: session.map(str::to_owned),
                limit,
                cursor: None,
            };
        assert_eq!(
            page_all(store, query(None, None, None)),
            expected(&traces, |_| true)
        );
        assert_eq!(
            page_all(store, query(Some("a"), None, None)),
            expected(&traces, |t| t.experiment == "a")
        );
        assert_eq!(
            page_all(store, query(None, Some("r1"), None)),
            expected(&traces, |t| t.run_id == "r1")
        );
        assert_eq!(
            page_all(store, query(None, None, Some("s1"))),
            expected(&traces, |t| t.session.as_deref() == Some("s1"))
        );
        assert_eq!(
            page_all(store, query(Some("a"), Some("r2"), None)),
            expected(&traces, |t| t.experiment == "a" && t.run_id == "r2")
        );
        assert_eq!(
            page_all(store, query(Some("b"), None, Some("s0"))),
            expected(&traces, |t| t.experiment == "b"
                && t.session.as_deref() == Some("s0"))
        );
        assert!(page_all(store, query(Some("missing"), None, None)).is_empty());
    }

    #[test]
    fn exact_last_page_has_no_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .apply(&Batch {
                traces: sample()[..6].to_vec(),
                ..Batch::default()
            })
            .unwrap();
        let first = store
            .traces(&TraceQuery {
                limit: 3,
                ..TraceQuery::default()
            })
            .unwrap();
        let cursor = first.next_cursor.clone();
        assert_eq!(cursor.as_deref(), Some(trace_id(3).as_str()));
        let second = store
            .traces(&TraceQuery {
                limit: 3,
                cursor,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(second.traces.len(), 3);
        assert_eq!(second.next_cursor, None);
    }

    #[test]
    fn bad_ids_and_cursors_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert!(matches!(
            store.trace("not-a-uuid"),
            Err(StoreError::InvalidTraceId { .. })
        ));
        let query = TraceQuery {
            limit: 5,
            cursor: Some("zzz".into()),
            ..TraceQuery::default()
        };
        assert!(matches!(
            store.traces(&query),
            Err(StoreError::InvalidCursor { .. })
        ));
    }

    #[test]
    fn runs_and_experiments_round_trip_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = trace(1, "a", "r1", None);
        let other = trace(2, "ab", "r2", None);
        let runs = vec![Run::from_first(&first), Run::from_first(&other)];
        let experiments = vec![
            Experiment::from_first(&first),
            Experiment::from_first(&other),
        ];
        store
            .apply(&Batch {
                traces: vec![],
                runs: runs.clone(),
                experiments: experiments.clone(),
            })
            .unwrap();

        assert_eq!(store.run("r1").unwrap(), Some(runs[0].clone()));
        assert_eq!(store.run("nope").unwrap(), None);
        assert_eq!(store.runs(Some("a")).unwrap(), vec![runs[0].clone()]);
        assert_eq!(store.runs(Some("ab")).unwrap(), vec![runs[1].clone()]);
        assert_eq!(store.runs(None).unwrap().len(), 2);
        assert_eq!(store.experiments().unwrap(), experiments);
    }

    #[test]
    fn reopening_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let traces = sample();
        let run = Run::from_first(&traces[0]);
        {
            let store = open(&dir);
            store
                .apply(&Batch {
                    traces: traces.clone(),
                    runs: vec![run.clone()],
                    experiments: vec![],
                })
                .unwrap();
            store.flush().unwrap();
        }
        let store = open(&dir);
        assert_eq!(store.trace(&traces[7].id).unwrap(), Some(traces[7].clone()));
        assert_eq!(store.run(&run.id).unwrap(), Some(run));
        let query = TraceQuery {
            limit: 100,
            ..TraceQuery::default()
        };
        assert_eq!(store.traces(&query).unwrap().traces.len(), traces.len());
    }

    #[test]
    fn a_schema_1_database_gets_its_indexes_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let traces = sample_spaced(37);
        {
            // What schema 1 left: traces, and an index entry per trace in trees now unused.
            let db = Config::new().path(&path).open().unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert(SCHEMA_KEY, &1u32.to_be_bytes()).unwrap();
            meta.insert(CLEAN_KEY, &[1]).unwrap();
            let stored = db.open_tree("traces").unwrap();
            let old_index = db.open_tree("run_traces").unwrap();
            for trace in &traces {
                let key = trace_key(&trace.id).unwrap();
                stored.insert(key, encode("trace", trace).unwrap()).unwrap();
                old_index
                    .insert(join(&length_prefixed(&trace.run_id).unwrap(), &key), &[])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = open(&dir);
        assert!(
            !store.closed_cleanly().unwrap(),
            "the upgrade must ask for recovery"
        );
        assert!(!has_tree(&store, "run_traces"));
        let mut recovered = 0;
        store.recover_traces(&mut |_| recovered += 1).unwrap();
        assert_eq!(recovered, traces.len());
        check_every_filter(&store, &traces, 4);
    }

    /// Writes what schema 3 left (a `traces` entry per trace: its location in the log) for
    /// `logged`, and what schema 2 left (the trace itself as the value) for `inline`, with their
    /// index entries.
    fn write_schema_3(path: &Path, logged: &[Trace], inline: &[Trace]) {
        let db = Config::new().path(path).open().unwrap();
        let log = TraceLog::open(path).unwrap();
        let old = db.open_tree(OLD_TRACES_TREE).unwrap();
        let mut records = Records::default();
        let mut placed = Vec::new();
        for trace in logged {
            let key = trace_key(&trace.id).unwrap();
            let at = records
                .push(&key, |bytes| encode_into(bytes, "trace", trace))
                .unwrap();
            placed.push((key, at));
        }
        let start = log.append(&records).unwrap();
        for (key, at) in placed {
            let mut value = vec![LOCATED];
            value.extend_from_slice(&TraceLog::placed(start, at).to_bytes());
            old.insert(key, value).unwrap();
        }
        for trace in inline {
            let key = trace_key(&trace.id).unwrap();
            old.insert(key, encode("trace", trace).unwrap()).unwrap();
        }
        // Schema 3's indexes (100 ms buckets), which the upgrade drops and recovery rebuilds.
        for name in &OLD_INDEXES[3..] {
            db.open_tree(name)
                .unwrap()
                .insert(b"bucket", &[0; 16])
                .unwrap();
        }
        let meta = db.open_tree("meta").unwrap();
        meta.insert(SCHEMA_KEY, &3u32.to_be_bytes()).unwrap();
        meta.insert(CLEAN_KEY, &[1]).unwrap();
        log.sync().unwrap();
        db.flush().unwrap();
    }

    fn has_tree(store: &SledStore, tree: &str) -> bool {
        store
            .db
            .tree_names()
            .iter()
            .any(|name| name == tree.as_bytes())
    }

    fn check_all_readable(store: &SledStore, traces: &[Trace]) {
        for trace in traces {
            assert_eq!(store.trace(&trace.id).unwrap().as_ref(), Some(trace));
        }
        check_every_filter(store, traces, 4);
        let mut visited = Vec::new();
        store
            .for_each_trace(&mut |trace| visited.push(trace.id))
            .unwrap();
        let all: Vec<String> = traces.iter().map(|t| t.id.clone()).collect();
        assert_eq!(visited, all, "every trace once, oldest first");
    }

    #[test]
    fn schema_2_and_3_traces_move_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let traces = sample_spaced(11);
        let (logged, inline) = traces.split_at(traces.len() / 2);
        write_schema_3(&path, logged, inline);

        let store = open(&dir);
        let schema = store.db.open_tree("meta").unwrap().get(SCHEMA_KEY).unwrap();
        assert_eq!(
            schema.unwrap().as_ref(),
            SCHEMA_VERSION.to_be_bytes(),
            "an older flowgate must now refuse the store"
        );
        assert!(
            !has_tree(&store, OLD_TRACES_TREE),
            "the old tree is dropped"
        );
        assert!(
            !store.closed_cleanly().unwrap(),
            "the upgrade must ask for recovery, which rebuilds the indexes"
        );
        assert!(!OLD_INDEXES.iter().any(|old| has_tree(&store, old)));
        let mut recovered = 0;
        store.recover_traces(&mut |_| recovered += 1).unwrap();
        assert_eq!(recovered, traces.len());
        check_all_readable(&store, &traces);
        // New traces land beside the moved ones.
        let newer: Vec<Trace> = (30..35).map(|n| trace(n * 11, "a", "r0", None)).collect();
        store
            .apply(&Batch {
                traces: newer.clone(),
                ..Batch::default()
            })
            .unwrap();
        drop(store);
        let store = open(&dir);
        check_all_readable(&store, &[traces.clone(), newer].concat());
    }

    #[test]
    fn a_move_interrupted_before_the_drop_is_redone_without_doubles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let traces = sample_spaced(11);
        write_schema_3(&path, &traces, &[]);
        {
            // The move ran, the version moved, and the process died before the old tree went.
            let store = open(&dir);
            store.recover_traces(&mut |_| {}).unwrap();
            let old = store.db.open_tree(OLD_TRACES_TREE).unwrap();
            for trace in &traces {
                let key = trace_key(&trace.id).unwrap();
                let at = store.locations.get(&[], &key).unwrap().unwrap();
                old.insert(key, [&[LOCATED][..], &at].concat()).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(&dir);
        assert!(!has_tree(&store, OLD_TRACES_TREE));
        check_all_readable(&store, &traces);
    }

    #[test]
    fn a_trace_whose_record_was_lost_is_an_error_and_skipped_in_listings() {
        let dir = tempfile::tempdir().unwrap();
        let traces = sample();
        {
            let store = open(&dir);
            store
                .apply(&Batch {
                    traces: traces.clone(),
                    ..Batch::default()
                })
                .unwrap();
            store.flush().unwrap();
        }
        // A power cut after sled's flush but before the log's: the log lost its last bytes.
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("db").join("traces.log"))
            .unwrap();
        log.set_len(log.metadata().unwrap().len() - 10).unwrap();

        let store = open(&dir);
        let (lost, kept) = traces.split_last().unwrap();
        let err = store.trace(&lost.id).unwrap_err().to_string();
        assert!(
            err.contains(&lost.id) && err.contains("cannot be read"),
            "{err}"
        );
        let listed = page_all(
            &store,
            TraceQuery {
                limit: 5,
                ..TraceQuery::default()
            },
        );
        assert_eq!(listed, expected(kept, |_| true));
        let mut visited = 0;
        let unreadable = store.for_each_trace(&mut |_| visited += 1).unwrap();
        assert_eq!((visited, unreadable), (kept.len(), 1));
        // Written again (as the recorder does after a score), it is whole again.
        store
            .apply(&Batch {
                traces: vec![lost.clone()],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.trace(&lost.id).unwrap().as_ref(), Some(lost));
    }

    #[test]
    fn newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = Config::new().path(&path).open().unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let Err(err) = SledStore::open(&path, CACHE) else {
            panic!("a newer schema must be refused")
        };
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("move the database aside"), "{err}");
    }

    #[test]
    fn unopenable_path_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let Err(err) = SledStore::open(&file.join("db"), CACHE) else {
            panic!("must fail")
        };
        let message = err.to_string();
        assert!(
            message.contains("a-file") && message.contains("move it aside"),
            "{message}"
        );
    }
}
