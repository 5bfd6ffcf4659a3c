//! flowgate under test: the release binary as a child process, with a generated config in a
//! temporary directory (its own port, its own sled store, full capture) and one OpenAI-kind
//! provider pointed at the mock.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;
use tempfile::TempDir;

use crate::child::{scratch_dir, ChildGuard};
use crate::prom::Scrape;
use crate::workload::{self, HttpClient};

pub struct Flowgate {
    // Declared first so that it is dropped (the process stopped) before the directory goes.
    guard: ChildGuard,
    pub base: String,
    _dir: TempDir,
}

impl Flowgate {
    pub async fn start(client: &HttpClient, mock_port: u16) -> Result<Flowgate, String> {
        let dir = scratch_dir("flowgate-load-")?;
        let port = free_port()?;
        let config = dir.path().join("flowgate.toml");
        std::fs::write(&config, config_text(port, dir.path(), mock_port)?)
            .map_err(|err| format!("{}: {err}", config.display()))?;
        // FLOWGATE_BENCH_WRAPPER runs the gateway under a profiler, e.g.
        // "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out" (use low rates then).
        let wrapper = std::env::var("FLOWGATE_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(env!("CARGO_BIN_EXE_flowgate"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_flowgate")),
        };
        let startup = if wrapper.is_empty() { 60 } else { 600 };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            // These would override the generated file.
            .env_remove("FLOWGATE_LISTEN")
            .env_remove("FLOWGATE_DATA_DIR")
            .env_remove("FLOWGATE_CONFIG")
            .env_remove("FLOWGATE_ADMIN_TOKEN")
            .env("FLOWGATE_LOG", "warn");
        let mut guard = ChildGuard::spawn("flowgate", command, &dir.path().join("flowgate.log"))?;
        let base = format!("http://127.0.0.1:{port}");
        guard
            .wait_healthy(
                client,
                &format!("{base}/healthz"),
                Duration::from_secs(startup),
            )
            .await?;
        Ok(Flowgate {
            guard,
            base,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub async fn metrics(&self, client: &HttpClient) -> Result<Scrape, String> {
        let text = self.admin(client, "/metrics").await?;
        Ok(Scrape::parse(&String::from_utf8_lossy(&text)))
    }

    /// Stored traces per experiment. Admin reads first store what the recorder has queued, so
    /// this also waits for the recorder to catch up.
    pub async fn traces_by_experiment(
        &self,
        client: &HttpClient,
    ) -> Result<BTreeMap<String, u64>, String> {
        #[derive(Deserialize)]
        struct List {
            experiments: Vec<Experiment>,
        }
        #[derive(Deserialize)]
        struct Experiment {
            name: String,
            traces: u64,
        }
        let body = self.admin(client, "/api/v1/experiments").await?;
        let list: List = serde_json::from_slice(&body)
            .map_err(|err| format!("GET /api/v1/experiments: {err}"))?;
        Ok(list
            .experiments
            .into_iter()
            .map(|e| (e.name, e.traces))
            .collect())
    }

    async fn admin(&self, client: &HttpClient, path: &str) -> Result<bytes::Bytes, String> {
        match workload::get(client, &format!("{}{path}", self.base)).await? {
            (StatusCode::OK, body) => Ok(body),
            (status, body) => Err(format!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body)
            )),
        }
    }

    /// SIGTERM and wait: flowgate finishes in-flight calls and flushes its store.
    pub fn stop(&mut self) {
        self.guard.stop(Duration::from_secs(30));
    }
}

/// The `[[guardrails]]` of the shipped `config/flowgate.toml` (they log: the recorder runs
/// them), read from the file so the benchmark measures what ships.
fn shipped_guardrails() -> Result<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/flowgate.toml");
    let text = std::fs::read_to_string(path).map_err(|err| format!("{path}: {err}"))?;
    let shipped: toml::Table = text.parse().map_err(|err| format!("{path}: {err}"))?;
    let mut guardrails = toml::Table::new();
    if let Some(rails) = shipped.get("guardrails") {
        guardrails.insert("guardrails".into(), rails.clone());
    }
    toml::to_string(&guardrails).map_err(|err| format!("{path}: {err}"))
}

fn config_text(port: u16, dir: &std::path::Path, mock_port: u16) -> Result<String, String> {
    // FLOWGATE_BENCH_GUARDRAILS=off measures without them.
    let guardrails = match std::env::var("FLOWGATE_BENCH_GUARDRAILS").as_deref() {
        Ok("off") => String::new(),
        _ => shipped_guardrails()?,
    };
    Ok(format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[storage]
path = "{store}"
{storage}

[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
models = ["gpt-*"]

{guardrails}{extra}
"#,
        store = dir.join("flowgate.sled").display(),
        // More [storage] keys to try (e.g. `capture = "metadata"`): FLOWGATE_BENCH_STORAGE.
        storage = std::env::var("FLOWGATE_BENCH_STORAGE")
            .unwrap_or_else(|_| "capture = \"full\"".to_owned()),
        // FLOWGATE_BENCH_CONFIG is TOML added at the end (e.g. "[cache]\nenabled = false").
        extra = std::env::var("FLOWGATE_BENCH_CONFIG").unwrap_or_default(),
    ))
}

/// A port nobody listens on now. Another process could take it before the child binds it; on
/// a machine running one benchmark that does not happen, and the health check would say so.
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|err| format!("free port: {err}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|err| err.to_string())
}
