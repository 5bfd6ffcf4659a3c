//! A cached answer in the shape the client asked for: a stored stream replayed as a stream, a
//! stored JSON answer replayed as one, and each turned into the other when the shapes differ.
//!
//! Replays of the stored shape are the provider's own bytes (less the usage chunk a client did
//! not ask for). Conversions follow OpenAI's documented chunk and completion objects.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};

use super::Entry;
use crate::providers::Endpoint;
use crate::sse::{is_usage_only_chunk, parse_event, split_events};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplayError {
    #[error("the cached answer is not a JSON object")]
    NotJson,
    #[error("{0} answers cannot be replayed as a stream")]
    NotStreamable(&'static str),
}

/// The body to send and whether it is SSE.
pub fn to_client(
    entry: &Entry,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
) -> Result<Bytes, ReplayError> {
    match (stream, entry.sse) {
        (true, true) if include_usage => Ok(entry.body.clone()),
        (true, true) => Ok(without_usage_chunk(&entry.body)),
        (false, false) => Ok(entry.body.clone()),
        (true, false) => json_to_sse(endpoint, &entry.body, include_usage),
        (false, true) => sse_to_json(endpoint, &entry.body),
    }
}

fn without_usage_chunk(body: &Bytes) -> Bytes {
    let (events, rest) = split_events([&body[..]]);
    let mut out = BytesMut::with_capacity(body.len());
    for event in events.iter().filter(|event| !is_usage_only_chunk(event)) {
        out.extend_from_slice(event);
    }
    out.extend_from_slice(&rest);
    out.freeze()
}

fn push_event(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// A stored JSON answer as the stream the provider would have sent: one content chunk per
/// choice, one chunk with its finish reason, the usage chunk if asked for, `[DONE]`.
fn json_to_sse(endpoint: Endpoint, body: &[u8], include_usage: bool) -> Result<Bytes, ReplayError> {
    let answer: Map<String, Value> =
        serde_json::from_slice(body).map_err(|_| ReplayError::NotJson)?;
    let (object, delta_of): (&str, fn(&Value) -> Value) = match endpoint {
        Endpoint::ChatCompletions => ("chat.completion.chunk", chat_delta),
        Endpoint::Completions => ("text_completion", completion_delta),
        other => return Err(ReplayError::NotStreamable(other.as_str())),
    };
    let mut head = Map::new();
    for field in [
        "id",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
    ] {
        if let Some(value) = answer.get(field) {
            head.insert(field.to_owned(), value.clone());
        }
    }
    head.insert("object".into(), object.into());
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        if include_usage {
            chunk.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        Value::Object(chunk)
    };
    let choices = answer
        .get("choices")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() * 2);
    for choice in &choices {
        let mut content = delta_of(choice);
        content["finish_reason"] = Value::Null;
        push_event(&mut out, &chunk(json!([content]), None));
    }
    for choice in &choices {
        let mut last = json!({"index": choice.get("index").cloned().unwrap_or(json!(0))});
        if endpoint == Endpoint::ChatCompletions {
            last["delta"] = json!({});
        } else {
            last["text"] = json!("");
        }
        last["logprobs"] = Value::Null;
        last["finish_reason"] = choice
            .get("finish_reason")
            .cloned()
            .unwrap_or(json!("stop"));
        push_event(&mut out, &chunk(json!([last]), None));
    }
    if include_usage {
        if let Some(usage) = answer.get("usage") {
            push_event(&mut out, &chunk(json!([]), Some(usage)));
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Ok(Bytes::from(out))
}

fn chat_delta(choice: &Value) -> Value {
    let message = choice.get("message").cloned().unwrap_or_else(|| json!({}));
    let mut delta = Map::new();
    delta.insert(
        "role".into(),
        message.get("role").cloned().unwrap_or(json!("assistant")),
    );
    for field in ["content", "refusal"] {
        if let Some(value) = message.get(field).filter(|v| !v.is_null()) {
            delta.insert(field.into(), value.clone());
        }
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        let indexed: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut call = call.clone();
                call["index"] = json!(index);
                call
            })
            .collect();
        delta.insert("tool_calls".into(), Value::Array(indexed));
    }
    json!({
        "index": choice.get("index").cloned().unwrap_or(json!(0)),
        "delta": delta,
        "logprobs": Value::Null,
    })
}

fn completion_delta(choice: &Value) -> Value {
    json!({
        "index": choice.get("index").cloned().unwrap_or(json!(0)),
        "text": choice.get("text").cloned().unwrap_or(json!("")),
        "logprobs": Value::Null,
    })
}

/// One choice of a stream, put back together.
#[derive(Default)]
struct Assembled {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    /// By the chunk's `index`: id, type, name, arguments so far.
    tool_calls: BTreeMap<u64, (Value, Value, String, String)>,
    finish_reason: Value,
}

/// A stored stream as the JSON answer a non-streamed call gets.
fn sse_to_json(endpoint: Endpoint, body: &Bytes) -> Result<Bytes, ReplayError> {
    let object = match endpoint {
        Endpoint::ChatCompletions => "chat.completion",
        Endpoint::Completions => "text_completion",
        other => return Err(ReplayError::NotStreamable(other.as_str())),
    };
    let mut head = Map::new();
    let mut choices: BTreeMap<u64, Assembled> = BTreeMap::new();
    let mut usage = None;
    for raw in split_events([&body[..]]).0 {
        let event = parse_event(&raw);
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        for field in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            if let Some(value) = chunk.get(field).filter(|v| !v.is_null()) {
                head.entry(field).or_insert_with(|| value.clone());
            }
        }
        if let Some(found) = chunk.get("usage").filter(|u| u.is_object()) {
            usage = Some(found.clone());
        }
        for choice in items(&chunk, "choices") {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            absorb(choices.entry(index).or_default(), choice);
        }
    }
    if head.is_empty() && choices.is_empty() {
        return Err(ReplayError::NotJson);
    }
    head.insert("object".into(), object.into());
    let assembled: Vec<Value> = choices
        .into_iter()
        .map(|(index, choice)| match endpoint {
            Endpoint::ChatCompletions => chat_choice(index, choice),
            _ => json!({
                "index": index,
                "text": choice.content.unwrap_or_default(),
                "logprobs": Value::Null,
                "finish_reason": choice.finish_reason,
            }),
        })
        .collect();
    head.insert("choices".into(), Value::Array(assembled));
    if let Some(usage) = usage {
        head.insert("usage".into(), usage);
    }
    serde_json::to_vec(&head)
        .map(Bytes::from)
        .map_err(|_| ReplayError::NotJson)
}

