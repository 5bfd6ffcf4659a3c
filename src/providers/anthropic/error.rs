//! Anthropic's errors in OpenAI's shape, with the status that makes the official `openai` SDK
//! raise the matching exception (`BadRequestError`, `AuthenticationError`, `RateLimitError`,
//! `InternalServerError`, ...).
//!
//! Anthropic answers `{"type": "error", "error": {"type": "rate_limit_error", "message": ...}}`;
//! the client gets `{"error": {"message", "type", "param", "code"}}`, `code` being Anthropic's
//! error type so nothing is lost.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Envelope {
    error: Detail,
}

#[derive(Deserialize)]
pub struct Detail {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// The status an OpenAI client sees. 529 (Anthropic's "overloaded") is not an HTTP status
/// clients know: it becomes 503, which they retry like OpenAI's own overload.
pub fn status(upstream: StatusCode) -> StatusCode {
    if upstream.as_u16() == 529 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        upstream
    }
}

/// OpenAI's `error.type` for Anthropic's error type.
fn openai_type(kind: &str, status: StatusCode) -> &'static str {
    match kind {
        "invalid_request_error" | "not_found_error" | "request_too_large" => {
            "invalid_request_error"
        }
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "rate_limit_error" => "rate_limit_error",
        "billing_error" => "insufficient_quota",
        "api_error" | "overloaded_error" | "timeout_error" => "server_error",
        _ if status.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

/// The OpenAI `error` object for one Anthropic error.
pub fn openai_error(detail: &Detail, status: StatusCode) -> Value {
    let kind = detail.kind.as_deref();
    let message = detail
        .message
        .clone()
        .unwrap_or_else(|| format!("Anthropic answered {status}"));
    json!({
        "message": message,
        "type": openai_type(kind.unwrap_or(""), status),
        "param": null,
        "code": kind.unwrap_or("upstream_error"),
    })
}

/// Longest piece of an unreadable error body quoted in the message.
const QUOTED_BYTES: usize = 500;

/// An Anthropic error answer (status and body) as the OpenAI client's status and body.
pub fn to_openai(upstream: StatusCode, body: &[u8]) -> (StatusCode, Value) {
    let status = status(upstream);
    let detail = match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope.error,
        Err(_) => {
            // Not Anthropic's JSON (a proxy's HTML page, say): quote what came.
            let text = String::from_utf8_lossy(&body[..body.len().min(QUOTED_BYTES)]);
            let text = text.trim();
            Detail {
                kind: None,
                message: Some(if text.is_empty() {
                    format!("Anthropic answered {upstream} with no error body")
                } else {
                    format!("Anthropic answered {upstream}: {text}")
                }),
            }
        }
    };
    (status, json!({ "error": openai_error(&detail, status) }))
}
