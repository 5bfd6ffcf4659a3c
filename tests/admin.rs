//! The read side: admin API, scores, restart durability, the CLI, /metrics.

mod common;

use common::*;
use http::Method;
use serde_json::{json, Value};

async fn call(gateway: &TestGateway, version: &str, temperature: f64) -> String {
    let reply = gateway
        .chat(
            &[("x-flowgate-experiment", "qa"), ("x-flowgate-prompt-version", version)],
            json!({"model": "gpt-4o-mini", "temperature": temperature, "messages": [{"role": "user", "content": "q"}]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.header("x-flowgate-trace-id").to_owned()
}

#[tokio::test]
async fn runs_group_configurations_and_compare_marks_the_best() {
    let upstream = Upstream::start(|seen| {
        // The v2 prompt is wordier: more tokens, more cost.
        let tokens = if seen.json()["temperature"] == 0.0 {
            100
        } else {
            10
        };
        Reply::Json(200, chat_completion("a", tokens, tokens))
    })
    .await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    for _ in 0..3 {
        call(&gateway, "v1", 0.5).await;
        call(&gateway, "v2", 0.0).await;
    }
    let runs = gateway
        .admin("/api/v1/runs?experiment=qa&order_by=cost_usd")
        .await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        2,
        "prompt version and temperature make two runs"
    );
    assert_eq!(runs[0]["prompt_version"], "v1", "cheapest first");
    assert_eq!(runs[0]["metrics"]["requests"], 3);
    assert!(runs[0]["metrics"]["latency_ms"]["p95"].as_f64().unwrap() > 0.0);
    assert_eq!(runs[1]["sampling"]["temperature"], 0.0);

    let (v1, v2) = (
        runs[0]["id"].as_str().unwrap(),
        runs[1]["id"].as_str().unwrap(),
    );
    let compared = gateway
        .admin(&format!("/api/v1/runs/compare?ids={v1},{v2}"))
        .await;
    assert_eq!(compared["runs"].as_array().unwrap().len(), 2);
    assert_eq!(compared["best"]["cost_per_request_usd"], v1);

    let experiments = gateway.admin("/api/v1/experiments").await;
    let qa = experiments["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "qa")
        .unwrap()
        .clone();
    assert_eq!(qa["runs"], 2);
    assert_eq!(qa["traces"], 6);
}

#[tokio::test]
async fn traces_page_newest_first_and_filter() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 1, 1))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(call(&gateway, "v1", 0.5).await);
    }
    let first = gateway.admin("/api/v1/traces?experiment=qa&limit=3").await;
    let page: Vec<&str> = first["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[4].as_str(), ids[3].as_str(), ids[2].as_str()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = gateway
        .admin(&format!(
            "/api/v1/traces?experiment=qa&limit=3&cursor={cursor}"
        ))
        .await;
    assert_eq!(second["traces"].as_array().unwrap().len(), 2);
    assert_eq!(second["next_cursor"], Value::Null);
    let none = gateway.admin("/api/v1/traces?experiment=other").await;
    assert!(none["traces"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn scores_aggregate_into_the_run() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 1, 1))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let first = call(&gateway, "v1", 0.5).await;
    let second = call(&gateway, "v1", 0.5).await;
    for (trace, value) in [(&first, 1.0), (&second, 0.0)] {
        let reply = send(
            Method::POST,
            &format!("{}/api/v1/traces/{trace}/scores", gateway.url),
            &[("content-type", "application/json")],
            &json!({"name": "exact_match", "value": value, "comment": "graded"}).to_string(),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let trace = gateway.trace(&first).await;
    assert_eq!(trace["scores"][0]["name"], "exact_match");
    let run = gateway
        .admin(&format!(
            "/api/v1/runs/{}",
            trace["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        run["metrics"]["scores"]["exact_match"],
        json!({"count": 2, "mean": 0.5})
    );

    let missing = send(
        Method::POST,
        &format!(
            "{}/api/v1/traces/01900000-0000-7000-8000-000000000000/scores",
            gateway.url
        ),
        &[("content-type", "application/json")],
        r#"{"name":"x","value":1}"#,
    )
    .await;
    missing.assert_error(404, "trace_not_found");
    let metrics = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "")
        .await
        .text();
    assert!(metrics.contains("flowgate_score_sum{"), "{metrics}");
    assert!(metrics.contains("flowgate_score_count{"), "{metrics}");
}

#[tokio::test]
async fn a_restart_keeps_traces_and_runs_and_aggregation_continues() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 5, 5))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = TestGateway::start_in(dir.path(), &upstream.base_url(), "", "").await;
    let trace_id = call(&gateway, "v1", 0.5).await;
    let run_id = gateway.trace(&trace_id).await["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    gateway.stop().await;

    let mut gateway = TestGateway::start_in(dir.path(), &upstream.base_url(), "", "").await;
    assert_eq!(gateway.trace(&trace_id).await["id"], trace_id.as_str());
    call(&gateway, "v1", 0.5).await;
    let run = gateway.admin(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(
        run["metrics"]["requests"], 2,
        "the run continues where it stopped"
    );
    assert_eq!(run["metrics"]["input_tokens"], 10);
    gateway.stop().await;
}

#[tokio::test]
async fn metrics_follow_the_contract_and_healthz_answers() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 5, 5))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    call(&gateway, "v1", 0.5).await;
    gateway.admin("/api/v1/runs").await; // waits for the recorder
    let health = send(Method::GET, &format!("{}/healthz", gateway.url), &[], "").await;
    assert_eq!(health.status, 200);
    let metrics = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "")
        .await
        .text();
    for needle in [
        r#"flowgate_requests_total{experiment="qa",prompt_version="v1",provider="openai",model="gpt-4o-mini",status="200"} 1"#,
        r#"flowgate_tokens_total{experiment="qa",prompt_version="v1",provider="openai",model="gpt-4o-mini",kind="input"} 5"#,
        "flowgate_cost_usd_total{",
        "flowgate_overhead_seconds_count 1",
        "flowgate_upstream_duration_seconds_count{",
        "flowgate_request_duration_seconds_bucket{",
        "flowgate_traces_dropped_total 0",
        "flowgate_trace_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle}\n{metrics}");
    }
}

