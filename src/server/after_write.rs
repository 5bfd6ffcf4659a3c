//! Work a call leaves for after its connection has written.
//!
//! hyper writes a response's last bytes to the socket after the body has returned its last frame
//! and been dropped, in the same poll of the connection's task (read, write, flush). What a call
//! did at its end therefore came before the client's last bytes left: with a 5 ms sleep put in
//! there, a call took 5.4 ms instead of 0.4, whether that work ran on the last frame, at the next
//! poll or at the drop. Work handed to [`defer`] while a connection's task is being polled runs
//! when that poll returns, after hyper's flush (the same sleep deferred: 0.3-0.5 ms); anywhere
//! else (no connection task on the stack) it runs at once.
//!
//! Only what no one can observe in between belongs here: the cache fill (a call for the same
//! answer waits on the fill's claim meanwhile). The trace is handed to the recorder at once, so a
//! sync asked for after the answer arrived finds it.

use std::cell::RefCell;

type Work = Box<dyn FnOnce()>;

#[derive(Default)]
struct Pending {
    /// A connection's task is being polled on this thread.
    collecting: bool,
    queue: Vec<Work>,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// Runs `work` once the connection's task being polled on this thread returns from its poll, or
/// at once when there is none.
pub fn defer(work: impl FnOnce() + 'static) {
    let work: Work = Box::new(work);
    let now = PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if pending.collecting {
            pending.queue.push(work);
            None
        } else {
            Some(work)
        }
    });
    if let Some(work) = now {
        work();
    }
}

/// While alive, [`defer`] on this thread collects; when dropped, what was collected runs. Only
/// the outermost scope of a thread collects: nested ones change nothing.
pub struct Scope {
    outermost: bool,
}

impl Scope {
    pub fn enter() -> Scope {
        let outermost = PENDING.with(|pending| {
            let mut pending = pending.borrow_mut();
            !std::mem::replace(&mut pending.collecting, true)
        });
        Scope { outermost }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        let mut queue = PENDING.with(|pending| {
            let mut pending = pending.borrow_mut();
            pending.collecting = false;
            std::mem::take(&mut pending.queue)
        });
        for work in queue.drain(..) {
            if std::thread::panicking() {
                // The connection's poll panicked: its calls' traces still go to the recorder, and
                // a second panic here must not abort the process.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            } else {
                work();
            }
        }
        // The queue's buffer is kept for the next poll on this thread.
        PENDING.with(|pending| {
            let mut pending = pending.borrow_mut();
            if pending.queue.is_empty() {
                pending.queue = queue;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn log() -> (Rc<RefCell<Vec<&'static str>>>, impl Fn(&'static str)) {
        let log = Rc::new(RefCell::new(Vec::new()));
        let writer = log.clone();
        (log, move |entry| writer.borrow_mut().push(entry))
    }

    #[test]
    fn outside_a_scope_work_runs_at_once() {
        let (log, note) = log();
        let note = Rc::new(note);
        let inner = note.clone();
        defer(move || inner("deferred"));
        note("after");
        assert_eq!(*log.borrow(), ["deferred", "after"]);
    }

    #[test]
    fn inside_a_scope_work_runs_when_the_outermost_scope_ends() {
        let (log, note) = log();
        let note = Rc::new(note);
        {
            let _scope = Scope::enter();
            {
                let _nested = Scope::enter();
                let inner = note.clone();
                defer(move || inner("first"));
            }
            let inner = note.clone();
            defer(move || inner("second"));
            note("poll ends");
        }
        note("after");
        assert_eq!(*log.borrow(), ["poll ends", "first", "second", "after"]);
        // Work deferred while the collected work runs runs at once: nothing is left behind.
        let inner = note.clone();
        defer(move || inner("later"));
        assert_eq!(log.borrow().last(), Some(&"later"));
    }

    #[test]
    fn work_still_runs_when_the_poll_panics() {
        let ran = Rc::new(RefCell::new(false));
        let flag = ran.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _scope = Scope::enter();
            defer(move || *flag.borrow_mut() = true);
            panic!("the connection's poll panicked");
        }));
        assert!(result.is_err());
        assert!(*ran.borrow());
        // The thread collects again afterwards.
        let (log, note) = log();
        let note = Rc::new(note);
        {
            let _scope = Scope::enter();
            let inner = note.clone();
            defer(move || inner("deferred"));
            note("poll ends");
        }
        assert_eq!(*log.borrow(), ["poll ends", "deferred"]);
    }
}
