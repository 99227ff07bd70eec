//! The config file source: validate and apply on change or SIGHUP.
//!
//! Directories are watched rather than the file, by the rules of `canary_watch`
//! (shared with the certificate watcher): the path may be a symlink or go through
//! symlinked directories (a Kubernetes ConfigMap), the chain is resolved after every
//! burst of events and the directory of every link in it and of the file it ends at
//! are watched, so editing the target, replacing it, or swapping any link is seen.
//! Bursts of events are coalesced, and a burst reloads only when the file's
//! content differs from what was last read (SIGHUP always reloads). A file that fails
//! validation is logged with file:line:column and the running config keeps serving.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use canary_watch::{resolve, rewatch, Resolved};
use tokio::sync::mpsc;

use crate::controller::Controller;

/// Loads, validates and applies the config file once. On failure the running config
/// is untouched and every problem is logged.
pub fn reload(
    controller: &Controller,
    path: &Path,
    old: &mut Option<canary_config::Config>,
) -> bool {
    apply(controller, path, canary_config::load(path), old)
}

/// Applies a loaded config, or logs why it was rejected.
fn apply(
    controller: &Controller,
    path: &Path,
    loaded: Result<canary_config::Config, canary_config::ConfigError>,
    old: &mut Option<canary_config::Config>,
) -> bool {
    match loaded {
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
                if changes.is_empty() {
                    tracing::info!(file = %path.display(), "config reloaded: nothing changed");
                } else {
                    tracing::info!(file = %path.display(), changes = %changes.join("; "), "config reloaded");
                }
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

/// Why the loop woke up.
enum Trigger {
    /// A file system event, with the paths it names.
    Fs(Vec<PathBuf>),
    /// SIGHUP: reload even if the file looks unchanged.
    Hup,
}

impl Trigger {
    /// Whether this event is about the config file or a link on the way to it.
    fn concerns(&self, chain: &Resolved) -> bool {
        match self {
            Trigger::Hup => true,
            Trigger::Fs(paths) => paths.iter().any(|p| chain.concerns(p)),
        }
    }
}

/// How long the events of one save are gathered before the file is read.
const COALESCE: Duration = Duration::from_millis(150);

/// Watches `path` (through the directories of the file and of every symlink on the
/// way to it) and listens for SIGHUP; reloads on either. Runs until the task is
/// dropped.
pub async fn watch(
    controller: Arc<Controller>,
    path: PathBuf,
    mut current: Option<canary_config::Config>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    let watch_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = watch_tx.send(Trigger::Fs(ev.paths));
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
            None
        }
    };
    let mut watched = BTreeSet::new();
    let mut chain = resolve(&path);
    if let Some(w) = watcher.as_mut() {
        rewatch(w, &mut watched, chain.dirs(), "config file");
    }
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
                if hup_tx.send(Trigger::Hup).is_err() {
                    break;
                }
            }
        });
    }
    // The text last read, to skip bursts that leave the file as it was (events about
    // an old target being deleted after a swap, for one). Unknown at first: the file
    // read at startup may have changed before the watches were set.
    let mut last: Option<String> = None;
    while let Some(first) = rx.recv().await {
        if !first.concerns(&chain) {
            continue;
        }
        let mut hup = matches!(first, Trigger::Hup);
        // Coalesce the burst of events one save produces (150 ms). A SIGHUP is an
        // explicit ask and ends the wait at once: it reads the file as it is now, so
        // reloads by signal are not limited to ~6 a second.
        let window = tokio::time::sleep(COALESCE);
        tokio::pin!(window);
        while !hup {
            tokio::select! {
                () = &mut window => break,
                t = rx.recv() => match t {
                    Some(t) => hup |= matches!(t, Trigger::Hup),
                    None => break,
                },
            }
        }
        while let Ok(t) = rx.try_recv() {
            hup |= matches!(t, Trigger::Hup);
        }
        // Watch the new chain before reading, so a change after the read is an event.
        chain = resolve(&path);
        if let Some(w) = watcher.as_mut() {
            rewatch(w, &mut watched, chain.dirs(), "config file");
        }
        match std::fs::read_to_string(&path) {
            Ok(text) if !hup && last.as_ref() == Some(&text) => {
                tracing::debug!(file = %path.display(), "config file unchanged");
            }
            Ok(text) => {
                let loaded = canary_config::parse(&path.display().to_string(), &text);
                last = Some(text);
                apply(&controller, &path, loaded, &mut current);
            }
            Err(_) => {
                // `load` reports why the file cannot be read.
                last = None;
                reload(&controller, &path, &mut current);
            }
        }
    }
}
