//! The config file source: validate and apply on change or SIGHUP.
//!
//! Directories are watched rather than the file, because editors and config
//! management replace files (write a temp file, rename) and a watch on the old inode
//! would go quiet. The path may be a symlink, or go through symlinked directories
//! (Kubernetes mounts a ConfigMap as `canary.yaml -> ..data/canary.yaml` with
//! `..data -> ..2026_12_01_…`, and an update swaps `..data`): the chain is resolved
//! after every burst of events and the directory of every link in it and of the file
//! it ends at are watched, so editing the target, replacing it, or swapping any link
//! is seen. Bursts of events are coalesced, and a burst reloads only when the file's
//! content differs from what was last read (SIGHUP always reloads). A file that fails
//! validation is logged with file:line:column and the running config keeps serving.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Component, Path, PathBuf};
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

/// What a config path stands for: the symlinks followed to reach the file, and the
/// file. Every path in it is absolute and free of symlinks, as the watcher reports
/// event paths.
#[derive(Debug, PartialEq, Eq)]
struct Resolved {
    /// Each symlink met on the way, in order (a swap of any of them changes the file).
    links: Vec<PathBuf>,
    /// The file the path ends at (it may not exist).
    target: PathBuf,
}

/// More links than this is a loop (Linux gives up at 40 too).
const MAX_LINKS: usize = 40;

/// Follows `path` component by component, as the kernel does, noting every symlink.
/// Components that cannot be read are taken as they are, so a path that does not
/// resolve (yet) still names where to look.
fn resolve(path: &Path) -> Resolved {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut todo: VecDeque<PathBuf> = components(&absolute);
    let mut at = PathBuf::from("/");
    let mut links = Vec::new();
    while let Some(part) = todo.pop_front() {
        if part == Path::new("/") {
            at = part;
            continue;
        }
        if part == Path::new("..") {
            // After a symlink, `..` is the parent of where the link led (as for the
            // kernel), which is what `at` holds.
            at.pop();
            continue;
        }
        let next = at.join(&part);
        let link = match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() && links.len() < MAX_LINKS => {
                std::fs::read_link(&next).ok()
            }
            _ => None,
        };
        match link {
            Some(to) => {
                links.push(next);
                let mut rest = components(&to);
                rest.extend(todo);
                todo = rest;
            }
            None => at = next,
        }
    }
    Resolved { links, target: at }
}

/// The parts of a path: `/` for a root, `..`, and names (`.` dropped).
fn components(path: &Path) -> VecDeque<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir => Some(PathBuf::from("/")),
            Component::ParentDir => Some(PathBuf::from("..")),
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

impl Resolved {
    /// The directories to watch: those holding a link of the chain or the file.
    fn dirs(&self) -> BTreeSet<PathBuf> {
        self.links
            .iter()
            .chain(std::iter::once(&self.target))
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect()
    }

    /// Whether a change at `p` can change what the path reads: `p` is one of the
    /// links, the file, or a directory on the way to the file (one that is created
    /// or replaced).
    fn concerns(&self, p: &Path) -> bool {
        self.links.iter().any(|l| l == p) || self.target.starts_with(p)
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
        rewatch(w, &mut watched, &chain);
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
        // Coalesce the burst of events one save produces.
        tokio::time::sleep(Duration::from_millis(150)).await;
        while let Ok(t) = rx.try_recv() {
            hup |= matches!(t, Trigger::Hup);
        }
        // Watch the new chain before reading, so a change after the read is an event.
        chain = resolve(&path);
        if let Some(w) = watcher.as_mut() {
            rewatch(w, &mut watched, &chain);
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

/// Makes the watched directories those of `chain`. A directory that cannot be watched
/// (it does not exist yet) is tried again after the next event.
fn rewatch(w: &mut impl Watcher, watched: &mut BTreeSet<PathBuf>, chain: &Resolved) {
    let want = chain.dirs();
    for dir in watched.difference(&want) {
        // A directory that is gone has lost its watch with it; unwatching it would
        // only make notify log a warning (every ConfigMap update deletes one).
        if dir.exists() {
            let _ = w.unwatch(dir);
        }
    }
    watched.retain(|d| want.contains(d));
    for dir in want {
        if watched.contains(&dir) {
            continue;
        }
        match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(dir);
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_plain_file_has_no_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("canary.yaml"), "").unwrap();
        let r = resolve(&root.join("canary.yaml"));
        assert_eq!(r.links, Vec::<PathBuf>::new());
        assert_eq!(r.target, root.join("canary.yaml"));
        assert_eq!(r.dirs(), BTreeSet::from([root.clone()]));
        assert!(r.concerns(&root.join("canary.yaml")));
        assert!(!r.concerns(&root.join(".canary.yaml.tmp")));
    }

    #[test]
    fn configmap_layout_resolves_through_both_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("..2026_12_01_a")).unwrap();
        std::fs::write(root.join("..2026_12_01_a/canary.yaml"), "").unwrap();
        symlink("..2026_12_01_a", root.join("..data")).unwrap();
        symlink("..data/canary.yaml", root.join("canary.yaml")).unwrap();
        let r = resolve(&root.join("canary.yaml"));
        assert_eq!(r.links, [root.join("canary.yaml"), root.join("..data")]);
        assert_eq!(r.target, root.join("..2026_12_01_a/canary.yaml"));
        assert_eq!(
            r.dirs(),
            BTreeSet::from([root.clone(), root.join("..2026_12_01_a")])
        );
        assert!(r.concerns(&root.join("..data")));
        assert!(r.concerns(&root.join("..2026_12_01_a/canary.yaml")));
        assert!(!r.concerns(&root.join("..data_tmp")));
    }

    #[test]
    fn relative_paths_parent_components_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(root.join("a/real.yaml"), "").unwrap();
        // `..` after a link is taken from where the link led: a/b/.. is a.
        symlink("../a/b", root.join("etc/cur")).unwrap();
        let r = resolve(&root.join("etc/cur/../real.yaml"));
        assert_eq!(r.links, [root.join("etc/cur")]);
        assert_eq!(r.target, root.join("a/real.yaml"));
        // A loop ends; the path is still watched where the loop is.
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let r = resolve(&root.join("loop1"));
        assert_eq!(r.links.len(), MAX_LINKS);
        assert!(r.dirs().contains(&root));
        // A dangling link names the file it will lead to.
        symlink("missing/c.yaml", root.join("dangling")).unwrap();
        let r = resolve(&root.join("dangling"));
        assert_eq!(r.target, root.join("missing/c.yaml"));
        assert!(r.concerns(&root.join("missing")), "creating the directory");
    }
}
