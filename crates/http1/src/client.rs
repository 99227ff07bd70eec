//! One HTTP/1.1 exchange with an upstream, driven by the request's own task.
//!
//! Why this is written here rather than taken from hyper's client: with hyper's
//! `client::conn::http1`, every upstream connection is a task of its own, and each
//! request crosses into it and back through channels (an `mpsc` send, a `oneshot`
//! for the response, a want/give handshake, a body channel), with two task wake-ups
//! and the response head copied into hyper's message types on the way. Profiled, the
//! upstream side was ~44% of the instructions per proxied request
//! (`docs/performance.md`). Here the request's own task drives its connection: it
//! writes the head, streams the body, reads the response head with `httparse` and
//! hands the response body to the caller as it is read from the socket. No task, no
//! channel, no wake-up between the two sides.
//!
//! Keep-alive races: a request without a body whose pooled connection turns out to
//! be closed is sent on another connection: whatever the method when it could not be
//! written, and when it was written but the upstream closed without a byte of answer
//! only if it is idempotent (RFC 9110 §9.2.2), as nginx does. So an upstream's
//! keep-alive timeout never shows as a failure of the upstream. A request with a body
//! is never sent twice. An upstream that answers before it has read the whole request
//! body (a `413`, say) has its answer passed on; that connection is then closed rather
//! than reused.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::body::{
    write_body, Chunk, RequestBody, RequestFraming, ResponseBody, State, WriteError,
};
use crate::conn::{Conn, IdleList, Io};
use crate::fields::{
    connection_tokens, content_length, hop_by_hop, is_name, te_lists_trailers, write_field,
    RawFields, RawHead,
};
use crate::{fill, until, BoxError, MAX_HEADERS, MAX_RESPONSE_HEAD};

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

/// What the caller leaves out of the fields the exchange passes on, besides what the
/// exchange always leaves out itself (hop-by-hop fields and those a `Connection`
/// names, the framing, which it writes from the body, and the request's `Host`,
/// which comes in [`Extra::host`]).
pub trait Filter {
    /// Whether a field of a request head read by [`server::parse`](crate::server::parse)
    /// ([`Extra::raw`]) is not written upstream.
    fn drop_request_field(&self, name: &[u8]) -> bool;
    /// Whether a field of the upstream's response is not passed on.
    fn drop_response_field(&self, name: &[u8]) -> bool;
}

/// No filter: every end-to-end field passes.
impl Filter for () {
    fn drop_request_field(&self, _: &[u8]) -> bool {
        false
    }
    fn drop_response_field(&self, _: &[u8]) -> bool {
        false
    }
}

/// What an upstream request carries besides its own `HeaderMap`.
#[derive(Debug)]
pub struct Extra<'a, F = ()> {
    /// `Host`, written after the map's fields (the map then has none).
    pub host: Option<&'a [u8]>,
    /// A request head read by [`server::parse`](crate::server::parse): its fields are
    /// written too, less the hop-by-hop ones, the framing, `Host` and those `filter`
    /// leaves out.
    pub raw: Option<&'a RawHead>,
    /// The caller's own fields, written last: `added` one by one, then `fixed`, lines
    /// already written out.
    pub added: &'a [(&'a HeaderName, &'a [u8])],
    pub fixed: &'a [u8],
    /// The fields the caller leaves out, of `raw` and of the response.
    pub filter: &'a F,
}

impl<F> Clone for Extra<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for Extra<'_, F> {}

impl Default for Extra<'_, ()> {
    fn default() -> Self {
        Extra {
            host: None,
            raw: None,
            added: &[],
            fixed: &[],
            filter: &(),
        }
    }
}

