//! The built-in `mock` provider: deterministic OpenAI-shaped answers, streamed or not, with
//! usage, and no network. It lets a new user see traces, runs and cost without any API key.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::{Endpoint, Provider, SendFuture, UpstreamRequest, UpstreamResponse};
use crate::config::ProviderKind;
use crate::response::{self, BoxError};

pub struct Mock {
    name: String,
}

impl Mock {
    pub fn new(name: &str) -> Mock {
        Mock {
            name: name.to_owned(),
        }
    }
}

impl Provider for Mock {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Mock
    }

    fn supports_stream_usage(&self) -> bool {
        true
    }

    fn has_own_key(&self) -> bool {
        true
    }

    fn send(&self, request: UpstreamRequest) -> SendFuture<'_> {
        Box::pin(async move { Ok(answer(&request)) })
    }
}

fn answer(request: &UpstreamRequest) -> UpstreamResponse {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let model = request.model.clone().unwrap_or_else(|| "mock".into());
    match request.endpoint {
        Endpoint::ChatCompletions => text_answer(&body, &model, Shape::Chat, request.stream),
        Endpoint::Completions => text_answer(&body, &model, Shape::Completion, request.stream),
        Endpoint::Responses => text_answer(&body, &model, Shape::Response, request.stream),
        Endpoint::Embeddings => match embeddings(&body, &model) {
            Ok(answer) => json_response(answer),
            Err(message) => error_response(StatusCode::BAD_REQUEST, &message),
        },
        Endpoint::Models
        | Endpoint::Messages
        | Endpoint::MessagesCountTokens
        | Endpoint::Passthrough => error_response(
            StatusCode::NOT_FOUND,
            &format!(
                "the mock provider does not serve {}",
                request.path_and_query
            ),
        ),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Chat,
    Completion,
    Response,
}

/// The deterministic answer: it names what it was asked, so tests and demos can tell calls apart.
fn answer_text(prompt: &str) -> String {
    let shown: String = prompt.chars().take(80).collect();
    format!("This is a mock answer to: {shown}")
}

fn text_answer(body: &Value, model: &str, shape: Shape, stream: bool) -> UpstreamResponse {
    let prompt = prompt_text(body, shape);
    let text = answer_text(prompt.trim());
    let usage = Usage {
        input: estimate_tokens(&prompt),
        output: text.split_whitespace().count() as u64,
    };
    let id = format!("mock-{:016x}", fnv(prompt.as_bytes()));
    if stream {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return sse_response(stream_events(
            shape,
            &id,
            model,
            &text,
            usage,
            include_usage,
        ));
    }
    json_response(match shape {
        Shape::Chat => json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": usage.chat(),
        }),
        Shape::Completion => json!({
            "id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage.chat(),
        }),
        Shape::Response => response_object(&id, model, &text, usage),
    })
}

#[derive(Clone, Copy)]
struct Usage {
    input: u64,
    output: u64,
}

impl Usage {
    fn chat(self) -> Value {
        json!({
            "prompt_tokens": self.input, "completion_tokens": self.output,
            "total_tokens": self.input + self.output,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        })
    }

    fn responses(self) -> Value {
        json!({
            "input_tokens": self.input, "output_tokens": self.output,
            "total_tokens": self.input + self.output,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        })
    }
}

