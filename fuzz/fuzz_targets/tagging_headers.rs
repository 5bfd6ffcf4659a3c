//! The tagging headers come from any client: `RequestContext::from_headers` must never panic,
//! and what it accepts keeps its documented shape.
//!
//! Input format: lines (`\n`). A line's first byte picks the header name (one of the
//! `x-flowgate-*` names, `traceparent`, or, for other values, the bytes up to the first `:` as a
//! free name); the rest is the value. Invalid names or values are skipped.
#![no_main]

use flowgate::context::{
    self, RequestContext, CACHE, EXPERIMENT, PARAMS, PROMPT, PROMPT_VERSION, PROVIDER, RUN,
    SESSION, TAGS,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 10] = [
    EXPERIMENT,
    RUN,
    PROMPT,
    PROMPT_VERSION,
    PARAMS,
    TAGS,
    SESSION,
    CACHE,
    PROVIDER,
    "traceparent",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some((&pick, rest)) = line.split_first() else {
            continue;
        };
        let (name, value) = match NAMES.get(pick as usize % 12) {
            Some(name) => (HeaderName::from_static(name), rest),
            None => {
                let at = rest.iter().position(|b| *b == b':').unwrap_or(rest.len());
                let Ok(name) = HeaderName::from_bytes(&rest[..at]) else {
                    continue;
                };
                (name, rest.get(at + 1..).unwrap_or(&[]))
            }
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        headers.append(name, value);
    }

    if let Ok(ctx) = RequestContext::from_headers(&headers) {
        assert!(!ctx.experiment.is_empty(), "empty experiment");
        for value in [
            &ctx.run_name,
            &ctx.prompt_id,
            &ctx.prompt_version,
            &ctx.session,
            &ctx.provider,
        ]
        .into_iter()
        .flatten()
        {
            assert!(
                value.len() <= 256,
                "over-long value accepted: {}",
                value.len()
            );
        }
        for key in ctx.params.keys().chain(ctx.tags.keys()) {
            assert!(!key.is_empty(), "empty key");
        }
        if let Some(parent) = &ctx.parent {
            let lower_hex = |s: &str, len: usize| {
                s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            };
            assert!(
                lower_hex(&parent.trace_id, 32),
                "trace id {:?}",
                parent.trace_id
            );
            assert!(
                lower_hex(&parent.span_id, 16),
                "span id {:?}",
                parent.span_id
            );
        }
        // Same headers, same context.
        assert_eq!(RequestContext::from_headers(&headers).ok(), Some(ctx));
    }

    context::strip_tagging_headers(&mut headers);
    assert!(
        headers
            .keys()
            .all(|name| !name.as_str().starts_with("x-flowgate-")),
        "a tagging header survived strip_tagging_headers"
    );
});
