//! Which directories to watch so that a change to a file is seen, however the file is
//! replaced.
//!
//! Directories are watched rather than files, because editors and config management
//! replace files (write a temp file, rename) and a watch on the old inode would go
//! quiet. A path may be a symlink, or go through symlinked directories (Kubernetes
//! mounts a ConfigMap or Secret as `tls.crt -> ..data/tls.crt` with
//! `..data -> ..2026_12_01_…`, and an update swaps `..data`): [`resolve`] follows the
//! chain, and the directory of every link in it and of the file it ends at are
//! watched, so editing the target, replacing it, or swapping any link is seen. The
//! chain must be resolved again after every burst of events.
//!
//! Used by the config file source (`canary-control`) and the certificate watcher
//! (`canary-tls`), so both follow the same rules.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, VecDeque};
use std::path::{Component, Path, PathBuf};

use notify::{RecursiveMode, Watcher};

/// What a path stands for: the symlinks followed to reach the file, and the
/// file. Every path in it is absolute and free of symlinks, as the watcher reports
/// event paths.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Each symlink met on the way, in order (a swap of any of them changes the file).
    pub links: Vec<PathBuf>,
    /// The file the path ends at (it may not exist).
    pub target: PathBuf,
}

/// More links than this is a loop (Linux gives up at 40 too).
pub const MAX_LINKS: usize = 40;

/// Follows `path` component by component, as the kernel does, noting every symlink.
/// Components that cannot be read are taken as they are, so a path that does not
/// resolve (yet) still names where to look.
pub fn resolve(path: &Path) -> Resolved {
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
    pub fn dirs(&self) -> BTreeSet<PathBuf> {
        self.links
            .iter()
            .chain(std::iter::once(&self.target))
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect()
    }

    /// Whether a change at `p` can change what the path reads: `p` is one of the
    /// links, the file, or a directory on the way to the file (one that is created
    /// or replaced).
    pub fn concerns(&self, p: &Path) -> bool {
        self.links.iter().any(|l| l == p) || self.target.starts_with(p)
    }
}

/// Makes the watched directories `want` (the union of [`Resolved::dirs`] of every
/// watched path). A directory that cannot be watched (it does not exist yet) is tried
/// again at the next call; `what` names the files in the warning.
pub fn rewatch(
    w: &mut impl Watcher,
    watched: &mut BTreeSet<PathBuf>,
    want: BTreeSet<PathBuf>,
    what: &str,
) {
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
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the directory of the {what}; reload with SIGHUP");
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
