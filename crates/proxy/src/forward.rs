//! The per-request handler: route, decide, forward, record, answer.
//!
//! Errors become HTTP answers in one place ([`error_response`]); upstream failures
//! are classified by where they came from (connect, timeout, protocol) so ejection,
//! the breaker and the analysis blame the right party, and a client that hangs up is
//! never counted against a version.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_core::routing::cookie_value;
use canary_core::sticky_id::IdSource;
use canary_core::{RequestFacts, Target};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::metrics::UpstreamError;
use crate::pool::{now_ms, Instance, Pool};
use crate::snapshot::{Proxy, RouteEntry};
use crate::upstream::{self, AddedField, Extra, PooledBody, RawHead, SendError};

/// The body the proxy answers with: the upstream's stream, or a short error text
/// ([`PooledBody::fixed`]).
pub type ProxyBody = PooledBody;

pub(crate) static X_CANARY_VERSION: HeaderName = HeaderName::from_static("x-canary-version");
pub(crate) static X_CANARY_ROUTE: HeaderName = HeaderName::from_static("x-canary-route");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fields the proxy sets on every upstream request ([`Added`]): a client's own are
/// never passed on, `X-Forwarded-Host` even when the proxy sets none. The read path
/// drops them by `upstream::not_forwarded`, its own fast switch on the name's length;
/// a test keeps the two in step.
static PROXY_REQUEST_FIELDS: [&HeaderName; 5] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_HOST,
    &X_FORWARDED_PROTO,
    &X_CANARY_VERSION,
    &X_CANARY_ROUTE,
];

/// How a request body on its way to an HTTP/2 upstream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyEnd {
    /// The last byte was handed over.
    Sent,
    /// The body broke off (ended early, or failed).
    Broken,
}

impl BodyEnd {
    /// Whether this poll of a body ended it; `at_end` is the body's `is_end_stream()`
    /// after the poll (with a Content-Length, hyper stops polling there and never
    /// sees the `None`).
    fn of<T, E>(poll: &Poll<Option<Result<T, E>>>, at_end: bool) -> Option<BodyEnd> {
        match poll {
            Poll::Ready(Some(Ok(_))) if at_end => Some(BodyEnd::Sent),
            Poll::Ready(None) => Some(BodyEnd::Sent),
            Poll::Ready(Some(Err(_))) => Some(BodyEnd::Broken),
            _ => None,
        }
    }
}

/// A client's request body: hyper's, or none. A request the proxy's own HTTP/1.1
/// reader took (`h1`: only requests without a body) has `Read`: its head,
/// whose fields stand in for the empty `HeaderMap`.
#[derive(Debug)]
pub enum ClientBody {
    Empty,
    Read(Box<RawHead>),
    Hyper(Incoming),
}

