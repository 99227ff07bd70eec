//! `canary demo`: one process with two built-in upstreams (v1, v2), the proxy and
//! controller in front of them, synthetic users, and a whole rollout in about 35 s
//! (four steps of 8 s, each also waiting for a passing verdict). The config goes
//! through the same validation as a user's file.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::cli::{event_line, verdict_text, Api, Conn};
use crate::output::printable;

#[derive(Args)]
pub struct DemoArgs {
    /// Make v2 start failing partway, to watch the breaker roll it back.
    #[arg(long)]
    faulty_canary: bool,
    /// Make v2 slow (about 60 ms instead of 1 ms), to watch the analysis catch a latency regression.
    #[arg(long)]
    slow_canary: bool,
    /// Proxy listen address [default: 127.0.0.1:8080, or a free port when that is in
    /// use]. Port 0: any free port. An address in use is an error.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin API address [default: 127.0.0.1:9901, or a free port when that is in use].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Exit when the rollout has finished instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// A built-in upstream: answers `hello from <version>`; fails with 500 when `failing`.
async fn upstream(
    version: &'static str,
    failing: Arc<AtomicBool>,
    delay: Duration,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let failing = failing.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let failing = failing.load(Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        let (status, body) = if failing {
                            (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("{version} is broken\n"),
                            )
                        } else {
                            (StatusCode::OK, format!("hello from {version}\n"))
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn config_yaml(
    listen: SocketAddr,
    admin: SocketAddr,
    v1: SocketAddr,
    v2: SocketAddr,
    state: &std::path::Path,
) -> String {
    format!(
        r#"# canary demo config (generated)
listen: {listen}
admin: {admin}
state_dir: {state}
routes:
  - name: web
    stable: {{version: v1, upstreams: ["{v1}"]}}
    canary: {{version: v2, upstreams: ["{v2}"]}}
    sticky: {{header: x-user-id, cookie: canary_id}}
    rules:
      - header: {{name: x-canary, value: always}}
        to: canary
      - header: {{name: x-canary, value: never}}
        to: stable
    rollout:
      steps:
        - {{weight: 10, pause: 8s}}
        - {{weight: 25, pause: 8s}}
        - {{weight: 50, pause: 8s}}
        - {{weight: 100, pause: 8s}}
      analysis:
        interval: 2s
        window: 10s
        min_requests: 20
        max_error_rate: 0.02
        max_p99_latency: 500ms
        max_error_rate_increase: 0.01
        max_latency_increase: 2
        latency_noise_floor: 25ms   # ~1 ms upstreams: a busy machine's jitter is no regression
        failure_limit: 2
      breaker:
        consecutive_failures: 5
        min_clients: 1    # every synthetic user comes from 127.0.0.1: one client address
"#,
        state = state.display(),
    )
}

struct Traffic {
    sent: AtomicU64,
    v2_errors: AtomicU64,
    v2_errors_after_fault: AtomicU64,
    first_v2_error: std::sync::Mutex<Option<Instant>>,
    last_v2_error: std::sync::Mutex<Option<Instant>>,
}

/// Synthetic users: about 150 requests a second from 5 000 distinct user ids.
async fn traffic(
    listen: SocketAddr,
    stats: Arc<Traffic>,
    fault_at: Arc<std::sync::Mutex<Option<Instant>>>,
) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut n: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        for _ in 0..3 {
            n += 1;
            let user = (n.wrapping_mul(2_654_435_761)) % 5_000;
            let req = Request::builder()
                .method(Method::GET)
                .uri(format!("http://{listen}/"))
                .header("x-user-id", format!("user-{user}"))
                .body(Empty::new());
            let Ok(req) = req else { continue };
            let client = client.clone();
            let stats = stats.clone();
            let fault_at = fault_at.clone();
            tokio::spawn(async move {
                stats.sent.fetch_add(1, Relaxed);
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
                {
                    let v2 = resp
                        .headers()
                        .get("x-canary-version")
                        .is_some_and(|v| v == "v2");
                    if v2 && resp.status().is_server_error() {
                        stats.v2_errors.fetch_add(1, Relaxed);
                        if fault_at.lock().map(|f| f.is_some()).unwrap_or(false) {
                            stats.v2_errors_after_fault.fetch_add(1, Relaxed);
                            let now = Instant::now();
                            if let Ok(mut f) = stats.first_v2_error.lock() {
                                f.get_or_insert(now);
                            }
                            if let Ok(mut l) = stats.last_v2_error.lock() {
                                *l = Some(now);
                            }
                        }
                    }
                    let _ = resp.into_body().collect().await;
                }
            });
        }
    }
}

pub fn main(a: DemoArgs) -> ExitCode {
    crate::serve::init_tracing_quiet();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("canary demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(a)) {
        Ok(code) => code,
        Err(e) => {
            errln!("canary demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The ports the demo listens on when none are given: free ones are taken instead when
/// these are in use.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

/// The address to serve `flag` on: `want` if given (port 0: any free port; in use: an
/// error), else `default` if it is free, else any free port. Probed with a plain bind,
/// which fails whenever anything listens there (also a `SO_REUSEPORT` listener of
/// another `canary`), so the demo never sends its traffic into someone else's server.
fn pick_addr(
    flag: &str,
    want: Option<SocketAddr>,
    default: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let probe = |addr: SocketAddr| std::net::TcpListener::bind(addr).and_then(|l| l.local_addr());
    match want {
        Some(addr) => probe(addr).map_err(|e| {
            anyhow::anyhow!(
                "{flag} {addr}: {e} (another canary serve or demo?): choose another address, \
                 or leave {flag} out to use a free port"
            )
        }),
        None => probe(default)
            .or_else(|_| probe(SocketAddr::new(default.ip(), 0)))
            .map_err(|e| anyhow::anyhow!("{flag}: no free port on {}: {e}", default.ip())),
    }
}

/// What the demo has started and must stop, whichever way it ends.
#[derive(Default)]
struct Running {
    server: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    load: Option<tokio::task::JoinHandle<()>>,
}

async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    // Ctrl-C or SIGTERM at any moment stops the demo through the same clean-up below
    // (server stopped, temp dir removed), not by killing the process.
    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        let _ = sig_tx.send(true);
    });
    let dir = tempfile::Builder::new().prefix("canary-demo-").tempdir()?;
    let mut running = Running::default();
    let mut interrupted = sig_rx.clone();
    let result = tokio::select! {
        r = demo(&a, dir.path(), &mut running, sig_rx) => r,
        _ = interrupted.wait_for(|s| *s) => {
            outln!("\ninterrupted");
            Ok(ExitCode::FAILURE)
        }
    };
    if let Some(load) = running.load.take() {
        load.abort();
    }
    if let Some((stop, server)) = running.server.take() {
        let _ = stop.send(());
        let _ = server.await;
    }
    // The server has stopped, so nothing writes into the state directory any more.
    let path = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        errln!("canary demo: cannot remove {}: {e}", path.display());
    }
    result
}

async fn demo(
    a: &DemoArgs,
    dir: &std::path::Path,
    running: &mut Running,
    mut interrupted: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let listen = pick_addr("--listen", a.listen, DEFAULT_LISTEN)?;
    let admin = pick_addr("--admin", a.admin, DEFAULT_ADMIN)?;
    let v2_failing = Arc::new(AtomicBool::new(false));
    let v1 = upstream(
        "v1",
        Arc::new(AtomicBool::new(false)),
        Duration::from_millis(1),
    )
    .await?;
    let v2_delay = if a.slow_canary {
        Duration::from_millis(60)
    } else {
        Duration::from_millis(1)
    };
    let v2 = upstream("v2", v2_failing.clone(), v2_delay).await?;
    let path = dir.join("canary.yaml");
    std::fs::write(
        &path,
        config_yaml(listen, admin, v1, v2, &dir.join("state")),
    )?;
    let cfg = canary_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn({
        let path = path.clone();
        async move {
            crate::serve::run(
                &path,
                cfg,
                async {
                    let _ = stop_rx.await;
                },
                Some(bound_tx),
            )
            .await
        }
    });
    // Go on only once this process has bound both addresses: an answer from whatever
    // else listens there must never be taken for the demo's own.
    tokio::select! {
        b = bound_rx => {
            if b.is_err() {
                // The server ended before binding: its error says why.
                return Err(match (&mut server).await {
                    Ok(Err(e)) => e,
                    _ => anyhow::anyhow!("the proxy did not start"),
                });
            }
        }
        r = &mut server => {
            return Err(match r {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the proxy did not start"),
            });
        }
    }
    running.server = Some((stop_tx, server));
    let api = Api::new(&Conn::to(&format!("http://{admin}")));

    outln!("canary demo: v1 on {v1}, v2 on {v2}, proxy on {listen}, admin on {admin}");
    outln!("config: {}", path.display());
    outln!("rollout of v2: 10% → 25% → 50% → 100%, 8 s per step, analysis every 2 s against v1");
    if a.faulty_canary {
        outln!("--faulty-canary: v2 will start returning 500 during the 25% step");
    }
    if a.slow_canary {
        outln!("--slow-canary: v2 answers in ~60 ms against v1's ~1 ms; the relative latency limit should abort it");
    }
    outln!();
    outln!("try, in another terminal:");
    outln!(
        "  curl -si http://{}/ | grep -i x-canary-version          # which version served you",
        listen
    );
    outln!("  curl -s -H 'x-user-id: alice' http://{}/                # the same user always gets the same version", listen);
    outln!(
        "  curl -s -H 'x-canary: always' http://{}/                # a rule: straight to v2",
        listen
    );
    outln!(
        "  curl -s http://{}/metrics | grep canary_requests_total",
        admin
    );
    outln!(
        "  cargo run --release -- status web --admin http://{}",
        admin
    );
    outln!();

    let stats = Arc::new(Traffic {
        sent: AtomicU64::new(0),
        v2_errors: AtomicU64::new(0),
        v2_errors_after_fault: AtomicU64::new(0),
        first_v2_error: Default::default(),
        last_v2_error: Default::default(),
    });
    let fault_at: Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    running.load = Some(tokio::spawn(traffic(
        listen,
        stats.clone(),
        fault_at.clone(),
    )));
    let start = Instant::now();
    let mut last_line = String::new();
    let mut outcome = None;
    let mut aborted_at = None;
    while start.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if running
            .server
            .as_ref()
            .is_some_and(|(_, s)| s.is_finished())
        {
            anyhow::bail!("the proxy stopped during the demo");
        }
        let Ok((StatusCode::OK, r)) = api.call(Method::GET, "/api/v1/routes/web", None).await
        else {
            continue;
        };
        let phase = r["phase"].as_str().unwrap_or("?").to_string();
        let step = r["step"].as_u64().unwrap_or(0);
        if a.faulty_canary
            && step >= 1
            && phase == "progressing"
            && !v2_failing.load(Relaxed)
            && start.elapsed() > Duration::from_secs(12)
        {
            v2_failing.store(true, Relaxed);
            if let Ok(mut f) = fault_at.lock() {
                *f = Some(Instant::now());
            }
            outln!(
                "[{:>4.1}s] v2 starts failing now",
                start.elapsed().as_secs_f64()
            );
        }
        let line = format!(
            "phase {phase:<11} step {}/4  weight {:>5}%  verdict {}",
            step + 1,
            r["weight"].as_f64().unwrap_or(0.0),
            verdict_text(&r["last_verdict"])
        );
        if line != last_line {
            outln!("[{:>4.1}s] {line}", start.elapsed().as_secs_f64());
            last_line = line;
        }
        if phase == "promoted" || phase == "aborted" {
            if phase == "aborted" {
                aborted_at = Some(Instant::now());
            }
            outcome = Some(r);
            break;
        }
    }
    // Let in-flight requests land before counting what users saw.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(load) = running.load.take() {
        load.abort();
    }
    outln!();
    match &outcome {
        Some(r) if r["phase"] == "promoted" => {
            outln!(
                "v2 promoted: all users on v2. {}",
                printable(r["message"].as_str().unwrap_or(""))
            );
        }
        Some(r) => {
            outln!(
                "v2 rolled back: {}",
                printable(r["abort_reason"].as_str().unwrap_or("?"))
            );
            let first_err = stats.first_v2_error.lock().ok().and_then(|f| *f);
            let last_err = stats.last_v2_error.lock().ok().and_then(|l| *l);
            if let (Some(f), Some(l)) = (first_err, last_err) {
                outln!(
                    "after v2 began failing, users saw {} v2 errors; the last one {:.0} ms after the first",
                    stats.v2_errors_after_fault.load(Relaxed),
                    l.duration_since(f).as_secs_f64() * 1000.0
                );
            }
            let _ = aborted_at;
        }
        None => outln!("the rollout did not finish within 3 minutes"),
    }
    outln!("{} synthetic requests sent.", stats.sent.load(Relaxed));
    // The exit code says whether the demo showed what it set out to show: a rollback
    // for the wrong reason (say, latency noise before the fault) is not a success.
    let reason = outcome
        .as_ref()
        .and_then(|r| r["abort_reason"].as_str())
        .unwrap_or("");
    let promoted = outcome.as_ref().is_some_and(|r| r["phase"] == "promoted");
    let expected = if a.faulty_canary {
        reason.starts_with("breaker")
    } else if a.slow_canary {
        reason.contains("latency")
    } else {
        promoted
    };
    if a.exit {
        // The admin API stops with the demo, so its journal is shown here rather than
        // pointed at.
        if let Ok((StatusCode::OK, events)) = api
            .call(Method::GET, "/api/v1/routes/web/events", None)
            .await
        {
            outln!("\nThe journal (canary events web):");
            for e in events.as_array().into_iter().flatten() {
                outln!("  {}", event_line(e));
            }
        }
    } else {
        outln!(
            "\nThe rollout is over; the proxy keeps serving on {listen} (admin {admin}) so you \
             can look around:\n  cargo run --release -- events web --admin http://{admin}\n\
             Ctrl-C to stop (`--exit` stops right after the rollout)."
        );
        let _ = interrupted.wait_for(|s| *s).await;
    }
    Ok(if expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_default_port_is_replaced_and_a_taken_chosen_one_is_an_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let picked = pick_addr("--listen", None, addr).expect("a free port instead");
        assert_ne!(picked.port(), addr.port());
        assert_ne!(picked.port(), 0);
        let e = pick_addr("--listen", Some(addr), DEFAULT_LISTEN).expect_err("taken");
        assert!(
            e.to_string().starts_with(&format!("--listen {addr}: ")),
            "{e}"
        );
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        assert_ne!(
            pick_addr("--admin", Some(any), DEFAULT_ADMIN)
                .expect("free")
                .port(),
            0
        );
    }
}
