//! The shipped dashboards and alerts against a real Prometheus (Debian's `prometheus` package,
//! installed by scripts/test.sh): a gateway with a mock upstream serves traffic across two
//! experiments and several prompt versions and models — answers, streams, upstream errors, scores;
//! Prometheus scrapes it every second; then every PromQL expression of every dashboard panel is
//! evaluated through Prometheus' HTTP API with the template variables filled in, and must return
//! data. promtool checks the scrape config, the alerting rules (and their unit tests) and lints
//! the exposition.

mod common;
mod grafana;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use common::{asked_for_usage, chunk, send, usage_chunk, Reply, Seen, TestGateway, Upstream, DONE};

/// Config for features whose panels need it (TOML added after the providers). The traffic below
/// includes a repeated deterministic call (a cache hit) and a call carrying an e-mail address and
/// an API key (a guardrail verdict once a pii or secrets guardrail is configured here).
const FEATURE_CONFIG: &str = r#"
[cache]
enabled = true
mode = "deterministic"

[[guardrails]]
name = "pii"
stage = "input"
action = "log"
"#;

/// Queries (dashboard, panel title, refId) that may return no data as long as FEATURE_CONFIG
/// does not turn their feature on. They must still parse; once one returns data, the test fails
/// until it is removed from here, so this list cannot go stale.
const AWAITING_FEATURES: &[(&str, &str, &str)] = &[];

/// The values the template variables take: real label values of the traffic below.
fn variable_values(dashboard: &str) -> Vec<(&'static str, &'static str)> {
    let mut values = vec![
        ("__rate_interval", "1m"),
        ("__range", "5m"),
        ("__interval", "15s"),
    ];
    values.extend(match dashboard {
        "flowgate-overview.json" => [
            ("experiment", "exp-a"),
            ("provider", "openai"),
            ("model", "gpt-4o-mini"),
        ],
        _ => [
            ("experiment", "exp-a"),
            ("prompt_version", "v1|v2"),
            ("model", "gpt-4o-mini|gpt-4o"),
        ],
    });
    values
}

// ---------------------------------------------------------------------------------------------
// Traffic

const EXPERIMENTS: [(&str, [&str; 2]); 2] = [("exp-a", ["v1", "v2"]), ("exp-b", ["v1", "v3"])];
const MODELS: [&str; 2] = ["gpt-4o-mini", "gpt-4o"];

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An answer, then a quality score posted to its trace.
    Scored,
    Stream,
    /// The upstream answers 500.
    UpstreamError,
    /// The same deterministic call twice: the second is a cache hit when the cache is on.
    Repeated,
    /// A message with an e-mail address and an API key, for the pii and secrets guardrails.
    Sensitive,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    experiment: &'static str,
    prompt_version: &'static str,
    model: &'static str,
    kind: Kind,
}

fn traffic() -> Vec<Step> {
    let mut steps = Vec::new();
    for (experiment, versions) in EXPERIMENTS {
        for prompt_version in versions {
            for model in MODELS {
                for kind in [Kind::Scored, Kind::Stream] {
                    steps.push(Step {
                        experiment,
                        prompt_version,
                        model,
                        kind,
                    });
                }
            }
            let model = MODELS[0];
            for kind in [Kind::UpstreamError, Kind::Repeated, Kind::Sensitive] {
                steps.push(Step {
                    experiment,
                    prompt_version,
                    model,
                    kind,
                });
            }
        }
    }
    steps
}

/// The mock upstream: streams when asked, fails on request, answers with cached input otherwise.
fn upstream_answer(seen: &Seen) -> Reply {
    let body = seen.json();
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    if seen.body.windows(11).any(|w| w == b"please fail") {
        return Reply::Json(
            500,
            json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}),
        );
    }
    if body["stream"] == true {
        let mut events: Vec<String> = ["Hel", "lo"].iter().map(|w| chunk(w)).collect();
        if asked_for_usage(seen) {
            events.push(usage_chunk(12, 2));
        }
        events.push(DONE.to_owned());
        let paced = events
            .into_iter()
            .map(|e| (Duration::from_millis(15), e))
            .collect();
        return Reply::Sse(paced);
    }
    Reply::Json(
        200,
        json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25,
                      "prompt_tokens_details": {"cached_tokens": 8}}
        }),
    )
}

