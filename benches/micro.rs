//! Micro-benchmarks of the per-request pieces, through the crate's public API.
//!
//! Three groups, named after where the work happens:
//!
//! - `request_path/…`: what the proxy does before the call goes upstream (tagging headers,
//!   routing, reading and rewriting the body, run identity, header cleaning);
//! - `response_path/…`: what `MeteredBody` does per forwarded SSE frame;
//! - `recorder/…`: what the recorder thread does per finished call (usage, aggregation, cost,
//!   metrics, trace encoding);
//! - `anthropic/…`: the translation an `anthropic` provider adds to a chat completion (request,
//!   whole answer, one streamed event).
//!
//! - `cache/…`: the response cache's key of a 1 KB request, and a whole hit of a 1 KB answer
//!   (key, lookup, replay in the stored shape and as a stream).
//!
//! `cargo bench --bench micro` (add `-- --quick` for a faster, rougher pass, or a name filter such
//! as `-- recorder/`). Under `cargo test --all-targets` criterion runs each case once.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};

use flowgate::cache::{replay, Directive, Entry, KeyInput, Lookup, ResponseCache};
use flowgate::config::{CacheConfig, CacheMode, Config, Source};
use flowgate::context::RequestContext;
use flowgate::metering::{Pricing, Tokens};
use flowgate::providers::{Endpoint, Router};
use flowgate::proxy::headers::for_upstream;
use flowgate::proxy::request::{rewrite, RequestFields};
use flowgate::runs::{Run, RunIdentity};
use flowgate::sse::is_usage_only_chunk;
use flowgate::telemetry::{Metrics, MetricsWriter};
use flowgate::trace::{
    Captured, GuardrailVerdict, Latency, ParentSpan, Score, Trace, TraceError, Usage,
};
use flowgate::usage::{from_json, from_sse};

// ---------------------------------------------------------------------------------------------
// Inputs, built once outside the timed closures.

/// What the official Python SDK sends, plus every tagging header a tagged call carries.
fn request_headers() -> HeaderMap {
    let pairs = [
        ("host", "127.0.0.1:8080"),
        ("content-type", "application/json"),
        (
            "authorization",
            "Bearer sk-proj-9hTq2XbVwLr4mKpZ7sNcA1fYeD3uJ8oG5iHxQ0tR6vBnW2zE4yUaSdFgHjKlMcVb",
        ),
        ("user-agent", "OpenAI/Python 1.55.3"),
        ("x-flowgate-experiment", "support-summaries"),
        ("x-flowgate-prompt", "summarise-ticket@v3"),
        ("x-flowgate-params", "k=5, reranker=bge-m3, chunk_size=512"),
        (
            "x-flowgate-tags",
            "dataset=tickets-v1.2,task=summary,owner=search-team",
        ),
        (
            "x-flowgate-session",
            "sess-4f1c2a9e-7b3d-4e8a-9c1f-2d6b8a0e5f13",
        ),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let mut headers = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

/// Three OpenAI-compatible upstreams (never called: the router is only asked where a model
/// goes) and the mock, each with the kind of glob patterns a real config has.
fn router() -> Router {
    const TOML: &str = r#"
[[providers]]
name = "mock"
kind = "mock"
models = ["mock/*"]

[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
models = ["gpt-*", "o1*", "o3*", "o4*", "chatgpt-*", "text-embedding-*"]

[[providers]]
name = "groq"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
models = ["llama-*", "mixtral-*", "gemma*"]

[[providers]]
name = "vllm"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
models = ["qwen*", "mistral-*", "deepseek-*"]
"#;
    let mut config = Config::from_toml(TOML, Source::BuiltIn).expect("bench config parses");
    config.validate().expect("bench config is valid");
    Router::from_config(&config).expect("bench router builds")
}

const USER_TEXT: &str = "Summarise the following support ticket in three bullet points, \
    keeping product names and error codes exactly as written. Ticket #48213: After upgrading \
    the desktop client to 4.12.0 the sync service stops with error E_SYNC_417 whenever a shared \
    folder contains more than 10,000 files. Restarting the machine does not help; downgrading to \
    4.11.3 fixes it. The customer runs Windows 11 23H2 on a managed laptop with a proxy that \
    intercepts TLS. Logs attached show repeated 429 responses from the metadata endpoint. The customer \
    asks whether a fix is planned for 4.12.1 and whether excluding the largest folder from sync is \
    a safe workaround until then.";

/// A chat request of about 1 KB, as a client sends it: a system prompt, one user turn, sampling
/// params, streaming on and `stream_options` absent (so the gateway asks for usage).
fn chat_body(model: &str) -> Bytes {
    let body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a support team. \
                Answer in English, use plain language, and never invent facts."},
            {"role": "user", "content": USER_TEXT},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 512,
        "seed": 7,
        "response_format": {"type": "text"},
        "user": "agent-1187",
        "stream": true,
    });
    Bytes::from(serde_json::to_vec(&body).expect("body encodes"))
}

const ANSWER_TEXT: &str = "- Upgrading the desktop client to 4.12.0 makes the sync service stop \
    with E_SYNC_417 on shared folders holding more than 10,000 files.\n- Restarting does not help; \
    downgrading to 4.11.3 does.\n- Environment: Windows 11 23H2, managed laptop behind a \
    TLS-intercepting proxy; logs show repeated 429s from the metadata endpoint.";

/// A non-streamed chat completion of about 1 KB.
fn chat_completion() -> Bytes {
    let body = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1_741_570_283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER_TEXT, "refusal": null,
                        "annotations": []},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": 212,
            "completion_tokens": 81,
            "total_tokens": 293,
            "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    });
    Bytes::from(serde_json::to_vec(&body).expect("completion encodes"))
}

