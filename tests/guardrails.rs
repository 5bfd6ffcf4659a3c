//! Guardrails in the pipeline as a client and an auditor see them: blocks, redactions, verdicts
//! in the trace, and secrets that never reach the store.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

const OPENAI_KEY: &str = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f";

fn guardrail(name: &str, stage: &str, action: &str) -> String {
    format!("[[guardrails]]\nname = \"{name}\"\nstage = \"{stage}\"\naction = \"{action}\"\n")
}

fn say(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "temperature": 0.5, "messages": [{"role": "user", "content": text}]})
}

async fn stored(gateway: &TestGateway, reply: &HttpReply) -> Value {
    gateway.trace(reply.header("x-flowgate-trace-id")).await
}

fn verdict<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["guardrails"]
        .as_array()
        .and_then(|all| all.iter().find(|v| v["guardrail"] == name))
        .unwrap_or_else(|| panic!("no verdict of {name}: {trace}"))
}

#[tokio::test]
async fn an_input_block_makes_no_upstream_call_and_costs_nothing() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("ok", 5, 5))).await;
    let gateway = TestGateway::start(
        &upstream.base_url(),
        "",
        &guardrail("secrets", "input", "block"),
    )
    .await;
    let reply = gateway
        .chat(
            &[],
            say(&format!("please use my key {OPENAI_KEY} for this")),
        )
        .await;
    reply.assert_error(400, "guardrail_blocked");
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"secrets\""));
    assert!(!reply.text().contains(OPENAI_KEY));
    assert_eq!(
        upstream.requests().len(),
        0,
        "no upstream call for an input block"
    );
    let trace = stored(&gateway, &reply).await;
    assert_eq!(verdict(&trace, "secrets")["verdict"], "blocked");
    assert_eq!(verdict(&trace, "secrets")["matches"]["openai"], 1);
    assert!(trace["cost_usd"].is_null(), "{trace}");
    assert!(
        !trace.to_string().contains(OPENAI_KEY),
        "the secret reached the store: {trace}"
    );
    // A clean request passes, with a `pass` verdict.
    let clean = gateway
        .chat(&[], say("what is the capital of France?"))
        .await;
    assert_eq!(clean.status, StatusCode::OK);
    assert_eq!(
        verdict(&stored(&gateway, &clean).await, "secrets")["verdict"],
        "pass"
    );
}

#[tokio::test]
async fn an_input_redaction_reaches_the_upstream_and_the_store_as_placeholders() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("noted", 5, 5))).await;
    let gateway = TestGateway::start(
        &upstream.base_url(),
        "",
        &guardrail("pii", "input", "redact"),
    )
    .await;
    let reply = gateway
        .chat(
            &[],
            say("mail jane.doe@example.com or call +44 20 7946 0958"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let sent = upstream.last().json();
    let content = sent["messages"][0]["content"].as_str().unwrap();
    assert!(
        content.contains("[EMAIL]") && content.contains("[PHONE]"),
        "{content}"
    );
    assert!(!content.contains("jane.doe"), "{content}");
    assert_eq!(
        sent["model"], "gpt-4o-mini",
        "nothing else of the body changes"
    );
    let trace = stored(&gateway, &reply).await;
    assert_eq!(verdict(&trace, "pii")["verdict"], "redacted");
    assert_eq!(verdict(&trace, "pii")["stage"], "input");
    let request = trace["request_body"].to_string();
    assert!(
        request.contains("[EMAIL]") && !request.contains("jane.doe"),
        "{request}"
    );
}

#[tokio::test]
async fn output_redaction_and_block_on_whole_answers() {
    let upstream = Upstream::start(|seen: &Seen| {
        let asked = seen.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let answer = match asked.as_str() {
            "contact" => "Write to ops@example.org please".to_owned(),
            _ => format!("here is a key: {OPENAI_KEY}"),
        };
        Reply::Json(200, chat_completion(&answer, 10, 8))
    })
    .await;
    let config = guardrail("pii", "output", "redact") + &guardrail("secrets", "output", "block");
    let gateway = TestGateway::start(&upstream.base_url(), "", &config).await;

    let redacted = gateway.chat(&[], say("contact")).await;
    assert_eq!(redacted.status, StatusCode::OK);
    assert_eq!(
        redacted.json()["choices"][0]["message"]["content"],
        "Write to [EMAIL] please"
    );
    let trace = stored(&gateway, &redacted).await;
    assert_eq!(verdict(&trace, "pii")["verdict"], "redacted");
    assert!(!trace.to_string().contains("ops@example.org"), "{trace}");

    let blocked = gateway.chat(&[], say("leak")).await;
    blocked.assert_error(400, "guardrail_blocked");
    assert!(!blocked.text().contains(OPENAI_KEY));
    let trace = stored(&gateway, &blocked).await;
    assert_eq!(verdict(&trace, "secrets")["verdict"], "blocked");
    assert_eq!(
        trace["usage"]["output_tokens"], 8,
        "the provider's answer was billed: {trace}"
    );
    assert!(trace["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(!trace.to_string().contains(OPENAI_KEY), "{trace}");
}

/// A key split across two chunks, then a finish chunk and `[DONE]`.
fn split_key_stream(_: &Seen) -> Reply {
    split_key_events([finish_chunk(), DONE.to_owned()])
}

/// The same text, but the upstream just closes the stream: no finish chunk, no `[DONE]`.
fn split_key_stream_cut_short(_: &Seen) -> Reply {
    split_key_events([])
}

fn split_key_events<const N: usize>(ending: [String; N]) -> Reply {
    let (head, tail) = OPENAI_KEY.split_at(20);
    let text = [
        chunk("your key is "),
        chunk(head),
        chunk(tail),
        chunk(" - keep it safe"),
    ];
    Reply::Sse(
        text.into_iter()
            .chain(ending)
            .map(|event| (Duration::from_millis(5), event))
            .collect(),
    )
}

fn finish_chunk() -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )
}

fn streamed(text: &str) -> Value {
    let mut body = say(text);
    body["stream"] = json!(true);
    body
}

/// How the mock upstream answers.
type Answer = fn(&Seen) -> Reply;

/// A streamed call through a gateway whose output `secrets` guardrail does `action`, to an
/// upstream answering with `stream` (kept alive with the gateway, for the trace lookups).
async fn stream_through(stream: Answer, action: &str) -> (Upstream, TestGateway, HttpReply) {
    let upstream = Upstream::start(stream).await;
    let gateway = TestGateway::start(
        &upstream.base_url(),
        "",
        &guardrail("secrets", "output", action),
    )
    .await;
    let reply = gateway.chat(&[], streamed("tell me")).await;
    (upstream, gateway, reply)
}

#[tokio::test]
async fn streamed_output_logging_catches_a_secret_split_across_chunks() {
    let (_upstream, gateway, reply) = stream_through(split_key_stream, "log").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.streamed_text().contains(OPENAI_KEY),
        "log changes nothing"
    );
    let trace = stored(&gateway, &reply).await;
    assert_eq!(verdict(&trace, "secrets")["verdict"], "flagged", "{trace}");
    assert_eq!(verdict(&trace, "secrets")["matches"]["openai"], 1);
    assert!(
        !trace.to_string().contains(&OPENAI_KEY[20..]),
        "the secret reached the store: {trace}"
    );
}

