//! The recorder: a bounded channel and the task behind it that turns what the request path saw
//! into stored traces and aggregated runs. Everything slow (parsing usage, token counting, cost,
//! aggregation, storage) happens here, never on the request's task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::config::Capture;
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
}

pub(crate) enum Command {
    Trace(Box<TraceEvent>),
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
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) dropped: prometheus_client::metrics::counter::Counter,
}

impl RecorderHandle {
    /// Hands a finished call to the recorder without ever waiting: when the queue is full the
    /// call has still succeeded, and the lost trace is counted in `flowgate_traces_dropped_total`.
    pub fn record(&self, event: TraceEvent) {
        if self.tx.try_send(Command::Trace(Box::new(event))).is_err() {
            self.dropped.inc();
        }
    }

    /// Traces waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
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
    pub max_label_values: usize,
}

impl RecorderSettings {
    pub fn from_config(config: &crate::config::Config) -> RecorderSettings {
        RecorderSettings {
            capture: config.storage.capture,
            max_capture_bytes: config.storage.max_capture_bytes,
            flush_interval: Duration::from_millis(config.storage.flush_interval_ms.max(1)),
            queue_capacity: config.storage.queue_capacity,
            max_label_values: config.metrics.max_label_values,
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
    let runs = store
        .runs(None)?
        .into_iter()
        .map(|run| (run.id.clone(), run))
        .collect();
    let experiments = store
        .experiments()?
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    let (tx, rx) = mpsc::channel(settings.queue_capacity);
    let handle = RecorderHandle {
        tx: tx.clone(),
        dropped: metrics.traces_dropped.clone(),
    };
    let task = Recorder {
        store,
        metrics_writer: MetricsWriter::new(settings.max_label_values),
        metrics,
        pricing,
        settings,
        runs,
        experiments,
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
                Ok(runtime) => runtime.block_on(task.run(rx)),
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

/// Traces gathered before a write; a full batch is written at once.
const BATCH_SIZE: usize = 512;

struct Recorder {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    metrics_writer: MetricsWriter,
    pricing: Pricing,
    settings: RecorderSettings,
    runs: HashMap<String, Run>,
    experiments: HashMap<String, Experiment>,
    pending: Vec<Trace>,
    dirty_runs: HashSet<String>,
    dirty_experiments: HashSet<String>,
}

impl Recorder {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.settings.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Shutdown(reply)) => {
                        rx.close();
                        while let Ok(command) = rx.try_recv() {
                            self.handle(command);
                        }
                        self.flush();
                        if let Err(err) = self.store.flush() {
                            tracing::error!(%err, "could not flush the store at shutdown");
                        }
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.handle(command),
                    None => {
                        self.flush();
                        let _ = self.store.flush();
                        return;
                    }
                },
                _ = tick.tick() => self.flush(),
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Trace(event) => {
                let trace = self.complete(*event);
                self.aggregate(&trace);
                self.pending.push(trace);
                if self.pending.len() >= BATCH_SIZE {
                    self.flush();
                }
            }
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
        let answer = if event.response_is_sse {
            usage::from_sse(event.endpoint, &event.response)
        } else {
            let whole: Vec<u8> = event
                .response
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            usage::from_json(event.endpoint, &whole)
        };
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
        if trace.stream {
            let first = answer.first_content_us.or(event.first_byte_us);
            trace.latency.ttft_ms = first.map(|us| us as f64 / 1000.0);
        }
        if let Some(tokens) = tokens_of(&trace.usage) {
            let provider = trace.provider.as_deref().unwrap_or("");
            trace.cost_usd = self.pricing.cost(provider, &model, tokens);
        }
        explain_error(&mut trace, &answer);
        if self.settings.capture == Capture::Full {
            trace.request_body = Some(capture_bytes(
                &event.request_body,
                self.settings.max_capture_bytes,
            ));
            trace.response_body = capture_answer(&event, &answer, self.settings.max_capture_bytes);
        }
        trace
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
            source: "counted".into(),
        }
    }

    fn aggregate(&mut self, trace: &Trace) {
        self.metrics_writer.observe(&self.metrics, trace);
        let new_run = match self.runs.get_mut(&trace.run_id) {
            Some(run) => {
                run.observe(trace);
                false
            }
            None => {
                self.runs
                    .insert(trace.run_id.clone(), Run::from_first(trace));
                true
            }
        };
        self.dirty_runs.insert(trace.run_id.clone());
        match self.experiments.get_mut(&trace.experiment) {
            Some(experiment) => experiment.observe(trace, new_run),
            None => {
                self.experiments
                    .insert(trace.experiment.clone(), Experiment::from_first(trace));
            }
        }
        self.dirty_experiments.insert(trace.experiment.clone());
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
        if let Err(err) = self.store.apply(&batch) {
            tracing::error!(%err, traces = batch.traces.len(), "could not store a batch of traces");
        }
    }

    fn add_score(&mut self, trace_id: &str, score: Score) -> Result<ScoreOutcome, RecorderError> {
        let stored = self
            .store
            .trace(trace_id)
            .map_err(|err| RecorderError::Store(err.to_string()))?;
        let Some(mut trace) = stored else {
            return Ok(ScoreOutcome::NoSuchTrace);
        };
        trace.scores.push(score.clone());
        let run = match self.runs.get_mut(&trace.run_id) {
            Some(run) => run,
            None => self
                .runs
                .entry(trace.run_id.clone())
                .or_insert_with(|| Run::from_first(&trace)),
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

fn tokens_of(usage: &Usage) -> Option<Tokens> {
    Some(Tokens {
        input: usage.input_tokens?,
        output: usage.output_tokens.unwrap_or(0),
        cached_input: usage.cached_input_tokens.unwrap_or(0),
    })
}

/// Replaces a bare "upstream answered 4xx" with the provider's own message, and records an
/// error event a stream carried.
fn explain_error(trace: &mut Trace, answer: &usage::Answer) {
    let provider_message = answer
        .json
        .as_ref()
        .and_then(|json| json.pointer("/error/message"))
        .and_then(serde_json::Value::as_str);
    if let (Some(error), Some(message)) = (trace.error.as_mut(), provider_message) {
        if error.class == "upstream_http" {
            error.message = format!("{} — {message}", error.message);
        }
    }
    if trace.error.is_none() {
        if let Some(message) = &answer.stream_error {
            trace.error = Some(TraceError {
                class: "upstream_stream".into(),
                message: message.clone(),
            });
        }
    }
}

fn capture_bytes(bytes: &[u8], limit: usize) -> Captured {
    if bytes.len() <= limit {
        if let Ok(json) = serde_json::from_slice(bytes) {
            return Captured {
                content: json,
                truncated: false,
            };
        }
    }
    let cut = &bytes[..bytes.len().min(limit)];
    Captured {
        content: serde_json::Value::String(String::from_utf8_lossy(cut).into_owned()),
        truncated: bytes.len() > limit,
    }
}

fn capture_answer(event: &TraceEvent, answer: &usage::Answer, limit: usize) -> Option<Captured> {
    if event.response.is_empty() {
        return None;
    }
    if event.response_is_sse {
        let text: String = answer.text.chars().take(limit).collect();
        let truncated = event.response_cut || text.len() < answer.text.len();
        return Some(Captured {
            content: serde_json::Value::String(text),
            truncated,
        });
    }
    let whole: Vec<u8> = event
        .response
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    let mut captured = capture_bytes(&whole, limit);
    captured.truncated |= event.response_cut;
    Some(captured)
}
