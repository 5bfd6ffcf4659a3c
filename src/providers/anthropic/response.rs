//! An Anthropic message as an OpenAI `chat.completion`: text, tool calls (input as a JSON
//! string), finish reason and usage.

use serde::Deserialize;
use serde_json::{json, Value};

/// Anthropic's token counts. `input_tokens` excludes the prompt-cache reads and writes, which
/// OpenAI's `prompt_tokens` includes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
}

impl Usage {
    /// OpenAI's usage object: every prompt token in `prompt_tokens`, cache reads as
    /// `cached_tokens`, cache writes as `cache_write_tokens` (priced apart by the recorder).
    pub fn to_openai(self) -> Value {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        // Saturating: the counts come from the network.
        let prompt = self
            .input_tokens
            .saturating_add(cached)
            .saturating_add(written);
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output_tokens,
            "total_tokens": prompt.saturating_add(self.output_tokens),
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        })
    }
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, or nothing said.
        _ => "stop",
    }
}

#[derive(Deserialize)]
struct Message {
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Thinking, server tool results, ...: nothing an OpenAI message can carry.
    #[serde(other)]
    Other,
}

/// Translates an Anthropic message body; `created` is the Unix time the answer is stamped with.
pub fn to_chat_completion(body: &[u8], created: u64) -> Result<Value, serde_json::Error> {
    let message: Message = serde_json::from_slice(body)?;
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            Block::Text { text: piece } => text.get_or_insert_with(String::new).push_str(&piece),
            Block::ToolUse { id, name, input } => tool_calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            Block::Other => {}
        }
    }
    // OpenAI's content is null next to tool calls when there is no text.
    let content = match text {
        Some(text) => Value::String(text),
        None if tool_calls.is_empty() => Value::String(String::new()),
        None => Value::Null,
    };
    let mut reply = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        reply["tool_calls"] = Value::Array(tool_calls);
    }
    Ok(json!({
        "id": message.id,
        "object": "chat.completion",
        "created": created,
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": null,
            "finish_reason": finish_reason(message.stop_reason.as_deref()),
        }],
        "usage": message.usage.to_openai(),
    }))
}
