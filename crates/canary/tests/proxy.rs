//! The data plane end to end, against the real binary: forwarded and hop-by-hop
//! headers, host routing, WebSocket, h2c on both sides, trailers, streaming bodies,
//! passive ejection, active health checks, canary fallback, the answers the proxy
//! makes itself, connection limits, clients that hang up or upload slowly, graceful
//! stop, reloads under load, rejected configs and SIGHUP, reloads through symlinks and
//! a ConfigMap's `..data` swap, `canary validate`, and the `/metrics` text.
//!
//! Helpers only these tests need live here rather than in `common`: raw HTTP/1.1 on a
//! socket, and upstreams that stream, send hop-by-hop headers, send trailers, or speak
//! only h2c.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    addrs, client, closed_addr, h2c_client, metric_value, run_canary, send, Canary, Load, LoadSpec,
    Upstream, REQUEST_TIMEOUT,
};
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for anything that should happen "soon" (ejection, health checks,
/// reloads); generous because the machine is slow and shared.
const EVENTUALLY: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------
// Raw HTTP/1.1 on a socket: exact request bytes in, the response as it was framed.
// ---------------------------------------------------------------------------------

/// A response read off the wire (body de-chunked).
#[derive(Debug)]
struct RawReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Trailer fields after a chunked body.
    trailers: Vec<(String, String)>,
}

impl RawReply {
    /// The first value of `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Buffered reads from a socket, for the response parser.
struct Wire<'a> {
    s: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl Wire<'_> {
    /// Reads more bytes; false at EOF.
    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// One line without its CRLF.
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(
                self.more().await,
                "connection closed mid-line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Exactly `n` bytes.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.more().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }
}

/// Reads one HTTP/1.1 response (content-length, chunked, or until EOF).
async fn read_response(s: &mut TcpStream) -> RawReply {
    let mut w = Wire { s, buf: Vec::new() };
    let status_line = w.line().await;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let line = w.line().await;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').expect("header line");
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size_line = w.line().await;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
            if size == 0 {
                loop {
                    let line = w.line().await;
                    let Some((k, v)) = line.split_once(':') else {
                        break;
                    };
                    reply
                        .trailers
                        .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
                break;
            }
            reply.body.extend(w.take(size).await);
            assert_eq!(w.line().await, "", "chunk not followed by CRLF");
        }
    } else if let Some(n) = reply.header("content-length") {
        let n: usize = n.parse().expect("content-length");
        reply.body = w.take(n).await;
    } else if status >= 200 && status != 204 && status != 304 {
        while w.more().await {}
        reply.body = std::mem::take(&mut w.buf);
    }
    reply
}

/// Sends `request` as is on a new connection and reads one response (bounded).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    exchange_on(&mut s, request).await
}

/// Writes `request` on `s` and reads one response, within [`REQUEST_TIMEOUT`].
async fn exchange_on(s: &mut TcpStream, request: &[u8]) -> RawReply {
    let fut = async {
        s.write_all(request).await.expect("write request");
        read_response(s).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("no answer within {REQUEST_TIMEOUT:?} to {request:?}"))
}

// ---------------------------------------------------------------------------------
// Upstreams only these tests need
// ---------------------------------------------------------------------------------

/// An upstream that answers every request on a connection with the same raw bytes
/// (to send headers a well-behaved server library would not).
struct RawUpstream {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl RawUpstream {
    async fn start(response: &'static [u8]) -> RawUpstream {
        RawUpstream::start_with(response, false).await
    }

    /// `close`: close each connection after the response (a body that breaks off).
    async fn start_with(response: &'static [u8], close: bool) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // GETs only: a request ends with its header block.
                    for _ in 0..1000 {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        buf.drain(..end + 4);
                        if s.write_all(response).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, accept }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Byte `i` of every streamed body: a period (251) that does not divide the chunk
/// sizes, so a lost, repeated or reordered chunk shows.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn pattern_chunk(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(offset + i)).collect()
}

type StreamResponse = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// An upstream for streaming:
/// - `POST …/sink`: reads the body as it comes, counting bytes in `received` (so a
///   test can see bytes arrive before it has sent the rest) and checking them against
///   [`pattern`]; answers `{"bytes", "bad_at", "head"}`;
/// - `GET …/stream?bytes=N`: N bytes of [`pattern`]; the first 64 KiB at once, the
///   rest only after `release` is notified (or 20 s).
struct StreamUpstream {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    release: Arc<Notify>,
    accept: JoinHandle<()>,
}

const CHUNK: usize = 64 * 1024;

impl StreamUpstream {
    async fn start() -> StreamUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(AtomicU64::new(0));
        let release = Arc::new(Notify::new());
        let accept = tokio::spawn({
            let (received, release) = (received.clone(), release.clone());
            async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (received, release) = (received.clone(), release.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            stream_service(req, received.clone(), release.clone())
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            }
        });
        StreamUpstream {
            addr,
            received,
            release,
            accept,
        }
    }
}

impl Drop for StreamUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn stream_service(
    req: Request<Incoming>,
    received: Arc<AtomicU64>,
    release: Arc<Notify>,
) -> Result<StreamResponse, Infallible> {
    if req.uri().path().ends_with("/sink") {
        let mut body = req.into_body();
        let (mut n, mut bad_at, mut head) = (0u64, None, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(Some(Ok(frame))) = tokio::time::timeout(REQUEST_TIMEOUT, body.frame()).await
            else {
                break;
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if head.len() < 64 {
                head.extend(data.iter().take(64 - head.len()));
            }
            if bad_at.is_none() {
                bad_at = data
                    .iter()
                    .zip(n..)
                    .find(|(b, i)| **b != pattern(*i))
                    .map(|(_, i)| i);
            }
            n += data.len() as u64;
            received.store(n, Relaxed);
        }
        let out = json!({
            "bytes": n,
            "bad_at": bad_at,
            "head": String::from_utf8_lossy(&head),
        });
        return Ok(Response::new(
            Full::new(Bytes::from(out.to_string())).boxed_unsync(),
        ));
    }
    let total: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let frames = futures_util::stream::unfold(0u64, move |sent| {
        let release = release.clone();
        async move {
            if sent >= total {
                return None;
            }
            if sent > 0 && sent == CHUNK as u64 {
                let _ = tokio::time::timeout(Duration::from_secs(20), release.notified()).await;
            }
            let len = (total - sent).min(CHUNK as u64) as usize;
            let frame = Frame::data(Bytes::from(pattern_chunk(sent, len)));
            Some((Ok::<_, Infallible>(frame), sent + len as u64))
        }
    });
    Ok(Response::new(StreamBody::new(frames).boxed_unsync()))
}

/// An upstream that speaks only HTTP/2 with prior knowledge (h2c), as gRPC servers
/// do: `/healthz` answers 200 or 503 (`healthy`), anything else `hello`.
struct H2OnlyUpstream {
    addr: SocketAddr,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    checks: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl H2OnlyUpstream {
    async fn start() -> H2OnlyUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let checks = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn({
            let (healthy, checks) = (healthy.clone(), checks.clone());
            async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (healthy, checks) = (healthy.clone(), checks.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let (healthy, checks) = (healthy.clone(), checks.clone());
                            async move {
                                let mut r = Response::new(Full::new(Bytes::from("hello\n")));
                                if req.uri().path() == "/healthz" {
                                    checks.fetch_add(1, Relaxed);
                                    if !healthy.load(Relaxed) {
                                        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                    }
                                }
                                Ok::<_, Infallible>(r)
                            }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            }
        });
        H2OnlyUpstream {
            addr,
            healthy,
            checks,
            accept,
        }
    }
}

impl Drop for H2OnlyUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// An upstream (HTTP/1.1 and h2c) that answers like a gRPC server: `Trailer:
/// grpc-status, grpc-message`, a body, then those trailers. It reports the request
/// trailer `x-req-sum` it received (or `none`) in the `x-got-req-sum` header.
struct TrailerUpstream {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl TrailerUpstream {
    async fn start() -> TrailerUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let got =
                            match tokio::time::timeout(REQUEST_TIMEOUT, req.into_body().collect())
                                .await
                            {
                                Ok(Ok(c)) => c
                                    .trailers()
                                    .and_then(|t| t.get("x-req-sum"))
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("none")
                                    .to_string(),
                                _ => "error".to_string(),
                            };
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        trailers.insert("grpc-message", http::HeaderValue::from_static("fine"));
                        let frames = futures_util::stream::iter([
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))),
                            Ok(Frame::trailers(trailers)),
                        ]);
                        let mut r = Response::new(StreamBody::new(frames));
                        let h = r.headers_mut();
                        h.insert(
                            "trailer",
                            http::HeaderValue::from_static("grpc-status, grpc-message"),
                        );
                        h.insert("x-got-req-sum", http::HeaderValue::from_str(&got).unwrap());
                        Ok::<_, Infallible>(r)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        TrailerUpstream { addr, accept }
    }
}

impl Drop for TrailerUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------

