//! The seam through which fleet mode takes over the admin API's mutating verbs.
//!
//! In file mode there is no gate and every command runs on this process's controller.
//! In fleet mode (`canary-fleet`) a command must act fleet-wide: a follower hands it to
//! the elected leader, and with the store unreachable only `abort` acts (locally, at
//! once). The gate decides that per call; `None` means "run it here".

use std::future::Future;
use std::pin::Pin;

use canary_proxy::expo::Exposition;

use crate::controller::Command;

/// What a gated command answers: the route's status as JSON, or an HTTP status and a
/// message.
pub type GateAnswer = Result<serde_json::Value, (u16, String)>;

/// A boxed future of a [`GateAnswer`].
pub type GateFuture = Pin<Box<dyn Future<Output = GateAnswer> + Send>>;

/// Decides where an admin command runs.
pub trait CommandGate: Send + Sync {
    /// `None`: run `cmd` on the local controller. `Some`: the answer comes from there
    /// (forwarded to the leader, or refused). `authorization` is the caller's header,
    /// passed on when forwarding.
    fn command(
        &self,
        route: &str,
        cmd: &Command,
        authorization: Option<&str>,
    ) -> Option<GateFuture>;
    /// Adds the gate owner's metric families to `/metrics`.
    fn encode_metrics(&self, e: &mut Exposition);
}
