//! The response cache as a client sees it: hits, coalescing, directives, tenants, expiry, replay.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

fn question(text: &str, temperature: f64) -> Value {
    json!({"model": "gpt-4o-mini", "temperature": temperature,
           "messages": [{"role": "user", "content": text}]})
}

fn answering(content: &'static str) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |_| Reply::Json(200, chat_completion(content, 1000, 500))
}

async fn trace_of(gateway: &TestGateway, reply: &HttpReply) -> Value {
    stored_trace(&gateway.url, reply.header("x-flowgate-trace-id")).await
}

#[tokio::test]
async fn a_repeated_deterministic_call_is_a_hit_that_costs_nothing() {
    let upstream = Upstream::start(answering("Paris.")).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let tags = [("x-flowgate-experiment", "geo")];

    let first = gateway
        .chat(&tags, question("Capital of France?", 0.0))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.header("x-flowgate-cache"), "miss");
    // Same request, keys in another order: the same entry.
    let reordered = json!({"messages": [{"content": "Capital of France?", "role": "user"}],
                           "temperature": 0, "model": "gpt-4o-mini"});
    let mut second = gateway.chat(&tags, reordered.clone()).await;
    for _ in 0..50 {
        // The entry is stored right after the first answer's last byte; allow for that.
        if second.header("x-flowgate-cache") == "hit" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        second = gateway.chat(&tags, reordered.clone()).await;
    }
    assert_eq!(second.header("x-flowgate-cache"), "hit");
    assert_eq!(
        second.body, first.body,
        "a hit answers with the stored bytes"
    );
    assert_eq!(upstream.requests().len(), 1, "the upstream saw one call");
    assert_eq!(
        first.header("x-flowgate-run-id"),
        second.header("x-flowgate-run-id")
    );

    let missed = trace_of(&gateway, &first).await;
    let hit = trace_of(&gateway, &second).await;
    assert_eq!(missed["cache"], "miss");
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["cost_usd"], 0.0);
    // gpt-4o-mini: 1000 in × $0.15/M + 500 out × $0.60/M.
    let full_cost = 0.00015 + 0.0003;
    assert!(
        (hit["cost_saved_usd"].as_f64().unwrap() - full_cost).abs() < 1e-12,
        "{hit}"
    );
    assert!((missed["cost_usd"].as_f64().unwrap() - full_cost).abs() < 1e-12);
    assert_eq!(hit["usage"]["output_tokens"], 500);
    assert!(
        hit["latency"]["upstream_ms"].is_null(),
        "no upstream call: {hit}"
    );

    let run_id = first.header("x-flowgate-run-id").to_owned();
    let run = eventually(Duration::from_secs(5), async || {
        let run = gateway.admin(&format!("/api/v1/runs/{run_id}")).await;
        (run["metrics"]["requests"].as_u64() >= Some(2)).then_some(run)
    })
    .await;
    let metrics = &run["metrics"];
    let requests = metrics["requests"].as_u64().unwrap();
    assert_eq!(metrics["cache_hits"].as_u64().unwrap(), requests - 1);
    assert!(metrics["cache_hit_rate"].as_f64().unwrap() >= 0.5);
    let saved = metrics["cost_saved_usd"].as_f64().unwrap();
    assert!(
        (saved - full_cost * (requests - 1) as f64).abs() < 1e-12,
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_identical_misses_reach_the_upstream_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = Upstream::start(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Reply::Sse(vec![
            (Duration::from_millis(300), chunk("slow ")),
            (Duration::ZERO, chunk("answer")),
            (Duration::ZERO, DONE.to_owned()),
        ])
    })
    .await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let mut body = question("Same question, twenty times", 0.0);
    body["stream"] = json!(true);
    let replies = futures_join_all(20, || gateway.chat(&[], body.clone())).await;

    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one upstream call for twenty clients"
    );
    let mut results: Vec<&str> = replies
        .iter()
        .map(|r| r.header("x-flowgate-cache"))
        .collect();
    results.sort_unstable();
    assert_eq!(
        results.iter().filter(|r| **r == "miss").count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|r| **r == "hit").count(),
        19,
        "{results:?}"
    );
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.streamed_text(), "slow answer");
        assert!(reply.text().trim_end().ends_with("data: [DONE]"));
    }
}

