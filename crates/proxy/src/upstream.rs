//! HTTP/1.1 upstream connections: the exchange itself, and a keep-alive pool per
//! instance and data-plane worker.
//!
//! Why this is written here rather than taken from hyper's client: with hyper's
//! `client::conn::http1`, every upstream connection is a task of its own, and each
//! request crosses into it and back through channels (an `mpsc` send, a `oneshot`
//! for the response, a want/give handshake, a body channel), with two task wake-ups
//! and the response head copied into hyper's message types on the way. Profiled, the
//! upstream side was ~44% of the instructions per proxied request (~16 k of 37 k,
//! `docs/performance.md`). Here the request's own task drives its connection: it
//! writes the head, streams the body, reads the response head with `httparse` (the
//! parser hyper itself uses) and hands the response body to the client side as it is
//! read from the socket. No task, no channel, no wake-up between the two sides. What
//! is hand-written is only the framing (RFC 9112 §6–7: `Content-Length`, chunked,
//! read-to-close), which no maintained crate offers on its own. HTTP/2 pools keep
//! hyper-util's client, which multiplexes (`pool::WorkerClients`).
//!
//! The pool: a connection is popped from the worker's list for the instance and put
//! back by the response body when it has been read to its end; a connection is only
//! ever used by the worker (and so the tokio runtime) that opened it.
//!
//! Keep-alive races: a request without a body whose pooled connection turns out to
//! be closed is sent on another connection: whatever the method when it could not be
//! written, and when it was written but the upstream closed without a byte of answer
//! only if it is idempotent (RFC 9110 §9.2.2), as nginx does. So an upstream's
//! keep-alive timeout never shows as a `502` blamed on its version. A request with a
//! body is never sent twice. An upstream that answers before it has read the whole
//! request body (a `413`, say) has its answer passed on; that connection is then
//! closed rather than reused.

use std::error::Error as StdError;
use std::fmt;
use std::future::{poll_fn, Future as _};
use std::io;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::pool::now_ms;

/// Idle connections kept per instance and worker; more are closed when they come back.
pub const MAX_IDLE: usize = 256;
/// An idle connection unused for this long is closed.
pub const IDLE_TIMEOUT_MS: u64 = 90_000;
/// An idle connection at the cold end is checked for a close by the upstream once it
/// has been idle this long.
const REAP_CHECK_MS: u64 = 1_000;
/// TCP keep-alive probes on upstream connections start after this idle time.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// The largest upstream response head (status line and header fields, and the same
/// for trailers); a larger one is a protocol error, a `502`.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The most header fields in an upstream response head (hyper's own limit).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the kernel per read.
pub(crate) const READ_CHUNK: usize = 8 * 1024;
/// Request bytes gathered before they are written; a larger body frame is written
/// as it is.
const WRITE_BATCH: usize = 16 * 1024;
/// Where a new connection's timer starts: far off, moved nearer by its first request.
const IDLE_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// An error on its way to the client side (logged, never shown to clients).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What an upstream request body must be (the proxy's is
/// [`UpstreamBody`](crate::forward::UpstreamBody)).
pub trait RequestBody: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send {}
impl<B> RequestBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + Send {}

/// One HTTP/1.1 connection to an upstream instance.
pub(crate) struct Conn {
    io: TcpStream,
    /// Read from the upstream, not yet consumed.
    rbuf: BytesMut,
    /// The request being written (kept for its capacity).
    wbuf: Vec<u8>,
    /// The request timeout's timer, kept with the connection (see [`until`]).
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    /// Boxed: a connection is moved in and out of its idle list and through every
    /// exchange and response body; a pointer is cheaper to move than the connection.
    fn new(io: TcpStream) -> Box<Conn> {
        Box::new(Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(512),
            timer: Box::pin(tokio::time::sleep(IDLE_TIMER)),
        })
    }

    /// Whether an idle connection can take a request: not closed by the upstream and
    /// with nothing unasked-for to read. Asks the runtime's readiness first, so a
    /// healthy connection costs no system call.
    fn still_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: the upstream closed it or sent bytes nobody asked for, or the
            // readiness is left over from the last response; a read tells which.
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the upstream has sent into `rbuf`; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        fill(Pin::new(&mut self.io), &mut self.rbuf, cx)
    }
}

/// Waits until `deadline` on a connection's timer: [`poll_until`] as a future.
pub(crate) async fn until(timer: &mut Pin<Box<Sleep>>, deadline: Instant) {
    poll_fn(|cx| poll_until(timer, deadline, cx)).await;
}

/// Whether `deadline` has passed, by a connection's timer. The timer is moved only
/// when it would go off too late; one that goes off early (it was set for an earlier
/// request) is moved on then. So on a busy connection the timer is re-armed about
/// once per timeout rather than armed and cancelled once per request (a wheel insert
/// and removal each time, ~3% of the instructions per request).
pub(crate) fn poll_until(
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    loop {
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}

pub(crate) fn fill<R: AsyncRead>(
    io: Pin<&mut R>,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// One worker's idle connections to one instance, most recently used last.
pub struct IdleList {
    // Only the owning worker's thread takes this lock (one list per worker), so it
    // is never contended; it exists because instances are shared through the snapshot.
    conns: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Box<Conn>,
    since_ms: u64,
}

impl Default for IdleList {
    fn default() -> Self {
        IdleList {
            conns: Mutex::new(Vec::new()),
        }
    }
}

impl fmt::Debug for IdleList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleList")
            .field("idle", &self.len())
            .finish()
    }
}

