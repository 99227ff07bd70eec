//! Slow and stalled peers, each on a raw socket with timeouts of half a second: a
//! client that stalls its request body (`limits.body_timeout`), one that does not read
//! its answer (`limits.send_timeout`), an upstream that stalls mid-response (a route's
//! `timeouts.idle`) and an idle HTTP/2 connection (`limits.http2_idle_timeout`). Each
//! is closed within its timeout plus a second, the upstream socket it held is
//! released (counted by a fault proxy in front of the upstream), the timeout is in
//! `/metrics`, and a client on another route is served meanwhile.
//!
//! Also the regression of a client that stalls its body until the upstream gives up
//! (issue 19): answered `408`, counted as a client abort, never against the version
//! (no breaker trip) or the instance (no ejection).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fault::{FaultProxy, Toxic};
use common::{addrs, h2c_client, metric_value, send, Canary, Upstream};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The timeouts of these tests.
const T: Duration = Duration::from_millis(500);
/// The bound: closed within the timeout plus a second.
const CLOSED_WITHIN: Duration = Duration::from_millis(1_500);

const LIMITS: &str =
    "limits: {body_timeout: 500ms, send_timeout: 500ms, http2_idle_timeout: 500ms}\n";

/// A route `/slow` through a fault proxy (to count the upstream sockets) and a route
/// `/` straight to the upstream (the bystander's).
async fn setup(toxic: Toxic) -> (Upstream, FaultProxy, Canary) {
    let up = Upstream::start("v1").await;
    let fp = FaultProxy::start(up.addr).await;
    fp.set(toxic);
    let body = format!(
        "{LIMITS}routes:\n  - name: slow\n    path_prefix: /slow\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n    timeouts: {{idle: 500ms}}\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        fp.addr,
        addrs(&[&up])
    );
    let c = Canary::start(&body).await;
    (up, fp, c)
}

/// Reads until the peer closes; `None` if it is still open after `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A GET on the other route answers 200.
async fn bystander_ok(c: &Canary) {
    let r = send(&common::client(), Method::GET, &c.url("/"), &[], "")
        .await
        .expect("bystander");
    assert_eq!(r.status, 200, "{r:?}");
}

