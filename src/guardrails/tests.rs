//! The engine as the pipeline uses it: config errors, each endpoint's body rewritten, blocks,
//! and streamed answers cut at every place.

use serde_json::{json, Value};

use super::*;
use crate::config::{Config, Source};

const CARD: &str = "4111 1111 1111 1111";
const KEY: &str = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f";

/// One match of one kind.
fn one(kind: &str) -> Vec<MatchCount> {
    vec![MatchCount {
        kind: kind.into(),
        count: 1,
    }]
}

fn rails(toml: &str) -> Guardrails {
    let config = Config::from_toml(toml, Source::BuiltIn).unwrap();
    Guardrails::from_config(&config.guardrails).unwrap()
}

fn config_error(toml: &str) -> String {
    match Config::from_toml(toml, Source::File("gw.toml".into())) {
        Err(err) => err.to_string(),
        Ok(mut config) => config.validate().unwrap_err().to_string(),
    }
}

#[test]
fn config_errors_name_the_guardrail_and_the_key() {
    let cases = [
        (
            "[[guardrails]]\nname = \"order-ids\"",
            "no check is called \"order-ids\"",
        ),
        (
            "[[guardrails]]\nname = \"ids\"\nkind = \"regex\"\npatterns = ['ORD-(\\d']",
            "(\"ids\"): patterns: pattern \"ORD-(\\\\d\" does not compile",
        ),
        (
            "[[guardrails]]\nname = \"pii\"\n[[guardrails]]\nname = \"pii\"",
            "guardrails[1] (\"pii\"): the name is used twice",
        ),
        (
            "[[guardrails]]\nname = \"json_output\"\nstage = \"both\"",
            "stage must be \"output\"",
        ),
        (
            "[[guardrails]]\nname = \"max_input_tokens\"\nmax_tokens = 5\nstage = \"output\"",
            "stage must be \"input\"",
        ),
        (
            "[[guardrails]]\nname = \"max_input_tokens\"",
            "max_tokens must be set",
        ),
        (
            "[[guardrails]]\nname = \"prompt_injection\"\naction = \"redact\"",
            "action must be \"log\" or \"block\"",
        ),
        (
            "[[guardrails]]\nname = \"prompt_injection\"\nthreshold = -1.0",
            "threshold = -1",
        ),
        (
            "[[guardrails]]\nname = \"pii\"\npatterns = ['x']",
            "patterns does not apply to kind pii (it takes: kinds)",
        ),
        (
            "[[guardrails]]\nname = \"pii\"\nkinds = ['passport']",
            "unknown kind \"passport\"",
        ),
        ("[[guardrails]]\nname = \"banned_terms\"", "give the terms"),
        (
            "[[guardrails]]\nname = \"banned_terms\"\nterms_file = \"/nonexistent/t.txt\"",
            "/nonexistent/t.txt",
        ),
        ("[[guardrails]]\nname = \"regex\"", "needs patterns"),
    ];
    for (toml, needle) in cases {
        let message = config_error(toml);
        assert!(message.contains(needle), "{toml}\n=> {message}");
        assert!(message.contains("gw.toml"), "{message}");
    }
    // Unknown keys and values are the TOML parser's, with the line.
    let message = config_error("[[guardrails]]\nname = \"pii\"\nacton = \"log\"");
    assert!(
        message.contains("acton") && message.contains("line 3"),
        "{message}"
    );
    let message = config_error("[[guardrails]]\nname = \"pii\"\naction = \"drop\"");
    assert!(
        message.contains("log") && message.contains("redact"),
        "{message}"
    );
}

#[test]
fn the_contract_example_loads() {
    let rails = rails(
        "[[guardrails]]\nname = \"pii\"\nstage = \"input\"\naction = \"redact\"\n\
         [[guardrails]]\nname = \"order-ids\"\nkind = \"regex\"\npatterns = ['ORD-\\d{8}']\nstage = \"both\"\naction = \"log\"",
    );
    assert!(rails.checks_input() && rails.checks_output());
    assert!(!Guardrails::default().checks_input());
}

