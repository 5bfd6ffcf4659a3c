//! Limits: oversized heads, slow heads, too many connections, too many calls in flight.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes the connection (or `limit` passes).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let gateway = TestGateway::start("http://127.0.0.1:9/v1", "max_header_bytes = 16384", "").await;
    let big = "x".repeat(32 * 1024);
    let reply = send(
        Method::GET,
        &format!("{}/healthz", gateway.url),
        &[("x-padding", big.as_str())],
        "",
    )
    .await;
    assert_eq!(reply.status, 431);
    let fine = send(
        Method::GET,
        &format!("{}/healthz", gateway.url),
        &[("x-padding", "small")],
        "",
    )
    .await;
    assert_eq!(fine.status, 200, "the gateway keeps serving");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_or_never_starts_it_is_disconnected() {
    let gateway =
        TestGateway::start("http://127.0.0.1:9/v1", "header_read_timeout_ms = 300", "").await;
    let cases: [(&str, &[u8]); 2] = [
        (
            "a head cut short",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ",
        ),
        ("not a byte", b""),
    ];
    for (case, sent) in cases {
        let mut stream = TcpStream::connect(gateway.url.trim_start_matches("http://"))
            .await
            .unwrap();
        stream.write_all(sent).await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{case}: closed after {:?}",
            started.elapsed()
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{case}: {answer}"
        );
    }
}

#[tokio::test]
async fn connections_over_the_limit_get_503_with_retry_after() {
    let gateway = TestGateway::start("http://127.0.0.1:9/v1", "max_connections = 2", "").await;
    let address = gateway.url.trim_start_matches("http://").to_owned();
    let _first = TcpStream::connect(&address).await.unwrap();
    let _second = TcpStream::connect(&address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(&address).await.unwrap();
    let answer = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    drop((_first, _second));
    // Until the server sees the two idle connections close, a new one may still be refused: retry.
    let metrics = eventually(Duration::from_secs(5), async || {
        let url = format!("{}/metrics", gateway.url);
        let response = client()
            .request(request(Method::GET, &url, &[], ""))
            .await
            .ok()?;
        use http_body_util::BodyExt;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        // At least the third connection; a retry of this read may have been refused too.
        let refused = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"flowgate_rejected_total{reason="connections"} "#))
            .and_then(|n| n.trim().parse::<u64>().ok())?;
        (refused >= 1).then_some(text)
    })
    .await;
    assert!(metrics.contains("flowgate_rejected_total"));
}

#[tokio::test]
async fn calls_over_the_in_flight_limit_get_503_and_are_counted() {
    let upstream = Upstream::start(|_| Reply::Hang).await;
    let gateway = TestGateway::start(&upstream.base_url(), "max_in_flight = 1", "").await;
    let url = format!("{}/v1/chat/completions", gateway.url);
    let body = json!({"model": "gpt-4o-mini", "messages": []}).to_string();
    let hanging = tokio::spawn({
        let (url, body) = (url.clone(), body.clone());
        async move {
            send(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                &body,
            )
            .await
        }
    });
    eventually(Duration::from_secs(5), async || {
        (!upstream.requests().is_empty()).then_some(())
    })
    .await;
    let refused = send(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    refused.assert_error(503, "overloaded");
    assert_eq!(refused.header("retry-after"), "1");
    let metrics = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "")
        .await
        .text();
    assert!(
        metrics.contains(r#"flowgate_rejected_total{reason="in_flight"} 1"#),
        "{metrics}"
    );
    hanging.abort();
    // The place is given back when the call ends.
    let freed = eventually(Duration::from_secs(5), async || {
        let mock_call = json!({"model": "mock/gpt-4o-mini", "messages": []}).to_string();
        let reply = send(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            &mock_call,
        )
        .await;
        (reply.status != 503).then_some(reply.status)
    })
    .await;
    assert_eq!(freed, 200);
}

/// Sends `GET /healthz` on `stream` and reads its whole answer ("ok\n" and its head).
async fn health_check_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.ends_with(b"ok\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            read > 0,
            "closed mid-answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A keep-alive connection to `gateway` that has served one call.
async fn connection_after_one_call(gateway: &TestGateway) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let answer = health_check_on(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stream
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_head_timeout() {
    // A load balancer or a client pool keeps idle connections for a minute or more and sends its
    // next call on one whenever it likes: the head timeout must not close them under it.
    let gateway =
        TestGateway::start("http://127.0.0.1:9/v1", "header_read_timeout_ms = 300", "").await;
    let mut stream = connection_after_one_call(&gateway).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = health_check_on(&mut stream).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let gateway = TestGateway::start(
        "http://127.0.0.1:9/v1",
        "idle_timeout_ms = 400\nheader_read_timeout_ms = 5000",
        "",
    )
    .await;
    let mut stream = connection_after_one_call(&gateway).await;
    let idle_from = std::time::Instant::now();
    let rest = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let idle = idle_from.elapsed();
    assert_eq!(rest, "", "nothing more is sent");
    assert!(
        idle >= Duration::from_millis(350) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle"
    );
}

#[tokio::test]
async fn calls_quieter_than_the_idle_timeout_are_not_cut() {
    // Nothing crosses the client's connection while the upstream thinks (before the answer,
    // or between two chunks): the call is in flight, not idle.
    let upstream = Upstream::start(|seen: &Seen| {
        let pause = Duration::from_millis(900);
        if seen.json()["stream"] == true {
            let events = streamed_answer(&["after", "a", "pause"], false);
            let mut delays = vec![Duration::ZERO, pause];
            delays.resize(events.len(), Duration::ZERO);
            Reply::Sse(delays.into_iter().zip(events).collect())
        } else {
            Reply::Late(
                pause,
                Box::new(Reply::Json(200, chat_completion("late", 3, 1))),
            )
        }
    })
    .await;
    let gateway = TestGateway::start(
        &upstream.base_url(),
        "idle_timeout_ms = 300\nheader_read_timeout_ms = 300",
        "",
    )
    .await;
    for stream in [false, true] {
        let reply = gateway
            .chat(
                &[],
                json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(reply.status, 200, "stream {stream}: {}", reply.text());
        let expected = if stream { "[DONE]" } else { "late" };
        assert!(reply.text().contains(expected), "{}", reply.text());
    }
}
