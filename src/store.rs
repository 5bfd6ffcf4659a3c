//! Storage of traces, runs and experiments behind a small trait, so the embedded default
//! ([`SledStore`]) can be swapped or complemented without touching the proxy or the recorder.
//!
//! Every method blocks (disk I/O): async callers run them in `spawn_blocking`.

mod sled;

use std::path::PathBuf;

use serde::Serialize;

use crate::runs::{Experiment, Run};
use crate::trace::{Trace, TraceSummary};

pub use self::sled::{SledStore, SCHEMA_VERSION};

/// What the recorder writes in one go.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Whole traces; writing one again (after a score was added) replaces it.
    pub traces: Vec<Trace>,
    /// Run aggregates, replacing what is stored under the same id.
    pub runs: Vec<Run>,
    /// Experiment counters, replacing what is stored under the same name.
    pub experiments: Vec<Experiment>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.traces.is_empty() && self.runs.is_empty() && self.experiments.is_empty()
    }
}

/// A page request for trace summaries; the filters combine (all must match).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceQuery {
    pub experiment: Option<String>,
    pub run: Option<String>,
    pub session: Option<String>,
    pub limit: usize,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Trace summaries newest first; `next_cursor` is `None` on the last page.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TracePage {
    pub traces: Vec<TraceSummary>,
    pub next_cursor: Option<String>,
}

pub trait Store: Send + Sync {
    /// Writes traces, runs and experiments. Idempotent for the same trace id.
    fn apply(&self, batch: &Batch) -> Result<(), StoreError>;
    /// One whole trace, bodies included. A malformed id is [`StoreError::InvalidTraceId`].
    fn trace(&self, id: &str) -> Result<Option<Trace>, StoreError>;
    /// Trace summaries, newest first, cursor-paginated.
    fn traces(&self, query: &TraceQuery) -> Result<TracePage, StoreError>;
    fn run(&self, id: &str) -> Result<Option<Run>, StoreError>;
    /// All runs, or those of one experiment; in no particular order.
    fn runs(&self, experiment: Option<&str>) -> Result<Vec<Run>, StoreError>;
    fn experiment(&self, name: &str) -> Result<Option<Experiment>, StoreError>;
    fn experiments(&self) -> Result<Vec<Experiment>, StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Marks the store in use; returns whether the previous user closed it cleanly (if not, run
    /// aggregates may lag the traces and should be recomputed).
    fn open_session(&self) -> Result<bool, StoreError>;
    /// Whether the last user closed the store cleanly, without changing anything.
    fn closed_cleanly(&self) -> Result<bool, StoreError>;
    /// Marks a clean close (after a final flush).
    fn close_session(&self) -> Result<(), StoreError>;
    /// Calls `visit` with every stored trace, oldest first; returns how many could not be read
    /// (each is logged and skipped).
    fn for_each_trace(&self, visit: &mut dyn FnMut(Trace)) -> Result<u64, StoreError>;
    /// After an unclean stop: as `for_each_trace`, and restores each trace's index entries (a
    /// crash can keep a batch's traces but lose the index writes that followed them).
    fn recover_traces(&self, visit: &mut dyn FnMut(Trace)) -> Result<(), StoreError>;
    /// Replaces all run and experiment aggregates (after recomputing them from the traces).
    fn replace_aggregates(
        &self,
        runs: &[Run],
        experiments: &[Experiment],
    ) -> Result<(), StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "could not open the database at {path}: {source}. If another flowgate is using it, stop \
         that one first; `flowgate store check --path {path}` reports what it holds; if it is \
         damaged, move it aside (mv {path} {path}.broken) and start again with an empty one"
    )]
    Open {
        path: PathBuf,
        source: ::sled::Error,
    },
    #[error(
        "the database at {path} has schema version {found}, newer than this flowgate understands \
         ({supported}); upgrade flowgate, or move the database aside and start with an empty one"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Not a UUID: no trace can have this id.
    #[error("{id:?} is not a trace id (a UUID such as 0190f5d6-8b1c-7e2a-9c3d-4e5f60718293)")]
    InvalidTraceId { id: String },
    /// Not a cursor this store handed out.
    #[error("{cursor:?} is not a valid cursor: pass the next_cursor of the previous page")]
    InvalidCursor { cursor: String },
    #[error("a key part is too long ({len} bytes)")]
    KeyTooLong { len: usize },
    #[error("stored {what} could not be read: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("could not encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("storage error: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("trace log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}
