//! Soak: mixed traffic with injected faults through an in-process gateway for a long time, watching
//! memory and file descriptors, then checking that every request left exactly one trace.
//!
//! Ignored by `cargo test`; run it with `scripts/soak.sh [SECONDS]` (default 600), i.e.
//! `FLOWGATE_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture`.
//!
//! Eight workers send, each at random from a fixed mix: plain and streamed answers, slow streams,
//! streams the upstream resets mid-answer, upstream 500 and 429, streams the client abandons after
//! the first frame, calls to the built-in mock provider and malformed JSON. Every 10 s the test
//! samples its own RSS (`VmRSS`) and open file descriptors (`/proc/self/fd`): the gateway, the
//! mock upstream and the clients all live in this process. At the end:
//! - RSS growth from the 30 s mark to the end stays under `FLOWGATE_SOAK_MAX_RSS_GROWTH_MB`
//!   (default 64);
//! - once idle connections have closed, the fd count is back near where it started;
//! - the traces stored (the sum over `GET /api/v1/experiments`) equal the requests sent;
//! - every answer was the one its scenario calls for, and none hung.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;

// The production binary's allocator, so the memory figures are the ones a deployment would see.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORKERS: usize = 8;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS growth is measured from the first sample at or after this point (warm-up excluded).
const RSS_BASELINE_AT: Duration = Duration::from_secs(30);
/// Open fds allowed above the start: the gateway's idle upstream pool (one connection per worker
/// at most, each seen twice — the gateway's end and the mock upstream's) and a little more.
const FD_SLACK: usize = 2 * WORKERS + 8;
/// Any single call taking longer than this is a hang.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Json,
    Stream,
    SlowStream,
    ResetMidStream,
    Upstream500,
    Upstream429,
    ClientCancel,
    MockProvider,
    BadJson,
}

/// (scenario, weight)
const MIX: &[(Scenario, u32)] = &[
    (Scenario::Json, 24),
    (Scenario::Stream, 18),
    (Scenario::SlowStream, 10),
    (Scenario::ResetMidStream, 10),
    (Scenario::Upstream500, 8),
    (Scenario::Upstream429, 7),
    (Scenario::ClientCancel, 9),
    (Scenario::MockProvider, 12),
    (Scenario::BadJson, 2),
];

impl Scenario {
    /// The model that tells the mock upstream what to do (all route to the `openai` provider).
    fn model(self) -> &'static str {
        match self {
            Scenario::Json => "gpt-soak-ok",
            Scenario::Stream => "gpt-soak-stream",
            Scenario::SlowStream => "gpt-soak-slow",
            Scenario::ResetMidStream => "gpt-soak-reset",
            Scenario::Upstream500 => "gpt-soak-500",
            Scenario::Upstream429 => "gpt-soak-429",
            Scenario::ClientCancel => "gpt-soak-cancel",
            Scenario::MockProvider => "mock/gpt-4o-mini",
            Scenario::BadJson => "gpt-soak-ok",
        }
    }

    fn streams(self, coin: bool) -> bool {
        match self {
            Scenario::Stream
            | Scenario::SlowStream
            | Scenario::ResetMidStream
            | Scenario::ClientCancel => true,
            Scenario::MockProvider => coin,
            _ => false,
        }
    }
}

