//! The recorder: a bounded channel and the task behind it that turns what the request path saw
//! into stored traces and aggregated runs. Everything slow (parsing usage, token counting, cost,
//! aggregation, storage) happens here, never on the request's task.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::config::Capture;
use crate::guardrails::Verdict;
use crate::metering::{self, Pricing, Tokens};
use crate::providers::Endpoint;
use crate::runs::{Experiment, Run};
use crate::store::{Batch, Store, StoreError};
use crate::telemetry::{Metrics, MetricsWriter};
use crate::trace::{Captured, Score, Trace, TraceError, Usage};
use crate::usage;

/// Why the recorder could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("the recorder has stopped")]
    Stopped,
    #[error("storage error: {0}")]
    Store(String),
}

/// What the recorder did with a score.
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreOutcome {
    /// Stored on the trace and aggregated into this run.
    Recorded {
        run_id: String,
    },
    NoSuchTrace,
}

/// What the request path hands over when a call ends: what it knew, and the raw response bytes
/// (shared `Bytes`, not copies) for the recorder to read usage and content from.
pub struct TraceEvent {
    /// Filled in as far as the request path knew it: ids, context, route, status, latency.
    pub trace: Trace,
    pub endpoint: Endpoint,
    /// The request body as sent upstream (or as received, when it never went upstream).
    pub request_body: Bytes,
    /// Response frames with their arrival time in µs since the request started.
    pub response: Vec<(u64, Bytes)>,
    /// Frames were dropped from the front to stay inside the capture limit.
    pub response_cut: bool,
    /// µs from request start to the first response byte from upstream.
    pub first_byte_us: Option<u64>,
    pub response_is_sse: bool,
    /// The output guardrails already ran on the request path (they could change the answer).
    pub output_checked: bool,
}

impl TraceEvent {
    /// The body bytes this event keeps alive.
    fn size(&self) -> usize {
        self.request_body.len() + self.response.iter().map(|(_, b)| b.len()).sum::<usize>()
    }
}

/// What the admin side asks of the recorder. Traces travel on a queue of their own, which the
/// recorder drains on a timer: a finished call never wakes the recorder thread.
pub(crate) enum Command {
    Score {
        trace_id: String,
        score: Score,
        reply: oneshot::Sender<Result<ScoreOutcome, RecorderError>>,
    },
    /// Answered once everything queued before it is stored.
    Sync(oneshot::Sender<Result<(), RecorderError>>),
    /// Store what is queued, flush, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The request path's and the admin API's way into the recorder. Cheap to clone.
#[derive(Clone)]
pub struct RecorderHandle {
    traces: mpsc::Sender<Box<TraceEvent>>,
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) dropped: prometheus_client::metrics::counter::Counter,
    /// Body bytes the queued events hold, bounded by `max_queued_bytes`.
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
}

impl RecorderHandle {
    /// Hands a finished call to the recorder without ever waiting: when the queue is full the
    /// call has still succeeded, and the lost trace is counted in `flowgate_traces_dropped_total`
    /// (as are traces the store fails to write).
    pub fn record(&self, event: TraceEvent) {
        let size = event.size();
        if self.queued_bytes.fetch_add(size, Ordering::Relaxed) + size > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        if self.traces.try_send(Box::new(event)).is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Traces waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.traces.max_capacity() - self.traces.capacity()
    }

    /// Waits until every trace handed over before this call is stored, so a read that follows
    /// sees it.
    pub async fn sync(&self) -> Result<(), RecorderError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Sync(reply))
            .await
            .map_err(|_| RecorderError::Stopped)?;
        answer.await.map_err(|_| RecorderError::Stopped)?
    }

    /// Attaches a quality score to a stored trace and aggregates it into the trace's run.
    pub async fn add_score(
        &self,
        trace_id: &str,
        score: Score,
    ) -> Result<ScoreOutcome, RecorderError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Score {
            trace_id: trace_id.to_owned(),
            score,
            reply,
        };
        self.tx
            .send(command)
            .await
            .map_err(|_| RecorderError::Stopped)?;
        answer.await.map_err(|_| RecorderError::Stopped)?
    }
}

