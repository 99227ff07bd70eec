//! The client side of HTTP/1.1 for the requests that are most of the traffic, and a
//! hand-over to hyper for all others.
//!
//! Why this is written here rather than left to hyper's server: profiled, hyper's
//! per-request machinery around the proxy's own work (its dispatcher, buffered IO,
//! version detection, header-read timer, message types in and out) was ~10 k of the
//! ~24 k user-space instructions per proxied request (`docs/performance.md`), and the
//! kernel's share of a request is the same for every proxy. This reader takes only
//! requests whose framing leaves nothing to decide: a head that `httparse` (the
//! parser hyper itself uses) reads completely and cleanly, HTTP/1.0 or 1.1, without a
//! body (no `Transfer-Encoding`, no `Content-Length` but `0`), no `Expect`, no upgrade
//! (`Upgrade`, a `Connection` listing anything but `close`/`keep-alive`), not
//! `CONNECT`. Such a request cannot be smuggled: it ends at its blank line.
//!
//! Every other request, and anything that does not parse (an HTTP/2 preface, a
//! malformed head, one over the size limit or with over 100 fields), goes to hyper
//! together with the bytes read so far, and hyper serves the rest of that connection
//! exactly as it serves every connection it is given: same answers (`400`, `431`,
//! `505`), same body handling, upgrades and h2c. So the reader decides only *whether*
//! to handle a request, never how an unusual one is answered.
//!
//! What it does with a request it takes is what hyper did: the same [`Proxy::handle`],
//! a response framed by `Content-Length` when the size is known and chunked (or, to an
//! HTTP/1.0 client, by closing) when not, `Date` added when missing, keep-alive per
//! RFC 9112 §9.3, the client's hang-up noticed while the upstream works (the
//! handler is dropped, which counts a client abort), `limits.header_timeout` from the
//! end of one response to the end of the next request head (the slow-header guard
//! and the keep-alive idle timeout), and pipelined requests answered in order.

use std::future::{poll_fn, Future as _};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::forward::ProxyBody;
use crate::forward::{ClientBody, ConnInfo};
use crate::snapshot::Proxy;
use crate::upstream::{
    self, connection_tokens, is_name, write_field, write_trailers, Fields, RawFields, RawHead,
};

/// Fields a request may have and still be read here.
const MAX_FIELDS: usize = 100;
/// A body chunk up to this size is copied behind its head (or chunk line) into one
/// write; a larger one is written from where it is, in the same system call.
const COPY_LIMIT: usize = 16 * 1024;
/// The connection timer's deadline while nothing is timed.
const IDLE_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a connection needs from the listener.
pub(crate) struct Settings {
    pub proxy: Arc<Proxy>,
    /// Serves a connection handed over (see the module docs).
    pub hyper: Arc<auto::Builder<TokioExecutor>>,
    /// From the end of a response to the end of the next request head.
    pub header_timeout: Duration,
    /// Bytes a request head may take before it is hyper's to refuse; hyper's own
    /// read-buffer limit, so that hyper sees what it would have seen.
    pub max_head: usize,
}

/// A request head read and accepted: where its parts are in `head`.
struct Parsed {
    len: usize,
    method: Method,
    target: (usize, usize),
    version: Version,
    /// The connection ends after this request's response.
    close: bool,
}

