//! `[[models]]` routing as a client sees it: retries, fallbacks, circuit breakers, weights, and
//! every attempt in the trace.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

fn failing(status: u16) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |_| {
        Reply::Json(
            status,
            json!({"error": {"message": "deployment down", "type": "server_error", "code": null}}),
        )
    }
}

fn healthy(content: &'static str) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |_| Reply::Json(200, chat_completion(content, 10, 5))
}

/// Providers `a` and `b` at two upstreams, and the `chat` model over them.
fn routing_config(a: &str, b: &str, routing: &str, chat: &str) -> String {
    format!(
        r#"
[routing]
{routing}

[[providers]]
name = "a"
kind = "openai"
base_url = "{a}"
api_key = "sk-a"

[[providers]]
name = "b"
kind = "openai"
base_url = "{b}"
api_key = "sk-b"

[[models]]
name = "chat"
{chat}
"#,
    )
}

/// A gateway whose `openai` provider is `openai`, with providers `a` and `b` and the `chat` model.
async fn start(openai: &Upstream, a: &str, b: &str, routing: &str, chat: &str) -> TestGateway {
    TestGateway::start(&openai.base_url(), "", &routing_config(a, b, routing, chat)).await
}

/// `a` first (its weight makes any other order a one-in-a-million event), then `b`.
const A_THEN_B: &str = r#"deployments = [
  { provider = "a", model = "gpt-4o-mini", weight = 1000000 },
  { provider = "b", model = "gpt-4o-mini", weight = 1 },
]"#;

fn ask() -> Value {
    json!({"model": "chat", "temperature": 0.3, "messages": [{"role": "user", "content": "hi"}]})
}

async fn trace_of(gateway: &TestGateway, reply: &HttpReply) -> Value {
    gateway.trace(reply.header("x-flowgate-trace-id")).await
}

