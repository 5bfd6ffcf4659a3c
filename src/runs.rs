//! Runs: which traces belong together (identity) and what they add up to (aggregation).
//!
//! A run is one configuration of an experiment (CONTRACT section 6). Its id is derived on the
//! request path from the configuration, so it must be cheap and stable across versions and
//! machines; its aggregate is updated by the recorder as traces and scores arrive.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use ring::digest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sketch::Sketch;
use crate::trace::{Score, Trace};

/// What makes a run: the configuration a trace was produced with.
#[derive(Debug, Clone, Copy)]
pub struct RunIdentity<'a> {
    pub experiment: &'a str,
    /// `x-flowgate-run`: when given, it alone (within the experiment) names the run.
    pub run_name: Option<&'a str>,
    pub provider: &'a str,
    pub model: &'a str,
    pub prompt_id: Option<&'a str>,
    pub prompt_version: Option<&'a str>,
    pub params: &'a BTreeMap<String, String>,
    pub sampling: &'a BTreeMap<String, Value>,
}

impl RunIdentity<'_> {
    /// A stable 16-hex-character id: the first 8 bytes of SHA-256 over a canonical encoding.
    ///
    /// The encoding is versioned (`v1`) and length-prefixes every string, so no two different
    /// identities share an encoding ("a","bc" vs "ab","c"). Numbers are canonicalised, so
    /// `0.7`/`0.70` and `1`/`1.0` give the same id. Changing the encoding changes every run id:
    /// bump the version prefix if it ever has to change.
    pub fn id(&self) -> String {
        let mut hash = CanonicalHash::new();
        hash.str("v1");
        match self.run_name {
            Some(name) => {
                hash.str("run");
                hash.str(self.experiment);
                hash.str(name);
            }
            None => self.hash_configuration(&mut hash),
        }
        hash.finish_hex()
    }

    fn hash_configuration(&self, hash: &mut CanonicalHash) {
        hash.str("derived");
        hash.str(self.experiment);
        hash.str(self.provider);
        hash.str(self.model);
        hash.opt_str(self.prompt_id);
        hash.opt_str(self.prompt_version);
        hash.len(self.params.len());
        for (key, value) in self.params {
            hash.str(key);
            hash.str(value);
        }
        hash.len(self.sampling.len());
        for (key, value) in self.sampling {
            hash.str(key);
            hash.value(value);
        }
    }
}

/// Builds an unambiguous encoding and hashes it with SHA-256 in one call at the end: feeding
/// SHA-256 a dozen small pieces one by one cost more than the hashing itself (this runs on every
/// call's request path).
struct CanonicalHash(Vec<u8>);

impl CanonicalHash {
    fn new() -> Self {
        Self(Vec::with_capacity(256))
    }