impl ClientBody {
    /// The head the proxy read, taken out (the body is then `Empty`).
    fn take_head(&mut self) -> Option<Box<RawHead>> {
        match std::mem::replace(self, ClientBody::Empty) {
            ClientBody::Read(head) => Some(head),
            other => {
                *self = other;
                None
            }
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Empty | ClientBody::Read(_) => Poll::Ready(None),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty | ClientBody::Read(_) => true,
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty | ClientBody::Read(_) => SizeHint::with_exact(0),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// The request body on its way upstream. To an HTTP/2 pool it reports how it ended,
/// so that `timeouts.request` times the upstream rather than a slow client upload, and
/// a client's broken body is not blamed on the upstream (an HTTP/1.1 exchange sees
/// both itself).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: ClientBody,
    end: Option<oneshot::Sender<BodyEnd>>,
}

impl UpstreamBody {
    /// Wraps `body`; the receiver tells how it ended (`None` for a request without a
    /// body, nothing to wait for, or when not `reported`: an HTTP/1.1 exchange sees the
    /// body end itself).
    fn new(
        inner: ClientBody,
        reported: bool,
    ) -> (UpstreamBody, Option<oneshot::Receiver<BodyEnd>>) {
        if inner.is_end_stream() || !reported {
            return (UpstreamBody { inner, end: None }, None);
        }
        let (tx, rx) = oneshot::channel();
        (
            UpstreamBody {
                inner,
                end: Some(tx),
            },
            Some(rx),
        )
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(end) = BodyEnd::of(&r, this.inner.is_end_stream()) {
            if let Some(tx) = this.end.take() {
                let _ = tx.send(end);
            }
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

/// Waits for an HTTP/2 upstream's response headers, for at most `timeout` after the
/// request body has been sent whole (at once for a request without a body). Also
/// returns whether the client's body broke off. (An HTTP/1.1 exchange times itself,
/// on its connection's timer: `upstream::send`.)
async fn response_within<F: Future>(
    response: F,
    body_end: Option<oneshot::Receiver<BodyEnd>>,
    timeout: Duration,
) -> (Result<F::Output, tokio::time::error::Elapsed>, bool) {
    tokio::pin!(response);
    let mut broken = false;
    if let Some(mut end) = body_end {
        tokio::select! {
            biased;
            e = &mut end => broken = e == Ok(BodyEnd::Broken),
            r = &mut response => {
                return (Ok(r), end.try_recv() == Ok(BodyEnd::Broken));
            }
        }
    }
    (tokio::time::timeout(timeout, response).await, broken)
}

/// Per-connection facts computed once per connection rather than per request.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub peer_header: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr) -> ConnInfo {
        let ip = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo { peer, peer_header }
    }
}

/// A request's fields: in its `HeaderMap`, or in the head the proxy read.
#[derive(Clone, Copy)]
enum RequestFields<'a> {
    Map(&'a HeaderMap),
    Raw(&'a RawHead),
}

impl<'a> RequestFields<'a> {
    fn of(req: &'a Request<ClientBody>) -> RequestFields<'a> {
        match req.body() {
            ClientBody::Read(head) => RequestFields::Raw(head),
            _ => RequestFields::Map(req.headers()),
        }
    }

    /// The first value of `name` (lowercase).
    #[inline]
    fn get(self, name: &str) -> Option<&'a [u8]> {
        match self {
            RequestFields::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            RequestFields::Raw(r) => r.get(name),
        }
    }

    /// Every value of `name` (lowercase), in order.
    fn values(self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        match self {
            RequestFields::Map(m) => Values::Map(m.get_all(name).iter().map(HeaderValue::as_bytes)),
            RequestFields::Raw(r) => Values::Raw(r.values(name)),
        }
    }

    /// Size of the header block as it came in (names, values, separators).
    fn size(self) -> usize {
        match self {
            RequestFields::Map(m) => m.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum(),
            RequestFields::Raw(r) => r.iter().map(|(k, v)| k.len() + v.len() + 4).sum(),
        }
    }
}

/// The values of one field name from either kind of [`RequestFields`]. (Two chained
/// `Option` iterators, flattened, cost ~40 instructions per field looked at; the three
/// lookups a request makes were 3% of a browser-like request.)
enum Values<M, R> {
    Map(M),
    Raw(R),
}

impl<'a, M, R> Iterator for Values<M, R>
where
    M: Iterator<Item = &'a [u8]>,
    R: Iterator<Item = &'a [u8]>,
{
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(m) => m.next(),
            Values::Raw(r) => r.next(),
        }
    }
}

/// The request as the core sees it.
struct Facts<'a> {
    fields: RequestFields<'a>,
    query: Option<&'a str>,
    ip: IpAddr,
}

impl RequestFacts for Facts<'_> {
    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields.get(name)
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        self.fields
            .values("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| cookie_value(v, name))
    }
    fn query(&self, name: &str) -> Option<&str> {
        canary_core::routing::query_value(self.query?, name)
    }
    fn source_ip(&self) -> Option<IpAddr> {
        Some(self.ip)
    }
}

