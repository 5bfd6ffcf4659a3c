//! Reading what an answer cost in tokens, and what it said, from the provider's response:
//! chat, completions, embeddings and responses shapes, whole JSON or SSE. Runs in the recorder.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::providers::Endpoint;
use crate::sse::{timed_events, Event};

mod messages;

/// Token counts as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProviderUsage {
    pub input: u64,
    pub output: u64,
    /// Part of `input` read from the provider's prompt cache (OpenAI's `prompt_tokens` already
    /// includes it).
    pub cached_input: u64,
    /// Part of `input` written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), priced at the cache-write rate.
    pub cache_write: u64,
}

/// Reads a `usage` object in either OpenAI shape (`prompt_tokens` / `input_tokens`), or
/// Anthropic's, whose `input_tokens` leaves out the cache reads and writes.
pub fn parse_usage(usage: &Value) -> Option<ProviderUsage> {
    // `get` chains, not `Value::pointer`: a pointer allocates two strings per path segment,
    // which made this a third of reading a whole answer's usage in the recorder.
    let number = |path: &[&str]| {
        path.iter()
            .try_fold(usage, |value, name| value.get(name))
            .and_then(Value::as_u64)
    };
    if let Some(input) = number(&["prompt_tokens"]) {
        return Some(ProviderUsage {
            input,
            output: number(&["completion_tokens"]).unwrap_or(0),
            cached_input: number(&["prompt_tokens_details", "cached_tokens"]).unwrap_or(0),
            cache_write: number(&["prompt_tokens_details", "cache_write_tokens"]).unwrap_or(0),
        });
    }
    let input = number(&["input_tokens"])?;
    let output = number(&["output_tokens"]).unwrap_or(0);
    let read = number(&["cache_read_input_tokens"]);
    let written = number(&["cache_creation_input_tokens"]);
    if read.is_some() || written.is_some() {
        let (read, written) = (read.unwrap_or(0), written.unwrap_or(0));
        return Some(ProviderUsage {
            input: input.saturating_add(read).saturating_add(written),
            output,
            cached_input: read,
            cache_write: written,
        });
    }
    Some(ProviderUsage {
        input,
        output,
        cached_input: number(&["input_tokens_details", "cached_tokens"]).unwrap_or(0),
        cache_write: number(&["input_tokens_details", "cache_write_tokens"]).unwrap_or(0),
    })
}

/// The last `"usage": {...}` object in a body whose head is missing.
pub fn usage_from_tail(bytes: &[u8]) -> Option<ProviderUsage> {
    const KEY: &[u8] = b"\"usage\"";
    let at = bytes.windows(KEY.len()).rposition(|w| w == KEY)?;
    let brace = at + bytes[at..].iter().position(|b| *b == b'{')?;
    let value = serde_json::Deserializer::from_slice(&bytes[brace..])
        .into_iter::<Value>()
        .next()?
        .ok()?;
    parse_usage(&value)
}

/// What a response said and cost.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub usage: Option<ProviderUsage>,
    /// The assembled text of a stream; of a JSON answer only when it reported no usage (then the
    /// text is needed to count tokens).
    pub text: String,
    /// µs from request start to the first frame that carried content (streams).
    pub first_content_us: Option<u64>,
    /// The body was valid JSON (non-streamed).
    pub is_json: bool,
    /// `error.message` of an error body, or of an error event in a stream.
    pub error_message: Option<String>,
    /// Stream events whose data was neither JSON nor `[DONE]`.
    pub unparsed_events: u32,
    /// A chat or completions stream's text deltas, one entry per event in order: (choice index,
    /// text) as the output guardrails read them, so the recorder need not parse each event's
    /// JSON a second time. `None` for an event this reader did not take apart (another
    /// endpoint's, content that is not a plain string, data it could not read).
    pub deltas: Vec<Option<Vec<(usize, String)>>>,
}

/// The parts of a JSON answer the recorder needs; everything else is skipped unallocated.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorBody {
    Object {
        #[serde(default)]
        message: Option<String>,
    },
    Other(Value),
}

impl ErrorBody {
    fn message(self) -> Option<String> {
        match self {
            ErrorBody::Object { message } => message,
            ErrorBody::Other(Value::Null) => None,
            ErrorBody::Other(other) => Some(other.to_string()),
        }
    }
}

/// Reads a complete, non-streamed JSON response.
pub fn from_json(endpoint: Endpoint, body: &[u8]) -> Answer {
    let Ok(head) = serde_json::from_slice::<Head>(body) else {
        return Answer::default();
    };
    let usage = head.usage.as_ref().and_then(parse_usage);
    let text = match usage {
        Some(_) => String::new(),
        None => serde_json::from_slice::<Value>(body)
            .map(|json| answer_text(endpoint, &json))
            .unwrap_or_default(),
    };
    Answer {
        usage,
        text,
        first_content_us: None,
        is_json: true,
        error_message: head.error.and_then(ErrorBody::message),
        unparsed_events: 0,
        deltas: Vec::new(),
    }
}

