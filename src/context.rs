//! Tagging headers → [`RequestContext`]: which experiment, run, prompt and params a call belongs to.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName};

use crate::error::ApiError;
use crate::trace::ParentSpan;

// Header names built at compile time: `HeaderMap::get` with a `&str` parses and validates the
// name on every lookup, ten times a call.
pub const EXPERIMENT: HeaderName = HeaderName::from_static("x-flowgate-experiment");
pub const RUN: HeaderName = HeaderName::from_static("x-flowgate-run");
pub const PROMPT: HeaderName = HeaderName::from_static("x-flowgate-prompt");
pub const PROMPT_VERSION: HeaderName = HeaderName::from_static("x-flowgate-prompt-version");
pub const PARAMS: HeaderName = HeaderName::from_static("x-flowgate-params");
pub const TAGS: HeaderName = HeaderName::from_static("x-flowgate-tags");
pub const SESSION: HeaderName = HeaderName::from_static("x-flowgate-session");
pub const CACHE: HeaderName = HeaderName::from_static("x-flowgate-cache");
/// Picks the provider for pass-through paths whose body names no model.
pub const PROVIDER: HeaderName = HeaderName::from_static("x-flowgate-provider");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

pub const DEFAULT_EXPERIMENT: &str = "default";
const MAX_VALUE_LEN: usize = 256;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestContext {
    pub experiment: String,
    pub run_name: Option<String>,
    pub prompt_id: Option<String>,
    pub prompt_version: Option<String>,
    pub params: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub session: Option<String>,
    pub parent: Option<ParentSpan>,
    pub provider: Option<String>,
    pub cache: crate::cache::Directive,
}

impl RequestContext {
    pub fn from_headers(headers: &HeaderMap) -> Result<RequestContext, ApiError> {
        let experiment = header(headers, &EXPERIMENT)?
            .unwrap_or(DEFAULT_EXPERIMENT)
            .to_owned();
        let (prompt_id, version_in_id) = match header(headers, &PROMPT)? {
            Some(prompt) => match prompt.split_once('@') {
                Some((id, version)) => (Some(id.to_owned()), non_empty(version)),
                None => (Some(prompt.to_owned()), None),
            },
            None => (None, None),
        };
        let prompt_version = version_in_id.or(header(headers, &PROMPT_VERSION)?.map(str::to_owned));
        Ok(RequestContext {
            experiment,
            run_name: header(headers, &RUN)?.map(str::to_owned),
            prompt_id,
            prompt_version,
            params: pairs(headers, &PARAMS)?,
            tags: pairs(headers, &TAGS)?,
            session: header(headers, &SESSION)?.map(str::to_owned),
            parent: header(headers, &TRACEPARENT)
                .ok()
                .flatten()
                .and_then(parse_traceparent),
            provider: header(headers, &PROVIDER)?.map(str::to_owned),
            cache: cache_directive(headers)?,
        })
    }
}

fn cache_directive(headers: &HeaderMap) -> Result<crate::cache::Directive, ApiError> {
    let Some(value) = header(headers, &CACHE)? else {
        return Ok(crate::cache::Directive::Auto);
    };
    crate::cache::Directive::parse(value).ok_or_else(|| {
        ApiError::invalid_request(
            "invalid_header",
            format!("header {CACHE} must be auto, bypass or refresh, not {value:?}"),
        )
    })
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// A tagging header's trimmed value; empty counts as absent.
fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| {
            ApiError::invalid_request(
                "invalid_header",
                format!("header {name} must be visible ASCII"),
            )
        })?
        .trim();
    if value.len() > MAX_VALUE_LEN && *name != PARAMS && *name != TAGS {
        return Err(ApiError::invalid_request(
            "invalid_header",
            format!("header {name} is longer than {MAX_VALUE_LEN} characters"),
        ));
    }
    Ok((!value.is_empty()).then_some(value))
}

