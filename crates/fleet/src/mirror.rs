//! This member's view of the fleet's keys: the last consistent snapshot plus every
//! watch event since, with the revision it stands at.
//!
//! Pure data, no IO: the watch loop feeds it, the controller's [`crate::EtcdStore`]
//! reads from it, and the changes it reports tell the member what to apply. Values
//! are kept as etcd holds them (bytes) and decoded when read: they are small and read
//! rarely, and a value that does not decode is treated as absent with a log line,
//! never as a crash.

use std::collections::BTreeMap;

use canary_control::store::ManualWeight;
use canary_core::rollout::{Event, RolloutState};
use serde::{Deserialize, Serialize};

use crate::keys::{Key, Keys};

/// The leader key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub member: String,
    /// `http://host:port` of its admin API.
    pub admin: String,
    pub boot_id: String,
}

/// A member key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub admin: String,
    pub boot_id: String,
    pub started_ms: u64,
}

/// A route's state key: the controller's `RolloutState` and when the leader wrote it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateDoc {
    pub state: RolloutState,
    pub written_ms: u64,
}

/// A route's manual weight key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManualDoc {
    pub manual: ManualWeight,
    pub written_ms: u64,
}

/// A member's breaker trip, for the leader to turn into a fleet-wide abort.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerReport {
    pub canary_version: String,
    pub failures: u32,
    pub at_ms: u64,
}

/// One key's value with its revisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub value: String,
    pub create_rev: i64,
    pub mod_rev: i64,
}

/// The member's view of its fleet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Mirror {
    /// The etcd revision this view is at.
    pub revision: i64,
    /// Every key except the journal, by full key.
    pub entries: BTreeMap<String, Entry>,
    /// Journals by route, by sequence number (not in the cache file).
    #[serde(skip)]
    pub journals: BTreeMap<String, BTreeMap<u64, Event>>,
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, e: &Entry) -> Option<T> {
    match serde_json::from_str(&e.value) {
        Ok(v) => Some(v),
        Err(err) => {
            tracing::warn!(key, error = %err, "fleet: undecodable value ignored");
            None
        }
    }
}

impl Mirror {
    /// Applies one key's new value (`None`: deleted). Returns what it was, if it
    /// changed anything.
    pub fn apply(&mut self, keys: &Keys, key: &str, value: Option<Entry>) -> Option<Key> {
        let k = keys.parse(key);
        match (&k, value) {
            (Key::Other, _) => return None,
            (Key::Journal(route, seq), Some(v)) => {
                let ev = decode::<Event>(key, &v)?;
                self.journals
                    .entry(route.clone())
                    .or_default()
                    .insert(*seq, ev);
            }
            (Key::Journal(route, seq), None) => {
                self.journals.get_mut(route)?.remove(seq)?;
            }
            (_, Some(v)) => {
                if self
                    .entries
                    .get(key)
                    .is_some_and(|old| old.value == v.value)
                {
                    // Same value (a re-put): only the revisions move.
                    self.entries.insert(key.to_string(), v);
                    return None;
                }
                self.entries.insert(key.to_string(), v);
            }
            (_, None) => {
                self.entries.remove(key)?;
            }
        }
        Some(k)
    }

