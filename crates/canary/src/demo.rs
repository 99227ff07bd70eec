//! `canary demo`: one process with two built-in upstreams (v1, v2), the proxy and
//! controller in front of them, synthetic users, and a whole rollout in about a
//! minute. The config goes through the same validation as a user's file.

use std::convert::Infallible;
use std::net::SocketAddr;
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

use crate::cli::{verdict_text, Api, Conn};
use crate::output::printable;

#[derive(Args)]
pub struct DemoArgs {
    /// Make v2 start failing partway, to watch the breaker roll it back.
    #[arg(long)]
    faulty_canary: bool,
    /// Make v2 slow (about 60 ms instead of 1 ms), to watch the analysis catch a latency regression.
    #[arg(long)]
    slow_canary: bool,
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin API address.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
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

fn config_yaml(a: &DemoArgs, v1: SocketAddr, v2: SocketAddr, state: &std::path::Path) -> String {
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
"#,
        listen = a.listen,
        admin = a.admin,
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

async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
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
    let dir = std::env::temp_dir().join(format!("canary-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("canary.yaml");
    std::fs::write(&path, config_yaml(&a, v1, v2, &dir.join("state")))?;
    let cfg = canary_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let path = path.clone();
        async move {
            crate::serve::run(&path, cfg, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    let api = Api::new(&Conn::to(&format!("http://{}", a.admin)));
    // Wait for the admin API (bounded).
    let up = Instant::now();
    while api.call(Method::GET, "/readyz", None).await.is_err() {
        if server.is_finished() || up.elapsed() > Duration::from_secs(10) {
            let _ = stop_tx.send(());
            return match server.await {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the proxy did not start")),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    outln!(
        "canary demo: v1 on {v1}, v2 on {v2}, proxy on {}, admin on {}",
        a.listen,
        a.admin
    );
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
        a.listen
    );
    outln!("  curl -s -H 'x-user-id: alice' http://{}/                # the same user always gets the same version", a.listen);
    outln!(
        "  curl -s -H 'x-canary: always' http://{}/                # a rule: straight to v2",
        a.listen
    );
    outln!(
        "  curl -s http://{}/metrics | grep canary_requests_total",
        a.admin
    );
    outln!(
        "  cargo run --release -- status web --admin http://{}",
        a.admin
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
    let load = tokio::spawn(traffic(a.listen, stats.clone(), fault_at.clone()));
    let start = Instant::now();
    let mut last_line = String::new();
    let mut outcome = None;
    let mut aborted_at = None;
    while start.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    load.abort();
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
    outln!(
        "{} synthetic requests sent. Journal: cargo run --release -- events web --admin http://{}",
        stats.sent.load(Relaxed),
        a.admin
    );
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
    if !a.exit {
        outln!(
            "\nThe proxy keeps serving on {} (admin {}). Ctrl-C to stop.",
            a.listen,
            a.admin
        );
        crate::serve::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
