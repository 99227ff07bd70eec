//! `canary serve`: load the config, bind, run proxy + controller + admin API, stop
//! cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use canary_config::Config;
use canary_control::admin::guard::HostPolicy;
use canary_control::admin::{router, Admin};
use canary_control::store::Store;
use canary_control::{run_controller, source, Controller};
use canary_proxy::Proxy;
use tokio::net::TcpListener;

use crate::handover;

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

pub fn main(path: &Path, takeover: bool) -> ExitCode {
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
    let start = Start {
        takeover,
        managed: true,
    };
    match rt.block_on(run_with(path, cfg, shutdown_signal(), start, None)) {
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

/// Where `serve` may get its listening sockets from, and whether it offers them to a
/// successor (`handover`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Start {
    /// Take the sockets over from the `canary serve` running on the same `state_dir`
    /// (`--takeover`).
    pub takeover: bool,
    /// Use sockets passed by systemd, and listen on the hand-over socket for a
    /// successor. Off for the demo, which owns its ports.
    pub managed: bool,
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
    run_with(path, cfg, shutdown, Start::default(), bound).await
}

/// [`run`], with the sockets' origin and hand-over chosen by `start`.
pub async fn run_with(
    path: &Path,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    start: Start,
    bound: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<()> {
    let token = admin_token(&cfg);
    if !cfg.admin.ip().is_loopback() && token.is_none() {
        bail!(
            "the admin listener {} is not on loopback and no admin token is set: set `admin_token_env` in the config and that environment variable, or listen on 127.0.0.1",
            cfg.admin
        );
    }
    // Sockets first: taking over pauses the old process's controller, which must
    // happen before this one reads the state it persisted.
    let inherited = if start.takeover {
        let dir = cfg.state_dir.clone();
        let got = tokio::task::spawn_blocking(move || handover::take_over(&dir))
            .await
            .context("hand-over task")?
            .context("--takeover")?;
        Some(got)
    } else {
        None
    };
    let (inherited_proxy, inherited_admin, predecessor) = match inherited {
        Some(h) => (h.proxy, Some(h.admin), Some(h.from)),
        None if start.managed => (
            handover::from_systemd().context("sockets from systemd (LISTEN_FDS)")?,
            None,
            None,
        ),
        None => (Vec::new(), None, None),
    };
    let store = Store::open(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let workers = cfg
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
        .max(inherited_proxy.len());
    let proxy = Arc::new(Proxy::with_workers(workers));
    let controller = Arc::new(Controller::new(proxy.clone(), store));
    controller.apply(&cfg).context("applying the config")?;
    let listeners = if inherited_proxy.is_empty() {
        canary_proxy::server::bind_reuseport(cfg.listen, workers)
            .with_context(|| format!("binding listen address {}", cfg.listen))?
    } else {
        let at = inherited_proxy[0].local_addr()?;
        if at != cfg.listen && cfg.listen.port() != 0 {
            if predecessor.is_some() {
                bail!("--takeover: the running canary listens on {at}, the config says `listen: {}`; a changed `listen` needs a stop and a start", cfg.listen);
            }
            tracing::warn!(socket = %at, listen = %cfg.listen, "serving on the socket systemd passed, not on `listen`");
        }
        spread(inherited_proxy, workers)?
    };
    let admin_listener = match inherited_admin {
        Some(l) => {
            let at = l.local_addr()?;
            if at != cfg.admin && cfg.admin.port() != 0 {
                bail!("--takeover: the running canary's admin API listens on {at}, the config says `admin: {}`; a changed `admin` needs a stop and a start", cfg.admin);
            }
            l
        }
        None => {
            let l = std::net::TcpListener::bind(cfg.admin)
                .with_context(|| format!("binding admin address {}", cfg.admin))?;
            l.set_nonblocking(true)?;
            l
        }
    };
    // Copies of the listening sockets, for a successor (the same sockets: the kernel
    // keeps them open while either process holds one).
    let offer = Arc::new((
        listeners
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?,
        admin_listener.try_clone()?,
    ));
    tracing::info!(listen = %cfg.listen, admin = %cfg.admin, routes = cfg.routes.len(), workers, token = token.is_some(), taken_over = predecessor.is_some(), "canary serving");
    if let Some(b) = bound {
        let _ = b.send(());
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dashboard = cfg.dashboard.clone();
    let mut control = ControlPlane::start(
        &controller,
        &token,
        &dashboard,
        admin_listener,
        path,
        Some(cfg.clone()),
    )?;
    let workers = canary_proxy::server::spawn_workers(proxy, listeners, stop_rx.clone())
        .context("starting data-plane workers")?;
    let proxy_task = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    });
    if let Some(old) = predecessor {
        // From here both processes accept; the old one stops when it reads this.
        if let Err(e) = old.serving() {
            tracing::warn!(error = %e, "could not tell the old process that this one serves");
        }
    }
    let mut successor = if start.managed {
        match handover::Server::listen(&cfg.state_dir) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, path = %handover::socket_path(&cfg.state_dir).display(), "no hand-over socket: `--takeover` cannot replace this process");
                None
            }
        }
    } else {
        None
    };

    tokio::pin!(shutdown);
    let handed_over = loop {
        let request = async {
            match successor.as_mut() {
                Some(s) => s.requests.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break false,
            Some(req) = request => {
                tracing::info!("a new process takes over: pausing the controller and admin API");
                control.stop().await;
                let sockets = offer.clone();
                let done = tokio::task::spawn_blocking(move || req.hand_over(&sockets.0, &sockets.1)).await;
                match done {
                    Ok(Ok(())) => break true,
                    Ok(Err(e)) => tracing::warn!(error = %e, "hand-over failed: serving on"),
                    Err(e) => tracing::warn!(error = %e, "hand-over failed: serving on"),
                }
                control = ControlPlane::start(&controller, &token, &dashboard, offer.1.try_clone()?, path, None)?;
            }
        }
    };
    if handed_over {
        tracing::info!("handed over to the new process: draining connections");
    } else {
        if let Some(s) = &successor {
            s.remove();
        }
        tracing::info!("stopping: draining connections");
    }
    let _ = stop_tx.send(true);
    control.stop().await;
    let _ = proxy_task.await;
    Ok(())
}

