//! The `anthropic` and `azure` provider kinds as clients see them, against mock upstreams on
//! loopback: OpenAI chat completions translated to Claude and back (plain, streamed, tools,
//! errors, refused parameters), Anthropic's own `/v1/messages` forwarded byte for byte, and
//! tokens, cached tokens and cost in the run.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const TAGS: [(&str, &str); 2] = [
    ("x-flowgate-experiment", "claude-eval"),
    ("x-flowgate-prompt-version", "v7"),
];

/// An Anthropic message, as the Messages API answers.
fn message(content: Value, stop_reason: &str, usage: Value) -> Value {
    json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": content,
        "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
    })
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A streamed text answer in Anthropic's events, with prompt-cache counts.
fn text_stream(words: &[&str]) -> Vec<String> {
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_stream", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-5-20250929", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 40, "cache_read_input_tokens": 1000,
                      "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for word in words {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta",
            "index": 0, "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 12}})));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    events
}

fn anthropic_provider(upstream: &Upstream, api_key: &str) -> String {
    format!(
        "[[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"http://{}\"\napi_key = \"{api_key}\"\nmodels = [\"claude-*\"]\n",
        upstream.addr
    )
}

async fn gateway_for(upstream: &Upstream, api_key: &str) -> TestGateway {
    TestGateway::start(
        "http://127.0.0.1:9/v1",
        "",
        &anthropic_provider(upstream, api_key),
    )
    .await
}

async fn send_messages(
    gateway: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(Method::POST, &format!("{}{path}", gateway.url), &all, body).await
}

#[tokio::test]
async fn chat_completion_reaches_claude_translated_and_is_metered() {
    let usage = json!({"input_tokens": 100, "output_tokens": 50,
        "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200});
    let answer = message(
        json!([{"type": "text", "text": "Paris."}]),
        "end_turn",
        usage,
    );
    let upstream = Upstream::start(move |_| Reply::Json(200, answer.clone())).await;
    let gateway = gateway_for(&upstream, "").await;
    let mut headers = TAGS.to_vec();
    headers.push(("authorization", "Bearer sk-ant-client-key"));
    let reply = gateway
        .chat(
            &headers,
            json!({"model": "claude-sonnet-4-5", "temperature": 0.3,
                   "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Capital of France?"}]}),
        )
        .await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let completion = reply.json();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    assert_eq!(completion["usage"]["prompt_tokens"], 1300);
    assert_eq!(completion["usage"]["completion_tokens"], 50);
    assert_eq!(
        completion["usage"]["prompt_tokens_details"]["cached_tokens"],
        1000
    );

    let seen = upstream.last();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-client-key");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(seen.headers.get("authorization").is_none());
    assert!(seen
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("x-flowgate-")));
    assert_eq!(
        seen.json(),
        json!({"model": "claude-sonnet-4-5", "max_tokens": 4096, "temperature": 0.3,
               "system": "Be brief.",
               "messages": [{"role": "user", "content": "Capital of France?"}]})
    );

    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["provider"], "anthropic");
    assert_eq!(trace["endpoint"], "chat.completions");
    assert_eq!(trace["experiment"], "claude-eval");
    assert_eq!(
        trace["usage"],
        json!({"input_tokens": 1300, "output_tokens": 50, "cached_input_tokens": 1000, "cache_write_input_tokens": 200, "source": "provider"})
    );
    // claude-sonnet-4-5: $3 in, $0.30 cache read, $3.75 cache write, $15 out, per 1M.
    let expected = (100.0 * 3.0 + 1000.0 * 0.30 + 200.0 * 3.75 + 50.0 * 15.0) / 1e6;
    let cost = trace["cost_usd"].as_f64().unwrap();
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    assert!(!trace.to_string().contains("sk-ant-client-key"));

    let run = gateway
        .admin(&format!(
            "/api/v1/runs/{}",
            reply.header("x-flowgate-run-id")
        ))
        .await;
    assert_eq!(run["metrics"]["input_tokens"], 1300);
    assert_eq!(run["metrics"]["output_tokens"], 50);
    assert_eq!(run["metrics"]["cached_input_tokens"], 1000);
    assert_eq!(run["metrics"]["cache_write_input_tokens"], 200);
    let run_cost = run["metrics"]["cost_usd"].as_f64().unwrap();
    assert!((run_cost - expected).abs() < 1e-12, "{run_cost}");
}