fn answer_text(endpoint: Endpoint, json: &Value) -> String {
    match endpoint {
        Endpoint::ChatCompletions => {
            collect(json.pointer("/choices"), |c| c.pointer("/message/content"))
        }
        Endpoint::Completions => collect(json.pointer("/choices"), |c| c.get("text")),
        Endpoint::Responses => collect(json.pointer("/output"), |item| item.get("content")),
        Endpoint::Messages => {
            let mut text = String::new();
            let blocks = json.pointer("/content").and_then(Value::as_array);
            for block in blocks.into_iter().flatten() {
                if let Some(piece) = block.get("text").and_then(Value::as_str) {
                    text.push_str(piece);
                }
            }
            text
        }
        _ => String::new(),
    }
}

fn collect<'a>(items: Option<&'a Value>, pick: impl Fn(&'a Value) -> Option<&'a Value>) -> String {
    let mut out = String::new();
    for item in items.and_then(Value::as_array).into_iter().flatten() {
        match pick(item) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .for_each(|t| out.push_str(t)),
            _ => {}
        }
    }
    out
}

/// Reads a streamed response from its frames (with arrival times).
pub fn from_sse(endpoint: Endpoint, frames: &[(u64, Bytes)]) -> Answer {
    from_events(endpoint, &timed_events(frames))
}

/// Reads a streamed response from its parsed events (with the arrival time of each), noting
/// when the first text arrived.
pub fn from_events(endpoint: Endpoint, events: &[(u64, Event)]) -> Answer {
    let mut answer = Answer::default();
    let mut stream = messages::Stream::default();
    for (at_us, event) in events {
        let had_text = !answer.text.is_empty();
        let deltas = match endpoint {
            Endpoint::Messages => {
                stream.read_event(event, &mut answer);
                None
            }
            _ => read_event(endpoint, event, &mut answer),
        };
        answer.deltas.push(deltas);
        if !had_text && !answer.text.is_empty() && answer.first_content_us.is_none() {
            answer.first_content_us = Some(*at_us);
        }
    }
    answer
}

/// One streamed event, chat/completions chunk or Responses event alike: only the fields read.
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(rename = "type", default, borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    delta: Option<Value>,
    #[serde(default)]
    response: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    /// Kept raw and read as the guardrails read it: a chunk carries only some choices.
    #[serde(default, borrow)]
    index: Option<&'a RawValue>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    usage: Option<Value>,
}

