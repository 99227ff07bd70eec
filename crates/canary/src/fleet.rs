//! Fleet mode in the binary: `serve` with a `fleet` block, `canary fleet push` and
//! `canary fleet status`. The logic is in `canary-fleet`; this is wiring and printing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use canary_config::Config;
use canary_control::admin::guard::HostPolicy;
use canary_control::admin::{router, Admin};
use canary_control::Controller;
use canary_fleet::{Fleet, FleetError};
use canary_proxy::Proxy;
use clap::Subcommand;
use http::Method;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::cli::{Api, Conn, EXIT_ERROR};

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Validate a fleet document (a `routes:` list) as `canary validate` does and
    /// write it to `<prefix>/config` with a compare-and-swap. Nothing is written when
    /// it is invalid.
    Push {
        /// The fleet document (YAML).
        file: PathBuf,
        /// etcd endpoint `host:port` (repeat, or separate with commas, for several).
        #[arg(long, required = true, value_delimiter = ',')]
        etcd: Vec<String>,
        /// The fleet's key prefix, e.g. /canary/prod.
        #[arg(long)]
        prefix: String,
    },
    /// Show a member's view of the fleet: leader, connection, applied revision,
    /// config error, members.
    Status {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn main(cmd: FleetCmd) -> ExitCode {
    let rt = match crate::cli::client_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        match cmd {
            FleetCmd::Push { file, etcd, prefix } => {
                match canary_fleet::push::push(&file, &etcd, &prefix).await {
                    Ok(p) => {
                        outln!(
                            "{}: pushed to {} at revision {} ({} route{})",
                            file.display(),
                            p.key,
                            p.revision,
                            p.routes,
                            if p.routes == 1 { "" } else { "s" }
                        );
                        ExitCode::SUCCESS
                    }
                    Err(FleetError::Config(e)) => {
                        errln!("{e}");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        errln!("canary: {e}");
                        ExitCode::from(EXIT_ERROR)
                    }
                }
            }
            FleetCmd::Status { json, conn } => {
                let api = Api::new(&conn);
                match api.call(Method::GET, "/api/v1/fleet", None).await {
                    Ok((s, v)) if s.is_success() => {
                        if json {
                            outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        } else {
                            print_status(&v);
                        }
                        ExitCode::SUCCESS
                    }
                    Ok((s, v)) => {
                        errln!(
                            "canary: {} ({}); is this member in fleet mode?",
                            v["error"].as_str().unwrap_or("error"),
                            s.as_u16()
                        );
                        ExitCode::from(EXIT_ERROR)
                    }
                    Err(e) => {
                        errln!("canary: {e}");
                        ExitCode::from(EXIT_ERROR)
                    }
                }
            }
        }
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn print_status(v: &Value) {
    outln!(
        "member {} of {}: {}, leader {}{}",
        text(&v["member"]),
        text(&v["prefix"]),
        if v["connected"] == true {
            "connected"
        } else {
            "NOT connected to etcd (stale)"
        },
        text(&v["leader"]),
        if v["leading"] == true {
            " (this member)"
        } else {
            ""
        }
    );
    outln!(
        "applied revision {}, document revision {}",
        text(&v["applied_revision"]),
        text(&v["config_revision"])
    );
    if !v["config_error"].is_null() {
        outln!("config error: {}", text(&v["config_error"]));
    }
    if let Some(a) = v["local_aborts"].as_array().filter(|a| !a.is_empty()) {
        let names: Vec<String> = a.iter().map(text).collect();
        outln!(
            "aborted on this member, waiting for a leader: {}",
            names.join(", ")
        );
    }
    outln!();
    outln!("{:<16} {:<28} {:<8} LEADER", "MEMBER", "ADMIN", "APPLIED");
    for m in v["members"].as_array().into_iter().flatten() {
        outln!(
            "{:<16} {:<28} {:<8} {}",
            text(&m["member"]),
            text(&m["admin"]),
            text(&m["applied_revision"]),
            if m["leader"] == true { "*" } else { "" }
        );
    }
    for m in v["members"].as_array().into_iter().flatten() {
        if let Some(e) = m["error"].as_str() {
            outln!("{}: no applied revision: {e}", text(&m["member"]));
        }
    }
}

/// `serve` with a `fleet` block: routes and rollout state from etcd.
pub async fn serve(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let token = crate::serve::admin_token(&cfg);
    if !cfg.admin.ip().is_loopback() && token.is_none() {
        bail!(
            "the admin listener {} is not on loopback and no admin token is set: set `admin_token_env` in the config and that environment variable, or listen on 127.0.0.1",
            cfg.admin
        );
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let fleet = Fleet::new(&cfg).await.context("fleet")?;
    let workers = cfg.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let proxy = Arc::new(Proxy::with_workers(workers));
    let controller = Arc::new(Controller::with_store(proxy.clone(), fleet.state_store()));
    let listeners = canary_proxy::server::bind_reuseport(cfg.listen, workers)
        .with_context(|| format!("binding listen address {}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("binding admin address {}", cfg.admin))?;
    if cfg.admin_tls.is_some() || cfg.http_redirect.is_some() {
        bail!("`admin_tls` and `http_redirect` are not supported in fleet mode yet (docs/fleet.md); `tls` on the proxy listener is");
    }
    // Certificates were checked by validation; loading them again here closes the gap
    // to a file changed since.
    let proxy_certs = match &cfg.tls {
        Some(t) => Some(Arc::new(
            canary_tls::CertStore::load("proxy", &t.files(), t.require_sni).context("tls")?,
        )),
        None => None,
    };
    let listener_tls = match (&proxy_certs, &cfg.tls) {
        (Some(store), Some(t)) => Some(
            canary_proxy::tls::ListenerTls::new(store.clone(), t.handshake_timeout_ms)
                .context("tls")?,
        ),
        _ => None,
    };
    let cert_stores: Vec<Arc<canary_tls::CertStore>> = proxy_certs.into_iter().collect();
    let f = cfg.fleet.as_ref().expect("fleet mode");
    tracing::info!(listen = %cfg.listen, admin = %cfg.admin, prefix = %f.prefix, member = %f.member, workers, "canary serving in fleet mode");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Shared with the admin state so that open dashboard streams end on the stop signal.
    let stop_tx = Arc::new(stop_tx);
    let app = router(Admin {
        token,
        hosts: Arc::new(HostPolicy::new(&cfg.dashboard.allowed_hosts)),
        dashboard: cfg.dashboard.clone(),
        stop: stop_tx.clone(),
        certificates: cert_stores.clone(),
        ..Admin::new(controller.clone())
    })
    .merge(fleet.router());
    let admin_task = tokio::spawn({
        let mut rx = stop_rx.clone();
        async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            canary_control::listener::serve(admin_listener, app, stop).await;
        }
    });
    let cert_watch_task =
        (!cert_stores.is_empty()).then(|| tokio::spawn(canary_tls::watch::watch(cert_stores)));
    let tasks = fleet.start(controller.clone()).await;
    let workers =
        canary_proxy::server::spawn_workers(proxy, listeners, listener_tls, stop_rx.clone())
            .context("starting data-plane workers")?;
    let proxy_task = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    });

    shutdown.await;
    tracing::info!("stopping: draining connections");
    for t in &tasks {
        t.abort();
    }
    if let Some(t) = cert_watch_task {
        t.abort();
    }
    fleet.resign().await;
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    Ok(())
}
