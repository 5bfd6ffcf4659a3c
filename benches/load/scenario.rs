//! The scenarios, and running one against every target in turn, with the gateway process
//! sampled around each phase.

use std::sync::Arc;
use std::time::Duration;

use crate::cli::{Part, Settings};
use crate::drive::{self, Run};
use crate::gateway::Flowgate;
use crate::procfs;
use crate::prom::Scrape;
use crate::report::{GatewayMetrics, Harness, PhaseReport, ProcessUsage, ScenarioReport};
use crate::stats::Summary;
use crate::workload::{self, Bodies, Caller, Expect, HttpClient, Target};

#[derive(Clone, Copy, Debug)]
pub enum Load {
    Open { rate: u32 },
    Closed { workers: usize },
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// flowgate's `x-flowgate-experiment` for this scenario, so its traces can be counted apart.
    pub experiment: String,
    pub load: Load,
    pub stream: bool,
    /// The same request every time: after the first, flowgate answers from its cache.
    pub repeat: bool,
}

impl Scenario {
    fn new(load: Load, stream: bool) -> Scenario {
        Scenario::named(load, stream, if stream { "stream" } else { "nonstream" })
    }

    fn named(load: Load, stream: bool, kind: &str) -> Scenario {
        let (name, slug) = match load {
            Load::Open { rate } => (format!("{kind} {rate}/s"), format!("{kind}-open-{rate}")),
            Load::Closed { workers } => (
                format!("{kind} c={workers}"),
                format!("{kind}-closed-{workers}"),
            ),
        };
        Scenario {
            name,
            experiment: format!("load-{slug}"),
            load,
            stream,
            repeat: false,
        }
    }
}

/// The two halves of the memory run, by scenario kind.
pub const MEMORY_HALVES: [&str; 2] = ["memory-1st-half", "memory-2nd-half"];

/// Open loop non-streamed at each rate, then streamed at each rate, then the closed loops.
pub fn plan(settings: &Settings) -> Vec<Scenario> {
    let mut scenarios = Vec::new();
    for (part, stream) in [(Part::Nonstream, false), (Part::Stream, true)] {
        if settings.parts.contains(&part) {
            let loads = settings.rates.iter().map(|&rate| Load::Open { rate });
            scenarios.extend(loads.map(|load| Scenario::new(load, stream)));
        }
    }
    if settings.parts.contains(&Part::Cached) {
        scenarios.extend(settings.rates.iter().map(|&rate| Scenario {
            repeat: true,
            ..Scenario::named(Load::Open { rate }, false, "cached")
        }));
    }
    if settings.parts.contains(&Part::Closed) {
        let load = Load::Closed {
            workers: settings.concurrency,
        };
        scenarios.extend([Scenario::new(load, false), Scenario::new(load, true)]);
    }
    if settings.parts.contains(&Part::Memory) {
        let load = Load::Closed {
            workers: settings.concurrency,
        };
        // Each half its own prompts (the salt is the experiment): the second half fills the
        // response cache with new answers, as steady traffic would, instead of hitting the first's.
        scenarios.extend(MEMORY_HALVES.map(|kind| Scenario::named(load, false, kind)));
    }
    scenarios
}

/// A target, and the process behind it when there is one to sample.
pub struct Subject<'a> {
    pub target: Target,
    pub pid: Option<u32>,
    pub flowgate: Option<&'a Flowgate>,
}

pub struct Bench<'a> {
    pub settings: &'a Settings,
    pub expect: Expect,
    /// For the admin API and /metrics, apart from the load's clients.
    pub admin: HttpClient,
    pub subjects: Vec<Subject<'a>>,
    pub clock_ticks: u64,
}