/// Sends the request (`parts` and `body`) on a pooled connection from `idle`, or a
/// new one from `connect` (`addr` names the upstream in logs).
///
/// The parts must be ready for the wire but for the target, which is written in
/// origin form (the authority of a `CONNECT`): hop-by-hop fields removed, `Host` in
/// `extra` when the map has none; the framing fields are written here from the body.
/// The response's body gives the connection back to `idle` when it has been read to
/// its end; a response whose body is dropped early, or a `101 Switching Protocols`,
/// keeps its connection out of the list.
///
/// The request timeout of a request without a body runs from `now` on a pooled
/// connection (the request is written at once: one clock read less per request),
/// from when it was written on a new one.
///
/// The answer is boxed, as `R` built from the body and the response's fields (the
/// caller's own body type): it is moved out of several async layers on its way to the
/// client's writer (a `memcpy` of ~180 bytes each), where a box is a pointer.
#[allow(clippy::too_many_arguments)]
pub async fn send<S, C, B, F, R>(
    idle: &Arc<IdleList<S>>,
    addr: &str,
    connect: impl FnOnce() -> C,
    (now, timeout): (Instant, Duration),
    (parts, body): (&Parts, &mut B),
    extra: Extra<'_, F>,
) -> Result<Box<Response<R>>, SendError>
where
    S: Io,
    C: Future<Output = Result<S, SendError>>,
    B: RequestBody,
    F: Filter,
    R: From<(ResponseBody<S>, Box<RawFields>)>,
{
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
    let conn = Conn::new(connect().await?);
    exchange(conn, (parts, extra), body, (None, timeout), idle)
        .await
        .map_err(|f| f.error)
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

/// One request and its response head on `conn`.
async fn exchange<S, B, F, R>(
    mut conn: Box<Conn<S>>,
    (parts, extra): (&Parts, Extra<'_, F>),
    body: &mut B,
    (sent, timeout): (Option<Instant>, Duration),
    idle: &Arc<IdleList<S>>,
) -> Result<Box<Response<R>>, Failure>
where
    S: Io,
    B: RequestBody,
    F: Filter,
    R: From<(ResponseBody<S>, Box<RawFields>)>,
{
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
            h = read_head(io, rbuf, extra.filter) => h?,
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
        let read = read_head(&mut rd, rbuf, extra.filter);
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
        return Ok(head.into_response(ResponseBody::upgrade(conn)));
    }
    let (state, keep_alive) = response_framing(parts.method == Method::HEAD, &mut head);
    let body = ResponseBody::framed(conn, state, keep_alive && body_sent, idle);
    Ok(head.into_response(body))
}

/// Writes the request line, the request's header fields and the `added` ones, then
/// the framing.
fn encode_head<F: Filter>(
    out: &mut Vec<u8>,
    parts: &Parts,
    extra: Extra<'_, F>,
    framing: RequestFraming,
) {
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
            if not_forwarded(name) || extra.filter.drop_request_field(name) {
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

/// A response head as read.
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    version: Version,
    pub(crate) fields: Box<RawFields>,
    /// `Connection` lists `close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
    /// `Transfer-Encoding` was sent; `Some(true)` when its last coding is `chunked`.
    chunked: Option<bool>,
}

impl Head {
    /// The response, boxed: it is moved out of several async layers on its way to the
    /// client's writer (a `memcpy` of ~180 bytes each), where a box is a pointer.
    fn into_response<S, R: From<(ResponseBody<S>, Box<RawFields>)>>(
        self,
        body: ResponseBody<S>,
    ) -> Box<Response<R>> {
        let mut r = Box::new(Response::new(R::from((body, self.fields))));
        *r.status_mut() = self.status;
        *r.version_mut() = self.version;
        r
    }
}

/// Reads the response head, passing over interim `1xx` answers (but `101`).
async fn read_head<R: AsyncRead + Unpin, F: Filter>(
    rd: &mut R,
    buf: &mut BytesMut,
    filter: &F,
) -> Result<Head, Failure> {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf, filter).map_err(Failure::protocol)? {
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
pub(crate) fn parse_head<F: Filter>(
    buf: &mut BytesMut,
    filter: &F,
) -> Result<Option<Head>, BoxError> {
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
                // Only exactly `chunked` is passed on: a body in another coding
                // (`gzip, chunked`) would reach the client decoded of its chunking but
                // still gzipped, with nothing saying so; and a list or a second line
                // is a framing a strict recipient may read differently (RFC 9112 §6.1).
                if chunked.is_some() || !is_name(h.value, "chunked") {
                    bad = Some("unsupported Transfer-Encoding in the upstream response");
                }
                chunked = Some(true);
                false
            }
            7 if upgrade && is("upgrade") => true,
            4 if is("date") => {
                has_date = true;
                true
            }
            _ => !hop_by_hop(name) && !filter.drop_response_field(name),
        }
    });
    if chunked.is_some() && version == Version::HTTP_10 {
        // HTTP/1.0 has no chunked coding (RFC 9112 §6.1): a faulty framing.
        bad = Some("Transfer-Encoding in an HTTP/1.0 upstream response");
    }
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

