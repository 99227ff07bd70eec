//! Persisted rollout state and the decision journal, in `state_dir`.
//!
//! One JSON file per route (`<route>.state.json`), replaced atomically (write a temp
//! file, fsync, rename, fsync the directory), so `kill -9` at any point leaves either
//! the old or the new state, never a torn one. A route without a rollout whose weight
//! was set through the API has `<route>.weight.json` instead, written the same way; a
//! state directory from before that file existed simply has none. The journal is one JSON object per
//! line (`<route>.events.jsonl`), appended and fsynced. Plain files, not a database:
//! the data is tiny, written a few times a minute, and operators can read it with
//! `cat` and `jq`. Route names are restricted by the config to `[A-Za-z0-9_.-]`, so
//! they are safe file names.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use canary_core::rollout::{Event, RolloutState};
use serde::{Deserialize, Serialize};

/// A canary weight set through the API on a route without a rollout (`weight.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualWeight {
    /// The weight set, in basis points.
    pub weight_bp: u16,
    /// The config file's `weight` when it was set, in basis points: when the file's
    /// weight differs from this, the file has been edited since and wins.
    pub config_weight_bp: u16,
    /// The canary version at the time, for people reading the file.
    pub canary_version: String,
    /// When it was set (ms since the Unix epoch).
    pub set_ms: u64,
}

/// Errors reading or writing the state directory.
// Each message says everything, its cause included, and exposes no `source()`: a
// chain printer (anyhow's `{:#}`) would otherwise print the cause twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: corrupt state file: {error}")]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A well-formed state file that cannot be true (see `RolloutState::check`).
    #[error("{path}: invalid state file: {reason}; fix or remove the file")]
    Invalid { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (and creates) the state directory.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn state_path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.state.json"))
    }

    fn journal_path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.events.jsonl"))
    }

    fn manual_path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.weight.json"))
    }

    /// The persisted rollout of a route, if any.
    pub fn load(&self, route: &str) -> Result<Option<RolloutState>, StoreError> {
        self.read_json(self.state_path(route))
    }

    /// Persists a route's rollout atomically; `None` removes it.
    pub fn save(&self, route: &str, state: Option<&RolloutState>) -> Result<(), StoreError> {
        self.write_json(route, self.state_path(route), "state.json", state)
    }

    /// The manual weight persisted for a route, if any.
    pub fn load_manual(&self, route: &str) -> Result<Option<ManualWeight>, StoreError> {
        self.read_json(self.manual_path(route))
    }

    /// Persists a route's manual weight atomically; `None` removes it.
    pub fn save_manual(&self, route: &str, m: Option<&ManualWeight>) -> Result<(), StoreError> {
        self.write_json(route, self.manual_path(route), "weight.json", m)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: PathBuf,
    ) -> Result<Option<T>, StoreError> {
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| StoreError::Corrupt { path, error }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Replaces `path` atomically with `value` as JSON (temp file, fsync, rename, fsync
    /// of the directory); `None` removes it.
    fn write_json<T: Serialize>(
        &self,
        route: &str,
        path: PathBuf,
        suffix: &str,
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        let Some(value) = value else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
                _ => Ok(()),
            };
        };
        let tmp = self.dir.join(format!(".{route}.{suffix}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|error| StoreError::Corrupt {
            path: path.clone(),
            error,
        })?;
        {
            let mut f = self
                .recreating(|| File::create(&tmp))
                .map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Runs `op`, which creates a file in the state directory; when that fails because
    /// the directory is gone (deleted under a running `canary`), recreates it and runs
    /// `op` once more, so the state written from then on is not lost.
    fn recreating<T>(&self, op: impl Fn() -> io::Result<T>) -> io::Result<T> {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.dir.is_dir() => {
                fs::create_dir_all(&self.dir)?;
                tracing::warn!(dir = %self.dir.display(), "the state directory was missing: recreated it");
                op()
            }
            r => r,
        }
    }

    /// Appends journal events of a route.
    pub fn append(&self, route: &str, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let path = self.journal_path(route);
        let mut f = self
            .recreating(|| OpenOptions::new().create(true).append(true).open(&path))
            .map_err(io_err(&path))?;
        let mut buf = Vec::new();
        if ends_torn(&path) {
            // A crash mid-append left a partial line: end it so this entry stays readable.
            buf.push(b'\n');
        }
        for ev in events {
            serde_json::to_writer(&mut buf, ev).map_err(|error| StoreError::Corrupt {
                path: path.clone(),
                error,
            })?;
            buf.push(b'\n');
        }
        f.write_all(&buf).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))?;
        Ok(())
    }

    /// The last `limit` journal events of a route, oldest first. A torn last line
    /// (crash mid-append) is skipped.
    pub fn events(&self, route: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let path = self.journal_path(route);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut out: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(io_err(&path))?;
            if let Ok(ev) = serde_json::from_str(&line) {
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(ev);
            }
        }
        Ok(out.into())
    }
}

