//! One client connection: the proxy's own HTTP/1.1 reader for the requests that are
//! most of the traffic, and a hand-over to hyper for all others.
//!
//! Why the proxy reads requests itself rather than leaving it to hyper's server:
//! profiled, hyper's per-request machinery around the proxy's own work (its
//! dispatcher, buffered IO, version detection, header-read timer, message types in and
//! out) was ~10 k of the ~24 k user-space instructions per proxied request
//! (`docs/performance.md`), and the kernel's share of a request is the same for every
//! proxy. The reader (`http1::server::parse`) takes only requests whose framing leaves
//! nothing to decide (see its docs); such a request cannot be smuggled.
//!
//! Every other request, and anything that does not parse (an HTTP/2 preface, a
//! malformed head, one over the size limit or with over 100 fields), goes to hyper
//! together with the bytes read so far, and hyper serves the rest of that connection
//! exactly as it serves every connection it is given: same answers (`400`, `431`,
//! `505`), same body handling, upgrades and h2c. So the reader decides only *whether*
//! to handle a request, never how an unusual one is answered.
//!
//! What it does with a request it takes is what hyper did: the same [`Proxy::handle`],
//! the answer written by `http1::server::write_response`, the client's hang-up noticed
//! while the upstream works (the handler is dropped, which counts a client abort),
//! `limits.header_timeout` from the end of one response to the end of the next request
//! head (the slow-header guard and the keep-alive idle timeout), and pipelined
//! requests answered in order.
//!
//! An idle keep-alive connection is *parked* (issue 16: an idle connection cost ~11 KiB,
//! then 6.7 KiB with its buffers given back, against nginx's ~0.6 KiB): once it has
//! waited [`IDLE_RELEASE`] for its next request with nothing read, its task ends —
//! dropping the read and write buffers and the task's whole state, which is sized for
//! a request in flight — and the listener's lot (`crate::parking`), one task for all
//! idle connections, holds the socket until it is readable (then a serving task starts
//! again), its keep-alive deadline or the stop. The park rides on the connection's one
//! timer, which a busy connection re-arms about once per [`IDLE_RELEASE`], so a
//! connection under load neither allocates per request nor moves its timer per
//! request; only an idle spell costs a task spawn.

use std::future::{poll_fn, Future as _};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, Request, Response, Uri};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::body::ProxyBody;
use crate::parking::{Lot, Parked};
use crate::request::{ClientBody, ConnInfo};
use crate::snapshot::Proxy;
use crate::timers::{InFlight, Kind, SendTimed, Tracked, TIMEOUTS};
use crate::tls::ListenerTls;
use crate::woken::Woken;
use canary_http1::fields::{RawFields, RawHead};
use canary_http1::server::{parse, write_response, Message, Parsed, Rewound};
use canary_http1::{fill, poll_until, IDLE_TIMER, READ_CHUNK};

/// How long a connection waits for its next request, with nothing of it read, before
/// it is parked (its serving task and buffers dropped). Long against the gap between
/// requests of a busy keep-alive connection (so one under load never parks, and its
/// timer goes off only 4 times a second), short against a keep-alive timeout. Short
/// also because the allocator keeps freed memory: what counts is how many connections
/// hold a serving task at once, and a burst of new connections that each send one
/// request held this long's worth of them (the bench's `idle` scenario, when this only
/// released the buffers: 7.4 KiB per idle connection with 1 s, 6.3 with 250 ms;
/// docs/performance.md).
pub(crate) const IDLE_RELEASE: Duration = Duration::from_millis(250);

/// Room reserved for a response head.
const OUT_CHUNK: usize = 1024;

