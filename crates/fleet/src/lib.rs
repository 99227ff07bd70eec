//! Fleet mode: several `canary serve` processes in step through etcd.
//!
//! The fleet document (the routes) and every route's rollout state and journal live
//! under one etcd prefix. Every member follows the store (a consistent read, then a
//! watch), never the leader; one member, elected through a lease-bound key, runs the
//! rollouts on the counters of the whole fleet, and every write it makes is fenced by
//! its leader key's create revision. See docs/fleet.md.
//!
//! # Layout
//! - [`keys`]: the key layout under the prefix.
//! - [`mirror`]: the member's view of those keys (pure).
//! - [`store`]: [`EtcdStore`], the controller's `StateStore` in fleet mode.
//! - `node`: the member's tasks: watch, lease and election, fenced writer, controller
//!   loop, local aborts, breaker reports, cache.
//! - [`evidence`]: the leader's fleet-wide counters (pure).
//! - `forward`: member-to-member HTTP (commands to the leader, counter pulls).
//! - [`api`]: `/api/v1/fleet`, `/api/v1/fleet/sample`, the command gate.
//! - [`push`]: `canary fleet push`.
//! - `metrics`: the fleet's `/metrics` families.
//!
//! Only etcd is implemented. A second backend (Consul) would implement the same
//! `StateStore` and replace `node`'s watch, lease and transaction calls.

#![forbid(unsafe_code)]

pub mod api;
pub mod evidence;
mod forward;
pub mod keys;
mod metrics;
pub mod mirror;
mod node;
pub mod push;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use canary_config::Config;
use canary_control::{Controller, StateStore};

pub use node::Shared;
pub use store::EtcdStore;

/// Errors of fleet mode's setup and of `canary fleet push`.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Config(canary_config::ConfigError),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the config has no `fleet` block")]
    NotFleet,
}

/// One member of a fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    writes: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Queued>>>,
}

use node::Queued;

/// How long a starting member waits for etcd before it serves from its cache.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

impl Fleet {
    /// Sets up a member from the local config (its `fleet` block). Connects lazily:
    /// etcd may be down.
    pub async fn new(local: &Config) -> Result<Fleet, FleetError> {
        let f = local.fleet.as_ref().ok_or(FleetError::NotFleet)?;
        let client = push::connect(&f.etcd).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let boot_id = format!(
            "{:x}-{:x}",
            canary_control::controller::wall_ms(),
            std::process::id()
        );
        let shared = Shared::new(
            keys::Keys::new(&f.prefix),
            f.member.clone(),
            boot_id,
            format!("http://{}", f.advertise),
            Duration::from_millis(f.lease_ttl_ms),
            local.clone(),
            client,
            tx,
        );
        Ok(Fleet {
            shared: Arc::new(shared),
            writes: std::sync::Mutex::new(Some(rx)),
        })
    }

    /// The controller's state store.
    pub fn state_store(&self) -> Arc<dyn StateStore> {
        Arc::new(EtcdStore {
            shared: self.shared.clone(),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The fleet's admin endpoints, to merge into the admin router.
    pub fn router(&self) -> axum::Router {
        api::router(self.shared.clone())
    }

    /// Starts the member's tasks with its controller and returns once the first
    /// snapshot is applied, or after two seconds with the cache applied
    /// (if there is one; without one the member stays not ready until etcd answers).
    pub async fn start(&self, controller: Arc<Controller>) -> Vec<tokio::task::JoinHandle<()>> {
        let sh = self.shared.clone();
        sh.set_controller(controller.clone());
        controller.set_evidence(sh.evidence.clone());
        controller.set_gate(Arc::new(api::Gate(sh.clone())));
        let (first_tx, mut first_rx) = tokio::sync::watch::channel(false);
        let rx = self.writes.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut tasks = vec![tokio::spawn(node::watch_loop(sh.clone(), first_tx))];
        if let Some(rx) = rx {
            tasks.push(tokio::spawn(node::writer_loop(sh.clone(), rx)));
        }
        tasks.push(tokio::spawn(node::election_loop(sh.clone())));
        tasks.push(tokio::spawn(node::controller_loop(sh.clone(), controller)));
        let got = tokio::time::timeout(FIRST_SNAPSHOT_WAIT, first_rx.wait_for(|v| *v)).await;
        if !matches!(got, Ok(Ok(_))) && !sh.load_cache() {
            tracing::warn!("fleet: etcd unreachable and no cache: not ready until etcd answers");
        }
        tasks
    }

    /// Gives up leadership and membership at shutdown.
    pub async fn resign(&self) {
        self.shared.resign().await;
    }
}
