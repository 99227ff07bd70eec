//! The errors of starting an embedded canary.

use canary_control::store::StoreError;
use canary_control::ControlError;

/// Why [`CanaryBuilder::start`](crate::CanaryBuilder::start) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A route's spec is invalid; `why` says what to change.
    #[error("route {route:?}: {why}")]
    Invalid {
        /// The route's name.
        route: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two routes have the same name.
    #[error("route {0:?} is declared twice; route names must be unique")]
    Duplicate(String),
    /// No route was declared.
    #[error("no route declared; add one with CanaryBuilder::route")]
    NoRoutes,
    /// The state directory cannot be created, read or written.
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    /// The controller could not apply the routes (their persisted state is unreadable,
    /// or cannot be written).
    #[error("controller: {0}")]
    Control(#[from] ControlError),
    /// [`Canary::serve_admin`](crate::Canary::serve_admin) was given a listener off
    /// loopback and no admin token is set: anyone who can reach it could abort or
    /// promote.
    #[error("the admin listener {0} is not on loopback and no admin token is set: set one with CanaryBuilder::admin_token, or listen on 127.0.0.1")]
    UnprotectedAdmin(std::net::SocketAddr),
    /// The admin listener failed.
    #[error("admin listener: {0}")]
    Io(#[from] std::io::Error),
    /// `start` was called outside a tokio runtime, which the controller task needs.
    #[error("CanaryBuilder::start must be called within a tokio runtime (the controller runs as a tokio task)")]
    NoRuntime,
}