impl IdleList {
    /// A connection ready for a request, if one is idle.
    fn pop(&self) -> Option<Box<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(idle) = conns.pop() {
            if idle.conn.still_open() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Puts a connection back once its exchange has finished.
    fn push(&self, conn: Box<Conn>) {
        self.put_at(conn, now_ms());
    }

    fn put_at(&self, conn: Box<Conn>, now: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Reap from the cold end: the list is used LIFO, so the oldest idle is first.
        // One connection there the upstream has closed goes too, so closed idle
        // connections do not pile up while the hot end is busy; it is asked only once
        // it has been idle a while (a just-returned connection is rarely closed, and
        // asking costs ~1.5% of a request).
        while conns.first().is_some_and(|c| {
            let idle_ms = now.saturating_sub(c.since_ms);
            idle_ms > IDLE_TIMEOUT_MS || idle_ms >= REAP_CHECK_MS && !c.conn.still_open()
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

    /// Idle connections held (for tests and debugging).
    pub fn len(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, unreachable, name not resolved, or connect timeout.
    Connect(BoxError),
    /// The connection failed during the exchange (reset, closed early, bad response).
    Protocol(BoxError),
    /// No response head within the request timeout after the request was sent.
    Timeout,
    /// The client's request body broke off or failed: not the upstream's doing.
    ClientBody(BoxError),
}

impl StdError for SendError {}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Protocol(e) => write!(f, "{e}"),
            SendError::Timeout => write!(f, "no response within the request timeout"),
            SendError::ClientBody(e) => write!(f, "client body: {e}"),
        }
    }
}

/// Sends the request (`parts` and `body`) to `addr` on a pooled connection from
/// `idle`, or a new one.
///
/// The parts must be ready for the wire but for the target, which is written in
/// origin form (the authority of a `CONNECT`): hop-by-hop fields removed
/// (`forward::build_upstream_request`), `Host` in `extra` when the map has none; the
/// framing fields are written here from the body. The response's body gives the
/// connection back to `idle` when it has been read to its end; a response whose body
/// is dropped early, or a `101 Switching Protocols`, keeps its connection out of the
/// pool.
///
/// The request timeout of a request without a body runs from `now` on a pooled
/// connection (the request is written at once: one clock read less per request),
/// from when it was written on a new one.
pub async fn send<B: RequestBody>(
    idle: &Arc<IdleList>,
    addr: &str,
    connect_ms: u64,
    (now, timeout): (Instant, Duration),
    (parts, body): (&Parts, &mut B),
    extra: Extra<'_>,
) -> Result<Box<Response<PooledBody>>, SendError> {
    let bodiless = body.is_end_stream();
    while let Some(conn) = idle.pop() {
        match exchange(conn, (parts, extra), body, (Some(now), timeout), idle).await {
            Ok(resp) => return Ok(resp),
            Err(f) if bodiless && f.resend.allows(&parts.method) => {
                tracing::debug!(upstream = addr, error = %f.error, "pooled connection closed under a request; sending it again");
            }
            Err(f) => return Err(f.error),
        }
    }
    let conn = connect(addr, connect_ms).await?;
    exchange(conn, (parts, extra), body, (None, timeout), idle)
        .await
        .map_err(|f| f.error)
}

async fn connect(addr: &str, connect_ms: u64) -> Result<Box<Conn>, SendError> {
    let stream = tokio::time::timeout(Duration::from_millis(connect_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::Connect("connect timed out".into()))?
        .map_err(|e| SendError::Connect(e.into()))?;
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(Conn::new(stream))
}

/// An exchange that failed, and whether the request may be sent again elsewhere.
struct Failure {
    error: SendError,
    resend: Resend,
}

/// When a request without a body whose exchange failed may go to another connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    Never,
    /// Nothing of the request reached the connection: whatever the method.
    Unsent,
    /// The request was written and the upstream closed without a byte of answer:
    /// if the method is idempotent (RFC 9110 §9.2.2).
    Unanswered,
}

impl Resend {
    fn allows(self, method: &Method) -> bool {
        match self {
            Resend::Never => false,
            Resend::Unsent => true,
            Resend::Unanswered => method.is_idempotent(),
        }
    }
}

impl From<SendError> for Failure {
    fn from(error: SendError) -> Failure {
        Failure {
            error,
            resend: Resend::Never,
        }
    }
}

impl Failure {
    fn protocol(error: impl Into<BoxError>) -> Failure {
        SendError::Protocol(error.into()).into()
    }
}

/// How the request body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestFraming {
    /// No body (`Content-Length: 0` is written only if the client sent a length).
    Empty,
    Length(u64),
    Chunked,
}

/// One request and its response head on `conn`.
async fn exchange<B: RequestBody>(
    mut conn: Box<Conn>,
    (parts, extra): (&Parts, Extra<'_>),
    body: &mut B,
    (sent, timeout): (Option<Instant>, Duration),
    idle: &Arc<IdleList>,
) -> Result<Box<Response<PooledBody>>, Failure> {
    let framing = if body.is_end_stream() {
        RequestFraming::Empty
    } else {
        match body.size_hint().exact() {
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        }
    };
    encode_head(&mut conn.wbuf, parts, extra, framing);
    // Without a body (most requests): one write, whose failure leaves the request
    // unsent, then the answer. With one: the body is written while the answer is
    // watched for, as an upstream may answer before it has read it all.
    let (mut head, body_sent) = if framing == RequestFraming::Empty {
        if let Err(e) = conn.io.write_all(&conn.wbuf).await {
            return Err(Failure {
                error: SendError::Protocol(e.into()),
                resend: Resend::Unsent,
            });
        }
        let deadline = sent.unwrap_or_else(Instant::now) + timeout;
        let Conn {
            io, rbuf, timer, ..
        } = &mut *conn;
        let head = tokio::select! {
            biased;
            h = read_head(io, rbuf) => h?,
            () = until(timer, deadline) => return Err(SendError::Timeout.into()),
        };
        (head, true)
    } else {
        let Conn {
            io,
            rbuf,
            wbuf,
            timer,
        } = &mut *conn;
        let (mut rd, mut wr) = io.split();
        let write = write_body(&mut wr, wbuf, body, framing);
        let read = read_head(&mut rd, rbuf);
        tokio::pin!(write, read);
        // The request timeout runs from when the body has been sent whole (or its
        // writing failed), so a slow upload is not taken for a slow upstream.
        let mut deadline = None;
        let mut write_error = None;
        let head = loop {
            tokio::select! {
                biased;
                h = &mut read => break h,
                w = &mut write, if deadline.is_none() => {
                    deadline = Some(Instant::now() + timeout);
                    match w {
                        Ok(()) => {}
                        // The client's body broke off: the upstream would wait for the rest.
                        Err(WriteError::Body(e)) => return Err(SendError::ClientBody(e).into()),
                        // The upstream may have answered before it stopped reading: look.
                        Err(WriteError::Io(e)) => write_error = Some(e),
                    }
                },
                () = until(timer, deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Err(SendError::Timeout.into());
                }
            }
        };
        // A request with a body is never sent twice, so no failure here allows it.
        match (head, write_error) {
            (Ok(head), e) => (head, deadline.is_some() && e.is_none()),
            (Err(_), Some(e)) => return Err(Failure::protocol(e)),
            (Err(f), None) => return Err(f.error.into()),
        }
    };
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        if !parts.headers.contains_key(header::UPGRADE) {
            return Err(Failure::protocol(
                "101 Switching Protocols to a request without Upgrade",
            ));
        }
        return Ok(head.into_response(Inner::Upgrade(Some(conn))));
    }
    let (state, keep_alive) = response_framing(parts.method == Method::HEAD, &mut head);
    let mut body = Http1Body {
        conn: Some(conn),
        state,
        keep_alive: keep_alive && body_sent,
        idle: idle.clone(),
        error: None,
    };
    if body.state == State::Done {
        body.finish();
    }
    Ok(head.into_response(Inner::Http1(body)))
}

/// Writes the request line, the request's header fields and the `added` ones, then
/// the framing.
fn encode_head(out: &mut Vec<u8>, parts: &Parts, extra: Extra<'_>, framing: RequestFraming) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = match (parts.method == Method::CONNECT, parts.uri.authority()) {
        (true, Some(a)) => a.as_str(),
        _ => parts.uri.path_and_query().map_or("/", |p| p.as_str()),
    };
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in &parts.headers {
        // The framing is written below from the body itself, so it cannot disagree
        // with the bytes that follow.
        if *name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(host) = extra.host {
        write_field(out, b"host", host);
    }
    if let Some(raw) = extra.raw {
        let mut trailers = false;
        raw.write_fields(out, |name, value| {
            if not_forwarded(name) {
                had_length |= is_name(name, "content-length");
                trailers |= is_name(name, "te") && te_lists_trailers(value);
                return false;
            }
            true
        });
        if trailers {
            out.extend_from_slice(b"te: trailers\r\n");
        }
    }
    for (name, value) in extra.added {
        write_field(out, name.as_str().as_bytes(), value);
    }
    out.extend_from_slice(extra.fixed);
    match framing {
        RequestFraming::Empty if had_length => out.extend_from_slice(b"content-length: 0\r\n"),
        RequestFraming::Empty => {}
        RequestFraming::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the fields of a trailer section (between the last chunk and the blank line).
pub(crate) fn write_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    for (name, value) in trailers {
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Writes one header field line (the request's to the upstream, the answer's to the
/// client).
pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

enum WriteError {
    /// The client's body failed or did not match its length.
    Body(BoxError),
    /// Writing to the upstream failed.
    Io(io::Error),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// Writes the head in `out`, then the body in `framing`. What the body has ready is
/// gathered into one write (the head and a small body go out together).
async fn write_body<W: AsyncWrite + Unpin, B: RequestBody>(
    wr: &mut W,
    out: &mut Vec<u8>,
    body: &mut B,
    framing: RequestFraming,
) -> Result<(), WriteError> {
    let chunked = framing == RequestFraming::Chunked;
    let mut sent = 0u64;
    let mut trailers_sent = false;
    loop {
        let frame = match body.frame().now_or_never() {
            Some(f) if out.len() < WRITE_BATCH => f,
            ready => {
                // Nothing more ready now (or enough gathered): write, then wait.
                wr.write_all(out).await?;
                out.clear();
                match ready {
                    Some(f) => f,
                    None => body.frame().await,
                }
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => return Err(WriteError::Body(e.into())),
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                sent += data.len() as u64;
                if let RequestFraming::Length(n) = framing {
                    if sent > n {
                        return Err(WriteError::Body(
                            "request body longer than its length".into(),
                        ));
                    }
                }
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if data.len() >= WRITE_BATCH {
                    wr.write_all(out).await?;
                    out.clear();
                    wr.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    out.extend_from_slice(b"0\r\n");
                    write_trailers(out, &trailers);
                    out.extend_from_slice(b"\r\n");
                    trailers_sent = true;
                }
            }
        }
    }
    if let RequestFraming::Length(n) = framing {
        if sent != n {
            return Err(WriteError::Body(
                "request body shorter than its length".into(),
            ));
        }
    }
    if chunked && !trailers_sent {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    wr.write_all(out).await?;
    out.clear();
    Ok(())
}

/// A response head as read.
struct Head {
    status: StatusCode,
    version: Version,
    fields: Box<RawFields>,
    /// `Connection` lists `close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
    /// `Transfer-Encoding` was sent; `Some(true)` when its last coding is `chunked`.
    chunked: Option<bool>,
}

impl Head {
    /// The response, boxed: it is moved out of several async layers on its way to the
    /// client's writer (a `memcpy` of ~180 bytes each), where a box is a pointer.
    fn into_response(self, inner: Inner) -> Box<Response<PooledBody>> {
        let mut r = Box::new(Response::new(PooledBody {
            inner,
            fields: Some(self.fields),
        }));
        *r.status_mut() = self.status;
        *r.version_mut() = self.version;
        r
    }
}

/// Reads the response head, passing over interim `1xx` answers (but `101`).
async fn read_head<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Result<Head, Failure> {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf).map_err(Failure::protocol)? {
                Some(h)
                    if h.status.is_informational()
                        && h.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Some(h) => return Ok(h),
                None if buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(Failure::protocol("upstream response head too large"));
                }
                None => {}
            }
        }
        match std::future::poll_fn(|cx| fill(Pin::new(&mut *rd), buf, cx)).await {
            Ok(0) => {
                return Err(Failure {
                    error: SendError::Protocol(
                        "upstream closed the connection before the response ended".into(),
                    ),
                    resend: if received {
                        Resend::Never
                    } else {
                        Resend::Unanswered
                    },
                })
            }
            Ok(_) => received = true,
            Err(e) => {
                let reset = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                );
                return Err(Failure {
                    error: SendError::Protocol(e.into()),
                    resend: if reset && !received {
                        Resend::Unanswered
                    } else {
                        Resend::Never
                    },
                });
            }
        }
    }
}

/// Parses a response head at the start of `buf` and removes it from there; `None`
/// when it is not all in yet. The fields to pass on share the head's memory; the
/// hop-by-hop and framing ones are read here and left out (see [`RawFields`]).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, BoxError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // A `101` keeps `Connection` and `Upgrade`: they are the handshake.
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let (mut close, mut keep_alive, mut names_fields) = (false, false, false);
    let (mut length, mut chunked, mut has_date) = (None, None, false);
    let mut bad = None;
    let mut raw = Box::new(RawFields::EMPTY);
    let fits = raw.raw.fields.collect(buf, resp.headers, |h| {
        let name = h.name.as_bytes();
        let is = |n: &str| is_name(name, n);
        match name.len() {
            10 if is("connection") => {
                names_fields |= connection_tokens(h.value, &mut close, &mut keep_alive);
                upgrade
            }
            14 if is("content-length") => {
                for part in h.value.split(|&c| c == b',') {
                    match content_length(part.trim_ascii()) {
                        None => bad = Some("invalid Content-Length in the upstream response"),
                        Some(n) if length.is_some_and(|l| l != n) => {
                            bad =
                                Some("conflicting Content-Length values in the upstream response");
                        }
                        Some(n) => length = Some(n),
                    }
                }
                false
            }
            17 if is("transfer-encoding") => {
                // The last coding of the last line decides (RFC 9112 §6.3).
                let last = h.value.rsplit(|&c| c == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                false
            }
            7 if upgrade && is("upgrade") => true,
            // The proxy sets it on every answer: an upstream's own is replaced.
            16 if is("x-canary-version") => false,
            4 if is("date") => {
                has_date = true;
                true
            }
            _ => !hop_by_hop(name),
        }
    });
    if let Some(why) = bad {
        return Err(why.into());
    }
    if !fits {
        return Err("upstream response head too large".into());
    }
    if names_fields && !upgrade {
        // The fields `Connection` names are hop-by-hop too (RFC 9110 §7.6.1). Rare:
        // collected only when there are any.
        let named: Vec<&[u8]> = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&c| c == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        raw.raw.fields.retain(|p| {
            let name = &buf[p.name()];
            !named.iter().any(|t| t.eq_ignore_ascii_case(name))
        });
    }
    raw.raw.head = buf.split_to(len).freeze();
    raw.length = length;
    raw.has_date = has_date;
    Ok(Some(Head {
        status,
        version,
        fields: raw,
        close,
        keep_alive,
        chunked,
    }))
}

/// A `Content-Length` value: digits only, at most 19 of them (fits a `u64`).
fn content_length(v: &[u8]) -> Option<u64> {
    (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
        .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// An upstream response's fields as they are passed on: in the upstream's order and
/// letter case, sharing the head's memory, without the hop-by-hop and framing ones —
/// `Connection` and the fields it names, `Keep-Alive`, `Proxy-Connection`,
/// `Proxy-Authorization`, `TE`, `Upgrade` (all kept on a `101`), `Transfer-Encoding`
/// and `Content-Length` — and without `X-Canary-Version`, which the proxy sets on every
/// answer. The client side frames the answer itself, from the body and
/// [`length`](Self::length).
///
/// Why not a `HeaderMap`: building one (names looked up and lowercased, values
/// checked again, two allocations) and dropping it was ~2.6 k of ~21 k instructions
/// per request, for fields that are only ever written out again. Where a map is
/// needed (hyper's side of the client connection: h2c clients, requests with a body),
/// [`to_map`](Self::to_map) makes one.
#[derive(Debug)]
pub struct RawFields {
    raw: RawHead,
    /// The upstream's `Content-Length`, when the body is framed by it (for a `HEAD` or
    /// `304` answer: the length the body would have had).
    pub length: Option<u64>,
    /// A `Date` field is among them.
    pub has_date: bool,
    /// Fields the proxy adds, written after the upstream's (no map to allocate).
    added: [Option<AddedField>; 2],
}

/// A field the proxy adds to an answer.
#[derive(Clone, Debug)]
pub enum AddedField {
    /// A name and a whole value (`X-Canary-Version`).
    Value(&'static HeaderName, HeaderValue),
    /// `Set-Cookie` with a sticky id the proxy generated: `prefix` (`name=`, checked
    /// when the route was built), the id (hex digits), then [`STICKY_COOKIE_ATTRIBUTES`].
    /// Written in pieces; making it a `HeaderValue` first cost an allocation and a
    /// check of every byte per new visitor.
    StickyCookie { prefix: Bytes, id: [u8; 32] },
}

/// The attributes of a generated sticky cookie (docs/routing.md).
pub const STICKY_COOKIE_ATTRIBUTES: &str = canary_core::sticky_id::COOKIE_ATTRIBUTES;

impl AddedField {
    /// The field's name.
    pub fn name(&self) -> &'static HeaderName {
        match self {
            AddedField::Value(name, _) => name,
            AddedField::StickyCookie { .. } => &header::SET_COOKIE,
        }
    }

    /// The field's value (for a map).
    pub fn value(&self) -> HeaderValue {
        match self {
            AddedField::Value(_, v) => v.clone(),
            AddedField::StickyCookie { prefix, id } => {
                let mut v = Vec::with_capacity(128);
                write_cookie(&mut v, prefix, id);
                HeaderValue::from_maybe_shared(Bytes::from(v))
                    .expect("a checked cookie name, hex digits and fixed attributes")
            }
        }
    }

    /// Writes the field line.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        match self {
            AddedField::Value(name, v) => write_field(out, name.as_str().as_bytes(), v.as_bytes()),
            AddedField::StickyCookie { prefix, id } => {
                out.extend_from_slice(b"set-cookie: ");
                write_cookie(out, prefix, id);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// A generated sticky cookie's value: `name=`, the id, the attributes.
fn write_cookie(out: &mut Vec<u8>, prefix: &[u8], id: &[u8; 32]) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(id);
    out.extend_from_slice(STICKY_COOKIE_ATTRIBUTES.as_bytes());
}

impl RawFields {
    /// No fields.
    pub const EMPTY: RawFields = RawFields {
        raw: RawHead::EMPTY,
        length: None,
        has_date: false,
        added: [None, None],
    };

    /// The upstream's fields, `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.raw.iter()
    }

    /// Writes the upstream's fields, as [`RawHead::write_fields`] does.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        self.raw.write_fields(out, |_, _| true);
    }

    /// The fields the proxy added, in order.
    pub fn added(&self) -> impl Iterator<Item = &AddedField> {
        self.added.iter().flatten()
    }

    /// Adds a field after the upstream's; gives it back when there is no room.
    pub(crate) fn add(&mut self, field: AddedField) -> Result<(), AddedField> {
        match self.added.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some(field);
                Ok(())
            }
            None => Err(field),
        }
    }

    /// Whether there are none (and no length).
    pub fn is_empty(&self) -> bool {
        self.raw.fields.places().is_empty()
            && self.length.is_none()
            && self.added.iter().all(Option::is_none)
    }

    /// The fields as a map (names lowercased), with `Content-Length` when there is one.
    /// `httparse` checked them with the rules `http` has; one `http` refused anyway
    /// would be left out.
    pub fn to_map(&self) -> HeaderMap {
        let mut map = self.raw.to_map();
        if let Some(n) = self.length {
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        for field in self.added() {
            map.append(field.name().clone(), field.value());
        }
        map
    }

    /// The fields of a response head (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn of(head: &[u8]) -> RawFields {
        let mut buf = BytesMut::from(head);
        *parse_head(&mut buf).unwrap().unwrap().fields
    }
}

/// A request head the proxy read itself (`h1`): its fields as places in it,
/// in the client's order and letter case, `Connection` left out (the reader takes no
/// request whose `Connection` names anything). Such a request's `HeaderMap` is empty;
/// lookups scan the few fields (cheaper than building and hashing a map), and the
/// exchange writes them less what the proxy sets or removes ([`Extra`]).
#[derive(Debug)]
pub struct RawHead {
    pub(crate) head: Bytes,
    pub(crate) fields: Fields,
}

impl RawHead {
    pub(crate) const EMPTY: RawHead = RawHead {
        head: Bytes::new(),
        fields: Fields::EMPTY,
    };

