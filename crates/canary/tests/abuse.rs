//! Hostile HTTP/2 clients: the limits the proxy announces (seen by the `h2` crate's
//! client), and floods written as raw frames (rapid reset, MadeYouReset,
//! CONTINUATION, empty DATA) that end with GOAWAY for the abuser while another client
//! is served as usual.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{addrs, h2c_client, send, Canary, Upstream};
use h2::client::SendRequest;
use http::{Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An h2c (prior knowledge) connection: its request handle and the task driving it.
async fn h2_connect(c: &Canary) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(c.listen).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    (send, tokio::spawn(conn))
}

fn get(c: &Canary) -> Request<()> {
    Request::get(c.url("/")).body(()).expect("request")
}

async fn web() -> (Upstream, Canary) {
    let v1 = Upstream::start("v1").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        addrs(&[&v1])
    );
    let c = Canary::start(&body).await;
    (v1, c)
}

/// 50 GETs from a well-behaved h2c client: every one must be a 200.
async fn bystander(c: &Canary) {
    let http = h2c_client();
    let url = c.url("/");
    for i in 0..50 {
        let r = send(&http, Method::GET, &url, &[], "")
            .await
            .unwrap_or_else(|e| panic!("bystander request {i}: {e}"));
        assert_eq!(r.status, 200, "bystander request {i}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_limits_and_served_within_them() {
    let (_v1, c) = web().await;
    let (send, conn) = h2_connect(&c).await;
    let mut send = send.ready().await.expect("ready");
    let (resp, _) = send.send_request(get(&c), true).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    // The server's SETTINGS have arrived with the answer.
    assert_eq!(send.current_max_send_streams(), 100);
    drop(send);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_goaway_and_other_clients_are_served() {
    let (_v1, c) = web().await;
    let mut raw = Raw::open(&c).await;
    // CVE-2023-44487: open a stream and cancel it at once, as fast as possible:
    // HEADERS then RST_STREAM (CANCEL) on streams 1, 3, 5 …, bounded at 20,000.
    // Raw frames rather than h2's client: a client still writing when the server
    // closes may end with a broken pipe before it reads the GOAWAY (it did, under
    // load); the reader here sees what the server sent either way.
    let mut flood = Vec::new();
    for i in 0..20_000u32 {
        let stream = 1 + 2 * i;
        flood.extend(frame(
            HEADERS,
            END_HEADERS,
            stream,
            &request_block(&c, 0x82, "/"),
        ));
        flood.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    let (sent, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), raw.write_all(&flood)),
        bystander(&c)
    );
    let sent = sent.expect("writing the flood did not end within 30 s");
    let closed = raw.closed("rapid reset").await;
    eprintln!("rapid reset: {sent} bytes written; {closed:?}");
    // More than 20 streams reset before they were accepted (`server.rs`).
    closed.assert_calm("too_many_resets");
    // And the proxy still serves.
    bystander(&c).await;
}

// ---------------------------------------------------------------------------------
// Raw frames: the floods a well-behaved client library cannot send.
// ---------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// One HTTP/2 frame (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("frame length")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK field "literal without indexing" with an indexed name (`index`) or, with
/// `index` 0, a new `name` (both short: one-byte lengths).
fn literal(index: u8, name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![index];
    if index == 0 {
        b.push(u8::try_from(name.len()).expect("short name"));
        b.extend_from_slice(name.as_bytes());
    }
    b.push(u8::try_from(value.len()).expect("short value"));
    b.extend_from_slice(value.as_bytes());
    b
}

/// A request head's header block: `method` is an HPACK static index (0x82 GET,
/// 0x83 POST), then `:scheme: http`, `:path`, `:authority`.
fn request_block(c: &Canary, method: u8, path: &str) -> Vec<u8> {
    let mut b = vec![method, 0x86];
    b.extend(literal(0x04, "", path));
    b.extend(literal(0x01, "", &c.listen.to_string()));
    b
}

/// A raw h2c connection: the preface and an empty SETTINGS are sent; a task reads all
/// the server sends until it closes the connection (EOF or an error).
struct Raw {
    write: tokio::net::tcp::OwnedWriteHalf,
    read: JoinHandle<Vec<u8>>,
}

impl Raw {
    async fn open(c: &Canary) -> Raw {
        let tcp = TcpStream::connect(c.listen).await.expect("connect");
        let (mut read, mut write) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        write.write_all(&hello).await.expect("preface");
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        Raw { write, read }
    }

    /// Writes `bytes` in 64 KiB batches until done or a write fails (the server
    /// closed). Returns how many bytes went out.
    async fn write_all(&mut self, bytes: &[u8]) -> usize {
        let mut sent = 0;
        for batch in bytes.chunks(64 * 1024) {
            if self.write.write_all(batch).await.is_err() {
                break;
            }
            sent += batch.len();
        }
        sent
    }

    /// Writes `first`, then `frame` up to `count` times in batches of `batch`, until
    /// a write fails (the server closed). Returns how many of `frame` went out.
    async fn flood(&mut self, first: &[u8], frame: &[u8], count: usize, batch: usize) -> usize {
        if self.write.write_all(first).await.is_err() {
            return 0;
        }
        let chunk = frame.repeat(batch);
        let mut sent = 0;
        while sent < count {
            if self.write.write_all(&chunk).await.is_err() {
                break;
            }
            sent += batch;
        }
        sent
    }

    /// Waits (bounded: 10 s) until the server has closed the connection; returns
    /// what it sent before the close.
    async fn closed(self, what: &str) -> Closed {
        let got = tokio::time::timeout(Duration::from_secs(10), self.read)
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection is still open 10 s later"))
            .expect("reader task");
        let mut out = Closed::default();
        let mut rest = &got[..];
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let end = (9 + len).min(rest.len());
            if rest[3] == GOAWAY && end >= 17 && out.goaway.is_none() {
                let code = u32::from_be_bytes([rest[13], rest[14], rest[15], rest[16]]);
                let debug = String::from_utf8_lossy(&rest[17..end]).into_owned();
                out.goaway = Some((code, debug));
            }
            rest = &rest[end..];
        }
        out
    }
}

/// What a server sent on a raw connection before closing it.
#[derive(Debug, Default)]
struct Closed {
    /// The first GOAWAY: error code and debug data.
    goaway: Option<(u32, String)>,
}

impl Closed {
    /// Asserts the GOAWAY was `ENHANCE_YOUR_CALM` with `debug` as its debug data:
    /// h2 names the limit that ended the connection there, so the test knows it was
    /// the limit it floods and not another.
    fn assert_calm(&self, debug: &str) {
        let got = self
            .goaway
            .as_ref()
            .unwrap_or_else(|| panic!("closed without GOAWAY: {self:?}"));
        assert_eq!(
            (got.0, got.1.as_str()),
            (ENHANCE_YOUR_CALM, debug),
            "GOAWAY"
        );
    }
}

const ENHANCE_YOUR_CALM: u32 = 0xb;
const CANCEL: u32 = 0x8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_closed_and_other_clients_are_served() {
    let (_v1, c) = web().await;
    let mut raw = Raw::open(&c).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block
    // (each with a field, so the block also grows): bounded at 10,000 frames, ~1.2 MB.
    let first = frame(HEADERS, 0, 1, &request_block(&c, 0x82, "/"));
    let cont = frame(CONTINUATION, 0, 1, &literal(0, "x-flood", &"a".repeat(100)));
    let flood = raw.flood(&first, &cont, 10_000, 100);
    let (sent, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), flood),
        bystander(&c)
    );
    let sent = sent.expect("writing the flood did not end within 30 s");
    let closed = raw.closed("CONTINUATION flood").await;
    eprintln!("CONTINUATION flood: {sent} frames written; {closed:?}");
    // h2 counts the CONTINUATION frames of a header block (RUSTSEC-2024-0332).
    closed.assert_calm("too_many_continuations");
    bystander(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_flood_is_closed_and_other_clients_are_served() {
    let (_v1, c) = web().await;
    let mut raw = Raw::open(&c).await;
    // A request whose body is a stream of DATA frames that carry nothing and never
    // end it: bounded at 100,000 frames (900 KB).
    let first = frame(HEADERS, END_HEADERS, 1, &request_block(&c, 0x83, "/sink"));
    let empty = frame(DATA, 0, 1, &[]);
    let flood = raw.flood(&first, &empty, 100_000, 1_000);
    let (sent, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), flood),
        bystander(&c)
    );
    let sent = sent.expect("writing the flood did not end within 30 s");
    let closed = raw.closed("empty DATA flood").await;
    eprintln!("empty DATA flood: {sent} frames written; {closed:?}");
    // h2 (0.4.16 on) allows 100 empty DATA frames without END_STREAM per connection.
    closed.assert_calm("too_many_data_frames");
    bystander(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_you_reset_is_closed_and_other_clients_are_served() {
    let (_v1, c) = web().await;
    let mut raw = Raw::open(&c).await;
    // CVE-2025-8671: requests the server itself must reset. Each is a malformed
    // request (a connection-specific field, `connection`, RFC 9113 §8.2.2) on a new
    // stream: h2 resets it with PROTOCOL_ERROR. Bounded at 2,000 streams.
    let mut flood = Vec::new();
    for i in 0..2_000u32 {
        let mut block = request_block(&c, 0x82, "/");
        block.extend(literal(0, "connection", "close"));
        flood.extend(frame(HEADERS, END_HEADERS | 0x1, 1 + 2 * i, &block));
    }
    let (sent, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), raw.write_all(&flood)),
        bystander(&c)
    );
    let sent = sent.expect("writing the flood did not end within 30 s");
    let closed = raw.closed("MadeYouReset").await;
    eprintln!("MadeYouReset: {sent} bytes written; {closed:?}");
    // The proxy resets at most 256 of a connection's streams for its errors
    // (`H2_MAX_LOCAL_RESETS` in `server.rs`), then sends GOAWAY.
    closed.assert_calm("too_many_internal_resets");
    bystander(&c).await;
}