/// Sends every step; returns the trace ids the gateway answered with.
async fn send_traffic(gateway: &TestGateway) -> Vec<String> {
    let mut trace_ids = Vec::new();
    for step in traffic() {
        let headers = [
            ("x-flowgate-experiment", step.experiment),
            ("x-flowgate-prompt-version", step.prompt_version),
        ];
        let content = match step.kind {
            Kind::UpstreamError => "please fail",
            Kind::Sensitive => {
                "Mail jane.doe@example.com, key sk-proj-abcdefghijklmnopqrstuvwxyz012345"
            }
            _ => "Hello",
        };
        let mut body =
            json!({"model": step.model, "messages": [{"role": "user", "content": content}]});
        if matches!(step.kind, Kind::Stream) {
            body["stream"] = json!(true);
        }
        if matches!(step.kind, Kind::Repeated) {
            body["temperature"] = json!(0);
            body["seed"] = json!(7);
        }
        let times = if matches!(step.kind, Kind::Repeated) {
            2
        } else {
            1
        };
        for _ in 0..times {
            let reply = gateway.chat(&headers, body.clone()).await;
            let expected = if matches!(step.kind, Kind::UpstreamError) {
                500
            } else {
                200
            };
            assert_eq!(reply.status, expected, "{step:?}: {}", reply.text());
            trace_ids.push(reply.header("x-flowgate-trace-id").to_owned());
        }
        if matches!(step.kind, Kind::Scored) {
            let id = trace_ids.last().cloned().unwrap_or_default();
            let url = format!("{}/api/v1/traces/{id}/scores", gateway.url);
            let value = if step.prompt_version == "v1" {
                1.0
            } else {
                0.5
            };
            let score = json!({"name": "exact_match", "value": value}).to_string();
            let reply = send(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                &score,
            )
            .await;
            assert!(reply.status.is_success(), "score: {}", reply.text());
        }
    }
    gateway.admin("/api/v1/runs").await; // the recorder has counted every call
    trace_ids
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// `name` on the PATH; the test never skips: without Prometheus it fails and says how to get it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on the PATH. Run scripts/test.sh once: it installs Debian's \
                 `prometheus` package (prometheus and promtool), which this test needs."
            )
        })
}

struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus on an ephemeral port, scraping `target` every second and evaluating
    /// the shipped alerting rules.
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = grafana::path("dashboards/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: flowgate\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = rules.display()
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let (child, url, log) = launch(dir.path(), &config_file);
        let mut prometheus = Prometheus {
            child,
            url,
            log,
            dir,
        };
        // The port was free when probed; another process may take it before Prometheus binds.
        for _ in 0..3 {
            match prometheus.wait_until_ready().await {
                Ok(()) => return prometheus,
                Err(log) if log.contains("address already in use") => {
                    let (child, url, log) = launch(prometheus.dir.path(), &config_file);
                    (prometheus.child, prometheus.url, prometheus.log) = (child, url, log);
                }
                Err(log) => panic!("prometheus did not start: {log}"),
            }
        }
        panic!("prometheus found no free port:\n{}", prometheus.log());
    }

    /// Ready to answer queries; `Err` with its log when it exited or did not get ready in time.
    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}):\n{}", self.log()));
            }
            let ready = tokio::time::timeout(
                Duration::from_secs(1),
                common::client().request(common::request(
                    Method::GET,
                    &format!("{}/-/ready", self.url),
                    &[],
                    "",
                )),
            )
            .await;
            if matches!(ready, Ok(Ok(ref response)) if response.status() == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 30 s:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/{path}?{params}`: its `data`, or the whole answer when it is not a success.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect();
        let url = format!("{}/api/v1/{path}?{}", self.url, query.join("&"));
        let reply = send(Method::GET, &url, &[], "").await;
        let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if body["status"] != "success" {
            return Err(format!("{}: {}", reply.status, reply.text()));
        }
        Ok(body["data"].clone())
    }

    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Scrapes of the gateway so far (within the last 10 minutes); each must have succeeded.
    async fn scrapes(&self) -> u64 {
        let up = self
            .query(r#"up{job="flowgate"}"#)
            .await
            .unwrap_or_default();
        if let Some(sample) = up.first() {
            assert_eq!(
                sample["value"][1],
                "1",
                "scrape failed: {:?}",
                self.api("targets", &[]).await
            );
        }
        let count = self
            .query(r#"count_over_time(up{job="flowgate"}[10m])"#)
            .await
            .unwrap_or_default();
        count
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
            .unwrap_or(0)
    }

    async fn wait_for_scrapes(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.scrapes().await < count {
            assert!(
                Instant::now() < deadline,
                "fewer than {count} scrapes:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Starts Prometheus on a free port with its data and log in `dir`: the child, its URL, its log.
fn launch(dir: &Path, config_file: &Path) -> (Child, String, PathBuf) {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let log = dir.join(format!("prometheus-{port}.log"));
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--enable-feature=exemplar-storage")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("prometheus did not start");
    (child, format!("http://127.0.0.1:{port}"), log)
}

/// Percent-encodes a query parameter value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn has_finite_value(result: &[Value]) -> bool {
    result.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Evaluates every dashboard query; returns what failed, one line each.
async fn check_dashboard_queries(prometheus: &Prometheus) -> Vec<String> {
    let mut failures = Vec::new();
    let mut awaited = HashSet::new();
    for file in grafana::DASHBOARDS {
        let dashboard = grafana::load(file);
        let values = variable_values(file);
        for query in grafana::queries(file, &dashboard) {
            let expr = grafana::substitute(&query.expr, &values);
            let awaiting =
                AWAITING_FEATURES.contains(&(file, query.panel.as_str(), query.ref_id.as_str()));
            if awaiting {
                awaited.insert((file, query.panel.clone(), query.ref_id.clone()));
            }
            match (prometheus.query(&expr).await, awaiting) {
                (Err(err), _) => failures.push(format!(
                    "{}: does not evaluate: {err}\n    {expr}",
                    query.name()
                )),
                (Ok(result), false) if !has_finite_value(&result) => failures.push(format!(
                    "{}: no data ({} series, none with a finite value)\n    {expr}",
                    query.name(),
                    result.len()
                )),
                (Ok(result), true) if !result.is_empty() => failures.push(format!(
                    "{}: returns data now: remove it from AWAITING_FEATURES",
                    query.name()
                )),
                _ => {}
            }
        }
    }
    for (file, panel, ref_id) in AWAITING_FEATURES {
        if !awaited.contains(&(*file, (*panel).to_owned(), (*ref_id).to_owned())) {
            failures.push(format!(
                "AWAITING_FEATURES names {file} / {panel} / {ref_id}, which is not a query"
            ));
        }
    }
    failures
}

/// Each template variable's `label_values(...)` offers the values the queries were run with.
async fn check_variables(prometheus: &Prometheus) -> Vec<String> {
    let mut failures = Vec::new();
    for file in grafana::DASHBOARDS {
        let dashboard = grafana::load(file);
        let values = variable_values(file);
        for variable in grafana::variables(&dashboard) {
            let Some((selector, label)) = grafana::label_values(variable) else {
                continue;
            };
            let selector = grafana::substitute(&selector, &values);
            let offered: BTreeSet<String> =
                match prometheus.api("series", &[("match[]", &selector)]).await {
                    Ok(series) => series
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s[&label].as_str().map(str::to_owned))
                        .collect(),
                    Err(err) => {
                        failures.push(format!("{file}: variable {label}: {err}"));
                        continue;
                    }
                };
            let name = variable["name"].as_str().unwrap_or_default();
            let used = values
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("", |(_, v)| *v);
            for value in used.split('|') {
                if !offered.contains(value) {
                    failures.push(format!(
                        "{file}: variable {name} offers {offered:?}, not {value}"
                    ));
                }
            }
        }
    }
    failures
}

/// The latency histograms' exemplars reached Prometheus with the gateway's trace ids.
async fn check_exemplars(prometheus: &Prometheus, trace_ids: &[String]) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (start, end) = ((now - 600).to_string(), (now + 60).to_string());
    let params = [
        ("query", "flowgate_request_duration_seconds_bucket"),
        ("start", start.as_str()),
        ("end", end.as_str()),
    ];
    let data = match prometheus.api("query_exemplars", &params).await {
        Ok(data) => data,
        Err(err) => return vec![format!("query_exemplars: {err}")],
    };
    let found: Vec<&str> = data
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|series| series["exemplars"].as_array().into_iter().flatten())
        .filter_map(|e| e["labels"]["trace_id"].as_str())
        .collect();
    if found.iter().any(|id| trace_ids.iter().any(|t| t == id)) {
        Vec::new()
    } else {
        vec![format!(
            "no exemplar carries a trace id of the traffic: {found:?}"
        )]
    }
}

/// Prometheus evaluated every shipped alerting rule against the gateway's series without error.
async fn check_rules(prometheus: &Prometheus) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rules: Vec<Value> = match prometheus.api("rules", &[]).await {
            Ok(data) => data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect(),
            Err(err) => return vec![format!("rules: {err}")],
        };
        let unevaluated = rules.iter().any(|r| r["health"] == "unknown");
        if !rules.is_empty() && (!unevaluated || Instant::now() > deadline) {
            return rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("alert {}: {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
        }
        if Instant::now() > deadline {
            return vec!["Prometheus loaded no rules from dashboards/alerts.yml".into()];
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `promtool check metrics` (the classic format's parser and lint) on the gateway's /metrics.
async fn check_exposition_lint(gateway: &TestGateway) -> Vec<String> {
    let text = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "")
        .await
        .text();
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool did not start");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().expect("promtool did not finish");
    if output.status.success() {
        return Vec::new();
    }
    vec![format!(
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let upstream = Upstream::start(upstream_answer).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", FEATURE_CONFIG).await;
    // First wave before Prometheus starts, so every series exists from its first scrape on;
    // the second wave between scrapes, so rates over the window are positive.
    let mut trace_ids = send_traffic(&gateway).await;
    let target = gateway.url.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&target).await;
    prometheus.wait_for_scrapes(2).await;
    trace_ids.extend(send_traffic(&gateway).await);
    let scraped = prometheus.scrapes().await;
    prometheus.wait_for_scrapes(scraped + 2).await;

    let mut failures = check_dashboard_queries(&prometheus).await;
    failures.extend(check_variables(&prometheus).await);
    failures.extend(check_exemplars(&prometheus, &trace_ids).await);
    failures.extend(check_rules(&prometheus).await);
    failures.extend(check_exposition_lint(&gateway).await);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn promtool(args: &[&str]) {
    let dashboards = grafana::path("dashboards");
    let output = Command::new(tool("promtool"))
        .args(args)
        .current_dir(&dashboards)
        .output()
        .expect("promtool did not start");
    assert!(
        output.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_alerting_rules() {
    assert!(Path::new(&grafana::path("dashboards/prometheus.yml")).is_file());
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn the_alerts_fire_on_the_traffic_they_are_about_and_only_then() {
    promtool(&["test", "rules", "alerts.test.yml"]);
}
