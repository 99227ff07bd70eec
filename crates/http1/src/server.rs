//! The client side of HTTP/1.1: a reader for the request heads that are most of a
//! proxy's traffic, and the writer of responses to clients.
//!
//! The reader ([`parse`]) takes only requests whose framing leaves nothing to decide:
//! a head that `httparse` (the parser hyper itself uses) reads completely and cleanly,
//! HTTP/1.0 or 1.1, without a body (no `Transfer-Encoding`, no `Content-Length` but
//! `0`), no `Expect`, no upgrade (`Upgrade`, a `Connection` listing anything but
//! `close`/`keep-alive`), not `CONNECT`. Such a request cannot be smuggled: it ends at
//! its blank line. Everything else is refused (`Err`), for the caller to hand to a
//! full server (hyper) with the bytes read so far ([`Rewound`]): the reader decides
//! only *whether* to take a request, never how an unusual one is answered.
//!
//! The writer ([`write_response`]) frames an answer as hyper did: `Content-Length`
//! when the size is known, chunked (or, to an HTTP/1.0 client, by closing) when not,
//! `Date` added when missing, keep-alive per RFC 9112 §9.3.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::body::{chunk_size, last_chunk};
use crate::fields::{connection_tokens, is_name, write_field, RawFields, RawHead};
use crate::MAX_HEADERS;

/// A body chunk up to this size is copied behind its head (or chunk line) into one
/// write; a larger one is written from where it is, in the same system call.
const COPY_LIMIT: usize = 16 * 1024;

/// A request head read and accepted: where its parts are in its head.
#[derive(Debug)]
pub struct Parsed {
    /// The head's length in the buffer it was read from.
    pub len: usize,
    pub method: Method,
    /// Where the request target is in the head: start and length.
    pub target: (usize, usize),
    pub version: Version,
    /// The connection ends after this request's response.
    pub close: bool,
}

impl Parsed {
    /// Moves the head (the first [`len`](Self::len) bytes of `buf`) into `head`.
    pub fn split_head(&self, buf: &mut BytesMut, head: &mut RawHead) {
        head.head = buf.split_to(self.len).freeze();
    }

    /// The request target, as a slice of `head` (after [`split_head`](Self::split_head)).
    pub fn target(&self, head: &RawHead) -> Bytes {
        let (at, len) = self.target;
        head.head.slice(at..at + len)
    }
}

