//! The admin listener's accept loop, with a connection budget and a header timeout of
//! its own.
//!
//! The admin API shares the process's file descriptors with the data plane. Served
//! without limits (as `axum::serve` does: no connection cap, no header timeout), 1,100
//! half-sent requests to the admin port took every descriptor and the proxy stopped
//! accepting clients. Here the admin listener holds at most [`MAX_CONNECTIONS`]
//! connections: over that it stops accepting, so further connections wait in the
//! kernel's backlog and hold none of this process's descriptors; and a connection
//! that has not sent a whole request head within [`HEADER_TIMEOUT`] (also while idle
//! between keep-alive requests) is closed, so a slot held by a stalled client comes
//! back. A flood can make the admin API slow or unavailable, never the data plane.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Concurrent admin connections: the CLI opens one per call, a Prometheus server one,
/// a dashboard a few. Far below any sane `nofile` limit.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a request head, and to send the next one on an idle
/// keep-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in flight get to finish after the stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` with the default limits until `shutdown` resolves.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    serve_with(listener, app, MAX_CONNECTIONS, HEADER_TIMEOUT, shutdown).await;
}

/// [`serve`] with explicit limits (tests use small ones).
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    // Each connection holds a receiver; the sender's `closed()` is the moment the
    // last one has finished.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // A slot first, then `accept`: over budget a new connection stays in the
        // kernel's backlog instead of taking a descriptor here.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
            drop(stop);
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(
        max: usize,
        header_timeout: Duration,
    ) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let (tx, mut rx) = watch::channel(false);
        tokio::spawn(serve_with(listener, app, max, header_timeout, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        (addr, tx)
    }

    async fn half_sent(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        s
    }

    /// Reads until the peer closes or `limit` passes: what arrived, and whether it closed.
    async fn read_for(s: &mut TcpStream, limit: Duration) -> (String, bool) {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(limit, s.read_to_end(&mut buf))
            .await
            .is_ok();
        (String::from_utf8_lossy(&buf).into_owned(), closed)
    }

    #[tokio::test]
    async fn half_sent_requests_cannot_hold_more_than_the_admin_budget() {
        let (addr, _stop) = start(2, Duration::from_secs(3600)).await;
        let a = half_sent(addr).await;
        let _b = half_sent(addr).await;
        let mut c = TcpStream::connect(addr)
            .await
            .expect("the kernel's backlog takes it");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        // Both slots are held: C is not even accepted.
        let (got, _) = read_for(&mut c, Duration::from_millis(300)).await;
        assert_eq!(got, "", "answered over the budget");
        // A slot comes back: C is served.
        drop(a);
        let (got, closed) = read_for(&mut c, Duration::from_secs(30)).await;
        assert!(closed && got.starts_with("HTTP/1.1 200"), "{got:?}");
    }

    #[tokio::test]
    async fn a_half_sent_admin_request_is_closed_after_the_header_timeout() {
        let (addr, _stop) = start(1, Duration::from_millis(200)).await;
        let mut a = half_sent(addr).await;
        let (_, closed) = read_for(&mut a, Duration::from_secs(30)).await;
        assert!(closed, "still open long after the header timeout");
        // Its slot is free again.
        let mut b = TcpStream::connect(addr).await.expect("connect");
        b.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (got, closed) = read_for(&mut b, Duration::from_secs(30)).await;
        assert!(closed && got.starts_with("HTTP/1.1 200"), "{got:?}");
    }
}