/// Redaction holds text back across chunks and block ends the stream, whether the upstream ends
/// with a finish chunk and `[DONE]` or just closes the stream (held text is released then too).
#[tokio::test]
async fn streamed_output_redaction_holds_back_across_chunks_and_block_ends_the_stream() {
    let shapes: [(Answer, bool); 2] = [
        (split_key_stream, true),
        (split_key_stream_cut_short, false),
    ];
    for (stream, ends_with_done) in shapes {
        let (_upstream, gateway, reply) = stream_through(stream, "redact").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.streamed_text(), "your key is [SECRET] - keep it safe");
        assert!(
            !reply.text().contains(&OPENAI_KEY[..20]),
            "{}",
            reply.text()
        );
        assert_eq!(
            reply.text().trim_end().ends_with("data: [DONE]"),
            ends_with_done
        );
        let trace = stored(&gateway, &reply).await;
        assert_eq!(verdict(&trace, "secrets")["verdict"], "redacted");
        let recorded = trace.to_string();
        assert!(
            recorded.contains("[SECRET]"),
            "what the client got is recorded: {trace}"
        );
        assert!(!recorded.contains(&OPENAI_KEY[20..]), "{trace}");

        let (_upstream, gateway, reply) = stream_through(stream, "block").await;
        let events = sse_data(&reply.body);
        let last: Value = serde_json::from_str(events.last().expect("an event")).expect("JSON");
        assert_eq!(last["error"]["code"], "guardrail_blocked", "{events:?}");
        assert!(
            !reply.text().contains(&OPENAI_KEY[..20]),
            "{}",
            reply.text()
        );
        let trace = stored(&gateway, &reply).await;
        assert_eq!(verdict(&trace, "secrets")["verdict"], "blocked");
        assert_eq!(trace["error"]["class"], "guardrail_blocked");
    }
}

#[tokio::test]
async fn verdicts_are_counted_in_the_run_and_in_metrics() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("ok", 5, 5))).await;
    let gateway =
        TestGateway::start(&upstream.base_url(), "", &guardrail("pii", "input", "log")).await;
    let mut last = None;
    for text in ["mail a@example.com", "nothing here", "mail b@example.com"] {
        last = Some(gateway.chat(&[], say(text)).await);
    }
    let trace = stored(&gateway, last.as_ref().unwrap()).await;
    let run = gateway.run_of(&trace).await;
    let pii = &run["metrics"]["guardrails"]["pii"];
    assert_eq!(
        (pii["checks"].as_u64(), pii["flagged"].as_u64()),
        (Some(3), Some(2)),
        "{run}"
    );
    let metrics = send(
        http::Method::GET,
        &format!("{}/metrics", gateway.url),
        &[],
        "",
    )
    .await;
    let text = metrics.text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("flowgate_guardrail_checks_total")
                && l.contains("guardrail=\"pii\"")
                && l.contains("verdict=\"flagged\"")
                && l.ends_with(" 2")),
        "{text}"
    );
}
