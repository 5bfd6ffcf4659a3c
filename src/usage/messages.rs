//! Anthropic's message stream (`POST /v1/messages`, forwarded untranslated): the text of its
//! `text_delta`s, and its usage from `message_start` (input and cache counts) and
//! `message_delta` (the final output count, and in newer answers the input counts again).

use serde::Deserialize;
use serde_json::Value;

use super::{parse_usage, Answer, ErrorBody};
use crate::sse::Event as SseEvent;

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: Option<Start>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct Start {
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    text: Option<String>,
}

/// The usage counts seen so far, merged as Anthropic sends them.
#[derive(Default)]
pub struct Stream {
    usage: serde_json::Map<String, Value>,
}

impl Stream {
    pub fn read_event(&mut self, event: &SseEvent, answer: &mut Answer) {
        if event.data.is_empty() {
            return;
        }
        let Ok(parsed) = serde_json::from_str::<Event>(&event.data) else {
            answer.unparsed_events += 1;
            return;
        };
        match parsed.kind.as_str() {
            "message_start" => {
                if let Some(usage) = parsed.message.and_then(|m| m.usage) {
                    self.merge(usage, answer);
                }
            }
            "content_block_delta" => {
                if let Some(text) = parsed.delta.and_then(|d| d.text) {
                    answer.text.push_str(&text);
                }
            }
            "message_delta" => {
                if let Some(usage) = parsed.usage {
                    self.merge(usage, answer);
                }
            }
            "error" => answer.error_message = parsed.error.and_then(ErrorBody::message),
            _ => {}
        }
    }

    /// Later counts replace earlier ones key by key (`message_delta`'s output is the total).
    fn merge(&mut self, usage: Value, answer: &mut Answer) {
        if let Value::Object(counts) = usage {
            for (key, value) in counts {
                if !value.is_null() {
                    self.usage.insert(key, value);
                }
            }
        }
        let merged = Value::Object(self.usage.clone());
        if let Some(usage) = parse_usage(&merged) {
            answer.usage = Some(usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::providers::Endpoint;
    use crate::usage::{from_sse, ProviderUsage};

    #[test]
    fn messages_stream_reads_text_and_merged_usage() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":10,\"output_tokens\":1}}}\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let frames = vec![(7, Bytes::from_static(stream.as_bytes()))];
        let answer = from_sse(Endpoint::Messages, &frames);
        assert_eq!(answer.text, "Hello");
        assert_eq!(answer.first_content_us, Some(7));
        assert_eq!(
            answer.usage,
            Some(ProviderUsage {
                input: 135,
                output: 15,
                cached_input: 100,
                cache_write: 10,
            })
        );
        assert_eq!(answer.unparsed_events, 0);
    }

    #[test]
    fn messages_stream_error_event() {
        let frames = vec![(
            1,
            Bytes::from_static(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"),
        )];
        let answer = from_sse(Endpoint::Messages, &frames);
        assert_eq!(answer.error_message.as_deref(), Some("Overloaded"));
    }
}
