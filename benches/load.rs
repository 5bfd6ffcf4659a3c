//! Load harness: flowgate against direct calls, in one run.
//!
//! A mock OpenAI upstream runs in this process on its own runtime; flowgate (the release binary)
//! runs as a child process pointed at it. Every scenario sends the same load straight to the mock
//! and through flowgate (and LiteLLM with `--litellm`, Portkey with `--portkey`), one target after
//! the other, and reports
//! what the gateway adds: latency percentiles, time to first chunk, throughput, CPU per request,
//! memory. It fails (non-zero exit) when flowgate errs on more than 0.1% of requests or stores
//! fewer traces than it was sent.
//!
//! `cargo bench --bench load -- --help`, or `scripts/bench.sh [flags]`. Under `cargo test` it is a
//! smoke test (see `flags`).

#[path = "load/child.rs"]
mod child;
#[path = "load/cli.rs"]
mod cli;
#[path = "load/drive.rs"]
mod drive;
#[path = "load/floor.rs"]
mod floor;
#[path = "load/gateway.rs"]
mod gateway;
#[path = "load/litellm.rs"]
mod litellm;
#[path = "load/mock.rs"]
mod mock;
#[path = "load/portkey.rs"]
mod portkey;
#[path = "load/procfs.rs"]
mod procfs;
#[path = "load/prom.rs"]
mod prom;
#[path = "load/report.rs"]
mod report;
#[path = "load/scenario.rs"]
mod scenario;
#[path = "load/stats.rs"]
mod stats;
#[path = "load/targets.rs"]
mod targets;
#[path = "load/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use cli::Settings;
use floor::FloorProxy;
use gateway::Flowgate;
use litellm::Litellm;
use mock::Mock;
use portkey::Portkey;
use report::{
    ExperimentTraces, GatewayMetrics, IdleMemory, Report, ScenarioReport, TraceCheck, DIRECT,
    FLOOR, FLOWGATE,
};
use scenario::{Bench, Subject};
use workload::{Expect, HttpClient, Target};

/// The whole harness (mock, load generator, floor proxy) allocates with what flowgate uses, so the
/// floor proxy differs from flowgate only in the work it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Above this error rate a direct or flowgate phase fails the run.
const MAX_ERROR_RATE: f64 = 0.001;

fn main() -> ExitCode {
    if let Some(code) = floor::serve_if_asked() {
        return code;
    }
    let settings = match flags().settings() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("load: {err}");
            return ExitCode::from(2);
        }
    };
    match run(&settings) {
        Ok(report) if report.passed => ExitCode::SUCCESS,
        Ok(report) => {
            eprintln!("load: FAILED");
            for failure in &report.failures {
                eprintln!("  - {failure}");
            }
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("load: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo bench` passes `--bench`. `cargo test --all-targets` runs this binary too, without it
/// and with whatever test-runner arguments its caller gave (`--nocapture`, a filter): then, as
/// criterion does, it is a smoke test — the `--quick` run, those arguments ignored, its JSON
/// beside the real report rather than over it.
fn flags() -> cli::Flags {
    if std::env::args().any(|arg| arg == "--bench") {
        return cli::Flags::parse();
    }
    eprintln!("load: no --bench (run by cargo test): a --quick smoke run");
    let json = default_json_path().with_file_name("load-smoke.json");
    cli::Flags::parse_from([
        "load".as_ref(),
        "--quick".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
    ])
}

fn run(settings: &Settings) -> Result<Report, String> {
    if settings.litellm {
        litellm::ensure_installed()?;
    }
    if settings.portkey {
        portkey::ensure_installed()?;
    }
    let mock = Mock::start(&settings.mock())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("load-client")
        .enable_all()
        .build()
        .map_err(|err| format!("client runtime: {err}"))?;
    let report = runtime.block_on(bench(settings, &mock))?;
    print!("{}", report::render(&report));
    let path = settings.json.clone().unwrap_or_else(default_json_path);
    report::write_json(&report, &path)?;
    println!("json: {}", path.display());
    Ok(report)
}

/// `<target dir>/bench/load.json`, the target dir found from the gateway binary's path so that
/// `CARGO_TARGET_DIR` is honoured.
fn default_json_path() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_flowgate"));
    let target = exe.parent().and_then(|profile| profile.parent());
    target
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("bench/load.json")
}

async fn bench(settings: &Settings, mock: &Mock) -> Result<Report, String> {
    let admin = workload::client(4);
    let mut flowgate = Flowgate::start(&admin, mock.port).await?;
    let floor = match settings.floor {
        true => Some(FloorProxy::start(&admin, mock.port).await?),
        false => None,
    };
    let litellm = match settings.litellm {
        true => Some(Litellm::start(&admin, mock.port).await?),
        false => None,
    };
    let portkey = match settings.portkey {
        true => Some(Portkey::start(&admin, mock.port).await?),
        false => None,
    };
    let bench = Bench {
        settings,
        expect: Expect {
            body_len: mock.answer_len,
            chunks: settings.chunks,
        },
        admin: admin.clone(),
        subjects: subjects(
            mock,
            &flowgate,
            floor.as_ref(),
            litellm.as_ref(),
            portkey.as_ref(),
        ),
        clock_ticks: procfs::clock_ticks(),
    };
    let mut scenarios = Vec::new();
    for (index, scenario) in scenario::plan(settings).iter().enumerate() {
        eprintln!("{} (experiment {})", scenario.name, scenario.experiment);
        scenarios.push(bench.scenario(index, scenario).await?);
    }
    let traces = check_traces(&flowgate, &admin, &scenarios).await?;
    let idle = idle(settings, &flowgate).await;
    let whole = flowgate.metrics(&admin).await?;
    drop(bench);
    flowgate.stop();
    let failures = failures(&scenarios, &traces);
    let mut report = Report {
        machine: procfs::machine(),
        settings: settings.clone(),
        scenarios,
        traces,
        overhead_metric: GatewayMetrics {
            overhead_p50_ms: whole.overhead_quantile_ms(0.50),
            overhead_p99_ms: whole.overhead_quantile_ms(0.99),
            traces_dropped: whole.traces_dropped,
        },
        idle,
        targets: Vec::new(),
        closed_budget: None,
        passed: failures.is_empty(),
        failures,
    };
    (report.targets, report.closed_budget) = targets::judge(&report);
    Ok(report)
}

fn subjects<'a>(
    mock: &Mock,
    flowgate: &'a Flowgate,
    floor: Option<&FloorProxy>,
    litellm: Option<&Litellm>,
    portkey: Option<&Portkey>,
) -> Vec<Subject<'a>> {
    // `exact`: the answer must arrive byte for byte as the mock sent it. The peer gateways
    // re-serialise answers, so only their well-formedness is checked.
    let subject = |name, base: &str, exact, pid| Subject {
        target: Target {
            name,
            url: format!("{base}/v1/chat/completions")
                .parse()
                .expect("a valid URL"),
            exact,
            headers: Vec::new(),
        },
        pid,
        flowgate: None,
    };
    let direct = format!("http://127.0.0.1:{}", mock.port);
    let mut subjects = vec![subject(DIRECT, &direct, true, None)];
    if let Some(floor) = floor {
        subjects.push(subject(FLOOR, &floor.base, true, Some(floor.pid())));
    }
    subjects.push(Subject {
        flowgate: Some(flowgate),
        ..subject(FLOWGATE, &flowgate.base, true, Some(flowgate.pid()))
    });
    if let Some(litellm) = litellm {
        subjects.push(subject(
            "litellm",
            &litellm.base,
            false,
            Some(litellm.pid()),
        ));
    }
    if let Some(portkey) = portkey {
        let mut peer = subject("portkey", &portkey.base, false, Some(portkey.pid()));
        peer.target.headers = portkey.headers.clone();
        subjects.push(peer);
    }
    subjects
}

