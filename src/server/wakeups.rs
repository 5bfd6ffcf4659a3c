//! Absorbs the wake-ups a connection's task gives itself while it runs.
//!
//! hyper's request body channel wakes its sender each time the receiver takes a chunk. The sender
//! is the connection's dispatcher, and the receiver is the service reading the body: both run in
//! the connection's task, so every call woke that task while it was running. tokio treats such a
//! wake-up as a yield: the task goes to the back of the run queue and an idle worker thread is
//! woken to look for work. On a quiet gateway that is a futex wake-up of the other worker, which
//! finds nothing (or takes the task, with cold caches) and goes back to sleep: 2.5 futex calls
//! and 1.4 context switches more per call at 1000 calls a second, where a plain proxy makes no
//! futex call at all. Polling the connection again at once does the same work as the rescheduled
//! poll, without the detour.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Polls of the inner future per poll of the task, at most. A future still waking itself after
/// that yields on purpose (hyper does after 16 pipelined requests), and gets tokio's yield.
const MAX_POLLS: usize = 4;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN_WHILE_POLLING: u8 = 2;

/// `inner`, whose wake-ups during its own poll become another poll in the same turn.
pub struct AbsorbSelfWakes<F> {
    inner: Pin<Box<F>>,
    shared: Arc<Shared>,
    waker: Waker,
}

impl<F: Future> AbsorbSelfWakes<F> {
    pub fn new(inner: F) -> AbsorbSelfWakes<F> {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        AbsorbSelfWakes {
            inner: Box::pin(inner),
            waker: Waker::from(shared.clone()),
            shared,
        }
    }
}

impl<F: Future> Future for AbsorbSelfWakes<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // What the calls leave for after the connection has written runs when this poll returns.
        let _after_write = super::after_write::Scope::enter();
        this.shared.remember(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_POLLS {
            this.shared.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(output) = this.inner.as_mut().poll(&mut inner_cx) {
                this.shared.state.store(IDLE, Ordering::Release);
                return Poll::Ready(output);
            }
            let settled = this.shared.state.compare_exchange(
                POLLING,
                IDLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if settled.is_ok() {
                return Poll::Pending;
            }
            // Out of tokio's budget, another poll would only be refused again.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        this.shared.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

struct Shared {
    state: AtomicU8,
    /// The task's own waker, for wake-ups that come while it is not running.
    task: Mutex<Option<Waker>>,
}

impl Shared {
    fn remember(&self, waker: &Waker) {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !task.as_ref().is_some_and(|known| known.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let noted = self.state.compare_exchange(
            POLLING,
            WOKEN_WHILE_POLLING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // While the task runs, noting the wake-up is enough: it polls again before it returns.
        if matches!(noted, Ok(_) | Err(WOKEN_WHILE_POLLING)) {
            return;
        }
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Wakes itself on each of its first `wakes` polls, as hyper's body channel does, then is done.
    struct WakesItself {
        wakes: usize,
        polls: usize,
    }

    impl Future for WakesItself {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.wakes {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_once<F: Future>(
        future: &mut AbsorbSelfWakes<F>,
        count: &Arc<Count>,
    ) -> Poll<F::Output> {
        let waker = Waker::from(count.clone());
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_wake_up_during_its_own_poll_is_another_poll_not_a_trip_through_the_scheduler() {
        let count = Arc::new(Count::default());
        let mut future = AbsorbSelfWakes::new(WakesItself { wakes: 1, polls: 0 });
        assert_eq!(poll_once(&mut future, &count), Poll::Ready(2));
        assert_eq!(count.get(), 0, "the task was not woken");
    }

    #[test]
    fn a_future_that_keeps_waking_itself_still_yields_to_the_scheduler() {
        let count = Arc::new(Count::default());
        let mut future = AbsorbSelfWakes::new(WakesItself {
            wakes: usize::MAX,
            polls: 0,
        });
        assert_eq!(poll_once(&mut future, &count), Poll::Pending);
        assert_eq!(count.get(), 1, "woken once, to be polled again later");
        assert_eq!(future.inner.polls, MAX_POLLS);
    }

    /// Pending until `ready` is set, and wakes whoever is waiting when it is.
    struct Flag {
        ready: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Flag {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_wake_up_from_another_thread_between_polls_reaches_the_task() {
        let count = Arc::new(Count::default());
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None));
        let mut future = AbsorbSelfWakes::new(Flag {
            ready: ready.clone(),
            waker: waker.clone(),
        });
        assert_eq!(poll_once(&mut future, &count), Poll::Pending);
        assert_eq!(count.get(), 0);

        let stored = waker.lock().unwrap().take().unwrap();
        ready.store(true, Ordering::SeqCst);
        std::thread::spawn(move || stored.wake()).join().unwrap();
        assert_eq!(count.get(), 1, "the task was woken");
        assert_eq!(poll_once(&mut future, &count), Poll::Ready(()));
    }

    #[test]
    fn work_a_call_defers_runs_when_the_connections_poll_returns() {
        // As a connection's last write: the body defers its cache fill, then hyper flushes, all
        // in one poll; the fill must come after the flush.
        let log = Arc::new(Mutex::new(Vec::new()));
        let (deferring, flushing) = (log.clone(), log.clone());
        let mut future = AbsorbSelfWakes::new(std::future::poll_fn(move |_| {
            let deferred = deferring.clone();
            crate::server::after_write::defer(move || deferred.lock().unwrap().push("cache fill"));
            flushing.lock().unwrap().push("flush");
            Poll::Ready(())
        }));
        let count = Arc::new(Count::default());
        assert_eq!(poll_once(&mut future, &count), Poll::Ready(()));
        assert_eq!(*log.lock().unwrap(), ["flush", "cache fill"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_task_runs_to_the_end_under_tokio() {
        let done = tokio::spawn(AbsorbSelfWakes::new(async {
            let mut total = 0;
            for round in 0..100 {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_micros(10)).await;
                total += round;
            }
            total
        }));
        // A lost wake-up would leave the task asleep forever: fail instead of hanging.
        let finished = tokio::time::timeout(std::time::Duration::from_secs(10), done).await;
        assert_eq!(finished.expect("the task finished").unwrap(), 4950);
    }
}