impl Bench<'_> {
    /// Runs `scenario` against every target, one after the other. The order rotates from one
    /// scenario to the next, so no target always runs first (on a colder machine) or last.
    pub async fn scenario(
        &self,
        index: usize,
        scenario: &Scenario,
    ) -> Result<ScenarioReport, String> {
        let count = self.subjects.len();
        let mut phases = Vec::with_capacity(count);
        for order in 0..count {
            let subject = &self.subjects[(index + order) % count];
            let phase = self.phase(scenario, subject, order).await?;
            eprintln!("  {}", phase.one_line());
            phases.push(phase);
        }
        phases.sort_by_key(|phase| {
            self.subjects
                .iter()
                .position(|s| s.target.name == phase.target)
        });
        Ok(ScenarioReport::new(
            scenario,
            self.settings.duration_secs,
            phases,
        ))
    }

    async fn phase(
        &self,
        scenario: &Scenario,
        subject: &Subject<'_>,
        order: usize,
    ) -> Result<PhaseReport, String> {
        let settings = self.settings;
        // A pause between phases, so that what one phase leaves to clean up (its samples and
        // connections freed, memory returned to the OS by this process's allocator and the
        // targets') is not done inside the next phase's measurement.
        tokio::time::sleep(settings.settle()).await;
        let pool = match scenario.load {
            Load::Open { .. } => settings.max_in_flight,
            Load::Closed { workers } => workers,
        };
        let bodies = Bodies {
            size: settings.request_bytes,
            stream: scenario.stream,
            repeat: scenario.repeat,
            salt: scenario.experiment.clone(),
        };
        let client = workload::client(pool);
        let caller = Caller::new(
            client,
            subject.target.clone(),
            bodies,
            self.expect,
            &scenario.experiment,
        );
        let caller = Arc::new(caller);
        let warmup_requests =
            drive::warm_up(caller.clone(), settings.concurrency, settings.drain()).await;
        let probe = Probe::before(self, subject).await?;
        let (own, machine) = (procfs::own_cpu_ticks(), procfs::machine_ticks());
        let run = self.run(caller, scenario.load).await;
        let harness = Harness::since(own, machine, self.clock_ticks, run.samples.len());
        let (process, gateway_metrics) = match probe {
            Some(probe) => probe.after(self, subject, run.samples.len()).await?,
            None => (None, None),
        };
        Ok(PhaseReport {
            target: subject.target.name,
            order,
            warmup_requests,
            summary: Summary::of(&run.samples, run.elapsed),
            process,
            gateway_metrics,
            harness,
        })
    }

    async fn run(&self, caller: Arc<Caller>, load: Load) -> Run {
        let settings = self.settings;
        match load {
            Load::Open { rate } => {
                drive::open_loop(
                    caller,
                    f64::from(rate),
                    settings.duration(),
                    settings.max_in_flight,
                    settings.drain(),
                )
                .await
            }
            Load::Closed { workers } => {
                drive::closed_loop(caller, workers, settings.duration(), settings.drain()).await
            }
        }
    }
}

/// What was read of a process just before a phase.
struct Probe {
    cpu_ticks: u64,
    group_ticks: [Option<u64>; 3],
    scrape: Option<Scrape>,
}

impl Probe {
    async fn before(bench: &Bench<'_>, subject: &Subject<'_>) -> Result<Option<Probe>, String> {
        let Some(pid) = subject.pid else {
            return Ok(None);
        };
        let scrape = match subject.flowgate {
            Some(flowgate) => {
                // Lets the recorder store the warm-up's traces: their cost stays out of the phase.
                flowgate.traces_by_experiment(&bench.admin).await?;
                Some(flowgate.metrics(&bench.admin).await?)
            }
            None => None,
        };
        procfs::reset_peak(pid);
        Ok(Some(Probe {
            cpu_ticks: procfs::tree_cpu_ticks(pid),
            group_ticks: procfs::thread_group_ticks(pid),
            scrape,
        }))
    }

    /// CPU per request (the recorder's work included: it is waited for first), memory, and for
    /// flowgate the phase's share of its overhead histogram and dropped-traces counter.
    async fn after(
        self,
        bench: &Bench<'_>,
        subject: &Subject<'_>,
        requests: usize,
    ) -> Result<(Option<ProcessUsage>, Option<GatewayMetrics>), String> {
        let pid = subject.pid.expect("a probe is only taken of a process");
        let mut gateway = None;
        if let (Some(flowgate), Some(before)) = (subject.flowgate, &self.scrape) {
            flowgate.traces_by_experiment(&bench.admin).await?;
            let phase = flowgate.metrics(&bench.admin).await?.since(before);
            gateway = Some(GatewayMetrics {
                overhead_p50_ms: phase.overhead_quantile_ms(0.50),
                overhead_p99_ms: phase.overhead_quantile_ms(0.99),
                traces_dropped: phase.traces_dropped,
            });
        }
        let ticks = procfs::tree_cpu_ticks(pid).saturating_sub(self.cpu_ticks);
        let per_request_us =
            |ticks: u64| ticks as f64 * 1e6 / bench.clock_ticks as f64 / requests.max(1) as f64;
        let cpu = Duration::from_secs_f64(ticks as f64 / bench.clock_ticks as f64);
        let groups = procfs::thread_group_ticks(pid);
        let cpu_us_per_request_by_thread = procfs::THREAD_GROUPS
            .iter()
            .zip(groups.iter().zip(self.group_ticks))
            .filter_map(|(name, (&after, before))| {
                let used = after?.saturating_sub(before.unwrap_or(0));
                Some((name.to_string(), per_request_us(used)))
            })
            .collect();
        let memory = procfs::tree_memory(pid);
        let usage = ProcessUsage {
            cpu_seconds: cpu.as_secs_f64(),
            cpu_us_per_request: per_request_us(ticks),
            cpu_us_per_request_by_thread,
            rss_mb: memory.rss_kb as f64 / 1024.0,
            peak_rss_mb: memory.peak_kb as f64 / 1024.0,
        };
        Ok((Some(usage), gateway))
    }
}