#[tokio::test]
async fn the_providers_key_replaces_the_clients() {
    let answer = message(
        json!([{"type": "text", "text": "ok"}]),
        "end_turn",
        json!({"input_tokens": 1, "output_tokens": 1}),
    );
    let upstream = Upstream::start(move |_| Reply::Json(200, answer.clone())).await;
    let gateway = gateway_for(&upstream, "sk-ant-provider-secret").await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let reply = send_messages(
            &gateway,
            path,
            &[
                ("authorization", "Bearer sk-client"),
                ("x-api-key", "sk-ant-client"),
            ],
            &body.to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let seen = upstream.last();
        assert_eq!(
            seen.headers["x-api-key"], "sk-ant-provider-secret",
            "{path}"
        );
        assert!(seen.headers.get("authorization").is_none(), "{path}");
        let trace = gateway
            .trace(reply.header("x-flowgate-trace-id"))
            .await
            .to_string();
        assert!(!trace.contains("sk-ant-provider-secret") && !trace.contains("sk-ant-client"));
    }
}

#[tokio::test]
async fn streamed_chat_is_translated_chunk_by_chunk_and_metered() {
    let (release, events) = tokio::sync::mpsc::unbounded_channel::<String>();
    let events = std::sync::Mutex::new(Some(events));
    let upstream = Upstream::start(move |_| {
        Reply::SseControlled(events.lock().unwrap().take().expect("one streamed call"))
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    let body = json!({"model": "claude-sonnet-4-5", "stream": true,
        "messages": [{"role": "user", "content": "Say hello"}]});
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(&TAGS);
    let response = open(
        Method::POST,
        &format!("{}/v1/chat/completions", gateway.url),
        &headers,
        &body.to_string(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let trace_id = trace_id_of(&response);
    let mut body = response.into_body();

    // Each Anthropic event reaches the client translated before the next one is sent.
    let mut received = String::new();
    for anthropic_event in text_stream(&["Hel", "lo"]) {
        release.send(anthropic_event.clone()).unwrap();
        let data: Value = serde_json::from_str(&sse_data(anthropic_event.as_bytes())[0]).unwrap();
        let expected = match data["type"].as_str().unwrap() {
            "message_start" => r#""role":"assistant""#.to_owned(),
            "content_block_delta" => {
                format!(r#""content":"{}""#, data["delta"]["text"].as_str().unwrap())
            }
            "message_stop" => "[DONE]".to_owned(),
            _ => continue,
        };
        let frame = next_data(&mut body, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("the stream ended before {expected}"));
        let frame = String::from_utf8_lossy(&frame).into_owned();
        assert!(frame.contains(&expected), "{expected} in {frame}");
        received.push_str(&frame);
    }
    drop(release);
    while let Some(frame) = next_data(&mut body, Duration::from_secs(5)).await {
        received.push_str(&String::from_utf8_lossy(&frame));
    }
    let data = sse_data(received.as_bytes());
    let chunks: Vec<Value> = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "the client did not ask for usage: {chunks:?}"
    );
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(
        upstream.last().json().get("stream_options").is_none(),
        "Anthropic has no stream_options"
    );
    assert_eq!(upstream.last().json()["stream"], true);

    let trace = gateway.trace(&trace_id).await;
    assert_eq!(trace["stream"], true);
    assert_eq!(
        trace["usage"],
        json!({"input_tokens": 1040, "output_tokens": 12, "cached_input_tokens": 1000, "source": "provider"})
    );
    assert!(trace["latency"]["ttft_ms"].as_f64().is_some(), "{trace}");
    assert_eq!(trace["response_body"]["content"], "Hello");
    let expected = (40.0 * 3.0 + 1000.0 * 0.30 + 12.0 * 15.0) / 1e6;
    assert!(
        (trace["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{trace}"
    );
}

#[tokio::test]
async fn a_client_asking_for_stream_usage_gets_the_usage_chunk() {
    let upstream = Upstream::start(|_| {
        Reply::Sse(
            text_stream(&["Hi"])
                .into_iter()
                .map(|e| (Duration::ZERO, e))
                .collect(),
        )
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    let reply = gateway
        .chat(
            &[],
            json!({"model": "claude-sonnet-4-5", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let data = sse_data(&reply.body);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 1040);
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        1000
    );
}

#[tokio::test]
async fn tools_round_trip_through_claude() {
    let upstream = Upstream::start(|seen| {
        let content = if seen.json()["messages"].as_array().unwrap().len() == 1 {
            json!([{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                    "input": {"location": "Paris"}}])
        } else {
            json!([{"type": "text", "text": "It is 18 degrees in Paris."}])
        };
        let stop = if content[0]["type"] == "tool_use" {
            "tool_use"
        } else {
            "end_turn"
        };
        Reply::Json(
            200,
            message(
                content,
                stop,
                json!({"input_tokens": 30, "output_tokens": 9}),
            ),
        )
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]);
    let mut messages = vec![json!({"role": "user", "content": "Weather in Paris?"})];
    let first = gateway
        .chat(
            &[],
            json!({"model": "claude-sonnet-4-5", "messages": messages, "tools": tools,
            "tool_choice": "auto"}),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let choice = &first.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"location": "Paris"}));
    let sent = upstream.last().json();
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["location"]["type"],
        "string"
    );
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));

    messages.push(choice["message"].clone());
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "18 degrees"}));
    let second = gateway
        .chat(
            &[],
            json!({"model": "claude-sonnet-4-5", "messages": messages, "tools": tools}),
        )
        .await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    assert_eq!(
        second.json()["choices"][0]["message"]["content"],
        "It is 18 degrees in Paris."
    );
    let sent = upstream.last().json();
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        sent["messages"][2]["content"],
        json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 degrees"}])
    );
}