/// A short plain-text answer the proxy generates itself; never leaks internals.
pub fn error_response(status: StatusCode, msg: &'static str) -> Box<Response<ProxyBody>> {
    let mut r = Box::new(Response::new(PooledBody::fixed(msg)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A fresh sticky id (see [`IdSource`]), from one source per process seeded from
/// std's `RandomState`.
fn generate_id() -> [u8; 32] {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    static IDS: OnceLock<IdSource> = OnceLock::new();
    IDS.get_or_init(|| {
        IdSource::new(std::hash::RandomState::new().hash_one(0x9e37_79b9_7f4a_7c15u64))
    })
    .next_id()
}

/// Size of the request target (path and query, and the authority of an absolute form).
fn target_bytes(uri: &Uri) -> usize {
    uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
}

const BAD_HOST: &str = "missing or invalid Host header\n";

/// The host a request is for (RFC 9112 §3.2): the request target's authority when it
/// has one (an absolute-form target, or HTTP/2's `:authority`), which overrides
/// `Host`; else its one `Host` line. `Err` (the answer's text) for a request the RFC
/// says must get a `400`: more than one `Host` line, an invalid one, an HTTP/1.1
/// request without, or an invalid target authority.
fn request_host(req: &Request<ClientBody>) -> Result<Option<Host>, &'static str> {
    let mut lines = RequestFields::of(req).values("host");
    let host = lines.next();
    if lines.next().is_some() {
        return Err(BAD_HOST);
    }
    if let Some(a) = req.uri().authority() {
        // An authority-form target (`GET host:80`) is for CONNECT only (RFC 9112
        // §3.2.3), and userinfo has no place in an `http` target (RFC 9110 §4.2.4):
        // `host_name` refuses `@`.
        const BAD_TARGET: &str = "invalid request target\n";
        if req.uri().scheme().is_none() && req.method() != http::Method::CONNECT {
            return Err(BAD_TARGET);
        }
        let name = host_name(a.as_str().as_bytes()).ok_or(BAD_TARGET)?;
        let value = Bytes::copy_from_slice(a.as_str().as_bytes());
        return Ok(Some(Host { value, name }));
    }
    let Some(h) = host else {
        return match req.version() {
            Version::HTTP_11 => Err(BAD_HOST),
            _ => Ok(None),
        };
    };
    let name = host_name(h).ok_or(BAD_HOST)?;
    let value = match req.body() {
        // A slice of the head the proxy read: no copy.
        ClientBody::Read(head) => head.head.slice_ref(h),
        _ => Bytes::copy_from_slice(h),
    };
    Ok(Some(Host { value, name }))
}

/// A request's host: the value as it came, and where in it the name is. Bytes, not a
/// `HeaderValue`: `host_name` checked them (a subset of what a field value may hold),
/// and a `HeaderValue` would check them again (~1% of a request's instructions); one
/// is made only for an HTTP/2 upstream's map.
struct Host {
    value: Bytes,
    /// The name without the port (and an IPv6 address without its brackets).
    name: std::ops::Range<usize>,
}

impl Host {
    fn name(&self) -> &[u8] {
        &self.value[self.name.clone()]
    }
}

/// Where the host name is in a valid `Host` value, `None` if it is not one: `host[:port]`,
/// the host a registered name, an IPv4 address or a bracketed IPv6 address, the port
/// at most 65535. Written here because `http::uri::Authority` parses only by copying
/// into a new buffer, once per request, and accepts userinfo.
fn host_name(h: &[u8]) -> Option<std::ops::Range<usize>> {
    if let [b'[', ..] = h {
        // A bracketed IPv6 address (rare): its own rules.
        let (host, port) = match h.iter().rposition(|&c| c == b':') {
            Some(i) if h[..i].ends_with(b"]") => (&h[..i], &h[i + 1..]),
            _ => (h, &b""[..]),
        };
        let ok = match host {
            [b'[', inner @ .., b']'] => {
                !inner.is_empty()
                    && inner
                        .iter()
                        .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
            }
            _ => false,
        };
        return (ok && valid_port(port)).then(|| 1..host.len() - 1);
    }
    // One pass: the name's bytes up to the first that is not one, which must be the
    // port's `:` (or the end).
    let end = h
        .iter()
        .position(|&c| !REG_NAME[usize::from(c)])
        .unwrap_or(h.len());
    let ok = end > 0
        && match h.get(end) {
            None => true,
            Some(b':') => valid_port(&h[end + 1..]),
            Some(_) => false,
        };
    ok.then_some(0..end)
}

/// A port: up to five digits (none is allowed: RFC 3986 §3.2.3), at most 65535.
fn valid_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port
            .iter()
            .try_fold(0u32, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
            })
            .is_some_and(|n| n <= 65_535)
}

