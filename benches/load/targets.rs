//! Issue 3's targets, judged on this run: what flowgate measured, what the floor proxy (a bare
//! hop: flowgate's server, client, runtime and allocator, doing no work) measured under the same
//! load, and for the closed loop the CPU per call a gateway may spend on this machine to reach
//! 40% of direct. A target the floor misses too is out of reach of any gateway here.

use serde::Serialize;

use crate::report::{Added, PhaseReport, Report, ScenarioReport, DIRECT, FLOOR, FLOWGATE};
use crate::scenario::MEMORY_HALVES;
use crate::stats::Percentiles;

/// The load the non-streamed targets name.
const TARGET_RATE: u32 = 1000;
const MAX_ADDED_P50_MS: f64 = 0.1;
const MAX_ADDED_P99_MS: f64 = 1.0;
const MAX_CPU_US: f64 = 60.0;
const MIN_CLOSED_RATIO: f64 = 0.40;
const MAX_ADDED_TTFC_P99_MS: f64 = 1.0;
/// Chunk spacing counts as preserved within this share of the mock's interval.
const SPACING_TOLERANCE: f64 = 0.02;
const MAX_RSS_MB: f64 = 100.0;
/// Calls the first half of the memory run must have made for its RSS to be judged.
const RSS_AFTER_CALLS: u64 = 200_000;
/// "Flat": the second half may end at most this much above the first.
const RSS_GROWTH: f64 = 0.05;

#[derive(Serialize, Clone, Copy, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    /// The run did not include the load this target needs.
    NotRun,
}

#[derive(Serialize)]
pub struct Check {
    pub target: String,
    pub goal: String,
    pub flowgate: Option<f64>,
    /// The floor proxy under the same load, where the run had it.
    pub floor: Option<f64>,
    pub unit: &'static str,
    pub verdict: Verdict,
}

/// What the closed loop leaves a gateway: `cores` ÷ (40% of direct's RPS) is the CPU per call
/// the whole machine has at that rate; the load generator and mock take `harness_us` of it.
#[derive(Serialize)]
pub struct ClosedBudget {
    pub direct_rps: f64,
    /// How busy the direct phase kept the machine: the budget assumes all of it.
    pub direct_machine_busy: f64,
    pub cores: usize,
    pub harness_us_per_call: f64,
    pub gateway_us_per_call: f64,
    pub floor_us: Option<f64>,
    pub flowgate_us: Option<f64>,
}

pub fn judge(report: &Report) -> (Vec<Check>, Option<ClosedBudget>) {
    let mut checks = Vec::new();
    let scenarios = &report.scenarios;
    let nonstream = scenarios
        .iter()
        .find(|s| open_at(s, false) == Some(TARGET_RATE));
    let added = |target, pick: fn(&Percentiles) -> f64| {
        nonstream.and_then(|s| Some(pick(added_by(s, target)?.latency.as_ref()?)))
    };
    checks.push(check(
        format!("non-streamed {TARGET_RATE}/s: added p50"),
        Bound::AtMost(MAX_ADDED_P50_MS),
        "ms",
        [added(FLOWGATE, |p| p.p50_ms), added(FLOOR, |p| p.p50_ms)],
    ));
    checks.push(check(
        format!("non-streamed {TARGET_RATE}/s: added p99"),
        Bound::AtMost(MAX_ADDED_P99_MS),
        "ms",
        [added(FLOWGATE, |p| p.p99_ms), added(FLOOR, |p| p.p99_ms)],
    ));
    let cpu = |target| cpu_per_call(nonstream?, target);
    checks.push(check(
        format!("non-streamed {TARGET_RATE}/s: CPU per call"),
        Bound::AtMost(MAX_CPU_US),
        "µs",
        [cpu(FLOWGATE), cpu(FLOOR)],
    ));

    let closed = scenarios
        .iter()
        .find(|s| s.load == "closed" && !s.stream && s.name.starts_with("nonstream"));
    let ratio = |target| Some(added_by(closed?, target)?.throughput_ratio * 100.0);
    checks.push(check(
        "closed loop: throughput of direct".into(),
        Bound::AtLeast(MIN_CLOSED_RATIO * 100.0),
        "%",
        [ratio(FLOWGATE), ratio(FLOOR)],
    ));
    checks.push(errors_and_drops(report));

    let streams = scenarios
        .iter()
        .filter(|s| open_at(s, true).is_some_and(|rate| rate <= TARGET_RATE));
    for scenario in streams {
        let ttfc = |target| added_by(scenario, target)?.first_chunk_p99_ms;
        checks.push(check(
            format!("{}: added TTFC p99", scenario.name),
            Bound::AtMost(MAX_ADDED_TTFC_P99_MS),
            "ms",
            [ttfc(FLOWGATE), ttfc(FLOOR)],
        ));
        let spacing = |target| Some(added_by(scenario, target)?.chunk_spacing_mean_ms?.abs());
        checks.push(check(
            format!("{}: chunk spacing, off by", scenario.name),
            Bound::AtMost(SPACING_TOLERANCE * report.settings.chunk_interval_ms),
            "ms",
            [spacing(FLOWGATE), spacing(FLOOR)],
        ));
    }
    checks.extend(memory(report));
    checks.push(stored(report));
    (checks, closed.and_then(|s| budget(s, report.machine.nproc)))
}

/// The rate of an open-loop, non-cached scenario, streamed or not as asked.
fn open_at(scenario: &ScenarioReport, stream: bool) -> Option<u32> {
    let plain = scenario.stream == stream && !scenario.name.starts_with("cached");
    scenario
        .rate_rps
        .filter(|_| plain && scenario.load == "open")
}