fn attempts(trace: &Value) -> Vec<(String, Value, bool)> {
    trace["attempts"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|a| {
            let outcome = if a["status"].is_null() {
                a["error"].clone()
            } else {
                a["status"].clone()
            };
            (
                a["provider"].as_str().unwrap_or("").to_owned(),
                outcome,
                a["served"] == true,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_failing_deployment_is_retried_then_the_next_one_serves() {
    let a = Upstream::start(failing(500)).await;
    let b = Upstream::start(healthy("from b")).await;
    let gateway = start(
        &a,
        &a.base_url(),
        &b.base_url(),
        "retries = 2\nbackoff_ms = 10",
        A_THEN_B,
    )
    .await;

    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "from b");
    assert_eq!(a.requests().len(), 3, "one try and two retries");
    assert_eq!(b.requests().len(), 1);
    assert_eq!(
        b.last().json()["model"],
        "gpt-4o-mini",
        "the deployment's model goes upstream"
    );
    assert_eq!(b.last().headers["authorization"], "Bearer sk-b");

    let trace = trace_of(&gateway, &reply).await;
    assert_eq!(
        attempts(&trace),
        [
            ("a".into(), json!(500), false),
            ("a".into(), json!(500), false),
            ("a".into(), json!(500), false),
            ("b".into(), json!(200), true),
        ]
    );
    assert_eq!(trace["provider"], "b");
    assert_eq!(trace["model_group"], "chat");
    let run = gateway.run_of(&trace).await;
    assert_eq!(
        (run["provider"].as_str(), run["model"].as_str()),
        (Some("models"), Some("chat"))
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let seen_at = Arc::new(Mutex::new(Vec::new()));
    let times = seen_at.clone();
    let a = Upstream::start(move |_| {
        let mut times = times.lock().unwrap();
        times.push(Instant::now());
        if times.len() == 1 {
            Reply::Raw {
                status: 429,
                content_type: "application/json",
                body: br#"{"error":{"message":"slow down","type":"rate_limit_error","code":null}}"#
                    .to_vec(),
            }
        } else {
            Reply::Json(200, chat_completion("after the wait", 10, 5))
        }
    })
    .await;
    let b = Upstream::start(healthy("from b")).await;
    let gateway = start(
        &a,
        &a.base_url(),
        &b.base_url(),
        "retries = 1\nbackoff_ms = 1",
        A_THEN_B,
    )
    .await;
    // A 429 without retry-after: the backoff (1 ms) applies. Then one that names its wait.
    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "after the wait"
    );
    assert_eq!(b.requests().len(), 0);

    let waits = Arc::new(Mutex::new(Vec::new()));
    let record = waits.clone();
    let slow = Upstream::start(move |_| {
        let mut waits = record.lock().unwrap();
        waits.push(Instant::now());
        if waits.len() == 1 {
            let error =
                json!({"error": {"message": "wait", "type": "rate_limit_error", "code": null}});
            Reply::JsonWithHeaders(429, vec![("retry-after", "0.3")], error)
        } else {
            Reply::Json(200, chat_completion("waited", 10, 5))
        }
    })
    .await;
    let gateway = start(
        &a,
        &slow.base_url(),
        &b.base_url(),
        "retries = 1\nbackoff_ms = 1",
        A_THEN_B,
    )
    .await;
    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "waited");
    let waits = waits.lock().unwrap();
    assert_eq!(waits.len(), 2);
    let gap = waits[1] - waits[0];
    assert!(
        gap >= Duration::from_millis(300),
        "retried after {gap:?}, not after retry-after"
    );
}

#[tokio::test]
async fn a_fallback_model_serves_when_every_deployment_failed() {
    let a = Upstream::start(failing(503)).await;
    let b = Upstream::start(failing(502)).await;
    let fallback = Upstream::start(healthy("from the fallback")).await;
    let chat = format!("{A_THEN_B}\nfallbacks = [\"gpt-4o-mini\"]");
    let extra = routing_config(&a.base_url(), &b.base_url(), "retries = 0", &chat);
    // The test gateway's `openai` provider (models gpt-*) is the fallback's route.
    let gateway = TestGateway::start(&fallback.base_url(), "", &extra).await;
    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "from the fallback"
    );
    let trace = trace_of(&gateway, &reply).await;
    assert_eq!(
        attempts(&trace),
        [
            ("a".into(), json!(503), false),
            ("b".into(), json!(502), false),
            ("openai".into(), json!(200), true),
        ]
    );
    assert_eq!(trace["provider"], "openai");
}

#[tokio::test]
async fn when_everything_fails_the_client_gets_the_last_answer() {
    let a = Upstream::start(failing(500)).await;
    let b = Upstream::start(failing(503)).await;
    let gateway = start(
        &a,
        &a.base_url(),
        &b.base_url(),
        "retries = 1\nbackoff_ms = 1",
        A_THEN_B,
    )
    .await;
    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["message"], "deployment down");
    let trace = trace_of(&gateway, &reply).await;
    assert_eq!(trace["status"], 503);
    assert_eq!(attempts(&trace).len(), 4);
    assert_eq!(attempts(&trace).last().map(|a| a.2), Some(true));
}

#[tokio::test]
async fn an_unreachable_deployment_is_retried_then_skipped() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let b = Upstream::start(healthy("from b")).await;
    let gateway = start(
        &b,
        &dead,
        &b.base_url(),
        "retries = 1\nbackoff_ms = 1",
        A_THEN_B,
    )
    .await;
    let reply = gateway.chat(&[], ask()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let trace = trace_of(&gateway, &reply).await;
    let tried: Vec<_> = attempts(&trace);
    assert_eq!(tried.len(), 3, "{tried:?}");
    assert_eq!(tried[0].1, "upstream_unreachable");
    assert_eq!(tried[2], ("b".into(), json!(200), true));
}

