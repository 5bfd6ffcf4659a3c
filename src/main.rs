use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use flowgate::cli::{self, Cli, Command, StoreCommand};
use flowgate::config::Config;
use flowgate::providers::Router;
use flowgate::server::Gateway;

/// mimalloc instead of glibc's malloc: per-request allocations are cheaper, and memory freed by
/// the recorder thread returns to use instead of fragmenting per-thread arenas. Built with
/// `no_thp`: mimalloc otherwise asks for transparent huge pages, which on this kind of host made
/// idle RSS 113 MB instead of 71 MB and had the kernel zero 2 MB pages on the request path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    flowgate::allocator::return_freed_memory_promptly();
    let cli = Cli::parse();
    // One process-wide TLS provider, so nothing can pick a different one by accident.
    let _ = rustls::crypto::ring::default_provider().install_default();
    flowgate::telemetry::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Command::Serve { config } => runtime.block_on(serve(config.as_deref())),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Store {
            command: StoreCommand::Check { path, config },
        } => store_check(path.as_deref(), config.as_deref()),
        read => runtime
            .block_on(cli::run_client(read))
            .map_err(|err| err.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: Option<&Path>) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|err| err.to_string())?;
    flowgate::metering::warm_tokenizers();
    if let Err(err) = flowgate::allocator::spawn_purge_janitor(flowgate::allocator::PURGE_EVERY) {
        // Serving still works; RSS may only climb for a while now and then (see `allocator`).
        tracing::warn!(error = %err, "cannot start the allocator's purge thread");
    }
    let gateway = Gateway::start(&config)
        .await
        .map_err(|err| err.to_string())?;
    tracing::info!(
        listen = %gateway.addr,
        config = %config.source(),
        store = %config.storage.path.display(),
        "flowgate is serving: point an OpenAI client at http://{}/v1",
        gateway.addr
    );
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight calls and storing traces");
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn check_config(config_path: Option<&Path>) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|err| err.to_string())?;
    let router = Router::from_config(&config)
        .map_err(|err| format!("invalid config {}: {err}", config.source()))?;
    let pricing =
        flowgate::metering::Pricing::new(&config.pricing).map_err(|err| err.to_string())?;
    println!("config: {} is valid", config.source());
    println!("listen: {}", config.server.listen);
    println!(
        "store:  {} (capture: {:?})",
        config.storage.path.display(),
        config.storage.capture
    );
    println!("prices: {} models", pricing.len());
    let cache = &config.cache;
    if cache.enabled && cache.mode != flowgate::config::CacheMode::Off {
        println!(
            "cache:  {:?} mode, {} MB, ttl {} s",
            cache.mode,
            cache.max_bytes / (1024 * 1024),
            cache.ttl_seconds
        );
    } else {
        println!("cache:  off");
    }
    for guardrail in &config.guardrails {
        println!("guardrail: {}", guardrail.describe());
    }
    println!("\nrouting (first match wins; provider/model picks a provider explicitly):");
    print!("{}", router.describe());
    Ok(())
}

/// `flowgate store check`: opens the store as the gateway would and reads every record.
fn store_check(path: Option<&Path>, config_path: Option<&Path>) -> Result<(), String> {
    use flowgate::store::{SledStore, Store};
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => {
            Config::load(config_path)
                .map_err(|err| err.to_string())?
                .storage
                .path
        }
    };
    // sled would make a new, empty store of any directory it is pointed at: a typo must not.
    if !path.join("db").is_file() {
        return Err(format!(
            "no flowgate store at {}: a store is a directory holding sled's `db` file and \
             `traces.log` (the gateway's `storage.path`, ./data/flowgate.sled by default)",
            path.display()
        ));
    }
    // Opening upgrades an older store, after which the flowgate that wrote it refuses it: a
    // check must not do that behind the user's back.
    let schema = SledStore::stored_schema(&path).map_err(|err| err.to_string())?;
    if let Some(older) = schema.filter(|&found| found < flowgate::store::SCHEMA_VERSION) {
        return Err(format!(
            "the store at {} has schema version {older}, written by an older flowgate; this one \
             uses {}. `flowgate serve` upgrades it when it starts (older versions refuse it \
             afterwards); `store check` leaves it as it is: check it with the flowgate that wrote \
             it, or start this one",
            path.display(),
            flowgate::store::SCHEMA_VERSION
        ));
    }
    let cache = flowgate::config::StorageConfig::default().cache_capacity_bytes;
    let store = SledStore::open(&path, cache).map_err(|err| err.to_string())?;
    let mut traces = 0u64;
    let unreadable = store
        .for_each_trace(&mut |_| traces += 1)
        .map_err(|err| err.to_string())?;
    let runs = store.runs(None).map_err(|err| format!("runs: {err}"))?;
    let experiments = store
        .experiments()
        .map_err(|err| format!("experiments: {err}"))?;
    let clean = store.closed_cleanly().map_err(|err| err.to_string())?;
    println!("store:       {}", path.display());
    println!("traces:      {traces}");
    if unreadable > 0 {
        println!(
            "unreadable:  {unreadable} (see the warnings: lost in a power cut, or damaged; the \
             gateway serves the other traces and skips these)"
        );
    }
    println!("runs:        {}", runs.len());
    println!("experiments: {}", experiments.len());
    if clean {
        println!("last close:  clean");
    } else {
        println!(
            "last close:  not clean; the next `flowgate serve` recomputes runs from the traces"
        );
    }
    Ok(())
}
