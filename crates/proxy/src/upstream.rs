//! HTTP/1.1 upstream connections: a keep-alive pool per instance and data-plane worker.
//!
//! Why not hyper-util's legacy `Client` for HTTP/1 pools: its pool is a map keyed by
//! `(scheme, authority)`, so every request hashes its key twice (SipHash, byte by
//! byte), takes the pool's mutex twice, builds a `Checkout`/connect race, boxes the
//! connection's info, and spawns a task per request that waits for the connection to
//! become idle before putting it back. Profiled, that was ~6 k of ~42 k instructions
//! per proxied request (`docs/performance.md`). Here the pool is already chosen (the
//! instance and the worker are known), a connection is popped from that worker's list
//! and pushed back by the response body when it ends: no hashing, an uncontended lock,
//! no task. The connections themselves are hyper's own (`hyper::client::conn::http1`);
//! only the pooling is ours. HTTP/2 pools keep the legacy client, which multiplexes.
//!
//! What the legacy client gave that this keeps: a request that could not be written
//! because its pooled connection had just been closed by the upstream is retried on
//! another connection (the body has not been touched then). Beyond it: a request that
//! was written to a pooled connection the upstream then closed without answering is
//! sent again when that is safe (idempotent, no body), so an upstream's keep-alive
//! timeout never shows as a `502` blamed on its version; idle connections are
//! reaped after [`IDLE_TIMEOUT_MS`] and capped at [`MAX_IDLE`] per worker and
//! instance; connections support upgrades (WebSocket); `Host` and the origin-form
//! URI are the caller's job (`forward::build_upstream_request`).

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::forward::{BodyEnd, UpstreamBody};
use crate::pool::now_ms;

/// Idle connections kept per instance and worker; more are closed when they come back.
pub const MAX_IDLE: usize = 256;
/// An idle connection unused for this long is closed.
pub const IDLE_TIMEOUT_MS: u64 = 90_000;
/// TCP keep-alive probes on upstream connections start after this idle time.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// What an upstream request body must be (the proxy's is [`UpstreamBody`]); `Default`
/// is an empty body, for sending a request that had none again.
pub trait RequestBody:
    Body<Data = Bytes, Error: Into<Box<dyn StdError + Send + Sync>>> + Default + Send + 'static
{
}
impl<B> RequestBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn StdError + Send + Sync>>> + Default + Send + 'static
{
}

/// One worker's idle connections to one instance, most recently used last.
pub struct IdleList<B = UpstreamBody> {
    // Only the owning worker's thread takes this lock (one list per worker), so it
    // is never contended; it exists because instances are shared through the snapshot.
    conns: Mutex<Vec<Idle<B>>>,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since_ms: u64,
}

impl<B> Default for IdleList<B> {
    fn default() -> Self {
        IdleList {
            conns: Mutex::new(Vec::new()),
        }
    }
}

impl<B> fmt::Debug for IdleList<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.conns.lock().map_or(0, |c| c.len());
        f.debug_struct("IdleList").field("idle", &n).finish()
    }
}