/// Reads a request head at the start of `buf`. `Ok(None)`: not all in yet;
/// `Err(())`: not one for this reader (hyper's to answer).
fn parse(buf: &[u8], fields: &mut Fields) -> Result<Option<Parsed>, ()> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let (Some(method), Some(path), Some(v)) = (req.method, req.path, req.version) else {
        return Err(());
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "CONNECT" => return Err(()),
        m => Method::from_bytes(m.as_bytes()).map_err(|_| ())?,
    };
    let version = if v == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (mut close, mut keep_alive, mut other) = (false, false, false);
    let fits = fields.collect(buf, req.headers, |h| {
        let name = h.name.as_bytes();
        match name.len() {
            10 if is_name(name, "connection") => {
                other |= connection_tokens(h.value, &mut close, &mut keep_alive);
                false
            }
            14 if is_name(name, "content-length") => {
                other |= h.value.trim_ascii() != b"0";
                true
            }
            6 if is_name(name, "expect") => {
                other = true;
                true
            }
            7 if is_name(name, "upgrade") => {
                other = true;
                true
            }
            17 if is_name(name, "transfer-encoding") => {
                other = true;
                true
            }
            _ => true,
        }
    });
    // Not `fits`: a head beyond a place's offsets (over `max_header_bytes`), which
    // hyper refuses.
    if other || !fits {
        return Err(());
    }
    let base = buf.as_ptr() as usize;
    Ok(Some(Parsed {
        len,
        method,
        target: (path.as_ptr() as usize - base, path.len()),
        version,
        close: close || (version == Version::HTTP_10 && !keep_alive),
    }))
}

/// The request for the handler: its fields stay in `raw` (the head, as read), its
/// `HeaderMap` is empty. `None` for a target `http` refuses (rare: `httparse` checks
/// nearly the same characters).
fn request(p: &Parsed, raw: Box<RawHead>) -> Option<Request<ClientBody>> {
    let (at, len) = p.target;
    let uri = Uri::from_maybe_shared(raw.head.slice(at..at + len)).ok()?;
    let mut req = Request::new(ClientBody::Read(raw));
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = p.version;
    Some(req)
}

/// Serves one client connection until it closes, `stop` turns true (after the
/// response in progress), or a request is handed to hyper (which then serves it).
pub(crate) async fn serve(
    mut io: TcpStream,
    conn: Arc<ConnInfo>,
    settings: Arc<Settings>,
    stop: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(upstream::READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(IDLE_TIMER));
    // One wait for the whole connection (one made per request cost ~1.5% of a
    // request, in its registration with the channel).
    let stopping = stopped(stop.clone());
    tokio::pin!(stopping);
    let mut armed = false;
    loop {
        // The next request head.
        let deadline = Instant::now() + settings.header_timeout;
        let mut raw = Box::new(RawHead::EMPTY);
        let parsed = loop {
            if !buf.is_empty() {
                match parse(&buf, &mut raw.fields) {
                    Ok(Some(p)) => break p,
                    Ok(None) if buf.len() < settings.max_head => {}
                    _ => return hand_over(io, buf, conn, &settings, stop).await,
                }
            }
            let mut woken = false;
            let waited = poll_fn(|cx| {
                if let Poll::Ready(r) = upstream::fill(Pin::new(&mut io), &mut buf, cx) {
                    return Poll::Ready(r.ok().filter(|&n| n > 0).is_some());
                }
                // The timer and the stop were polled with this task's waker at an
                // earlier wait and are unchanged since (the timer is only ever moved
                // on, here): they will wake the task when they go off. So a wait
                // that starts polls them only if they may have gone off unseen (the
                // task was polled for other reasons since); once woken, it polls all.
                let stop_seen = !matches!(stop.has_changed(), Ok(false));
                if woken || !armed || timer.is_elapsed() || stop_seen {
                    if upstream::poll_until(&mut timer, deadline, cx).is_ready() {
                        return Poll::Ready(false);
                    }
                    if buf.is_empty() && stopping.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(false);
                    }
                    armed = true;
                }
                woken = true;
                Poll::Pending
            });
            if !waited.await {
                return;
            }
        };
        raw.head = buf.split_to(parsed.len).freeze();
        let Some(req) = request(&parsed, raw) else {
            let _ = io.write_all(BAD_REQUEST).await;
            return;
        };
        let is_head = parsed.method == Method::HEAD;
        let version = parsed.version;

        // The answer, while watching for the client hanging up (or pipelining).
        let resp = {
            let handling = settings.proxy.handle(req, &conn);
            tokio::pin!(handling);
            loop {
                tokio::select! {
                    biased;
                    r = &mut handling => break r,
                    r = io.readable(), if buf.len() < settings.max_head => {
                        if r.is_err() {
                            return;
                        }
                        buf.reserve(upstream::READ_CHUNK);
                        match io.try_read_buf(&mut buf) {
                            // Gone: dropping `handling` records the abort.
                            Ok(0) => return,
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(_) => return,
                        }
                    }
                }
            }
        };
        let keep = !parsed.close && !*stop.borrow();
        let (parts, mut body) = (*resp).into_parts();
        let fields = body.take_fields();
        let msg = Message {
            parts: &parts,
            fields: fields.as_deref().unwrap_or(&NO_FIELDS),
            is_head,
            version,
            keep,
        };
        match write_response(&mut io, &mut out, msg, body).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = io.shutdown().await;
                return;
            }
        }
    }
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n";

