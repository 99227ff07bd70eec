//! [`EtcdStore`]: the controller's [`StateStore`] in fleet mode.
//!
//! Reads come from the member's [`crate::mirror::Mirror`] (what etcd holds, as watched). Writes are
//! queued for the writer task, which sends them as fenced transactions, and only while
//! this member leads: a follower's controller computes the same decisions when it
//! applies a config, but only the leader's reach etcd, and the follower then adopts
//! them. The mirror itself changes only through the watch, so it never shows a write
//! etcd did not take.

use std::sync::Arc;

use canary_control::store::{ManualWeight, StoreError};
use canary_control::StateStore;
use canary_core::rollout::{Event, RolloutState};

use crate::node::{Shared, Write};

/// The etcd-backed state store.
pub struct EtcdStore {
    pub(crate) shared: Arc<Shared>,
}

impl StateStore for EtcdStore {
    fn state_path(&self, route: &str) -> std::path::PathBuf {
        format!("etcd:{}", self.shared.keys.state(route)).into()
    }
    fn load(&self, route: &str) -> Result<Option<RolloutState>, StoreError> {
        Ok(self
            .shared
            .mirror()
            .state(&self.shared.keys, route)
            .map(|d| d.state))
    }
    fn save(&self, route: &str, state: Option<&RolloutState>) -> Result<(), StoreError> {
        self.shared
            .write(Write::State(route.to_string(), state.cloned()));
        Ok(())
    }
    fn load_manual(&self, route: &str) -> Result<Option<ManualWeight>, StoreError> {
        Ok(self
            .shared
            .mirror()
            .manual(&self.shared.keys, route)
            .map(|d| d.manual))
    }
    fn save_manual(&self, route: &str, m: Option<&ManualWeight>) -> Result<(), StoreError> {
        self.shared
            .write(Write::Manual(route.to_string(), m.cloned()));
        Ok(())
    }
    fn append(&self, route: &str, events: &[Event]) -> Result<(), StoreError> {
        if !events.is_empty() {
            self.shared
                .write(Write::Journal(route.to_string(), events.to_vec()));
        }
        Ok(())
    }
    fn events(&self, route: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self.shared.mirror().events(route, limit))
    }
}
