//! The results: their JSON shape, the added-latency arithmetic, the printed tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cli::Settings;
use crate::procfs::{self, Machine, MachineTicks};
use crate::scenario::{Load, Scenario};
use crate::stats::{Percentiles, Summary};
use crate::targets::{Check, ClosedBudget, Verdict};

/// Target names.
pub const DIRECT: &str = "direct";
pub const FLOWGATE: &str = "flowgate";
pub const FLOOR: &str = "floor";

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub scenarios: Vec<ScenarioReport>,
    pub traces: TraceCheck,
    /// flowgate's own `flowgate_overhead_seconds` over the whole run, estimated from its buckets.
    pub overhead_metric: GatewayMetrics,
    /// flowgate's RSS while idle after the run (`--idle-secs`).
    pub idle: Option<IdleMemory>,
    /// Issue 3's targets judged on this run (filled in by `targets::judge` once the rest is).
    pub targets: Vec<Check>,
    pub closed_budget: Option<ClosedBudget>,
    pub failures: Vec<String>,
    pub passed: bool,
}

#[derive(Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub experiment: String,
    pub load: &'static str,
    pub stream: bool,
    pub rate_rps: Option<u32>,
    pub workers: Option<usize>,
    pub duration_s: f64,
    /// One per target, same load.
    pub phases: Vec<PhaseReport>,
    /// Each gateway against `direct`.
    pub added: Vec<Added>,
}

#[derive(Serialize)]
pub struct PhaseReport {
    pub target: &'static str,
    /// Position in the scenario's run order (it rotates).
    pub order: usize,
    pub warmup_requests: u64,
    #[serde(flatten)]
    pub summary: Summary,
    pub process: Option<ProcessUsage>,
    pub gateway_metrics: Option<GatewayMetrics>,
    pub harness: Harness,
}

#[derive(Serialize)]
pub struct IdleMemory {
    pub secs: f64,
    pub rss_start_mb: f64,
    pub rss_end_mb: f64,
    pub rss_max_mb: f64,
}

/// This process (the load generator and the mock) and the whole machine, over one phase's load
/// (its warm-up and the gateway's probes left out): what is left of the cores for a gateway.
#[derive(Serialize)]
pub struct Harness {
    pub cpu_us_per_request: f64,
    /// Busy share of all the machine's cores, 0 to 1.
    pub machine_busy: f64,
}

impl Harness {
    pub fn since(own: u64, machine: MachineTicks, clock_ticks: u64, requests: usize) -> Harness {
        let own = procfs::own_cpu_ticks().saturating_sub(own);
        let now = procfs::machine_ticks();
        let all = now.all.saturating_sub(machine.all);
        Harness {
            cpu_us_per_request: own as f64 * 1e6 / clock_ticks as f64 / requests.max(1) as f64,
            machine_busy: now.busy.saturating_sub(machine.busy) as f64 / all.max(1) as f64,
        }
    }
}

