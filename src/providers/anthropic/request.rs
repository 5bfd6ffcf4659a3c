//! An OpenAI chat completions request as an Anthropic Messages request: the parameters, tools and
//! `tool_choice` (the conversation itself is `conversation.rs`).
//!
//! Every top-level parameter is either translated, accepted because it changes nothing Anthropic
//! could do differently, or refused with a 400 naming it: a request is never silently changed.

use serde_json::{json, Map, Value};

use super::conversation;

/// `max_tokens` when the client sent none (Anthropic requires it): what every Claude model can
/// produce at least.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why a request cannot go to Anthropic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Valid for OpenAI, but Anthropic's Messages API cannot express it.
    #[error("{message}")]
    Unsupported {
        param: Option<&'static str>,
        message: String,
    },
    /// Not a valid chat completions request.
    #[error("{message}")]
    Invalid {
        param: Option<&'static str>,
        message: String,
    },
}

impl Rejection {
    pub fn unsupported(param: &'static str, message: impl Into<String>) -> Rejection {
        Rejection::Unsupported {
            param: Some(param),
            message: message.into(),
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Rejection {
        Rejection::Invalid {
            param: Some(param),
            message: message.into(),
        }
    }

    pub fn param(&self) -> Option<&'static str> {
        match self {
            Rejection::Unsupported { param, .. } | Rejection::Invalid { param, .. } => *param,
        }
    }

    /// OpenAI's `error.code` for it.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Unsupported { .. } => "unsupported_parameter",
            Rejection::Invalid { .. } => "invalid_parameter",
        }
    }
}

/// The request for Anthropic, and what the answer's translation needs to know.
#[derive(Debug)]
pub struct Translated {
    pub body: Value,
    pub stream: bool,
    /// `stream_options.include_usage`: the translated stream ends with a usage chunk.
    pub include_usage: bool,
}

/// Translates a chat completions body for `model` (the name Anthropic knows).
pub fn translate(body: &[u8], model: &str) -> Result<Translated, Rejection> {
    let request: Map<String, Value> =
        serde_json::from_slice(body).map_err(|err| Rejection::Invalid {
            param: None,
            message: format!("the request body is not a JSON object: {err}"),
        })?;
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_owned()));
    let mut options = Options::default();
    for (key, value) in &request {
        // OpenAI reads an explicit null as "not given".
        if !value.is_null() {
            parameter(key, value, &mut out, &mut options)?;
        }
    }
    let Some(messages) = request.get("messages").filter(|m| !m.is_null()) else {
        return Err(Rejection::invalid(
            "messages",
            "`messages` is required and must be an array of messages",
        ));
    };
    let conversation = conversation::translate(messages)?;
    if let Some(system) = conversation.system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(conversation.messages));
    let max_tokens = options
        .max_completion_tokens
        .or(options.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(choice) = tool_choice(options.tool_choice.as_ref(), options.parallel_tool_calls)? {
        out.insert("tool_choice".into(), choice);
    }
    if options.stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    Ok(Translated {
        body: Value::Object(out),
        stream: options.stream,
        include_usage: options.include_usage,
    })
}

/// What is read from several parameters before it can be written.
#[derive(Default)]
struct Options {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    stream: bool,
    include_usage: bool,
}