/// Stops the recorder after everything queued before the call is stored.
pub struct RecorderControl {
    tx: mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RecorderControl {
    /// Drains the queue, flushes the store, and waits for the recorder thread to end.
    pub async fn shutdown(mut self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Shutdown(reply)).await.is_ok() {
            let _ = answer.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// What the recorder needs besides the queue.
pub struct RecorderSettings {
    pub capture: Capture,
    pub max_capture_bytes: usize,
    pub flush_interval: Duration,
    pub queue_capacity: usize,
    pub queue_max_bytes: usize,
    pub max_label_values: usize,
    /// Output checks that change nothing (`log`) run here, off the request path.
    pub guardrails: crate::guardrails::Guardrails,
}

impl RecorderSettings {
    pub fn from_config(config: &crate::config::Config) -> RecorderSettings {
        RecorderSettings {
            capture: config.storage.capture,
            max_capture_bytes: config.storage.max_capture_bytes,
            flush_interval: Duration::from_millis(config.storage.flush_interval_ms.max(1)),
            queue_capacity: config.storage.queue_capacity,
            queue_max_bytes: config.storage.queue_max_bytes,
            max_label_values: config.metrics.max_label_values,
            guardrails: crate::guardrails::Guardrails::default(),
        }
    }
}

/// Starts the recorder on its own thread (storage calls block; they must not stall the
/// request workers), loading the stored runs so aggregation continues where it stopped.
pub fn spawn(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    pricing: Pricing,
    settings: RecorderSettings,
) -> Result<(RecorderHandle, RecorderControl), StoreError> {
    if !store.open_session()? {
        recompute_aggregates(store.as_ref())?;
    }
    let (traces_tx, traces_rx) = mpsc::channel(settings.queue_capacity);
    let (tx, rx) = mpsc::channel(64);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let handle = RecorderHandle {
        traces: traces_tx,
        tx: tx.clone(),
        dropped: metrics.traces_dropped.clone(),
        queued_bytes: queued_bytes.clone(),
        max_queued_bytes: settings.queue_max_bytes,
    };
    let task = Recorder {
        store,
        metrics_writer: MetricsWriter::new(settings.max_label_values),
        metrics,
        pricing,
        settings,
        queued_bytes,
        runs: HashMap::new(),
        experiments: HashMap::new(),
        pending: Vec::new(),
        dirty_runs: HashSet::new(),
        dirty_experiments: HashSet::new(),
    };
    let thread = std::thread::Builder::new()
        .name("flowgate-recorder".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime.block_on(task.run(traces_rx, rx)),
                Err(err) => tracing::error!(%err, "the recorder could not start its runtime"),
            }
        })
        .map_err(|err| StoreError::Corrupt {
            what: "recorder thread".into(),
            reason: err.to_string(),
        })?;
    Ok((
        handle,
        RecorderControl {
            tx,
            thread: Some(thread),
        },
    ))
}

/// While traces come, the recorder drains the queue at least this often (and flushes every
/// `flush_interval`): it is never woken by a single trace, and its work comes in slices short
/// enough (~10 traces at 1000 calls a second) not to hold up the calls that share its core.
const MAX_DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// While no trace comes and nothing waits to be stored, the drain interval doubles up to this
/// (or to `flush_interval`, when that is shorter, so that a trace is still on disk within it),
/// so an idle gateway's recorder wakes 10 times a second rather than 100. The first traces of a
/// burst then wait at most this long (~100 of them at 1000 calls a second).
const MAX_IDLE_DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// The recorder's timer: every `busy` period while traces come or wait to be stored, and less
/// and less often (to `idle`) while none do.
struct Pace {
    busy: Duration,
    idle: Duration,
    period: Duration,
    tick: tokio::time::Interval,
}

impl Pace {
    fn new(flush_interval: Duration) -> Pace {
        let busy = flush_interval.min(MAX_DRAIN_INTERVAL);
        Pace {
            busy,
            idle: flush_interval.min(MAX_IDLE_DRAIN_INTERVAL).max(busy),
            period: busy,
            tick: Pace::every(busy),
        }
    }