    /// The fields, `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .places()
            .iter()
            .map(|p| (&self.head[p.name()], &self.head[p.value()]))
    }

    /// Writes the fields `keep` lets through as `name: value` lines, in order: the same
    /// bytes as [`write_field`] for each, but lines that came in exactly that form and
    /// follow each other in the head are copied as one run (a browser's dozen request
    /// fields are then a few copies instead of four per field).
    pub(crate) fn write_fields(
        &self,
        out: &mut Vec<u8>,
        mut keep: impl FnMut(&[u8], &[u8]) -> bool,
    ) {
        let head = &self.head[..];
        let mut run: Option<(usize, usize)> = None; // a span of `head` to copy as it is
        for p in self.fields.places() {
            let (n, v) = (p.name(), p.value());
            let (name, value) = (&head[n.clone()], &head[v.clone()]);
            if !keep(name, value) {
                continue;
            }
            let end = v.end + 2;
            let as_written = v.start == n.end + 2
                && &head[n.end..v.start] == b": "
                && head.get(v.end..end) == Some(&b"\r\n"[..]);
            match run {
                Some((_, ref mut e)) if as_written && *e == n.start => *e = end,
                _ => {
                    if let Some((s, e)) = run.take() {
                        out.extend_from_slice(&head[s..e]);
                    }
                    if as_written {
                        run = Some((n.start, end));
                    } else {
                        write_field(out, name, value);
                    }
                }
            }
        }
        if let Some((s, e)) = run {
            out.extend_from_slice(&head[s..e]);
        }
    }