/// Reads a request head at the start of `buf`, its fields' places into `head`.
/// `Ok(None)`: not all in yet; `Err(())`: not one for this reader (see the module
/// docs).
#[allow(clippy::result_unit_err)]
pub fn parse(buf: &[u8], head: &mut RawHead) -> Result<Option<Parsed>, ()> {
    let fields = &mut head.fields;
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
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

/// A connection with the bytes already read from it put back in front: what a
/// request [`parse`] refused is handed on as this.
pub struct Rewound<S> {
    read: Bytes,
    io: S,
}

impl<S> Rewound<S> {
    pub fn new(read: Bytes, io: S) -> Rewound<S> {
        Rewound { read, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
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

/// A response head to write, and what it depends on of its request.
pub struct Message<'a> {
    pub status: StatusCode,
    /// The upstream's fields, written first ([`RawFields::EMPTY`] for an answer with
    /// no upstream head of its own); then the `added` lines of [`write_response`],
    /// then those in `headers`.
    pub headers: &'a HeaderMap,
    pub fields: &'a RawFields,
    /// The answer is to a `HEAD` request.
    pub is_head: bool,
    /// The request's version.
    pub version: Version,
    /// The connection may stay open (as far as the request and the listener go).
    pub keep: bool,
}

/// Writes a response to the client. `Ok(true)`: the connection may carry another
/// request.
///
/// `added` writes the caller's own field lines (after the upstream's fields and the
/// length, before the map's); `out` is a buffer kept for its capacity.
pub async fn write_response<W, B>(
    io: &mut W,
    out: &mut Vec<u8>,
    msg: Message<'_>,
    added: impl FnOnce(&mut Vec<u8>),
    mut body: B,
) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
{
    let (status, headers, fields) = (msg.status, msg.headers, msg.fields);
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
    added(out);
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
                        last_chunk(out, Some(&trailers));
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
            chunk_size(out, data.len());
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
        last_chunk(out, None);
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

/// Writes all of `bufs`, in as few system calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
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
    use crate::body::hex;
    use http::Response;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;

    fn parsed(raw: &str) -> Result<Option<Parsed>, ()> {
        let mut head = RawHead::EMPTY;
        parse(raw.as_bytes(), &mut head)
    }

    #[test]
    fn takes_complete_requests_without_a_body() {
        let raw =
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nX-One: 1\r\n\r\nGET /next";
        let mut head = RawHead::EMPTY;
        let p = parse(raw.as_bytes(), &mut head).unwrap().unwrap();
        assert_eq!(p.len, raw.len() - "GET /next".len());
        assert!(!p.close);
        let mut buf = BytesMut::from(raw);
        p.split_head(&mut buf, &mut head);
        assert_eq!(buf, "GET /next");
        assert_eq!(p.method, Method::GET);
        assert_eq!(p.target(&head), "/a?b=1");
        assert_eq!(p.version, Version::HTTP_11);
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
            "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parsed(&many).is_err(), "over {MAX_HEADERS} fields");
    }

    /// `resp` as written to a client of `version`, and whether the connection was
    /// left open for another request.
    async fn written<B: Body<Data = Bytes> + Unpin>(
        resp: Response<B>,
        is_head: bool,
        version: Version,
    ) -> (String, bool) {
        written_with(resp, &RawFields::EMPTY, |_| {}, is_head, version).await
    }

    /// [`written`] with the upstream's `fields` and the caller's `added` lines.
    async fn written_with<B: Body<Data = Bytes> + Unpin>(
        resp: Response<B>,
        fields: &RawFields,
        added: impl FnOnce(&mut Vec<u8>),
        is_head: bool,
        version: Version,
    ) -> (String, bool) {
        let (mut server, mut client) = pair().await;
        let (parts, body) = resp.into_parts();
        let msg = Message {
            status: parts.status,
            headers: &parts.headers,
            fields,
            is_head,
            version,
            keep: true,
        };
        let keep = write_response(&mut server, &mut Vec::new(), msg, added, body)
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
        )
        .unwrap();
        let added = |out: &mut Vec<u8>| write_field(out, b"set-cookie", b"id=1");
        let resp = response(
            200,
            Full::new(Bytes::from("ok")),
            &[("x-canary-version", "v1")],
        );
        let (text, _) = written_with(resp, &fields, added, false, Version::HTTP_11).await;
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nServer: up\r\nX-Two: a\r\nX-Two: b\r\ncontent-length: 2\r\nset-cookie: id=1\r\nx-canary-version: v1\r\n\r\nok"
        );
        // What hyper gets: one map, the upstream's fields first.
        let map = fields.to_map();
        let names: Vec<_> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["server", "x-two", "content-length"]);
        assert_eq!(map.get_all("x-two").iter().count(), 2);
        // The upstream's Date is kept and not doubled; a HEAD answer keeps its length.
        let fields = RawFields::of(
            b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 42\r\n\r\n",
        )
        .unwrap();
        let (mut server, mut client) = pair().await;
        let (parts, body) = response(200, Full::new(Bytes::new()), &[]).into_parts();
        let msg = Message {
            status: parts.status,
            headers: &parts.headers,
            fields: &fields,
            is_head: true,
            version: Version::HTTP_11,
            keep: false,
        };
        assert!(
            !write_response(&mut server, &mut Vec::new(), msg, |_| {}, body)
                .await
                .unwrap()
        );
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
            let mut fields_buf = RawHead::EMPTY;
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
