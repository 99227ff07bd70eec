//! Reloads certificate stores when their files change, or on SIGHUP.
//!
//! The files are watched by the same rules as the config file (`canary_watch`): the
//! directories of each file and of every symlink on the way to it, so a cert-manager
//! or Kubernetes Secret update (a swap of the `..data` link) is seen, as is an
//! editor's save or a `mv` over the file. A burst of events is coalesced (cert and
//! key are usually written one after the other) and then every store reloads; a
//! store keeps a certificate whose new files fail (see [`CertStore::reload`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use canary_watch::{resolve, rewatch, Resolved};
use tokio::sync::mpsc;

use crate::store::CertStore;

/// How long a burst of events is collected before reloading: long enough for a cert
/// and its key written one after the other.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Watches the files of `stores` and reloads them on change or SIGHUP, until the
/// task is dropped.
pub async fn watch(stores: Vec<Arc<CertStore>>) {
    let paths: Vec<PathBuf> = stores
        .iter()
        .flat_map(|s| s.files())
        .flat_map(|f| [f.cert, f.key])
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
    let fs_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = fs_tx.send(Some(ev.paths));
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch certificate files; reload them with SIGHUP");
            None
        }
    };
    let mut watched = BTreeSet::new();
    let mut chains: Vec<Resolved> = paths.iter().map(|p| resolve(p)).collect();
    if let Some(w) = watcher.as_mut() {
        rewatch(w, &mut watched, dirs(&chains), "certificate files");
    }
    #[cfg(unix)]
    {
        let hup_tx = tx.clone();
        tokio::spawn(async move {
            let kind = tokio::signal::unix::SignalKind::hangup();
            let Ok(mut hup) = tokio::signal::unix::signal(kind) else {
                return;
            };
            while hup.recv().await.is_some() {
                if hup_tx.send(None).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    while let Some(first) = rx.recv().await {
        let concerns = |ev: &Option<Vec<PathBuf>>, chains: &[Resolved]| match ev {
            None => true,
            Some(paths) => paths.iter().any(|p| chains.iter().any(|c| c.concerns(p))),
        };
        if !concerns(&first, &chains) {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        // Watch the new chains before reading, so a change after the read is an event.
        chains = paths.iter().map(|p| resolve(p)).collect();
        if let Some(w) = watcher.as_mut() {
            rewatch(w, &mut watched, dirs(&chains), "certificate files");
        }
        for store in &stores {
            store.reload(SystemTime::now());
        }
    }
}

fn dirs(chains: &[Resolved]) -> BTreeSet<PathBuf> {
    chains.iter().flat_map(Resolved::dirs).collect()
}