    fn update(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn len(&mut self, len: usize) {
        self.update(&(len as u64).to_be_bytes());
    }

    fn str(&mut self, text: &str) {
        self.len(text.len());
        self.update(text.as_bytes());
    }

    fn opt_str(&mut self, text: Option<&str>) {
        match text {
            None => self.update(b"-"),
            Some(text) => {
                self.update(b"+");
                self.str(text);
            }
        }
    }

    /// JSON values with a one-byte type tag; object keys in sorted order.
    fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.update(b"n"),
            Value::Bool(true) => self.update(b"t"),
            Value::Bool(false) => self.update(b"f"),
            Value::Number(number) => self.number(number),
            Value::String(text) => {
                self.update(b"s");
                self.str(text);
            }
            Value::Array(items) => {
                self.update(b"a");
                self.len(items.len());
                items.iter().for_each(|item| self.value(item));
            }
            Value::Object(map) => self.object(map),
        }
    }

    fn object(&mut self, map: &serde_json::Map<String, Value>) {
        self.update(b"o");
        self.len(map.len());
        let sorted = map.keys().zip(map.keys().skip(1)).all(|(a, b)| a < b);
        if sorted {
            map.iter().for_each(|(key, value)| self.entry(key, value));
        } else {
            // Only when serde_json keeps insertion order (its `preserve_order` feature).
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            entries
                .into_iter()
                .for_each(|(key, value)| self.entry(key, value));
        }
    }

    fn entry(&mut self, key: &str, value: &Value) {
        self.str(key);
        self.value(value);
    }

    /// Integers (also integral floats below 2^53) as decimal integers, other floats in Rust's
    /// shortest round-trip exponent form; `;` ends the digits, which never contain it.
    fn number(&mut self, number: &serde_json::Number) {
        const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
        self.update(b"d");
        let mut digits = EncodingWriter(&mut self.0);
        // Writing into a Vec cannot fail; the results are ignored for that reason.
        let _ = if let Some(integer) = number.as_i64() {
            write!(digits, "{integer}")
        } else if let Some(integer) = number.as_u64() {
            write!(digits, "{integer}")
        } else {
            match number.as_f64() {
                Some(float) if float.fract() == 0.0 && float.abs() < EXACT_INTEGER_LIMIT => {
                    write!(digits, "{}", float as i64)
                }
                Some(float) => write!(digits, "{float:e}"),
                None => write!(digits, "{number}"),
            }
        };
        self.update(b";");
    }

    /// The id of this encoding: remembered per thread, since a gateway sees few configurations
    /// and many calls of each, and SHA-256 was ~6k of the ~112k instructions a call costs the
    /// tokio workers (callgrind, 200 RPS), where looking the encoding up costs ~1k.
    fn finish_hex(self) -> String {
        if self.0.len() > KNOWN_ENCODING_MAX_BYTES {
            return sha256_hex16(&self.0);
        }
        let remembered = KNOWN_IDS.try_with(|known| {
            let mut known = known.borrow_mut();
            if let Some(id) = known.get(&self.0) {
                return id.clone();
            }
            let id = sha256_hex16(&self.0);
            if known.len() >= KNOWN_IDS_MAX {
                // Distinct run names on every call would otherwise grow it without end.
                known.clear();
            }
            known.insert(self.0.clone(), id.clone());
            id
        });
        // Only while the thread's locals are being torn down.
        remembered.unwrap_or_else(|_| sha256_hex16(&self.0))
    }
}

/// Encodings remembered per thread, at most; the map starts over when full.
const KNOWN_IDS_MAX: usize = 1024;

/// Longer encodings (many or long params) are hashed every time: the map stays under ~1 MB.
const KNOWN_ENCODING_MAX_BYTES: usize = 512;

thread_local! {
    static KNOWN_IDS: RefCell<HashMap<Vec<u8>, String>> = RefCell::new(HashMap::new());
}

