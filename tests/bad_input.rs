//! Bad input: each gets OpenAI's error JSON with the right status, is traced where it reached
//! the proxy, and leaves the gateway serving.

mod common;

use common::*;
use http::Method;
use serde_json::json;

/// (what, method, url, headers, body, status, error code, traced)
type Case<'a> = (
    &'a str,
    Method,
    String,
    Vec<(&'a str, &'a str)>,
    String,
    u16,
    &'a str,
    bool,
);

#[tokio::test]
async fn bad_requests_get_clear_errors_and_traces() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("ok", 1, 1))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "max_body_bytes = 2048", "").await;
    let chat = format!("{}/v1/chat/completions", gateway.url);
    let json_type = ("content-type", "application/json");
    let big = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            Method::POST,
            chat.clone(),
            vec![json_type],
            r#"{"model": "gpt-4o", "#.into(),
            400,
            "invalid_json",
            true,
        ),
        (
            "body too large",
            Method::POST,
            chat.clone(),
            vec![json_type],
            big,
            413,
            "request_too_large",
            true,
        ),
        (
            "missing model",
            Method::POST,
            chat.clone(),
            vec![json_type],
            r#"{"messages": []}"#.into(),
            400,
            "missing_model",
            true,
        ),
        (
            "unknown model",
            Method::POST,
            chat.clone(),
            vec![json_type],
            r#"{"model": "llama-9", "messages": []}"#.into(),
            404,
            "model_not_found",
            true,
        ),
        (
            "non-JSON content type",
            Method::POST,
            chat.clone(),
            vec![("content-type", "text/plain")],
            r#"{"model":"gpt-4o"}"#.into(),
            415,
            "unsupported_content_type",
            true,
        ),
        (
            "wrong method",
            Method::GET,
            chat.clone(),
            vec![],
            String::new(),
            405,
            "method_not_allowed",
            true,
        ),
        (
            "bad tagging header",
            Method::POST,
            chat.clone(),
            vec![json_type, ("x-flowgate-params", "novalue")],
            r#"{"model":"gpt-4o"}"#.into(),
            400,
            "invalid_header",
            true,
        ),
        (
            "unknown admin path",
            Method::GET,
            format!("{}/api/v1/nothing-here", gateway.url),
            vec![],
            String::new(),
            404,
            "not_found",
            false,
        ),
        (
            "unknown path",
            Method::GET,
            format!("{}/v2/chat", gateway.url),
            vec![],
            String::new(),
            404,
            "unknown_path",
            false,
        ),
    ];
    let mut traced = 0;
    for (what, method, url, headers, body, status, code, is_traced) in cases {
        let reply = send(method, &url, &headers, &body).await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.text());
        let error = &reply.json()["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
        assert!(error["type"].is_string(), "{what}");
        if code != "not_found" {
            assert_eq!(error["code"], code, "{what}: {error}");
        }
        if is_traced {
            traced += 1;
            let trace = gateway.trace(reply.header("x-flowgate-trace-id")).await;
            assert_eq!(trace["status"], status, "{what}");
            assert!(trace["error"]["class"].is_string(), "{what}: {trace}");
        }
    }
    assert!(
        upstream.requests().is_empty(),
        "no bad request may reach the upstream"
    );
    let listed = gateway.admin("/api/v1/traces?limit=100").await;
    assert_eq!(listed["traces"].as_array().unwrap().len(), traced);

    // Still serving.
    let reply = gateway
        .chat(&[], json!({"model": "gpt-4o", "messages": []}))
        .await;
    assert_eq!(reply.status, 200);
    let unknown = send(Method::POST, &chat, &[json_type], r#"{"model":"llama-9"}"#).await;
    let message = unknown.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("gpt-*") && message.contains("mock/*"),
        "the 404 lists what is configured: {message}"
    );
}

#[test]
fn a_bad_config_fails_serve_and_check_config_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisten = \"127.0.0.1:0\"\nport = 8080\n", "port"),
        (
            "[[providers]]\nname = \"x\"\nkind = \"openai\"\nbase_url = \"not a url\"\n",
            "base_url",
        ),
        ("[storage]\ncapture = \"everything\"\n", "capture"),
        (
            "[server]\nadmin_token = \"${FLOWGATE_TEST_UNSET_VARIABLE}\"\n",
            "FLOWGATE_TEST_UNSET_VARIABLE",
        ),
    ];
    for (index, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{index}.toml"));
        std::fs::write(&path, text).unwrap();
        for command in ["check-config", "serve"] {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
                .args([command, "--config", path.to_str().unwrap()])
                .env_remove("FLOWGATE_TEST_UNSET_VARIABLE")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{command} {text}: {stderr}");
            assert!(
                stderr.contains(&format!("bad-{index}.toml")),
                "{command}: names the file: {stderr}"
            );
            assert!(stderr.contains(key), "{command}: names {key}: {stderr}");
        }
    }
}

#[test]
fn check_config_prints_the_routing_table() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/flowgate.toml"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("mock") && stdout.contains("mock/*"),
        "{stdout}"
    );
    assert!(
        stdout.contains("openai") && stdout.contains("gpt-*"),
        "{stdout}"
    );
    assert!(
        stdout.contains("anthropic") && stdout.contains("claude-*"),
        "{stdout}"
    );
    // The shipped cache and guardrails, as they will run.
    assert!(
        stdout.contains("cache:  Deterministic mode, 8 MB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("guardrail: secrets: secrets on input and output, log"),
        "{stdout}"
    );
}