#[tokio::test]
async fn anthropic_errors_reach_openai_clients_in_openai_shape() {
    let cases = [
        (400, "invalid_request_error", 400, "invalid_request_error"),
        (401, "authentication_error", 401, "authentication_error"),
        (403, "permission_error", 403, "permission_error"),
        (404, "not_found_error", 404, "invalid_request_error"),
        (429, "rate_limit_error", 429, "rate_limit_error"),
        (500, "api_error", 500, "server_error"),
        (529, "overloaded_error", 503, "server_error"),
    ];
    for (status, kind, client_status, client_type) in cases {
        let upstream = Upstream::start(move |_| {
            Reply::Json(
                status,
                json!({"type": "error",
                "error": {"type": kind, "message": format!("the {kind} message")}}),
            )
        })
        .await;
        let gateway = gateway_for(&upstream, "").await;
        let reply = gateway
            .chat(&[], json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}))
            .await;
        reply.assert_error(client_status, kind);
        assert_eq!(reply.json()["error"]["type"], client_type, "{kind}");
        assert_eq!(
            reply.json()["error"]["message"],
            format!("the {kind} message")
        );
        let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
        assert_eq!(trace["status"], client_status, "{kind}");
        assert_eq!(trace["error"]["class"], "upstream_http", "{kind}");
        assert!(
            trace["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("the {kind} message")),
            "{trace}"
        );
    }
}

