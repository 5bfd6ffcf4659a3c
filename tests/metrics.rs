//! `/metrics` as a scraper sees it: the format it asked for, trace-id exemplars, label values
//! bounded whatever clients send; and the recorder's metric updates cost no allocation once a
//! label set has been seen (counted by this binary's global allocator).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;

use http::Method;
use serde_json::json;

use common::{chat_completion, send, Reply, TestGateway, Upstream};
use flowgate::telemetry::{Metrics, MetricsWriter};
use flowgate::trace::{GuardrailVerdict, Latency, Score, Trace, Usage};

/// Counts the allocations of the current thread, so tests running alongside do not interfere.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations_during(work: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    work();
    ALLOCATIONS.with(Cell::get) - before
}

/// A call with every kind of metric: tokens, cost, TTFT, upstream time, cache, guardrails.
fn finished_call(id: usize, total_ms: f64) -> Trace {
    Trace {
        id: format!("0190f5c2-7a4e-7cc2-9d3b-{id:012x}"),
        experiment: "qa".into(),
        prompt_version: Some("v1".into()),
        provider: Some("openai".into()),
        served_model: Some("gpt-4o-mini".into()),
        status: if id.is_multiple_of(7) { 500 } else { 200 },
        cost_usd: Some(0.001),
        cache: ["hit", "miss", "bypass"][id % 3].into(),
        guardrails: vec![
            GuardrailVerdict {
                guardrail: "pii".into(),
                verdict: ["pass", "redacted"][id % 2].into(),
                ..Default::default()
            },
            GuardrailVerdict {
                guardrail: "secrets".into(),
                verdict: "pass".into(),
                ..Default::default()
            },
        ],
        usage: Usage {
            input_tokens: Some(30),
            output_tokens: Some(20),
            cached_input_tokens: Some(10),
            cache_write_input_tokens: None,
            source: "provider".into(),
        },
        latency: Latency {
            total_ms,
            upstream_ms: Some(total_ms * 0.9),
            overhead_ms: total_ms * 0.001,
            ttft_ms: Some(total_ms * 0.3),
        },
        ..Default::default()
    }
}

