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

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces or parens):
/// index 0 is field 3, `state`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of one process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // Fields 14 and 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
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

/// utime + stime of `root` and its live descendants, in clock ticks.
pub fn tree_cpu_ticks(root: u32) -> u64 {
    tree(root).into_iter().filter_map(cpu_ticks).sum()
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