    fn every(period: Duration) -> tokio::time::Interval {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    async fn tick(&mut self) {
        self.tick.tick().await;
    }

    /// The busy period again after work; a longer one after a tick that found nothing to do.
    fn adjust(&mut self, quiet: bool) {
        let next = if quiet {
            (self.period * 2).min(self.idle)
        } else {
            self.busy
        };
        if next != self.period {
            self.period = next;
            self.tick = Pace::every(next);
        }
    }
}

/// The longest the recorder works before it offers its core to whatever waits for it. A tokio
/// worker the kernel woke onto the recorder's core waits otherwise for the rest of the
/// recorder's time slice (1.5 ms on 2 CPUs), which put the closed loop's p99 at +4 ms.
const MAX_SLICE: Duration = Duration::from_micros(250);

/// Traces per store write when a backlog is written (each write: one log append, its sled
/// inserts; ~0.2 ms of work).
const WRITE_CHUNK: usize = 16;

/// Traces are written to the store at least this often. Runs and experiments (whose records,
/// sketches included, cost more to encode than a batch of traces) only every `flush_interval`:
/// writing them every 25 ms cost ~45 µs of CPU per call at 1000 calls a second.
const MAX_WRITE_INTERVAL: Duration = Duration::from_millis(25);

/// Traces gathered before a write; a full batch is written at once.
const BATCH_SIZE: usize = 512;

/// Runs and experiments kept in memory at most; the least recently active go first (they are
/// stored, and read back when a trace of theirs arrives).
const MAX_CACHED: usize = 10_000;

struct Recorder {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    metrics_writer: MetricsWriter,
    pricing: Pricing,
    settings: RecorderSettings,
    queued_bytes: Arc<AtomicUsize>,
    /// Aggregates of recently active runs; others are read from the store when needed.
    runs: HashMap<String, Run>,
    experiments: HashMap<String, Experiment>,
    pending: Vec<Trace>,
    dirty_runs: HashSet<String>,
    dirty_experiments: HashSet<String>,
}

impl Recorder {
    async fn run(
        mut self,
        mut traces: mpsc::Receiver<Box<TraceEvent>>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut pace = Pace::new(self.settings.flush_interval);
        let mut last_flush = tokio::time::Instant::now();
        let mut last_write = last_flush;
        // Something was recorded or changed since the store's last flush.
        let mut unflushed = false;
        loop {
            tokio::select! {
                command = commands.recv() => {
                    self.drain(&mut traces);
                    match command {
                        Some(Command::Shutdown(reply)) => {
                            traces.close();
                            self.drain(&mut traces);
                            self.close();
                            let _ = reply.send(());
                            return;
                        }
                        Some(command) => self.handle_isolated(command),
                        None => {
                            self.close();
                            return;
                        }
                    }
                    unflushed = true;
                    pace.adjust(false);
                },
                _ = pace.tick() => {
                    let drained = self.drain(&mut traces);
                    unflushed |= drained > 0;
                    // Written in small batches: one write per flush interval was a burst of
                    // several ms of sled work that delayed the calls sharing its core.
                    if last_write.elapsed() >= MAX_WRITE_INTERVAL {
                        self.write_traces();
                        last_write = tokio::time::Instant::now();
                    }
                    if last_flush.elapsed() >= self.settings.flush_interval {
                        if unflushed {
                            self.flush();
                            // Durable, not just written: a crash loses at most one interval.
                            if let Err(err) = self.store.flush() {
                                tracing::error!(%err, "could not flush the store");
                            }
                            unflushed = false;
                        }
                        last_flush = tokio::time::Instant::now();
                    }
                    pace.adjust(drained == 0 && !unflushed && self.pending.is_empty());
                }
            }
        }
    }

    /// Records every queued trace; returns how many there were.
    fn drain(&mut self, traces: &mut mpsc::Receiver<Box<TraceEvent>>) -> usize {
        let mut slice = std::time::Instant::now();
        let mut drained = 0;
        while let Ok(event) = traces.try_recv() {
            drained += 1;
            self.queued_bytes.fetch_sub(event.size(), Ordering::Relaxed);
            let recorded =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.record(*event)));
            if recorded.is_err() {
                tracing::error!(
                    "the recorder failed on one trace and skipped it; recording goes on"
                );
            }
            if slice.elapsed() >= MAX_SLICE {
                std::thread::yield_now();
                slice = std::time::Instant::now();
            }
        }
        drained
    }

    fn record(&mut self, event: TraceEvent) {
        let trace = self.complete(event);
        self.aggregate(&trace);
        self.pending.push(trace);
        if self.pending.len() >= BATCH_SIZE {
            self.flush();
        }
    }

    fn close(&mut self) {
        self.flush();
        if let Err(err) = self.store.close_session() {
            tracing::error!(%err, "could not flush the store at shutdown");
        }
    }