/// One listener per worker: inherited sockets are shared by several workers when
/// there are fewer of them (systemd passes one socket per `ListenStream=`).
fn spread(
    mut listeners: Vec<std::net::TcpListener>,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let n = listeners.len();
    for i in n..workers {
        let copy = listeners[i % n].try_clone()?;
        listeners.push(copy);
    }
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    Ok(listeners)
}

/// The controller loop, the admin API and the config watch: what a hand-over pauses
/// (so only one process at a time drives rollouts and writes state) and resumes if
/// the new process fails.
struct ControlPlane {
    /// Shared with the admin state, so that open dashboard streams end on it too
    /// (otherwise a graceful stop would wait for them forever).
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    admin: tokio::task::JoinHandle<()>,
    controller: tokio::task::JoinHandle<()>,
    watch: tokio::task::JoinHandle<()>,
    stopped: bool,
}

impl ControlPlane {
    fn start(
        controller: &Arc<Controller>,
        token: &Option<Arc<str>>,
        dashboard: &canary_config::Dashboard,
        admin_listener: std::net::TcpListener,
        path: &Path,
        current: Option<Config>,
    ) -> Result<ControlPlane> {
        let admin_listener = TcpListener::from_std(admin_listener)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let app = router(Admin {
            token: token.clone(),
            hosts: Arc::new(HostPolicy::new(&dashboard.allowed_hosts)),
            dashboard: dashboard.clone(),
            stop: stop.clone(),
            ..Admin::new(controller.clone())
        });
        let admin = tokio::spawn({
            let stop = stopped(stop_rx.clone());
            async move {
                canary_control::listener::serve(admin_listener, app, stop).await;
            }
        });
        let ctl = tokio::spawn(run_controller(controller.clone(), stopped(stop_rx)));
        let watch = tokio::spawn(source::watch(
            controller.clone(),
            path.to_path_buf(),
            current,
        ));
        Ok(ControlPlane {
            stop,
            admin,
            controller: ctl,
            watch,
            stopped: false,
        })
    }

    /// Stops all three (once); an admin connection still open after a few seconds
    /// is cut.
    async fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = self.stop.send(true);
        self.watch.abort();
        let _ = (&mut self.watch).await;
        let _ = (&mut self.controller).await;
        if tokio::time::timeout(Duration::from_secs(5), &mut self.admin)
            .await
            .is_err()
        {
            self.admin.abort();
        }
    }
}

/// Logging for the demo: warnings only, so progress lines stay readable.
pub fn init_tracing_quiet() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CANARY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = fmt_logger().with_env_filter(filter).try_init();
}