fn added_by<'a>(scenario: &'a ScenarioReport, target: &str) -> Option<&'a Added> {
    scenario.added.iter().find(|a| a.target == target)
}

fn phase_of<'a>(scenario: &'a ScenarioReport, target: &str) -> Option<&'a PhaseReport> {
    scenario.phases.iter().find(|p| p.target == target)
}

fn cpu_per_call(scenario: &ScenarioReport, target: &str) -> Option<f64> {
    Some(
        phase_of(scenario, target)?
            .process
            .as_ref()?
            .cpu_us_per_request,
    )
}

#[derive(Clone, Copy)]
enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

fn check(
    target: String,
    bound: Bound,
    unit: &'static str,
    [flowgate, floor]: [Option<f64>; 2],
) -> Check {
    let (goal, holds) = match bound {
        Bound::AtMost(limit) => (format!("≤ {limit} {unit}"), flowgate.map(|v| v <= limit)),
        Bound::AtLeast(limit) => (format!("≥ {limit} {unit}"), flowgate.map(|v| v >= limit)),
    };
    Check {
        goal,
        verdict: verdict(holds),
        target,
        flowgate,
        floor,
        unit,
    }
}

fn verdict(met: Option<bool>) -> Verdict {
    match met {
        Some(true) => Verdict::Met,
        Some(false) => Verdict::NotMet,
        None => Verdict::NotRun,
    }
}

/// A count of flowgate's that must be zero.
fn none(target: String, count: f64) -> Check {
    Check {
        target,
        goal: "= 0".into(),
        flowgate: Some(count),
        floor: None,
        unit: "",
        verdict: verdict(Some(count == 0.0)),
    }
}

/// Errors of every flowgate phase, plus the traces it dropped.
fn errors_and_drops(report: &Report) -> Check {
    let errors: u64 = report
        .scenarios
        .iter()
        .filter_map(|s| phase_of(s, FLOWGATE))
        .map(|p| p.summary.errors)
        .sum();
    none(
        "errors + dropped traces, every phase".into(),
        errors as f64 + report.traces.dropped,
    )
}

/// RSS after each half of the memory run: both under the limit, the second not above the first
/// by more than `RSS_GROWTH`; and while idle after it.
fn memory(report: &Report) -> Vec<Check> {
    let half = |name: &str| {
        let scenario = report.scenarios.iter().find(|s| s.name.starts_with(name))?;
        let phase = phase_of(scenario, FLOWGATE)?;
        Some((
            phase.process.as_ref()?.rss_mb,
            phase.summary.requests + phase.warmup_requests,
        ))
    };
    let [first, second] = MEMORY_HALVES.map(half);
    let enough = first.is_some_and(|(_, calls)| calls >= RSS_AFTER_CALLS);
    let rss = |half: Option<(f64, u64)>| half.filter(|_| enough).map(|(rss, _)| rss);
    let after = check(
        format!(
            "RSS after each half of ≥{}k calls (higher)",
            RSS_AFTER_CALLS / 1000
        ),
        Bound::AtMost(MAX_RSS_MB),
        "MB",
        [
            [rss(first), rss(second)]
                .into_iter()
                .flatten()
                .reduce(f64::max),
            None,
        ],
    );
    let growth = rss(second).zip(rss(first)).map(|(b, a)| b - a);
    let flat = Check {
        target: "RSS growth over a second half".into(),
        goal: format!("≤ {:.0}% of the first", RSS_GROWTH * 100.0),
        verdict: verdict(growth.zip(rss(first)).map(|(g, a)| g <= RSS_GROWTH * a)),
        flowgate: growth,
        floor: None,
        unit: "MB",
    };
    // Idle after the load is part of "flat": the store keeps working after a burst.
    let idle = report.idle.as_ref().filter(|_| enough);
    let idle = check(
        match idle {
            Some(i) => format!("RSS idle {:.0} s after the memory run (highest)", i.secs),
            None => "RSS idle after the memory run (highest)".into(),
        },
        Bound::AtMost(MAX_RSS_MB),
        "MB",
        [idle.map(|i| i.rss_max_mb), None],
    );
    vec![after, flat, idle]
}

fn stored(report: &Report) -> Check {
    let t = &report.traces;
    none(
        format!("calls not stored as traces (of {})", t.sent),
        t.sent.saturating_sub(t.stored) as f64,
    )
}

/// At 40% of direct's RPS the machine has `cores` ÷ that rate of CPU per call, all of it busy
/// (more than the direct phase itself got); the load generator and mock need their share of it,
/// the least they spent per call through any proxy in this run.
fn budget(closed: &ScenarioReport, cores: usize) -> Option<ClosedBudget> {
    let direct = phase_of(closed, DIRECT)?;
    let direct_rps = direct.summary.throughput_rps;
    let harness_us_per_call = closed
        .phases
        .iter()
        .filter(|p| p.process.is_some())
        .map(|p| p.harness.cpu_us_per_request)
        .min_by(f64::total_cmp)?;
    let whole_us = cores as f64 * 1e6 / (MIN_CLOSED_RATIO * direct_rps);
    Some(ClosedBudget {
        direct_rps,
        direct_machine_busy: direct.harness.machine_busy,
        cores,
        harness_us_per_call,
        gateway_us_per_call: whole_us - harness_us_per_call,
        floor_us: cpu_per_call(closed, FLOOR),
        flowgate_us: cpu_per_call(closed, FLOWGATE),
    })
}