    /// A bug that panics on one command must not stop recording for every later one.
    fn handle_isolated(&mut self, command: Command) {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(command)));
        if outcome.is_err() {
            tracing::error!("the recorder failed on one command and skipped it; recording goes on");
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Score {
                trace_id,
                score,
                reply,
            } => {
                self.flush();
                let _ = reply.send(self.add_score(&trace_id, score));
            }
            Command::Sync(reply) => {
                self.flush();
                let _ = reply.send(Ok(()));
            }
            Command::Shutdown(reply) => {
                self.flush();
                let _ = reply.send(());
            }
        }
    }

    /// Turns what the request path saw into the stored trace: usage, time to first token,
    /// cost, captured bodies.
    fn complete(&self, mut event: TraceEvent) -> Trace {
        let mut trace = std::mem::take(&mut event.trace);
        let received = Received::of(&event);
        let answer = read_answer(&event, &received);
        let model = trace
            .served_model
            .clone()
            .or_else(|| trace.requested_model.clone())
            .unwrap_or_default();
        trace.usage = self.usage(
            &event.endpoint,
            &model,
            &event.request_body,
            &answer,
            trace.status,
        );
        let answered = (200..300).contains(&trace.status);
        if trace.stream && event.response_is_sse && answered {
            let first = answer.first_content_us.or(event.first_byte_us);
            trace.latency.ttft_ms = first.map(|us| us as f64 / 1000.0);
        }
        if let Some(tokens) = tokens_of(&trace.usage) {
            let provider = trace.provider.as_deref().unwrap_or("");
            trace.cost_usd = self.pricing.cost(provider, &model, tokens);
        }
        if trace.cache == crate::cache::HIT {
            // Nothing was spent: the provider made this answer for an earlier call.
            trace.cost_saved_usd = trace.cost_usd.replace(0.0);
        }
        explain_error(&mut trace, &answer);
        record_parse_failure(&mut trace, &event, &answer);
        self.check_input(&event, &mut trace);
        self.check_output(&event, &received, &answer, &mut trace);
        if self.settings.capture == Capture::Full {
            let limit = self.settings.max_capture_bytes;
            trace.request_body = Some(Captured::of_bytes(&event.request_body, limit));
            trace.response_body = capture_answer(&event, &answer, received.whole(), limit);
            withhold_guarded(&mut trace);
        }
        trace
    }

    /// Input guardrails that only log run here rather than on the request path, on the body as
    /// it went upstream.
    fn check_input(&self, event: &TraceEvent, trace: &mut Trace) {
        let texts = matches!(
            event.endpoint,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::Embeddings
                | Endpoint::Messages
                | Endpoint::MessagesCountTokens
        );
        // A request an input guardrail blocked is not kept: its body is empty here.
        if !texts || event.request_body.is_empty() {
            return;
        }
        let checked = self.settings.guardrails.check_request_of(
            crate::guardrails::Which::Logging,
            event.endpoint,
            &event.request_body,
        );
        if let Ok(checked) = checked {
            trace
                .guardrails
                .extend(checked.verdicts.into_iter().map(Verdict::into_trace));
        }
    }

    /// Output guardrails that only log, run here rather than on the request path: on the whole
    /// answer, or on a stream's deltas in order (so a match split across chunks is found).
    fn check_output(
        &self,
        event: &TraceEvent,
        received: &Received,
        answer: &usage::Answer,
        trace: &mut Trace,
    ) {
        let guardrails = &self.settings.guardrails;
        let answered = (200..300).contains(&trace.status) && !event.response.is_empty();
        let texts = matches!(
            event.endpoint,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Responses
                | Endpoint::Messages
        );
        if event.output_checked || !answered || !texts || !guardrails.checks_output() {
            return;
        }
        let expect = guardrails.expectation(&event.request_body);
        let verdicts = match received {
            Received::Whole(body) => match guardrails.check_response(event.endpoint, &expect, body)
            {
                Ok(checked) => checked.verdicts,
                Err(_) => return,
            },
            Received::Events(events) => {
                let Some(mut guard) = guardrails.stream(expect) else {
                    return;
                };
                for (at, (_, sse)) in events.iter().enumerate() {
                    // The usage reader's deltas where it took the event apart; else the
                    // guardrails' own reading of it.
                    if let Some(Some(deltas)) = answer.deltas.get(at) {
                        for (choice, text) in deltas {
                            guard.push(*choice, text);
                        }
                        continue;
                    }
                    let deltas =
                        crate::guardrails::stream_deltas(event.endpoint, sse.data.as_bytes());
                    for delta in deltas.into_iter().flatten() {
                        guard.push(delta.choice, &delta.text);
                    }
                }
                guard.finish().verdicts
            }
        };
        trace
            .guardrails
            .extend(verdicts.into_iter().map(Verdict::into_trace));
    }

    fn usage(
        &self,
        endpoint: &Endpoint,
        model: &str,
        request: &Bytes,
        answer: &usage::Answer,
        status: u16,
    ) -> Usage {
        if let Some(reported) = answer.usage {
            return Usage {
                input_tokens: Some(reported.input),
                output_tokens: Some(reported.output),
                cached_input_tokens: Some(reported.cached_input),
                // Only providers with prompt-cache writes (Anthropic) report them.
                cache_write_input_tokens: (reported.cache_write > 0)
                    .then_some(reported.cache_write),
                source: "provider".into(),
            };
        }
        // Nothing reported: count what was sent and what came back (a cancelled stream
        // still cost its partial answer), unless the call never produced an answer.
        let answered = (200..300).contains(&status) || !answer.text.is_empty();
        if !answered {
            return Usage {
                source: "none".into(),
                ..Usage::default()
            };
        }
        let input = metering::count_input_tokens(*endpoint, model, request);
        let output = Some(metering::count_tokens(model, &answer.text));
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: None,
            cache_write_input_tokens: None,
            source: "counted".into(),
        }
    }

    fn aggregate(&mut self, trace: &Trace) {
        self.metrics_writer.observe(&self.metrics, trace);
        let new_run = !self.load_run(&trace.run_id);
        match self.runs.get_mut(&trace.run_id) {
            Some(run) => run.observe(trace),
            None => {
                self.runs
                    .insert(trace.run_id.clone(), Run::from_first(trace));
            }
        }
        self.dirty_runs.insert(trace.run_id.clone());
        if self.load_experiment(&trace.experiment) {
            if let Some(experiment) = self.experiments.get_mut(&trace.experiment) {
                experiment.observe(trace, new_run);
            }
        } else {
            self.experiments
                .insert(trace.experiment.clone(), Experiment::from_first(trace));
        }
        self.dirty_experiments.insert(trace.experiment.clone());
    }

    /// Brings a run's aggregate into memory from the store; false when it has none yet.
    fn load_run(&mut self, id: &str) -> bool {
        if self.runs.contains_key(id) {
            return true;
        }
        match self.store.run(id) {
            Ok(Some(run)) => {
                self.runs.insert(id.to_owned(), run);
                true
            }
            Ok(None) => false,
            Err(err) => {
                tracing::error!(%err, run = id, "a stored run could not be read; it starts again");
                false
            }
        }
    }

    fn load_experiment(&mut self, name: &str) -> bool {
        if self.experiments.contains_key(name) {
            return true;
        }
        match self.store.experiment(name) {
            Ok(Some(experiment)) => {
                self.experiments.insert(name.to_owned(), experiment);
                true
            }
            Ok(None) => false,
            Err(err) => {
                tracing::error!(%err, experiment = name, "a stored experiment could not be read; it starts again");
                false
            }
        }
    }

    /// Keeps memory bounded however many runs clients create: past the limit, the least
    /// recently active half goes (all stored: this runs right after a flush).
    fn evict(&mut self) {
        evict_oldest(&mut self.runs, |run| run.last_seen_ms);
        evict_oldest(&mut self.experiments, |experiment| {
            experiment.last_activity_ms
        });
    }

    /// Writes the pending traces alone (their runs follow with the next [`Recorder::flush`]), in
    /// small batches with the core offered between them: one write of a closed loop's ~350
    /// traces was a burst of ~4 ms.
    fn write_traces(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        while !pending.is_empty() {
            let traces: Vec<Trace> = pending.drain(..pending.len().min(WRITE_CHUNK)).collect();
            self.write(Batch {
                traces,
                ..Batch::default()
            });
            if !pending.is_empty() {
                std::thread::yield_now();
            }
        }
    }

    fn write(&self, batch: Batch) {
        if let Err(err) = self.store.apply(&batch) {
            // The calls succeeded but their traces are lost (a full disk, an I/O error): counted
            // where the queue's losses are, so the same alert fires. The whole batch counts; a
            // write that failed part-way may have kept some of it (an alert that errs high).
            self.metrics
                .traces_dropped
                .inc_by(batch.traces.len() as u64);
            tracing::error!(%err, traces = batch.traces.len(), "could not store a batch of traces");
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty()
            && self.dirty_runs.is_empty()
            && self.dirty_experiments.is_empty()
        {
            return;
        }
        let batch = Batch {
            traces: std::mem::take(&mut self.pending),
            runs: self
                .dirty_runs
                .drain()
                .filter_map(|id| self.runs.get(&id).cloned())
                .collect(),
            experiments: self
                .dirty_experiments
                .drain()
                .filter_map(|name| self.experiments.get(&name).cloned())
                .collect(),
        };
        self.write(batch);
        self.evict();
    }

    fn add_score(&mut self, trace_id: &str, score: Score) -> Result<ScoreOutcome, RecorderError> {
        let stored = self
            .store
            .trace(trace_id)
            .map_err(|err| RecorderError::Store(err.to_string()))?;
        let Some(mut trace) = stored else {
            return Ok(ScoreOutcome::NoSuchTrace);
        };
        if !self.load_run(&trace.run_id) {
            // The run's record is gone (unreadable): rebuild it from this trace, before the
            // new score is added, so the score counts once.
            self.runs
                .insert(trace.run_id.clone(), Run::from_first(&trace));
        }
        trace.scores.push(score.clone());
        let Some(run) = self.runs.get_mut(&trace.run_id) else {
            return Err(RecorderError::Store(format!(
                "run {} vanished",
                trace.run_id
            )));
        };
        run.add_score(&score);
        self.metrics_writer
            .observe_score(&self.metrics, &trace, &score);
        let batch = Batch {
            traces: vec![trace.clone()],
            runs: vec![run.clone()],
            experiments: Vec::new(),
        };
        self.store
            .apply(&batch)
            .map_err(|err| RecorderError::Store(err.to_string()))?;
        Ok(ScoreOutcome::Recorded {
            run_id: trace.run_id,
        })
    }
}

