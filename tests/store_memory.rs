//! How much memory the sled store holds while traces stream in. Ignored by default (it writes
//! 150k traces); run with `cargo test --release --test store_memory -- --ignored --nocapture`.

use flowgate::store::{Batch, SledStore, Store};
use flowgate::trace::{Captured, Trace};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
#[ignore]
fn store_memory_stays_bounded_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), 16 * 1024 * 1024).unwrap();
    let body = Captured::text(&"x".repeat(1000), false);
    let started = rss_kb();
    for round in 0..300 {
        let traces: Vec<Trace> = (0..500)
            .map(|_| Trace {
                id: uuid::Uuid::now_v7().to_string(),
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
        if round % 50 == 49 {
            println!(
                "{} traces: RSS {} MB (+{} MB)",
                (round + 1) * 500,
                rss_kb() / 1024,
                (rss_kb() - started) / 1024
            );
        }
    }
}
