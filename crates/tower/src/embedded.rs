//! [`Canary`]: the embedded data plane, the binary's rollout controller driving it as
//! a tokio task, its persisted state, the admin router and the metrics handle.

use std::path::PathBuf;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use canary_control::admin::{router, Admin};
use canary_control::store::Store;
use canary_control::{run_controller, Command, ControlError, Controller, RouteStatus};
use canary_proxy::expo::Exposition;
use tokio::sync::Notify;

use crate::error::Error;
use crate::plane::{Plane, RouteState};
use crate::spec::{template, RouteSpec};
use crate::split::{CanaryLayer, Split};

/// The directory rollout state and the journal go to when none is set.
pub const DEFAULT_STATE_DIR: &str = "./canary-state";

/// An embedded `canary`: declared routes, their live weights, counters and breakers,
/// and the rollout controller that moves the weights, running as a tokio task.
///
/// Build one with [`Canary::builder`], then put its layers on the application's
/// routes ([`Canary::layer`]) and serve its [`admin_router`](Canary::admin_router)
/// on a loopback address. It is cheap to clone. The controller task runs until
/// [`stop`](Canary::stop) or until the runtime shuts down, whether or not a `Canary`
/// is still held: the layers and the admin router keep working after the `Canary`
/// that made them is dropped.
#[derive(Clone)]
pub struct Canary {
    inner: Arc<Inner>,
}

struct Inner {
    plane: Arc<Plane>,
    controller: Arc<Controller>,
    token: Option<Arc<str>>,
    stop: Arc<Notify>,
    /// Ends the admin router's live streams (`GET /api/v1/stream`) on stop, so an open
    /// dashboard does not hold up the application's graceful shutdown.
    streams_stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Open dashboard streams end with the last handle; the controller task keeps
        // running (it holds its own references) until `stop()`.
        self.streams_stop.send_replace(true);
    }
}

impl std::fmt::Debug for Canary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canary")
            .field("routes", &self.inner.plane.names())
            .finish_non_exhaustive()
    }
}

/// Declares the routes and where their state is kept; [`start`](Self::start) starts
/// the controller.
#[derive(Clone, Debug)]
pub struct CanaryBuilder {
    state_dir: PathBuf,
    routes: Vec<RouteSpec>,
    admin_token: Option<String>,
}

impl CanaryBuilder {
    /// Where rollout state (one file per route) and the decision journal are kept,
    /// so a restart resumes each rollout at the same step and weight. Default
    /// `./canary-state`; created if missing.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> CanaryBuilder {
        self.state_dir = dir.into();
        self
    }

    /// Declares a route.
    pub fn route(mut self, route: RouteSpec) -> CanaryBuilder {
        self.routes.push(route);
        self
    }

    /// The bearer token the admin API's mutating calls (promote, abort, weight, ...)
    /// require; reads stay open. Set one whenever the admin router is served beyond
    /// loopback. `canary` CLI verbs send it from `CANARY_ADMIN_TOKEN`.
    pub fn admin_token(mut self, token: impl Into<String>) -> CanaryBuilder {
        self.admin_token = Some(token.into());
        self
    }

    /// Validates the routes, opens the state directory, resumes or starts each
    /// route's rollout (setting its weight before this returns), and spawns the
    /// controller on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// An invalid or duplicate route, no route, a state directory that cannot be
    /// used, unreadable persisted state, or no tokio runtime: see [`Error`].
    pub fn start(self) -> Result<Canary, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        if self.routes.is_empty() {
            return Err(Error::NoRoutes);
        }
        let mut config = template();
        let base = config.routes.remove(0);
        for (i, spec) in self.routes.iter().enumerate() {
            if self.routes[..i].iter().any(|r| r.name == spec.name) {
                return Err(Error::Duplicate(spec.name.clone()));
            }
            config.routes.push(spec.to_config(&base)?);
        }
        config.state_dir = self.state_dir.clone();
        let store = Store::open(&self.state_dir)?;
        let plane = Arc::new(Plane::new());
        let controller = Arc::new(Controller::new(plane.clone(), store));
        controller.apply(&config)?;
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        handle.spawn(run_controller(controller.clone(), async move {
            stopped.notified().await
        }));
        Ok(Canary {
            inner: Arc::new(Inner {
                plane,
                controller,
                token: self.admin_token.map(Arc::from),
                stop,
                streams_stop: Arc::new(tokio::sync::watch::channel(false).0),
            }),
        })
    }
}

impl Canary {
    /// A builder with no routes and the default state directory.
    pub fn builder() -> CanaryBuilder {
        CanaryBuilder {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            routes: Vec::new(),
            admin_token: None,
        }
    }

