//! The finish hook of every call, and the response body that meters a call as it streams.
//!
//! [`Draft`] holds what is known of a call so far and records exactly one trace: when the
//! response body ends, when it fails, or — through `Drop` — when the client went away first.
//! [`MeteredBody`] forwards each upstream frame the moment it arrives; it only keeps a shared
//! reference (`Bytes`) to the frame for the recorder, which parses it later.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::guardrails::Blocked;
use crate::providers::Endpoint;
use crate::recorder::{RecorderHandle, TraceEvent};
use crate::response::{BoxError, ResponseBody};
use crate::sse::{ends_event, has_usage_object, is_usage_only_chunk, EventSplitter};
use crate::trace::{Trace, TraceError};

/// Bytes of one unfinished SSE event the usage filter holds back at most.
const MAX_HELD_BACK: usize = 1024 * 1024;

/// One call counted against `server.max_in_flight`; released when dropped.
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    /// A place among at most `max` calls, or `None` when all are taken.
    pub fn try_acquire(
        counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        max: usize,
    ) -> Option<InFlight> {
        use std::sync::atomic::Ordering;
        let previous = counter.fetch_add(1, Ordering::AcqRel);
        if previous >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(counter.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// HTTP status recorded for calls the client abandoned before any answer (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

pub struct Draft {
    recorder: RecorderHandle,
    started: Instant,
    pub trace: Trace,
    pub endpoint: Endpoint,
    pub request_body: Bytes,
    pub body_read: Duration,
    pub upstream_started: Option<Instant>,
    upstream_ended: Option<Instant>,
    /// Computes the run id when the call ends before routing did.
    pub run_id_fallback: fn(&Trace) -> String,
    /// Counts this call against `server.max_in_flight` until it ends.
    pub in_flight: Option<InFlight>,
    /// This call's answer may fill the response cache (and release identical calls waiting).
    pub cache_fill: Option<crate::cache::Fill>,
    /// The output guardrails ran on the path (the recorder must not run them again).
    pub output_checked: bool,
    /// An answer an output guardrail blocked: the client never sees it.
    pub blocked_answer: Option<Bytes>,
    done: bool,
}

impl Draft {
    pub fn new(
        recorder: RecorderHandle,
        method: &str,
        path: &str,
        run_id_fallback: fn(&Trace) -> String,
    ) -> Draft {
        let trace = Trace {
            id: uuid::Uuid::now_v7().to_string(),
            started_at_ms: unix_ms(),
            experiment: crate::context::DEFAULT_EXPERIMENT.to_owned(),
            endpoint: Endpoint::from_path(path).as_str().to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            cache: "bypass".to_owned(),
            ..Trace::default()
        };
        Draft {
            recorder,
            started: Instant::now(),
            endpoint: Endpoint::from_path(path),
            trace,
            request_body: Bytes::new(),
            body_read: Duration::ZERO,
            upstream_started: None,
            upstream_ended: None,
            run_id_fallback,
            in_flight: None,
            cache_fill: None,
            output_checked: false,
            blocked_answer: None,
            done: false,
        }
    }

    /// Moves the call's state out (into the response body), leaving a finished shell behind.
    pub fn take(&mut self) -> Draft {
        let shell = Draft {
            recorder: self.recorder.clone(),
            started: self.started,
            trace: Trace::default(),
            endpoint: self.endpoint,
            request_body: Bytes::new(),
            body_read: Duration::ZERO,
            upstream_started: None,
            upstream_ended: None,
            run_id_fallback: self.run_id_fallback,
            in_flight: None,
            cache_fill: None,
            output_checked: false,
            blocked_answer: None,
            done: true,
        };
        std::mem::replace(self, shell)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Notes one try of a deployment (only for `[[models]]` routes: a plain route's single try
    /// is the trace itself).
    pub fn attempt(
        &mut self,
        route: &crate::providers::Route,
        status: Option<http::StatusCode>,
        error: Option<&str>,
        took: Duration,
    ) {
        if self.trace.model_group.is_none() {
            return;
        }
        self.trace.attempts.push(crate::trace::Attempt {
            provider: route.provider.name().to_owned(),
            model: route.model.clone(),
            status: status.map(|s| s.as_u16()),
            error: error.map(str::to_owned),
            ms: ms(took),
            served: false,
        });
    }

    /// The deployment whose answer the client gets: the given attempt, else the last one.
    pub fn serve_from(&mut self, route: &crate::providers::Route, attempt: Option<usize>) {
        self.trace.provider = Some(route.provider.name().to_owned());
        self.trace.served_model = Some(route.model.clone());
        let attempt = attempt.or(self.trace.attempts.len().checked_sub(1));
        if let Some(served) = attempt.and_then(|i| self.trace.attempts.get_mut(i)) {
            served.served = true;
        }
    }

    pub fn fail(&mut self, class: &str, message: impl Into<String>) {
        self.trace.error = Some(TraceError {
            class: class.to_owned(),
            message: message.into(),
        });
    }

    fn mark_upstream_end(&mut self) {
        if self.upstream_started.is_some() && self.upstream_ended.is_none() {
            self.upstream_ended = Some(Instant::now());
        }
    }

    /// Records the trace; later calls do nothing.
    pub fn finish(&mut self, response: Captured) {
        if self.done {
            return;
        }
        self.done = true;
        self.in_flight = None;
        self.mark_upstream_end();
        let total = self.started.elapsed();
        let upstream = self
            .upstream_started
            .zip(self.upstream_ended)
            .map(|(from, to)| to - from);
        let overhead = total
            .saturating_sub(upstream.unwrap_or_default())
            .saturating_sub(self.body_read);
        let latency = &mut self.trace.latency;
        latency.total_ms = ms(total);
        latency.upstream_ms = upstream.map(ms);
        latency.overhead_ms = ms(overhead);
        self.trace.ended_at_ms = self.trace.started_at_ms + total.as_millis() as u64;
        if self.trace.run_id.is_empty() {
            self.trace.run_id = (self.run_id_fallback)(&self.trace);
        }
        if let Some(fill) = self.cache_fill.take() {
            let complete = (200..300).contains(&self.trace.status)
                && self.trace.error.is_none()
                && !response.cut;
            let answer = complete.then(|| crate::cache::Entry {
                body: response.joined(),
                sse: response.sse,
            });
            // Filling the cache (a copy of the answer, moka's insert) waits until the client has
            // the answer. A call for the same answer in between waits on the fill's claim, as it
            // did before. The trace, below, is handed over at once: a sync asked for after the
            // answer arrived must find it.
            crate::server::after_write::defer(move || fill.complete(answer));
        }
        self.recorder.record(TraceEvent {
            trace: std::mem::take(&mut self.trace),
            endpoint: self.endpoint,
            request_body: std::mem::take(&mut self.request_body),
            response: response.frames.into(),
            response_cut: response.cut,
            first_byte_us: response.first_byte_us,
            response_is_sse: response.sse,
            output_checked: self.output_checked,
        });
    }
}

impl Drop for Draft {
    /// The client went away before the call ended: still exactly one trace, marked cancelled.
    fn drop(&mut self) {
        if !self.done {
            if self.trace.status == 0 {
                self.trace.status = CLIENT_CLOSED;
            }
            self.fail(
                "cancelled",
                "the client closed the connection before the call ended",
            );
            self.finish(Captured::default());
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The response frames kept for the recorder, bounded: past the limit the oldest frames go (the
/// usage a provider reports comes last, so the tail is what matters).
#[derive(Default)]
pub struct Captured {
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
    limit: usize,
    cut: bool,
    first_byte_us: Option<u64>,
    sse: bool,
}

impl Captured {
    pub fn new(limit: usize, sse: bool) -> Captured {
        Captured {
            limit,
            sse,
            ..Captured::default()
        }
    }

    /// A whole answer that arrived at once (from the cache).
    pub fn whole(limit: usize, sse: bool, bytes: Bytes, at_us: u64) -> Captured {
        let mut captured = Captured::new(limit, sse);
        captured.push(at_us, bytes);
        captured
    }

    /// The kept bytes in one piece (without a copy when they are one frame).
    fn joined(&self) -> Bytes {
        match self.frames.len() {
            0 => Bytes::new(),
            1 => self.frames[0].1.clone(),
            _ => {
                let mut out = BytesMut::with_capacity(self.bytes);
                self.frames
                    .iter()
                    .for_each(|(_, frame)| out.extend_from_slice(frame));
                out.freeze()
            }
        }
    }

    fn push(&mut self, at_us: u64, bytes: Bytes) {
        self.first_byte_us.get_or_insert(at_us);
        self.bytes += bytes.len();
        self.frames.push_back((at_us, bytes));
        while self.bytes > self.limit && self.frames.len() > 1 {
            if let Some((_, dropped)) = self.frames.pop_front() {
                self.bytes -= dropped.len();
                self.cut = true;
            }
        }
    }
}

enum State {
    Streaming,
    /// An error event still to send to an SSE client, then the end.
    Closing(Bytes),
    Done,
}

/// The client's response body: forwards, captures, enforces the call's deadline.
pub struct MeteredBody {
    inner: ResponseBody,
    draft: Draft,
    captured: Captured,
    /// SSE answers are forwarded whole event by whole event, so a stream that breaks off never
    /// leaves the client half an event (which SDKs would fail to parse).
    events: Option<EventSplitter>,
    /// The gateway asked for stream usage the client did not ask for: that chunk is dropped.
    drop_usage_chunk: bool,
    deadline: Pin<Box<Sleep>>,
    state: State,
    /// The last byte forwarded ended an SSE event (or nothing was forwarded yet).
    at_event_boundary: bool,
    /// Output guardrails that may change a streamed answer; the recorder then gets the events
    /// as the client got them (redacted), not the upstream's.
    check: Option<super::guard::StreamCheck>,
    /// Checked events waiting to be captured.
    guarded: Vec<Bytes>,
}

impl MeteredBody {
    pub fn new(
        inner: ResponseBody,
        draft: Draft,
        captured: Captured,
        drop_usage_chunk: bool,
        deadline: Sleep,
    ) -> MeteredBody {
        let sse = captured.sse;
        MeteredBody {
            inner,
            draft,
            captured,
            events: sse.then(EventSplitter::default),
            drop_usage_chunk,
            deadline: Box::pin(deadline),
            state: State::Streaming,
            at_event_boundary: true,
            check: None,
            guarded: Vec::new(),
        }
    }

    /// Checks a streamed answer with output guardrails as it passes.
    pub fn with_check(mut self, check: Option<super::guard::StreamCheck>) -> MeteredBody {
        self.check = check.filter(|_| self.events.is_some());
        self
    }

    fn end(&mut self) {
        self.state = State::Done;
        if let Some(check) = self.check.take() {
            let verdicts = check.verdicts();
            self.draft.output_checked = true;
            self.draft
                .trace
                .guardrails
                .extend(verdicts.iter().map(|v| v.to_trace()));
        }
        self.draft.finish(std::mem::take(&mut self.captured));
    }

    /// The call's deadline passed while the upstream was still answering.
    fn time_out(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message =
            "the call exceeded server.request_timeout_ms while the upstream was still sending"
                .to_owned();
        self.break_off("timeout", "upstream_timeout", message)
    }

    fn log_break(&self, class: &str, message: &str) {
        tracing::warn!(trace_id = %self.draft.trace.id, class, message, "answer broken off");
    }

    /// Ends a broken stream: SSE clients get an OpenAI-shaped error event, others a body error.
    fn break_off(
        &mut self,
        class: &str,
        code: &str,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.log_break(class, &message);
        self.draft.mark_upstream_end();
        self.draft.fail(class, message.clone());
        // An SSE answer ends well-formed, with an error event, so its connection stays usable.
        // (Closing it anyway raced the client: having read a complete response, it could send
        // its next call on the connection just as the server closed it.) Any other answer ends
        // in a body error, after which hyper drops the connection itself.
        if self.captured.sse {
            let event = serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": code}});
            // After a cut-off event, a blank line first: the error must be an event of its own.
            let separator = if self.at_event_boundary { "" } else { "\n\n" };
            self.state = State::Closing(Bytes::from(format!("{separator}data: {event}\n\n")));
            Poll::Ready(self.next_closing())
        } else {
            self.end();
            Poll::Ready(Some(Err(message.into())))
        }
    }

    fn next_closing(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Closing(event) => {
                self.end();
                Some(Ok(Frame::data(event)))
            }
            _ => None,
        }
    }

    /// Whole events pass (but the usage chunk the gateway asked for); a partial one waits for
    /// its end.
    fn filter(&mut self, data: &Bytes) -> Result<Option<Bytes>, Blocked> {
        let Some(splitter) = self.events.as_mut() else {
            return Ok(Some(data.clone()));
        };
        // The usual frame: whole events, nothing held back from the last one, nothing to check
        // or drop. It goes out as it came, without being copied into the splitter and out again.
        let whole_events = splitter.pending() == 0 && ends_event(data);
        if whole_events
            && self.check.is_none()
            && !(self.drop_usage_chunk && has_usage_object(data))
        {
            return Ok(Some(data.clone()));
        }
        splitter.push(data);
        let mut out = BytesMut::new();
        while let Some(event) = splitter.next_event() {
            let event = match self.check.as_mut() {
                Some(check) => {
                    let mut checked = BytesMut::new();
                    check.event(&event, &mut checked)?;
                    let checked = checked.freeze();
                    self.guarded.push(checked.clone());
                    checked
                }
                None => event,
            };
            if !(self.drop_usage_chunk && is_usage_only_chunk(&event)) {
                out.extend_from_slice(&event);
            }
        }
        // Not SSE as we know it (no event ends in sight): stop holding bytes back and filtering.
        if splitter.pending() > MAX_HELD_BACK {
            out.extend_from_slice(&splitter.take_rest());
            self.events = None;
        }
        Ok((!out.is_empty()).then(|| out.freeze()))
    }

    fn on_data(&mut self, data: Bytes) -> Result<Option<Bytes>, Blocked> {
        let at_us = self.draft.started().elapsed().as_micros() as u64;
        let out = self.filter(&data);
        if let Ok(Some(out)) = &out {
            self.at_event_boundary = ends_event(out);
        }
        if self.check.is_some() {
            // What the client got (redacted), never the upstream's text.
            for event in self.guarded.drain(..) {
                self.captured.push(at_us, event);
            }
        } else {
            // A copy, not a reference: a frame is a slice of the connection's read buffer, and
            // holding it until the recorder runs would pin that whole buffer.
            self.captured.push(at_us, Bytes::copy_from_slice(&data));
        }
        out
    }

    /// The upstream ended the stream without `[DONE]`: the text output guardrails still hold
    /// back goes to the client (and into the trace) instead of being lost.
    fn release_held(&mut self) -> Result<BytesMut, Blocked> {
        let mut out = BytesMut::new();
        if let Some(check) = self.check.as_mut() {
            check.finish_into(&mut out)?;
            if !out.is_empty() {
                let at_us = self.draft.started().elapsed().as_micros() as u64;
                self.captured.push(at_us, Bytes::copy_from_slice(&out));
            }
        }
        Ok(out)
    }

    /// A guardrail blocked the answer mid-stream: an error event, then the end.
    fn block(&mut self, blocked: Blocked) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = blocked.message();
        self.draft.fail("guardrail_blocked", message.clone());
        if let Some(check) = self.check.take() {
            self.draft.output_checked = true;
            self.draft
                .trace
                .guardrails
                .extend(check.verdicts().iter().map(|v| v.to_trace()));
        }
        let event = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "guardrail_blocked"}});
        let separator = if self.at_event_boundary { "" } else { "\n\n" };
        self.state = State::Closing(Bytes::from(format!("{separator}data: {event}\n\n")));
        Poll::Ready(self.next_closing())
    }
}

impl Drop for MeteredBody {
    /// The client went away mid-answer: record what it was sent so far.
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            self.draft.fail(
                "cancelled",
                "the client closed the connection before the answer ended",
            );
            self.end();
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Closing(_) => return Poll::Ready(this.next_closing()),
                State::Streaming => {}
            }
            // The deadline's timer is polled only when the upstream is silent (to be woken at the
            // deadline); a frame that arrives is checked against the clock, which costs less than
            // a poll of the timer (callgrind: its polls 11.7k -> 9.0k instructions per stream).
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        return this.time_out();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(_)) if tokio::time::Instant::now() >= this.deadline.deadline() => {
                    return this.time_out();
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = match this.on_data(data) {
                            Ok(out) => out,
                            Err(blocked) => return this.block(blocked),
                        };
                        // A body of known length may be dropped by the server right after its
                        // last frame, without another poll: finish now, not as "cancelled".
                        if this.inner.is_end_stream() && this.events.is_none() {
                            this.end();
                        }
                        if let Some(out) = out {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(err))) => {
                    let message = format!(
                        "the upstream broke off the response: {}",
                        crate::providers::client::root_cause(&*err)
                    );
                    return this.break_off("upstream_stream", "upstream_stream_error", message);
                }
                Poll::Ready(None) => {
                    let mut out = match this.release_held() {
                        Ok(out) => out,
                        Err(blocked) => return this.block(blocked),
                    };
                    if let Some(rest) = this.events.as_mut().map(EventSplitter::take_rest) {
                        out.extend_from_slice(&rest);
                    }
                    this.end();
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out.freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.events) {
            (State::Streaming, None) => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use http_body_util::BodyExt;

    /// An upstream body that always has another frame ready: never `Pending`, so only the clock
    /// check on arriving frames can notice the deadline.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"more ")))))
        }
    }

    #[tokio::test]
    async fn an_upstream_that_never_pauses_is_still_cut_at_the_deadline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::SledStore::open(&dir.path().join("db"), 1 << 20).expect("store");
        let config = crate::config::Config::default();
        let (recorder, control) = crate::recorder::spawn(
            Arc::new(store),
            Arc::new(crate::telemetry::Metrics::new()),
            crate::metering::Pricing::new(&Default::default()).expect("pricing"),
            crate::recorder::RecorderSettings::from_config(&config),
        )
        .expect("recorder");
        let draft = Draft::new(recorder, "POST", "/v1/chat/completions", |_| String::new());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut body = MeteredBody::new(
            Endless.boxed(),
            draft,
            Captured::new(1024, false),
            false,
            tokio::time::sleep_until(deadline),
        );
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let started = std::time::Instant::now();
        let mut forwarded = 0;
        let ended = loop {
            // Bounded: a body that never checked the clock would forward frames forever.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "still forwarding after {forwarded} frames"
            );
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => forwarded += 1,
                other => break other,
            }
        };
        let Poll::Ready(Some(Err(err))) = ended else {
            panic!("expected a body error at the deadline, got {ended:?}");
        };
        assert!(err.to_string().contains("request_timeout_ms"), "{err}");
        assert!(
            tokio::time::Instant::now() >= deadline,
            "cut before the deadline"
        );
        assert!(forwarded > 0, "frames before the deadline are forwarded");
        drop(body);
        control.shutdown().await;
    }
}