    /// The values of the fields named `name` (any letter case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The fields as a map (a request's for an HTTP/2 upstream, an answer's for hyper's
    /// side of the client); a field `http` refuses is left out.
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.places().len());
        for p in self.fields.places() {
            match (
                HeaderName::from_bytes(&self.head[p.name()]),
                HeaderValue::from_maybe_shared(self.head.slice(p.value())),
            ) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => tracing::debug!("a field the http crate refuses was left out"),
            }
        }
        map
    }
}

/// What an upstream request carries besides its own `HeaderMap`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extra<'a> {
    /// `Host`, written after the map's fields (the map then has none).
    pub host: Option<&'a [u8]>,
    /// A request head the proxy read itself: its fields are written too, less the
    /// hop-by-hop ones, the framing, `Host` and those the proxy sets.
    pub raw: Option<&'a RawHead>,
    /// The proxy's fields (`X-Forwarded-*`, `X-Canary-*`), written last: `added` one
    /// by one, then `fixed`, lines already written out.
    pub added: &'a [(&'a HeaderName, &'a [u8])],
    pub fixed: &'a [u8],
}

/// Whether a field is hop-by-hop (RFC 9110 §7.6.1): for one connection only, never
/// passed on. (So are the fields a `Connection` names; those are found where it is read.)
pub(crate) fn hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &str| is_name(name, n);
    match name.len() {
        2 => is("te"),
        7 => is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// Whether `name`, a field name or value as `httparse` accepted it, is `lower`
/// (lowercase letters, digits and `-`) in any letter case. For the bytes `httparse`
/// lets through (no CR, LF or other control but HTAB), setting bit `0x20` lowercases
/// a letter and turns no other byte into one `lower` may hold, so one branch-free
/// pass decides; `eq_ignore_ascii_case` folds both sides byte by byte, and the field
/// names of every request and response are compared against a dozen names (~2% of a
/// request's instructions).
#[inline]
pub(crate) fn is_name(name: &[u8], lower: &str) -> bool {
    debug_assert!(lower
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower.as_bytes())
            .fold(0, |diff, (&c, &l)| diff | ((c | 0x20) ^ l))
            == 0
}

/// Whether a field of a request the proxy read is left out of what goes upstream:
/// hop-by-hop, framing (written from the body), `Host` (written from the request's
/// host), and the fields the proxy sets itself.
pub(crate) fn not_forwarded(name: &[u8]) -> bool {
    let is = |n: &str| is_name(name, n);
    hop_by_hop(name)
        || match name.len() {
            4 => is("host"),
            14 => is("content-length") || is("x-canary-route"),
            15 => is("x-forwarded-for"),
            16 => is("x-canary-version") || is("x-forwarded-host"),
            17 => is("x-forwarded-proto"),
            _ => false,
        }
}

/// Whether a `TE` value lists `trailers` (the one coding that may pass).
pub(crate) fn te_lists_trailers(v: &[u8]) -> bool {
    v.split(|&c| c == b',').any(|t| {
        t.split(|&c| c == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii()
            .eq_ignore_ascii_case(b"trailers")
    })
}

/// A field's place in its head's buffer: where its name and its value are. Offsets
/// are `u32` (a head is far smaller: `limits.max_header_bytes` is at most 1 GiB, an
/// upstream's head at most [`MAX_RESPONSE_HEAD`]; [`Fields::collect`] refuses a larger
/// buffer), which halves what every head's inline places cost to clear and copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Place {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

impl Place {
    const EMPTY: Place = Place {
        name: 0,
        name_len: 0,
        value: 0,
        value_len: 0,
    };

    /// Where the name is.
    pub(crate) fn name(&self) -> std::ops::Range<usize> {
        self.name as usize..(self.name + self.name_len) as usize
    }

    /// Where the value is.
    pub(crate) fn value(&self) -> std::ops::Range<usize> {
        self.value as usize..(self.value + self.value_len) as usize
    }
}

/// Fields a head usually has at most: their places fit inline.
const FEW_FIELDS: usize = 16;

/// Where a parsed head's fields are in its buffer, so that their values can be
/// slices of the head once it is split off (no copy). Most heads have a few fields:
/// their places fit inline, with no allocation of their own (room for all 100 would
/// cost more to clear than the parse).
#[derive(Debug)]
pub(crate) struct Fields {
    few: [Place; FEW_FIELDS],
    n: usize,
    many: Vec<Place>,
}

impl Fields {
    pub(crate) const EMPTY: Fields = Fields {
        few: [Place::EMPTY; FEW_FIELDS],
        n: 0,
        many: Vec::new(),
    };

    /// Replaces the places with those of the fields of `parsed` (parsed from `buf`)
    /// that `keep` wants. In place: `Fields` is large, and moving it costs. `false`
    /// (and no places) when `buf` is too large for a [`Place`]'s offsets.
    #[must_use]
    pub(crate) fn collect(
        &mut self,
        buf: &[u8],
        parsed: &[httparse::Header<'_>],
        mut keep: impl FnMut(&httparse::Header<'_>) -> bool,
    ) -> bool {
        self.n = 0;
        self.many.clear();
        if u32::try_from(buf.len()).is_err() {
            return false;
        }
        let base = buf.as_ptr() as usize;
        // Every offset and length is within `buf`, so below `u32::MAX` (checked above).
        let place = |h: &httparse::Header<'_>| Place {
            name: (h.name.as_ptr() as usize - base) as u32,
            name_len: h.name.len() as u32,
            value: (h.value.as_ptr() as usize - base) as u32,
            value_len: h.value.len() as u32,
        };
        if parsed.len() <= FEW_FIELDS {
            for h in parsed.iter().filter(|h| keep(h)) {
                self.few[self.n] = place(h);
                self.n += 1;
            }
        } else {
            self.many
                .extend(parsed.iter().filter(|h| keep(h)).map(place));
        }
        true
    }

    /// The places, in order.
    pub(crate) fn places(&self) -> &[Place] {
        if self.many.is_empty() {
            &self.few[..self.n]
        } else {
            &self.many[..]
        }
    }

    /// Keeps the places `keep` wants.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Place) -> bool) {
        if self.many.is_empty() {
            let mut n = 0;
            for i in 0..self.n {
                if keep(&self.few[i]) {
                    self.few[n] = self.few[i];
                    n += 1;
                }
            }
            self.n = n;
        } else {
            self.many.retain(keep);
        }
    }
}

/// Reads the tokens of a `Connection` value: sets `close` and `keep_alive` when they
/// are listed, and returns whether it lists anything else (`upgrade`, or fields to
/// remove).
pub(crate) fn connection_tokens(value: &[u8], close: &mut bool, keep_alive: &mut bool) -> bool {
    // The usual values first, without splitting.
    if is_name(value, "keep-alive") {
        *keep_alive = true;
        return false;
    }
    if is_name(value, "close") {
        *close = true;
        return false;
    }
    let mut other = false;
    for t in value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
        if t.eq_ignore_ascii_case(b"close") {
            *close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            *keep_alive = true;
        } else {
            other |= !t.is_empty();
        }
    }
    other
}

/// How the response body is delimited (RFC 9112 §6.3), and whether the connection
/// may carry another request after it.
fn response_framing(is_head: bool, head: &mut Head) -> (State, bool) {
    let mut keep_alive = match head.version {
        Version::HTTP_11 => !head.close,
        _ => head.keep_alive && !head.close,
    };
    if is_head || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return (State::Done, keep_alive);
    }
    if let Some(chunked) = head.chunked {
        // Transfer-Encoding overrides a Content-Length, and such a message may be an
        // attempt at smuggling: the connection is not used again (§6.1).
        if head.fields.length.take().is_some() {
            keep_alive = false;
        }
        return if chunked {
            (State::Chunked(Chunk::Size), keep_alive)
        } else {
            (State::Close, false)
        };
    }
    match head.fields.length {
        Some(0) => (State::Done, keep_alive),
        Some(n) => (State::Length(n), keep_alive),
        None => (State::Close, false),
    }
}

