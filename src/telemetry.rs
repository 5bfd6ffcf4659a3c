//! Prometheus metrics (CONTRACT section 8; every family is listed in `docs/metrics.md`) and the
//! log subscriber.
//!
//! Metrics are updated by the recorder as traces complete ([`MetricsWriter`]), not on the request
//! path; requests only touch pre-fetched counter handles (dropped traces, rejections).

mod exposition;
mod labels;
mod writer;

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

pub use exposition::Exposition;
pub use labels::{
    CacheLabels, CallLabels, GuardrailLabels, LabelLimit, RejectLabels, RequestLabels, ScoreLabels,
    TokenLabels, TraceExemplar, UpstreamLabels, OVERFLOW,
};
pub use writer::MetricsWriter;

/// A latency histogram whose buckets remember the trace id of their latest observation.
pub type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;
pub type CostCounter = Counter<f64, AtomicU64>;
type HistogramFamily<L, H = LatencyHistogram> = Family<L, H, fn() -> H>;

/// LLM latencies: 10 ms to 81.92 s, doubling — the bucket boundaries the OpenTelemetry GenAI
/// semantic conventions give for `gen_ai.client.operation.duration`. Also used for time to first
/// token: the convention's own TTFT buckets stop at 10 s, which reasoning models pass.
fn llm_latency() -> LatencyHistogram {
    HistogramWithExemplars::new(exponential_buckets(0.01, 2.0, 14))
}

/// Gateway overhead, 1 µs to 100 ms at 1–1.5–2–3–5–7 steps per decade (neighbouring bounds at
/// most 5/3 apart, against 2 for doubling): finer where the gateway's own time lives — the load
/// benchmark measures a p50 of single-digit µs — so a quantile read from it is off by at most a
/// factor of 5/3 instead of 2.
#[rustfmt::skip]
const OVERHEAD_BUCKETS: [f64; 31] = [
    0.000_001, 0.000_001_5, 0.000_002, 0.000_003, 0.000_005, 0.000_007,
    0.000_01,  0.000_015,   0.000_02,  0.000_03,  0.000_05,  0.000_07,
    0.000_1,   0.000_15,    0.000_2,   0.000_3,   0.000_5,   0.000_7,
    0.001,     0.001_5,     0.002,     0.003,     0.005,     0.007,
    0.01,      0.015,       0.02,      0.03,      0.05,      0.07,
    0.1,
];

fn overhead() -> LatencyHistogram {
    HistogramWithExemplars::new(OVERHEAD_BUCKETS.into_iter())
}

/// Quality scores: tenths for the usual [0, 1] scores, then coarse steps for 1–5 and 1–10 scales.
const SCORE_BUCKETS: [f64; 14] = [
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 3.0, 5.0, 10.0,
];

fn score_buckets() -> Histogram {
    Histogram::new(SCORE_BUCKETS)
}

/// Every metric family flowgate exposes. Shared by the server (scrapes, rejection counters), the
/// request path (dropped traces) and the recorder (everything else, through [`MetricsWriter`]).
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<CallLabels>,
    pub upstream_duration: HistogramFamily<UpstreamLabels>,
    pub overhead: LatencyHistogram,
    pub ttft: HistogramFamily<CallLabels>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CallLabels, CostCounter>,
    /// Calls by how the response cache treated them, from each trace's `cache` field.
    pub cache_requests: Family<CacheLabels, Counter>,
    /// Guardrail checks by verdict, from each trace's `guardrails`.
    pub guardrail_checks: Family<GuardrailLabels, Counter>,
    /// A histogram named `flowgate_score`: its series `flowgate_score_sum` and
    /// `flowgate_score_count` are the contract's names, and its buckets show the distribution.
    pub scores: HistogramFamily<ScoreLabels, Histogram>,
    pub traces_dropped: Counter,
    pub queue_depth: Gauge,
    /// Requests and connections turned away by a limit.
    pub rejected: Family<RejectLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(llm_latency),
            upstream_duration: Family::new_with_constructor(llm_latency),
            overhead: overhead(),
            ttft: Family::new_with_constructor(llm_latency),
            tokens: Family::default(),
            cost: Family::default(),
            cache_requests: Family::default(),
            guardrail_checks: Family::default(),
            scores: Family::new_with_constructor(score_buckets),
            traces_dropped: Counter::default(),
            queue_depth: Gauge::default(),
            rejected: Family::default(),
            registry: Registry::default(),
        };
        let registry = metrics.register();
        Metrics {
            registry,
            ..metrics
        }
    }

    fn register(&self) -> Registry {
        let mut registry = Registry::default();
        let r = &mut registry;
        r.register(
            "flowgate_requests",
            "Calls through the gateway, by how they ended",
            self.requests.clone(),
        );
        r.register_with_unit(
            "flowgate_request_duration",
            "Whole call latency as the client saw it",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register_with_unit(
            "flowgate_upstream_duration",
            "From sending upstream to the upstream's last byte",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        r.register_with_unit(
            "flowgate_overhead",
            "Time the gateway added: total minus upstream minus reading the client's body",
            Unit::Seconds,
            self.overhead.clone(),
        );
        r.register_with_unit(
            "flowgate_time_to_first_token",
            "Streams: from request arrival to the first chunk with content",
            Unit::Seconds,
            self.ttft.clone(),
        );
        r.register(
            "flowgate_tokens",
            "Tokens by kind (input includes cached_input)",
            self.tokens.clone(),
        );
        r.register(
            "flowgate_cost_usd",
            "Cost in USD of priced calls",
            self.cost.clone(),
        );
        r.register(
            "flowgate_cache_requests",
            "Calls by how the response cache treated them (hit, miss, bypass)",
            self.cache_requests.clone(),
        );
        r.register(
            "flowgate_guardrail_checks",
            "Guardrail checks by verdict (pass, flagged, redacted, blocked)",
            self.guardrail_checks.clone(),
        );
        r.register(
            "flowgate_score",
            "Quality scores posted to traces",
            self.scores.clone(),
        );
        r.register(
            "flowgate_traces_dropped",
            "Traces lost because the recorder's queue was full",
            self.traces_dropped.clone(),
        );
        r.register(
            "flowgate_trace_queue_depth",
            "Traces waiting for the recorder",
            self.queue_depth.clone(),
        );
        r.register(
            "flowgate_rejected",
            "Connections and calls turned away by server.max_connections / max_in_flight",
            self.rejected.clone(),
        );
        registry
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Exposition) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Prometheus => exposition::to_prometheus_text(&out),
        }
    }
}

/// Logs go to stderr; `FLOWGATE_LOG` (or `RUST_LOG`) filters, `FLOWGATE_LOG_FORMAT=json` for JSON.
pub fn init_logging() {
    let filter = std::env::var("FLOWGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("FLOWGATE_LOG_FORMAT").is_ok_and(|f| f == "json");
    // A second init (tests start several gateways) is not an error worth reporting.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
