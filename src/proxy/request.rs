//! What the proxy reads from a request body, and the few rewrites it makes.
//!
//! Only the fields routing and run identity need are deserialised; the messages are skipped
//! without being allocated. The body goes upstream byte for byte unless the model name or
//! `stream_options` must change.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Default, Deserialize)]
pub struct RequestFields<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `Some(Null)` when the key is present with `null`: splicing a second key in would make
    /// a duplicate, so presence matters, not just a value.
    #[serde(default, deserialize_with = "present")]
    pub stream_options: Option<Value>,
    #[serde(default)]
    temperature: Option<Value>,
    #[serde(default)]
    top_p: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
    #[serde(default)]
    seed: Option<Value>,
    #[serde(default)]
    frequency_penalty: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<Value>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<Value>,
    #[serde(default)]
    response_format: Option<TypeOnly>,
    #[serde(default)]
    dimensions: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct TypeOnly {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Keeps a present `null` as `Some(Value::Null)` (a plain `Option` would read it as absent).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl<'a> RequestFields<'a> {
    pub fn parse(body: &'a [u8]) -> Result<RequestFields<'a>, ApiError> {
        // Checked up front: skipped members are not validated by serde, and a body must not be
        // accepted or refused depending on whether routing rewrites it (found by fuzzing).
        if std::str::from_utf8(body).is_err() {
            return Err(ApiError::invalid_request(
                "invalid_json",
                "the request body is not valid UTF-8",
            ));
        }
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid_request(
                "invalid_json",
                "the JSON body must be an object",
            ));
        }
        serde_json::from_slice(body).map_err(|err| {
            ApiError::invalid_request(
                "invalid_json",
                format!("We could not parse the JSON body of your request: {err}"),
            )
        })
    }

    pub fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    pub fn client_asked_for_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true)
    }

    /// The sampling params that are part of a run's identity (CONTRACT section 6), as sent.
    pub fn sampling(&self) -> BTreeMap<String, Value> {
        let numeric = [
            ("temperature", &self.temperature),
            ("top_p", &self.top_p),
            ("max_tokens", &self.max_tokens),
            ("max_completion_tokens", &self.max_completion_tokens),
            ("max_output_tokens", &self.max_output_tokens),
            ("seed", &self.seed),
            ("frequency_penalty", &self.frequency_penalty),
            ("presence_penalty", &self.presence_penalty),
            ("n", &self.n),
            ("reasoning_effort", &self.reasoning_effort),
            ("dimensions", &self.dimensions),
        ];
        let mut map: BTreeMap<String, Value> = numeric
            .into_iter()
            .filter_map(|(name, value)| {
                value
                    .as_ref()
                    .filter(|v| !v.is_null())
                    .map(|v| (name.to_owned(), v.clone()))
            })
            .collect();
        if let Some(kind) = self.response_format.as_ref().and_then(|f| f.kind.clone()) {
            map.insert("response_format".into(), Value::String(kind));
        }
        map
    }
}