/// After a crash, runs and experiments may lag the traces that reached disk: rebuild them from
/// the traces, which are the record of truth.
fn recompute_aggregates(store: &dyn Store) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let mut runs: HashMap<String, Run> = HashMap::new();
    let mut experiments: HashMap<String, Experiment> = HashMap::new();
    let mut count = 0u64;
    store.recover_traces(&mut |trace| {
        count += 1;
        let new_run = !runs.contains_key(&trace.run_id);
        match runs.get_mut(&trace.run_id) {
            Some(run) => run.observe(&trace),
            None => {
                runs.insert(trace.run_id.clone(), Run::from_first(&trace));
            }
        }
        match experiments.get_mut(&trace.experiment) {
            Some(experiment) => experiment.observe(&trace, new_run),
            None => {
                experiments.insert(trace.experiment.clone(), Experiment::from_first(&trace));
            }
        }
    })?;
    let runs: Vec<Run> = runs.into_values().collect();
    let experiments: Vec<Experiment> = experiments.into_values().collect();
    store.replace_aggregates(&runs, &experiments)?;
    store.flush()?;
    tracing::warn!(
        traces = count,
        runs = runs.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "the store was not closed cleanly: indexes restored and run aggregates recomputed from the stored traces"
    );
    Ok(())
}

