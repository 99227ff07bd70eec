//! `canary serve`: load the config, bind, run proxy + controller + admin API, stop
//! cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use canary_config::Config;
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
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
}

pub fn main(path: &Path) -> ExitCode {
    init_tracing();
    let cfg = match canary_config::load(path) {
        Ok(c) => c,
        Err(e) => {
            errln!("{e}");
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
    match rt.block_on(run(path, cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("canary: {e:#}");
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

/// Everything `serve` runs, until `shutdown` resolves.
pub async fn run(
    path: &Path,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if cfg.fleet.is_some() {
        return crate::fleet::serve(cfg, shutdown).await;
    }
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let app = router(Admin {
        controller: controller.clone(),
        token,
    });
    let admin_task = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "admin server failed");
            }
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
