//! LiteLLM's proxy as a peer gateway (`--litellm`), set up as shared/notes/peer-gateways.md says:
//! a venv in `.peer-venv`, offline (local cost map, no telemetry), no database, one worker, one
//! model routed to the same mock flowgate uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::child::{run, scratch_dir, ChildGuard};
use crate::gateway::free_port;
use crate::workload::HttpClient;

/// The version the peer-gateway note measured; newer ones did not resolve there.
const DEFAULT_VERSION: &str = "1.108.7";

pub struct Litellm {
    guard: ChildGuard,
    pub base: String,
    _dir: TempDir,
}

/// `.peer-venv` in the repository, or `FLOWGATE_BENCH_PEER_VENV` (relative to the repository).
fn venv() -> PathBuf {
    let dir = std::env::var("FLOWGATE_BENCH_PEER_VENV").unwrap_or_else(|_| ".peer-venv".into());
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

/// Creates `.peer-venv` with LiteLLM's proxy unless it is there (the install takes minutes).
/// `FLOWGATE_BENCH_LITELLM_VERSION` picks another version.
pub fn ensure_installed() -> Result<(), String> {
    let venv = venv();
    if venv.join("bin/litellm").exists() {
        return Ok(());
    }
    let version =
        std::env::var("FLOWGATE_BENCH_LITELLM_VERSION").unwrap_or_else(|_| DEFAULT_VERSION.into());
    eprintln!(
        "installing litellm[proxy]=={version} into {} (a few minutes)",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("litellm[proxy]=={version}"))
        .arg("prometheus_client"))
}

impl Litellm {
    pub async fn start(client: &HttpClient, mock_port: u16) -> Result<Litellm, String> {
        let dir = scratch_dir("litellm-load-")?;
        let config = dir.path().join("litellm.yaml");
        std::fs::write(&config, config_text(mock_port))
            .map_err(|err| format!("{}: {err}", config.display()))?;
        let port = free_port()?;
        let mut command = Command::new(venv().join("bin/litellm"));
        command
            .arg("--config")
            .arg(&config)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--num_workers",
                "1",
            ])
            // Without it LiteLLM downloads its price table at every start.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_LOG", "ERROR")
            // Without a master key (or this) it refuses to start.
            .env(
                "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
                "true",
            )
            .current_dir(dir.path());
        let mut guard = ChildGuard::spawn("litellm", command, &dir.path().join("litellm.log"))?;
        let base = format!("http://127.0.0.1:{port}");
        // It takes 16-18 s to come up on a 2-core machine.
        guard
            .wait_healthy(
                client,
                &format!("{base}/health/liveliness"),
                Duration::from_secs(120),
            )
            .await?;
        Ok(Litellm {
            guard,
            base,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

fn config_text(mock_port: u16) -> String {
    format!(
        r#"model_list:
  - model_name: gpt-4o-mini
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:{mock_port}/v1", api_key: sk-dummy}}
litellm_settings: {{telemetry: false, drop_params: true}}
"#
    )
}
