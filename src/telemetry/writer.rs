//! Turns finished traces and scores into metric updates. Owned by the recorder thread.
//!
//! Building a label set means owning its strings, so the family's `get_or_create` allocates on
//! every call. The writer instead keeps, per distinct call label set, the handles of every series
//! it has touched (a counter or histogram handle is a shared pointer to the series the registry
//! exposes) and finds them by hashing the borrowed label values. A trace whose label sets were
//! seen before updates its metrics without allocating.

use std::collections::HashMap;
use std::hash::BuildHasher;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::labels::{
    CacheLabels, CallLabels, GuardrailLabels, LabelLimit, RequestLabels, ScoreLabels, TokenLabels,
    TraceExemplar, UpstreamLabels,
};
use super::{CostCounter, LatencyHistogram, Metrics};
use crate::trace::{Latency, Score, Trace};

/// Turns finished traces into metric updates; owned by the recorder task.
pub struct MetricsWriter {
    experiments: LabelLimit,
    prompt_versions: LabelLimit,
    /// Model names come from clients too (`provider/<anything>`): bounded like the others.
    models: LabelLimit,
    /// Score names are chosen by whoever posts a score.
    score_names: LabelLimit,
    /// Guardrail names come from the config; bounded all the same, as a guard against a bug.
    guardrails: LabelLimit,
    calls: HashMap<u64, Vec<CallSeries>>,
    upstreams: HashMap<u64, Vec<(UpstreamLabels, LatencyHistogram)>>,
    hasher: std::hash::RandomState,
}

/// The label values of one call, borrowed from its trace after bounding.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct CallKey<'a> {
    experiment: &'a str,
    prompt_version: &'a str,
    provider: &'a str,
    model: &'a str,
}

impl CallKey<'_> {
    fn is(&self, labels: &CallLabels) -> bool {
        self.experiment == labels.experiment
            && self.prompt_version == labels.prompt_version
            && self.provider == labels.provider
            && self.model == labels.model
    }

    fn owned(&self) -> CallLabels {
        CallLabels {
            experiment: self.experiment.to_owned(),
            prompt_version: self.prompt_version.to_owned(),
            provider: self.provider.to_owned(),
            model: self.model.to_owned(),
        }
    }
}

/// How the call ended, as the `status` label says it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Code(u16),
    Cancelled,
}

impl Status {
    fn of(trace: &Trace) -> Status {
        if trace.error.as_ref().is_some_and(|e| e.class == "cancelled") {
            Status::Cancelled
        } else {
            Status::Code(trace.status)
        }
    }

    fn label(self) -> String {
        match self {
            Status::Code(code) => code.to_string(),
            Status::Cancelled => "cancelled".to_owned(),
        }
    }
}

const TOKEN_KINDS: [&str; 3] = ["input", "output", "cached_input"];
const CACHE_RESULTS: [&str; 3] = ["hit", "miss", "bypass"];
const VERDICTS: [&str; 4] = ["pass", "flagged", "redacted", "blocked"];

/// The handles of the series one call label set has touched; each is created on first use, so
/// the exposition holds only series that were observed.
struct CallSeries {
    labels: CallLabels,
    statuses: Vec<(Status, Counter)>,
    duration: Option<LatencyHistogram>,
    ttft: Option<LatencyHistogram>,
    tokens: [Option<Counter>; TOKEN_KINDS.len()],
    cost: Option<CostCounter>,
    cache: [Option<Counter>; CACHE_RESULTS.len()],
    /// (guardrail, verdict index) → counter.
    guardrails: Vec<((String, usize), Counter)>,
    scores: Vec<(String, Histogram)>,
}

impl CallSeries {
    fn new(labels: CallLabels) -> CallSeries {
        CallSeries {
            labels,
            statuses: Vec::new(),
            duration: None,
            ttft: None,
            tokens: Default::default(),
            cost: None,
            cache: Default::default(),
            guardrails: Vec::new(),
            scores: Vec::new(),
        }
    }

