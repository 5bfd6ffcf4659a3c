//! What `/proc` tells about a process under test (CPU time, memory) and about the machine.

use std::fs;
use std::process::Command;

use serde::Serialize;

/// Clock ticks per second, the unit of `/proc/<pid>/stat` CPU times. Asked once of `getconf`
/// (libc is not a dependency); 100 when that fails, the value on every Linux we run on.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// A `stat` file of `/proc` (a process's or a thread's): the command name (which may hold spaces
/// or parens), and the fields after it, where index 0 is field 3, `state`.
fn read_stat(path: &str) -> Option<(String, Vec<String>)> {
    let stat = fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields = stat[close + 1..].split_whitespace().map(str::to_owned);
    Some((stat[open + 1..close].to_owned(), fields.collect()))
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    Some(read_stat(&format!("/proc/{pid}/stat"))?.1)
}

/// utime + stime (fields 14 and 15), in clock ticks.
fn used_ticks(fields: &[String]) -> Option<u64> {
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of one process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    used_ticks(&stat_fields(pid)?)
}

fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Every live descendant of `root` (a Python server may fork workers).
pub fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent(pid)?)))
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let pid = tree[i];
        tree.extend(all.iter().filter(|(_, ppid)| *ppid == pid).map(|(p, _)| *p));
        i += 1;
    }
    tree.remove(0);
    tree
}

fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    pids.extend(descendants(root));
    pids
}

/// utime + stime of this process (the load generator and the mock), in clock ticks.
pub fn own_cpu_ticks() -> u64 {
    read_stat("/proc/self/stat")
        .and_then(|(_, fields)| used_ticks(&fields))
        .unwrap_or(0)
}

/// The machine's CPU time since boot, all cores: (busy, all), in clock ticks. Idle and I/O
/// wait are not busy; steal is (another guest had the core).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineTicks {
    pub busy: u64,
    pub all: u64,
}

pub fn machine_ticks() -> MachineTicks {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu  user nice system idle iowait irq softirq steal (guest time is inside user).
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .take(8)
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let all: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    MachineTicks {
        busy: all.saturating_sub(idle),
        all,
    }
}

/// utime + stime of `root` and its live descendants, in clock ticks.
pub fn tree_cpu_ticks(root: u32) -> u64 {
    tree(root).into_iter().filter_map(cpu_ticks).sum()
}

/// The thread groups the report splits a gateway's CPU into, by thread name: tokio's workers
/// (flowgate's and the floor's), flowgate's recorder, and sled's threads (its I/O pool and log
/// flusher). Threads of other names, and threads that ended during a phase, are the rest.
pub const THREAD_GROUPS: [&str; 3] = ["workers", "recorder", "store"];

fn thread_group(name: &str) -> Option<usize> {
    // tokio names its workers "tokio-rt-worker" (older versions: "tokio-runtime-worker", which
    // the kernel cuts to 15 bytes).
    if name == "tokio-rt-worker" || name == "tokio-runtime-w" {
        Some(0)
    } else if name == "flowgate-record" {
        Some(1)
    } else if name.starts_with("sled") || name == "log flusher" {
        Some(2)
    } else {
        None
    }
}

/// utime + stime of the live threads of `root` and its descendants, per [`THREAD_GROUPS`], in
/// clock ticks; `None` for a group with no thread.
pub fn thread_group_ticks(root: u32) -> [Option<u64>; 3] {
    let mut ticks = [None; 3];
    for pid in tree(root) {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let path = task.path().join("stat");
            let Some((name, fields)) = path.to_str().and_then(read_stat) else {
                continue;
            };
            let Some(group) = thread_group(&name) else {
                continue;
            };
            *ticks[group].get_or_insert(0) += used_ticks(&fields).unwrap_or(0);
        }
    }
    ticks
}

/// Resident memory of `root` and its live descendants, in kB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmRSS: now.
    pub rss_kb: u64,
    /// VmHWM: the peak since the last `reset_peak` (or since start).
    pub peak_kb: u64,
}

pub fn tree_memory(root: u32) -> Memory {
    tree(root)
        .into_iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .fold(Memory::default(), |sum, status| Memory {
            rss_kb: sum.rss_kb + status_kb(&status, "VmRSS:"),
            peak_kb: sum.peak_kb + status_kb(&status, "VmHWM:"),
        })
}

fn status_kb(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (`clear_refs` value 5, Linux ≥ 4.0), so the next reading is
/// the peak of one phase. Harmless when refused: the peak is then the process's lifetime peak.
pub fn reset_peak(root: u32) {
    for pid in tree(root) {
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// The machine the numbers were taken on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gb: f64,
    pub date: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, model)| model.trim().to_owned()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned()),
        memory_gb: status_kb(&meminfo, "MemTotal:") as f64 / 1024.0 / 1024.0,
        date: command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map_or_else(|| "unknown".into(), |text| text.trim().to_owned())
}
