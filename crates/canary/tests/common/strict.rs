//! A strict recording upstream: the oracle of the smuggling tests.
//!
//! It reads what the proxy sends with a strict RFC 9112 parser of its own (written here
//! on purpose: it must refuse what a lenient parser, `httparse` or hyper included,
//! accepts) and records a **violation** for anything a strict recipient would refuse or
//! read differently: a bare CR or LF, obs-fold, a field name that is not a token or
//! holds `_`, a control character in a value, both `Content-Length` and
//! `Transfer-Encoding`, a transfer coding other than exactly `chunked`, a
//! `Content-Length` that is not plain digits or comes twice, a chunk extension, a
//! trailer field RFC 9110 §6.5.1 forbids, an `Upgrade` other than `websocket`. A
//! connection with a violation is closed.
//!
//! Every request it reads is recorded, and answered `200` with its target as the
//! body (and in `x-target`), so a client can tell that an answer is its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A request as the strict upstream read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Names lowercased, values as they came.
    pub fields: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    /// The values of field `name` (lowercase).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    violations: Vec<String>,
    /// Connections that ended inside a request.
    aborted: usize,
}

/// The strict upstream (see the module docs). Stops accepting when dropped.
pub struct StrictUpstream {
    pub addr: std::net::SocketAddr,
    log: Arc<Mutex<Log>>,
    accept: JoinHandle<()>,
}

impl StrictUpstream {
    pub async fn start() -> StrictUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Log::default()));
        let accept = tokio::spawn({
            let log = log.clone();
            async move {
                while let Ok((s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(s, log.clone()));
                }
            }
        });
        StrictUpstream { addr, log, accept }
    }

    /// Every request read so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().seen.clone()
    }

    /// The requests whose target starts with `prefix`.
    pub fn seen_under(&self, prefix: &str) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.target.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Connections that ended inside a request (a cut-off upload).
    pub fn aborted(&self) -> usize {
        self.log.lock().unwrap().aborted
    }

    /// Every violation recorded so far (what, and the bytes around it).
    pub fn violations(&self) -> Vec<String> {
        self.log.lock().unwrap().violations.clone()
    }
}