    /// Replaces the whole view with a snapshot at `revision`; returns every key whose
    /// value changed, appeared or went away.
    pub fn replace(&mut self, keys: &Keys, revision: i64, kvs: Vec<(String, Entry)>) -> Vec<Key> {
        let mut changed = Vec::new();
        let old: Vec<String> = self.entries.keys().cloned().collect();
        let mut seen = std::collections::HashSet::new();
        self.journals.clear();
        for (key, e) in kvs {
            seen.insert(key.clone());
            if let Some(k) = self.apply(keys, &key, Some(e)) {
                if !matches!(k, Key::Journal(..)) {
                    changed.push(k);
                }
            }
        }
        for key in old {
            if !seen.contains(&key) {
                if let Some(k) = self.apply(keys, &key, None) {
                    changed.push(k);
                }
            }
        }
        self.revision = revision;
        changed
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Option<T> {
        self.entries.get(key).and_then(|e| decode(key, e))
    }

    /// The fleet document and the revision it was written at.
    pub fn config(&self, keys: &Keys) -> Option<(String, i64)> {
        self.entries
            .get(&keys.config())
            .map(|e| (e.value.clone(), e.mod_rev))
    }

    /// The leader and its key's create revision (the fencing token).
    pub fn leader(&self, keys: &Keys) -> Option<(LeaderInfo, i64)> {
        let e = self.entries.get(&keys.leader())?;
        Some((decode(&keys.leader(), e)?, e.create_rev))
    }

    pub fn members(&self, keys: &Keys) -> Vec<(String, MemberInfo)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| match keys.parse(k) {
                Key::Member(m) => Some((m, decode(k, e)?)),
                _ => None,
            })
            .collect()
    }

    pub fn state(&self, keys: &Keys, route: &str) -> Option<StateDoc> {
        self.get(&keys.state(route))
    }

    pub fn manual(&self, keys: &Keys, route: &str) -> Option<ManualDoc> {
        self.get(&keys.manual(route))
    }

    pub fn breakers(&self, keys: &Keys) -> Vec<(String, String, BreakerReport)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| match keys.parse(k) {
                Key::Breaker(r, m) => Some((r, m, decode(k, e)?)),
                _ => None,
            })
            .collect()
    }

    /// The last `limit` journal events of a route, oldest first.
    pub fn events(&self, route: &str, limit: usize) -> Vec<Event> {
        let Some(j) = self.journals.get(route) else {
            return Vec::new();
        };
        let skip = j.len().saturating_sub(limit);
        j.values().skip(skip).cloned().collect()
    }

    /// The next free journal sequence number of a route.
    pub fn next_seq(&self, route: &str) -> u64 {
        self.journals
            .get(route)
            .and_then(|j| j.keys().next_back())
            .map_or(1, |s| s + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &str, rev: i64) -> Entry {
        Entry {
            value: v.into(),
            create_rev: rev,
            mod_rev: rev,
        }
    }

    #[test]
    fn a_snapshot_reports_what_changed_appeared_and_went_away() {
        let k = Keys::new("/p");
        let mut m = Mirror::default();
        let changed = m.replace(
            &k,
            5,
            vec![
                (k.config(), e("routes: []", 2)),
                (
                    k.member("a"),
                    e(r#"{"admin":"x","boot_id":"b","started_ms":1}"#, 3),
                ),
            ],
        );
        assert_eq!(changed, [Key::Config, Key::Member("a".into())]);
        assert_eq!(m.members(&k).len(), 1);
        // Same config, member gone, leader new.
        let changed = m.replace(
            &k,
            9,
            vec![
                (k.config(), e("routes: []", 2)),
                (
                    k.leader(),
                    e(r#"{"member":"a","admin":"x","boot_id":"b"}"#, 8),
                ),
            ],
        );
        assert_eq!(changed, [Key::Leader, Key::Member("a".into())]);
        assert_eq!(
            m.leader(&k).map(|(l, rev)| (l.member, rev)),
            Some(("a".into(), 8))
        );
        assert_eq!(m.revision, 9);
        // A re-put of the same value is no change; a garbled value reads as absent.
        assert_eq!(m.apply(&k, &k.config(), Some(e("routes: []", 10))), None);
        assert_eq!(
            m.apply(&k, &k.state("web"), Some(e("{", 11))),
            Some(Key::State("web".into()))
        );
        assert_eq!(m.state(&k, "web"), None);
    }

    #[test]
    fn the_journal_is_ordered_by_sequence_and_limited_from_the_end() {
        let k = Keys::new("/p");
        let mut m = Mirror::default();
        let ev = |kind: &str| {
            serde_json::json!({"at_ms": 1, "canary_version": "v2", "kind": kind,
                "from": {"phase": null, "step": null, "weight": 0.0, "no_canary": true},
                "to": {"phase": null, "step": null, "weight": 0.0, "no_canary": true},
                "reason": "r"})
            .to_string()
        };
        assert_eq!(m.next_seq("web"), 1);
        for (seq, kind) in [(2, "b"), (1, "a"), (10, "c")] {
            m.apply(&k, &k.journal("web", seq), Some(e(&ev(kind), 1)));
        }
        let kinds: Vec<String> = m.events("web", 2).into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["b", "c"]);
        assert_eq!(m.next_seq("web"), 11);
    }
}