/// What a connection needs from the listener.
pub(crate) struct Settings {
    pub proxy: Arc<Proxy>,
    /// Serves a connection handed over (see the module docs) at its first request:
    /// HTTP/1.1, or HTTP/2 with prior knowledge (the preface).
    pub hyper: Arc<auto::Builder<TokioExecutor>>,
    /// Serves a connection handed over after the reader has served requests on it:
    /// HTTP/1.1 only, as a connection does not switch to HTTP/2 midway (RFC 9113 §3.4:
    /// the preface starts a connection), so a preface there is a bad request.
    /// (hyper-util's `auto` cannot be told so for a connection with upgrades.)
    pub hyper_http1: Arc<http1::Builder>,
    /// From the end of a response to the end of the next request head.
    pub header_timeout: Duration,
    /// Bytes a request head may take before it is hyper's to refuse; hyper's own
    /// read-buffer limit, so that hyper sees what it would have seen.
    pub max_head: usize,
    /// `limits.body_timeout`: the longest wait for the next bytes of a request body.
    pub body_timeout: Duration,
    /// `limits.send_timeout`: the longest a write to the client may make no progress.
    pub send_timeout: Duration,
    /// `limits.http2_idle_timeout`: a connection hyper serves with no request in
    /// flight for this long is closed (GOAWAY on HTTP/2).
    pub http2_idle_timeout: Duration,
    /// Where idle keep-alive connections wait for their next request.
    pub lot: Lot,
}

/// For an answer with no upstream head of its own (the proxy's, an HTTP/2 upstream's).
static NO_FIELDS: RawFields = RawFields::EMPTY;

/// The request for the handler: its fields stay in `raw` (the head, as read), its
/// `HeaderMap` is empty. `None` for a target `http` refuses (rare: `httparse` checks
/// nearly the same characters).
fn request(p: &Parsed, raw: Box<RawHead>) -> Option<Request<ClientBody>> {
    let uri = Uri::from_maybe_shared(p.target(&raw)).ok()?;
    let mut req = Request::new(ClientBody::Read(raw));
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = p.version;
    Some(req)
}

/// Where a serving task starts: a new connection, or one woken in the lot.
#[derive(Clone, Copy)]
pub(crate) struct Resume {
    /// Whether a request has been served on the connection: from then on it is
    /// HTTP/1.1.
    served: bool,
    /// When the wait for the next request head ends; `None`: `header_timeout` from now.
    deadline: Option<Instant>,
    /// Woken in the lot: the socket is readable (or closed), and back in tokio's loop
    /// under a new registration that does not know it yet.
    woken: bool,
}

impl Resume {
    pub(crate) const NEW: Resume = Resume {
        served: false,
        deadline: None,
        woken: false,
    };

    /// A connection woken in the lot: its wait for the next head ends at `deadline`.
    pub(crate) fn parked(served: bool, deadline: Instant) -> Resume {
        Resume {
            served,
            deadline: Some(deadline),
            woken: true,
        }
    }
}

/// Serves a plain-TCP client connection in a task of its own, parked in the
/// listener's lot while it is idle (see the module docs). `permit` is the
/// connection's slot under `limits.max_connections`, held until it closes.
pub(crate) fn spawn(
    io: TcpStream,
    conn: Arc<ConnInfo>,
    settings: Arc<Settings>,
    stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
    resume: Resume,
) {
    tokio::spawn(async move {
        if resume.woken {
            // What woke it is read before the stop or the deadline is looked at: tokio
            // learns that the socket is readable at its next turn, and a first wait that
            // found the stop (or the deadline) first would close the connection with
            // the client's request unread (a reset, not an answer).
            let _ = io.readable().await;
        }
        if let Some(parked) = serve(io, conn, &settings, stop, permit, resume).await {
            settings.lot.park(parked);
        }
    });
}

/// What a wait for the next bytes of a request head ended with.
enum Waited {
    Read,
    Closed,
    /// Idle for [`IDLE_RELEASE`] with nothing read: park the connection.
    Idle,
}