#[test]
fn updating_metrics_for_a_seen_label_set_does_not_allocate() {
    let metrics = Metrics::new();
    let mut writer = MetricsWriter::new(100);
    // Latencies from 1 ms to ~200 s: every bucket of every histogram, and every status, cache
    // result and verdict the measured traces use, has been seen once.
    let latencies: Vec<f64> = (0..40).map(|i| 2f64.powf(f64::from(i) / 2.3)).collect();
    let warm_up: Vec<Trace> = (0..42)
        .map(|i| finished_call(i, latencies[i % latencies.len()]))
        .collect();
    let first = allocations_during(|| writer.observe(&metrics, &warm_up[0]));
    warm_up.iter().for_each(|t| writer.observe(&metrics, t));
    let score = Score {
        name: "exact_match".into(),
        value: 1.0,
        comment: None,
        at_ms: 0,
    };
    writer.observe_score(&metrics, &warm_up[0], &score);

    let measured: Vec<Trace> = (0..10_000)
        .map(|i| finished_call(1_000 + i, latencies[i * 7 % latencies.len()]))
        .collect();
    let per_trace = allocations_during(|| {
        for trace in &measured {
            writer.observe(&metrics, trace);
            writer.observe_score(&metrics, trace, &score);
        }
    });
    assert_eq!(
        per_trace, 0,
        "10,000 traces of seen label sets allocated {per_trace} times"
    );
    // The first trace of a label set does allocate (label strings, handles): the check counts.
    assert!(first > 10, "a new label set allocated only {first} times");
    eprintln!("allocations: first trace of a label set {first}, then 0 for 10,000 traces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_in_the_format_asked_for_with_trace_exemplars() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 5, 5))).await;
    let gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let reply = gateway.chat(&[("x-flowgate-experiment", "qa")], body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let trace_id = reply.header("x-flowgate-trace-id").to_owned();
    gateway.admin("/api/v1/runs").await; // the recorder has counted the call

    let url = format!("{}/metrics", gateway.url);
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let openmetrics = send(Method::GET, &url, &[("accept", accept)], "").await;
    assert_eq!(
        openmetrics.header("content-type"),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = openmetrics.text();
    let exemplar = format!(r#" # {{trace_id="{trace_id}"}} "#);
    assert!(
        text.lines().any(|line| {
            line.starts_with("flowgate_request_duration_seconds_bucket{")
                && line.contains(&exemplar)
        }),
        "no exemplar {exemplar} in\n{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    for accept in [None, Some("text/plain"), Some("*/*")] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
        let classic = send(Method::GET, &url, &headers, "").await;
        assert_eq!(
            classic.header("content-type"),
            "text/plain; version=0.0.4; charset=utf-8",
            "Accept: {accept:?}"
        );
        let text = classic.text();
        assert!(
            !text.contains("trace_id") && !text.contains("# EOF"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE flowgate_requests_total counter\n"),
            "{text}"
        );
    }
}

/// The distinct values of `label` among the series of `family` in an exposition.
fn label_values(text: &str, family: &str, label: &str) -> (usize, HashSet<String>) {
    let series: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix(family)?.strip_prefix('{'))
        .collect();
    let values = series
        .iter()
        .filter_map(|labels| labels.split(&format!("{label}=\"")).nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect();
    (series.len(), values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_experiment_names_stay_within_the_configured_maximum_of_series() {
    const MAX: usize = 20;
    const EXPERIMENTS: usize = 10_000;
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("a", 5, 5))).await;
    let extra = format!("[metrics]\nmax_label_values = {MAX}\n");
    let gateway = TestGateway::start(&upstream.base_url(), "", &extra).await;
    let url = format!("{}/v1/chat/completions", gateway.url);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..EXPERIMENTS {
        let url = url.clone();
        calls.spawn(async move {
            let experiment = format!("experiment-{i}");
            let headers = [
                ("content-type", "application/json"),
                ("x-flowgate-experiment", experiment.as_str()),
                ("x-flowgate-prompt-version", experiment.as_str()),
            ];
            let body =
                r#"{"model": "mock/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}"#;
            send(Method::POST, &url, &headers, body).await.status
        });
        // At most 64 calls in flight.
        while calls.len() >= 64 {
            let status = calls.join_next().await.and_then(Result::ok);
            assert_eq!(status.map(|s| s.as_u16()), Some(200));
        }
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.ok().map(|s| s.as_u16()), Some(200));
    }
    gateway.admin("/api/v1/runs?limit=1").await; // the recorder has counted every call

    let text = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "")
        .await
        .text();
    let dropped = text
        .lines()
        .find_map(|line| line.strip_prefix("flowgate_traces_dropped_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(
        dropped,
        Some(0.0),
        "traces were dropped: the count below would not hold"
    );
    for family in [
        "flowgate_requests_total",
        "flowgate_request_duration_seconds_count",
        "flowgate_cost_usd_total",
        "flowgate_cache_requests_total",
    ] {
        let (series, experiments) = label_values(&text, family, "experiment");
        assert_eq!(series, MAX + 1, "{family}: {experiments:?}");
        assert_eq!(experiments.len(), MAX + 1, "{family}: {experiments:?}");
        assert!(experiments.contains("other"), "{family}: {experiments:?}");
        let (_, versions) = label_values(&text, family, "prompt_version");
        assert_eq!(versions.len(), MAX + 1, "{family}: {versions:?}");
    }
    let other = r#"flowgate_requests_total{experiment="other",prompt_version="other",provider="mock",model="gpt-4o-mini",status="200"} "#;
    let counted = text
        .lines()
        .find_map(|line| line.strip_prefix(other))
        .and_then(|v| v.parse::<usize>().ok());
    assert_eq!(counted, Some(EXPERIMENTS - MAX), "{text}");
}
