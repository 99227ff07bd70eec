//! Timers on the waits a slow or stalled peer could otherwise make endless, each a
//! wrapper so the code that reads or writes needs no timer of its own:
//!
//! - [`IdleBody`]: a body whose next frame does not come within its idle time fails
//!   with [`TimedOut`] — a client's request body (`limits.body_timeout`) and an
//!   upstream's response body (a route's `timeouts.idle`);
//! - [`SendTimed`]: a client connection on which a write makes no progress within
//!   `limits.send_timeout` fails (a client that does not read its answer);
//! - [`InFlight`]: the requests in flight on a connection, to close an HTTP/2
//!   connection that has had none for `limits.http2_idle_timeout`.
//!
//! Every timer that fires is counted in [`TIMEOUTS`] by [`Kind`], exposed in
//! `/metrics` as `canary_timeouts_total{kind}`. Each ends what it guards: the body's
//! error cuts the exchange (the upstream connection is then closed, never pooled),
//! the write error ends the client connection.
//!
//! The clock is only read when a wait begins (a `Pending` after progress), not per
//! frame or per write, and the timer is allocated once per body or connection.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Which wait timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `limits.header_timeout`: a request head not complete in time.
    Header,
    /// `limits.body_timeout`: a client's request body stalled.
    Body,
    /// `limits.send_timeout`: a client not reading its answer.
    Send,
    /// A route's `timeouts.idle`: an upstream stalled mid-response.
    UpstreamIdle,
    /// `limits.http2_idle_timeout`: an HTTP/2 connection without a request.
    Http2Idle,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Header,
        Kind::Body,
        Kind::Send,
        Kind::UpstreamIdle,
        Kind::Http2Idle,
    ];

    /// The `kind` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::Body => "body",
            Kind::Send => "send",
            Kind::UpstreamIdle => "upstream_idle",
            Kind::Http2Idle => "http2_idle",
        }
    }
}

/// Timeouts that fired, per [`Kind`], for the whole process (all workers, all
/// reloads): connection-level timers belong to no route.
pub struct Counts([AtomicU64; 5]);

/// The process's timeout counts.
pub static TIMEOUTS: Counts = Counts([
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
]);

impl Counts {
    pub fn record(&self, kind: Kind) {
        self.0[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Relaxed)
    }
}

/// The error of a wait that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut(pub Kind);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} timeout", self.0.label())
    }
}

impl StdError for TimedOut {}

impl TimedOut {
    /// Whether `e` (or what it wraps) is a timeout of `kind`.
    pub fn is(e: &(dyn StdError + 'static), kind: Kind) -> bool {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if e.downcast_ref::<TimedOut>() == Some(&TimedOut(kind)) {
                return true;
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if let Some(inner) = io.get_ref() {
                    if inner.downcast_ref::<TimedOut>() == Some(&TimedOut(kind)) {
                        return true;
                    }
                }
            }
            cur = e.source();
        }
        false
    }
}

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A timer that runs only while its owner waits: armed at the first `Pending` after
/// progress, disarmed by progress.
pub(crate) struct Stall {
    limit: Duration,
    kind: Kind,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Stall {
    pub(crate) fn new(limit: Duration, kind: Kind) -> Stall {
        Stall {
            limit,
            kind,
            sleep: None,
            armed: false,
        }
    }

    pub(crate) fn progress(&mut self) {
        self.armed = false;
    }

    /// Called on `Pending`: `Err` when the wait has lasted the limit.
    pub(crate) fn waiting(&mut self, cx: &mut Context<'_>) -> Result<(), TimedOut> {
        let deadline = if self.armed {
            None
        } else {
            self.armed = true;
            Some(Instant::now() + self.limit)
        };
        let sleep = match (&mut self.sleep, deadline) {
            (Some(s), Some(d)) => {
                s.as_mut().reset(d);
                s
            }
            (Some(s), None) => s,
            (None, d) => self.sleep.insert(Box::pin(tokio::time::sleep_until(
                d.unwrap_or_else(|| Instant::now() + self.limit),
            ))),
        };
        if sleep.as_mut().poll(cx).is_ready() {
            self.armed = false;
            TIMEOUTS.record(self.kind);
            return Err(TimedOut(self.kind));
        }
        Ok(())
    }
}

/// A body whose frames may not be further apart than its idle time while it is
/// being read. Time the reader spends elsewhere (a slow client of an upstream's
/// body) does not count: the timer runs only between a `Pending` and the next frame.
pub struct IdleBody<B> {
    inner: B,
    stall: Stall,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration, kind: Kind) -> IdleBody<B> {
        IdleBody {
            inner,
            stall: Stall::new(idle, kind),
        }
    }

    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.stall.progress();
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.stall.waiting(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes may not stall longer than the send timeout: a
/// write (or flush) that stays `Pending` that long fails with `TimedOut`, which ends
/// the connection. Reads pass through (their waits have timers of their own: the
/// header and body timeouts).
pub struct SendTimed<S> {
    inner: S,
    stall: Stall,
}

impl<S> SendTimed<S> {
    pub fn new(inner: S, limit: Duration) -> SendTimed<S> {
        SendTimed {
            inner,
            stall: Stall::new(limit, Kind::Send),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    fn check<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stall.progress();
                Poll::Ready(r)
            }
            Poll::Pending => match self.stall.waiting(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, e))),
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(r, cx)
    }
}

