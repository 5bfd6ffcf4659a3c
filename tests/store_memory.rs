//! How much memory the sled store holds, and what it costs per trace (time, bytes written, bytes
//! on disk), while traces stream in. Ignored by default (it writes 300k traces); run with `cargo test --release --test store_memory -- --ignored --nocapture`,
//! with `FLOWGATE_STORE_RATE=N` to write as at N calls a second (1000 unless set),
//! `FLOWGATE_STORE_TRACES=N` to write N traces (300k unless set), `FLOWGATE_STORE_IDLE_SECS=N` to
//! idle N seconds after the writes (30 unless set; RSS must not grow meanwhile), and
//! `FLOWGATE_STORE_CACHE_BYTES=N` for another sled page cache than the default.

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

/// A positive number from the environment, or `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&value| value > 0)
        .unwrap_or(default)
}

/// The id of the n-th trace of a gateway serving `rate` calls a second: the store files traces
/// by the time in the id, so this writes them as such a gateway does, only faster.
fn at_rate(n: u64, rate: u64) -> String {
    let ms = 1_750_000_000_000 + n * 1000 / rate;
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
    uuid::Uuid::new_v7(ts).to_string()
}

#[test]
#[ignore]
fn store_memory_stays_bounded_while_writing_and_idle() {
    let dir = tempfile::tempdir().unwrap();
    let cache = env_or(
        "FLOWGATE_STORE_CACHE_BYTES",
        flowgate::config::StorageConfig::default().cache_capacity_bytes,
    );
    let store = SledStore::open(&dir.path().join("db"), cache).unwrap();
    let body = Captured::text(&"x".repeat(1000), false);
    let started = rss_kb();
    let (clock, written) = (std::time::Instant::now(), written_bytes());
    // As the recorder writes: a batch every 25 ms, flushed every 200 ms.
    let rate = env_or("FLOWGATE_STORE_RATE", 1000);
    let total = env_or("FLOWGATE_STORE_TRACES", 300_000);
    let every = (total / 6).max(1);
    let per_batch = (rate / 40).max(1);
    for round in 0..total / per_batch {
        let traces: Vec<Trace> = (0..per_batch)
            .map(|i| Trace {
                id: at_rate(round * per_batch + i, rate),
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
        let traces = (round + 1) * per_batch;
        if traces % every < per_batch {
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
    // Then idle, as a gateway between bursts. sled's background flusher, when it had one, cleaned
    // its log meanwhile and paged the index back into memory: +23 MB within a minute after 900k
    // traces.
    let idle = env_or("FLOWGATE_STORE_IDLE_SECS", 30);
    let before_idle = rss_kb();
    for second in 1..=idle {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if second % 10 == 0 || second == idle {
            println!(
                "idle {second} s: RSS {} MB ({:+} MB since the last write)",
                rss_kb() / 1024,
                (rss_kb() as i64 - before_idle as i64) / 1024
            );
        }
    }
    let grown_kb = rss_kb().saturating_sub(before_idle);
    assert!(
        grown_kb < 2048,
        "an idle store grew by {grown_kb} KB in {idle} s"
    );
    // What a start after a crash (or an upgrade from an older schema) costs in the store: every
    // trace read back and its index entries written again.
    let clock = std::time::Instant::now();
    let mut recovered = 0u64;
    store.recover_traces(&mut |_| recovered += 1).unwrap();
    println!(
        "recovery: {recovered} traces in {:.1} s, {:.1} µs per trace",
        clock.elapsed().as_secs_f64(),
        clock.elapsed().as_secs_f64() * 1e6 / recovered as f64
    );
}
