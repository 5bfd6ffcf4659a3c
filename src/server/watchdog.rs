//! When a client connection has waited too long: for a request head it started sending
//! (`server.header_read_timeout_ms`: no slowloris), or idle between calls
//! (`server.idle_timeout_ms`).
//!
//! hyper's own head timeout starts when it begins waiting for the next head, so it closed every
//! keep-alive connection after `header_read_timeout_ms` of quiet. Load balancers and client
//! pools keep idle connections for longer (AWS ALB 60 s, Go's client 90 s) and send their next
//! call on one whenever they like: a close racing that call fails it (a 502 from the balancer,
//! a reset for the client), and a client that calls once a minute paid a new TCP (and TLS)
//! handshake each time. And a connection that never sent a byte was never timed at all (hyper
//! waits for the first bytes to tell HTTP/1 from HTTP/2 before it starts its timer).
//!
//! The connection's reads and its calls are noted in a few atomics (a clock read once per call
//! and once per head); one timer per connection checks them, re-armed only when it fires.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Not yet: no head under way, or no call ended.
const NONE: u64 = u64::MAX;

/// What the watchdog decides when its timer fires.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is due: look again then.
    CheckAt(Instant),
    /// Idle past the idle timeout: close it gracefully.
    Idle,
    /// A head (or, on a new connection, the first byte) did not arrive in time: drop it.
    TooSlow,
}

/// One connection's reads and calls, as the watchdog reads them.
pub struct Activity {
    opened: Instant,
    head_timeout: Duration,
    idle_timeout: Duration,
    /// Calls in flight: from the request head until the response body is dropped.
    calls: AtomicUsize,
    /// ms after `opened` when the last call ended (`NONE`: the connection is new, its first
    /// head is due).
    quiet_since: AtomicU64,
    /// ms after `opened` when the first byte after the quiet came (`NONE`: none yet).
    head_from: AtomicU64,
    /// HTTP/2: bytes between calls are pings and settings, not a head.
    multiplexed: AtomicBool,
}

impl Activity {
    pub fn new(head_timeout: Duration, idle_timeout: Duration) -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            head_timeout,
            idle_timeout,
            calls: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(NONE),
            head_from: AtomicU64::new(NONE),
            multiplexed: AtomicBool::new(false),
        })
    }

    /// How often the watchdog looks at least: whatever starts between two looks (a head, the
    /// quiet after a call) is then due no later than one period after it.
    fn period(&self) -> Duration {
        self.head_timeout.min(self.idle_timeout)
    }

    /// When the watchdog first looks.
    pub fn first_check(&self) -> Instant {
        self.opened + self.period()
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.opened).as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// Bytes arrived. Only the first bytes after a quiet start a head: everything else (a call's
    /// body, the rest of a head, HTTP/2 frames) leaves the state as it is.
    fn on_read(&self, bytes: &[u8]) {
        if self.calls.load(Ordering::Acquire) > 0
            || self.head_from.load(Ordering::Relaxed) != NONE
            || self.multiplexed.load(Ordering::Relaxed)
        {
            return;
        }
        // A new connection's first bytes tell HTTP/2 (its preface) from HTTP/1.
        if self.quiet_since.load(Ordering::Acquire) == NONE && bytes.starts_with(b"PRI ") {
            self.multiplexed.store(true, Ordering::Relaxed);
            return;
        }
        self.head_from
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// A request head arrived: the call is in flight until the guard is dropped.
    pub fn call(self: &Arc<Activity>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::AcqRel);
        self.head_from.store(NONE, Ordering::Relaxed);
        CallGuard(self.clone())
    }

    pub fn verdict(&self, now: Instant) -> Verdict {
        let recheck = now + self.period();
        if self.calls.load(Ordering::Acquire) > 0 {
            // A call has its own deadline (`request_timeout_ms`).
            return Verdict::CheckAt(recheck);
        }
        let head = self.head_from.load(Ordering::Relaxed);
        let quiet = self.quiet_since.load(Ordering::Acquire);
        let (due, expired) = if head != NONE {
            (self.at(head) + self.head_timeout, Verdict::TooSlow)
        } else if quiet == NONE {
            (self.opened + self.head_timeout, Verdict::TooSlow)
        } else {
            (self.at(quiet) + self.idle_timeout, Verdict::Idle)
        };
        if now >= due {
            return expired;
        }
        // While quiet, a head may start any time: look again within a period.
        Verdict::CheckAt(due.min(recheck))
    }
}

/// Ends a call when dropped (the response body finished, or the call was abandoned).
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .quiet_since
            .store(activity.ms(Instant::now()), Ordering::Release);
        activity.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that ends its call when dropped.
pub struct Tracked<B> {
    body: B,
    _call: CallGuard,
}

impl<B> Tracked<B> {
    pub fn new(body: B, call: CallGuard) -> Tracked<B> {
        Tracked { body, _call: call }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's byte stream, its reads noted in `activity`.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_millis(300);
    const IDLE: Duration = Duration::from_millis(5000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// When the connection's last call ended.
    fn quiet_since(activity: &Activity) -> Instant {
        activity.at(activity.quiet_since.load(Ordering::Relaxed))
    }

    #[test]
    fn a_new_connection_owes_its_first_byte_within_the_head_timeout() {
        let activity = Activity::new(HEAD, IDLE);
        let opened = activity.opened;
        assert_eq!(
            activity.verdict(opened + ms(100)),
            Verdict::CheckAt(opened + HEAD)
        );
        assert_eq!(activity.verdict(opened + HEAD), Verdict::TooSlow);
    }

    #[test]
    fn between_calls_the_idle_timeout_applies_until_a_head_starts() {
        let activity = Activity::new(HEAD, IDLE);
        activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(activity.call());
        let quiet = quiet_since(&activity);
        // Quiet past the head timeout is fine; it is looked at every head timeout.
        let later = quiet + ms(1000);
        assert_eq!(activity.verdict(later), Verdict::CheckAt(later + HEAD));
        assert_eq!(activity.verdict(quiet + IDLE), Verdict::Idle);
        // A head that starts must end within the head timeout.
        activity.on_read(b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: ");
        let head = activity.at(activity.head_from.load(Ordering::Relaxed));
        assert_eq!(
            activity.verdict(head + ms(10)),
            Verdict::CheckAt(head + HEAD)
        );
        assert_eq!(activity.verdict(head + HEAD), Verdict::TooSlow);
    }

    #[test]
    fn a_call_in_flight_is_never_idle_nor_slow() {
        let activity = Activity::new(HEAD, IDLE);
        activity.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let call = activity.call();
        activity.on_read(b"request body bytes");
        let much_later = activity.opened + IDLE * 10;
        assert_eq!(
            activity.verdict(much_later),
            Verdict::CheckAt(much_later + HEAD)
        );
        drop(call);
        // Once it ended, the connection is idle from then on, its body bytes no head.
        let quiet = quiet_since(&activity);
        assert_eq!(activity.verdict(quiet + IDLE), Verdict::Idle);
    }

    #[test]
    fn http2_pings_between_calls_are_not_a_slow_head() {
        let activity = Activity::new(HEAD, IDLE);
        activity.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        drop(activity.call());
        activity.on_read(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00ping");
        let quiet = quiet_since(&activity);
        assert!(matches!(
            activity.verdict(quiet + ms(1000)),
            Verdict::CheckAt(_)
        ));
        assert_eq!(activity.verdict(quiet + IDLE), Verdict::Idle);
    }
}