/// A streamed chat whose Anthropic stream stops after its first text delta, then sends `tail`
/// (if any) and ends: the client's SSE payloads, and the call's trace.
async fn broken_stream(tail: Option<String>) -> (Vec<String>, Value) {
    let upstream = Upstream::start(move |_| {
        let mut events = text_stream(&["Hel"]);
        events.truncate(4); // message_start, block start, ping, one delta
        events.extend(tail.clone());
        Reply::Sse(events.into_iter().map(|e| (Duration::ZERO, e)).collect())
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    let reply = gateway
        .chat(
            &[],
            json!({"model": "claude-haiku-4-5", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let data = sse_data(&reply.body);
    assert!(data[1].contains("\"Hel\""), "{data:?}");
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["error"]["class"], "upstream_stream", "{trace}");
    (data, trace)
}

#[tokio::test]
async fn an_error_event_mid_stream_becomes_an_openai_error_event() {
    let error = event(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let (data, _) = broken_stream(Some(error)).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "overloaded_error");
    assert_eq!(last["error"]["message"], "Overloaded");
}

#[tokio::test]
async fn a_stream_that_ends_before_message_stop_is_a_broken_stream() {
    let (data, trace) = broken_stream(None).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_error", "{data:?}");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("message_stop"));
    assert!(
        trace["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message_stop"),
        "{trace}"
    );
}

#[tokio::test]
async fn parameters_anthropic_cannot_express_are_refused_before_any_call() {
    let upstream = Upstream::start(|_| Reply::Json(500, json!({}))).await;
    let gateway = gateway_for(&upstream, "").await;
    let cases = [
        (json!({"n": 3}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"presence_penalty": 0.4}), "presence_penalty"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"seed": 1}), "seed"),
    ];
    for (extra, param) in cases {
        let mut body =
            json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let reply = gateway.chat(&[], body).await;
        reply.assert_error(400, "unsupported_parameter");
        let error = &reply.json()["error"];
        assert_eq!(error["param"], param);
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(param) && message.contains("\"anthropic\""),
            "{message}"
        );
        let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
        assert_eq!(trace["status"], 400);
        assert_eq!(trace["error"]["class"], "unsupported_parameter");
    }
    let embeddings = send_messages(
        &gateway,
        "/v1/embeddings",
        &[],
        &json!({"model": "claude-haiku-4-5", "input": "hi"}).to_string(),
    )
    .await;
    embeddings.assert_error(400, "unsupported_endpoint");
    assert!(
        upstream.requests().is_empty(),
        "nothing may reach Anthropic"
    );
}