/// The body of every answer the proxy gives: an upstream response's (an HTTP/1.1 one
/// returns its connection to the pool at its end) or a short text of the proxy's own
/// ([`PooledBody::fixed`]).
pub struct PooledBody {
    inner: Inner,
    /// The upstream's fields to pass on (HTTP/1.1; an HTTP/2 response has its own in
    /// its `HeaderMap`). Boxed, as a response is moved several times on its way.
    fields: Option<Box<RawFields>>,
}

enum Inner {
    /// From an HTTP/2 pool (hyper's client).
    Http2(Incoming),
    /// From one of this module's connections.
    Http1(Http1Body),
    /// A `101 Switching Protocols`: no body; the connection goes to the tunnel.
    Upgrade(Option<Box<Conn>>),
    /// A short body the proxy wrote itself (an error answer); `None` once sent.
    Fixed(Option<Bytes>),
}

impl PooledBody {
    /// A short body of the proxy's own (an error answer's text).
    pub fn fixed(text: &'static str) -> PooledBody {
        PooledBody {
            inner: Inner::Fixed(Some(Bytes::from_static(text.as_bytes()))),
            fields: None,
        }
    }

    /// A body from an HTTP/2 pool, whose connections hyper keeps.
    pub fn unpooled(inner: Incoming) -> PooledBody {
        PooledBody {
            inner: Inner::Http2(inner),
            fields: None,
        }
    }

    /// The upstream's fields, to be written before the response's `HeaderMap`.
    pub fn take_fields(&mut self) -> Option<Box<RawFields>> {
        self.fields.take()
    }

    /// Adds a field the proxy sets after the upstream's own, when the response has a
    /// head of its own (an HTTP/1.1 upstream's); gives the value back otherwise (an
    /// HTTP/2 response, whose fields are in its map) or when there is no more room.
    pub fn add_field(&mut self, field: AddedField) -> Result<(), AddedField> {
        match &mut self.fields {
            Some(fields) => fields.add(field),
            None => Err(field),
        }
    }

    /// After a `101 Switching Protocols`: the upstream connection, and what the
    /// upstream already sent past the response head.
    pub fn take_upgrade(&mut self) -> Option<(TcpStream, Bytes)> {
        match &mut self.inner {
            Inner::Upgrade(conn) => conn.take().map(|c| (c.io, c.rbuf.freeze())),
            _ => None,
        }
    }
}

impl fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Inner::Http2(_) => "http2",
            Inner::Http1(_) => "http1",
            Inner::Upgrade(_) => "upgrade",
            Inner::Fixed(_) => "fixed",
        };
        f.debug_struct("PooledBody").field("kind", &kind).finish()
    }
}

/// Where an HTTP/1.1 response body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// This many bytes to go.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data to go.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

struct Http1Body {
    /// `None` once given back or dropped.
    conn: Option<Box<Conn>>,
    state: State,
    keep_alive: bool,
    idle: Arc<IdleList>,
    /// The body broke off: reported at the next poll (see [`Http1Body::fail`]).
    error: Option<BoxError>,
}

/// What one step of decoding gave.
enum Step {
    Frame(Frame<Bytes>),
    /// The body has ended.
    End,
    /// More bytes are needed.
    More,
    /// The state moved on; step again.
    Again,
}

impl Http1Body {
    /// The body has been read to its end: give the connection back when it can
    /// carry another request (nothing read past the body).
    /// The body broke off. The error is held back one poll: the client side may
    /// still hold the data read just before in its buffer, and an error now would
    /// make it drop that and close at once; after a `Pending` it writes what it has.
    /// The connection, in an unknown state, is closed.
    fn fail(
        &mut self,
        e: BoxError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.error = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.rbuf.is_empty() {
                self.idle.push(conn);
            }
        }
    }
}

/// One step of reading a body from `buf`.
fn step(state: &mut State, buf: &mut BytesMut) -> Result<Step, BoxError> {
    Ok(match state {
        State::Done => Step::End,
        State::Length(_) | State::Close if buf.is_empty() => Step::More,
        State::Close => Step::Frame(Frame::data(buf.split().freeze())),
        State::Length(left) => {
            let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= take as u64;
            Step::Frame(Frame::data(buf.split_to(take).freeze()))
        }
        State::Chunked(chunk) => {
            let step = step_chunked(chunk, buf)?;
            // The common end of a chunked body, already read with its last chunk:
            // end now, so the client side sees the end with the last data.
            if matches!(step, Step::Frame(_))
                && *chunk == Chunk::DataEnd
                && buf.starts_with(b"\r\n0\r\n\r\n")
            {
                buf.advance(7);
                *state = State::Done;
            }
            step
        }
    })
}