/// The process tree behind a gateway, over one phase.
#[derive(Serialize)]
pub struct ProcessUsage {
    pub cpu_seconds: f64,
    pub cpu_us_per_request: f64,
    /// Of `cpu_us_per_request`, by thread group (`procfs::THREAD_GROUPS`) where the process has
    /// threads of that name; what is left is other threads and threads that ended.
    pub cpu_us_per_request_by_thread: BTreeMap<String, f64>,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

/// From flowgate's /metrics.
#[derive(Serialize)]
pub struct GatewayMetrics {
    pub overhead_p50_ms: Option<f64>,
    pub overhead_p99_ms: Option<f64>,
    pub traces_dropped: f64,
}

/// What a gateway adds to the direct path, percentile by percentile.
#[derive(Serialize)]
pub struct Added {
    pub target: &'static str,
    pub latency: Option<Percentiles>,
    pub first_chunk_p50_ms: Option<f64>,
    pub first_chunk_p99_ms: Option<f64>,
    pub chunk_spacing_mean_ms: Option<f64>,
    /// Gateway throughput ÷ direct throughput (the closed loop's headline).
    pub throughput_ratio: f64,
}

#[derive(Serialize)]
pub struct TraceCheck {
    pub sent: u64,
    pub stored: u64,
    pub dropped: f64,
    pub by_experiment: Vec<ExperimentTraces>,
}

#[derive(Serialize)]
pub struct ExperimentTraces {
    pub experiment: String,
    pub sent: u64,
    pub stored: u64,
}

impl ScenarioReport {
    pub fn new(scenario: &Scenario, duration_s: f64, phases: Vec<PhaseReport>) -> ScenarioReport {
        let (load, rate_rps, workers) = match scenario.load {
            Load::Open { rate } => ("open", Some(rate), None),
            Load::Closed { workers } => ("closed", None, Some(workers)),
        };
        let direct = phases.iter().find(|p| p.target == DIRECT);
        let added = match direct {
            Some(direct) => phases
                .iter()
                .filter(|p| p.target != DIRECT)
                .map(|p| Added::between(&p.summary, &direct.summary, p.target))
                .collect(),
            None => Vec::new(),
        };
        ScenarioReport {
            name: scenario.name.clone(),
            experiment: scenario.experiment.clone(),
            load,
            stream: scenario.stream,
            rate_rps,
            workers,
            duration_s,
            phases,
            added,
        }
    }
}

impl Added {
    fn between(gateway: &Summary, direct: &Summary, target: &'static str) -> Added {
        let diff =
            |pick: fn(&Percentiles) -> f64, g: &Option<Percentiles>, d: &Option<Percentiles>| {
                Some(pick(g.as_ref()?) - pick(d.as_ref()?))
            };
        Added {
            target,
            latency: gateway
                .latency
                .zip(direct.latency)
                .map(|(g, d)| g.minus(&d)),
            first_chunk_p50_ms: diff(|p| p.p50_ms, &gateway.first_chunk, &direct.first_chunk),
            first_chunk_p99_ms: diff(|p| p.p99_ms, &gateway.first_chunk, &direct.first_chunk),
            chunk_spacing_mean_ms: gateway
                .chunk_spacing_mean_ms
                .zip(direct.chunk_spacing_mean_ms)
                .map(|(g, d)| g - d),
            throughput_ratio: gateway.throughput_rps / direct.throughput_rps.max(1e-9),
        }
    }
}

impl PhaseReport {
    /// Progress line printed as each phase ends.
    pub fn one_line(&self) -> String {
        let s = &self.summary;
        let p =
            |pick: fn(&Percentiles) -> f64| s.latency.as_ref().map_or("-".into(), |l| ms(pick(l)));
        format!(
            "{:<8} {:>7} requests, {} errors, {:>8.1} rps, p50 {} p99 {} ms",
            self.target,
            s.requests,
            s.errors,
            s.throughput_rps,
            p(|l| l.p50_ms),
            p(|l| l.p99_ms)
        )
    }
}

fn ms(value: f64) -> String {
    format!("{value:.3}")
}

fn signed(value: f64) -> String {
    format!("{value:+.3}")
}

fn opt(value: Option<f64>, format: fn(f64) -> String) -> String {
    value.map_or_else(|| "-".into(), format)
}

/// Columns of strings; the first two left-aligned, the rest right-aligned.
struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                let pad = width - cell.chars().count();
                let (left, right) = if i < 2 { (0, pad) } else { (pad, 0) };
                let _ = write!(out, "{}{cell}{}  ", " ".repeat(left), " ".repeat(right));
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(self.header.clone());
        for row in &self.rows {
            out += &line(row.iter().map(String::as_str).collect());
        }
        out
    }
}