impl<B: RequestBody> IdleList<B> {
    /// A connection ready for a request, if one is idle.
    fn pop(&self) -> Option<SendRequest<B>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(idle) = conns.pop() {
            if idle.sender.is_ready() {
                return Some(idle.sender);
            }
            // Closed by the upstream while idle (or otherwise unusable): drop it.
        }
        None
    }

    /// Puts a connection back once its exchange has finished.
    fn push(self: &Arc<Self>, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        if !sender.is_ready() {
            // The connection task has not yet seen the end of the exchange (rare: the
            // body's end reached us before it went idle). Wait for it off the request.
            let list = self.clone();
            tokio::spawn(async move {
                let mut sender = sender;
                if sender.ready().await.is_ok() {
                    list.put(sender);
                }
            });
            return;
        }
        self.put(sender);
    }

    fn put(&self, sender: SendRequest<B>) {
        self.put_at(sender, now_ms());
    }

    fn put_at(&self, sender: SendRequest<B>, now: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Reap from the cold end: the list is used LIFO, so the oldest idle is first.
        while conns
            .first()
            .is_some_and(|c| now.saturating_sub(c.since_ms) > IDLE_TIMEOUT_MS)
        {
            conns.remove(0);
        }
        if conns.len() < MAX_IDLE {
            conns.push(Idle {
                sender,
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
    Connect(Box<dyn StdError + Send + Sync>),
    /// The connection failed during the exchange (reset, closed early, bad response).
    Protocol(Box<dyn StdError + Send + Sync>),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

/// Sends `req` to `addr` on a pooled connection from `idle`, or a new one.
///
/// The response's body gives the connection back to `idle` when it has been read to
/// its end; a response whose body is dropped early, or a `101 Switching Protocols`,
/// keeps its connection out of the pool.
pub async fn send<B: RequestBody>(
    idle: &Arc<IdleList<B>>,
    addr: &str,
    connect_ms: u64,
    mut req: Request<B>,
) -> Result<Response<PooledBody<B>>, SendError> {
    // Pooled connections first. One the upstream has just closed hands the request
    // back unsent, and the next one gets it. An upstream may also close an idle
    // connection without `Connection: close` just as a request is written to it (its
    // FIN still on the way): a request that can be sent again (idempotent, no body)
    // is then sent again on the next connection, as nginx does; the upstream never
    // answered it, so no answer is lost or repeated.
    while let Some(mut sender) = idle.pop() {
        let replay = Replay::of(&req);
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(finish(resp, sender, idle)),
            Err(mut e) => match (e.take_message(), replay) {
                (Some(r), _) => req = r,
                (None, Some(replay)) if closed_unanswered(e.error()) => {
                    tracing::debug!(upstream = addr, error = %e.error(), "pooled connection closed under a request; sending it again");
                    req = replay.request();
                }
                (None, _) => return Err(SendError::Protocol(e.into_error().into())),
            },
        }
    }
    let mut sender = connect(addr, connect_ms).await?;
    match sender.send_request(req).await {
        Ok(resp) => Ok(finish(resp, sender, idle)),
        Err(e) => Err(SendError::Protocol(e.into())),
    }
}

/// A copy of a request that has no body and may be sent twice (RFC 9110 §9.2.2).
/// Taken for every such request on a pooled connection, so kept cheap: the header
/// fields go into one flat `Vec` (their values are reference-counted), and a
/// `HeaderMap` is only built again in the rare case the request is sent again.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Replay {
    fn of<B: Body>(req: &Request<B>) -> Option<Replay> {
        if !req.body().is_end_stream() || !req.method().is_idempotent() {
            return None;
        }
        let mut headers = Vec::with_capacity(req.headers().len());
        headers.extend(req.headers().iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers,
        })
    }

    fn request<B: Default>(self) -> Request<B> {
        let mut req = Request::new(B::default());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        let h = req.headers_mut();
        h.reserve(self.headers.len());
        for (k, v) in self.headers {
            h.append(k, v);
        }
        req
    }
}

/// Whether an error says the connection went away before any answer came: the
/// upstream closed or reset it, not a bad or slow answer.
fn closed_unanswered(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = StdError::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

fn finish<B: RequestBody>(
    resp: Response<Incoming>,
    sender: SendRequest<B>,
    idle: &Arc<IdleList<B>>,
) -> Response<PooledBody<B>> {
    let reuse = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
    resp.map(|inner| {
        let mut body = PooledBody {
            inner,
            release: reuse.then(|| (sender, idle.clone())),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    })
}

async fn connect<B: RequestBody>(addr: &str, connect_ms: u64) -> Result<SendRequest<B>, SendError> {
    let stream = tokio::time::timeout(Duration::from_millis(connect_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::Connect("connect timed out".into()))?
        .map_err(|e| SendError::Connect(e.into()))?;
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(e.into()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream response body that returns its connection to the pool at its end.
pub struct PooledBody<B = UpstreamBody> {
    inner: Incoming,
    release: Option<(SendRequest<B>, Arc<IdleList<B>>)>,
}

impl PooledBody {
    /// A body whose connection is not pooled here (HTTP/2 pools).
    pub fn unpooled(inner: Incoming) -> PooledBody {
        PooledBody {
            inner,
            release: None,
        }
    }
}

impl<B: RequestBody> PooledBody<B> {
    fn release(&mut self) {
        if let Some((sender, idle)) = self.release.take() {
            idle.push(sender);
        }
    }
}

impl<B> fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.release.is_some())
            .finish()
    }
}

impl<B: RequestBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match BodyEnd::of(&r, this.inner.is_end_stream()) {
            Some(BodyEnd::Sent) => this.release(),
            // A broken body leaves the connection in an unknown state: never reuse it.
            Some(BodyEnd::Broken) => this.release = None,
            None => {}
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
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
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

    /// A raw HTTP/1.1 server that answers each request head with `hello` until `close`
    /// says otherwise. Counts accepted connections.
    async fn server(close: Close) -> (String, Arc<AtomicUsize>) {
        let (answers, wait_for_next) = match close {
            Close::AfterAnswers(n) => (n, false),
            Close::OnRequestAfter(n) => (n, true),
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                count.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if answered == answers {
                                return; // closes, this request unanswered
                            }
                            let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if s.write_all(r).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if answered == answers && !wait_for_next {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    type Idle = IdleList<Empty<Bytes>>;

    fn get() -> Request<Empty<Bytes>> {
        Request::get("/")
            .header("host", "x")
            .body(Empty::new())
            .unwrap()
    }

    async fn body<B: RequestBody>(resp: Response<PooledBody<B>>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_body_has_been_read() {
        let (addr, accepted) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        for _ in 0..5 {
            let resp = send(&idle, &addr, 1000, get()).await.unwrap();
            assert_eq!(body(resp).await, "hello");
            assert_eq!(idle.len(), 1);
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_whose_body_is_dropped_unread_does_not_return_its_connection() {
        let (addr, accepted) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        let resp = send(&idle, &addr, 1000, get()).await.unwrap();
        drop(resp);
        assert!(idle.is_empty());
        let resp = send(&idle, &addr, 1000, get()).await.unwrap();
        assert_eq!(body(resp).await, "hello");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
        let (addr, accepted) = server(Close::AfterAnswers(1)).await;
        let idle = Arc::new(Idle::default());
        for _ in 0..3 {
            let resp = send(&idle, &addr, 1000, get()).await.unwrap();
            assert_eq!(body(resp).await, "hello");
            // Let the connection task see the upstream's close.
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
            let resp = send(&idle, &addr, 1000, get()).await;
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
        body(send(&idle, &addr, 1000, post()).await.unwrap()).await;
        let err = send(&idle, &addr, 1000, post()).await.unwrap_err();
        assert!(matches!(err, SendError::Protocol(_)), "{err}");
        let with_body = || {
            Request::put("/")
                .header("host", "x")
                .body(http_body_util::Full::new(Bytes::from_static(b"x")))
                .unwrap()
        };
        let idle = Arc::new(IdleList::default());
        body(send(&idle, &addr, 1000, with_body()).await.unwrap()).await;
        let err = send(&idle, &addr, 1000, with_body()).await.unwrap_err();
        assert!(matches!(err, SendError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let idle = Arc::new(Idle::default());
        let err = send(&idle, &addr, 1000, get()).await.unwrap_err();
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
    async fn idle_connections_are_capped() {
        let (addr, _) = server(Close::AfterAnswers(usize::MAX)).await;
        let idle = Arc::new(Idle::default());
        // MAX_IDLE + 2 exchanges in flight at once, then all bodies read.
        let mut resps = Vec::new();
        for _ in 0..MAX_IDLE + 2 {
            resps.push(send(&idle, &addr, 1000, get()).await.unwrap());
        }
        for r in resps {
            body(r).await;
        }
        assert_eq!(idle.len(), MAX_IDLE);
    }
}
