//! Prometheus metrics (CONTRACT section 8) and the log subscriber.
//!
//! Metrics are updated by the recorder as traces complete, not on the request path; only the
//! dropped-trace counter is touched by requests (when the recorder's queue is full).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::trace::Trace;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub experiment: String,
    pub prompt_version: String,
    pub provider: String,
    pub model: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub experiment: String,
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub experiment: String,
    pub provider: String,
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub experiment: String,
    pub prompt_version: String,
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScoreLabels {
    pub experiment: String,
    pub prompt_version: String,
    pub name: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// LLM latencies: 10 ms to ~82 s, doubling (OpenTelemetry GenAI convention).
fn llm_latency() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// Gateway overhead: 10 µs to ~82 ms, doubling.
fn overhead() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 14))
}

/// Quality scores, usually in [0, 1]: tenths.
fn score_buckets() -> Histogram {
    Histogram::new((1..=10).map(|i| f64::from(i) / 10.0))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<CallLabels>,
    pub upstream_duration: HistogramFamily<UpstreamLabels>,
    pub overhead: Histogram,
    pub ttft: HistogramFamily<CallLabels>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    /// A histogram named `flowgate_score`, so its series are `flowgate_score_sum` and
    /// `flowgate_score_count` (CONTRACT section 8) plus buckets for the score distribution.
    pub scores: HistogramFamily<ScoreLabels>,
    pub traces_dropped: Counter,
    pub queue_depth: Gauge,
    /// Requests and connections turned away by a limit.
    pub rejected: Family<RejectLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `connections` or `in_flight`.
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(llm_latency),
            upstream_duration: Family::new_with_constructor(llm_latency),
            overhead: overhead(),
            ttft: Family::new_with_constructor(llm_latency),
            tokens: Family::default(),
            cost: Family::default(),
            scores: Family::new_with_constructor(score_buckets),
            traces_dropped: Counter::default(),
            queue_depth: Gauge::default(),
            rejected: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "flowgate_requests",
            "Calls through the gateway",
            metrics.requests.clone(),
        );
        registry.register(
            "flowgate_request_duration_seconds",
            "Whole call latency as the client saw it",
            metrics.request_duration.clone(),
        );
        registry.register(
            "flowgate_upstream_duration_seconds",
            "From sending upstream to the upstream's last byte",
            metrics.upstream_duration.clone(),
        );
        registry.register(
            "flowgate_overhead_seconds",
            "Time the gateway added: total minus upstream minus reading the client's body",
            metrics.overhead.clone(),
        );
        registry.register(
            "flowgate_time_to_first_token_seconds",
            "Streams: from request arrival to the first chunk with content",
            metrics.ttft.clone(),
        );
        registry.register(
            "flowgate_tokens",
            "Tokens by kind (input includes cached_input)",
            metrics.tokens.clone(),
        );
        registry.register(
            "flowgate_cost_usd",
            "Cost in USD of priced calls",
            metrics.cost.clone(),
        );
        registry.register(
            "flowgate_rejected",
            "Connections and calls turned away by server.max_connections / max_in_flight",
            metrics.rejected.clone(),
        );
        registry.register(
            "flowgate_score",
            "Quality scores posted to traces",
            metrics.scores.clone(),
        );
        registry.register(
            "flowgate_traces_dropped",
            "Traces lost because the recorder's queue was full",
            metrics.traces_dropped.clone(),
        );
        registry.register(
            "flowgate_trace_queue_depth",
            "Traces waiting for the recorder",
            metrics.queue_depth.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Caps the distinct values a label may take; later ones are reported as `other`.
#[derive(Debug)]
pub struct LabelLimit {
    max: usize,
    seen: HashSet<String>,
}

impl LabelLimit {
    pub fn new(max: usize) -> LabelLimit {
        LabelLimit {
            max,
            seen: HashSet::new(),
        }
    }

    pub fn admit(&mut self, value: &str) -> String {
        if self.seen.contains(value) {
            return value.to_owned();
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

/// Turns finished traces into metric updates; owned by the recorder task.
pub struct MetricsWriter {
    experiments: LabelLimit,
    prompt_versions: LabelLimit,
    /// Model names come from clients too (`provider/<anything>`): bounded like the others.
    models: LabelLimit,
}

impl MetricsWriter {
    pub fn new(max_label_values: usize) -> MetricsWriter {
        MetricsWriter {
            experiments: LabelLimit::new(max_label_values),
            prompt_versions: LabelLimit::new(max_label_values),
            models: LabelLimit::new(max_label_values),
        }
    }

    pub fn observe(&mut self, metrics: &Metrics, trace: &Trace) {
        let experiment = self.experiments.admit(&trace.experiment);
        let prompt_version = self
            .prompt_versions
            .admit(trace.prompt_version.as_deref().unwrap_or("none"));
        let provider = trace.provider.clone().unwrap_or_else(|| "none".into());
        // A call rejected before routing has no model worth a series.
        let model = match crate::runs::run_model(trace) {
            "" => "none".to_owned(),
            model => self.models.admit(model),
        };
        let status = if trace.error.as_ref().is_some_and(|e| e.class == "cancelled") {
            "cancelled".to_owned()
        } else {
            trace.status.to_string()
        };
        metrics
            .requests
            .get_or_create(&RequestLabels {
                experiment: experiment.clone(),
                prompt_version: prompt_version.clone(),
                provider: provider.clone(),
                model: model.clone(),
                status,
            })
            .inc();
        let call = CallLabels {
            experiment: experiment.clone(),
            provider: provider.clone(),
            model: model.clone(),
        };
        metrics
            .request_duration
            .get_or_create(&call)
            .observe(trace.latency.total_ms / 1000.0);
        if let Some(ms) = trace.latency.ttft_ms {
            metrics.ttft.get_or_create(&call).observe(ms / 1000.0);
        }
        if let Some(ms) = trace.latency.upstream_ms {
            let labels = UpstreamLabels {
                provider: provider.clone(),
                model: model.clone(),
            };
            metrics
                .upstream_duration
                .get_or_create(&labels)
                .observe(ms / 1000.0);
            metrics.overhead.observe(trace.latency.overhead_ms / 1000.0);
        }
        let usage = &trace.usage;
        for (kind, count) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cached_input", usage.cached_input_tokens),
        ] {
            if let Some(count) = count.filter(|c| *c > 0) {
                let labels = TokenLabels {
                    experiment: experiment.clone(),
                    provider: provider.clone(),
                    model: model.clone(),
                    kind,
                };
                metrics.tokens.get_or_create(&labels).inc_by(count);
            }
        }
        if let Some(cost) = trace.cost_usd.filter(|c| *c > 0.0) {
            metrics
                .cost
                .get_or_create(&CostLabels {
                    experiment,
                    prompt_version,
                    provider,
                    model,
                })
                .inc_by(cost);
        }
    }
}

impl MetricsWriter {
    pub fn observe_score(&mut self, metrics: &Metrics, trace: &Trace, score: &crate::trace::Score) {
        let labels = ScoreLabels {
            experiment: self.experiments.admit(&trace.experiment),
            prompt_version: self
                .prompt_versions
                .admit(trace.prompt_version.as_deref().unwrap_or("none")),
            name: score.name.clone(),
        };
        metrics.scores.get_or_create(&labels).observe(score.value);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded() {
        let mut limit = LabelLimit::new(2);
        assert_eq!(limit.admit("a"), "a");
        assert_eq!(limit.admit("b"), "b");
        assert_eq!(limit.admit("c"), "other");
        assert_eq!(limit.admit("a"), "a");
    }

    #[test]
    fn exposition_names_follow_the_contract() {
        let metrics = Metrics::new();
        let mut writer = MetricsWriter::new(10);
        let trace = Trace {
            experiment: "e".into(),
            provider: Some("p".into()),
            served_model: Some("m".into()),
            status: 200,
            cost_usd: Some(0.5),
            usage: crate::trace::Usage {
                input_tokens: Some(3),
                output_tokens: Some(2),
                ..Default::default()
            },
            latency: crate::trace::Latency {
                total_ms: 12.0,
                upstream_ms: Some(10.0),
                overhead_ms: 0.2,
                ttft_ms: Some(5.0),
            },
            ..Default::default()
        };
        writer.observe(&metrics, &trace);
        let text = metrics.encode();
        for name in [
            "flowgate_requests_total{",
            "flowgate_request_duration_seconds_bucket{",
            "flowgate_upstream_duration_seconds_bucket{",
            "flowgate_overhead_seconds_bucket{",
            "flowgate_time_to_first_token_seconds_bucket{",
            "flowgate_tokens_total{",
            "flowgate_cost_usd_total{",
            "flowgate_traces_dropped_total ",
            "flowgate_trace_queue_depth ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(text.contains(r#"kind="input""#));
    }
}