#[tokio::test]
async fn admin_token_is_required_when_set() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 1, 1))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "admin_token = \"s3cret\"", "").await;
    let url = format!("{}/api/v1/runs", gateway.url);
    send(Method::GET, &url, &[], "")
        .await
        .assert_error(401, "invalid_admin_token");
    send(Method::GET, &url, &[("authorization", "Bearer wrong")], "")
        .await
        .assert_error(401, "invalid_admin_token");
    let ok = send(Method::GET, &url, &[("authorization", "Bearer s3cret")], "").await;
    assert_eq!(ok.status, 200);
    // Client traffic does not need (or get anything from) the admin token.
    assert_eq!(
        gateway
            .chat(&[], json!({"model": "gpt-4o-mini", "messages": []}))
            .await
            .status,
        200
    );
}

/// This host's address on its default route: a peer that is not loopback.
fn non_loopback_address() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    // Connecting a UDP socket sends nothing; it only picks the source address of the route.
    socket
        .connect("198.51.100.1:9")
        .expect("this test needs a non-loopback interface with a default route");
    let address = socket.local_addr().expect("local address").ip();
    assert!(!address.is_loopback(), "{address}");
    address
}

#[tokio::test]
async fn without_a_token_the_admin_api_refuses_peers_that_are_not_loopback() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 1, 1))).await;
    let dir = tempfile::tempdir().unwrap();
    let host = non_loopback_address();
    // (server settings, admin status from the remote peer)
    for (server, remote_admin_status) in [("", 403), ("admin_token = \"s3cret\"", 200)] {
        let gateway =
            TestGateway::start_on("0.0.0.0:0", dir.path(), &upstream.base_url(), server, "").await;
        let port = gateway.gateway.as_ref().unwrap().addr.port();
        let remote = format!("http://{host}:{port}");
        let bearer = [("authorization", "Bearer s3cret")];
        for path in ["/api/v1/runs", "/metrics"] {
            let reply = send(Method::GET, &format!("{remote}{path}"), &bearer, "").await;
            assert_eq!(
                reply.status,
                remote_admin_status,
                "{server:?} {path}: {}",
                reply.text()
            );
            if remote_admin_status == 403 {
                reply.assert_error(403, "admin_loopback_only");
            }
            let local = send(Method::GET, &format!("{}{path}", gateway.url), &bearer, "").await;
            assert_eq!(local.status, 200, "loopback, {server:?} {path}");
        }
        // Client traffic is served to any peer; its key never opens the admin API.
        let chat = send(
            Method::POST,
            &format!("{remote}/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer sk-client"),
            ],
            &json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
        )
        .await;
        assert_eq!(chat.status, 200, "{}", chat.text());
        let mut gateway = gateway;
        gateway.stop().await;
    }
}

#[tokio::test]
async fn the_cli_reads_the_admin_api() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 5, 5))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let trace_id = call(&gateway, "v1", 0.5).await;
    let url = gateway.url.clone();
    let run = move |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(args)
            .args(["--url", &url])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let trace_id2 = trace_id.clone();
    let (runs, runs_json, experiments, traces, shown) = tokio::task::spawn_blocking(move || {
        (
            run(&["runs", "list"]),
            run(&["runs", "list", "--json"]),
            run(&["experiments", "list"]),
            run(&["traces", "list"]),
            run(&["traces", "show", &trace_id2]),
        )
    })
    .await
    .unwrap();
    let run_id = serde_json::from_str::<Value>(&runs_json).unwrap()["runs"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        runs.contains(&run_id) && runs.contains("gpt-4o-mini") && runs.contains("qa"),
        "{runs}"
    );
    assert!(
        runs.lines().next().unwrap().contains("RUN"),
        "a header row: {runs}"
    );
    assert!(experiments.contains("qa"), "{experiments}");
    assert!(traces.contains(&trace_id), "{traces}");
    assert!(shown.contains(&trace_id), "{shown}");

    let url = gateway.url.clone();
    let missing = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["runs", "show", "0000000000000000", "--url", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(!missing.stderr.is_empty());
}

#[tokio::test]
async fn a_call_still_streaming_at_shutdown_is_recorded_as_cancelled() {
    let upstream = Upstream::start(|_| {
        Reply::Sse(vec![
            (std::time::Duration::ZERO, chunk("first")),
            (std::time::Duration::from_secs(60), chunk("never")),
        ])
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = TestGateway::start_in(
        dir.path(),
        &upstream.base_url(),
        "shutdown_grace_ms = 200",
        "",
    )
    .await;
    let response = open(
        Method::POST,
        &format!("{}/v1/chat/completions", gateway.url),
        &[("content-type", "application/json")],
        &json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string(),
    )
    .await;
    let trace_id = trace_id_of(&response);
    let mut body = response.into_body();
    assert!(next_data(&mut body, std::time::Duration::from_secs(5))
        .await
        .is_some());
    gateway.stop().await;
    drop(body);

    let gateway = TestGateway::start_in(dir.path(), &upstream.base_url(), "", "").await;
    let trace = gateway.trace(&trace_id).await;
    assert_eq!(trace["error"]["class"], "cancelled");
    assert_eq!(trace["response_body"]["content"], "first");
}
