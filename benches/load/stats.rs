//! What one request measured, and the summaries (percentiles, error counts) of many.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How one request went.
#[derive(Clone, Debug)]
pub struct Sample {
    /// From the time the request was due (open loop: its slot in the schedule; closed loop: when
    /// the worker sent it) to the last byte of the answer.
    pub latency: Duration,
    /// From the time the request was due to the time the harness actually sent it: the harness's
    /// own lag (timer, in-flight limit). It is inside `latency`, on purpose.
    pub lag: Duration,
    /// Streams only.
    pub stream: Option<StreamTiming>,
    /// `None` on success, else a short class ("status 502", "timeout", ...).
    pub error: Option<String>,
}

/// When the SSE events of one streamed answer arrived.
#[derive(Clone, Copy, Debug)]
pub struct StreamTiming {
    /// From the time the request was due to the first complete event.
    pub first_chunk: Duration,
    /// Mean gap between consecutive events (first to last content event).
    pub mean_spacing: Option<Duration>,
}

impl Sample {
    pub fn failed(latency: Duration, lag: Duration, error: impl Into<String>) -> Sample {
        Sample {
            latency,
            lag,
            stream: None,
            error: Some(error.into()),
        }
    }
}

/// Nearest-rank percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut values: Vec<Duration>) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let at = |q: f64| {
            // Nearest rank: the smallest value with at least q of the values at or below it.
            let rank = (q * values.len() as f64).ceil() as usize;
            ms(values[rank.clamp(1, values.len()) - 1])
        };
        Some(Percentiles {
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: ms(values[values.len() - 1]),
        })
    }

    /// Percentile by percentile: `self - base`.
    pub fn minus(&self, base: &Percentiles) -> Percentiles {
        Percentiles {
            p50_ms: self.p50_ms - base.p50_ms,
            p90_ms: self.p90_ms - base.p90_ms,
            p99_ms: self.p99_ms - base.p99_ms,
            max_ms: self.max_ms - base.max_ms,
        }
    }
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// One phase (one target under one load), summarised. Latencies count successful requests only;
/// failures are counted apart, and the harness fails when there are too many.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Successful requests per second of the phase's wall time.
    pub throughput_rps: f64,
    pub latency: Option<Percentiles>,
    pub lag: Option<Percentiles>,
    pub first_chunk: Option<Percentiles>,
    pub chunk_spacing_mean_ms: Option<f64>,
}

impl Summary {
    pub fn of(samples: &[Sample], elapsed: Duration) -> Summary {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
        let mut errors_by_kind = BTreeMap::new();
        for error in samples.iter().filter_map(|s| s.error.as_ref()) {
            *errors_by_kind.entry(error.clone()).or_insert(0) += 1;
        }
        let streams: Vec<StreamTiming> = ok.iter().filter_map(|s| s.stream).collect();
        let spacings: Vec<Duration> = streams.iter().filter_map(|s| s.mean_spacing).collect();
        let requests = samples.len() as u64;
        let errors = requests - ok.len() as u64;
        Summary {
            requests,
            ok: ok.len() as u64,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            errors_by_kind,
            throughput_rps: ok.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            latency: Percentiles::of(ok.iter().map(|s| s.latency).collect()),
            lag: Percentiles::of(samples.iter().map(|s| s.lag).collect()),
            first_chunk: Percentiles::of(streams.iter().map(|s| s.first_chunk).collect()),
            chunk_spacing_mean_ms: (!spacings.is_empty())
                .then(|| ms(spacings.iter().sum::<Duration>()) / spacings.len() as f64),
        }
    }
}