    fn observe_latency(
        &mut self,
        metrics: &Metrics,
        latency: &Latency,
        exemplar: Option<TraceExemplar>,
    ) {
        let labels = &self.labels;
        self.duration
            .get_or_insert_with(|| metrics.request_duration.get_or_create(labels).clone())
            .observe(latency.total_ms / 1000.0, exemplar);
        if let Some(ms) = latency.ttft_ms {
            self.ttft
                .get_or_insert_with(|| metrics.ttft.get_or_create(labels).clone())
                .observe(ms / 1000.0, exemplar);
        }
    }

    fn count_usage(&mut self, metrics: &Metrics, trace: &Trace) {
        let labels = &self.labels;
        let usage = &trace.usage;
        let counts = [
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
        ];
        for (kind, count) in counts.into_iter().enumerate() {
            let Some(count) = count.filter(|c| *c > 0) else {
                continue;
            };
            self.tokens[kind]
                .get_or_insert_with(|| {
                    let labels = TokenLabels {
                        call: labels.clone(),
                        kind: TOKEN_KINDS[kind],
                    };
                    metrics.tokens.get_or_create(&labels).clone()
                })
                .inc_by(count);
        }
        if let Some(cost) = trace.cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
            self.cost
                .get_or_insert_with(|| metrics.cost.get_or_create(labels).clone())
                .inc_by(cost);
        }
    }

    /// Counts `hit`, `miss` or `bypass`; any other value is not a cache result and is skipped.
    fn count_cache(&mut self, metrics: &Metrics, result: &str) {
        let Some(at) = CACHE_RESULTS.iter().position(|r| *r == result) else {
            return;
        };
        let labels = &self.labels;
        self.cache[at]
            .get_or_insert_with(|| {
                let labels = CacheLabels {
                    call: labels.clone(),
                    result: CACHE_RESULTS[at],
                };
                metrics.cache_requests.get_or_create(&labels).clone()
            })
            .inc();
    }

    /// Counts one guardrail's verdict; a verdict outside the four known ones is skipped.
    fn count_guardrail(&mut self, metrics: &Metrics, guardrail: &str, verdict: &str) {
        if let Some(verdict) = VERDICTS.iter().position(|v| *v == verdict) {
            self.guardrail(metrics, guardrail, verdict).inc();
        }
    }

    fn status(&mut self, metrics: &Metrics, status: Status) -> &Counter {
        let labels = &self.labels;
        handle(
            &mut self.statuses,
            |s| *s == status,
            || {
                let labels = RequestLabels {
                    call: labels.clone(),
                    status: status.label(),
                };
                (status, metrics.requests.get_or_create(&labels).clone())
            },
        )
    }

    fn guardrail(&mut self, metrics: &Metrics, guardrail: &str, verdict: usize) -> &Counter {
        let labels = &self.labels;
        let matches = |(g, v): &(String, usize)| g == guardrail && *v == verdict;
        handle(&mut self.guardrails, matches, || {
            let labels = GuardrailLabels {
                call: labels.clone(),
                guardrail: guardrail.to_owned(),
                verdict: VERDICTS[verdict],
            };
            let counter = metrics.guardrail_checks.get_or_create(&labels).clone();
            ((guardrail.to_owned(), verdict), counter)
        })
    }

    fn score(&mut self, metrics: &Metrics, name: &str) -> &Histogram {
        let labels = &self.labels;
        handle(
            &mut self.scores,
            |n| n == name,
            || {
                let labels = ScoreLabels {
                    call: labels.clone(),
                    name: name.to_owned(),
                };
                (
                    name.to_owned(),
                    metrics.scores.get_or_create(&labels).clone(),
                )
            },
        )
    }
}

/// The handle stored under the key `matches` accepts, created (with its key) on first use. The
/// lists are short — a few statuses, guardrail verdicts or score names per call label set — so a
/// scan beats hashing.
fn handle<K, H>(
    handles: &mut Vec<(K, H)>,
    matches: impl Fn(&K) -> bool,
    create: impl FnOnce() -> (K, H),
) -> &H {
    let at = match handles.iter().position(|(key, _)| matches(key)) {
        Some(at) => at,
        None => {
            handles.push(create());
            handles.len() - 1
        }
    };
    &handles[at].1
}