/// Serves one client connection until it closes, `stop` turns true (after the
/// response in progress), or a request is handed to hyper (which then serves it).
/// Answers the connection to park when it has been idle for [`IDLE_RELEASE`].
async fn serve(
    mut io: TcpStream,
    conn: Arc<ConnInfo>,
    settings: &Settings,
    stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
    resume: Resume,
) -> Option<Parked> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(OUT_CHUNK);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(IDLE_TIMER));
    // One wait for the whole connection (one made per request cost ~1.5% of a
    // request, in its registration with the channel).
    let stopping = stopped(stop.clone());
    tokio::pin!(stopping);
    let mut armed = false;
    let mut served = resume.served;
    let mut resumed_deadline = resume.deadline;
    loop {
        // The next request head.
        let now = Instant::now();
        let deadline = resumed_deadline
            .take()
            .unwrap_or(now + settings.header_timeout);
        let release_at = now + IDLE_RELEASE;
        // Made here, not when a head's first bytes are in (which would spare an idle
        // connection these ~320 bytes): made later it cost ~190 instructions per
        // request, in `malloc`'s slow path (callgrind; docs/performance.md).
        let mut raw = Box::new(RawHead::EMPTY);
        let parsed = loop {
            if !buf.is_empty() {
                match parse(&buf, &mut raw) {
                    Ok(Some(p)) => break p,
                    Ok(None) if buf.len() < settings.max_head => {}
                    _ => {
                        let hyper = if served {
                            Hyper::Http1(&settings.hyper_http1)
                        } else {
                            Hyper::Auto(&settings.hyper)
                        };
                        // Boxed: hyper's connection future is the largest state
                        // here, and unboxed it would be part of every connection's
                        // task, idle ones included.
                        let handed = hand_over(io, buf, conn, (settings, hyper), stop);
                        Box::pin(handed).await;
                        return None;
                    }
                }
            }
            let mut woken = false;
            let waited = poll_fn(|cx| {
                if let Poll::Ready(r) = fill(Pin::new(&mut io), &mut buf, cx) {
                    return Poll::Ready(match r {
                        Ok(n) if n > 0 => Waited::Read,
                        _ => Waited::Closed,
                    });
                }
                // The timer and the stop were polled with this task's waker at an
                // earlier wait and are unchanged since (the timer is only ever moved
                // on, here): they will wake the task when they go off. So a wait
                // that starts polls them only if they may have gone off unseen (the
                // task was polled for other reasons since); once woken, it polls all.
                let stop_seen = !matches!(stop.has_changed(), Ok(false));
                let parkable = buf.is_empty() && release_at < deadline;
                // A timer moved on past `release_at` (it went off at the deadline of
                // an earlier wait) is polled to bring it back, or this wait would
                // never park.
                let early = parkable && timer.deadline() > release_at;
                if woken || !armed || timer.is_elapsed() || stop_seen || early {
                    if parkable && poll_until(&mut timer, release_at, cx).is_ready() {
                        return Poll::Ready(Waited::Idle);
                    }
                    if poll_until(&mut timer, deadline, cx).is_ready() {
                        if !buf.is_empty() {
                            // A head begun and not finished (an idle keep-alive
                            // connection closing is no timeout).
                            TIMEOUTS.record(Kind::Header);
                        }
                        return Poll::Ready(Waited::Closed);
                    }
                    if buf.is_empty() && stopping.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Waited::Closed);
                    }
                    armed = true;
                }
                woken = true;
                Poll::Pending
            });
            match waited.await {
                Waited::Read => {}
                Waited::Closed => return None,
                Waited::Idle => {
                    #[cfg(test)]
                    tests::count(&tests::PARKED);
                    return Some(Parked {
                        io,
                        conn,
                        permit,
                        served,
                        deadline,
                    });
                }
            }
        };
        parsed.split_head(&mut buf, &mut raw);
        let Some(req) = request(&parsed, raw) else {
            let _ = io.write_all(BAD_REQUEST).await;
            return None;
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
                            return None;
                        }
                        buf.reserve(READ_CHUNK);
                        match io.try_read_buf(&mut buf) {
                            // Gone: dropping `handling` records the abort.
                            Ok(0) => return None,
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(_) => return None,
                        }
                    }
                }
            }
        };
        let keep = !parsed.close && !*stop.borrow();
        // Borrowed out of the boxed answer, not moved: a move of the whole answer cost
        // a `memcpy` of ~300 bytes per request.
        let mut resp = resp;
        let headers = std::mem::take(resp.headers_mut());
        let status = resp.status();
        let (body, fields, added_fields) = resp.body_mut().for_writing();
        let msg = Message {
            status,
            headers: &headers,
            fields: fields.unwrap_or(&NO_FIELDS),
            is_head,
            version,
            keep,
        };
        let added = |out: &mut Vec<u8>| {
            for field in added_fields.iter().flatten() {
                field.write(out);
            }
        };
        served = true;
        let mut timed = SendTimed::new(&mut io, settings.send_timeout);
        let written = write_response(&mut timed, &mut out, msg, added, body).await;
        drop(resp);
        match written {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = io.shutdown().await;
                return None;
            }
        }
    }
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n";

