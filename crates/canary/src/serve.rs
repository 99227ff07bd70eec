//! `canary serve`: load the config, bind, run proxy + controller + admin API, stop
//! cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use canary_config::Config;
use canary_control::admin::guard::HostPolicy;
use canary_control::admin::{router, Admin};
use canary_control::store::Store;
use canary_control::{run_controller, source, Controller};
use canary_proxy::Proxy;
use tokio::net::TcpListener;

pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CANARY_LOG").unwrap_or_else(|_| "info".into());
    let _ = fmt_logger().with_env_filter(filter).try_init();
}

/// Logs to stderr, coloured only on a terminal.
fn fmt_logger() -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    tracing_subscriber::filter::LevelFilter,
    fn() -> std::io::Stderr,
> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
        // NO_COLOR (set and not empty) turns colour off, as for every other output.
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_target(false)
}

pub fn main(path: &Path) -> ExitCode {
    init_tracing();
    let cfg = match canary_config::load(path) {
        Ok(c) => c,
        Err(e) => {
            errln!("{e}");
            crate::init::hint_if_missing(path);
            return ExitCode::FAILURE;
        }
    };
    // The control plane (controller, admin API, health checks, config watch) gets one
    // runtime thread; the data plane runs on its own per-core threads (`run`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            errln!("canary: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(path, cfg, shutdown_signal(), None)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("canary: {e:#}");
            if let Some(h) = crate::hint::for_serve(&e) {
                errln!("canary: {h}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The admin token from the configured environment variable, if set and non-empty.
pub fn admin_token(cfg: &Config) -> Option<Arc<str>> {
    let var = cfg.admin_token_env.as_deref()?;
    std::env::var(var)
        .ok()
        .filter(|t| !t.is_empty())
        .map(Arc::from)
}

/// Everything `serve` runs, until `shutdown` resolves. `bound` is told once both
/// listeners are bound (the config applied): from then on the addresses answer with
/// this process, not with whatever else may listen there.
pub async fn run(
    path: &Path,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    bound: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<()> {
    let token = admin_token(&cfg);
    if !cfg.admin.ip().is_loopback() && token.is_none() {
        bail!(
            "the admin listener {} is not on loopback and no admin token is set: set `admin_token_env` in the config and that environment variable, or listen on 127.0.0.1",
            cfg.admin
        );
    }
    let store = Store::open(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let workers = cfg.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let proxy = Arc::new(Proxy::with_workers(workers));
    let controller = Arc::new(Controller::new(proxy.clone(), store));
    controller.apply(&cfg).context("applying the config")?;
    let listeners = canary_proxy::server::bind_reuseport(cfg.listen, workers)
        .with_context(|| format!("binding listen address {}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("binding admin address {}", cfg.admin))?;
    tracing::info!(listen = %cfg.listen, admin = %cfg.admin, routes = cfg.routes.len(), workers, token = token.is_some(), "canary serving");
    if let Some(b) = bound {
        let _ = b.send(());
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Shared with the admin state so that open dashboard streams end on the stop signal
    // (otherwise the graceful shutdown would wait for them forever).
    let stop_tx = Arc::new(stop_tx);
    let app = router(Admin {
        token,
        hosts: Arc::new(HostPolicy::new(&cfg.dashboard.allowed_hosts)),
        dashboard: cfg.dashboard.clone(),
        stop: stop_tx.clone(),
        ..Admin::new(controller.clone())
    });
    let admin_task = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            canary_control::listener::serve(admin_listener, app, stop).await;
        }
    });
    let ctl_task = tokio::spawn(run_controller(controller.clone(), stopped(stop_rx.clone())));
    let watch_task = tokio::spawn(source::watch(
        controller.clone(),
        path.to_path_buf(),
        Some(cfg),
    ));
    let workers = canary_proxy::server::spawn_workers(proxy, listeners, stop_rx.clone())
        .context("starting data-plane workers")?;
    let proxy_task = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    });

    shutdown.await;
    tracing::info!("stopping: draining connections");
    let _ = stop_tx.send(true);
    watch_task.abort();
    let _ = proxy_task.await;
    let _ = ctl_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// Logging for the demo: warnings only, so progress lines stay readable.
pub fn init_tracing_quiet() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CANARY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = fmt_logger().with_env_filter(filter).try_init();
}