impl Drop for StrictUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(mut s: TcpStream, log: Arc<Mutex<Log>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match parse(&buf) {
            Parse::Whole(len, seen) => {
                buf.drain(..len);
                let upgrade = !seen.values("upgrade").is_empty();
                let answer = if upgrade {
                    // An h2c-capable upstream: if the proxy passed an upgrade on, the
                    // client would see this.
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                        .to_vec()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-target: {}\r\n\r\n{}",
                        seen.target.len(),
                        seen.target,
                        seen.target
                    )
                    .into_bytes()
                };
                log.lock().unwrap().seen.push(seen);
                if s.write_all(&answer).await.is_err() || upgrade {
                    return;
                }
                continue;
            }
            Parse::Bad(why) => {
                let shown = String::from_utf8_lossy(&buf[..buf.len().min(400)]).into_owned();
                log.lock()
                    .unwrap()
                    .violations
                    .push(format!("{why}: {shown:?}"));
                return;
            }
            Parse::More => {}
        }
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                // A request cut off (the proxy aborting a request whose client body
                // broke) is no violation: it was never whole, so nothing acts on it.
                if !buf.is_empty() {
                    log.lock().unwrap().aborted += 1;
                }
                return;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Parse {
    Whole(usize, Seen),
    More,
    Bad(String),
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^`|~".contains(&c)
}

/// Trailer fields RFC 9110 §6.5.1 forbids (framing, routing, authentication, request
/// modifiers, response control, content description), hop-by-hop ones, and the
/// proxy's own.
fn forbidden_trailer(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "host",
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "content-type",
        "content-encoding",
        "content-range",
        "range",
        "expect",
        "max-forwards",
        "cache-control",
        "pragma",
        "age",
        "expires",
        "date",
        "location",
        "retry-after",
        "vary",
        "www-authenticate",
        "proxy-authenticate",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "forwarded",
    ];
    NAMES.contains(&name) || name.starts_with("x-forwarded-") || name.starts_with("x-canary-")
}

/// A section's lines (without their CRLF) and where it ends (after its empty line).
type Section<'a> = (Vec<&'a [u8]>, usize);

/// The lines of a head or trailer section starting at `at`; `None` while it is not all
/// in. `Err` on a bare CR or LF.
fn lines(buf: &[u8], at: usize) -> Result<Option<Section<'_>>, String> {
    let mut out = Vec::new();
    let mut i = at;
    let mut start = at;
    while i < buf.len() {
        match buf[i] {
            b'\r' => {
                let Some(&next) = buf.get(i + 1) else {
                    return Ok(None);
                };
                if next != b'\n' {
                    return Err("bare CR".into());
                }
                let line = &buf[start..i];
                i += 2;
                if line.is_empty() {
                    return Ok(Some((out, i)));
                }
                out.push(line);
                start = i;
            }
            b'\n' => return Err("bare LF".into()),
            _ => i += 1,
        }
    }
    Ok(None)
}

fn field(line: &[u8]) -> Result<(String, String), String> {
    if line.first().is_some_and(|c| *c == b' ' || *c == b'\t') {
        return Err("obs-fold".into());
    }
    let colon = line
        .iter()
        .position(|&c| c == b':')
        .ok_or("field line without a colon")?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&c| is_tchar(c)) {
        return Err(format!(
            "field name not a token: {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    if name.contains(&b'_') {
        return Err(format!(
            "field name with `_`: {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    let value = line[colon + 1..].trim_ascii();
    if value.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
        return Err("control character in a field value".into());
    }
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

fn parse(buf: &[u8]) -> Parse {
    match parse_inner(buf) {
        Ok(Some((len, seen))) => Parse::Whole(len, seen),
        Ok(None) => Parse::More,
        Err(why) => Parse::Bad(why),
    }
}

fn parse_inner(buf: &[u8]) -> Result<Option<(usize, Seen)>, String> {
    let Some((head, body_at)) = lines(buf, 0)? else {
        return Ok(None);
    };
    let Some((request_line, field_lines)) = head.split_first() else {
        return Err("empty head".into());
    };
    let parts: Vec<&[u8]> = request_line.split(|&c| c == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err("request line is not three parts".into());
    };
    if method.is_empty() || !method.iter().all(|&c| is_tchar(c)) {
        return Err("method not a token".into());
    }
    if target.is_empty() || !target.iter().all(|&c| c.is_ascii_graphic()) {
        return Err("bad request target".into());
    }
    if version != b"HTTP/1.1" {
        return Err("not HTTP/1.1".into());
    }
    let mut fields = Vec::new();
    for l in field_lines {
        fields.push(field(l)?);
    }
    let get = |n: &str| -> Vec<&String> {
        fields
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v)
            .collect()
    };
    let (cl, te) = (get("content-length"), get("transfer-encoding"));
    if !cl.is_empty() && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if get("host").len() != 1 {
        return Err("not exactly one Host".into());
    }
    for u in get("upgrade") {
        if !u.eq_ignore_ascii_case("websocket") {
            return Err(format!("Upgrade {u:?} passed on"));
        }
    }
    let seen = |body: Vec<u8>, trailers| Seen {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        fields: fields.clone(),
        body,
        trailers,
    };
    if !te.is_empty() {
        if te.len() != 1 || te[0] != "chunked" {
            return Err(format!("transfer coding other than `chunked`: {te:?}"));
        }
        let mut at = body_at;
        let mut body = Vec::new();
        loop {
            let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                if buf[at..].contains(&b'\n') {
                    return Err("bare LF in a chunk-size line".into());
                }
                return Ok(None);
            };
            let size_line = &buf[at..at + eol];
            if size_line.is_empty() || !size_line.iter().all(u8::is_ascii_hexdigit) {
                return Err(format!(
                    "chunk-size line not plain hex (an extension?): {:?}",
                    String::from_utf8_lossy(size_line)
                ));
            }
            let size = usize::from_str_radix(std::str::from_utf8(size_line).unwrap(), 16)
                .map_err(|_| "chunk size overflows".to_string())?;
            at += eol + 2;
            if size == 0 {
                let Some((trailer_lines, end)) = lines(buf, at)? else {
                    return Ok(None);
                };
                let mut trailers = Vec::new();
                for l in trailer_lines {
                    let (n, v) = field(l)?;
                    if forbidden_trailer(&n) {
                        return Err(format!("forbidden trailer field {n:?}"));
                    }
                    trailers.push((n, v));
                }
                return Ok(Some((end, seen(body, trailers))));
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[at..at + size]);
            if &buf[at + size..at + size + 2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            at += size + 2;
        }
    }
    let n = match cl[..] {
        [] => 0,
        [v] if !v.is_empty() && v.len() < 19 && v.bytes().all(|c| c.is_ascii_digit()) => {
            v.parse::<usize>().unwrap()
        }
        _ => return Err(format!("Content-Length not one plain number: {cl:?}")),
    };
    if buf.len() < body_at + n {
        return Ok(None);
    }
    Ok(Some((
        body_at + n,
        seen(buf[body_at..body_at + n].to_vec(), Vec::new()),
    )))
}
