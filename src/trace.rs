//! The trace: what one call through the gateway was, as stored and as served by the admin API.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One call through the gateway, however it ended (CONTRACT section 5).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Trace {
    /// UUIDv7, hyphenated; time-ordered, so the store keeps traces in arrival order.
    pub id: String,
    /// W3C trace context of the caller, when a `traceparent` header was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentSpan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Unix time in milliseconds when the request head arrived.
    pub started_at_ms: u64,
    /// Unix time in milliseconds when the last byte went to the client (or the call ended).
    pub ended_at_ms: u64,

    pub experiment: String,
    pub run_id: String,
    /// The explicit run name from `x-flowgate-run`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// The `[[models]]` name the client called, when it was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_group: Option<String>,
    /// Every deployment tried for a `[[models]]` call, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// `chat.completions`, `completions`, `embeddings`, `responses`, `models` or `passthrough`.
    pub endpoint: String,
    pub method: String,
    pub path: String,
    pub stream: bool,
    /// Sampling params the client sent (temperature, top_p, max_tokens, seed, ...).
    #[serde(default)]
    pub sampling: BTreeMap<String, serde_json::Value>,

    /// HTTP status the client received.
    pub status: u16,
    /// Set when the call did not end in a complete 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TraceError>,

    pub latency: Latency,
    pub usage: Usage,
    /// USD; `None` when the model has no price (never a made-up 0).
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// A cache hit: what the answer cost when the provider made it (`cost_usd` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_saved_usd: Option<f64>,
    /// `hit`, `miss` or `bypass`.
    pub cache: String,
    #[serde(default)]
    pub guardrails: Vec<GuardrailVerdict>,
    #[serde(default)]
    pub scores: Vec<Score>,

    /// Request body as sent upstream; absent with `capture = "metadata"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<Captured>,
    /// Response body (for streams: the assembled answer); absent with `capture = "metadata"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<Captured>,
}

/// One try of one deployment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub provider: String,
    pub model: String,
    /// What the deployment answered; `None` when it was not reached (or skipped).
    #[serde(default)]
    pub status: Option<u16>,
    /// `upstream_unreachable`, `timeout`, `circuit_open`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Until the answer's head arrived.
    pub ms: f64,
    /// This attempt's answer went to the client.
    pub served: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ParentSpan {
    pub trace_id: String,
    pub span_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TraceError {
    /// Where it came from and what kind: `upstream_http`, `upstream_unreachable`, `upstream_tls`,
    /// `timeout`, `cancelled`, `bad_request`, `not_found`, `body_too_large`, `upstream_stream`, ...
    pub class: String,
    pub message: String,
}

/// Milliseconds, fractional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub total_ms: f64,
    /// From sending upstream to the upstream's last byte; `None` when no upstream call was made.
    #[serde(default)]
    pub upstream_ms: Option<f64>,
    /// Time the gateway itself added: total minus upstream minus reading the client's body.
    pub overhead_ms: f64,
    /// Streams: from request arrival to the first chunk carrying content.
    #[serde(default)]
    pub ttft_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    /// Part of `input_tokens` served from the provider's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: Option<u64>,
    /// Part of `input_tokens` written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), priced at its own rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_input_tokens: Option<u64>,
    /// `provider` when read from the provider's `usage`, `counted` when counted with tiktoken.
    pub source: String,
}

/// `kind`, `stage` and `verdict` come from small fixed sets: borrowed names, not a string allocated
/// for each of them on every verdict of every call (read back from the store, they are owned).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuardrailVerdict {
    pub guardrail: String,
    /// The check (`pii`, `secrets`, ...).
    #[serde(default, skip_serializing_if = "str_is_empty")]
    pub kind: Cow<'static, str>,
    /// `input` or `output`.
    #[serde(default, skip_serializing_if = "str_is_empty")]
    pub stage: Cow<'static, str>,
    /// `pass`, `flagged`, `redacted` or `blocked`.
    pub verdict: Cow<'static, str>,
    #[serde(default)]
    pub matches: BTreeMap<String, u64>,
    pub elapsed_us: u64,
}

fn str_is_empty<S: AsRef<str>>(text: &S) -> bool {
    text.as_ref().is_empty()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub name: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub at_ms: u64,
}

/// A captured body, kept as raw JSON: the bytes the client or provider sent when they were JSON
/// (never parsed into a tree and printed again), else the text as a JSON string. `truncated`
/// past the capture limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Captured {
    pub content: Box<RawValue>,
    #[serde(default)]
    pub truncated: bool,
}

impl PartialEq for Captured {
    fn eq(&self, other: &Captured) -> bool {
        self.content.get() == other.content.get() && self.truncated == other.truncated
    }
}

impl Captured {
    /// The body as JSON when it is JSON within `limit` bytes, else as text cut at `limit`.
    pub fn of_bytes(bytes: &[u8], limit: usize) -> Captured {
        if bytes.len() <= limit {
            if let Ok(content) = serde_json::from_slice::<Box<RawValue>>(bytes) {
                return Captured {
                    content,
                    truncated: false,
                };
            }
        }
        let cut = &bytes[..bytes.len().min(limit)];
        Captured::text(&crate::sse::lossy_utf8(cut), bytes.len() > limit)
    }

    pub fn text(text: &str, truncated: bool) -> Captured {
        let quoted = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned());
        let content = RawValue::from_string(quoted).unwrap_or_else(|_| empty_string());
        Captured { content, truncated }
    }

    pub fn json(value: &serde_json::Value) -> Captured {
        let content = serde_json::value::to_raw_value(value).unwrap_or_else(|_| empty_string());
        Captured {
            content,
            truncated: false,
        }
    }
}

fn empty_string() -> Box<RawValue> {
    // A literal that is valid JSON: building it cannot fail.
    RawValue::from_string("\"\"".to_owned()).unwrap_or_else(|_| unreachable!("\"\" is valid JSON"))
}

/// A short view of a trace for listings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceSummary {
    pub id: String,
    pub started_at_ms: u64,
    pub experiment: String,
    pub run_id: String,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub served_model: Option<String>,
    pub endpoint: String,
    pub stream: bool,
    pub status: u16,
    #[serde(default)]
    pub error_class: Option<String>,
    pub total_ms: f64,
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    pub cache: String,
}

impl Trace {
    pub fn summary(&self) -> TraceSummary {
        TraceSummary {
            id: self.id.clone(),
            started_at_ms: self.started_at_ms,
            experiment: self.experiment.clone(),
            run_id: self.run_id.clone(),
            session: self.session.clone(),
            provider: self.provider.clone(),
            served_model: self.served_model.clone(),
            endpoint: self.endpoint.clone(),
            stream: self.stream,
            status: self.status,
            error_class: self.error.as_ref().map(|e| e.class.clone()),
            total_ms: self.latency.total_ms,
            input_tokens: self.usage.input_tokens,
            output_tokens: self.usage.output_tokens,
            cost_usd: self.cost_usd,
            cache: self.cache.clone(),
        }
    }

    /// A trace counts as an error when the client did not get a complete 2xx answer.
    pub fn is_error(&self) -> bool {
        self.error.is_some() || !(200..300).contains(&self.status)
    }
}