#[tokio::test]
async fn messages_are_forwarded_byte_for_byte_and_metered() {
    let answer = message(
        json!([{"type": "text", "text": "Hello!"}]),
        "end_turn",
        json!({"input_tokens": 12, "output_tokens": 6, "cache_read_input_tokens": 100,
               "cache_creation_input_tokens": 50}),
    );
    let answer_bytes = answer.to_string().into_bytes();
    let sent_back = answer_bytes.clone();
    let upstream = Upstream::start(move |_| Reply::Raw {
        status: 200,
        content_type: "application/json",
        body: sent_back.clone(),
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    // Odd spacing and key order: the body must reach Anthropic exactly as sent.
    let body = r#"{ "max_tokens": 64,"model":"claude-sonnet-4-5",  "messages": [{"role":"user","content":"Hi"}], "temperature": 0.10 }"#;
    let mut headers = TAGS.to_vec();
    headers.extend([
        ("x-api-key", "sk-ant-mine"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31"),
    ]);
    let reply = send_messages(&gateway, "/v1/messages", &headers, body).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        &reply.body[..],
        &answer_bytes[..],
        "the answer must reach the client untouched"
    );
    let seen = upstream.last();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(&seen.body[..], body.as_bytes());
    assert_eq!(seen.headers["x-api-key"], "sk-ant-mine");
    assert_eq!(seen.headers["anthropic-beta"], "prompt-caching-2024-07-31");

    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["endpoint"], "messages");
    assert_eq!(trace["provider"], "anthropic");
    assert_eq!(trace["experiment"], "claude-eval");
    assert_eq!(trace["prompt_version"], "v7");
    assert_eq!(trace["sampling"]["max_tokens"], 64);
    assert_eq!(
        trace["usage"],
        json!({"input_tokens": 162, "output_tokens": 6, "cached_input_tokens": 100, "cache_write_input_tokens": 50, "source": "provider"})
    );
    let expected = (12.0 * 3.0 + 100.0 * 0.30 + 50.0 * 3.75 + 6.0 * 15.0) / 1e6;
    assert!(
        (trace["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{trace}"
    );
    assert!(!trace.to_string().contains("sk-ant-mine"));
}

#[tokio::test]
async fn streamed_messages_are_forwarded_byte_for_byte_and_metered() {
    let events = text_stream(&["Hello", " world"]);
    let upstream_bytes: String = events.concat();
    let upstream = Upstream::start(move |_| {
        Reply::Sse(
            events
                .iter()
                .map(|e| (Duration::from_millis(2), e.clone()))
                .collect(),
        )
    })
    .await;
    let gateway = gateway_for(&upstream, "").await;
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let reply = send_messages(&gateway, "/v1/messages", &TAGS, &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.text(),
        upstream_bytes,
        "the stream must reach the client untouched"
    );
    assert_eq!(
        upstream.last().body,
        body.to_string().as_bytes(),
        "no stream_options added"
    );

    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["stream"], true);
    assert_eq!(trace["endpoint"], "messages");
    assert_eq!(
        trace["usage"],
        json!({"input_tokens": 1040, "output_tokens": 12, "cached_input_tokens": 1000, "source": "provider"})
    );
    assert_eq!(trace["response_body"]["content"], "Hello world");
    assert!(trace["latency"]["ttft_ms"].as_f64().is_some());
    let run = gateway
        .admin(&format!(
            "/api/v1/runs/{}",
            reply.header("x-flowgate-run-id")
        ))
        .await;
    assert_eq!(run["metrics"]["cached_input_tokens"], 1000);
    assert!(run["metrics"]["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn count_tokens_is_forwarded() {
    let upstream = Upstream::start(|_| Reply::Json(200, json!({"input_tokens": 14}))).await;
    let gateway = gateway_for(&upstream, "").await;
    let body = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hello, world"}]});
    let reply = send_messages(
        &gateway,
        "/v1/messages/count_tokens",
        &[],
        &body.to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"input_tokens": 14}));
    assert_eq!(upstream.last().path, "/v1/messages/count_tokens");
    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["endpoint"], "messages.count_tokens");
}

#[tokio::test]
async fn azure_gets_its_deployment_url_api_version_and_api_key() {
    let upstream =
        Upstream::start(|_| Reply::Json(200, chat_completion("hi from azure", 5, 2))).await;
    let extra = format!(
        "[[providers]]\nname = \"azure\"\nkind = \"azure\"\nbase_url = \"http://{}/\"\napi_key = \"azure-secret\"\napi_version = \"2024-10-21\"\nmodels = [\"my-gpt4o*\"]\n",
        upstream.addr
    );
    let gateway = TestGateway::start("http://127.0.0.1:9/v1", "", &extra).await;
    let reply = gateway
        .chat(
            &[("authorization", "Bearer sk-client")],
            json!({"model": "my-gpt4o-deployment", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "hi from azure"
    );
    let seen = upstream.last();
    assert_eq!(
        seen.path,
        "/openai/deployments/my-gpt4o-deployment/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen.headers["api-key"], "azure-secret");
    assert!(seen.headers.get("authorization").is_none());
    let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
    assert_eq!(trace["provider"], "azure");
    assert_eq!(trace["usage"]["input_tokens"], 5);
}

#[tokio::test]
async fn models_lists_anthropics_models_that_route_there() {
    let upstream = Upstream::start(|seen| {
        assert_eq!(seen.path, "/v1/models");
        Reply::Json(200, json!({"data": [
            {"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"},
            {"type": "model", "id": "not-routed-here", "display_name": "x", "created_at": "2025-01-01T00:00:00Z"}
        ], "has_more": false, "first_id": "claude-sonnet-4-5-20250929", "last_id": "not-routed-here"}))
    })
    .await;
    let gateway = gateway_for(&upstream, "sk-ant-provider").await;
    let reply = send(Method::GET, &format!("{}/v1/models", gateway.url), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let ids: Vec<String> = reply.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["owned_by"] == "anthropic")
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["claude-sonnet-4-5-20250929"]);
    assert_eq!(upstream.last().headers["x-api-key"], "sk-ant-provider");
}