fn evict_oldest<V>(map: &mut HashMap<String, V>, last_active: impl Fn(&V) -> u64) {
    if map.len() <= MAX_CACHED {
        return;
    }
    let mut by_age: Vec<(u64, String)> = map
        .iter()
        .map(|(key, value)| (last_active(value), key.clone()))
        .collect();
    by_age.sort_unstable();
    let excess = map.len() - MAX_CACHED / 2;
    for (_, key) in by_age.into_iter().take(excess) {
        map.remove(&key);
    }
}

fn tokens_of(usage: &Usage) -> Option<Tokens> {
    Some(Tokens {
        input: usage.input_tokens?,
        output: usage.output_tokens.unwrap_or(0),
        cached_input: usage.cached_input_tokens.unwrap_or(0),
        cache_write: usage.cache_write_input_tokens.unwrap_or(0),
    })
}

/// Replaces a bare "upstream answered 4xx" with the provider's own message, and records an
/// error event a stream carried.
fn explain_error(trace: &mut Trace, answer: &usage::Answer) {
    let Some(message) = &answer.error_message else {
        return;
    };
    match trace.error.as_mut() {
        Some(error) if error.class == "upstream_http" => {
            error.message = format!("{} — {message}", error.message);
        }
        None if trace.stream => {
            trace.error = Some(TraceError {
                class: "upstream_stream".into(),
                message: message.clone(),
            });
        }
        _ => {}
    }
}

/// A model answer the gateway could not read (not JSON, or SSE events that are not) is passed
/// to the client as it came, and the trace says so.
fn record_parse_failure(trace: &mut Trace, event: &TraceEvent, answer: &usage::Answer) {
    let answered = (200..300).contains(&trace.status);
    if trace.error.is_some()
        || !answered
        || !event.endpoint.takes_model()
        || event.response.is_empty()
    {
        return;
    }
    let failure = if event.response_is_sse {
        (answer.unparsed_events > 0).then(|| {
            (
                "upstream_invalid_sse",
                format!("{} stream events were not JSON", answer.unparsed_events),
            )
        })
    } else {
        (!answer.is_json && !event.response_cut).then(|| {
            (
                "upstream_invalid_json",
                "the answer was not valid JSON".to_owned(),
            )
        })
    };
    if let Some((class, message)) = failure {
        trace.error = Some(TraceError {
            class: class.into(),
            message,
        });
    }
}

/// The answer as the recorder reads it: a whole body, or a stream's events, split and parsed
/// once for its usage and its guardrails alike.
enum Received {
    Whole(Vec<u8>),
    Events(Vec<(u64, crate::sse::Event)>),
}

impl Received {
    fn of(event: &TraceEvent) -> Received {
        let frames = &event.response;
        if event.response_is_sse {
            return Received::Events(crate::sse::timed_events(frames));
        }
        let mut whole = Vec::with_capacity(frames.iter().map(|(_, b)| b.len()).sum());
        frames.iter().for_each(|(_, b)| whole.extend_from_slice(b));
        Received::Whole(whole)
    }

    fn whole(&self) -> Option<&[u8]> {
        match self {
            Received::Whole(body) => Some(body),
            Received::Events(_) => None,
        }
    }
}