/// The elements of the array at `key`, none when it is missing or not an array.
fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn absorb(into: &mut Assembled, choice: &Value) {
    if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
        into.finish_reason = reason.clone();
    }
    if let Some(text) = choice.get("text").and_then(Value::as_str) {
        into.content.get_or_insert_with(String::new).push_str(text);
    }
    let Some(delta) = choice.get("delta") else {
        return;
    };
    if let Some(role) = delta.get("role").filter(|r| !r.is_null()) {
        into.role = Some(role.clone());
    }
    if let Some(text) = delta.get("content").and_then(Value::as_str) {
        into.content.get_or_insert_with(String::new).push_str(text);
    }
    if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
        into.refusal.get_or_insert_with(String::new).push_str(text);
    }
    for call in items(delta, "tool_calls") {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let slot = into
            .tool_calls
            .entry(index)
            .or_insert_with(|| (Value::Null, json!("function"), String::new(), String::new()));
        if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
            slot.0 = id.clone();
        }
        if let Some(kind) = call.get("type").filter(|v| !v.is_null()) {
            slot.1 = kind.clone();
        }
        if let Some(function) = call.get("function") {
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                slot.2.push_str(name);
            }
            if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                slot.3.push_str(arguments);
            }
        }
    }
}

fn chat_choice(index: u64, choice: Assembled) -> Value {
    let mut message = json!({
        "role": choice.role.unwrap_or(json!("assistant")),
        "content": choice.content.map_or(Value::Null, Value::String),
        "refusal": choice.refusal.map_or(Value::Null, Value::String),
    });
    if !choice.tool_calls.is_empty() {
        let calls: Vec<Value> = choice
            .tool_calls
            .into_values()
            .map(|(id, kind, name, arguments)| {
                json!({"id": id, "type": kind, "function": {"name": name, "arguments": arguments}})
            })
            .collect();
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "index": index,
        "message": message,
        "logprobs": Value::Null,
        "finish_reason": choice.finish_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;

    const TOOL_STREAM: &str = concat!(
        "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"created\":9,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"created\":9,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"created\":9,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"created\":9,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"created\":9,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    fn entry(body: &'static str, sse: bool) -> Entry {
        Entry {
            body: Bytes::from_static(body.as_bytes()),
            sse,
        }
    }

    fn chunks(sse: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(sse).expect("utf-8");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("chunk json"))
            .collect()
    }

    #[test]
    fn stored_shapes_replay_as_stored() {
        let json = entry(ANSWER, false);
        let body = to_client(&json, Endpoint::ChatCompletions, false, false).expect("replay");
        assert_eq!(&body[..], ANSWER.as_bytes());
        let stream = entry(TOOL_STREAM, true);
        let body = to_client(&stream, Endpoint::ChatCompletions, true, true).expect("replay");
        assert_eq!(&body[..], TOOL_STREAM.as_bytes());
        let body = to_client(&stream, Endpoint::ChatCompletions, true, false).expect("replay");
        let without: Vec<Value> = chunks(&body);
        assert_eq!(without.len(), 4, "the usage chunk goes when not asked for");
        assert!(without.iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn json_answer_replays_as_a_stream_that_reassembles_to_it() {
        let body = to_client(&entry(ANSWER, false), Endpoint::ChatCompletions, true, true)
            .expect("replay");
        let chunks = chunks(&body);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "Hello there");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[2]["usage"]["total_tokens"], 7);
        assert_eq!(chunks[2]["choices"], json!([]));
        let back = sse_to_json(Endpoint::ChatCompletions, &body).expect("assemble");
        let back: Value = serde_json::from_slice(&back).expect("json");
        let original: Value = serde_json::from_str(ANSWER).expect("json");
        assert_eq!(back, original);
    }

    #[test]
    fn tool_call_stream_assembles_into_one_message() {
        let body = to_client(
            &entry(TOOL_STREAM, true),
            Endpoint::ChatCompletions,
            false,
            false,
        )
        .expect("replay");
        let answer: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["id"], "c2");
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(answer["usage"]["completion_tokens"], 4);
    }

    #[test]
    fn completions_convert_both_ways_and_embeddings_do_not_stream() {
        let stored = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"four","logprobs":null,"finish_reason":"length"}]}"#;
        let sse =
            to_client(&entry(stored, false), Endpoint::Completions, true, false).expect("replay");
        let parts = chunks(&sse);
        assert_eq!(parts[0]["choices"][0]["text"], "four");
        let back: Value =
            serde_json::from_slice(&sse_to_json(Endpoint::Completions, &sse).expect("assemble"))
                .expect("json");
        assert_eq!(back["choices"][0]["text"], "four");
        assert_eq!(back["choices"][0]["finish_reason"], "length");
        assert_eq!(
            to_client(&entry("{}", false), Endpoint::Embeddings, true, false),
            Err(ReplayError::NotStreamable("embeddings"))
        );
    }
}