/// Requests in flight on one connection, and a wait for a stretch without any.
///
/// Why a clock reading and not a wake-up per request: the wait used to be woken (a
/// `Notify`) whenever the count changed, and armed a fresh timer each time the count
/// fell to zero: two wake-ups of the connection's task and a timer-wheel insert and
/// removal for every request (~1.3 k instructions of an HTTP/2 request;
/// docs/performance.md). Now the last request to finish notes the time, and the wait's
/// one timer, when it goes off, either finds the connection idle long enough or is
/// moved to the earliest moment it could be: about one wake-up per idle period,
/// whatever the request rate.
pub struct InFlight {
    count: AtomicUsize,
    /// When the count last fell to zero (or the connection began), in nanoseconds
    /// since `start`.
    idle_since: AtomicU64,
    start: Instant,
}

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight {
            count: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

/// One request in flight; dropped when its answer has been sent (or abandoned).
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Noted before the count falls, so a wait that sees no request in flight
        // also sees when the last one ended (the latest, if two end at once).
        let now = u64::try_from(self.0.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.idle_since.fetch_max(now, Relaxed);
        self.0.count.fetch_sub(1, Release);
    }
}

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Relaxed);
        InFlightGuard(self.clone())
    }

    /// Resolves once no request has been in flight for `idle` (then counted as an
    /// [`Kind::Http2Idle`] timeout).
    pub async fn idle_for(&self, idle: Duration) {
        let timer = tokio::time::sleep(idle);
        tokio::pin!(timer);
        loop {
            (&mut timer).await;
            let now = Instant::now();
            let next = if self.count.load(Acquire) == 0 {
                let since = self.start + Duration::from_nanos(self.idle_since.load(Relaxed));
                if now >= since + idle {
                    TIMEOUTS.record(Kind::Http2Idle);
                    return;
                }
                since + idle
            } else {
                // Not idle before the requests in flight end, and then not for `idle`.
                now + idle
            };
            timer.as_mut().reset(next);
        }
    }
}

/// A body that holds an [`InFlightGuard`] until it ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    guard: Option<InFlightGuard>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: InFlightGuard) -> Tracked<B> {
        Tracked {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    /// A body of one-byte frames, the i-th after `gaps_ms[i]` milliseconds.
    struct Gaps {
        gaps_ms: &'static [u64],
        next: usize,
        sleep: Option<Pin<Box<Sleep>>>,
    }

    impl Body for Gaps {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let Some(&gap) = self.gaps_ms.get(self.next) else {
                return Poll::Ready(None);
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(gap))));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            self.next += 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    fn frames(gaps_ms: &'static [u64]) -> Gaps {
        Gaps {
            gaps_ms,
            next: 0,
            sleep: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_may_be_slow_in_total_but_not_stall_between_frames() {
        let before = TIMEOUTS.get(Kind::Body);
        let body = IdleBody::new(
            frames(&[900, 900, 900, 900]),
            Duration::from_secs(1),
            Kind::Body,
        );
        let got = body
            .collect()
            .await
            .expect("no frame gap reaches the limit");
        assert_eq!(got.to_bytes().len(), 4);
        let body = IdleBody::new(frames(&[100, 1_100]), Duration::from_secs(1), Kind::Body);
        let err = body.collect().await.expect_err("a gap over the limit");
        assert!(TimedOut::is(&*err, Kind::Body), "{err}");
        assert!(TIMEOUTS.get(Kind::Body) > before);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_spends_elsewhere_does_not_count() {
        let mut body = IdleBody::new(
            frames(&[0, 0, 0]),
            Duration::from_secs(1),
            Kind::UpstreamIdle,
        );
        for _ in 0..3 {
            assert!(body.frame().await.unwrap().is_ok());
            // A slow client: the reader comes back much later.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_times_out() {
        let before = TIMEOUTS.get(Kind::Send);
        let (a, _b): (DuplexStream, DuplexStream) = tokio::io::duplex(64);
        let mut w = SendTimed::new(a, Duration::from_secs(2));
        // 64 bytes fit; nobody reads the rest.
        let err = w.write_all(&[0u8; 1024]).await.expect_err("stalled write");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(TimedOut::is(&err, Kind::Send), "{err}");
        assert!(TIMEOUTS.get(Kind::Send) > before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut() {
        let (a, mut b) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut n = 0;
            while n < 1024 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                n += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
        });
        let mut w = SendTimed::new(a, Duration::from_secs(2));
        w.write_all(&[0u8; 1024])
            .await
            .expect("progress every 500 ms");
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_flight_for_the_whole_time() {
        let f = Arc::new(InFlight::default());
        let g = f.enter();
        let waited = tokio::spawn({
            let f = f.clone();
            async move {
                let t = Instant::now();
                f.idle_for(Duration::from_secs(10)).await;
                t.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(g);
        let took = waited.await.unwrap();
        assert!(took >= Duration::from_secs(40), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let f = Arc::new(InFlight::default());
        let start = Instant::now();
        let waited = tokio::spawn({
            let f = f.clone();
            async move {
                f.idle_for(Duration::from_secs(10)).await;
                start.elapsed()
            }
        });
        // Two short requests, the second ending at 7 s: idle from then on.
        for at in [3, 6] {
            tokio::time::sleep_until(start + Duration::from_secs(at)).await;
            let g = f.enter();
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(g);
        }
        let took = waited.await.unwrap();
        assert!(
            took >= Duration::from_secs(17) && took < Duration::from_secs(18),
            "{took:?}"
        );
    }
}