/// Whether a field of a request head read by the server side is left out of what the
/// exchange writes upstream whatever the caller's filter: hop-by-hop, the framing
/// (written from the body) and `Host` (written from [`Extra::host`]).
fn not_forwarded(name: &[u8]) -> bool {
    hop_by_hop(name) || is_name(name, "content-length") || is_name(name, "host")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{connect_tcp, IDLE_TIMEOUT_MS, MAX_IDLE, REAP_CHECK_MS};
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Request};
    use http_body::{Body, Frame, SizeHint};
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Mutex;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::net::TcpStream;

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

    type Idle = IdleList<TcpStream>;

    /// What a caller makes of an answer: its body, and its fields until taken.
    #[derive(Debug)]
    struct TestBody {
        body: ResponseBody<TcpStream>,
        fields: Option<Box<RawFields>>,
    }

    impl From<(ResponseBody<TcpStream>, Box<RawFields>)> for TestBody {
        fn from((body, fields): (ResponseBody<TcpStream>, Box<RawFields>)) -> TestBody {
            TestBody {
                body,
                fields: Some(fields),
            }
        }
    }

    impl TestBody {
        fn take_fields(&mut self) -> Option<Box<RawFields>> {
            self.fields.take()
        }
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Pin::new(&mut self.body).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }
        fn size_hint(&self) -> SizeHint {
            self.body.size_hint()
        }
    }

    async fn connect(addr: &str, connect_ms: u64) -> Result<Box<Conn<TcpStream>>, SendError> {
        Ok(Conn::new(connect_tcp(addr, connect_ms).await?))
    }

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
        idle: &Arc<Idle>,
        addr: &str,
        req: Request<B>,
    ) -> Result<Response<TestBody>, SendError> {
        send_within(idle, addr, T, req).await
    }

    /// [`send_plain`] with request timeout `timeout`.
    async fn send_within<B: RequestBody>(
        idle: &Arc<Idle>,
        addr: &str,
        timeout: Duration,
        req: Request<B>,
    ) -> Result<Response<TestBody>, SendError> {
        let (parts, mut body) = req.into_parts();
        send(
            idle,
            addr,
            || connect_tcp(addr, 1000),
            (Instant::now(), timeout),
            (&parts, &mut body),
            Extra::default(),
        )
        .await
        .map(|r| *r)
    }

    async fn body(resp: Response<TestBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
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

    /// An upstream that answers every request with `hello` and, to a target holding
    /// `late`, sends a second, unasked-for answer `after` later.
    async fn late_answering(after: Duration) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(len) = request_len(&buf) {
                            let req: Vec<u8> = buf.drain(..len).collect();
                            if s.write_all(HELLO).await.is_err() {
                                return;
                            }
                            if req.starts_with(b"GET /late") {
                                tokio::time::sleep(after).await;
                                let intruder =
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nintruder";
                                if s.write_all(intruder).await.is_err() {
                                    return;
                                }
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
        (addr, accepted)
    }

    fn get_at(target: &str) -> Request<Empty<Bytes>> {
        Request::get(target)
            .header("host", "x")
            .body(Empty::new())
            .unwrap()
    }

    /// Regression: a second answer that came a moment after the first, while its
    /// connection waited in the idle list, was the next request's answer.
    #[tokio::test]
    async fn a_late_second_answer_on_an_idle_connection_closes_it_and_holds_reuse_off() {
        let (addr, accepted) = late_answering(Duration::from_millis(20)).await;
        let idle = Arc::new(Idle::default());
        let resp = send_plain(&idle, &addr, get_at("/late")).await.unwrap();
        assert_eq!(body(resp).await, "hello");
        assert_eq!(idle.len(), 1);
        assert!(!idle.reuse().held_off());
        // The intruder lands while the connection is idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(body(resp).await, "hello", "not the intruder");
        assert_eq!(
            accepted.load(SeqCst),
            2,
            "the poisoned connection was closed"
        );
        assert_eq!(idle.reuse().unasked_total(), 1);
        assert!(idle.reuse().held_off());
        // Held off: the connection just used was closed, not kept, and the next
        // request gets a new one.
        assert!(idle.is_empty());
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(body(resp).await, "hello");
        assert_eq!(accepted.load(SeqCst), 3);
        assert!(idle.is_empty());
    }

    #[tokio::test]
    async fn bytes_past_a_complete_response_close_the_connection_and_hold_reuse_off() {
        let idle = Arc::new(Idle::default());
        for answer in [
            // A second answer right behind the first.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx"[..],
            // More body than the length says.
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            // A body to a 204.
            b"HTTP/1.1 204 No Content\r\n\r\nbody",
        ] {
            let (addr, _, _) = scripted(answer, false, false).await;
            let idle = Arc::new(Idle::default());
            let resp = send_plain(&idle, &addr, get()).await.unwrap();
            collect(resp).await;
            assert!(idle.is_empty(), "{answer:?}");
            assert_eq!(idle.reuse().unasked_total(), 1, "{answer:?}");
            assert!(idle.reuse().held_off(), "{answer:?}");
        }
        // A clean answer holds nothing off.
        let (addr, _, _) = scripted(HELLO, false, false).await;
        collect(send_plain(&idle, &addr, get()).await.unwrap()).await;
        assert_eq!(idle.len(), 1);
        assert_eq!(idle.reuse().unasked_total(), 0);
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

    async fn collect(resp: Response<TestBody>) -> (Bytes, Option<HeaderMap>) {
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
        // A list per upstream, as the proxy keeps them.
        let idle = Arc::new(Idle::default());
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

    /// Regression (issue 15, G9 the other way): `Transfer-Encoding: gzip, chunked` from
    /// an upstream was decoded of its chunking and passed on still gzipped, with
    /// nothing saying so; `gzip` alone was read to the close the same way.
    #[tokio::test]
    async fn an_upstream_transfer_coding_other_than_chunked_is_a_protocol_error() {
        let idle = Arc::new(Idle::default());
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ] {
            let (addr, _, _) = scripted(answer, false, true).await;
            let err = send_plain(&idle, &addr, get()).await.unwrap_err();
            assert!(matches!(err, SendError::Protocol(_)), "{err}");
        }
        // `Chunked` in any letter case is chunked.
        let (addr, _, _) = scripted(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            false,
            false,
        )
        .await;
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        assert_eq!(collect(resp).await.0, "ok");
    }

    /// Regression (issue 15, G2 the other way): an upstream's trailers were passed on
    /// verbatim, `Content-Length` and `Set-Cookie` included.
    #[tokio::test]
    async fn forbidden_upstream_trailers_are_dropped_when_decoded() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\
            grpc-status: 0\r\nContent-Length: 9\r\nSet-Cookie: a=1\r\nHost: evil\r\nx-sum: 7\r\n\r\n";
        let (addr, _, _) = scripted(answer, false, false).await;
        let idle = Arc::new(Idle::default());
        let resp = send_plain(&idle, &addr, get()).await.unwrap();
        let (data, trailers) = collect(resp).await;
        assert_eq!(data, "ok");
        let trailers = trailers.unwrap();
        let mut names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status", "x-sum"]);
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
}