/// `k=v,k2=v2` → map. A pair without `=` is an error rather than a silently lost param.
fn pairs(headers: &HeaderMap, name: &HeaderName) -> Result<BTreeMap<String, String>, ApiError> {
    let mut map = BTreeMap::new();
    let Some(value) = header(headers, name)? else {
        return Ok(map);
    };
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = pair.split_once('=').ok_or_else(|| {
            ApiError::invalid_request(
                "invalid_header",
                format!("header {name}: {pair:?} is not key=value"),
            )
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ApiError::invalid_request(
                "invalid_header",
                format!("header {name}: empty key in {pair:?}"),
            ));
        }
        map.insert(key.to_owned(), val.trim().to_owned());
    }
    Ok(map)
}

/// W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`. Invalid ones are
/// ignored, as the spec asks, rather than failing the call.
fn parse_traceparent(value: &str) -> Option<ParentSpan> {
    let mut parts = value.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(span_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && span_id.bytes().any(|b| b != b'0');
    valid.then(|| ParentSpan {
        trace_id: trace_id.to_ascii_lowercase(),
        span_id: span_id.to_ascii_lowercase(),
    })
}

/// Removes every `x-flowgate-*` header: they are for the gateway, never for the provider.
pub fn strip_tagging_headers(headers: &mut HeaderMap) {
    let ours: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-flowgate-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(k.clone(), v.parse().unwrap());
        }
        map
    }

    #[test]
    fn defaults_without_headers() {
        let ctx = RequestContext::from_headers(&HeaderMap::new()).unwrap();
        assert_eq!(ctx.experiment, "default");
        assert_eq!(ctx.prompt_id, None);
        assert!(ctx.params.is_empty());
    }

    #[test]
    fn prompt_forms() {
        type Case<'a> = (
            &'a [(HeaderName, &'a str)],
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: [Case; 4] = [
            (&[(PROMPT, "summarise@v3")], Some("summarise"), Some("v3")),
            (
                &[(PROMPT, "summarise"), (PROMPT_VERSION, "v2")],
                Some("summarise"),
                Some("v2"),
            ),
            (
                &[(PROMPT, "summarise@v3"), (PROMPT_VERSION, "v2")],
                Some("summarise"),
                Some("v3"),
            ),
            (&[(PROMPT_VERSION, "v1")], None, Some("v1")),
        ];
        for (input, id, version) in cases {
            let ctx = RequestContext::from_headers(&headers(input)).unwrap();
            assert_eq!(ctx.prompt_id.as_deref(), id, "{input:?}");
            assert_eq!(ctx.prompt_version.as_deref(), version, "{input:?}");
        }
    }

    #[test]
    fn params_and_tags() {
        let ctx = RequestContext::from_headers(&headers(&[
            (PARAMS, "k=5, reranker=bge"),
            (TAGS, "dataset=v1.2,task=qa"),
            (EXPERIMENT, "rag"),
            (SESSION, "s-1"),
        ]))
        .unwrap();
        assert_eq!(ctx.params.get("k").map(String::as_str), Some("5"));
        assert_eq!(ctx.params.get("reranker").map(String::as_str), Some("bge"));
        assert_eq!(ctx.tags.len(), 2);
        assert_eq!(ctx.experiment, "rag");
        assert_eq!(ctx.session.as_deref(), Some("s-1"));
        let err = RequestContext::from_headers(&headers(&[(PARAMS, "k5")])).unwrap_err();
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        assert!(err.message.contains("k5"));
    }

    #[test]
    fn traceparent_parsing() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = parse_traceparent(valid).unwrap();
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.span_id, "00f067aa0ba902b7");
        for bad in [
            "",
            "00-abc-def-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn strips_only_our_headers() {
        let mut map = headers(&[
            (EXPERIMENT, "e"),
            (CACHE, "bypass"),
            (http::header::AUTHORIZATION, "Bearer k"),
        ]);
        strip_tagging_headers(&mut map);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("authorization"));
    }
}
