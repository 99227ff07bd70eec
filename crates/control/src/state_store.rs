//! The seam between the controller and where rollout state lives.
//!
//! [`StateStore`] is what the controller needs from its persistence: a route's rollout
//! state, its manual weight, and its journal. File mode uses [`Store`] (files in
//! `state_dir`, unchanged); fleet mode (`canary-fleet`) puts the same values in etcd,
//! written only by the elected leader with fenced transactions. The methods are
//! synchronous because the controller calls them under its lock: a remote store
//! answers reads from its local mirror and queues its writes.

use canary_core::rollout::{Event, RolloutState};

use crate::store::{ManualWeight, Store, StoreError};

/// Where the controller keeps rollout state and the journal.
pub trait StateStore: Send + Sync {
    /// The persisted rollout of a route, if any.
    fn load(&self, route: &str) -> Result<Option<RolloutState>, StoreError>;
    /// Persists a route's rollout; `None` removes it.
    fn save(&self, route: &str, state: Option<&RolloutState>) -> Result<(), StoreError>;
    /// The manual weight persisted for a route, if any.
    fn load_manual(&self, route: &str) -> Result<Option<ManualWeight>, StoreError>;
    /// Persists a route's manual weight; `None` removes it.
    fn save_manual(&self, route: &str, m: Option<&ManualWeight>) -> Result<(), StoreError>;
    /// Appends journal events of a route.
    fn append(&self, route: &str, events: &[Event]) -> Result<(), StoreError>;
    /// The last `limit` journal events of a route, oldest first.
    fn events(&self, route: &str, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Where a route's rollout state is kept (a file, or an etcd key), for messages.
    fn state_path(&self, route: &str) -> std::path::PathBuf;
}

impl StateStore for Store {
    fn load(&self, route: &str) -> Result<Option<RolloutState>, StoreError> {
        Store::load(self, route)
    }
    fn save(&self, route: &str, state: Option<&RolloutState>) -> Result<(), StoreError> {
        Store::save(self, route, state)
    }
    fn load_manual(&self, route: &str) -> Result<Option<ManualWeight>, StoreError> {
        Store::load_manual(self, route)
    }
    fn save_manual(&self, route: &str, m: Option<&ManualWeight>) -> Result<(), StoreError> {
        Store::save_manual(self, route, m)
    }
    fn append(&self, route: &str, events: &[Event]) -> Result<(), StoreError> {
        Store::append(self, route, events)
    }
    fn events(&self, route: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        Store::events(self, route, limit)
    }
    fn state_path(&self, route: &str) -> std::path::PathBuf {
        Store::state_path(self, route)
    }
}
