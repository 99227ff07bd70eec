//! One HTTP/1.1 connection to an upstream, and one caller's list of idle ones.
//!
//! A connection is popped from its list for an exchange and put back by the response
//! body when it has been read to its end; a connection is only ever used by the
//! worker (and so the tokio runtime) whose list it is in.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::client::SendError;
use crate::reuse::{now_ms, Reuse};
use crate::{fill, IDLE_TIMER, READ_CHUNK};

/// Idle connections kept per list; more are closed when they come back.
pub const MAX_IDLE: usize = 256;
/// An idle connection unused for this long is closed.
pub const IDLE_TIMEOUT_MS: u64 = 90_000;
/// An idle connection at the cold end is checked for a close by the upstream once it
/// has been idle this long.
pub(crate) const REAP_CHECK_MS: u64 = 1_000;
/// TCP keep-alive probes on upstream connections start after this idle time.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A byte stream an exchange can run on: read and written at once (the request body
/// is written while the answer is watched for), and asked, without blocking, whether
/// an idle one is still open. `TcpStream` is one; a TLS stream over one can be.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The reading half of [`split`](Io::split).
    type Reader<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    /// The writing half of [`split`](Io::split).
    type Writer<'a>: AsyncWrite + Unpin
    where
        Self: 'a;

    /// Borrows the two directions apart.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Whether an idle connection can take a request: not closed by the peer and with
    /// nothing unasked-for to read. Asked without blocking, each time a connection is
    /// taken from an idle list.
    fn check_idle(&self) -> IdleCheck;
}

/// What [`Io::check_idle`] found on an idle connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleCheck {
    /// Nothing to read: it can take a request.
    Quiet,
    /// Closed or reset by the upstream (its keep-alive timeout, a restart).
    Closed,
    /// Bytes nobody asked for: a late second answer, or more body than the last
    /// answer's framing said ([`crate::reuse`]).
    Unasked,
}

impl Io for TcpStream {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        TcpStream::split(self)
    }

    /// Asks the runtime's readiness first, so a connection whose readiness was
    /// cleared costs no system call; otherwise one `recv` of at most one byte into
    /// the stack (no allocation).
    fn check_idle(&self) -> IdleCheck {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_read_ready(&mut cx) {
            Poll::Pending => IdleCheck::Quiet,
            Poll::Ready(Err(_)) => IdleCheck::Closed,
            // Readable: the upstream closed it or sent bytes nobody asked for, or the
            // readiness is left over from the last response; a read tells which.
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                match self.try_read(&mut byte) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => IdleCheck::Quiet,
                    Ok(n) if n > 0 => IdleCheck::Unasked,
                    _ => IdleCheck::Closed,
                }
            }
        }
    }
}

/// Opens a TCP connection for HTTP/1.1 (no Nagle delay, TCP keep-alive probes).
pub async fn connect_tcp(addr: &str, connect_ms: u64) -> Result<TcpStream, SendError> {
    let stream = tokio::time::timeout(Duration::from_millis(connect_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::Connect("connect timed out".into()))?
        .map_err(|e| SendError::Connect(e.into()))?;
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(stream)
}

/// One HTTP/1.1 connection to an upstream.
pub(crate) struct Conn<S> {
    pub(crate) io: S,
    /// Read from the upstream, not yet consumed.
    pub(crate) rbuf: BytesMut,
    /// The request being written (kept for its capacity).
    pub(crate) wbuf: Vec<u8>,
    /// The request timeout's timer, kept with the connection (see [`crate::until`]).
    pub(crate) timer: Pin<Box<Sleep>>,
}

impl<S: Io> Conn<S> {
    /// Boxed: a connection is moved in and out of its idle list and through every
    /// exchange and response body; a pointer is cheaper to move than the connection.
    pub(crate) fn new(io: S) -> Box<Conn<S>> {
        Box::new(Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(512),
            timer: Box::pin(tokio::time::sleep(IDLE_TIMER)),
        })
    }

    /// Reads what the upstream has sent into `rbuf`; `Ok(0)` at the end of the stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        fill(Pin::new(&mut self.io), &mut self.rbuf, cx)
    }
}

/// One worker's idle connections to one upstream, most recently used last.
pub struct IdleList<S> {
    // Only the owning worker's thread takes this lock (one list per worker), so it
    // is never contended; it exists because lists are shared through the caller's
    // snapshot.
    conns: Mutex<Vec<Idle<S>>>,
    /// Whether this upstream's connections may be reused, shared with the other
    /// workers' lists to it.
    reuse: Arc<Reuse>,
}

struct Idle<S> {
    conn: Box<Conn<S>>,
    since_ms: u64,
}

/// A list with a [`Reuse`] of its own (one worker, or a test).
impl<S> Default for IdleList<S> {
    fn default() -> Self {
        IdleList::new(Arc::default())
    }
}

impl<S> fmt::Debug for IdleList<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleList")
            .field("idle", &self.len())
            .finish()
    }
}

impl<S> IdleList<S> {
    /// An empty list whose upstream's reuse state is `reuse` (one for all the
    /// workers' lists to the same upstream).
    pub fn new(reuse: Arc<Reuse>) -> Self {
        IdleList {
            conns: Mutex::new(Vec::new()),
            reuse,
        }
    }

    /// The upstream's reuse state.
    pub fn reuse(&self) -> &Reuse {
        &self.reuse
    }

    /// Idle connections held (for tests and debugging).
    pub fn len(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Io> IdleList<S> {
    /// A connection ready for a request, if one is idle and the upstream's
    /// connections may be reused. One with bytes waiting that nobody asked for is
    /// closed, and starts a hold-off ([`crate::reuse`]).
    pub(crate) fn pop(&self) -> Option<Box<Conn<S>>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.reuse.held_off() {
                // Idle ones too may be about to receive a late answer: close them.
                conns.clear();
                return None;
            }
            let idle = conns.pop()?;
            match idle.conn.io.check_idle() {
                IdleCheck::Quiet => return Some(idle.conn),
                IdleCheck::Closed => {}
                IdleCheck::Unasked => self.reuse.saw_unasked(),
            }
        }
    }

    /// Puts a connection back once its exchange has finished; closes it instead while
    /// the upstream's connections are not to be reused.
    pub(crate) fn push(&self, conn: Box<Conn<S>>) {
        if self.reuse.held_off() {
            return;
        }
        self.put_at(conn, now_ms());
    }

    /// The upstream sent bytes past a complete response on `conn`: it is closed.
    pub(crate) fn unasked(&self, conn: Box<Conn<S>>) {
        drop(conn);
        self.reuse.saw_unasked();
    }

    pub(crate) fn put_at(&self, conn: Box<Conn<S>>, now: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Reap from the cold end: the list is used LIFO, so the oldest idle is first.
        // One connection there the upstream has closed goes too, so closed idle
        // connections do not pile up while the hot end is busy; it is asked only once
        // it has been idle a while (a just-returned connection is rarely closed, and
        // asking costs ~1.5% of a request).
        while conns.first().is_some_and(|c| {
            let idle_ms = now.saturating_sub(c.since_ms);
            idle_ms > IDLE_TIMEOUT_MS
                || idle_ms >= REAP_CHECK_MS
                    && match c.conn.io.check_idle() {
                        IdleCheck::Quiet => false,
                        IdleCheck::Closed => true,
                        IdleCheck::Unasked => {
                            self.reuse.saw_unasked();
                            true
                        }
                    }
        }) {
            conns.remove(0);
        }
        if conns.len() < MAX_IDLE {
            conns.push(Idle {
                conn,
                since_ms: now,
            });
        }
    }
}