/// Whether the file is non-empty and does not end with a newline.
fn ends_torn(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if f.seek(SeekFrom::End(-1)).is_err() {
        return false;
    }
    let mut last = [0u8; 1];
    f.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;
    use canary_core::rollout::{Phase, Position};

    fn state() -> RolloutState {
        RolloutState {
            canary_version: "v2".into(),
            phase: Phase::Progressing,
            step: 1,
            weight_bp: 2500,
            step_started_ms: 42,
            failed_verdicts: 1,
            last_verdict: None,
            abort_reason: None,
        }
    }

    #[test]
    fn state_round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.load("web").unwrap(), None);
        store.save("web", Some(&state())).unwrap();
        assert_eq!(store.load("web").unwrap(), Some(state()));
        store.save("web", None).unwrap();
        assert_eq!(store.load("web").unwrap(), None);
    }

    #[test]
    fn manual_weight_round_trips_beside_the_state_and_is_absent_in_an_old_dir() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // An old state dir: a rollout state file, no weight file.
        store.save("web", Some(&state())).unwrap();
        assert_eq!(store.load_manual("web").unwrap(), None);
        let m = ManualWeight {
            weight_bp: 3000,
            config_weight_bp: 1000,
            canary_version: "v2".into(),
            set_ms: 7,
        };
        store.save_manual("plain", Some(&m)).unwrap();
        assert!(dir.path().join("plain.weight.json").exists());
        assert_eq!(store.load_manual("plain").unwrap(), Some(m));
        assert_eq!(store.load("plain").unwrap(), None);
        store.save_manual("plain", None).unwrap();
        store.save_manual("plain", None).unwrap();
        assert_eq!(store.load_manual("plain").unwrap(), None);
        std::fs::write(dir.path().join("plain.weight.json"), b"{").unwrap();
        assert!(matches!(
            store.load_manual("plain"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_deleted_state_dir_is_recreated_on_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        store.save("web", Some(&state())).unwrap();
        fs::remove_dir_all(store.dir()).unwrap();
        store.save("web", Some(&state())).unwrap();
        assert_eq!(store.load("web").unwrap(), Some(state()));
        fs::remove_dir_all(store.dir()).unwrap();
        let ev = Event {
            at_ms: 1,
            canary_version: "v2".into(),
            kind: "pause".into(),
            from: Position::manual(canary_core::Weight::ZERO),
            to: Position::manual(canary_core::Weight::ZERO),
            reason: "r".into(),
            verdict: None,
        };
        store.append("web", &[ev]).unwrap();
        assert_eq!(store.events("web", 10).unwrap().len(), 1);
    }

    #[test]
    fn a_store_error_prints_its_cause_once_through_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("web.state.json"), b"{").unwrap();
        let e = store.load("web").unwrap_err();
        assert!(std::error::Error::source(&e).is_none(), "{e}");
        assert_eq!(e.to_string().matches("EOF").count(), 1, "{e}");
    }

    #[test]
    fn journal_keeps_order_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pos = Position {
            phase: Some(Phase::Progressing),
            step: Some(0),
            weight: 5.0,
            no_canary: false,
        };
        let ev = |kind: &str| Event {
            at_ms: 1,
            canary_version: "v2".into(),
            kind: kind.into(),
            from: pos.clone(),
            to: pos.clone(),
            reason: "r".into(),
            verdict: None,
        };
        store.append("web", &[ev("start"), ev("advance")]).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("web.events.jsonl"))
            .unwrap();
        f.write_all(b"{\"at_ms\": 3, \"kin").unwrap();
        store.append("web", &[ev("promote")]).unwrap();
        let kinds: Vec<_> = store
            .events("web", 10)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["start", "advance", "promote"]);
        assert_eq!(store.events("web", 1).unwrap()[0].kind, "promote");
        // Regression: a limit of 0 used to keep growing past it.
        assert!(store.events("web", 0).unwrap().is_empty());
    }
}