/// Redacts every shape of request the endpoints take; the rest of the body keeps its bytes.
#[test]
fn input_redaction_rewrites_each_endpoint_shape() {
    let rails = rails("[[guardrails]]\nname = \"pii\"\naction = \"redact\"\n[[guardrails]]\nname = \"secrets\"\naction = \"redact\"");
    let cases = [
        (
            Endpoint::ChatCompletions,
            json!({"model": "m", "temperature": 0.70, "messages": [{"role": "user", "content": format!("card {CARD} key {KEY}")}]}),
            "/messages/0/content",
            json!("card [CARD] key [SECRET]"),
        ),
        (
            Endpoint::ChatCompletions,
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "mail me: ann@example.org"}, {"type": "image_url", "image_url": {"url": "https://x/a@b.co"}}]}]}),
            "/messages/0/content/0/text",
            json!("mail me: [EMAIL]"),
        ),
        (
            Endpoint::Completions,
            json!({"prompt": ["ok", format!("ssn 219-09-9999")]}),
            "/prompt/1",
            json!("ssn [SSN]"),
        ),
        (
            Endpoint::Embeddings,
            json!({"input": "host 10.1.2.3"}),
            "/input",
            json!("host [IP]"),
        ),
        (
            Endpoint::Responses,
            json!({"instructions": "call +44 20 7946 0958", "input": [{"role": "user", "content": [{"type": "input_text", "text": format!("{KEY}")}]}]}),
            "/input/0/content/0/text",
            json!("[SECRET]"),
        ),
    ];
    for (endpoint, body, pointer, expected) in cases {
        let raw = serde_json::to_vec(&body).unwrap();
        let checked = rails.check_request(endpoint, &raw).unwrap();
        let rewritten: Value = serde_json::from_slice(checked.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(rewritten.pointer(pointer), Some(&expected), "{body}");
        // Only text changed: blank out the texts of both and compare.
        assert_eq!(blank_strings(&rewritten), blank_strings(&body), "{body}");
        assert!(checked
            .verdicts
            .iter()
            .any(|v| v.verdict == Outcome::Redacted));
        assert!(checked.blocked.is_none());
    }
    // The image URL (not a text part) is left alone.
    let body = br#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":"https://x/a@b.co"}}]}]}"#;
    assert!(rails
        .check_request(Endpoint::ChatCompletions, body)
        .unwrap()
        .rewritten
        .is_none());
}

