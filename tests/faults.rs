//! Garbage from the upstream: the client gets the bytes as they came, never a hang, and the
//! trace records that the answer could not be read.

mod common;

use common::*;
use serde_json::json;

/// (what, the upstream's reply, the error class the trace must show)
type Case = (&'static str, fn() -> Reply, &'static str);

#[tokio::test]
async fn unreadable_upstream_answers_pass_through_and_are_recorded() {
    let cases: Vec<Case> = vec![
        (
            "not JSON",
            || Reply::Raw {
                status: 200,
                content_type: "application/json",
                body: b"<html>oops</html>".to_vec(),
            },
            "upstream_invalid_json",
        ),
        (
            "truncated JSON",
            || Reply::Raw {
                status: 200,
                content_type: "application/json",
                body: br#"{"id":"x","choices":[{"#.to_vec(),
            },
            "upstream_invalid_json",
        ),
        (
            "invalid SSE",
            || Reply::Raw {
                status: 200,
                content_type: "text/event-stream",
                body: b"data: {not json\n\ndata: [DONE]\n\n".to_vec(),
            },
            "upstream_invalid_sse",
        ),
    ];
    for (what, reply, class) in cases {
        let upstream = Upstream::start(move |_| reply()).await;
        let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
        let expected = match reply() {
            Reply::Raw { body, .. } => body,
            _ => unreachable!(),
        };
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            gateway.chat(&[], json!({"model": "gpt-4o-mini", "stream": class == "upstream_invalid_sse", "messages": []})),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the gateway hung"));
        assert_eq!(response.status, 200, "{what}");
        assert_eq!(
            response.body, expected,
            "{what}: the client gets the bytes as they came"
        );
        let trace = gateway.trace(response.header("x-flowgate-trace-id")).await;
        assert_eq!(trace["error"]["class"], class, "{what}: {trace}");
    }
}
