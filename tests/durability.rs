//! The process as an operator sees it: SIGTERM lets a stream finish and stores its trace; after
//! `kill -9` under load, a restart finds every trace that was flushed and aggregates that agree.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::{json, Value};

struct Process {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Drop for Process {
    /// A test that fails half-way must not leave its gateway running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `flowgate serve` on a fresh port with the store in `dir`.
async fn start(dir: &Path, upstream: &str) -> Process {
    start_with(dir, upstream, "", &[]).await
}

/// As [`start`], with more config and environment variables.
async fn start_with(dir: &Path, upstream: &str, extra: &str, env: &[(&str, &str)]) -> Process {
    let port = free_port();
    let config = dir.join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_ms = 10000

[storage]
path = "{store}"
flush_interval_ms = 100

[[providers]]
name = "openai"
kind = "openai"
base_url = "{upstream}"
models = ["gpt-*"]

[[providers]]
name = "mock"
kind = "mock"
models = ["mock/*"]

{extra}
"#,
            store = dir.join("flowgate.sled").display()
        ),
    )
    .unwrap();
    let log_path = dir.join(format!("flowgate-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let health = format!("{url}/healthz");
    eventually(Duration::from_secs(30), async || {
        let ok = client()
            .request(request(Method::GET, &health, &[], ""))
            .await
            .is_ok_and(|r| r.status() == 200);
        ok.then_some(())
    })
    .await;
    Process {
        child,
        url,
        log: log_path,
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the gateway did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, and the exit status a clean stop gives.
async fn stop_cleanly(process: &mut Process) {
    signal(&process.child, "-TERM");
    let status = wait_exit(&mut process.child, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_lets_a_stream_finish_stores_its_trace_and_exits_0() {
    let upstream = Upstream::start(|_| {
        let mut events: Vec<(Duration, String)> = (0..5)
            .map(|i| (Duration::from_millis(150), chunk(&format!("w{i} "))))
            .collect();
        events.push((Duration::ZERO, DONE.to_owned()));
        Reply::Sse(events)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start(dir.path(), &upstream.base_url()).await;
    let response = open(
        Method::POST,
        &format!("{}/v1/chat/completions", gateway.url),
        &[("content-type", "application/json")],
        &json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string(),
    )
    .await;
    let trace_id = trace_id_of(&response);
    let mut body = response.into_body();
    let mut received =
        String::from_utf8_lossy(&next_data(&mut body, Duration::from_secs(5)).await.unwrap())
            .into_owned();

    signal(&gateway.child, "-TERM");
    while let Some(data) = next_data(&mut body, Duration::from_secs(5)).await {
        received.push_str(&String::from_utf8_lossy(&data));
    }
    assert!(
        received.contains("w4") && received.contains("[DONE]"),
        "the stream completes: {received}"
    );
    let status = wait_exit(&mut gateway.child, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));

    let mut restarted = start(dir.path(), &upstream.base_url()).await;
    let log = std::fs::read_to_string(&restarted.log).unwrap();
    assert!(
        !log.contains("recomputed"),
        "a clean stop needs no recompute: {log}"
    );
    let trace = send(
        Method::GET,
        &format!("{}/api/v1/traces/{trace_id}", restarted.url),
        &[],
        "",
    )
    .await;
    assert_eq!(trace.status, 200, "{}", trace.text());
    let trace = trace.json();
    assert_eq!(trace["status"], 200);
    assert_eq!(trace["error"], Value::Null, "{trace}");
    assert_eq!(trace["response_body"]["content"], "w0 w1 w2 w3 w4 ");
    stop_cleanly(&mut restarted).await;
}

#[tokio::test]
async fn after_kill_9_under_load_flushed_traces_survive_and_runs_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start(dir.path(), "http://127.0.0.1:9/v1").await;
    let url = format!("{}/v1/chat/completions", gateway.url);
    // Four workers call in a loop, each remembering its completed calls with their finish time.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut workers = Vec::new();
    for worker in 0..4 {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let body = json!({"model": "mock/gpt-4o-mini", "messages": [{"role": "user", "content": format!("w{worker} q{i}")}]});
                let headers = [("content-type", "application/json"), ("x-flowgate-experiment", "crash"), ("x-flowgate-prompt-version", if i % 2 == 0 { "a" } else { "b" })];
                // The kill cuts calls off: an error ends this worker, it does not fail the test.
                let call = client().request(request(Method::POST, &url, &headers, body.to_string()));
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(reply)) if reply.status() == 200 => {
                        let id = reply.headers()["x-flowgate-trace-id"].to_str().unwrap().to_owned();
                        use http_body_util::BodyExt;
                        if reply.into_body().collect().await.is_err() {
                            break;
                        }
                        done.push((id, Instant::now()));
                    }
                    _ => break,
                }
                i += 1;
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(&gateway.child, "-KILL");
    let killed_at = Instant::now();
    let _ = wait_exit(&mut gateway.child, Duration::from_secs(10)).await;
    let mut completed = Vec::new();
    for worker in workers {
        completed.extend(worker.await.unwrap());
    }
    assert!(completed.len() > 50, "some load ran: {}", completed.len());

    let store = dir.path().join("flowgate.sled");
    let check = store_check(&store);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        report.contains("not clean"),
        "store check tells of the crash: {report}"
    );

    // Pointed at the directory above the store, it says so and creates nothing there.
    let above = store_check(dir.path());
    let stderr = String::from_utf8_lossy(&above.stderr);
    assert_eq!(above.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no flowgate store at"), "{stderr}");
    assert!(
        !dir.path().join("db").exists(),
        "no store made where none was"
    );

    let mut restarted = start(dir.path(), "http://127.0.0.1:9/v1").await;
    // While a gateway holds the store, a second one fails with a message naming the path and
    // what to do, not a panic.
    let second = store_check(&store);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(store.to_str().unwrap())
            && stderr.contains("move it aside")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(&restarted.log).unwrap();
    assert!(
        log.contains("recomputed"),
        "an unclean stop makes the next start recompute the runs: {log}"
    );
    let admin = |path: String| {
        let url = format!("{}{path}", restarted.url);
        async move { send(Method::GET, &url, &[], "").await }
    };
    // flush_interval_ms = 100: anything finished 500 ms before the kill was flushed.
    let must_survive: Vec<&String> = completed
        .iter()
        .filter(|(_, at)| killed_at.duration_since(*at) > Duration::from_millis(500))
        .map(|(id, _)| id)
        .collect();
    assert!(!must_survive.is_empty());
    for id in &must_survive {
        let reply = admin(format!("/api/v1/traces/{id}")).await;
        assert_eq!(
            reply.status, 200,
            "trace {id} finished well before the kill and was lost"
        );
    }
    let runs = admin("/api/v1/runs?experiment=crash".into()).await.json();
    let mut total = 0;
    for run in runs["runs"].as_array().unwrap() {
        let id = run["id"].as_str().unwrap();
        // Every page: a fast machine stores more than one page per run in that second.
        let mut stored = 0;
        let mut cursor = String::new();
        loop {
            let page = admin(format!("/api/v1/traces?run={id}&limit=1000{cursor}"))
                .await
                .json();
            stored += page["traces"].as_array().unwrap().len();
            match page["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        assert_eq!(
            run["metrics"]["requests"], stored,
            "run {id} agrees with its stored traces"
        );
        total += stored;
    }
    assert!(total >= must_survive.len());
    stop_cleanly(&mut restarted).await;
}

#[tokio::test]
async fn a_trace_record_lost_in_a_power_cut_is_named_and_the_rest_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start(dir.path(), "http://127.0.0.1:9/v1").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let reply = send(
            Method::POST,
            &format!("{}/v1/chat/completions", gateway.url),
            &[("content-type", "application/json")],
            &json!({"model": "mock/gpt-4o-mini", "messages": [{"role": "user", "content": format!("q{i}")}]}).to_string(),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        ids.push(
            reply.headers["x-flowgate-trace-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    stop_cleanly(&mut gateway).await;
    // The last record's bytes never reached the disk, though sled kept where it was.
    let store = dir.path().join("flowgate.sled");
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(store.join("traces.log"))
        .unwrap();
    log.set_len(log.metadata().unwrap().len() - 5).unwrap();

    let check = store_check(&store);
    let (report, warnings) = (
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
    );
    assert!(check.status.success(), "{report}{warnings}");
    assert!(
        report.contains("traces:      2") && report.contains("unreadable:  1"),
        "{report}"
    );
    assert!(
        warnings.contains(&ids[2]),
        "the lost trace is named: {warnings}"
    );

    let restarted = start(dir.path(), "http://127.0.0.1:9/v1").await;
    let listed = send(
        Method::GET,
        &format!("{}/api/v1/traces?limit=10", restarted.url),
        &[],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let listed: Vec<String> = listed.json()["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, [ids[1].clone(), ids[0].clone()]);
    let lost = send(
        Method::GET,
        &format!("{}/api/v1/traces/{}", restarted.url, ids[2]),
        &[],
        "",
    )
    .await;
    assert_eq!(lost.status, 500);
    assert!(lost.text().contains("cannot be read"), "{}", lost.text());
}

/// Every byte under `dir`, file by file.
#[test]
fn store_check_does_not_upgrade_an_older_store() {
    // What an older flowgate left: its schema version, and a trace entry in its old layout.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flowgate.sled");
    let schema = |db: &sled::Db| db.open_tree("meta").unwrap().get("schema_version").unwrap();
    {
        let db = sled::Config::new().path(&store).open().unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &3u32.to_be_bytes())
            .unwrap();
        db.open_tree("traces")
            .unwrap()
            .insert([1u8; 16], &[2u8; 13])
            .unwrap();
        db.flush().unwrap();
    }
    let check = store_check(&store);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("schema version 3") && stderr.contains("leaves it as it is"),
        "{stderr}"
    );
    let db = sled::Config::new().path(&store).open().unwrap();
    assert_eq!(
        schema(&db).unwrap().as_ref(),
        3u32.to_be_bytes(),
        "still schema 3"
    );
    assert!(
        db.tree_names()
            .iter()
            .any(|name| name == b"traces".as_slice()),
        "the old layout is untouched"
    );
}

fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[tokio::test]
async fn keys_never_reach_the_store_or_the_logs() {
    const PROVIDER_KEY: &str = "sk-provider-SECRET-4417";
    const CLIENT_KEY: &str = "sk-client-SECRET-8802";
    const HEADER_KEY: &str = "sk-header-SECRET-1290";
    let upstream = Upstream::start(|seen| {
        if seen.json()["model"] == "gpt-denied" {
            Reply::Json(401, json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}))
        } else if seen.json()["stream"] == true {
            Reply::Sse(streamed_answer(&["ok"], asked_for_usage(seen)).into_iter().map(|e| (Duration::ZERO, e)).collect())
        } else {
            Reply::Json(200, chat_completion("ok", 3, 1))
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[providers]]\nname = \"keyed\"\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"{PROVIDER_KEY}\"\nmodels = [\"keyed-*\"]",
        upstream.base_url()
    );
    let mut gateway = start_with(
        dir.path(),
        &upstream.base_url(),
        &extra,
        &[("FLOWGATE_LOG", "trace")],
    )
    .await;
    let url = format!("{}/v1/chat/completions", gateway.url);
    let bearer = format!("Bearer {CLIENT_KEY}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", bearer.as_str()),
        ("x-api-key", HEADER_KEY),
        ("api-key", HEADER_KEY),
    ];
    for (model, stream) in [
        ("gpt-4o-mini", false),
        ("gpt-4o-mini", true),
        ("keyed-model", false),
        ("gpt-denied", false),
        ("nope", false),
    ] {
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        send(Method::POST, &url, &headers, &body.to_string()).await;
    }
    let keyed = upstream
        .requests()
        .into_iter()
        .find(|r| r.json()["model"] == "keyed-model")
        .unwrap();
    assert_eq!(
        keyed.headers["authorization"],
        format!("Bearer {PROVIDER_KEY}").as_str(),
        "the provider key is used upstream"
    );
    stop_cleanly(&mut gateway).await;

    let files = files_under(dir.path());
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("flowgate.sled")),
        "the store was written"
    );
    let log = std::fs::read_to_string(&gateway.log).unwrap();
    assert!(log.len() > 100, "the log has content to scan: {log}");
    for (path, bytes) in &files {
        if path.ends_with("flowgate.toml") {
            continue; // the operator's own config holds the provider key
        }
        for secret in [PROVIDER_KEY, CLIENT_KEY, HEADER_KEY] {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret} found in {}", path.display());
        }
    }
}

#[tokio::test]
async fn json_logs_carry_the_trace_id_of_a_failed_call() {
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}/v1", free_port());
    let mut gateway = start_with(dir.path(), &closed, "", &[("FLOWGATE_LOG_FORMAT", "json")]).await;
    let reply = send(
        Method::POST,
        &format!("{}/v1/chat/completions", gateway.url),
        &[("content-type", "application/json")],
        &json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
    )
    .await;
    assert_eq!(reply.status, 502);
    let trace_id = reply.header("x-flowgate-trace-id").to_owned();
    signal(&gateway.child, "-TERM");
    wait_exit(&mut gateway.child, Duration::from_secs(15)).await;
    let log = std::fs::read_to_string(&gateway.log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(&trace_id))
        .unwrap_or_else(|| panic!("no log line names {trace_id}: {log}"));
    let entry: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(entry["fields"]["trace_id"], trace_id.as_str(), "{entry}");
    assert_eq!(entry["fields"]["code"], "upstream_unreachable", "{entry}");
}

/// `flowgate store check --path <path>`, run to completion.
fn store_check(path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["store", "check", "--path"])
        .arg(path)
        .output()
        .unwrap()
}
