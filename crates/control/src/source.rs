//! The config file source: validate and apply on change or SIGHUP.
//!
//! The directory is watched rather than the file, because editors and config
//! management replace files (write a temp file, rename) and a watch on the old inode
//! would go quiet. Bursts of events are coalesced. A file that fails validation is
//! logged with file:line:column and the running config keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::controller::Controller;

/// Loads, validates and applies the config file once. On failure the running config
/// is untouched and every problem is logged.
pub fn reload(
    controller: &Controller,
    path: &Path,
    old: &mut Option<canary_config::Config>,
) -> bool {
    match canary_config::load(path) {
        Ok(cfg) => {
            if let Some(prev) = old.as_ref() {
                if prev.listen != cfg.listen
                    || prev.admin != cfg.admin
                    || prev.limits != cfg.limits
                    || prev.workers != cfg.workers
                {
                    tracing::warn!("listen, admin, limits and workers changes take effect only after a restart");
                }
                let changes = canary_config::diff(prev, &cfg);
                tracing::info!(file = %path.display(), changes = %changes.join("; "), "config reloaded");
            }
            if let Err(e) = controller.apply(&cfg) {
                tracing::error!(error = %e, "config applied to the data plane, but the state directory failed (routes whose state could not be read are left out until it is fixed and the config reloaded)");
            }
            *old = Some(cfg);
            true
        }
        Err(e) => {
            controller.reload_failed();
            for d in &e.diagnostics {
                tracing::error!("config rejected, keeping the running config: {d}");
            }
            false
        }
    }
}

/// Watches `path` (through its directory) and listens for SIGHUP; reloads on either.
/// Runs until the task is dropped.
pub async fn watch(
    controller: Arc<Controller>,
    path: PathBuf,
    mut current: Option<canary_config::Config>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|f| f.to_os_string());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watch_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|f| f.to_os_string()) == file_name);
            if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = watch_tx.send(());
            }
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
            None
        }
    };
    #[cfg(unix)]
    {
        let hup_tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading config");
                if hup_tx.send(()).is_err() {
                    break;
                }
            }
        });
    }
    while rx.recv().await.is_some() {
        // Coalesce the burst of events one save produces.
        tokio::time::sleep(Duration::from_millis(150)).await;
        while rx.try_recv().is_ok() {}
        reload(&controller, &path, &mut current);
    }
}