/// Gives the connection to hyper, with what has been read of it.
async fn hand_over(
    io: TcpStream,
    read: BytesMut,
    conn: Arc<ConnInfo>,
    settings: &Settings,
    stop: watch::Receiver<bool>,
) {
    let proxy = settings.proxy.clone();
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let conn = conn.clone();
        async move {
            let resp = proxy.handle(req.map(ClientBody::Hyper), &conn).await;
            Ok::<_, std::convert::Infallible>(with_fields_in_map(*resp))
        }
    });
    let io = TokioIo::new(Rewound {
        read: read.freeze(),
        io,
    });
    let conn = settings.hyper.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// hyper writes a response from its `HeaderMap` alone: the upstream's fields go in
/// first, then what the proxy added.
fn with_fields_in_map(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(fields) = resp.body_mut().take_fields() else {
        return resp;
    };
    let added = std::mem::replace(resp.headers_mut(), fields.to_map());
    for (name, value) in &added {
        resp.headers_mut().append(name, value.clone());
    }
    resp
}

/// Until the listener asks connections to finish.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A connection with the bytes already read from it put back in front.
struct Rewound {
    read: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How a response body goes on the wire (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body bytes (`HEAD`, `204`, `304`, `1xx`).
    None,
    Length,
    Chunked,
    /// Ended by closing the connection (an HTTP/1.0 client, size unknown).
    Close,
}

/// For an answer with no upstream head of its own (the proxy's, an HTTP/2 upstream's).
static NO_FIELDS: RawFields = RawFields::EMPTY;

/// A response head to write, and what it depends on of its request.
struct Message<'a> {
    parts: &'a http::response::Parts,
    /// The upstream's fields, written before those in `parts.headers` (which are then
    /// what the proxy added).
    fields: &'a RawFields,
    is_head: bool,
    version: Version,
    /// The connection may stay open (as far as the request and the listener go).
    keep: bool,
}

/// Writes a response to the client. `Ok(true)`: the connection may carry another
/// request.
async fn write_response<B: Body<Data = Bytes> + Unpin>(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    msg: Message<'_>,
    mut body: B,
) -> io::Result<bool> {
    let (status, headers, fields) = (msg.parts.status, &msg.parts.headers, msg.fields);
    let has_length = fields.length.is_some() || headers.contains_key(header::CONTENT_LENGTH);
    let exact = body.size_hint().exact();
    let framing = if msg.is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if has_length || exact.is_some() {
        Framing::Length
    } else if msg.version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    let keep = msg.keep && framing != Framing::Close;

    out.clear();
    out.extend_from_slice(if msg.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    fields.write(out);
    // No length on a `1xx` or `204` (RFC 9110 §8.6). A `HEAD` answer and a `304` keep
    // the one they came with: a length added here would be the empty body's.
    let drop_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    let length = match (fields.length, framing, exact) {
        (Some(n), _, _) => Some(n),
        (None, Framing::Length, Some(n)) if !has_length => Some(n),
        _ => None,
    };
    if let (Some(n), false) = (length, drop_length) {
        out.extend_from_slice(b"content-length: ");
        decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }
    for field in fields.added() {
        field.write(out);
    }
    for (name, value) in headers {
        if drop_length && *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !fields.has_date && !headers.contains_key(header::DATE) {
        write_field(out, b"date", &date());
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if msg.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if framing == Framing::None {
        drop(body);
        io.write_all(out).await?;
        return Ok(keep);
    }
    // `out` holds the head until the first write, and is empty after every write.
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => break,
            Some(Ok(f)) => f,
            // The upstream's body broke off: the client must not take what it got
            // for the whole (no last chunk; a length left short), so the connection
            // ends here.
            Some(Err(_)) => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                }
                return Ok(false);
            }
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                if framing == Framing::Chunked {
                    if let Ok(trailers) = f.into_trailers() {
                        out.extend_from_slice(b"0\r\n");
                        write_trailers(out, &trailers);
                        out.extend_from_slice(b"\r\n");
                        io.write_all(out).await?;
                        return Ok(keep);
                    }
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            io.write_all(out).await?;
        } else {
            let tail: &[u8] = if framing == Framing::Chunked {
                b"\r\n"
            } else {
                b""
            };
            write_all_vectored(
                io,
                &mut [IoSlice::new(out), IoSlice::new(&data), IoSlice::new(tail)],
            )
            .await?;
        }
        out.clear();
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    Ok(keep)
}

fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(n >> (4 * i)) & 0xf]);
    }
}

