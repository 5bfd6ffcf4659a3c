//! Load generation: an open loop at a fixed rate and a closed loop of back-to-back workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use crate::stats::Sample;
use crate::workload::Caller;

/// The samples of one phase and its wall time.
pub struct Run {
    pub samples: Vec<Sample>,
    pub elapsed: Duration,
}

/// Sends `rate × duration` requests, request `i` due at `t0 + i / rate` whatever happened to the
/// earlier ones, and times each from its due time: a stall delays every request due during it, and
/// all of that delay is measured (no coordinated omission). At most `max_in_flight` requests are
/// outstanding; one that waits for a slot is still timed from its due time. Whatever has not
/// finished `drain` after the last due time counts as a timeout, so a phase always ends.
pub async fn open_loop(
    caller: Arc<Caller>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    drain: Duration,
) -> Run {
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    // A little in the future, so that the first requests are not late from the start.
    let t0 = Instant::now() + Duration::from_millis(20);
    let deadline = t0 + duration + drain;
    let (results, mut received) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let runtime = tokio::runtime::Handle::current();
    // A plain thread sleeps with the kernel's timer (tens of µs) where tokio's timer wheel would
    // round each due time up to the next millisecond.
    let dispatcher = std::thread::Builder::new()
        .name("load-dispatch".into())
        .spawn(move || {
            for i in 0..count {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                sleep_until(due);
                let (caller, slots, results) = (caller.clone(), slots.clone(), results.clone());
                runtime.spawn(async move {
                    let sample = bounded(&caller, &slots, i, due, deadline).await;
                    let _ = results.send(sample);
                });
            }
        })
        .expect("spawn the dispatcher thread");
    let mut samples = Vec::with_capacity(count as usize);
    // Ends once the dispatcher and every request task have dropped their senders.
    while let Some(sample) = received.recv().await {
        samples.push(sample);
    }
    let elapsed = t0.elapsed();
    dispatcher.join().expect("the dispatcher thread panicked");
    Run { samples, elapsed }
}

/// One open-loop request: waits for an in-flight slot, and gives up at `deadline`.
async fn bounded(
    caller: &Caller,
    slots: &Semaphore,
    index: u64,
    due: Instant,
    deadline: Instant,
) -> Sample {
    let call = async {
        let _slot = slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        caller.call(index, due).await
    };
    match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(sample) => sample,
        Err(_) => Sample::failed(due.elapsed(), Duration::ZERO, "timeout"),
    }
}

fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// `workers` workers each send a request as soon as their previous one is answered, until
/// `duration` has passed: the most the target can serve at that concurrency. A request is timed
/// from when it was sent, and gives up after `timeout`.
pub async fn closed_loop(
    caller: Arc<Caller>,
    workers: usize,
    duration: Duration,
    timeout: Duration,
) -> Run {
    let start = Instant::now();
    let end = start + duration;
    let next_index = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (caller, next_index) = (caller.clone(), next_index.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < end {
                    let index = next_index.fetch_add(1, Ordering::Relaxed);
                    samples.push(timed(&caller, index, timeout).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("a closed-loop worker panicked"));
    }
    Run {
        samples,
        elapsed: start.elapsed(),
    }
}

async fn timed(caller: &Caller, index: u64, timeout: Duration) -> Sample {
    let sent = Instant::now();
    match tokio::time::timeout(timeout, caller.call(index, sent)).await {
        Ok(sample) => sample,
        Err(_) => Sample::failed(sent.elapsed(), Duration::ZERO, "timeout"),
    }
}

/// `count` requests at once, not measured: opens the pool's connections and wakes the target
/// before a phase starts. Returns how many were sent (each one is a trace in flowgate).
pub async fn warm_up(caller: Arc<Caller>, count: usize, timeout: Duration) -> u64 {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let caller = caller.clone();
            tokio::spawn(async move { timed(&caller, u64::MAX - i as u64, timeout).await })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    count as u64
}
