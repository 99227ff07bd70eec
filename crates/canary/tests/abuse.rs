//! Hostile HTTP/2 clients, driven with the `h2` crate as a raw client: the limits
//! the proxy announces, and floods that end with GOAWAY for the abuser while another
//! client is served as usual.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{addrs, h2c_client, send, Canary, Upstream};
use h2::client::SendRequest;
use h2::Reason;
use http::{Method, Request};
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
    let (send, conn) = h2_connect(&c).await;
    // CVE-2023-44487: open a stream and cancel it at once, as fast as possible.
    let flood = async {
        let mut sent = 0u32;
        for _ in 0..20_000 {
            let Ok(mut s) = send.clone().ready().await else {
                break;
            };
            match s.send_request(get(&c), false) {
                Ok((_resp, mut stream)) => stream.send_reset(Reason::CANCEL),
                Err(_) => break,
            }
            sent += 1;
            // Let the connection task write now and then.
            if sent.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        sent
    };
    let (sent, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), flood),
        bystander(&c)
    );
    let sent = sent.expect("the flood was not stopped within 30 s");
    let end = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the abusive connection stayed open")
        .expect("connection task");
    let err = end.expect_err("the abusive connection ended without an error");
    assert!(
        err.is_go_away() && err.reason() == Some(Reason::ENHANCE_YOUR_CALM),
        "after {sent} resets: {err:?}"
    );
    assert!(sent < 20_000, "{sent}");
    // And the proxy still serves.
    bystander(&c).await;
}