/// Usage and text of the answer: from a stream's events, or from the whole JSON body.
fn read_answer(event: &TraceEvent, received: &Received) -> usage::Answer {
    let bytes = match received {
        Received::Events(events) => return usage::from_events(event.endpoint, events),
        Received::Whole(bytes) => bytes,
    };
    let mut answer = usage::from_json(event.endpoint, bytes);
    if event.response_cut && answer.usage.is_none() {
        // The head was dropped to bound memory; providers put usage last.
        answer.usage = usage::usage_from_tail(bytes);
    }
    answer
}

/// The answer as stored: the assembled text of a stream, or the response body.
/// A secret a guardrail found is never stored, whatever the guardrail's action: a body in which
/// the `secrets` check found something (and did not redact it) is kept as a note, not as text.
/// So is an answer an output guardrail blocked.
fn withhold_guarded(trace: &mut Trace) {
    let found = |stage: &str| {
        trace.guardrails.iter().any(|v| {
            v.stage == stage
                && ((v.kind == "secrets" && v.verdict == "flagged") || v.verdict == "blocked")
        })
    };
    let (request, response) = (found("input"), found("output"));
    let note = |what: &str| {
        Some(Captured::text(
            &format!("[withheld: a guardrail found a secret in the {what}, or blocked it]"),
            false,
        ))
    };
    if request {
        trace.request_body = note("request");
    }
    if response {
        trace.response_body = note("answer");
    }
}

