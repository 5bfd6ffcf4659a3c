//! An idle gateway stays idle: its recorder slows its timer down when there is nothing to store,
//! its store runs no thread of its own, and a call after the quiet is still traced. (Alone in its
//! test binary: it counts the wake-ups of the one recorder thread in this process.)

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::json;

/// The times the threads of this name have gone to sleep and been woken, from `/proc`; `None`
/// when there is no such thread.
fn wakeups(name: &str) -> Option<u64> {
    let mut total = None;
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|count| count.trim().parse::<u64>().ok())
            .expect("voluntary_ctxt_switches in /proc/self/task/*/status");
        *total.get_or_insert(0) += switches;
    }
    total
}

fn recorder_wakeups() -> u64 {
    wakeups("flowgate-record").expect("a thread named flowgate-record in this process")
}

#[tokio::test]
async fn an_idle_recorder_wakes_a_few_times_a_second_and_still_records_the_next_call() {
    let upstream = Upstream::start(|_| Reply::Json(200, chat_completion("ok", 3, 1))).await;
    // The shipped flush interval (200 ms), not the tests' 20 ms: the timer slows down to the
    // shorter of it and 100 ms.
    let gateway = TestGateway::start_flushing_every(&upstream.base_url(), 200).await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let first = gateway.chat(&[], body.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());

    // The call's trace is written and flushed (every 200 ms), then the timer slows down.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = recorder_wakeups();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woke = recorder_wakeups() - before;
    eprintln!("recorder wake-ups in 2 s without a call: {woke}");
    // Draining every 10 ms regardless, it woke ~300 times in these 2 s; now ~40 (each tick of
    // 100 ms is two sleeps).
    assert!(
        woke <= 80,
        "the recorder woke {woke} times in 2 s without a call"
    );

    // Nor does the store run a thread of its own: sled's flusher woke every 500 ms and, after a
    // burst, cleaned the log by paging the index back into memory (an idle gateway grew by
    // ~25 MB after 900k calls).
    assert_eq!(wakeups("log flusher"), None, "sled's flusher thread runs");

    let next = gateway.chat(&[], body).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    let id = next.header("x-flowgate-trace-id").to_owned();
    let trace = stored_trace(&gateway.url, &id).await;
    assert_eq!(trace["status"], 200, "{trace}");
}
