//! Portkey's AI gateway as a peer gateway (`--portkey`), set up as shared/notes/peer-gateways.md
//! says: installed from npm into `.peer-node`, started headless, each request routed to the same
//! mock flowgate uses by Portkey's own headers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tempfile::TempDir;

use crate::child::{run, scratch_dir, ChildGuard};
use crate::gateway::free_port;
use crate::workload::HttpClient;

/// The version the peer-gateway note measured.
const DEFAULT_VERSION: &str = "1.15.2";

/// Newer versions of this dependency break Portkey's streaming (`TypeError: immutable`).
const NODE_SERVER_VERSION: &str = "1.14.1";

pub struct Portkey {
    guard: ChildGuard,
    pub base: String,
    /// The headers that send a request on to the mock.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    _dir: TempDir,
}

/// `.peer-node` in the repository, or `FLOWGATE_BENCH_PEER_NODE` (relative to the repository).
fn install_dir() -> PathBuf {
    let dir = std::env::var("FLOWGATE_BENCH_PEER_NODE").unwrap_or_else(|_| ".peer-node".into());
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

fn server_script() -> PathBuf {
    install_dir().join("node_modules/@portkey-ai/gateway/build/start-server.js")
}

/// Installs the gateway with npm unless it is there. `FLOWGATE_BENCH_PORTKEY_VERSION` picks
/// another version.
pub fn ensure_installed() -> Result<(), String> {
    if server_script().exists() {
        return Ok(());
    }
    let dir = install_dir();
    let version =
        std::env::var("FLOWGATE_BENCH_PORTKEY_VERSION").unwrap_or_else(|_| DEFAULT_VERSION.into());
    eprintln!(
        "installing @portkey-ai/gateway@{version} into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let manifest = serde_json::json!({
        "name": "flowgate-peer-portkey",
        "private": true,
        "dependencies": {"@portkey-ai/gateway": version},
        "overrides": {"@hono/node-server": NODE_SERVER_VERSION},
    });
    let path = dir.join("package.json");
    std::fs::write(&path, manifest.to_string())
        .map_err(|err| format!("{}: {err}", path.display()))?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))
}

impl Portkey {
    pub async fn start(client: &HttpClient, mock_port: u16) -> Result<Portkey, String> {
        let dir = scratch_dir("portkey-load-")?;
        let port = free_port()?;
        let mut command = Command::new("node");
        command
            .arg(server_script())
            .arg(format!("--port={port}"))
            .arg("--headless")
            .current_dir(dir.path());
        let mut guard = ChildGuard::spawn("portkey", command, &dir.path().join("portkey.log"))?;
        // It listens on every interface: only its loopback address is used.
        let base = format!("http://127.0.0.1:{port}");
        guard
            .wait_healthy(client, &format!("{base}/"), Duration::from_secs(60))
            .await?;
        let custom_host = HeaderValue::from_str(&format!("http://127.0.0.1:{mock_port}/v1"))
            .map_err(|err| err.to_string())?;
        Ok(Portkey {
            guard,
            base,
            headers: vec![
                (
                    HeaderName::from_static("x-portkey-provider"),
                    HeaderValue::from_static("openai"),
                ),
                (
                    HeaderName::from_static("x-portkey-custom-host"),
                    custom_host,
                ),
            ],
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}
