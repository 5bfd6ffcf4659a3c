//! Anthropic's message stream as OpenAI `chat.completion.chunk` events, translated event by event
//! as they arrive (nothing is held back but an unfinished event).
//!
//! `message_start` gives the role chunk; text deltas become `content` deltas; a `tool_use` block
//! becomes a tool call (id and name first, then its `input_json_delta` pieces as `arguments`);
//! `message_delta` carries the stop reason and the final output count; `message_stop` ends with
//! the finish-reason chunk, the usage chunk when the client asked for it, and `data: [DONE]`.
//! An `error` event becomes an OpenAI error event and ends the stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{openai_error, Detail};
use super::response::{finish_reason, Usage};
use crate::response::{BoxError, ResponseBody};
use crate::sse::{parse_event, EventSplitter};

/// Bytes of one unfinished event held at most: past it the answer is not SSE.
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("Anthropic sent a stream event that is not JSON: {0}")]
    NotJson(String),
    #[error("Anthropic's stream ended before message_stop")]
    Truncated,
    #[error("Anthropic sent an event of more than {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: Start,
    },
    ContentBlockStart {
        index: u64,
        content_block: BlockStart,
    },
    ContentBlockDelta {
        index: u64,
        delta: Delta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: UsageDelta,
    },
    MessageStop,
    Error {
        error: Detail,
    },
    /// `ping`, `content_block_stop`, and whatever Anthropic adds later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct Start {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockStart {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Delta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    /// Thinking, signatures, citations: nothing a chat chunk carries.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// `message_delta`'s counts: the output so far, and (in newer answers) the input again.
#[derive(Deserialize, Default)]
struct UsageDelta {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

/// Whether the stream goes on after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    End,
}

/// The translation state of one stream.
pub struct Translator {
    include_usage: bool,
    created: u64,
    id: String,
    model: String,
    /// Content block index → OpenAI tool call index, for the blocks that are tool calls.
    tool_blocks: Vec<(u64, u32)>,
    tool_calls: u32,
    stop_reason: Option<String>,
    usage: Usage,
    ended: bool,
}

impl Translator {
    /// `include_usage`: the client asked for `stream_options.include_usage`. `created`: the Unix
    /// time every chunk is stamped with.
    pub fn new(include_usage: bool, created: u64) -> Translator {
        Translator {
            include_usage,
            created,
            id: String::new(),
            model: String::new(),
            tool_blocks: Vec::new(),
            tool_calls: 0,
            stop_reason: None,
            usage: Usage::default(),
            ended: false,
        }
    }

    /// The stream reached `message_stop` or an error event.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Translates one raw SSE event, appending the OpenAI events it makes to `out`.
    pub fn event(&mut self, raw: &[u8], out: &mut BytesMut) -> Result<Step, StreamError> {
        if self.ended {
            return Ok(Step::End);
        }
        let data = parse_event(raw).data;
        if data.is_empty() {
            return Ok(Step::Continue);
        }
        let event: Event = serde_json::from_str(&data)
            .map_err(|_| StreamError::NotJson(data.chars().take(200).collect()))?;
        match event {
            Event::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.usage = message.usage;
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => self.block_start(index, content_block, out),
            Event::ContentBlockDelta { index, delta } => self.delta(index, delta, out),
            Event::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                self.count(usage);
            }
            Event::MessageStop => {
                self.finish(out);
                return Ok(Step::End);
            }
            Event::Error { error } => {
                let body = json!({ "error": openai_error(&error, http::StatusCode::INTERNAL_SERVER_ERROR) });
                write_event(out, &body.to_string());
                self.ended = true;
                return Ok(Step::End);
            }
            Event::Other => {}
        }
        Ok(Step::Continue)
    }

    fn block_start(&mut self, index: u64, block: BlockStart, out: &mut BytesMut) {
        match block {
            BlockStart::Text { text } if !text.is_empty() => {
                self.chunk(out, json!({ "content": text }), None)
            }
            BlockStart::ToolUse { id, name } => {
                let call = self.tool_calls;
                self.tool_calls += 1;
                self.tool_blocks.push((index, call));
                let delta = json!({"tool_calls": [{
                    "index": call, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]});
                self.chunk(out, delta, None);
            }
            _ => {}
        }
    }

    fn delta(&mut self, index: u64, delta: Delta, out: &mut BytesMut) {
        match delta {
            Delta::Text { text } => self.chunk(out, json!({ "content": text }), None),
            Delta::InputJson { partial_json } if !partial_json.is_empty() => {
                let Some(&(_, call)) = self.tool_blocks.iter().find(|(block, _)| *block == index)
                else {
                    return;
                };
                let delta = json!({"tool_calls": [{
                    "index": call, "function": {"arguments": partial_json},
                }]});
                self.chunk(out, delta, None);
            }
            _ => {}
        }
    }

    fn count(&mut self, delta: UsageDelta) {
        let usage = &mut self.usage;
        usage.output_tokens = delta.output_tokens.unwrap_or(usage.output_tokens);
        usage.input_tokens = delta.input_tokens.unwrap_or(usage.input_tokens);
        if delta.cache_read_input_tokens.is_some() {
            usage.cache_read_input_tokens = delta.cache_read_input_tokens;
        }
        if delta.cache_creation_input_tokens.is_some() {
            usage.cache_creation_input_tokens = delta.cache_creation_input_tokens;
        }
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let reason = finish_reason(self.stop_reason.as_deref());
        self.chunk(out, json!({}), Some(reason));
        if self.include_usage {
            let chunk = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage.to_openai(),
            });
            write_event(out, &chunk.to_string());
        }
        write_event(out, "[DONE]");
        self.ended = true;
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish_reason: Option<&str>) {
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        write_event(out, &chunk.to_string());
    }
}