    fn route(&self, name: &str) -> Arc<RouteState> {
        self.inner.plane.route(name).unwrap_or_else(|| {
            panic!(
                "canary-tower: no route named {name:?} was declared (declared: {:?})",
                self.inner.plane.names()
            )
        })
    }

    /// A layer that puts `canary` beside the service it wraps (the stable one) on
    /// the declared route `route`.
    ///
    /// # Panics
    ///
    /// If no route of that name was declared: a programming error, caught when the
    /// application builds its router.
    pub fn layer<C>(&self, route: &str, canary: C) -> CanaryLayer<C> {
        CanaryLayer::new(canary, self.route(route))
    }

    /// The split service of `stable` and `canary` on the declared route `route`, for
    /// a plain hyper server or `Router::route_service`. Same as
    /// `canary.layer(route, canary_service).layer(stable)`.
    ///
    /// # Panics
    ///
    /// If no route of that name was declared.
    pub fn split<S, C>(&self, route: &str, stable: S, canary: C) -> Split<S, C> {
        Split::new(stable, canary, self.route(route))
    }

    /// The admin API of the binary (`/api/v1/...`, `/metrics`, `/healthz`,
    /// `/readyz`), so `canary status --admin http://<addr>` and every other CLI verb
    /// work against the application. Serve it on a loopback address, or set an
    /// [`admin_token`](CanaryBuilder::admin_token).
    pub fn admin_router(&self) -> Router {
        // The binary's Host and Origin rules (docs/admin-api.md): localhost,
        // `*.localhost` and literal addresses; no extra names.
        router(Admin {
            token: self.inner.token.clone(),
            // Ends the dashboard's live streams on `stop` and on the last drop.
            stop: self.inner.streams_stop.clone(),
            ..Admin::new(self.inner.controller.clone())
        })
    }

    /// Serves [`admin_router`](Self::admin_router) on `listener` until the returned
    /// future is dropped or the listener fails, as `canary serve` serves its admin
    /// API: a listener off loopback is refused unless an
    /// [`admin_token`](CanaryBuilder::admin_token) is set.
    ///
    /// ```no_run
    /// # async fn doc(canary: canary_tower::Canary) -> Result<(), canary_tower::Error> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    /// tokio::spawn(async move { canary.serve_admin(listener).await });
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::UnprotectedAdmin`] before serving anything, or [`Error::Io`] when the
    /// listener fails.
    pub async fn serve_admin(&self, listener: tokio::net::TcpListener) -> Result<(), Error> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && self.inner.token.is_none() {
            return Err(Error::UnprotectedAdmin(addr));
        }
        axum::serve(listener, self.admin_router()).await?;
        Ok(())
    }

    /// The metrics handle: the same families and names as the binary's `/metrics`.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            controller: self.inner.controller.clone(),
        }
    }

    /// A route's status, as `GET /api/v1/routes/{name}` shows it.
    pub fn status(&self, route: &str) -> Option<RouteStatus> {
        self.inner.controller.status(route)
    }

    /// Runs a command on a route (promote, abort, pause, resume, retry, set the
    /// weight), as the admin API does.
    ///
    /// # Errors
    ///
    /// An unknown route, a command the route's state refuses, or a state directory
    /// that cannot be written.
    pub fn command(&self, route: &str, command: Command) -> Result<RouteStatus, ControlError> {
        self.inner.controller.command(route, command)
    }

    /// Stops the controller task and ends the admin router's live streams. The layers
    /// keep serving with the weights they have; nothing moves them any more.
    pub fn stop(&self) {
        self.inner.stop.notify_one();
        self.inner.streams_stop.send_replace(true);
    }
}

/// The Prometheus metrics of an embedded canary: the binary's per-version and
/// per-route families (`canary_requests_total`, `canary_request_duration_seconds`,
/// `canary_route_weight_percent`, `canary_rollout_phase`, ...; docs/metrics.md).
///
/// Mount it with [`router`](Metrics::router), answer with it from a handler (it is
/// an [`IntoResponse`]), or append [`render`](Metrics::render)'s text to the
/// application's own exposition: the names all start with `canary_`.
#[derive(Clone)]
pub struct Metrics {
    controller: Arc<Controller>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The content type of [`render`](Self::render)'s text.
    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    /// The metrics in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        self.controller.proxy().encode_metrics(&mut e);
        self.controller.encode_metrics(&mut e);
        e.finish()
    }

    /// A router answering `GET /metrics`, to merge into the application's.
    pub fn router(self) -> Router {
        Router::new().route("/metrics", get(move || std::future::ready(self.clone())))
    }
}

impl IntoResponse for Metrics {
    fn into_response(self) -> Response {
        (
            [(http::header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
            self.render(),
        )
            .into_response()
    }
}