/// The bytes of a reg-name or IPv4 address: unreserved, sub-delims and `%` (RFC 3986
/// §3.2.2). A table, as every request's host is checked byte by byte.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric();
        c += 1;
    }
    let extra = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `keep_upgrade` keeps `Upgrade` (and `Connection: upgrade`) for a WebSocket
/// handshake; the other headers `Connection` names are removed even then.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the (few) names first: most messages carry no hop-by-hop header
    // but `Connection`, and each `remove` below hashes its name.
    let mut connection = false;
    let mut other = false;
    for name in h.keys() {
        if *name == header::CONNECTION {
            connection = true;
        } else if upstream::hop_by_hop(name.as_str().as_bytes()) {
            other = true;
        }
    }
    if connection {
        // Names listed in `Connection` besides the usual tokens are rare: collect them
        // only when present. `keep-alive`, `upgrade` and `te` are dealt with below
        // (`Upgrade` survives a handshake; `TE: trailers` always may pass), and a
        // header literally named `close` does not exist in practice.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if ["keep-alive", "close", "upgrade", "te"]
                .iter()
                .any(|t| token.eq_ignore_ascii_case(t))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(n);
            }
        }
        for n in named {
            h.remove(n);
        }
        if keep_upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            h.remove(header::CONNECTION);
        }
    }
    if !other {
        return;
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    h.remove(header::PROXY_AUTHORIZATION);
    h.remove(header::TRANSFER_ENCODING);
    // `Trailer` is end to end (RFC 9110 §6.6.2), and hyper's HTTP/1.1 encoder sends
    // only the trailer fields it declares: removing it would drop every trailer.

    // Of TE only "trailers" may pass (gRPC needs it; HTTP/2 allows nothing else),
    // whatever the list or the number of lines it came in.
    if h.contains_key(header::TE) {
        let trailers = h
            .get_all(header::TE)
            .iter()
            .any(|v| upstream::te_lists_trailers(v.as_bytes()));
        h.remove(header::TE);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

fn is_upgrade(req: &Request<ClientBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Records the outcome when dropped, so a request whose client went away (the
/// handler future is dropped mid-flight) is counted as a client abort.
struct Outcome<'a> {
    pool: &'a Pool,
    done: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.stats.record_client_abort();
        }
    }
}

impl Proxy {
    /// Handles one request end to end. The answer is boxed (from the upstream exchange
    /// on): it is moved out of every async layer on its way to the writer, a `memcpy`
    /// of ~180 bytes each time, where a box is a pointer (docs/performance.md).
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<ClientBody>,
        conn: &ConnInfo,
    ) -> Box<Response<ProxyBody>> {
        let snap = self.load();
        // The request target counts toward the header limit, as nginx's buffers do.
        let max = snap.limits.max_header_bytes;
        let target = target_bytes(req.uri());
        if target > max {
            return error_response(StatusCode::URI_TOO_LONG, "request target too long\n");
        }
        if target + RequestFields::of(&req).size() > max {
            return error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request header fields too large\n",
            );
        }
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
        };
        let Some(idx) = snap
            .table
            .find(host.as_ref().map(Host::name), req.uri().path())
        else {
            self.unrouted.fetch_add(1, Relaxed);
            return error_response(StatusCode::NOT_FOUND, "no route for this request\n");
        };
        let route = &snap.table.routes[idx];
        let entry = &snap.entries[idx];
        let facts = Facts {
            fields: RequestFields::of(&req),
            query: req.uri().query(),
            ip: conn.peer.ip(),
        };

        let mut generated = None;
        let key = match route.sticky_key(&facts) {
            Some(k) => Some(k.bytes()),
            None if route.has_canary => {
                generated = Some(generate_id());
                generated.as_ref().map(<[u8; 32]>::as_slice)
            }
            None => None,
        };
        let decision = route.decide(entry.runtime.weight(), &facts, key);
        let (pool, target) = match (decision.target, &entry.canary) {
            (Target::Canary, Some(canary)) if canary.any_available(now_ms()) => {
                (canary, Target::Canary)
            }
            (Target::Canary, Some(_)) => {
                entry.runtime.fallback();
                (&entry.stable, Target::Stable)
            }
            _ => (&entry.stable, Target::Stable),
        };
        let mut resp = forward(req, conn, host.map(|h| h.value), entry, pool, target).await;
        if let (Some(id), Some(prefix)) = (generated, &entry.cookie_prefix) {
            add_field(
                &mut resp,
                AddedField::StickyCookie {
                    prefix: prefix.clone(),
                    id,
                },
            );
        }
        resp
    }
}