/// Rewrites the body for the upstream: the model name the provider knows, and a request for
/// usage on streams. Returns the body unchanged (same `Bytes`) when neither is needed. Every
/// other member keeps its exact bytes (numbers too: they are never parsed and printed again).
pub fn rewrite(
    body: &Bytes,
    new_model: Option<&str>,
    ask_usage: bool,
    has_stream_options: bool,
) -> Result<Bytes, ApiError> {
    if new_model.is_none() && !ask_usage {
        return Ok(body.clone());
    }
    if new_model.is_none() && !has_stream_options {
        if let Some(spliced) = splice_usage_request(body) {
            return Ok(spliced);
        }
    }
    let invalid = |err: serde_json::Error| {
        ApiError::invalid_request("invalid_json", format!("invalid JSON body: {err}"))
    };
    let members: Members = serde_json::from_slice(body).map_err(invalid)?;
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let mut wrote_options = false;
    for (key, raw) in members
        .0
        .iter()
        .filter(|(key, _)| key != "model" || new_model.is_none())
    {
        let value = if key == "stream_options" && ask_usage {
            if wrote_options {
                continue;
            }
            wrote_options = true;
            usage_options(raw.get())
        } else {
            raw.get().to_owned()
        };
        push_member(&mut out, key, &value);
    }
    if let Some(model) = new_model {
        push_member(
            &mut out,
            "model",
            &serde_json::to_string(model).map_err(invalid)?,
        );
    }
    if ask_usage && !wrote_options {
        push_member(&mut out, "stream_options", r#"{"include_usage":true}"#);
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

fn push_member(out: &mut Vec<u8>, key: &str, value: &str) {
    if out.len() > 1 {
        out.push(b',');
    }
    // A key came from a JSON string: printing it as one again cannot fail.
    out.extend_from_slice(serde_json::to_string(key).unwrap_or_default().as_bytes());
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
}

/// The client's `stream_options` with `include_usage` set (an object is kept, anything else is
/// replaced).
fn usage_options(raw: &str) -> String {
    let mut options = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    Value::Object(options).to_string()
}

/// A JSON object's members in order, each value as its raw bytes.
struct Members(Vec<(String, Box<serde_json::value::RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) =
                    map.next_entry::<String, Box<serde_json::value::RawValue>>()?
                {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Inserts `"stream_options":{"include_usage":true},` after the opening brace, leaving every
/// other byte as the client sent it. Only used when the body has no `stream_options` and has a
/// first member (it does: `stream` is set).
fn splice_usage_request(body: &Bytes) -> Option<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let brace = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let first_member = body[brace + 1..].iter().find(|b| !b.is_ascii_whitespace());
    // An empty object would end up with a trailing comma: leave it to the general path.
    if body[brace] != b'{' || first_member == Some(&b'}') {
        return None;
    }
    let mut out = BytesMut::with_capacity(body.len() + MEMBER.len());
    out.put_slice(&body[..=brace]);
    out.put_slice(MEMBER);
    out.put_slice(&body[brace + 1..]);
    Some(out.freeze())
}

/// `application/json` (any parameters, `+json` suffixes); absent is accepted too.
pub fn is_json_content_type(value: Option<&http::HeaderValue>) -> bool {
    let Some(value) = value else { return true };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_routing_fields_and_sampling() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,
            "temperature":0.2,"seed":7,"response_format":{"type":"json_object"},"top_p":null}"#;
        let fields = RequestFields::parse(body).unwrap();
        assert_eq!(fields.model.as_deref(), Some("gpt-4o"));
        assert!(fields.stream());
        assert!(!fields.client_asked_for_usage());
        let sampling = fields.sampling();
        assert_eq!(
            sampling.keys().collect::<Vec<_>>(),
            ["response_format", "seed", "temperature"]
        );
        assert_eq!(sampling["response_format"], "json_object");
    }

    #[test]
    fn bad_json_is_a_400() {
        for body in [
            &b"[\"gpt-4o\", true]"[..],
            b"{\"model\":\"m\",\"x\":\"\xff\"}",
        ] {
            assert_eq!(RequestFields::parse(body).unwrap_err().code, "invalid_json");
        }
        let err = RequestFields::parse(b"{\"model\": ").unwrap_err();
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        assert_eq!(err.code, "invalid_json");
    }

    #[test]
    fn rewrite_cases() {
        let body = Bytes::from_static(br#"{"model":"mock/x","stream":true}"#);
        assert_eq!(rewrite(&body, None, false, false).unwrap(), body);
        let spliced = rewrite(&body, None, true, false).unwrap();
        assert_eq!(
            &spliced[..],
            br#"{"stream_options":{"include_usage":true},"model":"mock/x","stream":true}"#
        );
        let renamed: Value =
            serde_json::from_slice(&rewrite(&body, Some("x"), true, false).unwrap()).unwrap();
        assert_eq!(renamed["model"], "x");
        assert_eq!(renamed["stream_options"]["include_usage"], true);
        let with_options = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let fixed: Value =
            serde_json::from_slice(&rewrite(&with_options, None, true, true).unwrap()).unwrap();
        assert_eq!(fixed["stream_options"]["include_usage"], true);
        // A present null must not get a second `stream_options` key spliced in.
        let null_options = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let fields = RequestFields::parse(null_options).unwrap();
        assert!(fields.stream_options.is_some());
        let body = Bytes::from_static(null_options);
        let fixed = rewrite(&body, None, true, fields.stream_options.is_some()).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&fixed)
                .matches("stream_options")
                .count(),
            1
        );
        let fixed: Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(fixed["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rewrites_keep_every_other_byte() {
        // Numbers beyond f64/u64 and formatting choices survive a model rename untouched.
        let body = Bytes::from_static(
            br#"{"model":"p/m","n":222200360318787978797,"t":0.10,"x":1e400,"messages":[]}"#,
        );
        let renamed = rewrite(&body, Some("m"), false, false).unwrap();
        let text = String::from_utf8_lossy(&renamed);
        for kept in [
            r#""n":222200360318787978797"#,
            r#""t":0.10"#,
            r#""x":1e400"#,
            r#""model":"m""#,
        ] {
            assert!(text.contains(kept), "{kept} in {text}");
        }
        assert_eq!(text.matches("model").count(), 1, "{text}");
        // An empty object gets a valid body.
        let empty = rewrite(&Bytes::from_static(b" { \n}"), None, true, false).unwrap();
        let json: Value = serde_json::from_slice(&empty).unwrap();
        assert_eq!(json["stream_options"]["include_usage"], true);
        assert!(rewrite(&Bytes::from_static(b"[1]"), Some("m"), false, false).is_err());
    }

    #[test]
    fn content_types() {
        let ok = [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.x+json",
        ];
        for value in ok {
            assert!(
                is_json_content_type(Some(&http::HeaderValue::from_static(value))),
                "{value}"
            );
        }
        for value in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            assert!(
                !is_json_content_type(Some(&http::HeaderValue::from_static(value))),
                "{value}"
            );
        }
        assert!(is_json_content_type(None));
    }
}