/// Polls `/metrics` until the sample `name{labels}` satisfies `pred`; returns it.
async fn wait_metric(
    c: &Canary,
    name: &str,
    labels: &[(&str, &str)],
    what: &str,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let text = c.metrics().await;
        let v = metric_value(&text, name, labels);
        if let Some(v) = v.filter(|v| pred(*v)) {
            return v;
        }
        if Instant::now() >= deadline {
            let related: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
            panic!(
                "{name}{labels:?}: not {what} within {EVENTUALLY:?} (last {v:?})\n{}\nlog:\n{}",
                related.join("\n"),
                c.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(c: &Canary, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = c.metrics().await;
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
}

/// `n` GETs of `path`; panics unless each is 200. Returns the versions that served.
async fn get_ok(c: &Canary, path: &str, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = c.get(path, headers).await;
        assert_eq!(r.status, 200, "GET {path} #{i}: {r:?}\nlog:\n{}", c.log());
        out.push(r.version().unwrap_or("").to_string());
    }
    out
}

/// Reads from `s` until EOF or an error; the bytes read, or `None` if the connection
/// stayed open for `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Asserts the headers an echo upstream saw: these values, and none of `gone`.
fn upstream_saw(h: &Value, want: &[(&str, &str)], gone: &[&str]) {
    for (k, v) in want {
        assert_eq!(h[*k], *v, "upstream header {k}: {h:#}");
    }
    for g in gone {
        assert!(h.get(*g).is_none(), "{g} reached the upstream: {h:#}");
    }
}

/// The peak resident set size of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// 1-based (line, column) of the first occurrence of `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"));
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    (
        text[..at].matches('\n').count() + 1,
        text[line_start..at].chars().count() + 1,
    )
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_are_removed_both_ways() {
    let v1 = Upstream::start("v1").await;
    let hop = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\n\
          Connection: keep-alive, X-Hop-Resp\r\n\
          X-Hop-Resp: secret\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-Upstream-End: kept\r\n\
          X-Canary-Version: spoofed\r\n\
          Set-Cookie: a=1; Path=/\r\n\
          Set-Cookie: b=2; Path=/\r\n\
          Transfer-Encoding: chunked\r\n\
          \r\n\
          6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    let body = format!(
        "routes:\n  - name: hop\n    path_prefix: /hop\n    stable: {{version: h1, upstreams: [\"{h}\"]}}\n    canary: {{version: h2, upstreams: [\"{h}\"]}}\n  - name: web\n    stable: {{version: v1, upstreams: {v}}}\n",
        h = hop.addr,
        v = addrs(&[&v1])
    );
    let c = Canary::start(&body).await;

    // Client → upstream, with a chunked body and every kind of hop-by-hop header.
    let r = raw_exchange(
        c.listen,
        b"POST /echo?x=1 HTTP/1.1\r\n\
          Host: shop.example.test:8080\r\n\
          Connection: keep-alive, X-Secret-Hop\r\n\
          X-Secret-Hop: 1\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
          TE: gzip\r\n\
          X-Forwarded-For: 203.0.113.7\r\n\
          X-Canary-Version: forged\r\n\
          X-Canary-Route: forged\r\n\
          X-Keep: yes\r\n\
          Transfer-Encoding: chunked\r\n\
          \r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-canary-version"), Some("v1"), "{r:?}");
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/echo?x=1");
    let h = &echo["headers"];
    upstream_saw(
        h,
        &[
            ("x-canary-version", "v1"),
            ("x-canary-route", "web"),
            ("x-forwarded-for", "203.0.113.7, 127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "shop.example.test:8080"),
            ("host", "shop.example.test:8080"),
            ("x-keep", "yes"),
        ],
        &[
            "connection",
            "x-secret-hop",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
        ],
    );
    assert!(
        h.get("content-length").is_none() || h.get("transfer-encoding").is_none(),
        "both content-length and transfer-encoding reached the upstream: {h:#}"
    );

    // The same through the proxy's own reader (a bodiless request whose `Connection`
    // names nothing): hop-by-hop fields and forged proxy fields go, the rest passes.
    let r = raw_exchange(
        c.listen,
        b"GET /echo?y=2 HTTP/1.1\r\n\
          hOsT: shop.example.test:8080\r\n\
          Connection: keep-alive\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
          TE: gzip, Trailers;q=1\r\n\
          X-Forwarded-For: 203.0.113.7\r\n\
          x-forwarded-for: 198.51.100.2\r\n\
          X-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: forged.example\r\n\
          X-Canary-Version: forged\r\n\
          X-Canary-Route: forged\r\n\
          Content-Length: 0\r\n\
          X-Keep: yes\r\n\
          \r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let h = &r.json()["headers"];
    upstream_saw(
        h,
        &[
            ("host", "shop.example.test:8080"),
            ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "shop.example.test:8080"),
            ("x-canary-version", "v1"),
            ("x-canary-route", "web"),
            ("te", "trailers"),
            ("x-keep", "yes"),
        ],
        &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
        ],
    );
    assert!(
        h.get("content-length").is_none_or(|v| v == "0") && h.get("transfer-encoding").is_none(),
        "{h:#}"
    );

    // `TE: trailers` is kept (gRPC needs it); without X-Forwarded-For the proxy starts one.
    let r = raw_exchange(
        c.listen,
        b"GET /echo HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\n\r\n",
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(h["te"], "trailers", "{h:#}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h:#}");

    // HTTP/1.0 without Host still gets a well-framed answer.
    let r = raw_exchange(c.listen, b"GET /echo HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-canary-version"), Some("v1"), "{r:?}");
    assert_eq!(r.json()["served_by"], "v1");

    // Several X-Forwarded-For lines are one list: the client address goes at its end.
    let r = raw_exchange(
        c.listen,
        b"GET /echo HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.7, 192.0.2.9\r\n\r\n",
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(
        h["x-forwarded-for"], "198.51.100.1, 203.0.113.7, 192.0.2.9, 127.0.0.1",
        "{h:#}"
    );

    // An upgrade request the upstream does not upgrade: headers named in Connection
    // other than Upgrade are still hop-by-hop.
    let r = raw_exchange(
        c.listen,
        b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, X-Secret-Hop\r\nUpgrade: websocket\r\nX-Secret-Hop: 1\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let h = &r.json()["headers"];
    assert!(
        h.get("x-secret-hop").is_none(),
        "x-secret-hop reached the upstream: {h:#}"
    );

    // Upstream → client: hop-by-hop response headers removed, body re-framed intact.
    let r = raw_exchange(c.listen, b"GET /hop HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("x-canary-version"), Some("h1"), "{r:?}");
    assert_eq!(
        r.count("x-canary-version"),
        1,
        "the upstream's own value: {r:?}"
    );
    assert_eq!(r.header("x-upstream-end"), Some("kept"), "{r:?}");
    // The upstream's cookies and the generated sticky cookie, each on its own line.
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert_eq!(&cookies[..2], ["a=1; Path=/", "b=2; Path=/"], "{cookies:?}");
    assert!(cookies[2].starts_with("canary_id="), "{cookies:?}");
    for gone in ["x-hop-resp", "keep-alive", "proxy-connection"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client: {r:?}");
    }
    assert!(
        !r.header("connection")
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("x-hop-resp"),
        "{r:?}"
    );
    assert!(r.count("transfer-encoding") <= 1, "{r:?}");
    assert!(
        r.header("content-length").is_none() || r.header("transfer-encoding").is_none(),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_by_host_and_path_prefix() {
    let up = Upstream::start("any").await;
    let pool = |v: &str| format!("{{version: {v}, upstreams: {}}}", addrs(&[&up]));
    let body = format!(
        "routes:
  - name: shop
    hosts: [\"shop.example.com\"]
    stable: {}
  - name: org
    hosts: [\"*.example.org\"]
    stable: {}
  - name: ip
    hosts: [\"127.0.0.1\"]
    path_prefix: /ip
    stable: {}
  - name: api
    path_prefix: /api/
    stable: {}
",
        pool("shop"),
        pool("org"),
        pool("ip"),
        pool("api")
    );
    let c = Canary::start(&body).await;
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("shop.example.com", "/", Some("shop")),
        ("SHOP.Example.COM:8080", "/x", Some("shop")),
        ("shop.example.com.evil.test", "/", None),
        ("eu.example.org", "/", Some("org")),
        ("a.b.example.org:443", "/", Some("org")),
        ("example.org", "/", None),
        ("evilexample.org", "/", None),
        ("example.org", "/api/v1", Some("api")),
        ("example.org", "/apix", None),
        ("eu.example.org", "/api/v1", Some("org")),
        ("127.0.0.1:1234", "/ip/x", Some("ip")),
        ("127.0.0.2", "/ip/x", None),
    ];
    let mut wrong = Vec::new();
    for (host, path, want) in cases {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = raw_exchange(c.listen, raw.as_bytes()).await;
        let got = match r.status {
            200 => r.header("x-canary-version").map(str::to_string),
            404 => None,
            s => Some(format!("status {s}")),
        };
        if got.as_deref() != *want {
            wrong.push(format!("Host {host} {path}: got {got:?}, want {want:?}"));
        }
    }
    // HTTP/2 clients name the host in :authority.
    let r = send(&h2c_client(), Method::GET, &c.url("/ip/x"), &[], "")
        .await
        .expect("h2c");
    if r.version() != Some("ip") {
        wrong.push(format!("h2c :authority 127.0.0.1: got {r:?}"));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// RFC 9112 §3.2: one valid `Host` per HTTP/1.1 request, and an absolute-form target
/// names the host itself. Two `Host` lines used to be forwarded both, routed by the
/// first; an absolute-form target was routed by `Host` instead of its own authority.
#[tokio::test]
async fn host_headers_follow_rfc_9112_and_absolute_targets_route_by_their_authority() {
    let up = Upstream::start("any").await;
    let pool = |v: &str| format!("{{version: {v}, upstreams: {}}}", addrs(&[&up]));
    let body = format!(
        "limits: {{max_header_bytes: 2048}}
routes:
  - name: shop
    hosts: [\"shop.example.com\"]
    stable: {}
  - name: other
    stable: {}
",
        pool("shop"),
        pool("other"),
    );
    let c = Canary::start(&body).await;
    for (what, raw) in [
        (
            "two Host lines",
            "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: shop.example.com\r\n\r\n",
        ),
        ("no Host in HTTP/1.1", "GET /echo HTTP/1.1\r\n\r\n"),
        (
            "userinfo and a path in Host",
            "GET /echo HTTP/1.1\r\nHost: a b:c:d@/\r\n\r\n",
        ),
        (
            "a port over 65535",
            "GET /echo HTTP/1.1\r\nHost: 127.0.0.1:99999999\r\n\r\n",
        ),
        (
            "userinfo in an absolute target",
            "GET http://u@shop.example.com/echo HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "a port over 65535 in an absolute target",
            "GET http://shop.example.com:99999/echo HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "an authority-form target on a GET",
            "GET shop.example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ] {
        let r = raw_exchange(c.listen, raw.as_bytes()).await;
        assert_eq!(r.status, 400, "{what}: {r:?}");
        let why = r.text();
        assert!(
            why.contains("Host") || why.contains("request target"),
            "{what}: {r:?}"
        );
    }

    // HTTP/1.0 needs no Host.
    let r = raw_exchange(c.listen, b"GET /echo HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-canary-version"), Some("other"));

    // The absolute target's authority wins over Host, with or without one, and
    // replaces it upstream; the path goes upstream in origin form.
    for raw in [
        "GET http://shop.example.com/echo?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "GET http://shop.example.com/echo?q=1 HTTP/1.1\r\nHost: shop.example.com\r\n\r\n",
    ] {
        let r = raw_exchange(c.listen, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{raw}: {r:?}");
        assert_eq!(r.header("x-canary-version"), Some("shop"), "{raw}");
        let seen = r.json();
        assert_eq!(seen["uri"], "/echo?q=1", "{seen:#}");
        assert_eq!(seen["headers"]["host"], "shop.example.com", "{seen:#}");
        assert_eq!(
            seen["headers"]["x-forwarded-host"], "shop.example.com",
            "{seen:#}"
        );
    }

    // The request target counts toward `max_header_bytes`: alone over it, 414; with
    // the headers over it, 431.
    let long = format!(
        "GET /echo?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(3_000)
    );
    let r = raw_exchange(c.listen, long.as_bytes()).await;
    assert_eq!(r.status, 414, "{r:?}");
    let both = format!(
        "GET /echo?{} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1_200),
        "b".repeat(1_200)
    );
    let r = raw_exchange(c.listen, both.as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    let r = raw_exchange(c.listen, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200, "still serving: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_forwarded_and_messages_round_trip() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: 0\n    rules:\n      - header: {{name: x-canary, value: always}}\n        to: canary\n",
        addrs(&[&v1]),
        addrs(&[&v2])
    );
    let c = Canary::start(&body).await;

    for (forced, want, up) in [(false, "v1", &v1), (true, "v2", &v2)] {
        let before = up.requests();
        let mut req = format!("ws://{}/chat/ws", c.listen)
            .into_client_request()
            .expect("ws request");
        if forced {
            req.headers_mut()
                .insert("x-canary", http::HeaderValue::from_static("always"));
        }
        let stream = TcpStream::connect(c.listen).await.expect("connect");
        let (mut ws, resp) = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_tungstenite::client_async(req, stream),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        assert_eq!(resp.status(), 101);
        assert_eq!(
            resp.headers()
                .get("x-canary-version")
                .and_then(|v| v.to_str().ok()),
            Some(want),
            "{resp:?}"
        );
        assert_eq!(
            up.requests(),
            before + 1,
            "the {want} upstream took the handshake"
        );

        for i in 0..5 {
            let text = format!("message {i} to {want}");
            ws.send(Message::text(text.clone())).await.expect("send");
            let got = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
                .await
                .expect("echo in time")
                .expect("stream open")
                .expect("message");
            assert_eq!(got.into_text().expect("text").as_str(), text);
        }
        let big: Vec<u8> = pattern_chunk(0, 300_000);
        ws.send(Message::binary(big.clone())).await.expect("send");
        let got = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("message");
        assert!(got.is_binary());
        assert_eq!(got.into_data().as_ref(), big.as_slice());
        ws.close(None).await.expect("close");
        // The close ends the tunnel: the stream finishes instead of hanging.
        let end = tokio::time::timeout(REQUEST_TIMEOUT, async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the tunnel stayed open after a close");
    }
    // A handshake the upstream refuses is a plain answer; the connection stays usable.
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    let r = exchange_on(
        &mut s,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("x-canary-version"), Some("v1"));
    let r = exchange_on(&mut s, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "hello from v1\n");
    // Plain HTTP keeps working next to the tunnels.
    get_ok(&c, "/", 3, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_and_http2_upstream_pools() {
    let v1 = Upstream::start("v1").await;
    let g1 = Upstream::start("g1").await;
    let body = format!(
        "routes:\n  - name: grpc\n    path_prefix: /grpc\n    stable: {{version: g1, upstreams: {}, http2: true}}\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&g1]),
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let h2 = h2c_client();
    let h1 = client();

    // (client, path, expected version, expected upstream protocol)
    let cases = [
        (&h2, "/echo", "v1", "HTTP/1.1"),
        (&h2, "/grpc/echo", "g1", "HTTP/2.0"),
        (&h1, "/grpc/echo", "g1", "HTTP/2.0"),
    ];
    for (http, path, want, proto) in cases {
        for i in 0..3 {
            let r = send(
                http,
                Method::POST,
                &c.url(path),
                &[("x-request", "1"), ("te", "trailers")],
                "some body",
            )
            .await
            .unwrap_or_else(|e| panic!("{path} #{i}: {e}"));
            assert_eq!(r.status, 200, "{path}: {r:?}");
            assert_eq!(r.version(), Some(want), "{path}: {r:?}");
            let echo = r.json();
            assert_eq!(echo["version"], proto, "{path}: {echo:#}");
            assert_eq!(echo["method"], "POST");
            let h = &echo["headers"];
            assert_eq!(h["x-canary-version"], want, "{h:#}");
            assert_eq!(h["x-request"], "1", "{h:#}");
            assert_eq!(h["x-forwarded-host"], c.listen.to_string(), "{path}: {h:#}");
            if proto == "HTTP/2.0" {
                // RFC 9113 §8.3.1: a client must not send a Host that differs from
                // :authority (which names the instance the proxy connected to).
                let authority = echo["uri"]
                    .as_str()
                    .and_then(|u| u.strip_prefix("http://"))
                    .and_then(|u| u.split('/').next())
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    h.get("host").is_none() || h["host"] == authority.as_str(),
                    "{path}: host {} differs from :authority {authority}",
                    h["host"]
                );
            }
        }
    }
    // Upgrade-looking and connection-specific headers from an HTTP/1.1 client must not
    // break the HTTP/2 upstream connection (HTTP/2 forbids them).
    let r = send(
        &h1,
        Method::GET,
        &c.url("/grpc/echo"),
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
        ],
        "",
    )
    .await
    .expect("h1 → h2 upstream");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["headers"].get("x-hop").is_none(), "{}", r.body);
    // Only `te: trailers` may reach an HTTP/2 upstream, however the client spelled TE.
    for te in [
        "trailers\r\nTE: gzip",
        "gzip\r\nTE: trailers",
        "gzip, trailers",
        "Trailers",
    ] {
        let raw = format!("GET /grpc/echo HTTP/1.1\r\nHost: x\r\nTE: {te}\r\n\r\n");
        let r = raw_exchange(c.listen, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "TE: {te:?}: {r:?}");
        assert_eq!(
            r.json()["headers"]["te"],
            "trailers",
            "TE: {te:?}: {}",
            r.text()
        );
    }
    // An upgrade handshake cannot cross HTTP/2: it goes as a plain request (no 101),
    // never as a malformed one that blames the upstream.
    for i in 0..6 {
        let r = raw_exchange(
            c.listen,
            b"GET /grpc/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200, "#{i}: {r:?}");
        assert!(r.json()["headers"].get("upgrade").is_none(), "{}", r.text());
    }
    assert_eq!(g1.requests(), 17);
    let m = c.metrics().await;
    assert_eq!(
        metric_value(&m, "canary_request_failures_total", &[("route", "grpc")]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(v1.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_through_for_grpc_and_http1_clients() {
    let up = TrailerUpstream::start().await;
    let body = format!(
        "routes:\n  - name: h2\n    path_prefix: /h2\n    stable: {{version: g1, upstreams: [\"{a}\"], http2: true}}\n  - name: h1\n    stable: {{version: v1, upstreams: [\"{a}\"]}}\n",
        a = up.addr
    );
    let c = Canary::start(&body).await;

    // h2c clients (gRPC), to an h2c and to an HTTP/1.1 pool.
    for path in ["/h2/svc/Method", "/svc/Method"] {
        let req = Request::post(c.url(path))
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"request")))
            .unwrap();
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, h2c_client().request(req))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), 200, "{path}");
        let collected = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
            .await
            .expect("in time")
            .expect("body");
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes().as_ref(), b"payload");
        let trailers = trailers.unwrap_or_else(|| panic!("{path}: no trailers"));
        assert_eq!(trailers["grpc-status"], "0", "{path}: {trailers:?}");
        assert_eq!(trailers["grpc-message"], "fine", "{path}: {trailers:?}");
    }

    // An HTTP/1.1 client that accepts trailers gets them too; its own request trailers
    // reach the upstream.
    let r = raw_exchange(
        c.listen,
        b"POST /svc HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTrailer: x-req-sum\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-req-sum: 42\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "payload");
    assert_eq!(r.header("x-got-req-sum"), Some("42"), "{r:?}");
    let t = |k: &str| {
        r.trailers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(t("grpc-status"), Some("0"), "{r:?}");
    assert_eq!(t("grpc-message"), Some("fine"), "{r:?}");

    // RFC 9110 §10.1.4: a sender of TE also lists it in Connection. That must not
    // cost the upstream its `te: trailers` (nor the client its trailers).
    let r = raw_exchange(
        c.listen,
        b"GET /svc HTTP/1.1\r\nHost: x\r\nConnection: TE\r\nTE: trailers\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.trailers
            .iter()
            .any(|(k, v)| k == "grpc-status" && v == "0"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_without_being_buffered() {
    const SIZE: u64 = 40 * 1024 * 1024;
    let up = StreamUpstream::start().await;
    let body = format!(
        "routes:\n  - name: big\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n",
        up.addr
    );
    let c = Canary::start(&body).await;
    let pid = c.pid().expect("running");

    // A small chunked body arrives as sent.
    let r = raw_exchange(
        c.listen,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["bytes"], 11);
    assert_eq!(r.json()["head"], "hello world");

    // `Expect: 100-continue` (curl's habit for large uploads): the client gets its
    // 100 before sending the body, then the final answer.
    let expect = async {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        s.write_all(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
            .await
            .expect("head");
        let interim = read_response(&mut s).await;
        assert_eq!(interim.status, 100, "{interim:?}");
        s.write_all(&pattern_chunk(0, 1000)).await.expect("body");
        read_response(&mut s).await
    };
    let r = tokio::time::timeout(REQUEST_TIMEOUT, expect)
        .await
        .expect("100-continue exchange in time");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.json()["bytes"].as_u64(), r.json()["bad_at"].is_null()),
        (Some(1000), true)
    );
    let baseline_kib = vm_hwm_kib(pid);

    // Request body: the upstream sees the first bytes before the client has sent the
    // rest, then the whole body arrives in order.
    let upload = async {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        let head = format!("POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&pattern_chunk(0, CHUNK)).await.expect("first");
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while up.received.load(Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the upstream got no body bytes before the body was complete: the proxy buffers requests"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut sent = CHUNK as u64;
        while sent < SIZE {
            let len = (SIZE - sent).min(CHUNK as u64) as usize;
            s.write_all(&pattern_chunk(sent, len)).await.expect("body");
            sent += len as u64;
        }
        read_response(&mut s).await
    };
    let r = tokio::time::timeout(Duration::from_secs(120), upload)
        .await
        .expect("upload within 120 s");
    assert_eq!(r.status, 200, "{r:?}");
    let got = r.json();
    assert_eq!(got["bytes"], SIZE, "{got}");
    assert_eq!(got["bad_at"], Value::Null, "{got}");

    // Response body: the client gets the first bytes while the upstream still holds
    // the rest back, then all of it in order.
    let download = async {
        let req = Request::get(c.url(&format!("/stream?bytes={SIZE}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client().request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-canary-version"], "v1");
        let mut body = resp.into_body();
        let mut n = 0u64;
        let mut released = false;
        while let Some(frame) = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
            .await
            .expect("the first bytes arrived before the upstream sent the rest: the proxy buffers responses")
        {
            let frame = frame.expect("body frame");
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if let Some((_, i)) = data.iter().zip(n..).find(|(b, i)| **b != pattern(*i)) {
                panic!("response byte {i} is wrong");
            }
            n += data.len() as u64;
            if !released {
                released = true;
                up.release.notify_one();
            }
        }
        n
    };
    let n = tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("download within 120 s");
    assert_eq!(n, SIZE);

    let peak_kib = vm_hwm_kib(pid);
    let grew_kib = peak_kib.saturating_sub(baseline_kib);
    eprintln!("proxy peak RSS {baseline_kib} KiB → {peak_kib} KiB for {SIZE} B each way");
    assert!(
        grew_kib < SIZE / 1024 / 2,
        "the proxy's peak RSS grew by {grew_kib} KiB while streaming {SIZE} B bodies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_body_that_breaks_off_is_not_passed_on_as_complete() {
    let chunked = RawUpstream::start_with(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        true,
    )
    .await;
    let sized =
        RawUpstream::start_with(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", true).await;
    let body = format!(
        "routes:\n  - name: sized\n    path_prefix: /sized\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n  - name: chunked\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n",
        sized.addr, chunked.addr
    );
    let c = Canary::start(&body).await;
    for path in ["/", "/sized"] {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let got = read_until_closed(&mut s, REQUEST_TIMEOUT)
            .await
            .expect("the proxy kept the connection open after the upstream broke off");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text:?}");
        let (_, body) = text.split_once("\r\n\r\n").expect("head");
        // Either way the client must be able to tell: no last chunk, or fewer bytes
        // than announced.
        if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            assert!(
                !body.ends_with("0\r\n\r\n"),
                "{path}: looks complete: {text:?}"
            );
        } else {
            let len: usize = text
                .to_ascii_lowercase()
                .split("content-length: ")
                .nth(1)
                .and_then(|v| v.split("\r\n").next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{path}: no framing: {text:?}"));
            assert!(body.len() < len, "{path}: looks complete: {text:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_bodies_and_head_requests_pass_intact() {
    const SIZE: usize = 8 * 1024 * 1024;
    let up = StreamUpstream::start().await;
    let body = format!(
        "routes:\n  - name: h2\n    path_prefix: /h2\n    stable: {{version: v1, upstreams: [\"{a}\"], http2: true}}\n  - name: h1\n    stable: {{version: v1, upstreams: [\"{a}\"]}}\n",
        a = up.addr
    );
    let c = Canary::start(&body).await;
    let h2 = h2c_client();
    // Bigger than HTTP/2's default flow-control windows, to an h1 and an h2c pool.
    for prefix in ["", "/h2"] {
        let req = Request::post(c.url(&format!("{prefix}/sink")))
            .body(Full::new(Bytes::from(pattern_chunk(0, SIZE))))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(60), async {
            let resp = h2.request(req).await.expect("response");
            resp.into_body().collect().await.expect("body").to_bytes()
        })
        .await
        .expect("upload in time");
        let got: Value = serde_json::from_slice(&resp).expect("json");
        assert_eq!(got["bytes"], SIZE, "{prefix}: {got}");
        assert_eq!(got["bad_at"], Value::Null, "{prefix}: {got}");

        up.release.notify_one();
        let req = Request::get(c.url(&format!("{prefix}/stream?bytes={SIZE}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(60), async {
            let resp = h2.request(req).await.expect("response");
            resp.into_body().collect().await.expect("body").to_bytes()
        })
        .await
        .expect("download in time");
        assert_eq!(bytes.len(), SIZE, "{prefix}");
        assert!(
            bytes
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(i as u64)),
            "{prefix}: corrupted download"
        );
    }
    // HEAD: the headers, no body, and the connection stays usable.
    let v1 = Upstream::start("v1").await;
    c.write_config(&format!(
        "routes:\n  - name: h1\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    ));
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "success")],
        "1",
        |v| v == 1.0,
    )
    .await;
    let http = client();
    for _ in 0..3 {
        let r = send(&http, Method::HEAD, &c.url("/"), &[], "")
            .await
            .expect("HEAD");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "");
        assert_eq!(r.version(), Some("v1"));
        assert_eq!(r.header("content-length"), Some("14"), "{r:?}");
        let r = send(&http, Method::GET, &c.url("/"), &[], "")
            .await
            .expect("GET");
        assert_eq!(r.body, "hello from v1\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_instance_is_ejected_and_returns_after_the_back_off() {
    let a = Upstream::start("v1").await;
    let b = Upstream::start("v1").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    ejection: {{consecutive_failures: 3, base: 5s, max: 10s, min_clients: 1}}\n",
        addrs(&[&a, &b])
    );
    let c = Canary::start(&body).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let healthy_a = [("route", "web"), ("upstream", a_addr.as_str())];
    get_ok(&c, "/", 4, &[]).await;
    assert!(a.requests() > 0 && b.requests() > 0, "round robin");
    assert_eq!(metric(&c, "canary_upstream_healthy", &healthy_a).await, 1.0);

    a.set_status(500);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(c.get("/", &[]).await.status);
        if metric(&c, "canary_upstream_healthy", &healthy_a).await == 0.0 {
            break;
        }
    }
    let fails = statuses.iter().filter(|s| **s == 500).count();
    assert_eq!(fails, 3, "ejected after exactly 3 failures: {statuses:?}");
    assert_eq!(
        metric(
            &c,
            "canary_upstream_ejections_total",
            &[("upstream", &a_addr)]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &c,
            "canary_upstream_ejections_total",
            &[("upstream", &b_addr)]
        )
        .await,
        0.0
    );
    // While ejected, the other instance takes everything.
    let a_before = a.requests();
    get_ok(&c, "/", 10, &[]).await;
    assert_eq!(a.requests(), a_before, "an ejected instance got traffic");

    // Back after the back-off, and gets traffic again.
    a.set_status(200);
    wait_metric(&c, "canary_upstream_healthy", &healthy_a, "1", |v| v == 1.0).await;
    get_ok(&c, "/", 6, &[]).await;
    assert!(
        a.requests() > a_before,
        "the instance did not get traffic back"
    );

    // A stopped instance (connect refused) is ejected the same way.
    drop(a);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(c.get("/", &[]).await.status);
        if metric(&c, "canary_upstream_healthy", &healthy_a).await == 0.0 {
            break;
        }
    }
    assert!(
        statuses.iter().filter(|s| **s == 502).count() <= 3,
        "{statuses:?}"
    );
    assert_eq!(
        metric(
            &c,
            "canary_upstream_ejections_total",
            &[("upstream", &a_addr)]
        )
        .await,
        2.0
    );
    get_ok(&c, "/", 10, &[]).await;
    assert!(metric(&c, "canary_upstream_errors_total", &[("kind", "connect")]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_an_instance_out_and_back() {
    let a = Upstream::start("v1").await;
    let b = Upstream::start("v1").await;
    let body = format!(
        "routes:\n  - name: web\n    stable:\n      version: v1\n      upstreams: {}\n      health_check: {{path: /healthz, interval: 100ms, timeout: 80ms, unhealthy_threshold: 2, healthy_threshold: 2}}\n",
        addrs(&[&a, &b])
    );
    let c = Canary::start(&body).await;
    let a_addr = a.addr.to_string();
    let healthy_a = [("route", "web"), ("upstream", a_addr.as_str())];
    get_ok(&c, "/", 4, &[]).await;
    assert!(a.requests() > 0 && b.requests() > 0, "round robin");

    a.set_healthy(false);
    wait_metric(&c, "canary_upstream_healthy", &healthy_a, "0", |v| v == 0.0).await;
    let a_before = a.requests();
    get_ok(&c, "/", 10, &[]).await;
    assert_eq!(
        a.requests(),
        a_before,
        "an instance failing its health check got traffic"
    );
    assert_eq!(
        metric(
            &c,
            "canary_upstream_ejections_total",
            &[("upstream", &a_addr)]
        )
        .await,
        0.0,
        "health checks are not ejections"
    );

    a.set_healthy(true);
    wait_metric(&c, "canary_upstream_healthy", &healthy_a, "1", |v| v == 1.0).await;
    get_ok(&c, "/", 6, &[]).await;
    assert!(
        a.requests() > a_before,
        "the instance did not get traffic back"
    );
}

/// Regression: instances were shared by address across pools, so a reload made a pool
/// without health checks reset the "down" that another pool's check had found, and the
/// checked route sent traffic to an instance failing its checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_naming_one_address_keep_their_own_health() {
    let a = Upstream::start("v1").await;
    let b = Upstream::start("v1").await;
    let body = |timeout: &str| {
        format!(
            "routes:\n  - name: checked\n    path_prefix: /checked\n    stable:\n      version: v1\n      upstreams: {}\n      health_check: {{path: /healthz, interval: 100ms, timeout: 80ms, unhealthy_threshold: 1}}\n  - name: plain\n    stable:\n      version: v1\n      upstreams: {}\n    timeouts: {{request: {timeout}}}\n",
            addrs(&[&a, &b]),
            addrs(&[&a])
        )
    };
    let c = Canary::start(&body("30s")).await;
    let a_addr = a.addr.to_string();
    let checked_a = [("route", "checked"), ("upstream", a_addr.as_str())];
    let plain_a = [("route", "plain"), ("upstream", a_addr.as_str())];
    a.set_healthy(false);
    wait_metric(&c, "canary_upstream_healthy", &checked_a, "0", |v| v == 0.0).await;
    // A reload (the plain route's timeout changes) must not bring it back.
    c.write_config(&body("20s"));
    assert!(
        c.wait_log("config reloaded", EVENTUALLY).await,
        "no reload: {}",
        c.log()
    );
    let before = a.requests();
    get_ok(&c, "/checked", 10, &[]).await;
    assert_eq!(
        a.requests(),
        before,
        "the checked route sent traffic to an instance failing its checks after a reload"
    );
    assert_eq!(metric(&c, "canary_upstream_healthy", &checked_a).await, 0.0);
    // The route without checks still uses it: its view is its own.
    assert_eq!(metric(&c, "canary_upstream_healthy", &plain_a).await, 1.0);
    get_ok(&c, "/", 3, &[]).await;
    assert_eq!(
        a.requests(),
        before + 3,
        "the plain route lost its instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_an_http2_pool_speak_http2() {
    let g = H2OnlyUpstream::start().await;
    let body = format!(
        "routes:\n  - name: grpc\n    stable:\n      version: g1\n      upstreams: [\"{}\"]\n      http2: true\n      health_check: {{interval: 100ms, timeout: 80ms, unhealthy_threshold: 1}}\n",
        g.addr
    );
    let c = Canary::start(&body).await;
    let addr = g.addr.to_string();
    let healthy = [("route", "grpc"), ("upstream", addr.as_str())];
    let deadline = Instant::now() + EVENTUALLY;
    while g.checks.load(Relaxed) < 3 {
        assert!(
            Instant::now() < deadline,
            "an h2c-only upstream never saw a health check\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&c, "canary_upstream_healthy", &healthy).await, 1.0);
    get_ok(&c, "/", 3, &[]).await;

    g.healthy.store(false, Relaxed);
    wait_metric(&c, "canary_upstream_healthy", &healthy, "0", |v| v == 0.0).await;
    g.healthy.store(true, Relaxed);
    wait_metric(&c, "canary_upstream_healthy", &healthy, "1", |v| v == 1.0).await;
    get_ok(&c, "/", 3, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_down_falls_back_to_stable_and_stable_down_is_a_short_502() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let dead = closed_addr();
    let body = format!(
        "routes:
  - name: checked
    path_prefix: /checked
    stable: {{version: v1, upstreams: {v1}}}
    canary:
      version: v2
      upstreams: {v2}
      health_check: {{interval: 100ms, timeout: 80ms, unhealthy_threshold: 1}}
    weight: 100
  - name: passive
    path_prefix: /passive
    stable: {{version: v1, upstreams: {v1}}}
    canary: {{version: v2, upstreams: [\"{dead}\"]}}
    weight: 100
    ejection: {{consecutive_failures: 2, base: 1m, max: 1m, min_clients: 1}}
  - name: nostable
    path_prefix: /nostable
    stable: {{version: v1, upstreams: [\"{dead}\"]}}
    ejection: {{consecutive_failures: 2, base: 1m, max: 1m, min_clients: 1}}
",
        v1 = addrs(&[&v1]),
        v2 = addrs(&[&v2]),
    );
    let c = Canary::start(&body).await;
    let cr = &c;
    let fallbacks = move |route: &'static str| async move {
        metric(cr, "canary_fallbacks_total", &[("route", route)]).await
    };

    // Health-checked canary: up, everyone is on it; down, everyone gets stable.
    let got = get_ok(&c, "/checked", 5, &[]).await;
    assert!(got.iter().all(|v| v == "v2"), "{got:?}");
    assert_eq!(fallbacks("checked").await, 0.0);
    v2.set_healthy(false);
    wait_metric(
        &c,
        "canary_upstream_healthy",
        &[("route", "checked"), ("version", "v2")],
        "0",
        |v| v == 0.0,
    )
    .await;
    let got = get_ok(&c, "/checked", 20, &[]).await;
    assert!(got.iter().all(|v| v == "v1"), "{got:?}");
    assert_eq!(fallbacks("checked").await, 20.0);

    // Canary unreachable without health checks: once ejected, users go to stable.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = c.get("/passive", &[]).await;
        statuses.push((r.status, r.version().map(str::to_string)));
        if r.status == 200 {
            break;
        }
    }
    assert!(
        statuses.len() <= 3,
        "no fallback after the canary was ejected: {statuses:?}"
    );
    let got = get_ok(&c, "/passive", 10, &[]).await;
    assert!(got.iter().all(|v| v == "v1"), "{got:?}");
    assert!(fallbacks("passive").await >= 10.0);

    // No stable instance: a short 502 that leaks nothing.
    for i in 0..4 {
        let r = c.get("/nostable", &[]).await;
        assert_eq!(r.status, 502, "#{i}: {r:?}");
        assert!(
            r.body.len() < 64 && !r.body.contains("127.0.0.1"),
            "#{i}: {:?}",
            r.body
        );
        assert_eq!(r.version(), Some("v1"));
    }
    get_ok(&c, "/checked", 2, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_upstream_failures_get_proper_answers_and_serving_continues() {
    let v1 = Upstream::start("v1").await;
    let slow = Upstream::start("slow").await;
    slow.set_delay_ms(3_000);
    let sink = StreamUpstream::start().await;
    let dead = closed_addr();
    let body = format!(
        "limits: {{max_header_bytes: 2048}}
routes:
  - name: slow
    path_prefix: /slow
    stable: {{version: slow, upstreams: {slow}}}
    timeouts: {{request: 300ms}}
  - name: dead
    path_prefix: /dead
    stable: {{version: v1, upstreams: [\"{dead}\"]}}
    ejection: {{consecutive_failures: 0}}
  - name: sink
    path_prefix: /sink
    stable: {{version: v1, upstreams: [\"{sink}\"]}}
  - name: app
    path_prefix: /app
    stable: {{version: v1, upstreams: {v1}}}
",
        slow = addrs(&[&slow]),
        sink = sink.addr,
        v1 = addrs(&[&v1]),
    );
    let c = Canary::start(&body).await;
    let still_serving = |what: &'static str| {
        let c = &c;
        async move {
            let r = c.get("/app", &[]).await;
            assert_eq!(r.status, 200, "after {what}: {r:?}");
        }
    };
    let short = |r: &RawReply| r.body.len() < 64 && !r.text().contains("127.0.0.1");

    let r = raw_exchange(
        c.listen,
        b"GET /app HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    still_serving("a malformed request").await;

    let r = raw_exchange(c.listen, b"GARBAGE\r\n\r\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    still_serving("a garbage request line").await;

    // Over the configured limit (but under hyper's buffer) and far over it.
    for size in [3_000, 20_000] {
        let req = format!(
            "GET /app HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let r = raw_exchange(c.listen, req.as_bytes()).await;
        assert_eq!(r.status, 431, "{size} B header: {r:?}");
        assert!(short(&r), "{r:?}");
        still_serving("a large header block").await;
    }
    // The same limit for HTTP/2 clients.
    let big = "a".repeat(3_000);
    match send(
        &h2c_client(),
        Method::GET,
        &c.url("/app"),
        &[("x-big", &big)],
        "",
    )
    .await
    {
        Ok(r) => assert_eq!(r.status, 431, "h2c: {r:?}"),
        Err(e) => panic!("h2c with a large header: no answer: {e}"),
    }
    still_serving("a large h2c header block").await;
    // Just under the limit is fine.
    let r = raw_exchange(
        c.listen,
        format!(
            "GET /app HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1_500)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Both Content-Length and Transfer-Encoding (a request-smuggling shape): either
    // refused, or the chunked framing wins and the upstream gets exactly that body.
    let r = raw_exchange(
        c.listen,
        b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    if r.status != 400 {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["head"], "hello", "{r:?}");
    }
    still_serving("content-length with transfer-encoding").await;

    for i in 0..3 {
        let r = raw_exchange(c.listen, b"GET /dead HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(r.status, 502, "#{i}: {r:?}");
        assert!(short(&r), "{r:?}");
        assert_eq!(r.header("x-canary-version"), Some("v1"));
    }
    still_serving("an unreachable upstream").await;

    let r = raw_exchange(c.listen, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(short(&r), "{r:?}");
    assert_eq!(r.header("x-canary-version"), Some("slow"));
    still_serving("an upstream timeout").await;

    let r = raw_exchange(c.listen, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(short(&r), "{r:?}");
    still_serving("no route").await;

    let m = c.metrics().await;
    let v = |name, labels: &[(&str, &str)]| metric_value(&m, name, labels).unwrap_or(-1.0);
    assert_eq!(v("canary_unrouted_requests_total", &[]), 1.0);
    assert_eq!(
        v(
            "canary_upstream_errors_total",
            &[("route", "slow"), ("kind", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "canary_upstream_errors_total",
            &[("route", "dead"), ("kind", "connect")]
        ),
        3.0
    );
}

/// One client connection, several requests: pipelined, then with a body (which the
/// proxy's own reader hands to hyper for the rest of the connection), then again
/// without; HTTP/1.0 keep-alive; `Connection: close` honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_pipelined_requests_bodies_and_http_1_0_keep_alive() {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let exchange = async {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        // Two requests in one write: two answers, in order.
        s.write_all(
            b"GET /one/echo HTTP/1.1\r\nHost: x\r\n\r\nGET /two/echo HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
        // (Read as bytes: `read_response` may read past its response.)
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200")
            .count()
            < 2
            || !got.ends_with(b"}")
        {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        let (one, two) = (text.find("/one/echo"), text.find("/two/echo"));
        assert!(one.is_some() && one < two, "{text}");
        assert!(text.rfind("HTTP/1.1 200") < two, "{text}");
        // A body, then a request without one, then a request split over two writes.
        s.write_all(b"POST /three/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(
            (r.status, r.json()["method"].as_str()),
            (200, Some("POST")),
            "{r:?}"
        );
        assert_eq!(r.json()["headers"]["content-length"], "5");
        s.write_all(b"GET /four/echo HTTP/1.1\r\nHo").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"st: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.json()["uri"], "/four/echo", "{r:?}");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert_eq!(
            rest.as_deref(),
            Some(&b""[..]),
            "closed after Connection: close"
        );

        // A GET with a body that looks like a request: hyper's to frame, and what
        // follows is the next request, never the body taken for one.
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        s.write_all(b"GET /g/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\nGET /smuggled ")
            .await
            .unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.json()["uri"], "/g/echo", "{r:?}");
        assert_eq!(r.json()["headers"]["content-length"], "14", "{r:?}");
        s.write_all(b"GET /after/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.json()["uri"], "/after/echo", "{r:?}");

        // HTTP/1.0 with keep-alive: the connection stays for a second request.
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        for path in ["/a/echo", "/b/echo"] {
            s.write_all(
                format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let r = read_response(&mut s).await;
            assert_eq!(r.json()["uri"], path, "{r:?}");
            assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
            assert!(r.header("content-length").is_some(), "{r:?}");
        }
        // Without keep-alive it closes after the answer.
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        s.write_all(b"GET /c/echo HTTP/1.0\r\n\r\n").await.unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 200, "{r:?}");
        let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert_eq!(
            rest.as_deref(),
            Some(&b""[..]),
            "an HTTP/1.0 connection without keep-alive stays open"
        );
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("the exchanges took over 20 s");
    assert_eq!(v1.requests(), 9, "no smuggled request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_only_with_a_restart_as_the_reload_says() {
    let v1 = Upstream::start("v1").await;
    let body = |limit: u32| {
        format!(
            "limits: {{max_header_bytes: {limit}}}\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
            addrs(&[&v1])
        )
    };
    let c = Canary::start(&body(4096)).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2_000)
    );
    assert_eq!(raw_exchange(c.listen, req.as_bytes()).await.status, 200);

    let mut c = c;
    c.write_config(&body(1024));
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "success")],
        "1",
        |v| v == 1.0,
    )
    .await;
    assert!(c.log().contains("restart"), "{}", c.log());
    let r = raw_exchange(c.listen, req.as_bytes()).await;
    assert_eq!(r.status, 200, "a limit changed by a reload: {r:?}");

    c.restart().await;
    let r = raw_exchange(c.listen, req.as_bytes()).await;
    assert_eq!(r.status, 431, "the new limit after the restart: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_senders_are_cut_off() {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "limits: {{header_timeout: 500ms}}\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let got = got.expect("a connection that never finishes its headers was kept open");
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 408"),
        "unexpected answer {text:?}"
    );
    assert_eq!(v1.requests(), 0);
    get_ok(&c, "/", 2, &[]).await;
}

/// `header_timeout` is also the keep-alive idle timeout: a kept-alive connection is
/// closed once idle for it, after quick requests and after one that took longer than
/// the timeout (its timer went off while the upstream worked, unseen by the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_kept_alive_connections_are_closed_after_the_header_timeout() {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "limits: {{header_timeout: 500ms}}\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for (delay_ms, quick) in [(0, 3), (900, 1)] {
        v1.set_delay_ms(delay_ms);
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        for i in 0..quick {
            let r = exchange_on(&mut s, req).await;
            assert_eq!(
                r.status, 200,
                "request {i} with a {delay_ms} ms upstream: {r:?}"
            );
        }
        let idle_from = Instant::now();
        let got = read_until_closed(&mut s, Duration::from_secs(10)).await;
        let got = got.unwrap_or_else(|| {
            panic!("an idle connection was kept open (upstream delay {delay_ms} ms)")
        });
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        assert!(
            idle_from.elapsed() >= Duration::from_millis(400),
            "closed after {:?} idle, before the timeout",
            idle_from.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_until_one_frees_up() {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "limits: {{max_connections: 3}}\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        let r = exchange_on(&mut s, req).await;
        assert_eq!(r.status, 200, "connection {i}: {r:?}");
        open.push(s);
    }
    // The fourth is closed without an answer.
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    let _ = s.write_all(req).await;
    let got = read_until_closed(&mut s, REQUEST_TIMEOUT)
        .await
        .expect("a connection over the limit was kept open");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // Kept-alive connections still work; closing one lets a new one in.
    let r = exchange_on(&mut open[0], req).await;
    assert_eq!(r.status, 200);
    drop(open.pop());
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        let _ = s.write_all(req).await;
        let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let got = read_until_closed(&mut s, Duration::from_millis(300)).await;
            match got {
                Some(g) if g.is_empty() => None,
                _ => Some(()),
            }
        })
        .await
        .expect("bounded");
        if r.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_is_not_blamed_on_the_version() {
    let slow = Upstream::start("v1").await;
    slow.set_delay_ms(2_000);
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    ejection: {{consecutive_failures: 1, min_clients: 1}}\n    timeouts: {{request: 1s}}\n",
        addrs(&[&slow])
    );
    let c = Canary::start(&body).await;
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let deadline = Instant::now() + EVENTUALLY;
    while slow.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    let labels = [("route", "web"), ("version", "v1")];
    wait_metric(&c, "canary_client_aborts_total", &labels, "1", |v| v == 1.0).await;
    // Wait past the request timeout: the abandoned request must not turn into a 504.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let m = c.metrics().await;
    assert_eq!(
        metric_value(&m, "canary_request_failures_total", &labels),
        Some(0.0),
        "{m}"
    );
    let addr = slow.addr.to_string();
    assert_eq!(
        metric_value(
            &m,
            "canary_upstream_healthy",
            &[("upstream", addr.as_str())]
        ),
        Some(1.0),
        "ejected for a client's hang-up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_a_truncated_body_is_not_blamed_on_the_version() {
    let up = StreamUpstream::start().await;
    let body = format!(
        "routes:\n  - name: h2\n    path_prefix: /h2\n    stable: {{version: v1, upstreams: [\"{a}\"], http2: true}}\n    ejection: {{consecutive_failures: 2, base: 1m, max: 1m, min_clients: 1}}\n  - name: web\n    stable: {{version: v1, upstreams: [\"{a}\"]}}\n    ejection: {{consecutive_failures: 2, base: 1m, max: 1m, min_clients: 1}}\n",
        a = up.addr
    );
    let c = Canary::start(&body).await;
    for i in 0..6 {
        // To an HTTP/1.1 pool, then to an h2c one.
        let path = if i < 3 { "/sink" } else { "/h2/sink" };
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        let head = format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&pattern_chunk(0, 1000)).await.expect("part");
        // Half-close: the body ends early, the client still reads the answer.
        s.shutdown().await.expect("shutdown");
        let got = read_until_closed(&mut s, REQUEST_TIMEOUT)
            .await
            .expect("the connection was kept open");
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400"),
            "#{i}: a client's short body answered as {text:?}"
        );
    }
    let m = c.metrics().await;
    for route in ["web", "h2"] {
        let labels = [("route", route), ("version", "v1")];
        assert_eq!(
            metric_value(&m, "canary_request_failures_total", &labels),
            Some(0.0),
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "canary_client_aborts_total", &labels),
            Some(3.0),
            "{m}"
        );
    }
    let addr = up.addr.to_string();
    assert_eq!(
        metric_value(
            &m,
            "canary_upstream_healthy",
            &[("upstream", addr.as_str())]
        ),
        Some(1.0),
        "the upstream was ejected for clients' short bodies"
    );
    let r = raw_exchange(
        c.listen,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    let up = StreamUpstream::start().await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n    timeouts: {{request: 1s}}\n    ejection: {{consecutive_failures: 1, base: 1m, max: 1m, min_clients: 1}}\n",
        up.addr
    );
    let c = Canary::start(&body).await;
    // The client takes longer than `timeouts.request` to send its body; the upstream
    // answers as soon as the body is complete.
    let upload = async {
        let mut s = TcpStream::connect(c.listen).await.expect("connect");
        s.write_all(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n")
            .await
            .expect("head");
        for i in 0..5u64 {
            s.write_all(&pattern_chunk(i * 1000, 1000))
                .await
                .expect("body");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        read_response(&mut s).await
    };
    let r = tokio::time::timeout(Duration::from_secs(30), upload)
        .await
        .expect("answer in time");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["bytes"], 5000);
    let m = c.metrics().await;
    let labels = [("route", "web"), ("version", "v1")];
    assert_eq!(
        metric_value(&m, "canary_request_failures_total", &labels),
        Some(0.0)
    );

    // A slow upstream is still timed out once the body has gone.
    let slow = Upstream::start("v1").await;
    slow.set_delay_ms(3_000);
    c.write_config(&format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    timeouts: {{request: 1s}}\n",
        addrs(&[&slow])
    ));
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "success")],
        "1",
        |v| v == 1.0,
    )
    .await;
    let r = raw_exchange(
        c.listen,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(r.status, 504, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits() {
    let slow = Upstream::start("v1").await;
    slow.set_delay_ms(1_000);
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&slow])
    );
    let c = Canary::start(&body).await;
    let pid = c.pid().expect("running");
    let url = c.url("/");
    let in_flight = tokio::spawn(async move { send(&client(), Method::GET, &url, &[], "").await });
    let deadline = Instant::now() + EVENTUALLY;
    while slow.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(st.success());
    let r = in_flight
        .await
        .expect("task")
        .expect("the request in flight was cut");
    assert_eq!(r.status, 200, "{r:?}");
    // The process exits by itself (a zombie until the harness reaps it).
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if state.is_empty() || state.contains("State:\tZ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after SIGTERM:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.wait_log("stopping", Duration::from_secs(1)).await,
        "{}",
        c.log()
    );
}

/// A kept-alive connection waiting for its next request is closed when the process
/// stops, well before its idle timeout: the drain does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_kept_alive_connections() {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "limits: {{header_timeout: 60s}}\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    let pid = c.pid().expect("running");
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    for i in 0..2 {
        let r = exchange_on(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(st.success());
    let got = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("an idle connection was kept open after SIGTERM");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_never_fail_a_request() {
    let v1a = Upstream::start("v1").await;
    let v1b = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let api = Upstream::start("api1").await;
    let config = |stable: &[&Upstream], weight: u32, with_api: bool| {
        let api_route = if with_api {
            format!(
                "  - name: api\n    path_prefix: /api\n    stable: {{version: api1, upstreams: {}}}\n",
                addrs(&[&api])
            )
        } else {
            String::new()
        };
        format!(
            "routes:\n{api_route}  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: {weight}\n    sticky: {{header: x-user-id}}\n",
            addrs(stable),
            addrs(&[&v2])
        )
    };
    let c = Canary::start(&config(&[&v1a], 10, false)).await;
    let load = Load::start(
        c.listen,
        LoadSpec {
            concurrency: 6,
            max_requests: 50_000,
            max_duration: Duration::from_secs(30),
            pause: Duration::from_millis(2),
            path: "/".into(),
        },
    );
    let reloads = |n: f64| {
        let c = &c;
        async move {
            wait_metric(
                c,
                "canary_config_reloads_total",
                &[("result", "success")],
                &format!("{n}"),
                |v| v >= n,
            )
            .await;
        }
    };
    let pause = || tokio::time::sleep(Duration::from_millis(300));

    pause().await;
    c.write_config(&config(&[&v1a], 50, false));
    c.wait_weight("web", 50.0).await;
    pause().await;

    c.write_config(&config(&[&v1a], 50, true));
    reloads(2.0).await;
    let r = c.get("/api/x", &[]).await;
    assert_eq!((r.status, r.version()), (200, Some("api1")), "{r:?}");
    pause().await;

    c.write_config(&config(&[&v1a, &v1b], 50, true));
    reloads(3.0).await;
    let deadline = Instant::now() + EVENTUALLY;
    while v1b.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the added upstream got no traffic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pause().await;

    c.write_config(&config(&[&v1b], 20, true));
    c.wait_weight("web", 20.0).await;
    let a_then = v1a.requests();
    pause().await;
    c.write_config(&config(&[&v1b], 30, false));
    c.wait_weight("web", 30.0).await;
    pause().await;

    let samples = load.stop().await;
    assert!(samples.len() >= 100, "too little load: {}", samples.len());
    let failed: Vec<_> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during reloads, e.g. {:?}\nlog:\n{}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)],
        c.log()
    );
    assert!(
        v1a.requests() <= a_then + 6,
        "the removed upstream kept getting traffic"
    );
    let r = c.get("/api/x", &[]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.version(), Some("api1"), "the removed route still served");
    assert_eq!(
        metric(&c, "canary_config_reloads_total", &[("result", "failure")]).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_rejected_with_positions_and_sighup_reloads() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let good = |w: u32| {
        format!(
            "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: {w}\n    sticky: {{header: x-user-id}}\n",
            addrs(&[&v1]),
            addrs(&[&v2])
        )
    };
    let c = Canary::start(&good(20)).await;
    let reloads = |result: &'static str| {
        let c = &c;
        async move { metric(c, "canary_config_reloads_total", &[("result", result)]).await }
    };
    assert_eq!(reloads("failure").await, 0.0);

    let bad_body = format!(
        "{}    rules:\n      - header: {{name: x-group, regex: \"(beta\"}}\n        to: canary\n",
        good(20).replace("weight: 20", "weight: 150")
    );
    let bad = c.full_config(&bad_body);
    c.write_raw_config(&bad);
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "failure")],
        "1",
        |v| v == 1.0,
    )
    .await;
    let log = c.log();
    let (wl, wc) = position(&bad, "150");
    let (rl, rc) = position(&bad, "\"(beta\"");
    for (line, col, what) in [
        (wl, wc, "routes[0].weight: 150"),
        (rl, rc, "routes[0].rules[0].header.regex:"),
    ] {
        let want = format!("canary.yaml:{line}:{col}: {what}");
        assert!(log.contains(&want), "the log lacks {want:?}:\n{log}");
    }
    // The old config keeps serving.
    assert_eq!(c.status("web").await["weight"], 20.0);
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let got = common::versions_for(&c, "/", "x-user-id", &users, 4).await;
    let pct = common::share(&got, "v2");
    assert!((5.0..=35.0).contains(&pct), "weight 20 gave {pct}% v2");

    // SIGHUP re-reads the (still bad) file, and later a good one.
    let hup = || {
        let pid = c.pid().expect("running").to_string();
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    };
    hup();
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "failure")],
        "2",
        |v| v == 2.0,
    )
    .await;
    c.write_config(&good(40));
    c.wait_weight("web", 40.0).await;
    let ok = reloads("success").await;
    hup();
    wait_metric(
        &c,
        "canary_config_reloads_total",
        &[("result", "success")],
        "one more",
        |v| v > ok,
    )
    .await;
    assert!(c.log().contains("SIGHUP"), "{}", c.log());
    assert_eq!(c.status("web").await["weight"], 40.0);
    get_ok(&c, "/", 5, &[("x-user-id", "after")]).await;
}

/// A route `web` (stable v1, canary v2) at `weight`, for the reload tests.
fn weighted(v1: &Upstream, v2: &Upstream, weight: u32) -> String {
    format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: {weight}\n",
        addrs(&[v1]),
        addrs(&[v2])
    )
}

/// Rewrites `path` in place (same inode: truncate and write), as `echo … > file` does.
fn write_in_place(path: &std::path::Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open for writing");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write in place");
}

/// Replaces `path` atomically (temp file in the same directory, rename).
fn replace_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

/// Points the symlink `link` at `to` atomically (new link, rename over), as
/// `ln -sfn` and the kubelet do.
fn swap_symlink(to: &str, link: &std::path::Path) {
    let tmp = link.with_extension("swap");
    std::os::unix::fs::symlink(to, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename symlink over");
}

/// Regression: with `--config` a symlink, or a path through a symlinked directory,
/// edits reached the file but no reload happened (only the link's directory was
/// watched, for the link's own name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_follows_a_symlinked_config_file_and_directory() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let mut c = Canary::start(&weighted(&v1, &v2, 10)).await;
    let d = c.dir.path().to_path_buf();

    // link.yaml -> real.yaml; serve from the link.
    let real = d.join("real.yaml");
    std::fs::write(&real, c.full_config(&weighted(&v1, &v2, 10))).unwrap();
    std::os::unix::fs::symlink("real.yaml", d.join("link.yaml")).unwrap();
    c.config_path = d.join("link.yaml");
    c.restart().await;
    write_in_place(&real, &c.full_config(&weighted(&v1, &v2, 20)));
    c.wait_weight("web", 20.0).await;
    replace_atomically(&real, &c.full_config(&weighted(&v1, &v2, 30)));
    c.wait_weight("web", 30.0).await;

    // cur -> a, served as cur/canary.yaml; then cur -> b.
    for (sub, w) in [("a", 40), ("b", 50)] {
        std::fs::create_dir(d.join(sub)).unwrap();
        let text = c.full_config(&weighted(&v1, &v2, w));
        std::fs::write(d.join(sub).join("canary.yaml"), text).unwrap();
    }
    std::os::unix::fs::symlink("a", d.join("cur")).unwrap();
    c.config_path = d.join("cur").join("canary.yaml");
    c.restart().await;
    assert_eq!(c.status("web").await["weight"], 40.0);
    swap_symlink("b", &d.join("cur"));
    c.wait_weight("web", 50.0).await;
    // The new target's directory is watched now.
    write_in_place(
        &d.join("b").join("canary.yaml"),
        &c.full_config(&weighted(&v1, &v2, 60)),
    );
    c.wait_weight("web", 60.0).await;
    get_ok(&c, "/", 3, &[]).await;
}

/// Regression: a Kubernetes ConfigMap volume (`canary.yaml -> ..data/canary.yaml`,
/// `..data -> ..<timestamp>/`) is updated by swapping `..data` and deleting the old
/// directory; that was never noticed. Each swap must reload exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_follows_a_configmap_data_symlink_swap() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let mut c = Canary::start(&weighted(&v1, &v2, 10)).await;
    let cm = c.dir.path().join("configmap");
    let header = c.header();
    let version = |name: &str, w: u32| {
        std::fs::create_dir_all(cm.join(name)).unwrap();
        let text = format!("{header}{}", weighted(&v1, &v2, w));
        std::fs::write(cm.join(name).join("canary.yaml"), text).unwrap();
    };
    version("..2026_12_01_a", 20);
    std::os::unix::fs::symlink("..2026_12_01_a", cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/canary.yaml", cm.join("canary.yaml")).unwrap();
    c.config_path = cm.join("canary.yaml");
    c.restart().await;
    assert_eq!(c.status("web").await["weight"], 20.0);

    // What the kubelet does: new directory, `..data_tmp` -> it, rename over `..data`,
    // remove the old directory.
    let mut old = "..2026_12_01_a";
    for (n, (new, w)) in [("..2026_12_01_b", 30), ("..2026_12_01_c", 40)]
        .into_iter()
        .enumerate()
    {
        version(new, w);
        std::os::unix::fs::symlink(new, cm.join("..data_tmp")).unwrap();
        std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
        std::fs::remove_dir_all(cm.join(old)).unwrap();
        old = new;
        c.wait_weight("web", f64::from(w)).await;
        wait_metric(
            &c,
            "canary_config_reloads_total",
            &[("result", "success")],
            "counted",
            |v| v >= (n + 1) as f64,
        )
        .await;
    }
    assert_eq!(
        metric(&c, "canary_config_reloads_total", &[("result", "success")]).await,
        2.0,
        "one reload per swap\n{}",
        c.log()
    );
    assert_eq!(
        metric(&c, "canary_config_reloads_total", &[("result", "failure")]).await,
        0.0,
        "a swap never shows a half-written or missing file\n{}",
        c.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_accepts_a_good_file_and_lists_every_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = "listen: 127.0.0.1:8080
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
    canary: {version: v2, upstreams: [\"127.0.0.1:9002\"]}
    weight: 12.5
";
    let good_path = dir.path().join("good.yaml");
    std::fs::write(&good_path, good).unwrap();
    let (code, out, err) = run_canary(&["validate", good_path.to_str().unwrap()], &[], None).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ok"), "{out}");

    let bad = "listen: 127.0.0.1:8080
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
    canary: {version: v2, upstreams: [\"127.0.0.1:9002\"]}
    weight: 150
    rules:
      - header: {name: x-group, regex: \"(beta\"}
        to: canary
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
    ejection: {base: 10s, max: 1s}
";
    let bad_path = dir.path().join("bad.yaml");
    std::fs::write(&bad_path, bad).unwrap();
    let file = bad_path.to_str().unwrap();
    let (code, out, err) = run_canary(&["validate", file], &[], None).await;
    assert_ne!(code, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let expected = [
        (position(bad, "150"), "routes[0].weight:"),
        (
            position(bad, "\"(beta\""),
            "routes[0].rules[0].header.regex:",
        ),
        // The duplicate is the second `web`, on line 10.
        ((10, 11), "routes[1].name:"),
        (position(bad, "1s}"), "routes[1].ejection.max:"),
    ];
    assert_eq!(lines.len(), expected.len(), "one line per error:\n{err}");
    for ((line, col), path) in expected {
        let prefix = format!("{file}:{line}:{col}: {path} ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.len() > prefix.len() + 5),
            "no {prefix:?}… line in:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_have_the_required_families() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: 30\n    sticky: {{header: x-user-id}}\n    rules:\n      - header: {{name: x-canary, value: always}}\n        to: canary\n",
        addrs(&[&v1]),
        addrs(&[&v2])
    );
    let c = Canary::start(&body).await;
    get_ok(&c, "/", 40, &[("x-user-id", "stable-user-0")]).await;
    let forced = get_ok(&c, "/", 10, &[("x-canary", "always")]).await;
    assert!(forced.iter().all(|v| v == "v2"));
    v2.set_status(503);
    for _ in 0..2 {
        let r = c.get("/", &[("x-canary", "always")]).await;
        assert_eq!(r.status, 503);
    }
    let text = c.metrics().await;

    // promtool, as Prometheus would parse and lint it.
    common::promtool_check(&text);

    let v = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}:\n{text}"))
    };
    let web = ("route", "web");
    assert_eq!(
        v(
            "canary_requests_total",
            &[web, ("version", "v1"), ("class", "2xx")]
        ),
        40.0
    );
    // Well-behaved upstreams send nothing unasked-for.
    assert_eq!(
        v(
            "canary_upstream_unasked_bytes_total",
            &[web, ("version", "v2")]
        ),
        0.0
    );
    assert_eq!(
        v(
            "canary_requests_total",
            &[web, ("version", "v2"), ("class", "2xx")]
        ),
        10.0
    );
    assert_eq!(
        v(
            "canary_requests_total",
            &[web, ("version", "v2"), ("class", "5xx")]
        ),
        2.0
    );
    // Histogram: cumulative buckets ending in +Inf = _count, and a plausible _sum.
    for (version, n) in [("v1", 40.0), ("v2", 12.0)] {
        let buckets: Vec<(String, f64)> = text
            .lines()
            .filter(|l| {
                l.starts_with("canary_request_duration_seconds_bucket{")
                    && l.contains("route=\"web\"")
                    && l.contains(&format!("version=\"{version}\""))
            })
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                (
                    le.to_string(),
                    l.rsplit(' ').next().unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert!(buckets.len() >= 5, "{version}: {buckets:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{version}: not cumulative {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), n));
        let labels = [web, ("version", version)];
        assert_eq!(v("canary_request_duration_seconds_count", &labels), n);
        let sum = v("canary_request_duration_seconds_sum", &labels);
        assert!(
            sum > 0.0 && sum < n * REQUEST_TIMEOUT.as_secs_f64(),
            "{sum}"
        );
    }
    assert_eq!(v("canary_route_weight_percent", &[web]), 30.0);
    for (version, up) in [("v1", &v1), ("v2", &v2)] {
        let addr = up.addr.to_string();
        assert_eq!(
            v(
                "canary_upstream_healthy",
                &[web, ("version", version), ("upstream", &addr)]
            ),
            1.0
        );
    }
    assert_eq!(v("canary_fallbacks_total", &[web]), 0.0);
    // Dashboards tell canary from stable by this join.
    for (version, role) in [("v1", "stable"), ("v2", "canary")] {
        assert_eq!(
            v(
                "canary_route_version_info",
                &[web, ("version", version), ("role", role)]
            ),
            1.0
        );
    }
    assert_eq!(
        v("canary_config_reloads_total", &[("result", "success")]),
        0.0
    );
    assert_eq!(
        v("canary_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    for family in [
        "canary_requests_total",
        "canary_request_duration_seconds",
        "canary_route_weight_percent",
        "canary_upstream_healthy",
        "canary_fallbacks_total",
        "canary_config_reloads_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no TYPE line for {family}"
        );
    }
}

#[tokio::test]
async fn a_reload_that_changes_nothing_says_so_instead_of_an_empty_changes_list() {
    let a = Upstream::start("v1").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&a])
    );
    let c = Canary::start(&body).await;
    c.write_config(&body);
    assert!(
        c.wait_log("config reloaded: nothing changed", EVENTUALLY)
            .await,
        "{}",
        c.log()
    );
    let log = c.log();
    assert!(
        !log.lines()
            .any(|l| l.ends_with("changes=") || l.contains("changes= ")),
        "{log}"
    );
}