async fn futures_join_all<F, Fut>(n: usize, make: F) -> Vec<HttpReply>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = HttpReply>,
{
    let futures: Vec<_> = (0..n).map(|_| make()).collect();
    let mut replies = Vec::with_capacity(n);
    // All started together: join them as one set.
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<HttpReply>> = (0..n).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, future) in done.iter_mut().zip(pinned.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(reply) => *slot = Some(reply),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    replies.extend(done.into_iter().flatten());
    replies
}

#[tokio::test]
async fn bypass_and_refresh_do_what_they_say() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = Upstream::start(move |_| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::Json(200, chat_completion(&format!("answer {n}"), 3, 2))
    })
    .await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let body = question("What changes?", 0.0);
    let content = |reply: &HttpReply| reply.json()["choices"][0]["message"]["content"].clone();

    let first = gateway.chat(&[], body.clone()).await;
    assert_eq!(content(&first), "answer 1");
    let hit = eventually(Duration::from_secs(5), async || {
        let reply = gateway.chat(&[], body.clone()).await;
        (reply.header("x-flowgate-cache") == "hit").then_some(reply)
    })
    .await;
    assert_eq!(content(&hit), "answer 1");

    let bypass = gateway
        .chat(&[("x-flowgate-cache", "bypass")], body.clone())
        .await;
    assert_eq!(bypass.header("x-flowgate-cache"), "bypass");
    assert_eq!(content(&bypass), "answer 2", "bypass calls the provider");
    let after_bypass = gateway.chat(&[], body.clone()).await;
    assert_eq!(content(&after_bypass), "answer 1", "bypass does not write");

    let refresh = gateway
        .chat(&[("x-flowgate-cache", "refresh")], body.clone())
        .await;
    assert_eq!(refresh.header("x-flowgate-cache"), "miss");
    assert_eq!(content(&refresh), "answer 3", "refresh skips the read");
    let refreshed = eventually(Duration::from_secs(5), async || {
        let reply = gateway.chat(&[], body.clone()).await;
        (content(&reply) == "answer 3").then_some(reply)
    })
    .await;
    assert_eq!(
        refreshed.header("x-flowgate-cache"),
        "hit",
        "refresh wrote the new answer"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let bad = gateway
        .chat(&[("x-flowgate-cache", "sometimes")], body)
        .await;
    bad.assert_error(400, "invalid_header");
}