/// Reads one event into `answer`; the event's text deltas for a chat or completions stream.
fn read_event(
    endpoint: Endpoint,
    event: &Event,
    answer: &mut Answer,
) -> Option<Vec<(usize, String)>> {
    if event.data.is_empty() || event.data == "[DONE]" {
        return Some(Vec::new());
    }
    let Ok(parsed) = serde_json::from_str::<StreamEvent>(&event.data) else {
        answer.unparsed_events += 1;
        return None;
    };
    if let Some(message) = parsed.error.and_then(ErrorBody::message) {
        answer.error_message = Some(message);
    }
    if endpoint == Endpoint::Responses {
        match parsed.kind.as_deref() {
            Some("response.output_text.delta") => {
                if let Some(Value::String(delta)) = &parsed.delta {
                    answer.text.push_str(delta);
                }
            }
            Some("response.completed") | Some("response.incomplete") | Some("response.failed") => {
                let usage = parsed.response.and_then(|r| r.usage);
                if let Some(usage) = usage.as_ref().and_then(parse_usage) {
                    answer.usage = Some(usage);
                }
            }
            _ => {}
        }
        return None;
    }
    let mut deltas = Vec::new();
    for (position, choice) in parsed.choices.into_iter().enumerate() {
        let content = choice.delta.and_then(|d| d.content);
        if let Some(text) = content.as_ref().or(choice.text.as_ref()) {
            answer.text.push_str(text);
        }
        let group = choice
            .index
            .and_then(|index| index.get().parse::<usize>().ok())
            .unwrap_or(position);
        deltas.extend(
            content
                .into_iter()
                .chain(choice.text)
                .map(|text| (group, text)),
        );
    }
    if let Some(usage) = parsed.usage.as_ref().and_then(parse_usage) {
        answer.usage = Some(usage);
    }
    // Other endpoints' chunks are no text the guardrails read.
    matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions).then_some(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder feeds the output guardrails these deltas instead of their own reading of
    /// each event: where this reader takes an event apart, both must give the same texts in the
    /// same order for the same choices; where it cannot, it must say so (`None`).
    #[test]
    fn stream_deltas_read_like_the_guardrails_read_them() {
        let chat = Endpoint::ChatCompletions;
        let completions = Endpoint::Completions;
        let cases: [(Endpoint, &str, bool); 13] = [
            (
                chat,
                r#"{"choices":[{"index":0,"delta":{"content":"Hello"}}],"usage":null}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":0,"delta":{"content":null},"finish_reason":"stop"}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":1,"delta":{"content":"b"}},{"index":0,"delta":{"content":"a"}}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"delta":{"content":"no index"}},{"delta":{"content":"second"}}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":"2","delta":{"content":"odd index"}}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":0,"delta":{"content":"caf\u00e9 \"quoted\"\nline"}}]}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#,
                true,
            ),
            (
                chat,
                r#"{"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"parts"}]}}]}"#,
                false,
            ),
            (chat, r#"{"error":{"message":"overloaded"}}"#, true),
            (
                completions,
                r#"{"choices":[{"index":0,"text":"completion text"}]}"#,
                true,
            ),
            (
                completions,
                r#"{"choices":[{"index":3,"text":"x","logprobs":null}]}"#,
                true,
            ),
            (chat, "[DONE]", true),
        ];
        for (endpoint, data, taken_apart) in cases {
            let event = Event {
                name: None,
                data: data.to_owned(),
            };
            let answer = from_events(endpoint, &[(0, event)]);
            let ours = answer.deltas[0].clone();
            assert_eq!(ours.is_some(), taken_apart, "{data}");
            let theirs: Vec<(usize, String)> =
                crate::guardrails::stream_deltas(endpoint, data.as_bytes())
                    .map(|deltas| deltas.into_iter().map(|d| (d.choice, d.text)).collect())
                    .unwrap_or_default();
            if let Some(ours) = ours {
                assert_eq!(ours, theirs, "{data}");
            }
        }
    }

    #[test]
    fn usage_shapes() {
        let cases = [
            (
                r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}"#,
                (10, 5, 4, 0),
            ),
            (r#"{"prompt_tokens":7,"total_tokens":7}"#, (7, 0, 0, 0)),
            (
                r#"{"input_tokens":3,"output_tokens":9,"input_tokens_details":{"cached_tokens":1}}"#,
                (3, 9, 1, 0),
            ),
            (
                r#"{"prompt_tokens":30,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":10,"cache_write_tokens":15}}"#,
                (30, 2, 10, 15),
            ),
            // Anthropic: input_tokens leaves the cache reads and writes out.
            (
                r#"{"input_tokens":5,"output_tokens":7,"cache_read_input_tokens":100,"cache_creation_input_tokens":20}"#,
                (125, 7, 100, 20),
            ),
            (
                r#"{"input_tokens":5,"output_tokens":7,"cache_creation_input_tokens":0}"#,
                (5, 7, 0, 0),
            ),
        ];
        for (json, (input, output, cached, written)) in cases {
            let usage = parse_usage(&serde_json::from_str(json).unwrap()).unwrap();
            assert_eq!(
                usage,
                ProviderUsage {
                    input,
                    output,
                    cached_input: cached,
                    cache_write: written,
                },
                "{json}"
            );
        }
        assert!(parse_usage(&serde_json::json!({"foo": 1})).is_none());
    }

    #[test]
    fn chat_stream_assembles_text_usage_and_first_content() {
        let frames = vec![
            (100, Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n")),
            (200, Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel")),
            (300, Bytes::from_static(b"lo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n")),
        ];
        let answer = from_sse(Endpoint::ChatCompletions, &frames);
        assert_eq!(answer.text, "Hello");
        assert_eq!(answer.first_content_us, Some(300));
        assert_eq!(
            answer.usage,
            Some(ProviderUsage {
                input: 3,
                output: 1,
                cached_input: 0,
                cache_write: 0,
            })
        );
    }

    #[test]
    fn responses_stream_reads_completed_usage() {
        let frames = vec![(
            5,
            Bytes::from_static(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n"),
        )];
        let answer = from_sse(Endpoint::Responses, &frames);
        assert_eq!(answer.text, "Hi");
        assert_eq!(answer.usage.map(|u| (u.input, u.output)), Some((2, 1)));
    }

    #[test]
    fn usage_is_found_in_a_tail() {
        let tail = br#".5,0.25]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":42,"total_tokens":42}}"#;
        assert_eq!(usage_from_tail(tail).map(|u| u.input), Some(42));
        assert_eq!(usage_from_tail(b"no usage here"), None);
    }

    #[test]
    fn json_answers() {
        let chat = from_json(
            Endpoint::ChatCompletions,
            br#"{"choices":[{"message":{"content":"ok"}}]}"#,
        );
        assert_eq!(chat.text, "ok");
        assert!(chat.is_json && chat.usage.is_none());
        let responses = from_json(
            Endpoint::Responses,
            br#"{"output":[{"content":[{"type":"output_text","text":"yo"}]}]}"#,
        );
        assert_eq!(responses.text, "yo");
        let metered = from_json(
            Endpoint::Responses,
            br#"{"output":[],"usage":{"input_tokens":1,"output_tokens":2}}"#,
        );
        assert_eq!(metered.usage.map(|u| u.output), Some(2));
        let error = from_json(
            Endpoint::ChatCompletions,
            br#"{"error":{"message":"slow down","code":"rate"}}"#,
        );
        assert_eq!(error.error_message.as_deref(), Some("slow down"));
        assert_eq!(
            from_json(Endpoint::Embeddings, b"not json"),
            Answer::default()
        );
    }
}