/// One top-level parameter: translated into `out`, noted in `options`, accepted, or refused.
fn parameter(
    key: &str,
    value: &Value,
    out: &mut Map<String, Value>,
    options: &mut Options,
) -> Result<(), Rejection> {
    match key {
        // The routed model is set by the caller; the conversation is translated apart.
        "model" | "messages" => {}
        "max_tokens" => options.max_tokens = Some(positive_integer("max_tokens", value)?),
        "max_completion_tokens" => {
            options.max_completion_tokens = Some(positive_integer("max_completion_tokens", value)?)
        }
        "temperature" => {
            let temperature = number("temperature", value)?;
            if !(0.0..=1.0).contains(&temperature) {
                return Err(Rejection::unsupported(
                    "temperature",
                    format!("Anthropic accepts a temperature from 0 to 1; got {temperature}"),
                ));
            }
            out.insert("temperature".into(), value.clone());
        }
        "top_p" => {
            number("top_p", value)?;
            out.insert("top_p".into(), value.clone());
        }
        // Not OpenAI's, but Anthropic's: clients send it through `extra_body`.
        "top_k" => {
            positive_integer("top_k", value)?;
            out.insert("top_k".into(), value.clone());
        }
        "stop" => {
            out.insert("stop_sequences".into(), stop_sequences(value)?);
        }
        "stream" => options.stream = boolean("stream", value)?,
        "stream_options" => {
            options.include_usage =
                value.get("include_usage").and_then(Value::as_bool) == Some(true)
        }
        "tools" => {
            out.insert("tools".into(), tools(value)?);
        }
        "tool_choice" => options.tool_choice = Some(value.clone()),
        "parallel_tool_calls" => {
            options.parallel_tool_calls = Some(boolean("parallel_tool_calls", value)?)
        }
        "user" => {
            let user = value
                .as_str()
                .ok_or_else(|| Rejection::invalid("user", "`user` must be a string"))?;
            out.insert("metadata".into(), json!({ "user_id": user }));
        }
        _ => accepted_or_refused(key, value)?,
    }
    Ok(())
}

/// Parameters without an Anthropic counterpart: fine at their neutral value, refused otherwise.
fn accepted_or_refused(key: &str, value: &Value) -> Result<(), Rejection> {
    let neutral = match key {
        "n" => value.as_u64() == Some(1),
        "logprobs" => value == &Value::Bool(false),
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        "store" => value == &Value::Bool(false),
        // Labels for OpenAI's stored completions: nothing a model sees.
        "metadata" => true,
        "service_tier" => matches!(value.as_str(), Some("auto" | "default")),
        "modalities" => value
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m == "text")),
        _ => false,
    };
    if neutral {
        return Ok(());
    }
    let (param, why) = match key {
        "n" => ("n", "Anthropic returns one choice per call; send n = 1 and call several times"),
        "logprobs" => ("logprobs", "Anthropic does not return log probabilities"),
        "top_logprobs" => ("top_logprobs", "Anthropic does not return log probabilities"),
        "presence_penalty" => ("presence_penalty", "Anthropic has no presence penalty"),
        "frequency_penalty" => ("frequency_penalty", "Anthropic has no frequency penalty"),
        "logit_bias" => ("logit_bias", "Anthropic has no logit bias"),
        "seed" => ("seed", "Anthropic has no seed: its answers cannot be made reproducible this way"),
        "response_format" => ("response_format", "JSON mode and JSON schemas are not translated; describe the format in the prompt, or use a tool with that schema and tool_choice"),
        "store" => ("store", "OpenAI's stored completions do not exist at Anthropic"),
        "service_tier" => ("service_tier", "only \"auto\" and \"default\" have an Anthropic equivalent"),
        "modalities" => ("modalities", "Anthropic answers with text only"),
        "audio" => ("audio", "Anthropic answers with text only"),
        "prediction" => ("prediction", "Anthropic has no predicted outputs"),
        "reasoning_effort" => ("reasoning_effort", "extended thinking is not translated; call /v1/messages with `thinking` instead"),
        "thinking" => ("thinking", "extended thinking is not translated; call /v1/messages with `thinking` instead"),
        "web_search_options" => ("web_search_options", "web search is not translated; call /v1/messages with Anthropic's web search tool instead"),
        "functions" => ("functions", "the deprecated `functions` parameter is not translated; send `tools`"),
        "function_call" => ("function_call", "the deprecated `function_call` parameter is not translated; send `tool_choice`"),
        "verbosity" => ("verbosity", "Anthropic has no verbosity setting"),
        _ => {
            return Err(Rejection::Unsupported {
                param: None,
                message: format!(
                    "the parameter `{key}` is not one flowgate translates to Anthropic's Messages API"
                ),
            })
        }
    };
    Err(Rejection::unsupported(
        param,
        format!("`{param}` = {value} cannot be sent to Anthropic: {why}"),
    ))
}

