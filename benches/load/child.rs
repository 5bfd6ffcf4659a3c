//! A server under test run as a child process: started with its output in a log file, waited for
//! until healthy, and stopped with SIGTERM (then SIGKILL) when dropped — on panic too, since the
//! guard is dropped while unwinding.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::procfs;
use crate::workload::{self, HttpClient};

/// A temporary directory for a child's config, store and log, removed when dropped.
pub fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|err| format!("temp dir: {err}"))
}

/// Runs `command` to its end (an installer); fails unless it succeeds.
pub fn run(command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|err| format!("{command:?}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

pub struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr to `log`.
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> Result<Self, String> {
        let out = File::create(log).map_err(|err| format!("{}: {err}", log.display()))?;
        let err = out.try_clone().map_err(|err| err.to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|err| format!("cannot start {name}: {err}"))?;
        Ok(ChildGuard {
            name,
            child,
            log: log.to_owned(),
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `url` until it answers 200, and says how long that took; fails early if the
    /// process exits, and after `limit`.
    pub async fn wait_healthy(
        &mut self,
        client: &HttpClient,
        url: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok((StatusCode::OK, _)) = workload::get(client, url).await {
                let took = start.elapsed();
                eprintln!(
                    "{} (pid {}) healthy after {took:.1?}",
                    self.name,
                    self.pid()
                );
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("exited ({status}) before answering {url}")));
            }
            if start.elapsed() > limit {
                return Err(self.failure(&format!("not healthy at {url} after {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A message with the end of the process's log, which says why.
    pub fn failure(&self, what: &str) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{} {what}; end of its log:\n{}", self.name, tail.join("\n"))
    }

    /// SIGTERM to the process (a clean shutdown: flowgate drains and flushes its store), up to
    /// `grace` to exit, then SIGKILL to it and to any descendant it left behind.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = self.pid();
        let descendants = procfs::descendants(pid);
        signal("TERM", &[pid]);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                signal("TERM", &descendants);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {grace:?} of SIGTERM: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        signal("KILL", &descendants);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// `kill -SIG pids` through the `kill` program: std has no signal API and libc is not a
/// dependency.
fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}