/// Latency per scenario and target, then each gateway's added latency ("+name" rows).
fn latency_table(scenarios: &[ScenarioReport]) -> Table {
    let header = vec![
        "scenario",
        "target",
        "requests",
        "errors",
        "rps",
        "p50",
        "p90",
        "p99",
        "max",
        "ttfc p50",
        "ttfc p99",
        "chunk gap",
        "lag p99",
    ];
    let mut rows = Vec::new();
    for scenario in scenarios {
        for (i, phase) in scenario.phases.iter().enumerate() {
            let name = if i == 0 {
                scenario.name.clone()
            } else {
                String::new()
            };
            rows.push(phase_row(name, phase));
        }
        rows.extend(scenario.added.iter().map(added_row));
    }
    Table { header, rows }
}

fn phase_row(name: String, phase: &PhaseReport) -> Vec<String> {
    let s = &phase.summary;
    let pct =
        |pick: fn(&Percentiles) -> f64, p: &Option<Percentiles>| opt(p.as_ref().map(pick), ms);
    vec![
        name,
        phase.target.into(),
        s.requests.to_string(),
        s.errors.to_string(),
        format!("{:.0}", s.throughput_rps),
        pct(|p| p.p50_ms, &s.latency),
        pct(|p| p.p90_ms, &s.latency),
        pct(|p| p.p99_ms, &s.latency),
        pct(|p| p.max_ms, &s.latency),
        pct(|p| p.p50_ms, &s.first_chunk),
        pct(|p| p.p99_ms, &s.first_chunk),
        opt(s.chunk_spacing_mean_ms, ms),
        pct(|p| p.p99_ms, &s.lag),
    ]
}

fn added_row(added: &Added) -> Vec<String> {
    let pct = |pick: fn(&Percentiles) -> f64| opt(added.latency.as_ref().map(pick), signed);
    vec![
        String::new(),
        format!("+{}", added.target),
        String::new(),
        String::new(),
        format!("x{:.2}", added.throughput_ratio),
        pct(|p| p.p50_ms),
        pct(|p| p.p90_ms),
        pct(|p| p.p99_ms),
        pct(|p| p.max_ms),
        opt(added.first_chunk_p50_ms, signed),
        opt(added.first_chunk_p99_ms, signed),
        opt(added.chunk_spacing_mean_ms, signed),
        String::new(),
    ]
}