/// flowgate's RSS while it sits idle after the run, sampled every second: a gateway between
/// bursts must not grow either.
async fn idle(settings: &Settings, flowgate: &Flowgate) -> Option<IdleMemory> {
    if settings.idle_secs <= 0.0 {
        return None;
    }
    let mb = || procfs::tree_memory(flowgate.pid()).rss_kb as f64 / 1024.0;
    let (start, clock) = (mb(), Instant::now());
    let mut max = start;
    eprintln!("idle for {:.0} s", settings.idle_secs);
    while clock.elapsed().as_secs_f64() < settings.idle_secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        max = max.max(mb());
    }
    Some(IdleMemory {
        secs: settings.idle_secs,
        rss_start_mb: start,
        rss_end_mb: mb(),
        rss_max_mb: max,
    })
}

/// Requests sent to flowgate per experiment (warm-ups included: each is a trace too), against
/// the traces it stored, waiting up to 5 s for the recorder to catch up.
async fn check_traces(
    flowgate: &Flowgate,
    admin: &HttpClient,
    scenarios: &[ScenarioReport],
) -> Result<TraceCheck, String> {
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for scenario in scenarios {
        for phase in scenario.phases.iter().filter(|p| p.target == FLOWGATE) {
            *sent.entry(scenario.experiment.clone()).or_default() +=
                phase.warmup_requests + phase.summary.requests;
        }
    }
    let start = Instant::now();
    let stored = loop {
        let stored = flowgate.traces_by_experiment(admin).await?;
        let caught_up = sent
            .iter()
            .all(|(name, &n)| stored.get(name).copied().unwrap_or(0) >= n);
        if caught_up || start.elapsed() > Duration::from_secs(5) {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let by_experiment: Vec<ExperimentTraces> = sent
        .into_iter()
        .map(|(experiment, sent)| ExperimentTraces {
            stored: stored.get(&experiment).copied().unwrap_or(0),
            experiment,
            sent,
        })
        .collect();
    Ok(TraceCheck {
        sent: by_experiment.iter().map(|e| e.sent).sum(),
        stored: by_experiment.iter().map(|e| e.stored).sum(),
        dropped: flowgate.metrics(admin).await?.traces_dropped,
        by_experiment,
    })
}

/// Why the run does not count: too many errors from flowgate (or from the mock itself, which
/// means the harness is broken), or lost traces. LiteLLM's errors are reported, not judged.
fn failures(scenarios: &[ScenarioReport], traces: &TraceCheck) -> Vec<String> {
    let mut failures = Vec::new();
    for scenario in scenarios {
        for phase in &scenario.phases {
            let s = &phase.summary;
            // The floor proxy is the harness's own: its errors mean the harness is broken.
            let judged = [DIRECT, FLOOR, FLOWGATE].contains(&phase.target);
            if judged && s.error_rate > MAX_ERROR_RATE {
                failures.push(format!(
                    "{} via {}: {} of {} requests failed ({:.2}%): {:?}",
                    scenario.name,
                    phase.target,
                    s.errors,
                    s.requests,
                    s.error_rate * 100.0,
                    s.errors_by_kind
                ));
            }
        }
    }
    for e in traces.by_experiment.iter().filter(|e| e.stored < e.sent) {
        failures.push(format!(
            "experiment {}: {} requests sent to flowgate, {} traces stored",
            e.experiment, e.sent, e.stored
        ));
    }
    failures
}