async fn forward(
    req: Request<ClientBody>,
    conn: &ConnInfo,
    host: Option<Bytes>,
    entry: &RouteEntry,
    pool: &Pool,
    target: Target,
) -> Box<Response<ProxyBody>> {
    let Some(instance) = pool.pick(now_ms()) else {
        pool.stats.record(502, 0);
        let mut r = error_response(StatusCode::BAD_GATEWAY, "no healthy upstream\n");
        r.headers_mut()
            .insert(X_CANARY_VERSION.clone(), pool.version_header.clone());
        return r;
    };
    let upgrade = is_upgrade(&req);
    let (mut parts, mut body) = req.into_parts();
    let client_upgrade = if upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    let mut raw = body.take_head();
    if pool.is_http2() {
        // hyper's HTTP/2 client takes a map.
        if let Some(head) = raw.take() {
            parts.headers = head.to_map();
        }
    }
    let (mut body, body_end) = UpstreamBody::new(body, pool.is_http2());
    let mut joined_xff = None;
    let (added, upstream_host) = build_upstream_request(
        &mut parts,
        (conn, host.as_deref(), raw.as_deref()),
        pool,
        instance,
        upgrade,
        &mut joined_xff,
    );
    let started = Instant::now();
    let mut outcome = Outcome { pool, done: false };
    let timeout = Duration::from_millis(entry.timeouts.request_ms);
    let result = match &pool.h2_client {
        Some(h2) => {
            let send = async {
                match h2.get().request(Request::from_parts(parts, body)).await {
                    Ok(resp) => Ok(Box::new(resp.map(PooledBody::unpooled))),
                    Err(e) if e.is_connect() => Err(SendError::Connect(e.into())),
                    Err(e) => Err(SendError::Protocol(e.into())),
                }
            };
            match response_within(send, body_end, timeout).await {
                (Ok(Err(e)), true) => Err(SendError::ClientBody(e.into())),
                (Ok(r), _) => r,
                (Err(_), _) => Err(SendError::Timeout),
            }
        }
        None => {
            let connect_ms = entry.timeouts.connect_ms;
            let extra = Extra {
                host: upstream_host,
                raw: raw.as_deref(),
                added: added.varying(),
                fixed: &pool.request_lines,
            };
            let addr = &instance.addr;
            let req = (&parts, &mut body);
            let now = tokio::time::Instant::from_std(started);
            upstream::send(
                instance.idle(),
                addr,
                connect_ms,
                (now, timeout),
                req,
                extra,
            )
            .await
        }
    };
    let elapsed_us = started.elapsed().as_micros() as u64;
    outcome.done = true;
    let (mut resp, failed) = match result {
        Ok(resp) => {
            let failed = resp.status().is_server_error();
            (resp, failed)
        }
        Err(SendError::ClientBody(e)) => {
            // The client's body ended early or failed: not the upstream's failure, so
            // ejection, the breaker and the analysis never see it.
            tracing::debug!(upstream = %instance.addr, error = %e, "request failed on the client side");
            pool.stats.record_client_abort();
            let mut r = error_response(StatusCode::BAD_REQUEST, "bad request\n");
            r.headers_mut()
                .insert(X_CANARY_VERSION.clone(), pool.version_header.clone());
            return r;
        }
        Err(SendError::Timeout) => {
            pool.stats.record_upstream_error(UpstreamError::Timeout);
            (
                error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
                true,
            )
        }
        Err(e) => {
            let kind = match e {
                SendError::Connect(_) => UpstreamError::Connect,
                _ => UpstreamError::Protocol,
            };
            tracing::debug!(upstream = %instance.addr, error = %e, "upstream error");
            pool.stats.record_upstream_error(kind);
            (
                error_response(StatusCode::BAD_GATEWAY, "upstream unavailable\n"),
                true,
            )
        }
    };
    pool.stats.record(resp.status().as_u16(), elapsed_us);
    // The breaker first: when the same failures also eject the last canary instance,
    // the trip is already recorded and the abort reports the breaker, not an
    // unhealthy pool.
    if target == Target::Canary {
        if failed {
            entry.runtime.canary_failure();
        } else {
            entry.runtime.canary_success();
        }
    }
    if failed {
        instance.record_failure(&pool.ejection, now_ms());
    } else {
        instance.record_success();
    }
    match (resp.status(), client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(client_upgrade)) => {
            if let Some(upstream) = resp.body_mut().take_upgrade() {
                tokio::spawn(tunnel(client_upgrade, upstream));
            }
        }
        _ => strip_hop_by_hop(resp.headers_mut(), false),
    }
    add_field(
        &mut resp,
        AddedField::Value(&X_CANARY_VERSION, pool.version_header.clone()),
    );
    resp
}