#[tokio::test]
async fn tenants_with_their_own_keys_never_share_an_entry() {
    let upstream = Upstream::start(|seen: &Seen| {
        let key = seen.headers["authorization"]
            .to_str()
            .unwrap_or("")
            .to_owned();
        Reply::Json(200, chat_completion(&format!("for {key}"), 3, 2))
    })
    .await;
    // The test gateway's openai provider has no api_key: clients' keys are forwarded.
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let body = question("Whose answer is this?", 0.0);
    for _ in 0..3 {
        for tenant in ["Bearer sk-alice", "Bearer sk-bob"] {
            let reply = gateway
                .chat(&[("authorization", tenant)], body.clone())
                .await;
            let content = reply.json()["choices"][0]["message"]["content"].clone();
            assert_eq!(content, format!("for {tenant}"), "tenant {tenant}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(upstream.requests().len(), 2, "one upstream call per tenant");
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let upstream = Upstream::start(answering("fresh")).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "[cache]\nttl_seconds = 1").await;
    let body = question("Is this stale?", 0.0);
    gateway.chat(&[], body.clone()).await;
    eventually(Duration::from_secs(2), async || {
        let reply = gateway.chat(&[], body.clone()).await;
        (reply.header("x-flowgate-cache") == "hit").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = gateway.chat(&[], body).await;
    assert_eq!(after.header("x-flowgate-cache"), "miss");
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn what_is_never_cached() {
    let upstream = Upstream::start(|seen: &Seen| {
        if seen.json()["messages"][0]["content"] == "fail" {
            Reply::Json(
                500,
                json!({"error": {"message": "boom", "type": "server_error", "code": null}}),
            )
        } else {
            Reply::Json(200, chat_completion("ok", 3, 2))
        }
    })
    .await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    // (body, expected header, why)
    let cases = [
        (
            question("warm", 0.7),
            "bypass",
            "temperature 0.7 is not deterministic",
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "default"}]}),
            "bypass",
            "no temperature: the default 1",
        ),
        (question("fail", 0.0), "miss", "an upstream error"),
    ];
    for (body, header, why) in cases {
        for _ in 0..2 {
            let reply = gateway.chat(&[], body.clone()).await;
            assert_eq!(reply.header("x-flowgate-cache"), header, "{why}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert_eq!(
        upstream.requests().len(),
        6,
        "every call reached the upstream"
    );
    let seeded = json!({"model": "gpt-4o-mini", "temperature": 0.9, "seed": 7,
                        "messages": [{"role": "user", "content": "seeded"}]});
    gateway.chat(&[], seeded.clone()).await;
    let again = eventually(Duration::from_secs(5), async || {
        let reply = gateway.chat(&[], seeded.clone()).await;
        (reply.header("x-flowgate-cache") == "hit").then_some(reply)
    })
    .await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a seed asks for a repeatable answer"
    );
}

#[tokio::test]
async fn cached_answers_replay_in_the_shape_asked_for() {
    let upstream = Upstream::start(|seen: &Seen| {
        if seen.json()["stream"] == true {
            Reply::Sse(
                streamed_answer(&["Once ", "upon ", "a time"], asked_for_usage(seen))
                    .into_iter()
                    .map(|e| (Duration::ZERO, e))
                    .collect(),
            )
        } else {
            Reply::Json(200, chat_completion("Once upon a time", 11, 3))
        }
    })
    .await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let streamed = |text: &str| {
        let mut body = question(text, 0.0);
        body["stream"] = json!(true);
        body
    };

    // Stored as a stream, asked for as a stream: the provider's events, usage chunk hidden.
    let first = gateway.chat(&[], streamed("stream twice")).await;
    let replay = eventually(Duration::from_secs(5), async || {
        let reply = gateway.chat(&[], streamed("stream twice")).await;
        (reply.header("x-flowgate-cache") == "hit").then_some(reply)
    })
    .await;
    assert_eq!(replay.body, first.body);
    assert!(replay
        .header("content-type")
        .starts_with("text/event-stream"));
    assert!(!replay.text().contains("\"usage\":{"), "{}", replay.text());

    // Stored as a stream, asked for as JSON: one chat.completion with the usage.
    let json_hit = gateway.chat(&[], question("stream twice", 0.0)).await;
    assert_eq!(json_hit.header("x-flowgate-cache"), "hit");
    let answer = json_hit.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Once upon a time"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 3);

    // Stored as JSON, asked for as a stream with usage: chunks, finish reason, usage, [DONE].
    gateway.chat(&[], question("json first", 0.0)).await;
    let mut with_usage = streamed("json first");
    with_usage["stream_options"] = json!({"include_usage": true});
    let stream_hit = eventually(Duration::from_secs(5), async || {
        let reply = gateway.chat(&[], with_usage.clone()).await;
        (reply.header("x-flowgate-cache") == "hit").then_some(reply)
    })
    .await;
    assert_eq!(stream_hit.streamed_text(), "Once upon a time");
    let events = sse_data(&stream_hit.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 11);
    assert_eq!(
        upstream.requests().len(),
        2,
        "one call per distinct question"
    );
}

#[tokio::test]
async fn a_full_cache_still_keeps_a_new_answer() {
    let upstream = Upstream::start(answering("Noted.")).await;
    // Room for a few dozen ~1 KB answers.
    let gateway = TestGateway::start(&upstream.base_url(), "", "[cache]\nmax_bytes = 65536").await;
    for n in 0..200 {
        let reply = gateway
            .chat(&[], question(&format!("One-off question {n}"), 0.0))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let body = question("A question asked twice", 0.0);
    let first = gateway.chat(&[], body.clone()).await;
    assert_eq!(first.header("x-flowgate-cache"), "miss");
    // A few more calls and a pause, so that the cache has settled what it keeps.
    for n in 0..10 {
        gateway
            .chat(&[], question(&format!("Another question {n}"), 0.0))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    gateway.chat(&[], question("One more", 0.0)).await;
    let repeat = gateway.chat(&[], body).await;
    assert_eq!(
        repeat.header("x-flowgate-cache"),
        "hit",
        "the answer made last among many was kept"
    );
    assert_eq!(repeat.body, first.body);
}
