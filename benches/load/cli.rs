//! Flags, and the settings they resolve to (`--quick` changes the defaults).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::mock::MockConfig;

/// Load harness: the same load sent straight to a mock OpenAI upstream and through flowgate
/// (and, with --litellm and --portkey, through LiteLLM and Portkey), phase after phase, reporting
/// what the gateway adds.
#[derive(Parser, Debug)]
#[command(name = "load")]
pub struct Flags {
    /// Smoke run: ~1 s phases at 200 RPS.
    #[arg(long)]
    quick: bool,
    /// Open-loop rates in requests per second [default: 500,1000,2000; --quick: 200].
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u32>>,
    /// Length of every phase [default: 10; --quick: 1].
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Closed-loop workers, and requests sent at once to warm up before a phase [default: 16].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Run only these parts (comma-separated): nonstream and stream are the open-loop scenarios
    /// (every request different: response-cache misses), cached sends one request over and over
    /// (cache hits), closed is the closed loop (streamed and not), memory is two closed-loop
    /// halves of new non-streamed calls back to back (not in the default set; with
    /// `--duration-secs 20` each half is ~200k calls), for RSS after each half.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// After the run, keep flowgate idle this long and report its RSS over that time (work left
    /// after a burst shows here: sled's log cleaning did) [default: 60 with memory, else 0].
    #[arg(long)]
    idle_secs: Option<f64>,
    /// Also measure LiteLLM's proxy (installed into .peer-venv on first use: minutes).
    #[arg(long)]
    litellm: bool,
    /// Also measure Portkey's gateway (installed with npm into .peer-node on first use).
    #[arg(long)]
    portkey: bool,
    /// Leave out the floor: a bare hyper proxy that only forwards (what any proxy of flowgate's
    /// design costs on this machine), measured by default beside flowgate.
    #[arg(long)]
    no_floor: bool,
    /// Size of each chat request body.
    #[arg(long, default_value_t = 1024)]
    request_bytes: usize,
    /// Size of the mock's non-streamed answer.
    #[arg(long, default_value_t = 1024)]
    answer_bytes: usize,
    /// Latency the mock adds before answering.
    #[arg(long, default_value_t = 0.0)]
    upstream_latency_ms: f64,
    /// Content chunks in a streamed answer.
    #[arg(long, default_value_t = 20)]
    chunks: u32,
    /// Gap between two streamed chunks.
    #[arg(long, default_value_t = 5.0)]
    chunk_interval_ms: f64,
    /// Open loop: most requests outstanding at once (later ones wait, timed from their due time).
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Open loop: how long after the last due time unfinished requests still get to finish
    /// (then they are timeouts); closed loop: the per-request timeout.
    #[arg(long, default_value_t = 10.0)]
    drain_secs: f64,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Worker threads of the mock upstream's runtime.
    #[arg(long, default_value_t = 1)]
    mock_threads: usize,
    /// Where to write the JSON report [default: <target dir>/bench/load.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Which scenarios to run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Nonstream,
    Stream,
    Cached,
    Closed,
    Memory,
}

/// The resolved settings, also written into the JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub rates: Vec<u32>,
    pub duration_secs: f64,
    pub concurrency: usize,
    pub parts: Vec<Part>,
    pub idle_secs: f64,
    pub litellm: bool,
    pub portkey: bool,
    pub floor: bool,
    pub request_bytes: usize,
    pub answer_bytes: usize,
    pub upstream_latency_ms: f64,
    pub chunks: u32,
    pub chunk_interval_ms: f64,
    pub max_in_flight: usize,
    pub drain_secs: f64,
    pub client_threads: usize,
    pub mock_threads: usize,
    #[serde(skip)]
    pub json: Option<PathBuf>,
}

impl Flags {
    pub fn settings(self) -> Result<Settings, String> {
        let rates = self.rates.unwrap_or_else(|| match self.quick {
            true => vec![200],
            false => vec![500, 1000, 2000],
        });
        let duration_secs = self
            .duration_secs
            .unwrap_or(if self.quick { 1.0 } else { 10.0 });
        if rates.is_empty() || rates.contains(&0) {
            return Err("--rates: give positive rates, like --rates 500,1000".into());
        }
        // Written so that NaN is refused too.
        let positive_secs = |secs: f64| secs.is_finite() && secs > 0.0;
        if !positive_secs(duration_secs) || !positive_secs(self.drain_secs) {
            return Err("--duration-secs and --drain-secs must be positive".into());
        }
        let positive = [self.max_in_flight, self.client_threads, self.mock_threads];
        if positive.contains(&0) || self.concurrency == Some(0) || self.chunks == 0 {
            return Err(
                "counts (concurrency, chunks, threads, max in flight) must be positive".into(),
            );
        }
        let parts = match self.only.is_empty() {
            true => vec![Part::Nonstream, Part::Stream, Part::Cached, Part::Closed],
            false => self.only,
        };
        let idle_secs = self.idle_secs.unwrap_or(if parts.contains(&Part::Memory) {
            60.0
        } else {
            0.0
        });
        if !idle_secs.is_finite() || idle_secs < 0.0 {
            return Err("--idle-secs must be 0 or more".into());
        }
        Ok(Settings {
            quick: self.quick,
            idle_secs,
            rates,
            duration_secs,
            concurrency: self.concurrency.unwrap_or(16),
            parts,
            litellm: self.litellm,
            portkey: self.portkey,
            floor: !self.no_floor,
            request_bytes: self.request_bytes,
            answer_bytes: self.answer_bytes,
            upstream_latency_ms: self.upstream_latency_ms.max(0.0),
            chunks: self.chunks,
            chunk_interval_ms: self.chunk_interval_ms.max(0.0),
            max_in_flight: self.max_in_flight,
            drain_secs: self.drain_secs,
            client_threads: self.client_threads,
            mock_threads: self.mock_threads,
            json: self.json,
        })
    }
}

impl Settings {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    /// The pause between phases.
    pub fn settle(&self) -> Duration {
        Duration::from_millis(if self.quick { 100 } else { 1000 })
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_secs)
    }

    pub fn mock(&self) -> MockConfig {
        MockConfig {
            answer_bytes: self.answer_bytes,
            latency: Duration::from_secs_f64(self.upstream_latency_ms / 1e3),
            chunks: self.chunks,
            interval: Duration::from_secs_f64(self.chunk_interval_ms / 1e3),
            threads: self.mock_threads,
        }
    }
}
