//! `json_output`: when the request asked for JSON — chat `response_format` `json_object` /
//! `json_schema`, responses `text.format` — each answer must parse, and match the schema when one
//! was given.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::schema::{self, Violation};

/// What the request asked the answer to be; taken from the request, checked on the answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectation {
    json: Option<JsonAnswer>,
}

#[derive(Debug, Clone, PartialEq)]
enum JsonAnswer {
    Any,
    Schema(Arc<Value>),
}

#[derive(Deserialize)]
struct Formats {
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    text: Option<Value>,
}

impl Expectation {
    /// Reads `response_format` (chat) or `text.format` (responses) from a request body; anything
    /// unreadable means no JSON was asked for.
    pub fn from_request(body: &[u8]) -> Expectation {
        let Ok(formats) = serde_json::from_slice::<Formats>(body) else {
            return Expectation::default();
        };
        let format = formats.response_format.or_else(|| {
            formats
                .text
                .and_then(|mut t| t.get_mut("format").map(Value::take))
        });
        let json = format.and_then(|mut format| {
            match format.get("type").and_then(Value::as_str) {
                Some("json_object") => Some(JsonAnswer::Any),
                Some("json_schema") => {
                    // Chat nests it under `json_schema`; responses puts it beside `type`.
                    let at = if format.pointer("/json_schema/schema").is_some() {
                        "/json_schema/schema"
                    } else {
                        "/schema"
                    };
                    let schema = format.pointer_mut(at).map(Value::take);
                    Some(match schema {
                        Some(schema) => JsonAnswer::Schema(Arc::new(schema)),
                        None => JsonAnswer::Any,
                    })
                }
                _ => None,
            }
        });
        Expectation { json }
    }

    pub fn wants_json(&self) -> bool {
        self.json.is_some()
    }

    /// `None` when the answer is what was asked for; else the match kind and a reason that quotes
    /// nothing of the answer.
    pub(crate) fn check(&self, answer: &str) -> Option<(&'static str, String)> {
        let wanted = self.json.as_ref()?;
        let value: Value = match serde_json::from_str(answer.trim()) {
            Ok(value) => value,
            Err(err) => {
                return Some((
                    "invalid_json",
                    format!("the answer is not valid JSON: {}", err.classify_name()),
                ))
            }
        };
        match wanted {
            JsonAnswer::Any => None,
            JsonAnswer::Schema(schema) => {
                schema::validate(schema, &value)
                    .err()
                    .map(|Violation { path, expected }| {
                        (
                            "schema_mismatch",
                            format!(
                            "the answer does not match the schema at {path}: expected {expected}"
                        ),
                        )
                    })
            }
        }
    }
}

trait Classify {
    fn classify_name(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Eof => "it ends too early",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data | serde_json::error::Category::Io => "unreadable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_of_each_request_shape() {
        let plain = Expectation::from_request(br#"{"messages":[]}"#);
        assert!(!plain.wants_json());
        assert_eq!(plain.check("not json"), None);
        let object = Expectation::from_request(br#"{"response_format":{"type":"json_object"}}"#);
        assert_eq!(object.check(r#" {"a":1} "#), None);
        assert_eq!(object.check(r#"{"a":"#).map(|c| c.0), Some("invalid_json"));
        let chat_schema = br#"{"response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","required":["a"]}}}}"#;
        let responses_schema = br#"{"text":{"format":{"type":"json_schema","name":"p","schema":{"type":"object","required":["a"]}}}}"#;
        for body in [&chat_schema[..], &responses_schema[..]] {
            let expect = Expectation::from_request(body);
            assert_eq!(expect.check(r#"{"a":1}"#), None);
            let (kind, reason) = expect.check(r#"{"b":"secret value"}"#).unwrap();
            assert_eq!(kind, "schema_mismatch");
            assert!(
                reason.contains("\"a\"") && !reason.contains("secret"),
                "{reason}"
            );
        }
        let text_only = Expectation::from_request(br#"{"response_format":{"type":"text"}}"#);
        assert!(!text_only.wants_json());
    }
}