/// The mock upstream: the model names the fault.
fn upstream_reply(seen: &Seen) -> Reply {
    let body = seen.json();
    let model = body["model"].as_str().unwrap_or_default();
    let usage = asked_for_usage(seen);
    let ms = Duration::from_millis;
    match model {
        "gpt-soak-ok" => Reply::Json(200, chat_completion("soak answer", 12, 2)),
        "gpt-soak-stream" => Reply::Sse(
            streamed_answer(&["soak", " stream", " answer"], usage)
                .into_iter()
                .map(|e| (Duration::ZERO, e))
                .collect(),
        ),
        "gpt-soak-slow" => Reply::Sse(
            streamed_answer(&["slow", " and", " steady", " wins"], usage)
                .into_iter()
                .map(|e| (ms(40), e))
                .collect(),
        ),
        "gpt-soak-reset" => Reply::SseThenCut(vec![chunk("Hel"), chunk("lo")]),
        "gpt-soak-500" => Reply::Json(
            500,
            json!({"error": {"message": "injected 500", "type": "server_error", "param": null, "code": null}}),
        ),
        "gpt-soak-429" => Reply::Json(
            429,
            json!({"error": {"message": "injected 429", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        ),
        // Slow enough that the client is long gone before the end.
        "gpt-soak-cancel" => Reply::Sse(
            streamed_answer(&["one", " two", " three", " four", " five", " six"], usage)
                .into_iter()
                .map(|e| (ms(150), e))
                .collect(),
        ),
        other => Reply::Json(
            404,
            json!({"error": {"message": format!("no model {other}"), "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}),
        ),
    }
}

/// xorshift64*: a deterministic mix per worker, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick(&mut self) -> Scenario {
        let total: u32 = MIX.iter().map(|(_, w)| w).sum();
        let mut roll = (self.next() % u64::from(total)) as u32;
        for (scenario, weight) in MIX {
            if roll < *weight {
                return *scenario;
            }
            roll -= weight;
        }
        unreachable!()
    }
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    per_scenario: Mutex<BTreeMap<String, u64>>,
    /// Answers that were not what the scenario calls for (first few kept).
    unexpected: Mutex<Vec<String>>,
    unexpected_count: AtomicU64,
}

impl Tally {
    fn count(&self, scenario: Scenario) {
        *self
            .per_scenario
            .lock()
            .unwrap()
            .entry(format!("{scenario:?}"))
            .or_default() += 1;
    }

    fn wrong(&self, what: String) {
        self.unexpected_count.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.unexpected.lock().unwrap();
        if kept.len() < 20 {
            kept.push(what);
        }
    }
}

/// One call of `scenario`; `Err` describes an answer that was not the expected one.
async fn call(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: &str,
    worker: usize,
    scenario: Scenario,
    coin: bool,
) -> Result<(), String> {
    let stream = scenario.streams(coin);
    let body = if scenario == Scenario::BadJson {
        r#"{"model": "gpt-soak-ok", "messages": [{"role": "user""#.to_owned()
    } else {
        let mut body = json!({
            "model": scenario.model(),
            "messages": [{"role": "user", "content": format!("soak request from worker {worker}")}],
            "stream": stream,
        });
        if stream && coin {
            body["stream_options"] = json!({"include_usage": true});
        }
        body.to_string()
    };
    let experiment = format!("soak-{}", worker % 3);
    let headers = [
        ("content-type", "application/json"),
        ("x-flowgate-experiment", experiment.as_str()),
        ("x-flowgate-prompt-version", if coin { "v1" } else { "v2" }),
    ];
    let response = client
        .request(request(
            Method::POST,
            &format!("{url}/v1/chat/completions"),
            &headers,
            body,
        ))
        .await
        .map_err(|e| format!("{scenario:?}: request failed: {}", with_causes(&e)))?;
    let status = response.status().as_u16();
    let mut body = response.into_body();

    if scenario == Scenario::ClientCancel {
        if status != 200 {
            return Err(format!("{scenario:?}: status {status}"));
        }
        // The first frame, then the client leaves.
        match body.frame().await {
            Some(Ok(_)) => return Ok(()),
            other => return Err(format!("{scenario:?}: no first frame: {other:?}")),
        }
    }

    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("{scenario:?}: body error: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let expect = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{scenario:?} (stream {stream}): {what}; status {status}: {}",
                text.chars().take(300).collect::<String>()
            ))
        }
    };
    match scenario {
        Scenario::Json => expect(
            status == 200 && text.contains("soak answer"),
            "a 200 with the answer",
        ),
        Scenario::Stream | Scenario::SlowStream => {
            let events = sse_data(&bytes);
            let usage_chunks = events.iter().filter(|e| e.contains("\"usage\"")).count();
            expect(
                status == 200
                    && events.last().map(String::as_str) == Some("[DONE]")
                    && usage_chunks == usize::from(coin),
                "a 200 stream ending in [DONE], with a usage chunk only when asked",
            )
        }
        Scenario::ResetMidStream => {
            let events = sse_data(&bytes);
            expect(
                status == 200
                    && events.first().is_some_and(|e| e.contains("Hel"))
                    && events
                        .last()
                        .is_some_and(|e| e.contains("upstream_stream_error")),
                "a 200 stream with the content, then the upstream_stream_error event",
            )
        }
        Scenario::Upstream500 => expect(
            status == 500 && text.contains("injected 500"),
            "the upstream's 500",
        ),
        Scenario::Upstream429 => expect(
            status == 429 && text.contains("injected 429"),
            "the upstream's 429",
        ),
        Scenario::MockProvider => expect(
            status == 200
                && (!stream || sse_data(&bytes).last().map(String::as_str) == Some("[DONE]")),
            "a 200 from the mock",
        ),
        Scenario::BadJson => expect(
            status == 400 && text.contains("invalid_json"),
            "400 invalid_json",
        ),
        Scenario::ClientCancel => unreachable!(),
    }
}

/// An error and its causes, outermost first: hyper's own message ("client error (SendRequest)")
/// does not say what happened to the connection.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

async fn worker(worker: usize, url: String, until: Instant, tally: Arc<Tally>) {
    let client = client();
    let mut rng =
        Rng(0x9e37_79b9_7f4a_7c15 ^ (worker as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    while Instant::now() < until {
        let scenario = rng.pick();
        let coin = rng.next() & 1 == 0;
        tally.sent.fetch_add(1, Ordering::Relaxed);
        tally.count(scenario);
        match tokio::time::timeout(CALL_LIMIT, call(&client, &url, worker, scenario, coin)).await {
            Ok(Ok(())) => {}
            Ok(Err(what)) => tally.wrong(what),
            Err(_) => tally.wrong(format!(
                "{scenario:?}: no answer within {CALL_LIMIT:?} (hung)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: usize,
    sent: u64,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn sample(start: Instant, tally: &Tally) -> Sample {
    Sample {
        at: start.elapsed(),
        rss_kb: common::rss_kb(),
        fds: open_fds(),
        sent: tally.sent.load(Ordering::Relaxed),
    }
}

fn print_sample(s: &Sample, previous: Option<&Sample>) {
    let rate = previous.map_or(0.0, |p| {
        (s.sent - p.sent) as f64 / (s.at - p.at).as_secs_f64().max(1e-9)
    });
    println!(
        "soak  t={:>5.0}s  rss={:>7.1} MB  fds={:>4}  requests={:>8}  ({rate:>6.0}/s)",
        s.at.as_secs_f64(),
        s.rss_kb as f64 / 1024.0,
        s.fds,
        s.sent
    );
}

async fn stored_traces(gateway: &TestGateway) -> u64 {
    let experiments = gateway.admin("/api/v1/experiments").await;
    experiments["experiments"]
        .as_array()
        .expect("experiments array")
        .iter()
        .map(|e| e["traces"].as_u64().unwrap_or(0))
        .sum()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "soak test: run with scripts/soak.sh [SECONDS]"]
async fn soak_mixed_traffic_with_faults() {
    let duration = Duration::from_secs(env_u64("FLOWGATE_SOAK_SECS", 600));
    let max_growth_mb = env_u64("FLOWGATE_SOAK_MAX_RSS_GROWTH_MB", 64);
    let upstream = Upstream::start(upstream_reply).await;
    let mut gateway = TestGateway::start(&upstream.base_url(), "", "").await;
    // Warm the tokenizer and the store once, outside the measurement.
    let warm = gateway
        .chat(
            &[],
            json!({"model": "mock/gpt-4o-mini", "messages": [{"role": "user", "content": "warm"}]}),
        )
        .await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let warm_traces = 1;

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let mut samples = vec![sample(start, &tally)];
    print_sample(&samples[0], None);
    let until = start + duration;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(worker(w, gateway.url.clone(), until, tally.clone())))
        .collect();

    // The mock upstream keeps every request it saw (bodies, headers): forget them as we go, or
    // the harness itself would grow by a few KB per request and hide the gateway's figures.
    let seen = upstream.seen.clone();
    let forget = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let old = std::mem::take(&mut *seen.lock().unwrap());
            drop(old);
        }
    });

    let mut next = start + SAMPLE_EVERY;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        samples.push(sample(start, &tally));
        print_sample(&samples[samples.len() - 1], samples.iter().rev().nth(1));
        next += SAMPLE_EVERY;
    }
    for handle in workers {
        handle.await.expect("a worker panicked");
    }
    forget.abort();
    upstream.seen.lock().unwrap().clear();
    let end = sample(start, &tally);
    print_sample(&end, samples.last());
    samples.push(end);
    let sent = tally.sent.load(Ordering::Relaxed);

    // Traces: admin reads sync the recorder; cancelled streams finish when the gateway notices.
    let wait = Instant::now();
    let mut stored = stored_traces(&gateway).await;
    while stored < sent + warm_traces && wait.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stored = stored_traces(&gateway).await;
    }
    // A little longer, to catch traces beyond one per request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stored = stored_traces(&gateway).await - warm_traces;
    let metrics = send(Method::GET, &format!("{}/metrics", gateway.url), &[], "").await;
    let metrics = metrics.text();
    let dropped = metric(&metrics, "flowgate_traces_dropped_total");
    let rejected = metric(&metrics, "flowgate_rejected_total");

    // File descriptors: the clients are gone; give the connections a moment to close.
    let start_fds = samples[0].fds;
    let wait = Instant::now();
    let mut end_fds = open_fds();
    while end_fds > start_fds + FD_SLACK && wait.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        end_fds = open_fds();
    }

    let baseline = samples
        .iter()
        .find(|s| s.at >= RSS_BASELINE_AT.min(duration / 2))
        .copied()
        .unwrap_or(samples[0]);
    let final_rss = samples.last().unwrap().rss_kb;
    let growth_kb = final_rss as i64 - baseline.rss_kb as i64;
    let peak_kb = samples.iter().map(|s| s.rss_kb).max().unwrap();

    println!(
        "\nsoak summary ({:.0} s, {WORKERS} workers)",
        duration.as_secs_f64()
    );
    println!(
        "  requests sent     {sent} ({:.0}/s)",
        sent as f64 / duration.as_secs_f64()
    );
    for (scenario, n) in tally.per_scenario.lock().unwrap().iter() {
        println!("    {scenario:<16} {n}");
    }
    println!("  traces stored     {stored}");
    println!("  traces dropped    {dropped} (flowgate_traces_dropped_total)");
    println!("  rejected          {rejected} (flowgate_rejected_total)");
    println!(
        "  rss               baseline {:.1} MB at {:.0} s, end {:.1} MB, growth {:+.1} MB, peak {:.1} MB",
        baseline.rss_kb as f64 / 1024.0,
        baseline.at.as_secs_f64(),
        final_rss as f64 / 1024.0,
        growth_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0
    );
    println!(
        "  fds               start {start_fds}, peak {}, end {end_fds} (slack {FD_SLACK})",
        samples.iter().map(|s| s.fds).max().unwrap()
    );
    let unexpected = tally.unexpected_count.load(Ordering::Relaxed);
    println!("  unexpected        {unexpected}");
    for what in tally.unexpected.lock().unwrap().iter() {
        println!("    {what}");
    }

    gateway.stop().await;
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "  fds after stop    {} (gateway shut down, mock upstream dropped)",
        open_fds()
    );

    assert!(sent > 0, "no request was sent");
    assert_eq!(
        unexpected, 0,
        "answers not matching their scenario (see above)"
    );
    assert_eq!(
        stored, sent,
        "traces stored != requests sent ({dropped} dropped)"
    );
    assert!(
        growth_kb <= (max_growth_mb * 1024) as i64,
        "RSS grew {:.1} MB from {:.0} s to the end (limit {max_growth_mb} MB)",
        growth_kb as f64 / 1024.0,
        baseline.at.as_secs_f64()
    );
    assert!(
        end_fds <= start_fds + FD_SLACK,
        "open fds: {end_fds} at the end vs {start_fds} at the start (slack {FD_SLACK}): a leak"
    );
}