async fn timeouts(c: &Canary, kind: &str) -> f64 {
    metric_value(
        &c.metrics().await,
        "canary_timeouts_total",
        &[("kind", kind)],
    )
    .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_with_408_and_frees_its_upstream_socket() {
    let (_up, fp, c) = setup(Toxic::None).await;
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    s.write_all(b"POST /slow/sink HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
        .await
        .expect("write");
    let stalled = Instant::now();
    bystander_ok(&c).await;
    let got = read_until_closed(&mut s, CLOSED_WITHIN)
        .await
        .expect("a stalled body kept its connection open past body_timeout + 1 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(stalled.elapsed() >= T, "cut before the timeout");
    assert_eq!(
        fp.wait_open_at_most(0, CLOSED_WITHIN).await,
        0,
        "upstream socket kept"
    );
    assert!(timeouts(&c, "body").await >= 1.0);
    let m = c.metrics().await;
    let labels = [("route", "slow"), ("version", "v1")];
    assert_eq!(
        metric_value(&m, "canary_request_failures_total", &labels),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&m, "canary_client_aborts_total", &labels),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_cut_and_frees_its_upstream_socket() {
    let (_up, fp, c) = setup(Toxic::None).await;
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    // Far more than the socket buffers on the way hold; then nothing is read.
    s.write_all(b"GET /slow/bytes/33554432 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fp.accepted() == 0 {
        assert!(Instant::now() < deadline, "the request never went upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bystander_ok(&c).await;
    // Buffers fill within a moment; then the send timeout runs.
    assert_eq!(
        fp.wait_open_at_most(0, Duration::from_secs(3) + CLOSED_WITHIN)
            .await,
        0,
        "the upstream socket of a client that does not read was kept: {}",
        c.metrics().await
    );
    assert!(timeouts(&c, "send").await >= 1.0);
    let got = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the connection of a client that does not read was kept open");
    assert!(
        got.len() < 32 << 20,
        "the whole body arrived: {}",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stalled_mid_response_is_cut_after_timeouts_idle() {
    let (_up, fp, c) = setup(Toxic::StallAfter(5_000)).await;
    let mut s = TcpStream::connect(c.listen).await.expect("connect");
    s.write_all(b"GET /slow/bytes/20000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let sent = Instant::now();
    bystander_ok(&c).await;
    let got = read_until_closed(&mut s, CLOSED_WITHIN + Duration::from_millis(300))
        .await
        .expect("a stalled upstream's answer was not cut within timeouts.idle + 1 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let (_, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(body.len() < 20_000, "looks complete");
    assert!(sent.elapsed() >= T);
    assert_eq!(
        fp.wait_open_at_most(0, CLOSED_WITHIN).await,
        0,
        "stalled socket kept"
    );
    assert_eq!(fp.faults(), 1);
    assert!(timeouts(&c, "upstream_idle").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_http2_idle_timeout() {
    let (_up, _fp, c) = setup(Toxic::None).await;
    let tcp = TcpStream::connect(c.listen).await.expect("connect");
    let (send_req, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut send_req = send_req.ready().await.expect("ready");
    let req = http::Request::get(c.url("/")).body(()).expect("request");
    let (resp, _) = send_req.send_request(req, true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
    let idle = Instant::now();
    // A request on another connection meanwhile.
    let r = send(&h2c_client(), Method::GET, &c.url("/"), &[], "")
        .await
        .expect("bystander");
    assert_eq!(r.status, 200);
    let ended = tokio::time::timeout(CLOSED_WITHIN, conn)
        .await
        .expect("an idle HTTP/2 connection stayed open past http2_idle_timeout + 1 s");
    assert!(
        ended.expect("connection task").is_ok(),
        "not a graceful GOAWAY"
    );
    assert!(idle.elapsed() >= T);
    assert!(timeouts(&c, "http2_idle").await >= 1.0);
}

/// An upstream that reads a request head, waits `after` for the body, and closes
/// without an answer (an application server's own body timeout).
async fn impatient_upstream(after: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(after).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_posts_never_trip_the_breaker_nor_eject_an_instance() {
    let v1 = impatient_upstream(Duration::from_millis(200)).await;
    let v2 = impatient_upstream(Duration::from_millis(200)).await;
    // The default body_timeout (60 s): the upstream gives up first.
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: [\"{v1}\"]}}\n    canary: {{version: v2, upstreams: [\"{v2}\"]}}\n    sticky: {{header: x-user-id}}\n    ejection: {{consecutive_failures: 5}}\n    rules:\n      - header: {{name: x-canary, value: always}}\n        to: canary\n    rollout:\n      steps: [{{weight: 10, pause: manual}}]\n      analysis: {{interval: 500ms, window: 3s, min_requests: 1000000}}\n      breaker: {{consecutive_failures: 5}}\n"
    );
    let c = Canary::start(&body).await;
    let stalled_post = |canary: bool| {
        let addr = c.listen;
        async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let rule = if canary { "X-Canary: always\r\n" } else { "" };
            let head = format!(
                "POST /x HTTP/1.1\r\nHost: a\r\nX-User-Id: u1\r\n{rule}Content-Length: 10\r\n\r\nab"
            );
            s.write_all(head.as_bytes()).await.expect("write");
            let got = read_until_closed(&mut s, Duration::from_secs(10))
                .await
                .expect("no answer, connection open");
            String::from_utf8_lossy(&got).into_owned()
        }
    };
    // Five to the canary (the breaker's limit), ten to stable (twice the ejection's).
    for (canary, n) in [(true, 5), (false, 10)] {
        for i in 0..n {
            let text = stalled_post(canary).await;
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408"),
                "#{i} (canary {canary}): {text:?}"
            );
        }
    }
    let s = c.status("web").await;
    assert_ne!(
        s["phase"], "aborted",
        "the breaker tripped on stalled bodies: {s:#}"
    );
    let m = c.metrics().await;
    for (version, aborts) in [("v1", 10.0), ("v2", 5.0)] {
        let labels = [("route", "web"), ("version", version)];
        assert_eq!(
            metric_value(&m, "canary_request_failures_total", &labels),
            Some(0.0),
            "{version}: {m}"
        );
        assert_eq!(
            metric_value(&m, "canary_client_aborts_total", &labels),
            Some(aborts),
            "{version}: {m}"
        );
    }
    for addr in [v1, v2] {
        let a = addr.to_string();
        assert_eq!(
            metric_value(&m, "canary_upstream_healthy", &[("upstream", a.as_str())]),
            Some(1.0),
            "{a} ejected for clients' stalled bodies: {m}"
        );
    }
}