fn capture_answer(
    event: &TraceEvent,
    answer: &usage::Answer,
    whole: Option<&[u8]>,
    limit: usize,
) -> Option<Captured> {
    if event.response.is_empty() {
        return None;
    }
    let Some(bytes) = whole else {
        // Cut at a character boundary within the limit, which counts bytes like everywhere else.
        let text = &answer.text[..answer.text.floor_char_boundary(limit)];
        let truncated = event.response_cut || text.len() < answer.text.len();
        return Some(Captured::text(text, truncated));
    };
    let mut captured = Captured::of_bytes(bytes, limit);
    captured.truncated |= event.response_cut;
    Some(captured)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledStore, TracePage, TraceQuery};
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// The sled store, except that writing traces fails while `failing` is set; it notes the
    /// traces it was given and the largest batch of them.
    struct FailingStore {
        inner: SledStore,
        failing: AtomicBool,
        received: AtomicUsize,
        largest_batch: AtomicUsize,
    }

    impl FailingStore {
        fn open(dir: &std::path::Path) -> FailingStore {
            FailingStore {
                inner: SledStore::open(&dir.join("db"), 1 << 20).expect("store"),
                failing: AtomicBool::new(false),
                received: AtomicUsize::new(0),
                largest_batch: AtomicUsize::new(0),
            }
        }
    }

    impl Store for FailingStore {
        fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
            let traces = batch.traces.len();
            self.largest_batch.fetch_max(traces, Ordering::Relaxed);
            self.received.fetch_add(traces, Ordering::Relaxed);
            if self.failing.load(Ordering::Relaxed) && !batch.traces.is_empty() {
                return Err(StoreError::Corrupt {
                    what: "the disk".into(),
                    reason: "full".into(),
                });
            }
            self.inner.apply(batch)
        }
        fn trace(&self, id: &str) -> Result<Option<Trace>, StoreError> {
            self.inner.trace(id)
        }
        fn traces(&self, query: &TraceQuery) -> Result<TracePage, StoreError> {
            self.inner.traces(query)
        }
        fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
            self.inner.run(id)
        }
        fn runs(&self, experiment: Option<&str>) -> Result<Vec<Run>, StoreError> {
            self.inner.runs(experiment)
        }
        fn experiment(&self, name: &str) -> Result<Option<Experiment>, StoreError> {
            self.inner.experiment(name)
        }
        fn experiments(&self) -> Result<Vec<Experiment>, StoreError> {
            self.inner.experiments()
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn open_session(&self) -> Result<bool, StoreError> {
            self.inner.open_session()
        }
        fn closed_cleanly(&self) -> Result<bool, StoreError> {
            self.inner.closed_cleanly()
        }
        fn close_session(&self) -> Result<(), StoreError> {
            self.inner.close_session()
        }
        fn for_each_trace(&self, visit: &mut dyn FnMut(Trace)) -> Result<u64, StoreError> {
            self.inner.for_each_trace(visit)
        }
        fn recover_traces(&self, visit: &mut dyn FnMut(Trace)) -> Result<(), StoreError> {
            self.inner.recover_traces(visit)
        }
        fn replace_aggregates(
            &self,
            runs: &[Run],
            experiments: &[Experiment],
        ) -> Result<(), StoreError> {
            self.inner.replace_aggregates(runs, experiments)
        }
    }

    fn finished_call() -> TraceEvent {
        TraceEvent {
            trace: Trace {
                id: uuid::Uuid::now_v7().to_string(),
                experiment: "disk".into(),
                run_id: "r1".into(),
                endpoint: "chat.completions".into(),
                status: 200,
                ..Trace::default()
            },
            endpoint: Endpoint::ChatCompletions,
            request_body: Bytes::from_static(b"{}"),
            response: vec![(0, Bytes::from_static(b"{}"))],
            response_cut: false,
            first_byte_us: None,
            response_is_sse: false,
            output_checked: false,
        }
    }

    #[tokio::test]
    async fn traces_the_store_cannot_write_are_counted_as_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(FailingStore::open(dir.path()));
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::default();
        let (handle, control) = spawn(
            store.clone(),
            metrics.clone(),
            Pricing::new(&Default::default()).expect("pricing"),
            RecorderSettings::from_config(&config),
        )
        .expect("recorder");

        handle.record(finished_call());
        handle.sync().await.expect("synced");
        assert_eq!(
            metrics.traces_dropped.get(),
            0,
            "a stored trace is not dropped"
        );

        store.failing.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            handle.record(finished_call());
        }
        handle.sync().await.expect("synced");
        assert_eq!(metrics.traces_dropped.get(), 3);
        control.shutdown().await;
    }

    /// The drain timer backs off while quiet, never past the flush interval or 100 ms, and
    /// comes back to its busy period at once.
    #[tokio::test]
    async fn the_drain_timer_slows_down_while_quiet_within_the_flush_interval() {
        let ms = Duration::from_millis;
        // (flush interval, busy period, periods after 1, 2, ... quiet ticks)
        let cases = [
            (
                ms(200),
                ms(10),
                vec![ms(20), ms(40), ms(80), ms(100), ms(100)],
            ),
            (ms(20), ms(10), vec![ms(20), ms(20)]),
            (ms(5), ms(5), vec![ms(5), ms(5)]),
        ];
        for (flush, busy, quiet) in cases {
            let mut pace = Pace::new(flush);
            assert_eq!(pace.period, busy, "flush every {flush:?}");
            for expected in quiet {
                pace.adjust(true);
                assert_eq!(pace.period, expected, "flush every {flush:?}");
            }
            pace.adjust(false);
            assert_eq!(pace.period, busy, "busy again, flush every {flush:?}");
        }
    }

    /// A backlog goes to the store in small writes, the recorder offering its core between
    /// them, and all of it arrives.
    #[tokio::test]
    async fn a_backlog_is_written_in_small_batches_and_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(FailingStore::open(dir.path()));
        let mut config = crate::config::Config::default();
        // Only the timed writes of traces, no flush of everything at once, within the test.
        config.storage.flush_interval_ms = 60_000;
        let (handle, control) = spawn(
            store.clone(),
            Arc::new(Metrics::new()),
            Pricing::new(&Default::default()).expect("pricing"),
            RecorderSettings::from_config(&config),
        )
        .expect("recorder");
        let backlog = 5 * WRITE_CHUNK + 3;
        for _ in 0..backlog {
            handle.record(finished_call());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.received.load(Ordering::Relaxed) < backlog {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {backlog} traces reached the store",
                store.received.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.received.load(Ordering::Relaxed), backlog);
        assert!(store.largest_batch.load(Ordering::Relaxed) <= WRITE_CHUNK);
        control.shutdown().await;
    }

    fn streamed(text: &str) -> (TraceEvent, usage::Answer) {
        let event = TraceEvent {
            trace: Trace::default(),
            endpoint: Endpoint::ChatCompletions,
            request_body: Bytes::new(),
            response: vec![(0, Bytes::from_static(b"data: {}\n\n"))],
            response_cut: false,
            first_byte_us: None,
            response_is_sse: true,
            output_checked: false,
        };
        let answer = usage::Answer {
            text: text.to_owned(),
            ..usage::Answer::default()
        };
        (event, answer)
    }

    #[test]
    fn a_streamed_answer_is_captured_within_the_byte_limit_on_a_character_boundary() {
        // (text, limit in bytes, stored text, truncated)
        let cases = [
            ("ééé", 6, "ééé", false),
            ("ééé", 5, "éé", true),
            ("ééé", 1, "", true),
            ("abc", 2, "ab", true),
        ];
        for (text, limit, stored, truncated) in cases {
            let (event, answer) = streamed(text);
            let captured = capture_answer(&event, &answer, None, limit).expect("captured");
            let expected = serde_json::to_string(stored).expect("json");
            assert_eq!(captured.content.get(), expected, "{text} within {limit}");
            assert_eq!(captured.truncated, truncated, "{text} within {limit}");
        }
    }
}