/// The first 8 bytes of the SHA-256 of `encoding`, in hex.
fn sha256_hex16(encoding: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = digest::digest(&digest::SHA256, encoding);
    let mut id = String::with_capacity(16);
    for byte in &digest.as_ref()[..8] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

struct EncodingWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for EncodingWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// A run as stored: its identity and the running aggregate of its traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub experiment: String,
    /// The explicit run name, when the run was named with `x-flowgate-run`.
    #[serde(default)]
    pub name: Option<String>,
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub prompt_id: Option<String>,
    #[serde(default)]
    pub prompt_version: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub sampling: BTreeMap<String, Value>,
    /// Merged from every trace; on a conflict the latest trace's value wins.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub requests: u64,
    pub errors: u64,
    pub cache_hits: u64,
    pub latency_ms: Sketch,
    pub ttft_ms: Sketch,
    pub overhead_ms: Sketch,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub cache_write_input_tokens: u64,
    /// Sum of the known costs; requests without a price add nothing (see `priced_requests`).
    pub cost_usd: f64,
    pub priced_requests: u64,
    /// What cache hits would have cost at the provider.
    #[serde(default)]
    pub cost_saved_usd: f64,
    #[serde(default)]
    pub guardrails: BTreeMap<String, GuardrailCounts>,
    #[serde(default)]
    pub scores: BTreeMap<String, ScoreTotals>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardrailCounts {
    pub checks: u64,
    pub flagged: u64,
    pub redacted: u64,
    pub blocked: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreTotals {
    pub count: u64,
    pub sum: f64,
}

impl Run {
    /// A new run holding just this trace.
    pub fn from_first(trace: &Trace) -> Run {
        let mut run = Run {
            id: trace.run_id.clone(),
            experiment: trace.experiment.clone(),
            name: trace.run_name.clone(),
            provider: run_provider(trace).to_owned(),
            model: run_model(trace).to_owned(),
            prompt_id: trace.prompt_id.clone(),
            prompt_version: trace.prompt_version.clone(),
            params: trace.params.clone(),
            sampling: trace.sampling.clone(),
            tags: BTreeMap::new(),
            first_seen_ms: trace.started_at_ms,
            last_seen_ms: trace.started_at_ms,
            requests: 0,
            errors: 0,
            cache_hits: 0,
            latency_ms: Sketch::new(),
            ttft_ms: Sketch::new(),
            overhead_ms: Sketch::new(),
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            cost_usd: 0.0,
            priced_requests: 0,
            cost_saved_usd: 0.0,
            guardrails: BTreeMap::new(),
            scores: BTreeMap::new(),
        };
        run.observe(trace);
        run
    }

    /// Adds one trace to the aggregate, including the scores it already carries.
    pub fn observe(&mut self, trace: &Trace) {
        self.first_seen_ms = self.first_seen_ms.min(trace.started_at_ms);
        self.last_seen_ms = self
            .last_seen_ms
            .max(trace.ended_at_ms.max(trace.started_at_ms));
        self.tags
            .extend(trace.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.requests += 1;
        self.errors += u64::from(trace.is_error());
        self.cache_hits += u64::from(trace.cache == "hit");
        self.observe_latency(trace);
        self.observe_usage(trace);
        for verdict in &trace.guardrails {
            let counts = self
                .guardrails
                .entry(verdict.guardrail.clone())
                .or_default();
            counts.observe(&verdict.verdict);
        }
        trace.scores.iter().for_each(|score| self.add_score(score));
    }

    /// Aggregates a quality score; non-finite values carry no information and are skipped.
    pub fn add_score(&mut self, score: &Score) {
        let totals = self.scores.entry(score.name.clone()).or_default();
        // A sum that overflowed could not be stored (JSON has no infinity) or read back.
        if !(totals.sum + score.value).is_finite() {
            return;
        }
        totals.count += 1;
        totals.sum += score.value;
    }

    fn observe_latency(&mut self, trace: &Trace) {
        self.latency_ms.add(trace.latency.total_ms);
        self.overhead_ms.add(trace.latency.overhead_ms);
        if let Some(ttft) = trace.latency.ttft_ms {
            self.ttft_ms.add(ttft);
        }
    }

    fn observe_usage(&mut self, trace: &Trace) {
        let usage = &trace.usage;
        self.input_tokens += usage.input_tokens.unwrap_or(0);
        self.output_tokens += usage.output_tokens.unwrap_or(0);
        self.cached_input_tokens += usage.cached_input_tokens.unwrap_or(0);
        self.cache_write_input_tokens += usage.cache_write_input_tokens.unwrap_or(0);
        if let Some(cost) = trace.cost_usd.filter(|cost| cost.is_finite()) {
            self.cost_usd += cost;
            self.priced_requests += 1;
        }
        if let Some(saved) = trace.cost_saved_usd.filter(|saved| saved.is_finite()) {
            self.cost_saved_usd += saved;
        }
    }

    /// The run as the admin API serves it.
    pub fn view(&self) -> RunView {
        RunView {
            id: self.id.clone(),
            experiment: self.experiment.clone(),
            name: self.name.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            prompt_id: self.prompt_id.clone(),
            prompt_version: self.prompt_version.clone(),
            params: self.params.clone(),
            sampling: self.sampling.clone(),
            tags: self.tags.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            metrics: self.metrics(),
        }
    }

    fn metrics(&self) -> RunMetrics {
        RunMetrics {
            requests: self.requests,
            errors: self.errors,
            error_rate: ratio(self.errors, self.requests),
            cache_hits: self.cache_hits,
            cache_hit_rate: ratio(self.cache_hits, self.requests),
            latency_ms: Distribution::of(&self.latency_ms),
            ttft_ms: Distribution::of(&self.ttft_ms),
            overhead_ms: Distribution::of(&self.overhead_ms),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            cache_write_input_tokens: self.cache_write_input_tokens,
            provider_cache_hit_rate: ratio(self.cached_input_tokens, self.input_tokens),
            cost_usd: (self.priced_requests > 0).then_some(self.cost_usd),
            cost_per_request_usd: (self.priced_requests > 0)
                .then(|| self.cost_usd / self.priced_requests as f64),
            cost_saved_usd: self.cost_saved_usd,
            guardrails: self
                .guardrails
                .iter()
                .map(|(name, c)| (name.clone(), c.view()))
                .collect(),
            scores: self
                .scores
                .iter()
                .map(|(name, s)| (name.clone(), s.view()))
                .collect(),
        }
    }
}

/// The provider a run is about: for a `[[models]]` call the router itself, whichever deployment
/// served it.
pub fn run_provider(trace: &Trace) -> &str {
    if trace.model_group.is_some() {
        return crate::routing::GROUP_PROVIDER;
    }
    trace.provider.as_deref().unwrap_or("")
}

/// The model a run is about, as its identity uses it: the model a provider was asked for
/// (the served model, else what the client named for pass-through calls). A call rejected
/// before routing has no provider and counts under the model "": a client making up model
/// names must not make up runs.
pub fn run_model(trace: &Trace) -> &str {
    if let Some(group) = &trace.model_group {
        return group;
    }
    if trace.provider.is_none() {
        return "";
    }
    trace
        .served_model
        .as_deref()
        .or(trace.requested_model.as_deref())
        .unwrap_or_default()
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl GuardrailCounts {
    fn observe(&mut self, verdict: &str) {
        self.checks += 1;
        match verdict {
            "flagged" => self.flagged += 1,
            "redacted" => self.redacted += 1,
            "blocked" => self.blocked += 1,
            _ => {}
        }
    }

    fn view(&self) -> GuardrailView {
        GuardrailView {
            checks: self.checks,
            flagged: self.flagged,
            redacted: self.redacted,
            blocked: self.blocked,
            flag_rate: ratio(self.flagged, self.checks),
            block_rate: ratio(self.blocked, self.checks),
        }
    }
}

impl ScoreTotals {
    fn view(&self) -> ScoreView {
        ScoreView {
            count: self.count,
            mean: (self.count > 0).then(|| self.sum / self.count as f64),
        }
    }
}

/// A run as the admin API serves it (`GET /api/v1/runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub experiment: String,
    pub name: Option<String>,
    pub provider: String,
    pub model: String,
    pub prompt_id: Option<String>,
    pub prompt_version: Option<String>,
    pub params: BTreeMap<String, String>,
    pub sampling: BTreeMap<String, Value>,
    pub tags: BTreeMap<String, String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub metrics: RunMetrics,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub cache_hits: u64,
    pub cache_hit_rate: f64,
    pub latency_ms: Option<Distribution>,
    /// `None` until a streamed request reported a first token.
    pub ttft_ms: Option<Distribution>,
    pub overhead_ms: Option<Distribution>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub cache_write_input_tokens: u64,
    /// Share of input tokens the provider served from its prompt cache.
    #[serde(default)]
    pub provider_cache_hit_rate: f64,
    /// `None` when no request had a known price.
    pub cost_usd: Option<f64>,
    /// Cost over the priced requests only.
    pub cost_per_request_usd: Option<f64>,
    /// What the response cache's hits would have cost at the provider.
    #[serde(default)]
    pub cost_saved_usd: f64,
    pub guardrails: BTreeMap<String, GuardrailView>,
    pub scores: BTreeMap<String, ScoreView>,
}

/// Percentiles within 1% relative error (see `sketch`), and the exact mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Distribution {
    fn of(sketch: &Sketch) -> Option<Distribution> {
        Some(Distribution {
            p50: sketch.quantile(0.5)?,
            p95: sketch.quantile(0.95)?,
            p99: sketch.quantile(0.99)?,
            mean: sketch.mean()?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuardrailView {
    pub checks: u64,
    pub flagged: u64,
    pub redacted: u64,
    pub blocked: u64,
    pub flag_rate: f64,
    pub block_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreView {
    pub count: u64,
    pub mean: Option<f64>,
}

/// An experiment: a named group of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub name: String,
    pub runs: u64,
    pub traces: u64,
    pub first_seen_ms: u64,
    pub last_activity_ms: u64,
}

impl Experiment {
    /// A new experiment holding just this trace (and so its first run).
    pub fn from_first(trace: &Trace) -> Experiment {
        let mut experiment = Experiment {
            name: trace.experiment.clone(),
            runs: 0,
            traces: 0,
            first_seen_ms: trace.started_at_ms,
            last_activity_ms: trace.started_at_ms,
        };
        experiment.observe(trace, true);
        experiment
    }

    /// Counts one trace; `new_run` when the trace started a run this experiment had not seen.
    pub fn observe(&mut self, trace: &Trace, new_run: bool) {
        self.traces += 1;
        self.runs += u64::from(new_run);
        self.first_seen_ms = self.first_seen_ms.min(trace.started_at_ms);
        self.last_activity_ms = self
            .last_activity_ms
            .max(trace.ended_at_ms.max(trace.started_at_ms));
    }
}

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

impl Better {
    fn name(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }

    fn beats(self, candidate: f64, best: f64) -> bool {
        match self {
            Better::Lower => candidate < best,
            Better::Higher => candidate > best,
        }
    }
}

/// One compared metric: its name, direction and each run's value (in the runs' order).
struct Ranked {
    metric: String,
    better: Better,
    values: Vec<Option<f64>>,
}

/// The runs side by side for `GET /api/v1/runs/compare`:
///
/// ```json
/// {"runs": [RunView, ...],
///  "metrics": [{"metric": "latency_ms.p95", "better": "lower", "values": [12.1, null],
///               "best": "<run id>"}, ...],
///  "best": {"latency_ms.p95": "<run id>", ...}}
/// ```
///
/// `values` follow the order of `runs`. A metric no run has a value for is left out; `best` is
/// `null` (and the metric absent from the `best` map) when the best value is shared.
pub fn compare(runs: &[RunView]) -> Value {
    let mut best_by_metric = serde_json::Map::new();
    let mut metrics = Vec::new();
    for ranked in ranked_metrics(runs) {
        if ranked.values.iter().all(Option::is_none) {
            continue;
        }
        let best = single_best(&ranked).map(|index| runs[index].id.clone());
        if let Some(id) = &best {
            best_by_metric.insert(ranked.metric.clone(), Value::String(id.clone()));
        }
        metrics.push(json!({
            "metric": ranked.metric,
            "better": ranked.better.name(),
            "values": ranked.values,
            "best": best,
        }));
    }
    json!({ "runs": runs, "metrics": metrics, "best": best_by_metric })
}

type DistributionOf = fn(&RunMetrics) -> Option<Distribution>;
type StatOf = fn(&Distribution) -> f64;

/// Latency-like distributions compared by each statistic; lower is better for all of them.
const DISTRIBUTIONS: [(&str, DistributionOf); 3] = [
    ("latency_ms", |m| m.latency_ms),
    ("ttft_ms", |m| m.ttft_ms),
    ("overhead_ms", |m| m.overhead_ms),
];
const STATS: [(&str, StatOf); 4] = [
    ("p50", |d| d.p50),
    ("p95", |d| d.p95),
    ("p99", |d| d.p99),
    ("mean", |d| d.mean),
];

fn ranked_metrics(runs: &[RunView]) -> Vec<Ranked> {
    let rank = |metric: String, better: Better, value: &dyn Fn(&RunMetrics) -> Option<f64>| {
        let values = runs.iter().map(|run| value(&run.metrics)).collect();
        Ranked {
            metric,
            better,
            values,
        }
    };
    let mut ranked = Vec::new();
    for (family, distribution) in DISTRIBUTIONS {
        for (stat, pick) in STATS {
            let value = |m: &RunMetrics| distribution(m).as_ref().map(pick);
            ranked.push(rank(format!("{family}.{stat}"), Better::Lower, &value));
        }
    }
    ranked.push(rank("error_rate".into(), Better::Lower, &|m| {
        Some(m.error_rate)
    }));
    ranked.push(rank("cost_per_request_usd".into(), Better::Lower, &|m| {
        m.cost_per_request_usd
    }));
    ranked.push(rank("cache_hit_rate".into(), Better::Higher, &|m| {
        Some(m.cache_hit_rate)
    }));
    let score_names: std::collections::BTreeSet<&String> = runs
        .iter()
        .flat_map(|run| run.metrics.scores.keys())
        .collect();
    for name in score_names {
        let mean = |m: &RunMetrics| m.scores.get(name).and_then(|score| score.mean);
        ranked.push(rank(format!("scores.{name}.mean"), Better::Higher, &mean));
    }
    ranked
}

/// The index of the run with the best value, when exactly one run has it.
fn single_best(ranked: &Ranked) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut shared = false;
    for (index, value) in ranked.values.iter().enumerate() {
        let Some(value) = value.filter(|v| v.is_finite()) else {
            continue;
        };
        match best {
            None => best = Some((index, value)),
            Some((_, current)) if ranked.better.beats(value, current) => {
                best = Some((index, value));
                shared = false;
            }
            Some((_, current)) if value == current => shared = true,
            Some(_) => {}
        }
    }
    best.filter(|_| !shared).map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{GuardrailVerdict, Latency, TraceError, Usage};

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sampling(json: &str) -> BTreeMap<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    struct Fixture {
        params: BTreeMap<String, String>,
        sampling: BTreeMap<String, Value>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                params: params(&[("k", "5"), ("reranker", "bge")]),
                sampling: sampling(r#"{"temperature": 0.7, "max_tokens": 256}"#),
            }
        }

        fn identity(&self) -> RunIdentity<'_> {
            RunIdentity {
                experiment: "rag-eval",
                run_name: None,
                provider: "openai",
                model: "gpt-4o-mini",
                prompt_id: Some("qa"),
                prompt_version: Some("3"),
                params: &self.params,
                sampling: &self.sampling,
            }
        }
    }

    #[test]
    fn id_is_stable_across_builds_and_machines() {
        let fixture = Fixture::new();
        // Hard-coded on purpose: if this changes, every stored run id changes with it.
        assert_eq!(fixture.identity().id(), "5cdf93cd5955893a");
        let named = RunIdentity {
            run_name: Some("baseline"),
            ..fixture.identity()
        };
        assert_eq!(named.id(), "3c987d7eaf215a11");
    }

    #[test]
    fn remembered_ids_are_the_hashed_ones_and_their_number_is_bounded() {
        let fixture = Fixture::new();
        let names: Vec<String> = (0..KNOWN_IDS_MAX + 10)
            .map(|i| format!("run-{i}"))
            .collect();
        let named = |name: &str| {
            let identity = RunIdentity {
                run_name: Some(name),
                ..fixture.identity()
            };
            let mut encoding = CanonicalHash::new();
            encoding.str("v1");
            encoding.str("run");
            encoding.str(identity.experiment);
            encoding.str(name);
            (identity.id(), sha256_hex16(&encoding.0))
        };
        for name in &names {
            let (first, hashed) = named(name);
            assert_eq!(first, hashed, "{name}");
            assert_eq!(named(name).0, hashed, "{name}, remembered");
        }
        let remembered = KNOWN_IDS.with(|known| known.borrow().len());
        assert!(remembered <= KNOWN_IDS_MAX, "{remembered} ids remembered");

        let long = "n".repeat(KNOWN_ENCODING_MAX_BYTES);
        let (id, hashed) = named(&long);
        assert_eq!(id, hashed, "a long identity");
        let kept = KNOWN_IDS.with(|known| known.borrow().values().any(|id| *id == hashed));
        assert!(
            !kept,
            "a long encoding is hashed every time, not remembered"
        );
        assert_eq!(fixture.identity().id(), "5cdf93cd5955893a");
    }

    #[test]
    fn id_is_sixteen_lowercase_hex_chars() {
        let id = Fixture::new().identity().id();
        assert_eq!(id.len(), 16);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn param_and_sampling_order_do_not_matter() {
        let fixture = Fixture::new();
        let reordered = Fixture {
            params: [("reranker", "bge"), ("k", "5")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sampling: sampling(r#"{"max_tokens": 256, "temperature": 0.70}"#),
        };
        assert_eq!(fixture.identity().id(), reordered.identity().id());
    }

    #[test]
    fn equal_numbers_written_differently_agree() {
        let a = Fixture {
            sampling: sampling(r#"{"temperature": 1, "top_p": 0.9}"#),
            ..Fixture::new()
        };
        let b = Fixture {
            sampling: sampling(r#"{"temperature": 1.0, "top_p": 0.90}"#),
            ..Fixture::new()
        };
        assert_eq!(a.identity().id(), b.identity().id());
    }

    #[test]
    fn every_field_changes_the_id() {
        let fixture = Fixture::new();
        let base = fixture.identity();
        let other_params = params(&[("k", "6"), ("reranker", "bge")]);
        let other_sampling = sampling(r#"{"temperature": 0.2, "max_tokens": 256}"#);
        let variants = [
            RunIdentity {
                experiment: "other",
                ..base
            },
            RunIdentity {
                provider: "azure",
                ..base
            },
            RunIdentity {
                model: "gpt-4o",
                ..base
            },
            RunIdentity {
                prompt_id: None,
                ..base
            },
            RunIdentity {
                prompt_id: Some("qb"),
                ..base
            },
            RunIdentity {
                prompt_version: Some("4"),
                ..base
            },
            RunIdentity {
                prompt_version: None,
                ..base
            },
            RunIdentity {
                params: &other_params,
                ..base
            },
            RunIdentity {
                sampling: &other_sampling,
                ..base
            },
            RunIdentity {
                run_name: Some("named"),
                ..base
            },
        ];
        let mut ids: Vec<String> = variants.iter().map(RunIdentity::id).collect();
        ids.push(base.id());
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let empty = BTreeMap::new();
        let empty_sampling = BTreeMap::new();
        let identity = |provider, model| RunIdentity {
            experiment: "e",
            run_name: None,
            provider,
            model,
            prompt_id: None,
            prompt_version: None,
            params: &empty,
            sampling: &empty_sampling,
        };
        assert_ne!(identity("a", "bc").id(), identity("ab", "c").id());
        let split = params(&[("a", "bc")]);
        let joined = params(&[("ab", "c")]);
        assert_ne!(
            RunIdentity {
                params: &split,
                ..identity("p", "m")
            }
            .id(),
            RunIdentity {
                params: &joined,
                ..identity("p", "m")
            }
            .id()
        );
    }

    #[test]
    fn named_run_ignores_configuration() {
        let fixture = Fixture::new();
        let named = RunIdentity {
            run_name: Some("baseline"),
            ..fixture.identity()
        };
        let other = RunIdentity {
            model: "claude",
            provider: "anthropic",
            ..named
        };
        assert_eq!(named.id(), other.id());
        assert_ne!(
            named.id(),
            RunIdentity {
                experiment: "x",
                ..named
            }
            .id()
        );
    }

    fn trace(total_ms: f64, status: u16) -> Trace {
        Trace {
            id: "0190f5d6-0000-7000-8000-000000000001".into(),
            started_at_ms: 1_000,
            ended_at_ms: 1_000 + total_ms as u64,
            experiment: "rag-eval".into(),
            run_id: "1e1e5bf3b1d4b0ea".into(),
            provider: Some("openai".into()),
            requested_model: Some("gpt-4o-mini".into()),
            served_model: Some("gpt-4o-mini-2024-07-18".into()),
            endpoint: "chat.completions".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status,
            latency: Latency {
                total_ms,
                upstream_ms: Some(total_ms - 1.0),
                overhead_ms: 1.0,
                ttft_ms: None,
            },
            usage: Usage {
                input_tokens: Some(10),
                output_tokens: Some(5),
                cached_input_tokens: None,
                cache_write_input_tokens: None,
                source: "provider".into(),
            },
            cost_usd: Some(0.001),
            cache: "miss".into(),
            ..Trace::default()
        }
    }

    #[test]
    fn run_aggregates_counts_tokens_cost_and_latency() {
        let mut first = trace(100.0, 200);
        first.tags = params(&[("dataset", "v1"), ("task", "qa")]);
        let mut run = Run::from_first(&first);

        let mut failed = trace(300.0, 502);
        failed.error = Some(TraceError {
            class: "upstream_http".into(),
            message: "bad".into(),
        });
        failed.cost_usd = None;
        failed.tags = params(&[("dataset", "v2")]);
        failed.started_at_ms = 5_000;
        failed.ended_at_ms = 5_300;
        run.observe(&failed);

        let mut hit = trace(2.0, 200);
        hit.cache = "hit".into();
        hit.latency.ttft_ms = Some(1.5);
        run.observe(&hit);

        assert_eq!((run.requests, run.errors, run.cache_hits), (3, 1, 1));
        assert_eq!((run.input_tokens, run.output_tokens), (30, 15));
        assert_eq!(run.priced_requests, 2);
        assert_eq!(run.tags, params(&[("dataset", "v2"), ("task", "qa")]));
        assert_eq!((run.first_seen_ms, run.last_seen_ms), (1_000, 5_300));
        assert_eq!(run.model, "gpt-4o-mini-2024-07-18");

        let view = run.view();
        let metrics = &view.metrics;
        assert!((metrics.error_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((metrics.cost_usd.unwrap() - 0.002).abs() < 1e-12);
        assert!((metrics.cost_per_request_usd.unwrap() - 0.001).abs() < 1e-12);
        let latency = metrics.latency_ms.unwrap();
        assert!((latency.p50 - 100.0).abs() <= 1.0);
        assert!((latency.p99 - 300.0).abs() <= 3.0);
        assert_eq!(metrics.ttft_ms.unwrap().p50, 1.5);
    }

    #[test]
    fn unpriced_run_has_null_cost_and_no_ttft() {
        let mut unpriced = trace(10.0, 200);
        unpriced.cost_usd = None;
        let view = serde_json::to_value(Run::from_first(&unpriced).view()).unwrap();
        assert_eq!(view["metrics"]["cost_usd"], Value::Null);
        assert_eq!(view["metrics"]["cost_per_request_usd"], Value::Null);
        assert_eq!(view["metrics"]["ttft_ms"], Value::Null);
    }

    #[test]
    fn guardrails_and_scores_are_counted() {
        let mut checked = trace(10.0, 200);
        let verdict = |guardrail: &str, verdict: &'static str| GuardrailVerdict {
            guardrail: guardrail.into(),
            verdict: verdict.into(),
            ..GuardrailVerdict::default()
        };
        checked.guardrails = vec![verdict("pii", "redacted"), verdict("secrets", "pass")];
        let mut run = Run::from_first(&checked);
        checked.guardrails = vec![verdict("pii", "blocked"), verdict("secrets", "flagged")];
        run.observe(&checked);
        let score = |value| Score {
            name: "exact_match".into(),
            value,
            comment: None,
            at_ms: 0,
        };
        run.add_score(&score(1.0));
        run.add_score(&score(0.0));
        run.add_score(&score(f64::NAN));

        let view = run.view();
        let pii = view.metrics.guardrails["pii"];
        assert_eq!(
            (pii.checks, pii.redacted, pii.blocked, pii.flagged),
            (2, 1, 1, 0)
        );
        assert_eq!(pii.block_rate, 0.5);
        assert_eq!(view.metrics.guardrails["secrets"].flag_rate, 0.5);
        assert_eq!(
            view.metrics.scores["exact_match"],
            ScoreView {
                count: 2,
                mean: Some(0.5)
            }
        );
    }

    #[test]
    fn run_survives_a_serde_round_trip() {
        let mut run = Run::from_first(&trace(42.0, 200));
        run.observe(&trace(7.0, 500));
        let json = serde_json::to_string(&run).unwrap();
        let back: Run = serde_json::from_str(&json).unwrap();
        assert_eq!(back, run);
    }

    #[test]
    fn experiment_counts_runs_and_traces() {
        let first = trace(10.0, 200);
        let mut experiment = Experiment::from_first(&first);
        let mut later = trace(10.0, 200);
        later.started_at_ms = 9_000;
        later.ended_at_ms = 9_010;
        experiment.observe(&later, false);
        experiment.observe(&later, true);
        assert_eq!((experiment.runs, experiment.traces), (2, 3));
        assert_eq!(
            (experiment.first_seen_ms, experiment.last_activity_ms),
            (1_000, 9_010)
        );
    }

    #[test]
    fn compare_marks_the_best_run_per_metric() {
        let mut fast = Run::from_first(&trace(50.0, 200));
        fast.id = "fast".into();
        fast.add_score(&Score {
            name: "exact_match".into(),
            value: 0.2,
            comment: None,
            at_ms: 0,
        });
        let mut cheap = Run::from_first(&trace(500.0, 200));
        cheap.id = "cheap".into();
        cheap.cost_usd = 0.0001;
        cheap.add_score(&Score {
            name: "exact_match".into(),
            value: 0.9,
            comment: None,
            at_ms: 0,
        });

        let compared = compare(&[fast.view(), cheap.view()]);
        let best = &compared["best"];
        assert_eq!(best["latency_ms.p95"], "fast");
        assert_eq!(best["cost_per_request_usd"], "cheap");
        assert_eq!(best["scores.exact_match.mean"], "cheap");
        // Equal everywhere: nobody is best.
        assert!(best.get("error_rate").is_none());
        assert!(best.get("cache_hit_rate").is_none());
        // No run streamed: no TTFT row at all.
        let metrics = compared["metrics"].as_array().unwrap();
        assert!(metrics.iter().all(|m| m["metric"] != "ttft_ms.p50"));
        let p95 = metrics
            .iter()
            .find(|m| m["metric"] == "latency_ms.p95")
            .unwrap();
        assert_eq!(p95["better"], "lower");
        assert_eq!(p95["values"].as_array().unwrap().len(), 2);
        assert_eq!(compared["runs"].as_array().unwrap().len(), 2);
    }
}