fn response_object(id: &str, model: &str, text: &str, usage: Usage) -> Value {
    json!({
        "id": format!("resp_{id}"), "object": "response", "created_at": 1_700_000_000,
        "status": "completed", "model": model, "error": null, "incomplete_details": null,
        "instructions": null, "metadata": {}, "tools": [], "tool_choice": "auto",
        "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
        "output": [{
            "type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }],
        "usage": usage.responses(),
    })
}

/// The SSE events of a streamed answer, one word per content event.
fn stream_events(
    shape: Shape,
    id: &str,
    model: &str,
    text: &str,
    usage: Usage,
    include_usage: bool,
) -> Vec<String> {
    let words: Vec<String> = text
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    match shape {
        Shape::Response => response_events(id, model, text, &words, usage),
        Shape::Chat | Shape::Completion => {
            let chunk = |choice: Value, usage_value: Value| {
                let object = if shape == Shape::Chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                let mut chunk = json!({"id": id, "object": object, "created": 1_700_000_000, "model": model,
                                       "choices": choice});
                if include_usage {
                    chunk["usage"] = usage_value;
                }
                data(&chunk)
            };
            let delta = |content: &str, role: bool| match shape {
                Shape::Chat if role => {
                    json!([{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}])
                }
                Shape::Chat => {
                    json!([{"index": 0, "delta": {"content": content}, "finish_reason": null}])
                }
                _ => json!([{"index": 0, "text": content, "finish_reason": null}]),
            };
            let mut events = Vec::with_capacity(words.len() + 4);
            if shape == Shape::Chat {
                events.push(chunk(delta("", true), Value::Null));
            }
            events.extend(words.iter().map(|w| chunk(delta(w, false), Value::Null)));
            let finish = match shape {
                Shape::Chat => json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                _ => json!([{"index": 0, "text": "", "finish_reason": "stop"}]),
            };
            events.push(chunk(finish, Value::Null));
            if include_usage {
                events.push(chunk(json!([]), usage.chat()));
            }
            events.push("data: [DONE]\n\n".into());
            events
        }
    }
}

fn response_events(
    id: &str,
    model: &str,
    text: &str,
    words: &[String],
    usage: Usage,
) -> Vec<String> {
    let mut created = response_object(id, model, "", usage);
    created["status"] = json!("in_progress");
    created["output"] = json!([]);
    if let Some(object) = created.as_object_mut() {
        object.remove("usage");
    }
    let mut events = vec![named(
        "response.created",
        &json!({"type": "response.created", "sequence_number": 0, "response": created}),
    )];
    for (sequence, word) in (1..).zip(words) {
        events.push(named(
            "response.output_text.delta",
            &json!({"type": "response.output_text.delta", "sequence_number": sequence,
                    "item_id": format!("msg_{id}"), "output_index": 0, "content_index": 0,
                    "delta": word, "logprobs": []}),
        ));
    }
    let completed = response_object(id, model, text, usage);
    events.push(named(
        "response.completed",
        &json!({"type": "response.completed", "sequence_number": words.len() + 1, "response": completed}),
    ));
    events
}

fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn named(event: &str, value: &Value) -> String {
    format!("event: {event}\ndata: {value}\n\n")
}

/// OpenAI's own limits, and a cap on the answer's size: the mock must not be a way to make the
/// gateway build gigabytes of floats.
const MAX_EMBEDDING_INPUTS: usize = 2048;
const MAX_EMBEDDING_DIMENSIONS: u64 = 3072;
const MAX_EMBEDDING_VALUES: usize = 1 << 20;

fn embeddings(body: &Value, model: &str) -> Result<Value, String> {
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        _ => vec![String::new()],
    };
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(256);
    if !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&dims) {
        return Err(format!(
            "dimensions must be between 1 and {MAX_EMBEDDING_DIMENSIONS}"
        ));
    }
    let dims = dims as usize;
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(format!(
            "input may hold at most {MAX_EMBEDDING_INPUTS} items"
        ));
    }
    if inputs.len() * dims > MAX_EMBEDDING_VALUES {
        return Err(format!(
            "the mock provider returns at most {MAX_EMBEDDING_VALUES} values: lower dimensions or the number of inputs"
        ));
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": vector(text, dims)}))
        .collect();
    let tokens: u64 = inputs.iter().map(|t| estimate_tokens(t)).sum();
    Ok(json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
}

/// A unit vector derived from the text, so equal texts embed equally.
fn vector(text: &str, dims: usize) -> Vec<f64> {
    let mut state = fnv(text.as_bytes()) | 1;
    let raw: Vec<f64> = (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f64 / 1000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm * 1e6).round() / 1e6).collect()
}

/// The text the model is asked about: the last user message, the prompt, or the input.
fn prompt_text(body: &Value, shape: Shape) -> String {
    let field = match shape {
        Shape::Chat => body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .map(|m| &m["content"]),
        Shape::Completion => body.get("prompt"),
        Shape::Response => body.get("input"),
    };
    field.map(crate::metering::flatten_text).unwrap_or_default()
}

/// About four characters a token, as OpenAI's rule of thumb; the mock does not need tiktoken.
fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn json_response(value: Value) -> UpstreamResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    UpstreamResponse {
        status: StatusCode::OK,
        headers,
        body: response::full(value.to_string()),
    }
}

fn error_response(status: StatusCode, message: &str) -> UpstreamResponse {
    let code = if status == StatusCode::NOT_FOUND {
        "not_found"
    } else {
        "invalid_request"
    };
    let value = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    let mut response = json_response(value);
    response.status = status;
    response
}

fn sse_response(events: Vec<String>) -> UpstreamResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    let chunks = events.into_iter().map(Bytes::from).collect();
    UpstreamResponse {
        status: StatusCode::OK,
        headers,
        body: ChunkBody { chunks }.boxed(),
    }
}

/// A body that yields its chunks one frame each, as a streaming upstream would.
struct ChunkBody {
    chunks: VecDeque<Bytes>,
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.chunks.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// The models `GET /v1/models` lists for a mock provider named `name`.
pub fn listed_models(name: &str) -> Vec<String> {
    ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "echo"]
        .iter()
        .map(|m| format!("{name}/{m}"))
        .collect()
}
