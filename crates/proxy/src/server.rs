//! The proxy listener: accept loop, connection limit, HTTP/1.1 + h2c, HTTPS
//! (handshakes in the connections' tasks, `crate::tls`), graceful stop.
//!
//! Thread per core: [`spawn_workers`] starts one OS thread per worker, each running a
//! current-thread tokio runtime with its own `SO_REUSEPORT` listener on the same
//! address. The kernel spreads new connections over the listeners; a connection, its
//! requests and its upstream connections then stay on one thread, with no
//! work-stealing scheduler and no cross-thread wake-ups on the request path. Workers
//! share only the snapshot (`ArcSwap`, so a reload reaches every worker at once), the
//! lock-free counters and the connection-limit semaphore.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::connection::{self, Resume, Settings};
use crate::parking::Lot;
use crate::request::ConnInfo;
use crate::snapshot::Proxy;
use crate::tls::ListenerTls;
use crate::worker::set_worker_index;

/// How long in-flight requests get to finish after a stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams per HTTP/2 client connection (Envoy's edge default).
pub const H2_MAX_STREAMS: u32 = 100;
/// Streams an HTTP/2 client may reset before the proxy accepted them, at once.
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the proxy may have to reset for an HTTP/2 client's protocol errors.
pub const H2_MAX_LOCAL_RESETS: usize = 256;
/// Keep-alive pings on HTTP/2 client connections: sent this often…
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// …and the connection closed when one is not answered within this.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves the proxy on `listener` until `shutdown` resolves, then drains connections
/// for up to [`DRAIN_TIMEOUT`].
///
/// Limits (header size, header timeout, connection count) are read from the snapshot
/// current at start; changing them needs a restart (documented in `docs/config.md`).
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(proxy.snapshot().limits.max_connections));
    serve_with(proxy, listener, None, permits, shutdown).await;
}

/// [`serve`] with a connection limit shared with other workers.
/// `tls`: the listener speaks HTTPS (each handshake runs in its connection's task).
pub async fn serve_with(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<ListenerTls>,
    permits: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = proxy.snapshot().limits.clone();
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    // hyper's read-buffer cap (431 above it; 8 KiB is the smallest it accepts), and
    // the most the own reader reads of a head before handing it to hyper. The exact
    // configured limit is enforced per request in `forward`.
    let max_head = limits.max_header_bytes.max(8192) + 1024;
    // The same HTTP/1.1 settings for a connection handed over after requests the own
    // reader served (HTTP/1.1 only: see `connection::Settings`).
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head)
        .keep_alive(true);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head)
        .keep_alive(true);
    // HTTP/2 abuse limits, after Envoy's edge defaults: 100 streams, 64 KiB stream and
    // 1 MiB connection windows. Streams a client resets before they were accepted
    // (rapid reset, CVE-2023-44487) and streams the proxy itself has to reset for a
    // client's errors (MadeYouReset, CVE-2025-8671) are bounded per connection; over
    // either the connection gets GOAWAY (ENHANCE_YOUR_CALM). A header block over
    // `limits.max_header_bytes`, also when it arrives as a flood of CONTINUATION
    // frames, ends the stream (h2 counts the block as it arrives, and answers more
    // CONTINUATION frames than such a block needs with GOAWAY). Floods of empty or
    // tiny DATA frames are h2's own (since 0.4.16: over 100 empty DATA frames without
    // END_STREAM on a connection, or a budget of small ones, get GOAWAY); both are
    // tested in `tests/abuse.rs`. Pings find dead peers: no answer within 20 s closes
    // the connection.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let (lot, yard) = Lot::new();
    let settings = Arc::new(Settings {
        proxy,
        hyper_http1: Arc::new(http1),
        hyper: Arc::new(builder),
        header_timeout,
        max_head,
        body_timeout: Duration::from_millis(limits.body_timeout_ms),
        send_timeout: Duration::from_millis(limits.send_timeout_ms),
        http2_idle_timeout: Duration::from_millis(limits.http2_idle_timeout_ms),
        lot,
    });
    // Every connection holds a receiver: `true` asks it to finish, and the sender's
    // `closed()` is the moment the last one has.
    let (stop_tx, stop_rx) = watch::channel(false);
    // The lot holds one too, for all the idle connections it holds. A TLS listener's
    // connections are hyper's and never parked: it has no lot (a park would close).
    if tls.is_none() {
        tokio::spawn(yard.run(settings.clone(), stop_rx.clone()));
    }
    tokio::pin!(shutdown);
    let (mut accept_errors, mut last_warned) = (0u64, None::<std::time::Instant>);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning (the connection
                    // waits in the queue and is taken once a descriptor frees up), and
                    // say so once a second, not 20 times.
                    accept_errors += 1;
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, failures = accept_errors, "accept failed; retrying every 50 ms");
                        last_warned = Some(std::time::Instant::now());
                        accept_errors = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (settings, stop) = (settings.clone(), stop_rx.clone());
        match &tls {
            None => {
                let conn_info = Arc::new(ConnInfo::new(peer));
                connection::spawn(stream, conn_info, settings, stop, permit, Resume::NEW);
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    connection::serve_tls(stream, peer, &tls, settings, stop).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing remaining connections");
    }
}

/// Binds `workers` listeners on `addr` with `SO_REUSEPORT` (port 0 picks one port for
/// all of them). Binding happens here, on the caller's thread, so errors surface at
/// start-up.
///
/// `SO_REUSEPORT` would also let a second process (a second `canary serve` started
/// by mistake) join the port and silently take half the connections. A plain bind
/// first makes a port already in use fail loudly, as operators expect; the window
/// between that probe and the real binds is microseconds at start-up.
pub fn bind_reuseport(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut out = Vec::with_capacity(workers.max(1));
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Runs one data-plane worker per listener, each on its own thread with a
/// current-thread runtime, until `stop` turns true; then each drains its connections
/// (see [`serve`]). The returned handles finish when their worker has drained.
pub fn spawn_workers(
    proxy: Arc<Proxy>,
    listeners: Vec<std::net::TcpListener>,
    tls: Option<ListenerTls>,
    stop: watch::Receiver<bool>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let permits = Arc::new(Semaphore::new(proxy.snapshot().limits.max_connections));
    let mut handles = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (proxy, permits, mut stop) = (proxy.clone(), permits.clone(), stop.clone());
        let tls = tls.clone();
        let handle = std::thread::Builder::new()
            .name(format!("canary-worker-{i}"))
            .spawn(move || {
                set_worker_index(i);
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "cannot register listener");
                            return;
                        }
                    };
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    serve_with(proxy, listener, tls, permits, stopped).await;
                });
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_an_error_even_for_another_reuseport_process() {
        let ours = bind_reuseport("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = ours[0].local_addr().unwrap();
        assert!(ours.iter().all(|l| l.local_addr().unwrap() == addr));
        let err = bind_reuseport(addr, 2).expect_err("second bind on a port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_reuseport(plain.local_addr().unwrap(), 1).expect_err("port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