impl MetricsWriter {
    /// `max_label_values` bounds each client-chosen label (experiment, prompt_version, model,
    /// score name) separately.
    pub fn new(max_label_values: usize) -> MetricsWriter {
        MetricsWriter {
            experiments: LabelLimit::new(max_label_values),
            prompt_versions: LabelLimit::new(max_label_values),
            models: LabelLimit::new(max_label_values),
            score_names: LabelLimit::new(max_label_values),
            guardrails: LabelLimit::new(max_label_values),
            calls: HashMap::new(),
            upstreams: HashMap::new(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Counts one finished call: request, latency, tokens, cost, cache result and guardrail
    /// verdicts, all read from its trace.
    pub fn observe(&mut self, metrics: &Metrics, trace: &Trace) {
        let exemplar = TraceExemplar::new(&trace.id);
        let key = self.key(trace);
        let (provider, model) = (key.provider, key.model);
        let series = Self::series(&mut self.calls, &self.hasher, key);
        series.status(metrics, Status::of(trace)).inc();
        series.observe_latency(metrics, &trace.latency, exemplar);
        series.count_usage(metrics, trace);
        series.count_cache(metrics, &trace.cache);
        for check in &trace.guardrails {
            let guardrail = self.guardrails.admit(&check.guardrail);
            series.count_guardrail(metrics, guardrail, &check.verdict);
        }
        if let Some(ms) = trace.latency.upstream_ms {
            let upstream =
                Self::upstream(&mut self.upstreams, &self.hasher, metrics, provider, model);
            upstream.observe(ms / 1000.0, exemplar);
        }
        // A cache hit is all gateway: its whole time is overhead.
        if trace.latency.upstream_ms.is_some() || trace.cache == crate::cache::HIT {
            metrics
                .overhead
                .observe(trace.latency.overhead_ms / 1000.0, exemplar);
        }
    }

    /// Counts a quality score posted to a stored trace, under the trace's call labels.
    pub fn observe_score(&mut self, metrics: &Metrics, trace: &Trace, score: &Score) {
        // A non-finite value would turn the series' sum into NaN or infinity for good.
        if !score.value.is_finite() {
            return;
        }
        let name = self.score_names.admit(&score.name);
        let key = self.key(trace);
        let series = Self::series(&mut self.calls, &self.hasher, key);
        series.score(metrics, name).observe(score.value);
    }

    /// The trace's bounded call labels.
    fn key<'a>(&mut self, trace: &'a Trace) -> CallKey<'a> {
        // A call rejected before routing has no model worth a series.
        let model = match crate::runs::run_model(trace) {
            "" => "none",
            model => self.models.admit(model),
        };
        CallKey {
            experiment: self.experiments.admit(&trace.experiment),
            prompt_version: self
                .prompt_versions
                .admit(trace.prompt_version.as_deref().unwrap_or("none")),
            provider: trace.provider.as_deref().unwrap_or("none"),
            model,
        }
    }

    fn series<'c>(
        calls: &'c mut HashMap<u64, Vec<CallSeries>>,
        hasher: &std::hash::RandomState,
        key: CallKey<'_>,
    ) -> &'c mut CallSeries {
        let same_hash = calls.entry(hasher.hash_one(key)).or_default();
        let at = match same_hash.iter().position(|s| key.is(&s.labels)) {
            Some(at) => at,
            None => {
                same_hash.push(CallSeries::new(key.owned()));
                same_hash.len() - 1
            }
        };
        &mut same_hash[at]
    }

    fn upstream<'c>(
        upstreams: &'c mut HashMap<u64, Vec<(UpstreamLabels, LatencyHistogram)>>,
        hasher: &std::hash::RandomState,
        metrics: &Metrics,
        provider: &str,
        model: &str,
    ) -> &'c LatencyHistogram {
        let same_hash = upstreams
            .entry(hasher.hash_one((provider, model)))
            .or_default();
        let at = match same_hash
            .iter()
            .position(|(l, _)| l.provider == provider && l.model == model)
        {
            Some(at) => at,
            None => {
                let labels = UpstreamLabels {
                    provider: provider.to_owned(),
                    model: model.to_owned(),
                };
                let histogram = metrics.upstream_duration.get_or_create(&labels).clone();
                same_hash.push((labels, histogram));
                same_hash.len() - 1
            }
        };
        &same_hash[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Exposition;
    use crate::trace::{GuardrailVerdict, Usage};

    fn trace(experiment: &str, prompt_version: &str) -> Trace {
        Trace {
            id: "0190f5c2-7a4e-7cc2-9d3b-2f6e1c1a0b9d".into(),
            experiment: experiment.into(),
            prompt_version: Some(prompt_version.into()),
            provider: Some("openai".into()),
            served_model: Some("gpt-4o-mini".into()),
            status: 200,
            cost_usd: Some(0.5),
            cache: "hit".into(),
            guardrails: vec![GuardrailVerdict {
                guardrail: "pii".into(),
                verdict: "redacted".into(),
                ..Default::default()
            }],
            usage: Usage {
                input_tokens: Some(3),
                output_tokens: Some(2),
                cached_input_tokens: Some(1),
                cache_write_input_tokens: None,
                ..Default::default()
            },
            latency: Latency {
                total_ms: 12.0,
                upstream_ms: Some(10.0),
                overhead_ms: 0.2,
                ttft_ms: Some(5.0),
            },
            ..Default::default()
        }
    }

    fn score(value: f64) -> Score {
        Score {
            name: "exact_match".into(),
            value,
            comment: None,
            at_ms: 0,
        }
    }

    #[test]
    fn every_family_is_exposed_with_its_type_and_labels() {
        let metrics = Metrics::new();
        let mut writer = MetricsWriter::new(10);
        let trace = trace("qa", "v1");
        writer.observe(&metrics, &trace);
        writer.observe_score(&metrics, &trace, &score(0.75));
        writer.observe_score(&metrics, &trace, &score(f64::NAN));
        let text = metrics.encode(Exposition::Prometheus);
        let call = r#"experiment="qa",prompt_version="v1",provider="openai",model="gpt-4o-mini""#;
        for needle in [
            "# TYPE flowgate_requests_total counter".to_owned(),
            format!(r#"flowgate_requests_total{{{call},status="200"}} 1"#),
            "# TYPE flowgate_request_duration_seconds histogram".into(),
            format!(r#"flowgate_request_duration_seconds_count{{{call}}} 1"#),
            "# TYPE flowgate_upstream_duration_seconds histogram".into(),
            r#"flowgate_upstream_duration_seconds_count{provider="openai",model="gpt-4o-mini"} 1"#
                .into(),
            "# TYPE flowgate_overhead_seconds histogram".into(),
            "flowgate_overhead_seconds_count 1".into(),
            "# TYPE flowgate_time_to_first_token_seconds histogram".into(),
            format!(r#"flowgate_time_to_first_token_seconds_count{{{call}}} 1"#),
            "# TYPE flowgate_tokens_total counter".into(),
            format!(r#"flowgate_tokens_total{{{call},kind="input"}} 3"#),
            format!(r#"flowgate_tokens_total{{{call},kind="output"}} 2"#),
            format!(r#"flowgate_tokens_total{{{call},kind="cached_input"}} 1"#),
            "# TYPE flowgate_cost_usd_total counter".into(),
            format!(r#"flowgate_cost_usd_total{{{call}}} 0.5"#),
            "# TYPE flowgate_cache_requests_total counter".into(),
            format!(r#"flowgate_cache_requests_total{{{call},result="hit"}} 1"#),
            "# TYPE flowgate_guardrail_checks_total counter".into(),
            format!(
                r#"flowgate_guardrail_checks_total{{{call},guardrail="pii",verdict="redacted"}} 1"#
            ),
            "# TYPE flowgate_score histogram".into(),
            format!(r#"flowgate_score_sum{{{call},name="exact_match"}} 0.75"#),
            format!(r#"flowgate_score_count{{{call},name="exact_match"}} 1"#),
            "# TYPE flowgate_traces_dropped_total counter".into(),
            "flowgate_traces_dropped_total 0".into(),
            "# TYPE flowgate_trace_queue_depth gauge".into(),
            "flowgate_trace_queue_depth 0".into(),
            "# TYPE flowgate_rejected_total counter".into(),
        ] {
            assert!(
                text.lines().any(|line| line == needle),
                "missing {needle} in\n{text}"
            );
        }
    }

    #[test]
    fn latency_buckets_follow_the_genai_convention() {
        let metrics = Metrics::new();
        MetricsWriter::new(10).observe(&metrics, &trace("qa", "v1"));
        let text = metrics.encode(Exposition::Prometheus);
        let bounds = |family: &str| -> Vec<String> {
            text.lines()
                .filter(|line| line.starts_with(&format!("{family}_bucket{{")))
                .filter_map(|line| line.split("le=\"").nth(1)?.split('"').next())
                .map(str::to_owned)
                .collect()
        };
        let genai = [
            "0.01", "0.02", "0.04", "0.08", "0.16", "0.32", "0.64", "1.28", "2.56", "5.12",
            "10.24", "20.48", "40.96", "81.92", "+Inf",
        ];
        for family in [
            "flowgate_request_duration_seconds",
            "flowgate_upstream_duration_seconds",
            "flowgate_time_to_first_token_seconds",
        ] {
            assert_eq!(bounds(family), genai, "{family}");
        }
        let overhead: Vec<f64> = bounds("flowgate_overhead_seconds")
            .iter()
            .map(|b| b.parse().unwrap_or(f64::INFINITY))
            .collect();
        // 1 µs to 100 ms, no bound more than 5/3 of the one before (doubling: 2).
        assert_eq!((overhead[0], overhead[overhead.len() - 2]), (1e-6, 0.1));
        assert!(overhead
            .windows(2)
            .all(|w| w[1] / w[0] <= 5.0 / 3.0 + 1e-9 || w[1].is_infinite()));
    }

    #[test]
    fn latency_buckets_carry_the_trace_id_in_openmetrics_only() {
        let metrics = Metrics::new();
        MetricsWriter::new(10).observe(&metrics, &trace("qa", "v1"));
        let exemplar = r#" # {trace_id="0190f5c2-7a4e-7cc2-9d3b-2f6e1c1a0b9d"} "#;
        let openmetrics = metrics.encode(Exposition::OpenMetrics);
        for family in [
            "flowgate_request_duration_seconds_bucket",
            "flowgate_upstream_duration_seconds_bucket",
            "flowgate_time_to_first_token_seconds_bucket",
            "flowgate_overhead_seconds_bucket",
        ] {
            assert!(
                openmetrics
                    .lines()
                    .any(|line| line.starts_with(family) && line.contains(exemplar)),
                "no exemplar on {family} in\n{openmetrics}"
            );
        }
        assert!(openmetrics.ends_with("# EOF\n"));
        let classic = metrics.encode(Exposition::Prometheus);
        assert!(!classic.contains("trace_id"), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
    }

    /// Each series of `family` in an exposition, as its label text.
    fn series<'t>(text: &'t str, family: &str) -> Vec<&'t str> {
        text.lines()
            .filter_map(|line| line.strip_prefix(family)?.strip_prefix('{'))
            .filter_map(|rest| rest.split('}').next())
            .collect()
    }

    #[test]
    fn ten_thousand_experiments_make_at_most_the_maximum_of_series() {
        let metrics = Metrics::new();
        let max = 25;
        let mut writer = MetricsWriter::new(max);
        for i in 0..10_000 {
            let trace = trace(&format!("experiment-{i}"), &format!("v{i}"));
            writer.observe(&metrics, &trace);
            writer.observe_score(&metrics, &trace, &score(1.0));
        }
        let text = metrics.encode(Exposition::Prometheus);
        // One label set per admitted value, plus `other` for the rest.
        for family in [
            "flowgate_requests_total",
            "flowgate_request_duration_seconds_count",
            "flowgate_time_to_first_token_seconds_count",
            "flowgate_cost_usd_total",
            "flowgate_cache_requests_total",
            "flowgate_guardrail_checks_total",
            "flowgate_score_count",
        ] {
            let found = series(&text, family);
            assert_eq!(found.len(), max + 1, "{family}: {found:?}");
            let other = r#"experiment="other",prompt_version="other""#;
            assert!(found.iter().any(|s| s.starts_with(other)), "{family}");
        }
        let inputs: Vec<_> = series(&text, "flowgate_tokens_total")
            .into_iter()
            .filter(|s| s.ends_with(r#"kind="input""#))
            .collect();
        assert_eq!(inputs.len(), max + 1);
        let other = r#"flowgate_requests_total{experiment="other",prompt_version="other",provider="openai",model="gpt-4o-mini",status="200"}"#;
        assert!(
            text.contains(&format!("{other} {}", 10_000 - max)),
            "{text}"
        );
    }
}