#[tokio::test]
async fn a_breaker_opens_after_repeated_failures_and_recovers_after_its_cooldown() {
    let a_healthy = Arc::new(AtomicBool::new(false));
    let a_calls = Arc::new(AtomicUsize::new(0));
    let (flag, calls) = (a_healthy.clone(), a_calls.clone());
    let a = Upstream::start(move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        if flag.load(Ordering::SeqCst) {
            Reply::Json(200, chat_completion("from a", 10, 5))
        } else {
            Reply::Json(
                500,
                json!({"error": {"message": "down", "type": "server_error", "code": null}}),
            )
        }
    })
    .await;
    let b = Upstream::start(healthy("from b")).await;
    let routing = "retries = 0\nbreaker_failures = 2\nbreaker_cooldown_ms = 400";
    let gateway = start(&a, &a.base_url(), &b.base_url(), routing, A_THEN_B).await;
    let content = |reply: &HttpReply| reply.json()["choices"][0]["message"]["content"].clone();

    for _ in 0..2 {
        assert_eq!(content(&gateway.chat(&[], ask()).await), "from b");
    }
    assert_eq!(a_calls.load(Ordering::SeqCst), 2);
    // Open: `a` is not called at all, and the trace says why.
    let skipped = gateway.chat(&[], ask()).await;
    assert_eq!(content(&skipped), "from b");
    assert_eq!(
        a_calls.load(Ordering::SeqCst),
        2,
        "an open circuit is not called"
    );
    let trace = trace_of(&gateway, &skipped).await;
    assert_eq!(
        attempts(&trace)[0],
        ("a".into(), json!("circuit_open"), false)
    );

    a_healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    // Half-open: one trial; it succeeds, so the circuit closes and `a` serves again.
    assert_eq!(content(&gateway.chat(&[], ask()).await), "from a");
    assert_eq!(content(&gateway.chat(&[], ask()).await), "from a");
    assert_eq!(a_calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn with_every_circuit_open_the_client_is_told_when_to_come_back() {
    let a = Upstream::start(failing(500)).await;
    let b = Upstream::start(failing(500)).await;
    let routing = "retries = 0\nbreaker_failures = 1\nbreaker_cooldown_ms = 5000";
    let gateway = start(&a, &a.base_url(), &b.base_url(), routing, A_THEN_B).await;
    assert_eq!(
        gateway.chat(&[], ask()).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let refused = gateway.chat(&[], ask()).await;
    refused.assert_error(503, "deployments_unavailable");
    let wait: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=5).contains(&wait), "retry-after {wait}");
    assert_eq!(a.requests().len() + b.requests().len(), 2);
}

#[tokio::test]
async fn no_retry_after_the_first_streamed_byte() {
    let a = Upstream::start(|_| Reply::SseThenCut(vec![chunk("half "), chunk("an answer")])).await;
    let b = Upstream::start(healthy("from b")).await;
    let gateway = start(
        &a,
        &a.base_url(),
        &b.base_url(),
        "retries = 2\nbackoff_ms = 1",
        A_THEN_B,
    )
    .await;
    let mut body = ask();
    body["stream"] = json!(true);
    let reply = gateway.chat(&[], body).await;
    assert_eq!(reply.status, StatusCode::OK);
    let events = sse_data(&reply.body);
    assert!(events[0].contains("half "), "{events:?}");
    assert!(events.last().unwrap().contains("\"error\""), "{events:?}");
    assert_eq!(a.requests().len(), 1, "the stream had started: no retry");
    assert_eq!(b.requests().len(), 0, "and no fallback");
}

#[tokio::test]
async fn weights_share_the_first_attempts() {
    let a = Upstream::start(healthy("a")).await;
    let b = Upstream::start(healthy("b")).await;
    let chat = r#"deployments = [
  { provider = "a", model = "gpt-4o-mini", weight = 3 },
  { provider = "b", model = "gpt-4o-mini", weight = 1 },
]"#;
    let gateway = start(&a, &a.base_url(), &b.base_url(), "", chat).await;
    let calls = 400;
    for _ in 0..calls {
        assert_eq!(gateway.chat(&[], ask()).await.status, StatusCode::OK);
    }
    let to_a = a.requests().len();
    assert_eq!(to_a + b.requests().len(), calls);
    // Binomial(400, 0.75): mean 300, sd 8.7; ±45 is over five sd.
    assert!((255..=345).contains(&to_a), "a got {to_a} of {calls}");
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_returns_the_answer_without_waiting() {
    let a = Upstream::start(|_| {
        let error = json!({"error": {"message": "come back later", "type": "rate_limit_error", "code": null}});
        Reply::JsonWithHeaders(429, vec![("retry-after", "30")], error)
    })
    .await;
    let chat = r#"deployments = [{ provider = "a", model = "gpt-4o-mini" }]"#;
    let extra = routing_config(
        &a.base_url(),
        &a.base_url(),
        "retries = 2\nbackoff_ms = 1",
        chat,
    );
    let gateway = TestGateway::start(&a.base_url(), "request_timeout_ms = 3000", &extra).await;
    let started = Instant::now();
    let reply = gateway.chat(&[], ask()).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it waited: {:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["message"], "come back later");
    assert_eq!(a.requests().len(), 1);
    let trace = trace_of(&gateway, &reply).await;
    assert_eq!(attempts(&trace), [("a".into(), json!(429), true)]);
    assert_eq!(trace["provider"], "a");
}