/// Writes all of `bufs`, in as few system calls as the socket allows.
async fn write_all_vectored(io: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The `Date` value for now, made once a second per thread.
fn date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, value) = c.get();
        if at == secs {
            return value;
        }
        let mut v = [0u8; 29];
        v.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
        c.set((secs, v));
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};
    use tokio::io::AsyncReadExt as _;

    fn parsed(raw: &str) -> Result<Option<Parsed>, ()> {
        let mut fields = Fields::EMPTY;
        parse(raw.as_bytes(), &mut fields)
    }

    #[test]
    fn takes_complete_requests_without_a_body() {
        let raw =
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nX-One: 1\r\n\r\nGET /next";
        let mut head = Box::new(RawHead::EMPTY);
        let p = parse(raw.as_bytes(), &mut head.fields).unwrap().unwrap();
        assert_eq!(p.len, raw.len() - "GET /next".len());
        assert!(!p.close);
        head.head = Bytes::copy_from_slice(&raw.as_bytes()[..p.len]);
        let req = request(&p, head).unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(req.headers().is_empty(), "the fields stay in the head");
        let ClientBody::Read(head) = req.body() else {
            panic!("not the head as read");
        };
        // `Connection` is read, not passed on; every other field is, as it came.
        let names: Vec<_> = head.iter().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [b"Host".to_vec(), b"X-One".to_vec()]);
        assert_eq!(head.get("x-one"), Some(&b"1"[..]));
        assert_eq!(head.values("HOST").collect::<Vec<_>>(), [&b"x"[..]]);

        for (raw, close) in [
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                true,
            ),
            ("GET / HTTP/1.0\r\n\r\n", true),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", false),
            (
                "DELETE /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            ("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", false),
        ] {
            assert_eq!(parsed(raw).unwrap().unwrap().close, close, "{raw:?}");
        }
        assert!(parsed("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(parsed("GE").unwrap().is_none());
    }

    #[test]
    fn leaves_bodies_upgrades_and_anything_unusual_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: x-private\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(parsed(raw).is_err(), "{raw:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_FIELDS + 1)
        );
        assert!(parsed(&many).is_err(), "over {MAX_FIELDS} fields");
    }

    /// `resp` as written to a client of `version`, and whether the connection was
    /// left open for another request.
    async fn written<B: Body<Data = Bytes> + Unpin>(
        resp: Response<B>,
        is_head: bool,
        version: Version,
    ) -> (String, bool) {
        written_with(resp, &RawFields::EMPTY, is_head, version).await
    }

    /// [`written`] with the upstream's `fields`.
    async fn written_with<B: Body<Data = Bytes> + Unpin>(
        resp: Response<B>,
        fields: &RawFields,
        is_head: bool,
        version: Version,
    ) -> (String, bool) {
        let (mut server, mut client) = pair().await;
        let (parts, body) = resp.into_parts();
        let msg = Message {
            parts: &parts,
            fields,
            is_head,
            version,
            keep: true,
        };
        let keep = write_response(&mut server, &mut Vec::new(), msg, body)
            .await
            .unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut text = String::from_utf8(got).unwrap();
        let at = text.find("\r\ndate: ").expect("a Date field") + 2;
        let len = text[at..].find("\r\n").unwrap() + 2;
        assert_eq!(len, "date: ".len() + 29 + 2, "{text:?}");
        text.replace_range(at..at + len, "");
        (text, keep)
    }

    type Frames =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

    fn frames(f: Vec<Result<Frame<Bytes>, io::Error>>) -> Frames {
        StreamBody::new(futures_util::stream::iter(f))
    }

    fn response<B>(status: u16, body: B, fields: &[(&'static str, &'static str)]) -> Response<B> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in fields {
            r.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        r
    }

    use http::HeaderValue;

    #[tokio::test]
    async fn frames_responses_as_hyper_did() {
        // A known size: Content-Length, and the body in the same write.
        let (text, keep) = written(
            response(200, Full::new(Bytes::from("hi")), &[("x-a", "1")]),
            false,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nhi"
        );
        assert!(keep);
        // A declared length is kept as it is.
        let (text, _) = written(
            response(
                200,
                Full::new(Bytes::from("hi")),
                &[("content-length", "2")],
            ),
            false,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(text, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi");
        // Unknown size: chunked, trailers at the end.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = frames(vec![
            Ok(Frame::data(Bytes::from("hello"))),
            Ok(Frame::data(Bytes::from(vec![b'x'; 20_000]))),
            Ok(Frame::trailers(trailers)),
        ]);
        let (text, keep) = written(response(200, body, &[]), false, Version::HTTP_11).await;
        let want = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n4e20\r\n{}\r\n0\r\ngrpc-status: 0\r\n\r\n",
            "x".repeat(20_000)
        );
        assert_eq!(text, want);
        assert!(keep);
        let (text, _) = written(response(200, frames(vec![]), &[]), false, Version::HTTP_11).await;
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        );
        // Unknown size to an HTTP/1.0 client: ended by closing.
        let body = frames(vec![Ok(Frame::data(Bytes::from("old")))]);
        let (text, keep) = written(response(200, body, &[]), false, Version::HTTP_10).await;
        assert_eq!(text, "HTTP/1.0 200 OK\r\nconnection: close\r\n\r\nold");
        assert!(!keep);
        let (text, keep) = written(
            response(200, Full::new(Bytes::from("ok")), &[]),
            false,
            Version::HTTP_10,
        )
        .await;
        assert_eq!(
            text,
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok"
        );
        assert!(keep);
        // HEAD: the fields as they came, no body; 204: no length; 304 as it came.
        let (text, _) = written(
            response(200, Full::new(Bytes::new()), &[("content-length", "42")]),
            true,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(text, "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n");
        let (text, _) = written(response(200, frames(vec![]), &[]), true, Version::HTTP_11).await;
        assert_eq!(text, "HTTP/1.1 200 OK\r\n\r\n");
        let (text, _) = written(
            response(204, Full::new(Bytes::new()), &[("content-length", "0")]),
            false,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(text, "HTTP/1.1 204 No Content\r\n\r\n");
        let (text, _) = written(
            response(304, Full::new(Bytes::new()), &[("etag", "\"1\"")]),
            false,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(text, "HTTP/1.1 304 Not Modified\r\netag: \"1\"\r\n\r\n");
    }

    /// A connected pair: (server side, client side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    #[tokio::test]
    async fn the_upstreams_fields_go_first_as_they_came_with_its_length() {
        let fields = RawFields::of(
            b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-Two: a\r\nX-Two: b\r\n\r\n",
        );
        let mut fields = fields;
        fields
            .add(upstream::AddedField::Value(
                &header::SET_COOKIE,
                HeaderValue::from_static("id=1"),
            ))
            .unwrap();
        let resp = response(
            200,
            Full::new(Bytes::from("ok")),
            &[("x-canary-version", "v1")],
        );
        let (text, _) = written_with(resp, &fields, false, Version::HTTP_11).await;
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nServer: up\r\nX-Two: a\r\nX-Two: b\r\ncontent-length: 2\r\nset-cookie: id=1\r\nx-canary-version: v1\r\n\r\nok"
        );
        // What hyper gets: one map, the upstream's fields first.
        let map = fields.to_map();
        let names: Vec<_> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["server", "x-two", "content-length", "set-cookie"]);
        assert_eq!(map.get_all("x-two").iter().count(), 2);
        // The upstream's Date is kept and not doubled; a HEAD answer keeps its length.
        let fields = RawFields::of(
            b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 42\r\n\r\n",
        );
        let (mut server, mut client) = pair().await;
        let (parts, body) = response(200, Full::new(Bytes::new()), &[]).into_parts();
        let msg = Message {
            parts: &parts,
            fields: &fields,
            is_head: true,
            version: Version::HTTP_11,
            keep: false,
        };
        assert!(!write_response(&mut server, &mut Vec::new(), msg, body)
            .await
            .unwrap());
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: 42\r\nconnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_not_finished_and_ends_the_connection() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from("part"))),
            Err(io::Error::other("upstream reset")),
        ]);
        let (text, keep) = written(response(200, body, &[]), false, Version::HTTP_11).await;
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n"
        );
        assert!(!keep);
        let body = frames(vec![Err(io::Error::other("upstream reset"))]);
        let (text, keep) = written(
            response(200, body, &[("content-length", "10")]),
            false,
            Version::HTTP_11,
        )
        .await;
        assert_eq!(text, "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n");
        assert!(!keep);
    }

    proptest::proptest! {
        /// Whatever the bytes, the reader does not panic, and a request it takes is
        /// whole and has no body framing (anything else is hyper's).
        #[test]
        fn taken_requests_are_whole_and_without_a_body(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "Host", "Content-Length", "content-length", "Transfer-Encoding",
                        "Connection", "Expect", "Upgrade", "X-A", "TE", "Cookie",
                    ]),
                    proptest::sample::select(vec![
                        "x", "0", " 0 ", "5", "chunked", "close", "keep-alive", "upgrade",
                        "100-continue", "a, b", "", "0, 0",
                    ]),
                ),
                0..8,
            ),
            method in proptest::sample::select(vec!["GET", "HEAD", "POST", "CONNECT", "PRI", "G T"]),
            version in proptest::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x"]),
            cut in 0usize..400,
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut raw = format!("{method} /p {version}\r\n");
            for (k, v) in &fields {
                raw.push_str(&format!("{k}: {v}\r\n"));
            }
            raw.push_str("\r\n");
            let mut bytes = raw.into_bytes();
            let whole = bytes.len();
            bytes.truncate(cut.min(whole));
            let mut fields_buf = Fields::EMPTY;
            if let Ok(Some(p)) = parse(&bytes, &mut fields_buf) {
                proptest::prop_assert_eq!(p.len, whole);
                for (k, v) in &fields {
                    let k = k.to_ascii_lowercase();
                    proptest::prop_assert!(k != "transfer-encoding" && k != "expect" && k != "upgrade");
                    proptest::prop_assert!(k != "content-length" || v.trim() == "0");
                }
                proptest::prop_assert!(method != "CONNECT");
            }
            // Arbitrary bytes after a valid start, and alone: no panic.
            let mut tail = b"GET / HTTP/1.1\r\n".to_vec();
            tail.extend_from_slice(&noise);
            let _ = parse(&tail, &mut fields_buf);
            let _ = parse(&noise, &mut fields_buf);
        }
    }

    #[test]
    fn numbers_are_written_as_http_wants_them() {
        let mut out = Vec::new();
        for n in [0u64, 7, 10, 12_345, u64::MAX] {
            out.clear();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for n in [0usize, 1, 15, 16, 0x4e20, usize::MAX] {
            out.clear();
            hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").as_bytes());
        }
        let before = httpdate::fmt_http_date(SystemTime::now());
        let d = date();
        let after = httpdate::fmt_http_date(SystemTime::now());
        assert!(d == before.as_bytes() || d == after.as_bytes());
    }
}