/// Adds a field the proxy sets to an answer: after an HTTP/1.1 upstream's own fields
/// (written as they came, with no map to allocate), else into the response's map, where
/// it is appended (`Set-Cookie`) or replaces the upstream's (`X-Canary-Version`).
fn add_field(resp: &mut Response<ProxyBody>, field: AddedField) {
    let Err(field) = resp.body_mut().add_field(field) else {
        return;
    };
    let name = field.name();
    if *name == header::SET_COOKIE {
        resp.headers_mut().append(name.clone(), field.value());
    } else {
        resp.headers_mut().insert(name.clone(), field.value());
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection, after
/// what the upstream sent right behind its `101`.
async fn tunnel(client: OnUpgrade, (mut upstream, early): (TcpStream, Bytes)) {
    let Ok(client) = client.await else {
        return;
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The fields the proxy adds to a request for the upstream (`X-Forwarded-*`,
/// `X-Canary-*`). Into an HTTP/2 request they go through its `HeaderMap`; an
/// HTTP/1.1 exchange writes them after the request's own fields, which saves five map
/// inserts per request (~3% of the instructions): the varying ones one by one, the
/// fixed ones as the pool's [`request_lines`](Pool::request_lines).
///
/// The values are borrowed from the connection and the pool (cloning five
/// `HeaderValue`s per request was an atomic count up and down for each).
struct Added<'a> {
    /// `X-Forwarded-For`, then `X-Forwarded-Host` (the first `varying_len`): the
    /// latter only when the request has a host. Bytes: the host's are not a
    /// `HeaderValue` (see [`Host`]).
    varying: [(&'static HeaderName, &'a [u8]); 2],
    varying_len: usize,
    /// `X-Forwarded-Proto`, `X-Canary-Version`, `X-Canary-Route`: the same for every
    /// request through the pool.
    fixed: [(&'static HeaderName, &'a HeaderValue); 3],
}

impl<'a> Added<'a> {
    fn varying(&self) -> &[(&'static HeaderName, &'a [u8])] {
        &self.varying[..self.varying_len]
    }

    /// The fields to set as values for a map, in order.
    fn values(&self) -> impl Iterator<Item = (&'static HeaderName, HeaderValue)> + '_ {
        let varying = self.varying().iter().filter_map(|(name, value)| {
            // Checked when the request was read: only a broken invariant fails here.
            HeaderValue::from_bytes(value).ok().map(|v| (*name, v))
        });
        varying.chain(
            self.fixed
                .iter()
                .map(|(name, value)| (*name, (*value).clone())),
        )
    }
}

pub(crate) static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// Makes the client's request `parts` the upstream request's, in place (a new
/// `Request` was moved three times and dropped with the old parts, ~2% of a request's
/// instructions), and returns the proxy's fields for it and (to an HTTP/1.1 upstream)
/// the `Host` to write. The fields of a request whose head the proxy read (`raw`) are
/// written as they came, less what is removed or set.
///
/// A client's own `X-Forwarded-For` list, with its address appended, is made in
/// `joined_xff` (the one added value not borrowed as it is).
fn build_upstream_request<'a>(
    parts: &mut http::request::Parts,
    (conn, host, raw): (&'a ConnInfo, Option<&'a [u8]>, Option<&RawHead>),
    pool: &'a Pool,
    instance: &'a Instance,
    upgrade: bool,
    joined_xff: &'a mut Option<HeaderValue>,
) -> (Added<'a>, Option<&'a [u8]>) {
    // What the client's connection attached (hyper's upgrade handle was taken) is not
    // the upstream request's.
    parts.extensions.clear();
    if pool.is_http2() {
        // The HTTP/2 client takes the instance from an absolute URI (`:authority`).
        let mut uri = Uri::from_static("/").into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(instance.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(uri) {
            parts.uri = uri;
        }
        parts.version = Version::HTTP_2;
    } else {
        // The HTTP/1.1 exchange writes the target in origin form (`/path?query`),
        // whatever form the client used (the authority of a `CONNECT`).
        parts.version = Version::HTTP_11;
    }
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    let fields = match raw {
        Some(r) => RequestFields::Raw(r),
        None => RequestFields::Map(headers),
    };
    // Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3): keep them all.
    let xff: &HeaderValue = {
        let mut prev = fields.values("x-forwarded-for").peekable();
        if prev.peek().is_none() {
            &conn.peer_header
        } else {
            let mut v = Vec::with_capacity(64);
            for p in prev {
                v.extend_from_slice(p);
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(conn.peer_header.as_bytes());
            match HeaderValue::from_bytes(&v) {
                Ok(joined) => joined_xff.insert(joined),
                Err(_) => &conn.peer_header,
            }
        }
    };
    // `Host` is written by the HTTP/1.1 exchange, never taken from the client's
    // fields: the request's host (its one `Host` line, or the authority of an
    // absolute-form target, which replaces `Host`: RFC 9112 §3.2.2), or, as HTTP/1.1
    // requires one and an HTTP/1.0 client may send none, the instance's. To HTTP/2,
    // `:authority` names the instance (the client connects by it), and a `Host` that
    // differs from it is malformed (RFC 9113 §8.3.1): the client's host travels in
    // `X-Forwarded-Host`.
    if !headers.is_empty() {
        headers.remove(header::HOST);
    }
    let upstream_host = (!pool.is_http2()).then(|| host.unwrap_or(instance.host_header.as_bytes()));
    let added = Added {
        varying: [
            (&X_FORWARDED_FOR, xff.as_bytes()),
            (&X_FORWARDED_HOST, host.unwrap_or_default()),
        ],
        varying_len: if host.is_some() { 2 } else { 1 },
        fixed: [
            (&X_FORWARDED_PROTO, &PROTO_HTTP),
            (&X_CANARY_VERSION, &pool.version_header),
            (&X_CANARY_ROUTE, &pool.route_header),
        ],
    };
    // The proxy's fields replace any the client sent (one pass over the names finds
    // them; a client rarely sends any).
    if headers.keys().any(|k| PROXY_REQUEST_FIELDS.contains(&k)) {
        for name in PROXY_REQUEST_FIELDS {
            headers.remove(name);
        }
    }
    if pool.is_http2() {
        for (name, value) in added.values() {
            headers.insert(name.clone(), value);
        }
    }
    (added, upstream_host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read path drops a client's own copies of exactly the fields the proxy sets
    /// (by its own switch, `not_forwarded`), and the added fields are those.
    #[test]
    fn the_fields_the_proxy_sets_are_the_ones_a_client_cannot_pass_on() {
        for name in PROXY_REQUEST_FIELDS {
            assert!(
                crate::upstream::not_forwarded(name.as_str().as_bytes()),
                "{name} would pass through from a client"
            );
        }
        let conn = ConnInfo::new("127.0.0.1:1".parse().unwrap());
        let pool = Pool::new(
            ("r", "v1"),
            Vec::new(),
            None,
            Arc::new(crate::metrics::VersionStats::new("r", "v1")),
            canary_config::Ejection::default(),
            None,
        );
        let instance = Instance::new("r", "v1", "127.0.0.1:2", 1).unwrap();
        let mut parts = Request::new(()).into_parts().0;
        let mut joined = None;
        let host = Some(&b"h"[..]);
        let (added, _) = build_upstream_request(
            &mut parts,
            (&conn, host, None),
            &pool,
            &instance,
            false,
            &mut joined,
        );
        let set: Vec<&HeaderName> = added
            .varying()
            .iter()
            .map(|(n, _)| *n)
            .chain(added.fixed.iter().map(|(n, _)| *n))
            .collect();
        assert_eq!(set, PROXY_REQUEST_FIELDS);
    }

    #[test]
    fn generated_ids_are_32_hex_digits_and_distinct() {
        let a = generate_id();
        let b = generate_id();
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let cookie = AddedField::StickyCookie {
            prefix: Bytes::from_static(b"canary_id="),
            id: a,
        };
        let want = format!(
            "canary_id={}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax",
            std::str::from_utf8(&a).unwrap()
        );
        assert_eq!(cookie.value().to_str().unwrap(), want);
        let mut line = Vec::new();
        cookie.write(&mut line);
        assert_eq!(line, format!("set-cookie: {want}\r\n").into_bytes());
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private, close"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);

        let mut h = map(&[("connection", "keep-alive"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);

        let mut h = map(&[("te", "trailers"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn host_values_are_checked_as_rfc_9112_asks() {
        for (ok, name) in [
            ("shop.example.com", "shop.example.com"),
            ("shop.example.com:8080", "shop.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1:65535", "127.0.0.1"),
            ("[::1]", "::1"),
            ("[::1]:8080", "::1"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("host:", "host"),
            ("a-b_c~d!$&'()*+,;=%20:80", "a-b_c~d!$&'()*+,;=%20"),
        ] {
            let at = host_name(ok.as_bytes()).unwrap_or_else(|| panic!("{ok}"));
            assert_eq!(&ok[at], name, "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a b:c:d@/",
            "127.0.0.1:99999999",
            "127.0.0.1:65536",
            "user@host",
            "::1",
            "[::1",
            "[::1]x",
            "[]:80",
            "host:8x",
            "host:80:80",
            "host/path",
            "a^b",
            "a\"b",
            "h\u{e9}te",
            "a b",
        ] {
            assert_eq!(host_name(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn upgrade_handshake_keeps_connection_and_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("connection") && h.contains_key("upgrade"));
        assert!(!h.contains_key("keep-alive"));
    }
}