/// CPU µs per request of each thread group, `-` for a group the process does not have; `-`
/// alone for a process with none of them (a Python or Node gateway).
fn by_thread(groups: &BTreeMap<String, f64>) -> String {
    if groups.is_empty() {
        return "-".into();
    }
    crate::procfs::THREAD_GROUPS
        .iter()
        .map(|name| {
            groups
                .get(*name)
                .map_or("-".into(), |us| format!("{us:.0}"))
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn targets_table(checks: &[Check]) -> Table {
    let header = vec!["target", "goal", "flowgate", "floor", "verdict"];
    let value = |v: Option<f64>, unit: &str| match v {
        Some(v) if unit.is_empty() => format!("{v:.0}"),
        Some(v) if unit == "ms" => format!("{v:.3} ms"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "-".into(),
    };
    let rows = checks
        .iter()
        .map(|c| {
            vec![
                c.target.clone(),
                c.goal.clone(),
                value(c.flowgate, c.unit),
                value(c.floor, c.unit),
                match c.verdict {
                    Verdict::Met => "met",
                    Verdict::NotMet => "NOT MET",
                    Verdict::NotRun => "not in this run",
                }
                .into(),
            ]
        })
        .collect();
    Table { header, rows }
}

/// The gateway processes over each phase.
fn process_table(scenarios: &[ScenarioReport]) -> Table {
    let header = vec![
        "scenario",
        "target",
        "cpu µs/req",
        "workers/recorder/store",
        "rss MB",
        "peak MB",
        "overhead p50",
        "overhead p99",
        "dropped",
    ];
    let mut rows = Vec::new();
    for scenario in scenarios {
        for phase in &scenario.phases {
            let Some(process) = &phase.process else {
                continue;
            };
            let metrics = phase.gateway_metrics.as_ref();
            rows.push(vec![
                scenario.name.clone(),
                phase.target.into(),
                format!("{:.0}", process.cpu_us_per_request),
                by_thread(&process.cpu_us_per_request_by_thread),
                format!("{:.1}", process.rss_mb),
                format!("{:.1}", process.peak_rss_mb),
                opt(metrics.and_then(|m| m.overhead_p50_ms), ms),
                opt(metrics.and_then(|m| m.overhead_p99_ms), ms),
                metrics.map_or("-".into(), |m| format!("{:.0}", m.traces_dropped)),
            ]);
        }
    }
    Table { header, rows }
}

pub fn render(report: &Report) -> String {
    let m = &report.machine;
    let s = &report.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmachine: {} × {}, {:.0} GB, Linux {}, {}",
        m.nproc, m.cpu_model, m.memory_gb, m.kernel, m.date
    );
    let _ =
        writeln!(
        out,
        "load: {:.0} s phases; open loop at {:?} RPS (max {} in flight); closed loop {} workers; \
         {} B requests, {} B answers, {} chunks every {} ms, upstream latency {} ms; \
         client {} thread(s), mock {} thread(s), all on this machine",
        s.duration_secs, s.rates, s.max_in_flight, s.concurrency, s.request_bytes, s.answer_bytes,
        s.chunks, s.chunk_interval_ms, s.upstream_latency_ms, s.client_threads, s.mock_threads
    );
    let _ = writeln!(
        out,
        "\nlatency in ms (open loop: from each request's scheduled send time); +target rows: \
         added over direct, rps column = throughput ratio\n"
    );
    out += &latency_table(&report.scenarios).render();
    let _ = writeln!(
        out,
        "\ngateway processes (per phase; overhead = flowgate_overhead_seconds, bucket estimate)\n"
    );
    out += &process_table(&report.scenarios).render();
    let t = &report.traces;
    let o = &report.overhead_metric;
    let _ = writeln!(
        out,
        "\ntraces: {} sent to flowgate, {} stored, {} dropped; flowgate_overhead_seconds over the \
         run: p50 {} ms, p99 {} ms",
        t.sent,
        t.stored,
        t.dropped,
        opt(o.overhead_p50_ms, ms),
        opt(o.overhead_p99_ms, ms)
    );
    if let Some(idle) = &report.idle {
        let _ = writeln!(
            out,
            "idle after the run: flowgate's RSS {:.1} MB at the start, {:.1} MB after {:.0} s \
             (at most {:.1})",
            idle.rss_start_mb, idle.rss_end_mb, idle.secs, idle.rss_max_mb
        );
    }
    let _ = writeln!(
        out,
        "\nissue 3's targets on this run (floor: the bare proxy, same load)\n"
    );
    out += &targets_table(&report.targets).render();
    if let Some(b) = &report.closed_budget {
        let _ = writeln!(
            out,
            "\nclosed loop: 40% of direct is {:.0} RPS; {} cores at that rate give {:.1} µs of CPU \
             per call (all of them busy; direct kept them {:.0}% busy), of which the load generator and mock take {:.1}: a gateway may spend at \
             most {:.1} µs per call here. The floor spent {}, flowgate {}.",
            0.4 * b.direct_rps,
            b.cores,
            b.harness_us_per_call + b.gateway_us_per_call,
            b.direct_machine_busy * 100.0,
            b.harness_us_per_call,
            b.gateway_us_per_call,
            opt(b.floor_us, |us| format!("{us:.1}")),
            opt(b.flowgate_us, |us| format!("{us:.1}")),
        );
    }
    let verdict = if report.passed {
        "PASSED".to_owned()
    } else {
        format!("FAILED: {}", report.failures.join("; "))
    };
    let _ = writeln!(out, "sanity: {verdict}");
    out
}

pub fn write_json(report: &Report, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report).map_err(|err| err.to_string())?;
    std::fs::write(path, json + "\n").map_err(|err| format!("{}: {err}", path.display()))
}
