//! The request as read: its body ([`ClientBody`], with the head the proxy's own reader
//! kept), its fields whichever way they were read ([`RequestFields`]), the facts the
//! core decides on ([`Facts`]), and its host (RFC 9112 §3.2).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use canary_core::routing::cookie_value;
use canary_core::RequestFacts;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use canary_http1::fields::RawHead;
use canary_http1::BoxError;

use crate::timers::{Kind, Stall};
use crate::witness::ClientId;

use crate::headers::upgrade_allowed;

/// Per-connection facts computed once per connection rather than per request.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub peer_header: HeaderValue,
    /// The connection is TLS (`X-Forwarded-Proto: https`, `Secure` sticky cookies).
    pub tls: bool,
    /// The peer's address as the failure record tells clients apart
    /// ([`ClientId::address`]).
    pub client_addr: u64,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr) -> ConnInfo {
        let ip = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_header,
            tls: false,
            client_addr: ClientId::address(peer.ip()),
        }
    }

    /// A connection that arrived over TLS.
    pub fn over_tls(peer: SocketAddr) -> ConnInfo {
        ConnInfo {
            tls: true,
            ..ConnInfo::new(peer)
        }
    }
}

/// A client's request body: hyper's, or none. A request the proxy's own HTTP/1.1
/// reader took (`connection`: only requests without a body) has `Read`: its head,
/// whose fields stand in for the empty `HeaderMap`.
#[derive(Debug)]
pub enum ClientBody {
    Empty,
    Read(Box<RawHead>),
    Hyper(Box<HyperBody>),
}

/// A body hyper reads from the client, with `limits.body_timeout` between two of its
/// frames, and a flag that says whether it was read to its end (kept by the handler,
/// which needs it after the body has gone upstream: see [`BodyProgress`]).
pub struct HyperBody {
    inner: Incoming,
    stall: Stall,
    progress: BodyProgress,
}

impl fmt::Debug for HyperBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperBody").finish_non_exhaustive()
    }
}

/// Whether a client's request body has been read to its end, or broke off or stalled
/// (a timeout of `limits.body_timeout`), shared between the body and the handler.
#[derive(Clone, Debug, Default)]
pub struct BodyProgress(Arc<AtomicU8>);

// 0: still being read.
const BODY_COMPLETE: u8 = 1;
const BODY_STALLED: u8 = 2;

impl BodyProgress {
    /// Read to its end.
    pub fn complete(&self) -> bool {
        self.0.load(Relaxed) == BODY_COMPLETE
    }

    /// Cut by `limits.body_timeout`.
    pub fn stalled(&self) -> bool {
        self.0.load(Relaxed) == BODY_STALLED
    }
}

impl ClientBody {
    /// A body hyper reads, with `idle` as the longest wait between two frames.
    /// A body that has already ended (a `GET`'s, `HEADERS` with `END_STREAM` on
    /// HTTP/2) is `Empty`: the same framing upstream, without two allocations per
    /// request (the box and the progress flag, ~400 instructions).
    pub fn hyper(inner: Incoming, idle: Duration) -> ClientBody {
        if inner.is_end_stream() {
            return ClientBody::Empty;
        }
        let progress = BodyProgress::default();
        ClientBody::Hyper(Box::new(HyperBody {
            inner,
            stall: Stall::new(idle, Kind::Body),
            progress,
        }))
    }

    /// How far the body has been read (`None`: a request without one).
    pub(crate) fn progress(&self) -> Option<BodyProgress> {
        match self {
            ClientBody::Hyper(b) if !b.progress.complete() => Some(b.progress.clone()),
            _ => None,
        }
    }

