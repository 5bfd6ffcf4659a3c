//! Guardrails read request and answer bodies from anyone: checking them must never panic or
//! hang, a redacted body must stay valid JSON, and a streamed answer must come out exactly as
//! the whole answer redacted, wherever the deltas are cut.
//!
//! Input format: byte 0 = delta size (1 + b % 64), the rest = a body, tried as each endpoint's
//! request and answer; its text (lossy UTF-8) is also streamed through a redacting `StreamGuard`
//! and compared with the non-streamed redaction of the same text.
#![no_main]

use flowgate::config::{Config, Source};
use flowgate::guardrails::{Expectation, Guardrails};
use flowgate::providers::Endpoint;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const ENDPOINTS: [Endpoint; 4] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
];

const CONFIG: &str = r#"
[[guardrails]]
name = "pii"
stage = "both"
action = "redact"
[[guardrails]]
name = "secrets"
stage = "both"
action = "redact"
[[guardrails]]
name = "prompt_injection"
stage = "both"
[[guardrails]]
name = "banned_terms"
terms = ["forbidden", "c++", "Ärger"]
stage = "both"
action = "redact"
[[guardrails]]
name = "ids"
kind = "regex"
patterns = ['ORD-\d{4}', 'x*']
stage = "both"
action = "redact"
[[guardrails]]
name = "max_input_tokens"
max_tokens = 64
[[guardrails]]
name = "json_output"
"#;

fn rails() -> &'static Guardrails {
    static RAILS: std::sync::OnceLock<Guardrails> = std::sync::OnceLock::new();
    RAILS.get_or_init(|| {
        let config = Config::from_toml(CONFIG, Source::BuiltIn).expect("fuzz config parses");
        Guardrails::from_config(&config.guardrails).expect("fuzz guardrails compile")
    })
}

fn check_bodies(rails: &Guardrails, body: &[u8]) {
    let expect = rails.expectation(body);
    let original = serde_json::from_slice::<Value>(body).ok();
    for endpoint in ENDPOINTS {
        let results = [
            rails.check_request(endpoint, body),
            rails.check_response(endpoint, &expect, body),
        ];
        for checked in results.into_iter().flatten() {
            if let (Some(rewritten), Some(_)) = (&checked.rewritten, &original) {
                assert!(
                    serde_json::from_slice::<Value>(rewritten).is_ok(),
                    "a redacted body is not JSON"
                );
            }
        }
    }
}

/// The text streamed in deltas equals the whole text redacted.
fn check_stream(rails: &Guardrails, size: usize, text: &str) {
    let body = serde_json::to_vec(&serde_json::json!({"choices": [{"message": {"content": text}}]}))
        .expect("a string serialises");
    let whole = rails
        .check_response(Endpoint::ChatCompletions, &Expectation::default(), &body)
        .expect("a body made here is readable");
    let expected = match &whole.rewritten {
        Some(rewritten) => serde_json::from_slice::<Value>(rewritten)
            .ok()
            .and_then(|v| v.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_owned))
            .expect("the rewritten answer keeps its content"),
        None => text.to_owned(),
    };
    let mut guard = rails.stream(Expectation::default()).expect("output guardrails exist");
    let mut streamed = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        streamed.push_str(&guard.push(0, &rest[..cut]));
        rest = &rest[cut..];
    }
    streamed.push_str(&guard.finish_choice(0));
    let end = guard.finish();
    assert!(end.blocked.is_none());
    assert_eq!(streamed, expected, "streamed redaction differs (deltas of {size})");
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, body)) = data.split_first() else {
        return;
    };
    let rails = rails();
    check_bodies(rails, body);
    check_stream(rails, 1 + usize::from(size % 64), &String::from_utf8_lossy(body));
});
