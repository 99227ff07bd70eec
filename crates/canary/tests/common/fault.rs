//! A fault-injecting TCP proxy for the end-to-end tests: placed between `canary` and an
//! upstream, it does to the upstream's connections what networks and dying processes
//! do (Toxiproxy's "toxics": latency, bandwidth, slicer, reset_peer, limit_data,
//! slow close).
//!
//! Why hand-written: neither a Toxiproxy server nor `tc netem` can run here
//! (`../shared/design/http-hardening.md` §5), and the tests need only a few faults,
//! each applied per connection, plus counts a test can assert on: connections
//! accepted and still open (is an upstream socket released?), and bytes `canary`
//! sent on a connection after its fault (was a faulted socket reused?).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What happens to a connection's bytes. Set with [`FaultProxy::set`]; a connection
/// keeps the toxic it was accepted under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Toxic {
    /// Bytes pass unchanged.
    #[default]
    None,
    /// Every chunk, both ways, is held back this long before it is passed on.
    Latency(Duration),
    /// Upstream → canary at most this many bytes per second.
    Bandwidth(u64),
    /// Upstream → canary in segments of at most `max` bytes, `gap` apart (partial
    /// reads of heads, chunk-size lines and bodies).
    Slicer { max: usize, gap: Duration },
    /// After this many upstream → canary bytes, both connections are reset (RST).
    ResetAfter(u64),
    /// After this many upstream → canary bytes, both connections are closed (FIN).
    LimitData(u64),
    /// A connection with no byte either way for this long is closed (an upstream's
    /// keep-alive timeout, a NAT dropping idle flows).
    CloseIdle(Duration),
    /// After this many upstream → canary bytes, nothing more is passed on either way,
    /// but both connections stay open (an upstream stalled mid-response).
    StallAfter(u64),
    /// After this many upstream → canary bytes, the proxy sends canary a FIN and
    /// drops the upstream connection, but keeps reading from canary: anything canary
    /// writes afterwards is counted in [`FaultProxy::after_fault`].
    HalfClose(u64),
}

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicU64,
    faults: AtomicU64,
    after_fault: AtomicU64,
}

/// The proxy; dropping it closes the listener (open connections end with their
/// peers or their toxic).
pub struct FaultProxy {
    pub addr: SocketAddr,
    toxic: Arc<Mutex<Toxic>>,
    stats: Arc<Stats>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy addr");
        let toxic = Arc::new(Mutex::new(Toxic::None));
        let stats = Arc::new(Stats::default());
        let accept = tokio::spawn({
            let (toxic, stats) = (toxic.clone(), stats.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let t = *toxic.lock().unwrap();
                    let stats = stats.clone();
                    stats.accepted.fetch_add(1, Relaxed);
                    stats.open.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        relay(client, upstream, t, &stats).await;
                        stats.open.fetch_sub(1, Relaxed);
                    });
                }
            }
        });
        FaultProxy {
            addr,
            toxic,
            stats,
            accept,
        }
    }

    /// The toxic for connections accepted from now on.
    pub fn set(&self, t: Toxic) {
        *self.toxic.lock().unwrap() = t;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Relaxed)
    }

    /// Connections currently open (canary's upstream sockets through this proxy).
    pub fn open(&self) -> u64 {
        self.stats.open.load(Relaxed)
    }

    /// How many times a toxic cut a connection (reset, limit, half-close, idle close).
    pub fn faults(&self) -> u64 {
        self.stats.faults.load(Relaxed)
    }

    /// Bytes canary sent on a connection after its fault: > 0 means a faulted socket
    /// was used again.
    pub fn after_fault(&self) -> u64 {
        self.stats.after_fault.load(Relaxed)
    }

    /// Waits (bounded) until at most `n` connections are open; returns the count then.
    pub async fn wait_open_at_most(&self, n: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let open = self.open();
            if open <= n || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How a relayed connection ended.
enum End {
    /// One side closed; the other is closed after it.
    Done,
    Reset,
    Close,
    HalfClose,
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, toxic: Toxic, stats: &Stats) {
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    // Milliseconds since `start` of the last byte either way (for CloseIdle).
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Relaxed);
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let to_upstream = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                touch();
                if let Toxic::Latency(d) = toxic {
                    tokio::time::sleep(d).await;
                }
                if uw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = uw.shutdown().await;
            if !matches!(toxic, Toxic::StallAfter(_)) {
                std::future::pending::<()>().await;
            }
        };
        let to_client = async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut passed = 0u64;
            loop {
                let n = match ur.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = cw.shutdown().await;
                        return End::Done;
                    }
                    Ok(n) => n,
                };
                touch();
                let mut chunk = &buf[..n];
                // The cut-off toxics pass bytes up to their limit, then fire.
                let limit = match toxic {
                    Toxic::ResetAfter(l)
                    | Toxic::LimitData(l)
                    | Toxic::HalfClose(l)
                    | Toxic::StallAfter(l) => Some(l),
                    _ => None,
                };
                let fire = limit.is_some_and(|l| passed + n as u64 >= l);
                if let Some(l) = limit {
                    chunk = &chunk[..(l.saturating_sub(passed) as usize).min(n)];
                }
                let ok = match toxic {
                    Toxic::Latency(d) => {
                        tokio::time::sleep(d).await;
                        cw.write_all(chunk).await.is_ok()
                    }
                    Toxic::Bandwidth(rate) => {
                        // Tenths of a second's worth at a time.
                        let step = (rate / 10).max(1) as usize;
                        let mut ok = true;
                        for piece in chunk.chunks(step) {
                            ok = cw.write_all(piece).await.is_ok();
                            if !ok {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        ok
                    }
                    Toxic::Slicer { max, gap } => {
                        let mut ok = true;
                        for piece in chunk.chunks(max.max(1)) {
                            ok = cw.write_all(piece).await.is_ok();
                            if !ok {
                                break;
                            }
                            tokio::time::sleep(gap).await;
                        }
                        ok
                    }
                    _ => cw.write_all(chunk).await.is_ok(),
                };
                passed += chunk.len() as u64;
                if fire {
                    stats.faults.fetch_add(1, Relaxed);
                    if let Toxic::StallAfter(_) = toxic {
                        // Hold both open until canary gives up on this one (the
                        // other direction ends the relay when canary closes).
                        return std::future::pending().await;
                    }
                    return match toxic {
                        Toxic::ResetAfter(_) => End::Reset,
                        Toxic::LimitData(_) => End::Close,
                        _ => End::HalfClose,
                    };
                }
                if !ok {
                    return End::Done;
                }
            }
        };
        let idle = async {
            let Toxic::CloseIdle(d) = toxic else {
                return std::future::pending::<End>().await;
            };
            let d = d.as_millis() as u64;
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if (start.elapsed().as_millis() as u64).saturating_sub(last.load(Relaxed)) >= d {
                    stats.faults.fetch_add(1, Relaxed);
                    return End::Close;
                }
            }
        };
        tokio::select! {
            e = to_client => e,
            () = to_upstream => End::Done,
            e = idle => e,
        }
    };
    match end {
        End::Done | End::Close => {}
        End::Reset => {
            // SO_LINGER 0: close() sends RST instead of FIN.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            let _ = socket2::SockRef::from(&up).set_linger(Some(Duration::ZERO));
        }
        End::HalfClose => {
            let _ = client.shutdown().await;
            drop(up);
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                stats.after_fault.fetch_add(n as u64, Relaxed);
            }
        }
    }
}
