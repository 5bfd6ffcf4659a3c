//! How much memory the sled store holds, and what it costs per trace (time, bytes written, bytes
//! on disk), while traces stream in. Ignored by default (it writes 300k traces); run with `cargo test --release --test store_memory -- --ignored --nocapture`.

use flowgate::store::{Batch, SledStore, Store};
use flowgate::trace::{Captured, Trace};

/// A number from a `/proc/self` file's `name: value` line.
fn proc_self(file: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    proc_self("status", "VmRSS:")
}

/// Bytes this process has passed to `write`-like calls (disk and sockets alike; here, disk).
fn written_bytes() -> u64 {
    proc_self("io", "wchar:")
}

/// What the files under `dir` take.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The id of the n-th trace of a gateway serving 1000 calls a second: the store files index
/// entries by the time in the id, so this writes them as such a gateway does, only faster.
fn at_1000_per_second(n: u64) -> String {
    let ms = 1_750_000_000_000 + n;
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
    uuid::Uuid::new_v7(ts).to_string()
}

#[test]
#[ignore]
fn store_memory_stays_bounded_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(
        &dir.path().join("db"),
        flowgate::config::StorageConfig::default().cache_capacity_bytes,
    )
    .unwrap();
    let body = Captured::text(&"x".repeat(1000), false);
    let started = rss_kb();
    let (clock, written) = (std::time::Instant::now(), written_bytes());
    // As the recorder writes at 1000 calls a second: 25 traces every 25 ms, flushed every 200 ms.
    for round in 0..12000 {
        let traces: Vec<Trace> = (0..25)
            .map(|i| Trace {
                id: at_1000_per_second(round * 25 + i),
                experiment: "mem".into(),
                run_id: format!("run{}", round % 4),
                endpoint: "chat.completions".into(),
                cache: "miss".into(),
                request_body: Some(body.clone()),
                response_body: Some(body.clone()),
                ..Trace::default()
            })
            .collect();
        store
            .apply(&Batch {
                traces,
                ..Batch::default()
            })
            .unwrap();
        if round % 8 == 7 {
            store.flush().unwrap();
        }
        if round % 2000 == 1999 {
            let traces = (round + 1) * 25;
            println!(
                "{traces} traces: RSS {} MB (+{} MB), {:.1} µs and {:.1} KB written per trace, {:.1} KB on disk",
                rss_kb() / 1024,
                (rss_kb() - started) / 1024,
                clock.elapsed().as_secs_f64() * 1e6 / traces as f64,
                (written_bytes() - written) as f64 / 1024.0 / traces as f64,
                disk_bytes(dir.path()) as f64 / 1024.0 / traces as f64
            );
        }
    }
}
