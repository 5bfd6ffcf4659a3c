//! OpenAI's `messages` as Anthropic's `system` and `messages`.
//!
//! System and developer messages go to `system`. Tool results (`role: "tool"`) become
//! `tool_result` blocks of a user turn, assistant `tool_calls` become `tool_use` blocks, and
//! consecutive turns of one role are merged, since Anthropic wants user and assistant turns to
//! alternate. Images: `data:` URLs become base64 sources, other URLs URL sources.

use serde_json::{json, Map, Value};

use super::request::Rejection;

pub struct Conversation {
    /// A string, or an array of text blocks when one carries a cache mark.
    pub system: Option<Value>,
    pub messages: Vec<Value>,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

pub fn translate(messages: &Value) -> Result<Conversation, Rejection> {
    let items = messages
        .as_array()
        .ok_or_else(|| Rejection::invalid("messages", "`messages` must be an array"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(Role, Vec<Value>)> = Vec::new();
    for (index, message) in items.iter().enumerate() {
        let at = format!("messages[{index}]");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no `role`")))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(content, &at)?);
                continue;
            }
            "user" => (Role::User, user_blocks(content, &at)?),
            "assistant" => (Role::Assistant, assistant_blocks(message, &at)?),
            "tool" => (Role::User, vec![tool_result(message, &at)?]),
            "function" => {
                return Err(Rejection::unsupported(
                    "messages",
                    format!("{at} has the deprecated role \"function\"; send tool calls and \"tool\" messages instead"),
                ))
            }
            other => {
                return Err(Rejection::invalid(
                    "messages",
                    format!("{at} has the unknown role {other:?}"),
                ))
            }
        };
        // A turn with no content (an assistant turn with neither text nor tool calls) says
        // nothing, and Anthropic refuses empty turns.
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    Ok(Conversation {
        system: (!system.is_empty()).then(|| compact(system)),
        messages: turns
            .into_iter()
            .map(|(role, blocks)| json!({"role": role.as_str(), "content": compact(blocks)}))
            .collect(),
    })
}

/// One plain text block is written as a string, the form clients and fixtures show.
fn compact(blocks: Vec<Value>) -> Value {
    if let [only] = blocks.as_slice() {
        let plain = only.as_object().is_some_and(|o| o.len() == 2);
        if plain && only["type"] == "text" {
            return only["text"].clone();
        }
    }
    Value::Array(blocks)
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// Copies Anthropic's prompt-caching mark from an OpenAI content part, when a client set one.
fn with_cache_mark(mut block: Value, part: &Value) -> Value {
    if let (Some(mark), Some(object)) = (part.get("cache_control"), block.as_object_mut()) {
        object.insert("cache_control".into(), mark.clone());
    }
    block
}

/// A string or an array of text parts (system, developer and tool messages).
fn text_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Rejection> {
    match content {
        Value::String(text) => Ok(vec![text_block(text)]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(
                |(index, part)| match part.get("text").and_then(Value::as_str) {
                    Some(text) if part.get("type").and_then(Value::as_str) == Some("text") => {
                        Ok(with_cache_mark(text_block(text), part))
                    }
                    _ => Err(Rejection::invalid(
                        "messages",
                        format!("{at}.content[{index}] must be a text part"),
                    )),
                },
            )
            .collect(),
        _ => Err(Rejection::invalid(
            "messages",
            format!("{at}.content must be a string or an array of text parts"),
        )),
    }
}

fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Rejection> {
    let parts = match content {
        Value::String(text) => return Ok(vec![text_block(text)]),
        Value::Array(parts) => parts,
        _ => {
            return Err(Rejection::invalid(
                "messages",
                format!("{at}.content must be a string or an array of content parts"),
            ))
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (index, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        let block = match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = part
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no `text`")))?;
                text_block(text)
            }
            Some("image_url") => image(part, &at)?,
            Some("file") => document(part, &at)?,
            Some("input_audio") => {
                return Err(Rejection::unsupported(
                    "messages",
                    format!("{at}: Anthropic does not take audio input"),
                ))
            }
            other => {
                return Err(Rejection::invalid(
                    "messages",
                    format!("{at} has the unknown type {}", other.unwrap_or("(none)")),
                ))
            }
        };
        blocks.push(with_cache_mark(block, part));
    }
    Ok(blocks)
}

/// `image_url` (`{"url": ...}` or a bare string): a `data:` URL becomes a base64 source, an
/// http(s) URL a URL source. OpenAI's `detail` has no Anthropic counterpart; it only tunes cost.
fn image(part: &Value, at: &str) -> Result<Value, Rejection> {
    let url = match part.get("image_url") {
        Some(Value::String(url)) => Some(url.as_str()),
        Some(object) => object.get("url").and_then(Value::as_str),
        None => None,
    }
    .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no image_url.url")))?;
    let source = if url.starts_with("data:") {
        base64_source(url, at)?
    } else if url.starts_with("https://") || url.starts_with("http://") {
        json!({"type": "url", "url": url})
    } else {
        return Err(Rejection::invalid(
            "messages",
            format!("{at}: an image URL must be a data: URL or an http(s) URL"),
        ));
    };
    Ok(json!({"type": "image", "source": source}))
}

/// A `file` part with inline `file_data` (a `data:` URL, e.g. a PDF) as a document block.
fn document(part: &Value, at: &str) -> Result<Value, Rejection> {
    let file = part.get("file").unwrap_or(&Value::Null);
    if file.get("file_id").is_some() {
        return Err(Rejection::unsupported(
            "messages",
            format!("{at}: OpenAI file ids do not exist at Anthropic; send the file inline as file_data"),
        ));
    }
    let data = file
        .get("file_data")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no file.file_data")))?;
    let mut block = Map::new();
    block.insert("type".into(), Value::String("document".into()));
    block.insert("source".into(), base64_source(data, at)?);
    if let Some(title) = file.get("filename").filter(|f| f.is_string()) {
        block.insert("title".into(), title.clone());
    }
    Ok(Value::Object(block))
}

/// `data:<media type>;base64,<data>` as Anthropic's base64 source.
fn base64_source(url: &str, at: &str) -> Result<Value, Rejection> {
    let parsed = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(','))
        .and_then(|(meta, data)| Some((meta.strip_suffix(";base64")?, data)));
    match parsed {
        Some((media_type, data)) if !media_type.is_empty() => Ok(json!({
            "type": "base64", "media_type": media_type, "data": data
        })),
        _ => Err(Rejection::invalid(
            "messages",
            format!("{at}: a data: URL must read data:<media type>;base64,<data>"),
        )),
    }
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(message: &Value, at: &str) -> Result<Vec<Value>, Rejection> {
    let mut blocks = Vec::new();
    match message.get("content").unwrap_or(&Value::Null) {
        Value::Null => {}
        Value::String(text) => blocks.push(text_block(text)),
        Value::Array(parts) => {
            for (index, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let key = if kind == Some("refusal") {
                    "refusal"
                } else {
                    "text"
                };
                match part.get(key).and_then(Value::as_str) {
                    Some(text) if matches!(kind, Some("text" | "refusal")) => {
                        blocks.push(with_cache_mark(text_block(text), part))
                    }
                    _ => {
                        return Err(Rejection::invalid(
                            "messages",
                            format!("{at}.content[{index}] must be a text or refusal part"),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(Rejection::invalid(
                "messages",
                format!("{at}.content must be a string, an array of text parts, or null"),
            ))
        }
    }
    // Anthropic refuses empty text blocks; an empty assistant text is no text.
    blocks.retain(|b| b["text"].as_str() != Some(""));
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls.as_array().ok_or_else(|| {
            Rejection::invalid("messages", format!("{at}.tool_calls must be an array"))
        })?;
        for (index, call) in calls.iter().enumerate() {
            blocks.push(tool_use(call, &format!("{at}.tool_calls[{index}]"))?);
        }
    }
    Ok(blocks)
}

fn tool_use(call: &Value, at: &str) -> Result<Value, Rejection> {
    let field = |pointer: &str| {
        call.pointer(pointer)
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no {}", &pointer[1..])))
    };
    let id = field("/id")?;
    let name = field("/function/name")?;
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    let input: Value = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(arguments).map_err(|err| {
            Rejection::invalid(
                "messages",
                format!("{at}.function.arguments is not JSON ({err}); Anthropic needs the tool input as an object"),
            )
        })?
    };
    if !input.is_object() {
        return Err(Rejection::invalid(
            "messages",
            format!("{at}.function.arguments must encode a JSON object for Anthropic"),
        ));
    }
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

/// A `tool` message as a `tool_result` block.
fn tool_result(message: &Value, at: &str) -> Result<Value, Rejection> {
    let id = message
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejection::invalid("messages", format!("{at} has no `tool_call_id`")))?;
    let content = match message.get("content").unwrap_or(&Value::Null) {
        Value::Null => Value::String(String::new()),
        Value::String(text) => Value::String(text.clone()),
        other => Value::Array(text_blocks(other, at)?),
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}