/// Serves a TLS connection on the proxy listener: the handshake (within the
/// listener's `handshake_timeout`), then hyper, which speaks HTTP/2 when ALPN chose
/// `h2` and HTTP/1.1 otherwise (see `crate::tls`).
pub(crate) async fn serve_tls(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    tls: &ListenerTls,
    settings: Arc<Settings>,
    stop: watch::Receiver<bool>,
) {
    let Some(stream) =
        canary_tls::server::handshake(&tls.acceptor, tcp, tls.handshake_timeout, peer).await
    else {
        return;
    };
    let conn = Arc::new(ConnInfo::over_tls(peer));
    hand_over(
        stream,
        BytesMut::new(),
        conn,
        (&settings, Hyper::Auto(&settings.hyper)),
        stop,
    )
    .await;
}

/// Which of hyper's servers takes a connection over.
enum Hyper<'a> {
    /// HTTP/1.1, or HTTP/2 when the connection starts with its preface.
    Auto(&'a auto::Builder<TokioExecutor>),
    /// HTTP/1.1 only.
    Http1(&'a http1::Builder),
}

/// Gives the connection to hyper, with what has been read of it.
async fn hand_over(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    read: BytesMut,
    conn: Arc<ConnInfo>,
    (settings, hyper): (&Settings, Hyper<'_>),
    stop: watch::Receiver<bool>,
) {
    let proxy = settings.proxy.clone();
    let body_timeout = settings.body_timeout;
    // Requests in flight, each until its answer has been sent: none for
    // `http2_idle_timeout` closes the connection.
    let in_flight = Arc::new(InFlight::default());
    let service = service_fn({
        let in_flight = in_flight.clone();
        move |req: Request<hyper::body::Incoming>| {
            let proxy = proxy.clone();
            let conn = conn.clone();
            let guard = in_flight.enter();
            // Boxed: hyper's HTTP/2 server moves each stream's future into a
            // `H2Stream` and that into a spawned task, and the handler's future is
            // large; unboxed, the copies of it were ~3 k instructions of an HTTP/2
            // request (`memcpy`; docs/performance.md).
            Box::pin(async move {
                let req = req.map(|b| ClientBody::hyper(b, body_timeout));
                let resp = proxy.handle(req, &conn).await;
                let resp = with_fields_in_map(*resp).map(|b| Tracked::new(b, guard));
                Ok::<_, std::convert::Infallible>(resp)
            })
        }
    });
    let io = SendTimed::new(io, settings.send_timeout);
    let io = TokioIo::new(Rewound::new(read.freeze(), io));
    // The same wait in both arms: each connection type has its own future.
    macro_rules! serve_until_stopped {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            // The two waits are polled only when they woke the task (`woken`), not
            // at each of the connection's wake-ups.
            let stopping = stopped(stop);
            tokio::pin!(stopping);
            let idle = in_flight.idle_for(settings.http2_idle_timeout);
            tokio::pin!(idle);
            let r = tokio::select! {
                biased;
                r = conn.as_mut() => r,
                () = Woken::new(stopping.as_mut()) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = Woken::new(idle.as_mut()) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }};
    }
    match hyper {
        Hyper::Auto(b) => serve_until_stopped!(b.serve_connection_with_upgrades(io, service)),
        Hyper::Http1(b) => serve_until_stopped!(b.serve_connection(io, service).with_upgrades()),
    }
}

/// hyper writes a response from its `HeaderMap` alone: the upstream's fields go in
/// first, then what the proxy added.
fn with_fields_in_map(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(fields) = resp.body_mut().take_fields() else {
        return resp;
    };
    // One more than is added here: hyper's HTTP/2 server then asks for
    // `entry(DATE)`, which reserves a slot even when the field is there, and a
    // full map would grow again (~1.7 k instructions per request, callgrind).
    let more = resp.body().added().count() + resp.headers().len() + 1;
    let mut map = fields.to_map_with_room(more);
    if fields.has_date {
        // Never indexed in HTTP/2's header compression, as nginx sends it: a new
        // value every second, and h2's encoder compares each request's `Date` with
        // every one still in the connection's table (up to ~60 on a connection
        // open a minute: ~2 k instructions per answer, against ~300 to send it
        // whole; docs/performance.md).
        if let Some(date) = map.get_mut(http::header::DATE) {
            date.set_sensitive(true);
        }
    }
    for field in resp.body().added() {
        map.append(field.name().clone(), field.value());
    }
    let added = std::mem::replace(resp.headers_mut(), map);
    for (name, value) in &added {
        resp.headers_mut().append(name, value.clone());
    }
    resp
}

/// Until the listener asks connections to finish.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::thread::LocalKey;
    use tokio::io::AsyncReadExt as _;

    // Per thread: a current-thread test runtime runs the connection tasks on the
    // test's own thread, so tests running in parallel do not see each other's counts.
    thread_local! {
        /// Connections parked while idle (their buffers and serving task dropped).
        pub(crate) static PARKED: Cell<u32> = const { Cell::new(0) };
        /// Parked connections woken by their next request.
        pub(crate) static WOKEN: Cell<u32> = const { Cell::new(0) };
    }

    pub(crate) fn count(counter: &'static LocalKey<Cell<u32>>) {
        counter.with(|c| c.set(c.get() + 1));
    }

    pub(crate) fn counts() -> (u32, u32) {
        (PARKED.with(Cell::get), WOKEN.with(Cell::get))
    }

    /// Sends one request and reads its whole answer (a head and a
    /// `content-length` body).
    pub(crate) async fn exchange(client: &mut TcpStream) {
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        loop {
            assert!(
                client.read_buf(&mut got).await.unwrap() > 0,
                "connection closed"
            );
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&got[..end])
                .unwrap()
                .to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                assert!(!head.contains("connection: close"), "{head}");
                return;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_parked_until_readable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Arc::new(Proxy::new());
        tokio::spawn(crate::server::serve(
            proxy,
            listener,
            std::future::pending(),
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();

        // Busy: requests closer together than `IDLE_RELEASE` keep the buffers.
        for _ in 0..5 {
            exchange(&mut client).await;
            tokio::time::sleep(IDLE_RELEASE / 2).await;
        }
        assert_eq!(counts(), (0, 0));

        // Idle: given back once, and not taken again while nothing arrives.
        tokio::time::sleep(IDLE_RELEASE * 3).await;
        assert_eq!(counts(), (1, 0));

        // The next request takes them again, and the next idle spell gives them back
        // again (the timer, moved on after the first release, is brought back).
        exchange(&mut client).await;
        assert_eq!(counts(), (1, 1));
        tokio::time::sleep(IDLE_RELEASE * 3).await;
        assert_eq!(counts(), (2, 1));
        exchange(&mut client).await;
        assert_eq!(counts(), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_still_closes_at_the_keep_alive_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Arc::new(Proxy::new());
        let timeout = Duration::from_millis(proxy.snapshot().limits.header_timeout_ms);
        tokio::spawn(crate::server::serve(
            proxy,
            listener,
            std::future::pending(),
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
        exchange(&mut client).await;
        // Parked, and still open just before the timeout, which counts from the end
        // of the answer (not from the park)...
        tokio::time::sleep(timeout - Duration::from_millis(100)).await;
        assert_eq!(counts(), (1, 0));
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(50), client.read(&mut byte)).await;
        assert!(
            read.is_err(),
            "closed before the keep-alive timeout: {read:?}"
        );
        // ...and closed at it, without being woken.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0))), "still open: {read:?}");
        assert_eq!(counts(), (1, 0));
    }

    #[test]
    fn a_request_read_here_keeps_its_fields_in_its_head() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nX-One: 1\r\n\r\n";
        let mut head = Box::new(RawHead::EMPTY);
        let p = parse(raw.as_bytes(), &mut head).unwrap().unwrap();
        p.split_head(&mut BytesMut::from(raw), &mut head);
        let req = request(&p, head).unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert!(req.headers().is_empty(), "the fields stay in the head");
        let ClientBody::Read(head) = req.body() else {
            panic!("not the head as read");
        };
        // `Connection` is read, not passed on; every other field is, as it came.
        let names: Vec<_> = head.iter().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [b"Host".to_vec(), b"X-One".to_vec()]);
        assert_eq!(head.get("x-one"), Some(&b"1"[..]));
        assert_eq!(head.values("HOST").collect::<Vec<_>>(), [&b"x"[..]]);
    }
}