fn positive_integer(param: &'static str, value: &Value) -> Result<u64, Rejection> {
    value
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| Rejection::invalid(param, format!("`{param}` must be a positive integer")))
}

fn number(param: &'static str, value: &Value) -> Result<f64, Rejection> {
    value
        .as_f64()
        .filter(|n| *n >= 0.0)
        .ok_or_else(|| Rejection::invalid(param, format!("`{param}` must be a number ≥ 0")))
}

fn boolean(param: &'static str, value: &Value) -> Result<bool, Rejection> {
    value
        .as_bool()
        .ok_or_else(|| Rejection::invalid(param, format!("`{param}` must be true or false")))
}

/// `stop`: a string or an array of strings.
fn stop_sequences(value: &Value) -> Result<Value, Rejection> {
    let invalid = || Rejection::invalid("stop", "`stop` must be a string or an array of strings");
    match value {
        Value::String(_) => Ok(Value::Array(vec![value.clone()])),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(value.clone()),
        _ => Err(invalid()),
    }
}

/// OpenAI's function tools as Anthropic tools: `parameters` becomes `input_schema`.
fn tools(value: &Value) -> Result<Value, Rejection> {
    let items = value
        .as_array()
        .ok_or_else(|| Rejection::invalid("tools", "`tools` must be an array"))?;
    let mut out = Vec::with_capacity(items.len());
    for (index, tool) in items.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str);
        if kind != Some("function") {
            return Err(Rejection::unsupported(
                "tools",
                format!(
                    "tools[{index}] has type {}: only function tools are translated",
                    kind.unwrap_or("(none)")
                ),
            ));
        }
        let function = tool.get("function").ok_or_else(|| {
            Rejection::invalid("tools", format!("tools[{index}] has no `function`"))
        })?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Rejection::invalid("tools", format!("tools[{index}].function has no `name`"))
            })?;
        let schema = function
            .get("parameters")
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let mut translated = Map::new();
        translated.insert("name".into(), Value::String(name.to_owned()));
        if let Some(description) = function.get("description").filter(|d| d.is_string()) {
            translated.insert("description".into(), description.clone());
        }
        translated.insert("input_schema".into(), schema);
        // Prompt caching marks, as some OpenAI-speaking clients send them for Claude.
        if let Some(mark) = tool.get("cache_control") {
            translated.insert("cache_control".into(), mark.clone());
        }
        out.push(Value::Object(translated));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` and `parallel_tool_calls` as Anthropic's one `tool_choice` object.
fn tool_choice(
    choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
) -> Result<Option<Value>, Rejection> {
    let mut translated = match choice {
        None => {
            if parallel_tool_calls != Some(false) {
                return Ok(None);
            }
            json!({"type": "auto"})
        }
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => return Ok(Some(json!({"type": "none"}))),
            "required" => json!({"type": "any"}),
            other => {
                return Err(Rejection::invalid(
                    "tool_choice",
                    format!("`tool_choice` {other:?} is not auto, none or required"),
                ))
            }
        },
        Some(object) => {
            let kind = object.get("type").and_then(Value::as_str);
            let name = object.pointer("/function/name").and_then(Value::as_str);
            match (kind, name) {
                (Some("function"), Some(name)) => json!({"type": "tool", "name": name}),
                _ => {
                    return Err(Rejection::unsupported(
                        "tool_choice",
                        format!("`tool_choice` {object} is not translated: use auto, none, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                    ))
                }
            }
        }
    };
    if parallel_tool_calls == Some(false) {
        translated["disable_parallel_tool_use"] = Value::Bool(true);
    }
    Ok(Some(translated))
}