fn write_event(out: &mut BytesMut, data: &str) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The client's body: Anthropic's SSE body, translated as each event completes.
pub struct TranslatedBody {
    inner: ResponseBody,
    events: EventSplitter,
    translator: Translator,
    /// A failure found after some output was ready: reported on the next poll.
    failed: Option<StreamError>,
    done: bool,
    /// The upstream body ended (or failed): it is not polled again.
    inner_done: bool,
}

impl TranslatedBody {
    pub fn new(inner: ResponseBody, translator: Translator) -> TranslatedBody {
        TranslatedBody {
            inner,
            events: EventSplitter::default(),
            translator,
            failed: None,
            done: false,
            inner_done: false,
        }
    }

    /// Translates every whole event received so far.
    fn translate(&mut self, out: &mut BytesMut) -> Result<(), StreamError> {
        while let Some(event) = self.events.next_event() {
            if self.translator.event(&event, out)? == Step::End {
                self.done = true;
                return Ok(());
            }
        }
        if self.events.pending() > MAX_EVENT_BYTES {
            return Err(StreamError::EventTooLarge);
        }
        Ok(())
    }

    /// Reads what the upstream already sent after the last event (its end, usually), so a
    /// finished answer leaves the pooled connection reusable; never waits for more.
    fn drain_ready(&mut self, cx: &mut Context<'_>) {
        while !self.inner_done {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(_) => self.inner_done = true,
                Poll::Pending => return,
            }
        }
    }

    /// What is left when the upstream body ended: a last event without its blank line.
    fn at_end(&mut self, out: &mut BytesMut) -> Result<(), StreamError> {
        let rest = self.events.take_rest();
        if !rest.is_empty() && !self.translator.ended() {
            self.translator.event(&rest, out)?;
        }
        self.done = true;
        if self.translator.ended() {
            Ok(())
        } else {
            Err(StreamError::Truncated)
        }
    }
}

impl Body for TranslatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(err) = this.failed.take() {
                return Poll::Ready(Some(Err(err.into())));
            }
            if this.done {
                this.drain_ready(cx);
                return Poll::Ready(None);
            }
            let mut out = BytesMut::new();
            let outcome = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    this.inner_done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.events.push(&data);
                        this.translate(&mut out)
                    }
                    // Trailers carry nothing for the client here.
                    Err(_) => Ok(()),
                },
                Poll::Ready(None) => {
                    this.inner_done = true;
                    this.at_end(&mut out)
                }
            };
            if let Err(err) = outcome {
                this.done = true;
                this.failed = Some(err);
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