/// One step of chunked decoding (RFC 9112 §7.1).
fn step_chunked(chunk: &mut Chunk, buf: &mut BytesMut) -> Result<Step, BoxError> {
    match *chunk {
        Chunk::Size => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            if !buf[0].is_ascii_hexdigit() {
                return Err("invalid chunk size from the upstream".into());
            }
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    buf.advance(used);
                    *chunk = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                    Ok(Step::Again)
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => Ok(Step::More),
                _ => Err("invalid chunk size from the upstream".into()),
            }
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let left = left - take as u64;
            *chunk = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
            Ok(Step::Frame(Frame::data(buf.split_to(take).freeze())))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data longer than its size from the upstream".into());
            }
            buf.advance(2);
            *chunk = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End);
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut fields)? {
                httparse::Status::Complete((used, fields)) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for f in fields.iter() {
                        trailers.append(
                            HeaderName::from_bytes(f.name.as_bytes())?,
                            HeaderValue::from_bytes(f.value)?,
                        );
                    }
                    buf.advance(used);
                    Ok(Step::Frame(Frame::trailers(trailers)))
                }
                httparse::Status::Partial if buf.len() < MAX_RESPONSE_HEAD => Ok(Step::More),
                httparse::Status::Partial => Err("upstream trailers too large".into()),
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let body = match &mut self.inner {
            Inner::Http2(b) => return Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Upgrade(_) => return Poll::Ready(None),
            Inner::Fixed(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Http1(b) => b,
        };
        loop {
            if let Some(e) = body.error.take() {
                return Poll::Ready(Some(Err(e)));
            }
            let Some(conn) = body.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match step(&mut body.state, &mut conn.rbuf) {
                Ok(Step::Frame(f)) => {
                    if matches!(body.state, State::Length(0) | State::Done) || f.is_trailers() {
                        // The last byte: give the connection back now, as the client
                        // side stops polling a body whose length it has seen end.
                        body.finish();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    body.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Again) => continue,
                Ok(Step::More) => {}
                Err(e) => return body.fail(e, cx),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if body.state == State::Close => {
                    body.state = State::Done;
                    body.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return body.fail(
                        "upstream closed the connection before the body ended".into(),
                        cx,
                    );
                }
                Ok(_) => {}
                Err(e) => return body.fail(e.into(), cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http2(b) => b.is_end_stream(),
            Inner::Upgrade(_) => true,
            Inner::Fixed(b) => b.is_none(),
            Inner::Http1(b) => b.state == State::Done || b.state == State::Length(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http2(b) => b.size_hint(),
            Inner::Upgrade(_) => SizeHint::with_exact(0),
            Inner::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Http1(b) => match b.state {
                State::Length(n) => SizeHint::with_exact(n),
                State::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How a test upstream ends its connections.
    #[derive(Clone, Copy)]
    enum Close {
        /// Right after the nth answer, without `Connection: close` (an idle timeout).
        AfterAnswers(usize),
        /// When a request arrives after the nth answer, leaving it unanswered: the race
        /// of an upstream closing an idle connection while a request is on its way.
        OnRequestAfter(usize),
    }

    const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    /// A raw HTTP/1.1 server that answers each request with `hello` until `close`
    /// says otherwise. Counts accepted connections.
    async fn server(close: Close) -> (String, Arc<AtomicUsize>) {
        let up = upstream(move |i, _| match close {
            Close::AfterAnswers(n) if i + 1 == n => Reply::AnswerThenClose(HELLO),
            Close::OnRequestAfter(n) if i == n => Reply::Close,
            _ => Reply::Answer(HELLO),
        })
        .await;
        (up.addr, up.accepted)
    }

    /// What a test upstream does with the `i`th request (from 0) of a connection.
    enum Reply {
        Answer(&'static [u8]),
        /// Answers a byte at a time, each written on its own.
        Trickle(&'static [u8]),
        AnswerThenClose(&'static [u8]),
        /// Leaves this request unanswered and goes on reading.
        Ignore,
        /// Closes the connection, this request unanswered.
        Close,
    }

    struct TestUpstream {
        addr: String,
        /// Every request read, as it came.
        seen: Arc<Mutex<Vec<u8>>>,
        accepted: Arc<AtomicUsize>,
    }

    /// A raw HTTP/1.1 upstream: each whole request (its head, and a body framed by
    /// `content-length` or chunked) gets what `reply(i, request)` says.
    async fn upstream(
        reply: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static,
    ) -> TestUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (seen2, count, reply) = (seen.clone(), accepted.clone(), Arc::new(reply));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, SeqCst);
                let (seen, reply) = (seen2.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut i = 0;
                    loop {
                        while let Some(len) = request_len(&buf) {
                            let req: Vec<u8> = buf.drain(..len).collect();
                            seen.lock().unwrap().extend_from_slice(&req);
                            let r = reply(i, &req);
                            i += 1;
                            let ok = match r {
                                Reply::Answer(a) | Reply::AnswerThenClose(a) => {
                                    s.write_all(a).await.is_ok()
                                }
                                Reply::Trickle(a) => {
                                    let mut ok = true;
                                    for b in a {
                                        ok = ok && s.write_all(&[*b]).await.is_ok();
                                        ok = ok && s.flush().await.is_ok();
                                    }
                                    ok
                                }
                                Reply::Ignore => true,
                                Reply::Close => false,
                            };
                            if !ok || matches!(r, Reply::AnswerThenClose(_)) {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        TestUpstream {
            addr,
            seen,
            accepted,
        }
    }

    type Idle = IdleList;

    /// The request timeout of the tests that are not about it.
    const T: Duration = Duration::from_secs(10);

    fn get() -> Request<Empty<Bytes>> {
        Request::get("/")
            .header("host", "x")
            .body(Empty::new())
            .unwrap()
    }

    /// `send` with the tests' connect timeout (1 s) and request timeout `T`, and no
    /// fields besides the request's own.
    async fn send_plain<B: RequestBody>(
        idle: &Arc<IdleList>,
        addr: &str,
        req: Request<B>,
    ) -> Result<Response<PooledBody>, SendError> {
        send_within(idle, addr, T, req).await
    }

    /// [`send_plain`] with request timeout `timeout`.
    async fn send_within<B: RequestBody>(
        idle: &Arc<IdleList>,
        addr: &str,
        timeout: Duration,
        req: Request<B>,
    ) -> Result<Response<PooledBody>, SendError> {
        let (parts, mut body) = req.into_parts();
        send(
            idle,
            addr,
            1000,
            (Instant::now(), timeout),
            (&parts, &mut body),
            Extra::default(),
        )
        .await
        .map(|r| *r)
    }

    async fn body(resp: Response<PooledBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_fixed_body_is_its_text_once_with_an_exact_length() {
        let b = PooledBody::fixed("no route for this request\n");
        assert_eq!(b.size_hint().exact(), Some(26));
        assert!(!b.is_end_stream());
        let mut b = std::pin::pin!(b);
        let frame = poll_fn(|cx| b.as_mut().poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "no route for this request\n");
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
        assert!(poll_fn(|cx| b.as_mut().poll_frame(cx)).await.is_none());
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_body_has_been_read() {
        let (addr, accepted) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        for _ in 0..5 {
            let resp = send_plain(&idle, &addr, get()).await.unwrap();
            assert_eq!(body(resp).await, "hello");
            assert_eq!(idle.len(), 1);
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_whose_body_is_dropped_unread_does_not_return_its_connection() {
        let (addr, accepted) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        drop(resp);
        assert!(idle.is_empty());
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(body(resp).await, "hello");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
        let (addr, accepted) = server(Close::AfterAnswers(1)).await;
        let idle = Arc::new(Idle::default());
        for _ in 0..3 {
            let resp = send_plain(&idle, &addr, get()).await.unwrap();
            assert_eq!(body(resp).await, "hello");
            // Let the event loop see the upstream's close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(SeqCst), 3);
    }

    /// Regression: such a request got a 502 (`connection closed before message
    /// completed`), counted against the version, though the upstream never saw it.
    #[tokio::test]
    async fn a_get_on_a_pooled_connection_the_upstream_closes_under_it_is_sent_again() {
        let (addr, accepted) = server(Close::OnRequestAfter(1)).await;
        let idle = Arc::new(Idle::default());
        for i in 0..5 {
            let resp = send_plain(&idle, &addr, get()).await;
            let resp = resp.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(body(resp).await, "hello");
        }
        // Every request after the first was written to a pooled connection that then
        // closed, and was sent again on a new one.
        assert_eq!(accepted.load(SeqCst), 5);
    }

    #[tokio::test]
    async fn a_request_with_a_body_or_not_idempotent_is_not_sent_twice() {
        let (addr, _) = server(Close::OnRequestAfter(1)).await;
        let post = || {
            Request::post("/")
                .header("host", "x")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let idle = Arc::new(Idle::default());
        body(send_plain(&idle, &addr, post()).await.unwrap()).await;
        let err = send_plain(&idle, &addr, post()).await.unwrap_err();
        assert!(matches!(err, SendError::Protocol(_)), "{err}");
        let with_body = || {
            Request::put("/")
                .header("host", "x")
                .body(http_body_util::Full::new(Bytes::from_static(b"x")))
                .unwrap()
        };
        let idle = Arc::new(Idle::default());
        body(send_plain(&idle, &addr, with_body()).await.unwrap()).await;
        let err = send_plain(&idle, &addr, with_body()).await.unwrap_err();
        assert!(matches!(err, SendError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let idle = Arc::new(Idle::default());
        let err = send_plain(&idle, &addr, get()).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn idle_connections_older_than_the_idle_timeout_are_closed() {
        let (addr, _) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        idle.put_at(connect(&addr, 1000).await.unwrap(), 0);
        idle.put_at(connect(&addr, 1000).await.unwrap(), IDLE_TIMEOUT_MS);
        assert_eq!(idle.len(), 2, "not older than the timeout yet");
        idle.put_at(connect(&addr, 1000).await.unwrap(), IDLE_TIMEOUT_MS + 1);
        assert_eq!(idle.len(), 2, "the first one is reaped");
    }

    #[tokio::test]
    async fn a_closed_connection_at_the_cold_end_is_reaped_once_idle_a_while() {
        let (addr, _) = server(Close::AfterAnswers(usize::MAX)).await;
        let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = connect(&closing.local_addr().unwrap().to_string(), 1000)
            .await
            .unwrap();
        drop(closing.accept().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = Arc::new(Idle::default());
        idle.put_at(gone, 0);
        idle.put_at(connect(&addr, 1000).await.unwrap(), REAP_CHECK_MS - 1);
        assert_eq!(idle.len(), 2, "not asked while recently idle");
        idle.put_at(connect(&addr, 1000).await.unwrap(), REAP_CHECK_MS);
        assert_eq!(idle.len(), 2, "the closed one is reaped");
        assert!(idle.pop().is_some() && idle.pop().is_some() && idle.pop().is_none());
    }

    #[tokio::test]
    async fn idle_connections_are_capped() {
        let (addr, _) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        // MAX_IDLE + 2 exchanges in flight at once, then all bodies read.
        let mut resps = Vec::new();
        for _ in 0..MAX_IDLE + 2 {
            resps.push(send_plain(&idle, &addr, get()).await.unwrap());
        }
        for r in resps {
            body(r).await;
        }
        assert_eq!(idle.len(), MAX_IDLE);
    }

    /// An upstream that answers every request with `answer`, a byte at a time when
    /// `trickle`, and closes after each answer when `close`.
    async fn scripted(
        answer: &'static [u8],
        trickle: bool,
        close: bool,
    ) -> (String, Arc<Mutex<Vec<u8>>>, Arc<AtomicUsize>) {
        let up = upstream(move |_, _| match (trickle, close) {
            (true, _) => Reply::Trickle(answer),
            (false, true) => Reply::AnswerThenClose(answer),
            (false, false) => Reply::Answer(answer),
        })
        .await;
        (up.addr, up.seen, up.accepted)
    }

    /// The length of the first whole request in `buf`, if it is all there.
    fn request_len(buf: &[u8]) -> Option<usize> {
        let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let text = std::str::from_utf8(&buf[..head])
            .unwrap()
            .to_ascii_lowercase();
        if text.contains("transfer-encoding: chunked") {
            // The last chunk, then the trailer section up to its empty line.
            let last = head + buf[head..].windows(3).position(|w| w == b"0\r\n")?;
            let end = buf[last..].windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some(last + end + 4);
        }
        let body = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse::<usize>().unwrap());
        (buf.len() >= head + body).then_some(head + body)
    }

    async fn collect(resp: Response<PooledBody>) -> (Bytes, Option<HeaderMap>) {
        let c = resp.into_body().collect().await.unwrap();
        let trailers = c.trailers().cloned();
        (c.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_read_in_pieces_is_whole() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
        let (addr, _, accepted) = scripted(answer, true, false).await;
        let idle = Arc::new(Idle::default());
        for _ in 0..2 {
            let mut resp = send_plain(&idle, &addr, get()).await.unwrap();
            let fields = resp.body_mut().take_fields().unwrap().to_map();
            assert!(!fields.contains_key("transfer-encoding"), "{fields:?}");
            let (data, trailers) = collect(resp).await;
            assert_eq!(data, "hello world");
            assert_eq!(trailers.unwrap()["x-sum"], "42");
            assert_eq!(idle.len(), 1, "the connection is back in the pool");
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_answers_are_passed_over_and_head_answers_have_no_body() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        let (addr, _, _) = scripted(answer, false, false).await;
        let idle = Arc::new(Idle::default());
        let mut resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp
            .body_mut()
            .take_fields()
            .unwrap()
            .to_map()
            .contains_key("link"));
        assert_eq!(collect(resp).await.0, "hello");

        let (addr, _, accepted) = scripted(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            false,
            false,
        )
        .await;
        let head = || {
            Request::head("/")
                .header("host", "x")
                .body(Empty::new())
                .unwrap()
        };
        for _ in 0..3 {
            let mut resp = send_plain(&idle, &addr, head()).await.unwrap();
            assert_eq!(resp.body_mut().take_fields().unwrap().length, Some(5));
            assert!(resp.body().is_end_stream());
            assert_eq!(collect(resp).await.0, "");
        }
        assert_eq!(
            accepted.load(SeqCst),
            1,
            "the connection is reused after HEAD"
        );
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_is_not_pooled() {
        let (addr, _, _) = scripted(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", false, true).await;
        let idle = Arc::new(Idle::default());
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(collect(resp).await.0, "until the end");
        assert!(idle.is_empty());

        // `Connection: close` and HTTP/1.0 without keep-alive: not pooled either.
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let (addr, _, _) = scripted(answer, false, false).await;
            let resp = send_plain(&idle, &addr, get()).await.unwrap();
            assert_eq!(collect(resp).await.0, "ok");
            assert!(idle.is_empty());
        }
    }

    #[tokio::test]
    async fn connection_fields_decide_reuse_and_only_those_naming_fields_stay() {
        let idle = Arc::new(Idle::default());
        let answer = b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\nok";
        let (addr, _, _) = scripted(answer, false, false).await;
        let mut resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert!(!resp
            .body_mut()
            .take_fields()
            .unwrap()
            .to_map()
            .contains_key("connection"));
        collect(resp).await;
        assert_eq!(idle.len(), 1);

        let answer = b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok";
        let (addr, _, _) = scripted(answer, false, false).await;
        let idle = Arc::new(Idle::default());
        collect(send_plain(&idle, &addr, get()).await.unwrap()).await;
        assert_eq!(idle.len(), 1, "HTTP/1.0 with keep-alive is reused");

        let answer = b"HTTP/1.1 200 OK\r\nconnection: x-hop, Close\r\nx-hop: 1\r\nKeep-Alive: 5\r\nx-end: 1\r\ncontent-length: 2\r\n\r\nok";
        let (addr, _, _) = scripted(answer, false, false).await;
        let idle = Arc::new(Idle::default());
        let mut resp = send_plain(&idle, &addr, get()).await.unwrap();
        let fields = resp.body_mut().take_fields().unwrap();
        let names: Vec<_> = fields.iter().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(
            names,
            [b"x-end".to_vec()],
            "hop-by-hop fields and those Connection names are left out"
        );
        assert_eq!(fields.length, Some(2));
        collect(resp).await;
        assert!(idle.is_empty(), "close is honoured wherever it is listed");
    }

    #[tokio::test]
    async fn malformed_answers_are_protocol_errors() {
        let idle = Arc::new(Idle::default());
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            b"HTTP/9.1 200 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        ] {
            let (addr, _, _) = scripted(answer, false, false).await;
            let err = send_plain(&idle, &addr, get()).await.unwrap_err();
            assert!(matches!(err, SendError::Protocol(_)), "{err}");
        }
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ] {
            let (addr, _, _) = scripted(answer, false, true).await;
            let resp = send_plain(&idle, &addr, get()).await.unwrap();
            assert!(resp.into_body().collect().await.is_err());
            assert!(idle.is_empty());
        }
        // Both lengths: Transfer-Encoding wins, and the connection is not reused.
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        let (addr, _, _) = scripted(answer, false, false).await;
        let mut resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(resp.body_mut().take_fields().unwrap().length, None);
        assert_eq!(collect(resp).await.0, "ok");
        assert!(idle.is_empty());
    }

    /// A body of `parts` sent as they come, with no length known ahead.
    struct Streamed(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Streamed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    #[tokio::test]
    async fn request_framing_comes_from_the_body_not_from_the_fields() {
        let (addr, seen, _) = scripted(
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            false,
            false,
        )
        .await;
        let idle = Arc::new(Idle::default());
        let post = Request::post("/up?x=1")
            .header("host", "x")
            .header("content-length", "999")
            .header("transfer-encoding", "gzip")
            .body(http_body_util::Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        collect(send_plain(&idle, &addr, post).await.unwrap()).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-check", HeaderValue::from_static("1"));
        let frames = [
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(trailers),
        ];
        let streamed = Request::put("/s")
            .header("host", "x")
            .body(Streamed(frames.into_iter().collect()))
            .unwrap();
        collect(send_plain(&idle, &addr, streamed).await.unwrap()).await;
        let empty = Request::post("/e")
            .header("host", "x")
            .header("content-length", "0")
            .body(Empty::<Bytes>::new())
            .unwrap();
        collect(send_plain(&idle, &addr, empty).await.unwrap()).await;
        let seen = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert_eq!(
            seen,
            "POST /up?x=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
             PUT /s HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
             6\r\nhello \r\n5\r\nworld\r\n0\r\nx-check: 1\r\n\r\n\
             POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        );
    }

    /// Regression (with hyper's client): an upstream that refuses a large upload
    /// early and closes got a `502` about half the time instead of its answer.
    #[tokio::test]
    async fn an_answer_before_the_whole_body_is_passed_on() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let r = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig";
                let _ = s.write_all(r).await;
                // Closes with the body unread: the kernel answers the rest with a reset.
            }
        });
        let idle = Arc::new(Idle::default());
        for _ in 0..20 {
            let big = Bytes::from(vec![b'x'; 8 << 20]);
            let req = Request::post("/")
                .header("host", "x")
                .body(http_body_util::Full::new(big))
                .unwrap();
            let resp = send_plain(&idle, &addr, req).await.unwrap();
            assert_eq!(resp.status(), 413);
            assert_eq!(collect(resp).await.0, "big");
            assert!(idle.is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn chunked_bodies_decode_whatever_the_chunks_and_reads(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            chunk in 1usize..70,
            read in 1usize..50,
        ) {
            let mut wire = Vec::new();
            for c in body.chunks(chunk) {
                wire.extend_from_slice(format!("{:X}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut state = State::Chunked(Chunk::Size);
            let mut buf = BytesMut::new();
            let mut fed = 0;
            let mut out = Vec::new();
            loop {
                match step(&mut state, &mut buf).unwrap() {
                    Step::Frame(f) => out.extend_from_slice(&f.into_data().unwrap()),
                    Step::End => break,
                    Step::Again => {}
                    Step::More => {
                        proptest::prop_assert!(fed < wire.len(), "wanted more than the body");
                        let end = (fed + read).min(wire.len());
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
                if state == State::Done {
                    break;
                }
            }
            proptest::prop_assert_eq!(out, body);
            proptest::prop_assert!(buf.is_empty() && fed == wire.len());
        }
    }

    /// Regression guard for the connection-kept timer: a timer set for an earlier
    /// request that goes off during a later one must not time that one out.
    #[tokio::test]
    async fn the_request_timeout_runs_per_request_on_a_reused_connection() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let up = upstream(move |_, req| match req.starts_with(b"GET /slow") {
            true => Reply::Ignore,
            false => Reply::Answer(ok),
        })
        .await;
        let addr = up.addr;
        let idle = Arc::new(Idle::default());
        // Generous against a loaded machine: a quick request has 2 s.
        let timeout = Duration::from_secs(2);
        // Six quick requests over ~3 s on one connection: the timer armed by the first
        // goes off during a later one and is moved on, not taken as a timeout.
        for _ in 0..6 {
            let resp = send_within(&idle, &addr, timeout, get()).await.unwrap();
            assert_eq!(collect(resp).await.0, "ok");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(idle.len(), 1);
        let slow = Request::get("/slow")
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let err = send_within(&idle, &addr, timeout, slow).await.unwrap_err();
        assert!(matches!(err, SendError::Timeout), "{err}");
        let resp = send_within(&idle, &addr, timeout, get()).await.unwrap();
        assert_eq!(
            collect(resp).await.0,
            "ok",
            "a new connection after the timed-out one"
        );
    }

    proptest::proptest! {
        /// Copying fields in runs writes the same bytes as writing each field, whatever
        /// the separators, line ends and gaps (fields left out at parse or by `keep`).
        #[test]
        fn field_runs_write_what_each_field_would(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["x-a", "X-Bb", "server", "connection", "content-length", "etag"]),
                    "[!-~]([ -~]{0,6}[!-~])?",
                    proptest::sample::select(vec![": ", ": ", ":", ":  ", ":\t"]),
                    proptest::sample::select(vec!["\r\n", "\n", " \r\n"]),
                ),
                0..10,
            ),
            every_other in proptest::prelude::any::<bool>(),
        ) {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for (name, value, sep, end) in &fields {
                let value = if *name == "content-length" { "3" } else { value.as_str() };
                head.extend_from_slice(format!("{name}{sep}{value}{end}").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            let mut buf = BytesMut::from(&head[..]);
            let parsed = match parse_head(&mut buf) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Err(proptest::test_runner::TestCaseError::fail("incomplete head")),
                Err(e) => return Err(proptest::test_runner::TestCaseError::fail(format!("refused: {e}"))),
            };
            let raw = &parsed.fields.raw;
            let keep = |i: usize| !every_other || i.is_multiple_of(2);
            let mut runs = Vec::new();
            let mut i = 0;
            raw.write_fields(&mut runs, |_, _| {
                i += 1;
                keep(i)
            });
            let mut each = Vec::new();
            for (i, (name, value)) in raw.iter().enumerate() {
                if keep(i + 1) {
                    write_field(&mut each, name, value);
                }
            }
            proptest::prop_assert_eq!(String::from_utf8_lossy(&runs), String::from_utf8_lossy(&each));
        }
    }

    proptest::proptest! {
        /// `is_name` agrees with `eq_ignore_ascii_case` on every field name `httparse`
        /// accepts (token characters), against the names the proxy looks for and
        /// names one character away from them.
        #[test]
        fn is_name_matches_names_in_any_letter_case(
            lower in proptest::sample::select(vec![
                "te", "host", "date", "expect", "upgrade", "connection", "keep-alive",
                "content-length", "x-canary-route", "x-forwarded-for", "x-canary-version",
                "x-forwarded-host", "proxy-connection", "transfer-encoding",
                "x-forwarded-proto", "proxy-authorization",
            ]),
            flips in proptest::collection::vec(proptest::bool::ANY, 20),
            swap in proptest::option::of((0usize..20, "[!#$%&'*+.^_`|~0-9A-Za-z-]")),
        ) {
            let name = near(lower, &flips, swap.map(|(at, c)| (at, c.as_bytes()[0])));
            proptest::prop_assert_eq!(httparse_field(&name, b"v"), Some((name.clone(), b"v".to_vec())));
            proptest::prop_assert_eq!(is_name(&name, lower), name.eq_ignore_ascii_case(lower.as_bytes()));
        }

        /// The same for field values (`Connection: keep-alive`), whatever byte a value
        /// may hold stands in for one of the name's.
        #[test]
        fn is_name_matches_values_in_any_letter_case(
            lower in proptest::sample::select(vec!["close", "keep-alive", "chunked", "trailers"]),
            flips in proptest::collection::vec(proptest::bool::ANY, 12),
            swap in proptest::option::of((
                0usize..12,
                proptest::strategy::Strategy::prop_filter(proptest::num::u8::ANY, "a value byte", |&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            )),
        ) {
            let value = near(lower, &flips, swap);
            // A value `httparse` would trim or refuse is not one `is_name` is given.
            proptest::prop_assume!(httparse_field(b"x", &value) == Some((b"x".to_vec(), value.clone())));
            proptest::prop_assert_eq!(is_name(&value, lower), value.eq_ignore_ascii_case(lower.as_bytes()));
        }
    }

    /// `lower` with the letters `flips` marks in upper case and, with `swap`, the byte
    /// at that place (modulo the length) replaced.
    fn near(lower: &str, flips: &[bool], swap: Option<(usize, u8)>) -> Vec<u8> {
        let mut out: Vec<u8> = lower
            .bytes()
            .zip(flips)
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        if let Some((at, b)) = swap {
            let at = at % out.len();
            out[at] = b;
        }
        out
    }

    /// The field `name: value` as `httparse` reads it, if it accepts it.
    fn httparse_field(name: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let line = [name, b": ", value, b"\r\n\r\n"].concat();
        let mut fields = [httparse::EMPTY_HEADER; 1];
        match httparse::parse_headers(&line, &mut fields) {
            Ok(httparse::Status::Complete(_)) => {
                Some((fields[0].name.as_bytes().to_vec(), fields[0].value.to_vec()))
            }
            _ => None,
        }
    }
}