    /// The head the proxy read, taken out (the body is then `Empty`).
    pub(crate) fn take_head(&mut self) -> Option<Box<RawHead>> {
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
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty | ClientBody::Read(_) => Poll::Ready(None),
            ClientBody::Hyper(b) => {
                let r = Pin::new(&mut b.inner).poll_frame(cx);
                match &r {
                    Poll::Pending => {
                        if let Err(e) = b.stall.waiting(cx) {
                            b.progress.0.store(BODY_STALLED, Relaxed);
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                    Poll::Ready(None) => {
                        b.progress.0.store(BODY_COMPLETE, Relaxed);
                    }
                    Poll::Ready(Some(Ok(_))) => {
                        b.stall.progress();
                        if b.inner.is_end_stream() {
                            b.progress.0.store(BODY_COMPLETE, Relaxed);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {}
                }
                r.map(|o| o.map(|r| r.map_err(Into::into)))
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty | ClientBody::Read(_) => true,
            ClientBody::Hyper(b) => b.inner.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty | ClientBody::Read(_) => SizeHint::with_exact(0),
            ClientBody::Hyper(b) => b.inner.size_hint(),
        }
    }
}

/// A request's fields: in its `HeaderMap`, or in the head the proxy read.
#[derive(Clone, Copy)]
pub(crate) enum RequestFields<'a> {
    Map(&'a HeaderMap),
    Raw(&'a RawHead),
}

impl<'a> RequestFields<'a> {
    pub(crate) fn of(req: &'a Request<ClientBody>) -> RequestFields<'a> {
        match req.body() {
            ClientBody::Read(head) => RequestFields::Raw(head),
            _ => RequestFields::Map(req.headers()),
        }
    }

    /// The first value of `name` (lowercase).
    #[inline]
    pub(crate) fn get(self, name: &str) -> Option<&'a [u8]> {
        match self {
            RequestFields::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            RequestFields::Raw(r) => r.get(name),
        }
    }

    /// Every value of `name` (lowercase), in order.
    pub(crate) fn values(self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        match self {
            RequestFields::Map(m) => Values::Map(m.get_all(name).iter().map(HeaderValue::as_bytes)),
            RequestFields::Raw(r) => Values::Raw(r.values(name)),
        }
    }

    /// Whether any field's name is one `test` picks.
    pub(crate) fn any_name(self, test: impl Fn(&[u8]) -> bool) -> bool {
        match self {
            RequestFields::Map(m) => m.keys().any(|k| test(k.as_str().as_bytes())),
            RequestFields::Raw(r) => r.iter().any(|(k, _)| test(k)),
        }
    }

    /// Size of the header block as it came in (names, values, separators).
    pub(crate) fn size(self) -> usize {
        match self {
            RequestFields::Map(m) => m.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum(),
            RequestFields::Raw(r) => r.iter().map(|(k, v)| k.len() + v.len() + 4).sum(),
        }
    }
}

/// The values of one field name from either kind of [`RequestFields`]. (Two chained
/// `Option` iterators, flattened, cost ~40 instructions per field looked at; the three
/// lookups a request makes were 3% of a browser-like request.)
pub(crate) enum Values<M, R> {
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
pub(crate) struct Facts<'a> {
    pub(crate) fields: RequestFields<'a>,
    pub(crate) query: Option<&'a str>,
    pub(crate) ip: IpAddr,
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

/// Size of the request target (path and query, and the authority of an absolute form).
pub(crate) fn target_bytes(uri: &Uri) -> usize {
    uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
}

const BAD_HOST: &str = "missing or invalid Host header\n";

/// The host a request is for (RFC 9112 §3.2): the request target's authority when it
/// has one (an absolute-form target, or HTTP/2's `:authority`), which overrides
/// `Host`; else its one `Host` line. `Err` (the answer's text) for a request the RFC
/// says must get a `400`: more than one `Host` line, an invalid one, an HTTP/1.1
/// request without, or an invalid target authority.
pub(crate) fn request_host(req: &Request<ClientBody>) -> Result<Option<Host>, &'static str> {
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
        ClientBody::Read(head) => head.bytes().slice_ref(h),
        _ => Bytes::copy_from_slice(h),
    };
    Ok(Some(Host { value, name }))
}

/// A request's host: the value as it came, and where in it the name is. Bytes, not a
/// `HeaderValue`: `host_name` checked them (a subset of what a field value may hold),
/// and a `HeaderValue` would check them again (~1% of a request's instructions); one
/// is made only for an HTTP/2 upstream's map.
pub(crate) struct Host {
    pub(crate) value: Bytes,
    /// The name without the port (and an IPv6 address without its brackets).
    name: std::ops::Range<usize>,
}

impl Host {
    pub(crate) fn name(&self) -> &[u8] {
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

/// Whether the request asks for a protocol upgrade the proxy passes on (a WebSocket
/// handshake; see `headers::upgrade_allowed`). Any other `Upgrade` is stripped and the
/// request served as plain HTTP/1.1.
pub(crate) fn is_upgrade(req: &Request<ClientBody>) -> bool {
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter().peekable();
    req.version() == Version::HTTP_11
        && upgrades.peek().is_some()
        && upgrades.all(|v| upgrade_allowed(v.as_bytes()))
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Why a request's transfer coding is refused, if it is: HTTP/1.1 defines `chunked`
/// alone for requests, and any other coding, list or repetition (`gzip, chunked`,
/// `identity, chunked`, two `chunked` lines) would be decoded of its chunking and
/// passed on without the rest (RFC 9112 §6.1; nginx answers `501` too).
pub(crate) fn unsupported_coding(req: &Request<ClientBody>) -> bool {
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => false,
        (Some(v), None) => !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => true,
    }
}

/// Whether an asterisk-form target (`*`) comes with the one method it is for,
/// `OPTIONS` (RFC 9112 §3.2.4; RFC 9113 §8.3.1 makes any other `:path` that does not
/// start with `/` malformed). hyper and the `h2` crate pass `GET *` on; no route can
/// match it (a path prefix starts with `/`), so it was a `404`, and is now the `400` a
/// malformed request gets. `OPTIONS *` is well-formed and still matches no route.
pub(crate) fn asterisk_form_ok(method: &http::Method, path: &str) -> bool {
    path != "*" || method == http::Method::OPTIONS
}

/// Whether a request path is one the proxy routes as it is: no segment that is `.` or
/// `..` (also spelled `%2e`), no empty segment (`//`), counting `\`, `%2f` and `%5c` as
/// separators too, and no `%00`. A path with any of them would match a route by its
/// raw prefix and then be read by the upstream (which may resolve dot-segments, merge
/// slashes or decode separators) as another path: `/api/../admin` reaching `/admin`
/// through the `/api` route. Such paths are refused (`400`) rather than rewritten, so
/// the path the proxy routes is always the path the upstream gets. `*` (an `OPTIONS *`
/// target) passes.
pub(crate) fn routable_path(path: &str) -> bool {
    let p = path.as_bytes();
    // The common path has no `%`, `\` or `.` after a separator and no `//`: one pass.
    let suspicious = p
        .windows(2)
        .any(|w| matches!(w, [b'/', b'.'] | [b'/', b'/'] | [b'/', b'%']))
        || p.iter().any(|&c| c == b'%' || c == b'\\');
    if !suspicious {
        return true;
    }
    // Split on every spelling of a separator, decoding `%2e` in the segments.
    let mut segments: Vec<Vec<u8>> = vec![Vec::new()];
    let mut i = 0;
    while i < p.len() {
        let c = p[i];
        let escape = |at: usize| -> Option<u8> {
            let hex = p.get(at + 1..at + 3)?;
            u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
        };
        match c {
            b'/' | b'\\' => segments.push(Vec::new()),
            b'%' => match escape(i) {
                Some(b'/') | Some(b'\\') => {
                    segments.push(Vec::new());
                    i += 2;
                }
                Some(0) => return false,
                Some(b'.') => {
                    segments
                        .last_mut()
                        .expect("one segment at least")
                        .push(b'.');
                    i += 2;
                }
                _ => segments.last_mut().expect("one segment at least").push(c),
            },
            _ => segments.last_mut().expect("one segment at least").push(c),
        }
        i += 1;
    }
    let n = segments.len();
    segments.iter().enumerate().all(|(i, s)| {
        // The first is what precedes the leading `/` (empty), the last may be empty
        // (a trailing slash).
        let empty_ok = i == 0 || i == n - 1;
        (empty_ok || !s.is_empty()) && s != b"." && s != b".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asterisk_form_is_for_options_only() {
        use http::Method;
        assert!(asterisk_form_ok(&Method::OPTIONS, "*"));
        assert!(!asterisk_form_ok(&Method::GET, "*"));
        assert!(!asterisk_form_ok(&Method::POST, "*"));
        assert!(asterisk_form_ok(&Method::GET, "/"));
        assert!(asterisk_form_ok(&Method::GET, "/*"));
    }

    /// Regression: `/api/../admin` matched an `/api` route by its raw prefix and reached
    /// its upstream, which resolved it to `/admin` (issue 15, G9).
    #[test]
    fn paths_a_backend_would_read_as_another_path_are_not_routable() {
        for ok in [
            "/",
            "/a/b",
            "/a/b/",
            "/a.b/c..d/.e",
            "/a%20b",
            "/group%2Dx",
            "*",
            "/a/b.",
            "/a/..b",
            "/%41",
        ] {
            assert!(routable_path(ok), "{ok}");
        }
        for bad in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/.",
            "/a/..",
            "//b",
            "/a//b",
            "/%2e%2e/b",
            "/%2E%2e/b",
            "/a/%2e/b",
            "/a/.%2e/b",
            "/a%2f..%2fb",
            "/a%2F%2Fb",
            "/a\\..\\b",
            "/a%5c..%5cb",
            "/a%00b",
        ] {
            assert!(!routable_path(bad), "{bad}");
        }
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

    /// What `ClientBody::hyper` makes of the bodies hyper hands over: a `GET`'s, ended
    /// at its head, is `Empty` (no box, timer or progress flag); a `POST`'s with bytes
    /// to come stays hyper's and reads them.
    #[tokio::test]
    async fn an_ended_body_is_empty_and_one_with_bytes_is_read() {
        use http_body_util::BodyExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let (server, mut client) = tokio::io::duplex(4096);
        let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let body = ClientBody::hyper(req.into_body(), Duration::from_secs(10));
            let kind = match &body {
                ClientBody::Empty => "empty",
                ClientBody::Hyper(_) => "hyper",
                ClientBody::Read(_) => "read",
            };
            let bytes = body.collect().await.unwrap().to_bytes();
            let text = format!("{kind}:{}", String::from_utf8_lossy(&bytes));
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from(text),
            )))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let served = tokio::spawn(conn);
        client
            .write_all(
                b"GET / HTTP/1.1\r\nhost: x\r\n\r\n\
                  POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
                  POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        served.await.unwrap().unwrap();
        let bodies: Vec<&str> = got
            .split("HTTP/1.1 200 OK")
            .skip(1)
            .map(|a| a.rsplit("\r\n\r\n").next().unwrap())
            .collect();
        assert_eq!(bodies, ["empty:", "hyper:abc", "empty:"], "{got}");
    }
}