fn sse_frame(choices: Value, usage: Value) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1_741_570_283,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
        "choices": choices,
        "usage": usage,
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// A streamed chat answer as OpenAI sends it with `include_usage`: a role chunk, 18 content
/// chunks and a finish chunk (20 chunks, each with `"usage":null`), then the usage-only chunk
/// and `[DONE]`, one frame each, with arrival times in µs.
fn chat_stream() -> Vec<(u64, Bytes)> {
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut frames = vec![sse_frame(
        delta(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
        Value::Null,
    )];
    let words: Vec<&str> = ANSWER_TEXT.split_inclusive(' ').collect();
    for i in 0..18 {
        let piece = words[i * words.len() / 18..(i + 1) * words.len() / 18].concat();
        frames.push(sse_frame(
            delta(json!({ "content": piece }), Value::Null),
            Value::Null,
        ));
    }
    frames.push(sse_frame(delta(json!({}), json!("stop")), Value::Null));
    assert_eq!(frames.len(), 20, "20 chunks before the usage chunk");
    frames.push(usage_chunk());
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
        .into_iter()
        .enumerate()
        .map(|(i, frame)| (180_000 + 12_000 * i as u64, frame))
        .collect()
}

fn usage_chunk() -> Bytes {
    sse_frame(
        json!([]),
        json!({
            "prompt_tokens": 212,
            "completion_tokens": 81,
            "total_tokens": 293,
            "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }),
    )
}

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A captured JSON body, built through serde so it does not depend on how `Captured` holds it.
fn captured(json: &[u8]) -> Captured {
    let mut doc = br#"{"content":"#.to_vec();
    doc.extend_from_slice(json);
    doc.extend_from_slice(br#","truncated":false}"#);
    serde_json::from_slice(&doc).expect("captured body parses")
}

/// A finished streamed chat call as the recorder stores it, with ~1 KB captured bodies.
fn trace() -> Trace {
    let request = chat_body("gpt-4o-mini");
    let sampling = RequestFields::parse(&request)
        .expect("bench body parses")
        .sampling();
    Trace {
        id: "01936f2a-7c41-7b3e-9a5d-3f0c8e1b2a47".into(),
        parent: Some(ParentSpan {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
        }),
        session: Some("sess-4f1c2a9e-7b3d-4e8a-9c1f-2d6b8a0e5f13".into()),
        started_at_ms: 1_764_152_400_123,
        ended_at_ms: 1_764_152_401_087,
        experiment: "support-summaries".into(),
        run_id: "3f9a1c0e7b2d4a68".into(),
        run_name: None,
        prompt_id: Some("summarise-ticket".into()),
        prompt_version: Some("v3".into()),
        params: strings(&[("chunk_size", "512"), ("k", "5"), ("reranker", "bge-m3")]),
        tags: strings(&[
            ("dataset", "tickets-v1.2"),
            ("owner", "search-team"),
            ("task", "summary"),
        ]),
        provider: Some("openai".into()),
        requested_model: Some("gpt-4o-mini".into()),
        served_model: Some("gpt-4o-mini".into()),
        model_group: None,
        attempts: Vec::new(),
        endpoint: Endpoint::ChatCompletions.as_str().into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        stream: true,
        sampling,
        status: 200,
        error: None::<TraceError>,
        latency: Latency {
            total_ms: 964.2,
            upstream_ms: Some(961.7),
            overhead_ms: 0.31,
            ttft_ms: Some(182.4),
        },
        usage: Usage {
            input_tokens: Some(212),
            output_tokens: Some(81),
            cached_input_tokens: Some(128),
            cache_write_input_tokens: None,
            source: "provider".into(),
        },
        cost_usd: Some(0.000_073_5),
        cost_saved_usd: None,
        cache: "bypass".into(),
        guardrails: vec![GuardrailVerdict {
            guardrail: "pii".into(),
            kind: "pii".into(),
            stage: "input".into(),
            verdict: "pass".into(),
            matches: BTreeMap::new(),
            elapsed_us: 14,
        }],
        scores: vec![Score {
            name: "faithfulness".into(),
            value: 0.92,
            comment: None,
            at_ms: 1_764_152_401_500,
        }],
        request_body: Some(captured(&request)),
        response_body: Some(captured(&chat_completion())),
    }
}

// ---------------------------------------------------------------------------------------------
// request_path/…

fn request_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_path");

    let headers = request_headers();
    let context = RequestContext::from_headers(&headers).expect("bench headers are valid");
    assert!(context.parent.is_some() && context.params.len() == 3);
    group.bench_function("context/from_headers", |b| {
        b.iter(|| RequestContext::from_headers(black_box(&headers)))
    });
    group.bench_function("headers/for_upstream", |b| {
        b.iter_batched(|| headers.clone(), for_upstream, BatchSize::SmallInput)
    });

    let router = router();
    let cases = [
        ("router/pattern_hit_first", "gpt-4o-mini", Some("openai")),
        (
            "router/pattern_hit_last",
            "qwen2.5-7b-instruct",
            Some("vllm"),
        ),
        (
            "router/provider_prefix",
            "groq/llama-3.1-8b-instant",
            Some("groq"),
        ),
        ("router/miss", "claude-sonnet-4-5", None),
    ];
    for (name, model, expected) in cases {
        let resolved = router
            .resolve(model)
            .ok()
            .map(|r| r.provider.name().to_owned());
        assert_eq!(resolved.as_deref(), expected, "{model}");
        group.bench_function(name, |b| b.iter(|| router.resolve(black_box(model))));
    }

    let body = chat_body("gpt-4o-mini");
    assert!(
        (900..=1200).contains(&body.len()),
        "chat body is {} bytes",
        body.len()
    );
    group.bench_function("request/parse_1k", |b| {
        b.iter(|| RequestFields::parse(black_box(&body)))
    });
    let fields = RequestFields::parse(&body).expect("bench body parses");
    assert_eq!(fields.sampling().len(), 5);
    group.bench_function("request/sampling", |b| {
        b.iter(|| black_box(&fields).sampling())
    });

    group.bench_function("rewrite/unchanged", |b| {
        b.iter(|| rewrite(black_box(&body), None, false, false))
    });
    // A stream whose client did not ask for usage: the member is spliced in after the brace.
    group.bench_function("rewrite/splice_usage", |b| {
        b.iter(|| rewrite(black_box(&body), None, true, false))
    });
    // `provider/model`: the body is parsed and re-serialised with the new model.
    let prefixed = chat_body("groq/llama-3.1-8b-instant");
    group.bench_function("rewrite/reserialise_model", |b| {
        b.iter(|| {
            rewrite(
                black_box(&prefixed),
                Some("llama-3.1-8b-instant"),
                true,
                false,
            )
        })
    });

    let sampling = fields.sampling();
    let identity = RunIdentity {
        experiment: &context.experiment,
        run_name: None,
        provider: "openai",
        model: "gpt-4o-mini",
        prompt_id: context.prompt_id.as_deref(),
        prompt_version: context.prompt_version.as_deref(),
        params: &context.params,
        sampling: &sampling,
    };
    group.bench_function("run_identity/derived", |b| {
        b.iter(|| black_box(&identity).id())
    });
    let named = RunIdentity {
        run_name: Some("baseline-2025-11"),
        ..identity
    };
    group.bench_function("run_identity/named", |b| b.iter(|| black_box(&named).id()));

    group.finish();
}

// ---------------------------------------------------------------------------------------------
// response_path/…

fn response_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("response_path");
    let frames = chat_stream();
    let content = frames[5].1.clone();
    let usage = usage_chunk();
    assert!(!is_usage_only_chunk(&content));
    assert!(is_usage_only_chunk(&usage));
    group.bench_function("is_usage_only_chunk/content", |b| {
        b.iter(|| is_usage_only_chunk(black_box(&content)))
    });
    group.bench_function("is_usage_only_chunk/usage", |b| {
        b.iter(|| is_usage_only_chunk(black_box(&usage)))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// recorder/…

fn recorder(c: &mut Criterion) {
    let mut group = c.benchmark_group("recorder");

    let frames = chat_stream();
    let streamed = from_sse(Endpoint::ChatCompletions, &frames);
    assert_eq!(streamed.text, ANSWER_TEXT);
    assert_eq!(streamed.usage.map(|u| u.output), Some(81));
    group.bench_function("usage/from_sse_20_chunks", |b| {
        b.iter(|| from_sse(Endpoint::ChatCompletions, black_box(&frames)))
    });

    let completion = chat_completion();
    assert!(
        (900..=1200).contains(&completion.len()),
        "completion is {} bytes",
        completion.len()
    );
    let whole = from_json(Endpoint::ChatCompletions, &completion);
    assert_eq!(whole.usage.map(|u| u.cached_input), Some(128));
    group.bench_function("usage/from_json_1k", |b| {
        b.iter(|| from_json(Endpoint::ChatCompletions, black_box(&completion)))
    });

    let pricing = Pricing::new(&Default::default()).expect("bundled price table loads");
    let tokens = Tokens {
        input: 212,
        output: 81,
        cached_input: 128,
        cache_write: 0,
    };
    assert!(pricing.cost("openai", "gpt-4o-mini", tokens).is_some());
    assert!(pricing
        .cost("openai", "gpt-4o-mini-2024-07-18", tokens)
        .is_some());
    group.bench_function("pricing/cost", |b| {
        b.iter(|| pricing.cost(black_box("openai"), black_box("gpt-4o-mini"), tokens))
    });
    // A dated snapshot: `provider/model` and the model miss, the base name hits.
    group.bench_function("pricing/cost_snapshot", |b| {
        b.iter(|| {
            pricing.cost(
                black_box("openai"),
                black_box("gpt-4o-mini-2024-07-18"),
                tokens,
            )
        })
    });

    let trace = trace();
    let mut run = Run::from_first(&trace);
    group.bench_function("run/observe", |b| b.iter(|| run.observe(black_box(&trace))));

    // Every metric of a call whose label sets were seen before: found through cached handles.
    let metrics = Metrics::new();
    let mut writer = MetricsWriter::new(100);
    writer.observe(&metrics, &trace);
    group.bench_function("metrics/observe", |b| {
        b.iter(|| writer.observe(&metrics, black_box(&trace)))
    });

    // The store writes a codec byte then JSON; this is the JSON part, bodies included.
    let encoded = serde_json::to_vec(&trace).expect("trace encodes");
    let decoded: Trace = serde_json::from_slice(&encoded).expect("trace decodes");
    assert_eq!(decoded, trace);
    group.bench_function("trace/encode", |b| {
        b.iter(|| serde_json::to_vec(black_box(&trace)))
    });
    group.bench_function("trace/decode", |b| {
        b.iter(|| serde_json::from_slice::<Trace>(black_box(&encoded)))
    });

    group.finish();
}

// ---------------------------------------------------------------------------------------------
// cache/…

fn cache(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache");
    let cache = ResponseCache::new(&CacheConfig {
        mode: CacheMode::All,
        ..CacheConfig::default()
    })
    .expect("enabled");
    let body = chat_body("gpt-4o-mini");
    let input = KeyInput {
        endpoint: Endpoint::ChatCompletions,
        provider: "openai",
        model: "gpt-4o-mini",
        body: &body,
        credential: None,
    };
    group.bench_function("key/chat_1k", |b| b.iter(|| cache.key(black_box(&input))));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = cache.key(&input).expect("a JSON body has a key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    runtime.block_on(async {
        if let Lookup::Miss(fill) = cache.lookup(key, Directive::Auto, deadline).await {
            fill.complete(Some(Entry {
                body: chat_completion(),
                sse: false,
            }));
        }
        // The entry is inserted by a spawned task: let it run.
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
    let hit = |stream: bool| {
        runtime.block_on(async {
            let key = cache.key(black_box(&input)).expect("key");
            match cache.lookup(key, Directive::Auto, deadline).await {
                Lookup::Hit(entry) => {
                    replay::to_client(&entry, Endpoint::ChatCompletions, stream, false).ok()
                }
                _ => None,
            }
        })
    };
    assert!(hit(false).is_some(), "the stored answer is a hit");
    group.bench_function("hit_1k/json", |b| b.iter(|| hit(false)));
    group.bench_function("hit_1k/as_stream", |b| b.iter(|| hit(true)));
    group.finish();
}

fn config() -> Criterion {
    // Short defaults so the whole file runs in about a minute; command-line flags override them.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
}

// ---------------------------------------------------------------------------------------------
// anthropic/…

fn fixture(path: &str) -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/anthropic/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn anthropic(c: &mut Criterion) {
    use flowgate::providers::anthropic::{request, response, stream};

    let mut group = c.benchmark_group("anthropic");
    // A tool round trip: system-less, five turns, two tools.
    let body = fixture("requests/tool_results.json")["openai"].to_string();
    assert!(request::translate(body.as_bytes(), "claude-sonnet-4-5").is_ok());
    group.bench_function("request/translate", |b| {
        b.iter(|| request::translate(black_box(body.as_bytes()), "claude-sonnet-4-5"))
    });

    let answer = fixture("responses/tool_use.json")["anthropic"].to_string();
    assert!(response::to_chat_completion(answer.as_bytes(), 0).is_ok());
    group.bench_function("response/to_chat_completion", |b| {
        b.iter(|| response::to_chat_completion(black_box(answer.as_bytes()), 0))
    });

    let event = br#"event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" the capital"}}

"#;
    let mut translator = stream::Translator::new(false, 0);
    group.bench_function("stream/text_delta_event", |b| {
        b.iter(|| {
            let mut out = bytes::BytesMut::new();
            let step = translator.event(black_box(event), &mut out);
            (step.is_ok(), out.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = request_path, response_path, cache, recorder, anthropic
}
criterion_main!(micro);