fn blank_strings(value: &Value) -> Value {
    match value {
        Value::String(_) => json!(""),
        Value::Array(items) => Value::Array(items.iter().map(blank_strings).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), blank_strings(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn untouched_bytes_stay_byte_for_byte() {
    let rails = rails("[[guardrails]]\nname = \"pii\"\naction = \"redact\"");
    let body = "{ \"n\": 1.50e0, \"big\": 123456789012345678901234567890,\n  \"messages\": [ {\"content\": \"a@b.example \\u00e9\"} ] }";
    let checked = rails
        .check_request(Endpoint::ChatCompletions, body.as_bytes())
        .unwrap();
    let rewritten = String::from_utf8(checked.rewritten.unwrap().to_vec()).unwrap();
    assert_eq!(rewritten, "{ \"n\": 1.50e0, \"big\": 123456789012345678901234567890,\n  \"messages\": [ {\"content\": \"[EMAIL] é\"} ] }");
}

#[test]
fn output_redaction_of_each_answer_shape() {
    let rails =
        rails("[[guardrails]]\nname = \"secrets\"\nstage = \"output\"\naction = \"redact\"");
    let cases = [
        (
            Endpoint::ChatCompletions,
            json!({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("use {KEY}")}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}),
            "/choices/0/message/content",
        ),
        (
            Endpoint::Completions,
            json!({"choices": [{"index": 0, "text": format!("use {KEY}")}]}),
            "/choices/0/text",
        ),
        (
            Endpoint::Responses,
            json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": format!("use {KEY}"), "annotations": []}]}]}),
            "/output/0/content/0/text",
        ),
    ];
    for (endpoint, body, pointer) in cases {
        let raw = serde_json::to_vec(&body).unwrap();
        let checked = rails
            .check_response(endpoint, &Expectation::default(), &raw)
            .unwrap();
        let rewritten: Value = serde_json::from_slice(checked.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(
            rewritten.pointer(pointer),
            Some(&json!("use [SECRET]")),
            "{body}"
        );
        assert_eq!(checked.verdicts[0].stage, Stage::Output);
        assert_eq!(checked.verdicts[0].matches, one("openai"));
    }
    // Input-only guardrails do not look at answers, and the reverse.
    let body = serde_json::to_vec(&json!({"messages": [{"content": KEY}]})).unwrap();
    assert!(rails
        .check_request(Endpoint::ChatCompletions, &body)
        .unwrap()
        .verdicts
        .is_empty());
}

#[test]
fn blocks_name_the_guardrail_and_never_the_text() {
    let rails = rails("[[guardrails]]\nname = \"no-keys\"\nkind = \"secrets\"\naction = \"block\"\n[[guardrails]]\nname = \"pii\"\naction = \"redact\"");
    let body =
        serde_json::to_vec(&json!({"messages": [{"content": format!("{KEY} and a@b.example")}]}))
            .unwrap();
    let checked = rails
        .check_request(Endpoint::ChatCompletions, &body)
        .unwrap();
    let blocked = checked.blocked.as_ref().unwrap();
    assert_eq!(blocked.guardrail, "no-keys");
    let error = blocked.to_api_error();
    assert_eq!(error.status, http::StatusCode::BAD_REQUEST);
    assert_eq!(error.code, "guardrail_blocked");
    assert!(
        error.message.contains("\"no-keys\"") && error.message.contains("openai ×1"),
        "{}",
        error.message
    );
    // Blocked: nothing is rewritten, and the other guardrails still have their verdicts.
    assert!(checked.rewritten.is_none());
    let outcomes: Vec<Outcome> = checked.verdicts.iter().map(|v| v.verdict).collect();
    assert_eq!(outcomes, vec![Outcome::Blocked, Outcome::Redacted]);
    let shown = format!(
        "{checked:?} {} {}",
        serde_json::to_string(&checked.verdicts).unwrap(),
        error.body()
    );
    assert!(
        !shown.contains(KEY) && !shown.contains("a@b.example"),
        "{shown}"
    );
}

#[test]
fn verdicts_serialize_for_the_trace() {
    let rails = rails("[[guardrails]]\nname = \"pii\"");
    let body = br#"{"messages":[{"content":"a@b.example, c@d.example"}]}"#;
    let verdict = rails
        .check_request(Endpoint::ChatCompletions, body)
        .unwrap()
        .verdicts
        .remove(0);
    let value = serde_json::to_value(&verdict).unwrap();
    assert_eq!(value["name"], "pii");
    assert_eq!(value["kind"], "pii");
    assert_eq!(value["stage"], "input");
    assert_eq!(value["verdict"], "flagged");
    assert_eq!(value["matches"], json!([{"kind": "email", "count": 2}]));
    assert!(value["elapsed_us"].is_u64());
    let trace = verdict.to_trace();
    assert_eq!(trace.matches.get("email"), Some(&2));
}

#[test]
fn smuggled_text_is_refused() {
    let rails = rails("[[guardrails]]\nname = \"secrets\"\naction = \"block\"");
    let body = format!(r#"{{"messages":[{{"content":"hi","content":"{KEY}"}}]}}"#);
    let err = rails
        .check_request(Endpoint::ChatCompletions, body.as_bytes())
        .unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
}

#[test]
fn token_budget_blocks_long_prompts() {
    let rails =
        rails("[[guardrails]]\nname = \"max_input_tokens\"\nmax_tokens = 50\naction = \"block\"");
    let short = br#"{"messages":[{"content":"a short question"}]}"#;
    assert!(rails
        .check_request(Endpoint::ChatCompletions, short)
        .unwrap()
        .blocked
        .is_none());
    let long =
        serde_json::to_vec(&json!({"messages": [{"content": "word ".repeat(200)}]})).unwrap();
    let checked = rails
        .check_request(Endpoint::ChatCompletions, &long)
        .unwrap();
    let blocked = checked.blocked.unwrap();
    assert!(
        blocked.reason.contains("over the budget of 50"),
        "{}",
        blocked.reason
    );
    assert_eq!(checked.verdicts[0].matches[0].kind, "tokens");
}

#[test]
fn json_answers_are_checked_against_what_was_asked() {
    let rails = rails("[[guardrails]]\nname = \"json_output\"\naction = \"block\"");
    let request = br#"{"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","required":["a"]}}}}"#;
    let expect = rails.expectation(request);
    let answer = |content: &str| {
        serde_json::to_vec(&json!({"choices": [{"message": {"content": content}}]})).unwrap()
    };
    let ok = rails
        .check_response(Endpoint::ChatCompletions, &expect, &answer(r#"{"a": 1}"#))
        .unwrap();
    assert_eq!(ok.verdicts[0].verdict, Outcome::Pass);
    let bad = rails
        .check_response(Endpoint::ChatCompletions, &expect, &answer(r#"{"b": 1}"#))
        .unwrap();
    assert!(bad
        .blocked
        .unwrap()
        .reason
        .contains("required property \"a\""));
    let broken = rails
        .check_response(Endpoint::ChatCompletions, &expect, &answer("{oops"))
        .unwrap();
    assert_eq!(broken.verdicts[0].matches[0].kind, "invalid_json");
    // No JSON asked for: nothing to check.
    let free = rails
        .check_response(
            Endpoint::ChatCompletions,
            &Expectation::default(),
            &answer("prose"),
        )
        .unwrap();
    assert_eq!(free.verdicts[0].verdict, Outcome::Pass);
}

// ---------------------------------------------------------------------------------------------
// Streams

/// Feeds `text` in deltas of `size` bytes (at char boundaries); returns what was released.
fn feed(guard: &mut StreamGuard, text: &str, size: usize) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        out.push_str(&guard.push(0, &rest[..cut]));
        rest = &rest[cut..];
    }
    out.push_str(&guard.finish_choice(0));
    out
}

fn answer_text(filler: usize) -> String {
    format!(
        "{}Here is the key {KEY} and the card {CARD}, mail ann@example.org. {}é done",
        "lorem ipsum dolor ".repeat(filler),
        "sit amet ".repeat(filler)
    )
}

#[test]
fn a_secret_split_across_deltas_is_logged() {
    let rails = rails("[[guardrails]]\nname = \"secrets\"\nstage = \"output\"");
    let mut guard = rails.stream(Expectation::default()).unwrap();
    assert!(!guard.holds_back());
    let (a, b) = KEY.split_at(10);
    assert_eq!(
        guard.push(0, &format!("the key is {a}")),
        format!("the key is {a}")
    );
    assert_eq!(
        guard.push(0, &format!("{b}, keep it")),
        format!("{b}, keep it")
    );
    let end = guard.finish();
    assert_eq!(end.verdicts[0].verdict, Outcome::Flagged);
    assert_eq!(end.verdicts[0].matches, one("openai"));
    assert!(end.flushed.is_empty());
}

/// Whatever the delta size, the streamed output equals the whole answer redacted, and the
/// matches are counted once.
#[test]
fn streamed_redaction_equals_whole_redaction_at_every_cut() {
    let rails = rails("[[guardrails]]\nname = \"pii\"\nstage = \"output\"\naction = \"redact\"\n[[guardrails]]\nname = \"secrets\"\nstage = \"output\"\naction = \"redact\"");
    for filler in [0, 5, 40, 120] {
        let text = answer_text(filler);
        let body =
            serde_json::to_vec(&json!({"choices": [{"message": {"content": text}}]})).unwrap();
        let whole = rails
            .check_response(Endpoint::ChatCompletions, &Expectation::default(), &body)
            .unwrap();
        let whole: Value = serde_json::from_slice(&whole.rewritten.unwrap()).unwrap();
        let expected = whole
            .pointer("/choices/0/message/content")
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        for size in [1, 2, 3, 7, 16, 100, 700, 5000] {
            let mut guard = rails.stream(Expectation::default()).unwrap();
            assert!(guard.holds_back());
            let streamed = feed(&mut guard, &text, size);
            assert_eq!(streamed, expected, "filler {filler}, deltas of {size}");
            let end = guard.finish();
            let counts: Vec<u64> = end
                .verdicts
                .iter()
                .flat_map(|v| v.matches.iter().map(|m| m.count))
                .collect();
            assert_eq!(counts, vec![1, 1, 1], "filler {filler}, deltas of {size}");
        }
    }
}

#[test]
fn a_streamed_block_releases_nothing_of_the_match() {
    let rails = rails("[[guardrails]]\nname = \"secrets\"\nstage = \"output\"\naction = \"block\"");
    let mut guard = rails.stream(Expectation::default()).unwrap();
    let text = format!(
        "{}{KEY} and more {}",
        "intro ".repeat(200),
        "outro ".repeat(200)
    );
    let mut sent = String::new();
    for piece in text.as_bytes().chunks(5) {
        sent.push_str(&guard.push(0, std::str::from_utf8(piece).unwrap()));
        if guard.blocked().is_some() {
            break;
        }
    }
    assert!(guard.blocked().is_some());
    assert!(!sent.contains(&KEY[..8]), "the start of the key went out");
    assert!(sent.starts_with("intro intro"));
    assert_eq!(guard.finish().verdicts[0].verdict, Outcome::Blocked);
}

#[test]
fn a_key_block_longer_than_the_window_is_dropped_as_it_arrives() {
    let rails =
        rails("[[guardrails]]\nname = \"secrets\"\nstage = \"output\"\naction = \"redact\"");
    let mut guard = rails.stream(Expectation::default()).unwrap();
    let body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n".repeat(MAX_HELD_BYTES / 32 + 40);
    let text =
        format!("key: -----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\nthat was it");
    let streamed = feed(&mut guard, &text, 64);
    assert_eq!(streamed, "key: [SECRET]\nthat was it");
    let text = format!(
        "token eyJhbGciOiJIUzI1NiJ9.eyJ{}.sig then words",
        "A".repeat(MAX_HELD_BYTES + 100)
    );
    let mut guard = rails.stream(Expectation::default()).unwrap();
    assert_eq!(feed(&mut guard, &text, 50), "token [SECRET] then words");
}

#[test]
fn choices_are_scanned_apart_and_json_is_checked_at_the_end() {
    let rails = rails("[[guardrails]]\nname = \"pii\"\nstage = \"output\"\naction = \"redact\"\n[[guardrails]]\nname = \"json_output\"");
    let expect = rails.expectation(br#"{"response_format":{"type":"json_object"}}"#);
    let mut guard = rails.stream(expect).unwrap();
    // "a@b." in choice 0 and "example" in choice 1 must not join into an address.
    let mut sent = [guard.push(0, "{\"m\": \"a@b."), guard.push(1, "example\"}")];
    sent[0].push_str(&guard.push(0, "example\"}"));
    sent[0].push_str(&guard.finish_choice(0));
    let end = guard.finish();
    assert_eq!(sent[0], "{\"m\": \"[EMAIL]\"}");
    assert_eq!(end.flushed, vec![(1, "example\"}".to_owned())]);
    let json = end
        .verdicts
        .iter()
        .find(|v| v.kind == CheckKind::JsonOutput)
        .unwrap();
    assert_eq!(json.verdict, Outcome::Flagged);
    assert_eq!(json.matches, one("invalid_json"));
    assert!(!format!("{end:?}").contains("a@b"));
}

#[test]
fn stream_events_are_read_and_rewritten_in_place() {
    let data = br#"{"id":"c1","choices":[{"index":0,"delta":{"content":"mail a@b.example"},"finish_reason":null}],"created":1}"#;
    let deltas = stream_deltas(Endpoint::ChatCompletions, data).unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(
        (deltas[0].choice, deltas[0].text.as_str()),
        (0, "mail a@b.example")
    );
    assert!(!format!("{deltas:?}").contains("a@b"));
    let rewritten = replace_deltas(data, &[(&deltas[0], "mail [EMAIL]")]);
    assert_eq!(&rewritten[..], &br#"{"id":"c1","choices":[{"index":0,"delta":{"content":"mail [EMAIL]"},"finish_reason":null}],"created":1}"#[..]);
}
