//! The request path: [`CanaryLayer`] wraps a stable service into a [`Split`], which
//! sends each request to the stable or the canary service by the core's decision and
//! records the outcome.
//!
//! Per request: the sticky key (header, else cookie, else a generated id), the core's
//! decision (rules, then the sticky bucket against the route's weight — one atomic
//! load), a call of the chosen service, and when its response is ready: the
//! counters, the breaker, `x-canary-version` and, for a generated id, `Set-Cookie`.
//! Nothing is boxed: the future is an enum of the two services' futures.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::ConnectInfo;
use bytes::{BufMut, BytesMut};
use canary_core::sticky_id::{IdSource, COOKIE_ATTRIBUTES};
use canary_core::Target;
use canary_proxy::witness::{LazyClient, Witness};
use http::header::{HeaderName, HeaderValue, SET_COOKIE};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::facts::Facts;
use crate::plane::RouteState;

/// The response field naming the version that answered, as the proxy sets it.
pub static X_CANARY_VERSION: HeaderName = HeaderName::from_static("x-canary-version");

/// A [`Layer`] that puts a canary service beside the service it wraps.
///
/// The wrapped (inner) service is the stable version; the service given to the layer
/// is the canary. Get one from [`Canary::layer`](crate::Canary::layer), which ties it
/// to a declared route (its weight, rules, sticky key, counters and breaker).
///
/// In an axum `Router`, layer a method router or a whole router:
///
/// ```no_run
/// # async fn doc(canary: canary_tower::Canary) {
/// use axum::{routing::get, Router};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "v1" }))
///     .layer(canary.layer("web", get(|| async { "v2" })));
/// # }
/// ```
///
/// The layer is cheap to clone: the canary service and a reference-counted route.
#[derive(Clone, Debug)]
pub struct CanaryLayer<C> {
    canary: C,
    route: Arc<RouteState>,
}

impl<C> CanaryLayer<C> {
    pub(crate) fn new(canary: C, route: Arc<RouteState>) -> CanaryLayer<C> {
        CanaryLayer { canary, route }
    }
}

impl<S, C: Clone> Layer<S> for CanaryLayer<C> {
    type Service = Split<S, C>;

    fn layer(&self, stable: S) -> Split<S, C> {
        Split {
            stable,
            canary: self.canary.clone(),
            route: self.route.clone(),
        }
    }
}

/// A service that splits requests between a stable and a canary service.
///
/// Built by [`CanaryLayer`] or [`Canary::split`](crate::Canary::split). Both
/// services take the same request type and answer with the same response type (in
/// axum, both are `Router`s, `MethodRouter`s or handlers turned into services).
///
/// # Readiness
///
/// `poll_ready` waits for both services: which one serves a request is decided in
/// `call`, from the request. (axum's routers and handlers are always ready.)
///
/// # Errors
///
/// A service error is passed through unchanged; it counts as a failed request of
/// that version (status class 5xx), for the analysis and the breaker.
#[derive(Clone, Debug)]
pub struct Split<S, C> {
    stable: S,
    canary: C,
    route: Arc<RouteState>,
}

impl<S, C> Split<S, C> {
    pub(crate) fn new(stable: S, canary: C, route: Arc<RouteState>) -> Split<S, C> {
        Split {
            stable,
            canary,
            route,
        }
    }

    /// The stable service.
    pub fn stable(&self) -> &S {
        &self.stable
    }

    /// The canary service.
    pub fn canary(&self) -> &C {
        &self.canary
    }
}

/// Ids for clients without a sticky key: one source per process, seeded at random.
fn ids() -> &'static IdSource {
    use std::hash::BuildHasher;
    static IDS: OnceLock<IdSource> = OnceLock::new();
    IDS.get_or_init(|| IdSource::new(std::hash::RandomState::new().hash_one(0x6361_6e61_7279_u64)))
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for Split<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    C: Service<Request<ReqBody>, Response = Response<ResBody>, Error = S::Error>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.stable.poll_ready(cx))?;
        self.canary.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let state = &self.route;
        let facts = Facts(&req);
        // As the proxy: the sticky key, else a generated id the client keeps in the
        // sticky cookie from now on (a client without a key must not flip versions).
        let mut generated = None;
        let key = match state.route.sticky_key(&facts) {
            Some(k) => Some(k.bytes()),
            None => {
                generated = Some(ids().next_id());
                generated.as_ref().map(<[u8; 32]>::as_slice)
            }
        };
        let target = state
            .route
            .decide(state.runtime.weight(), &facts, key)
            .target;
        // Who would be blamed for a failure (`canary_proxy::witness`): the peer address
        // when the application serves with `into_make_service_with_connect_info`, and
        // the sticky key. Without an address, only the key tells clients apart.
        let client = match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => LazyClient::new(peer.ip(), key),
            None => LazyClient::without_address(key),
        };
        let started = Instant::now();
        let kind = match target {
            Target::Stable => Kind::Stable {
                fut: self.stable.call(req),
            },
            Target::Canary => Kind::Canary {
                fut: self.canary.call(req),
            },
        };
        ResponseFuture {
            kind,
            route: Some(state.clone()),
            target,
            started,
            generated,
            client,
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<FS, FC> {
        Stable { #[pin] fut: FS },
        Canary { #[pin] fut: FC },
    }
}

pin_project! {
    /// The response future of [`Split`]: the chosen service's future, then the
    /// recording and the added response fields.
    ///
    /// Dropped before it completes (the client went away), it counts a client abort
    /// for its version, never a failure, as the proxy does.
    pub struct ResponseFuture<FS, FC> {
        #[pin]
        kind: Kind<FS, FC>,
        // `None` once the response was recorded.
        route: Option<Arc<RouteState>>,
        target: Target,
        started: Instant,
        generated: Option<[u8; 32]>,
        client: LazyClient,
    }

    impl<FS, FC> PinnedDrop for ResponseFuture<FS, FC> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(route) = this.route.take() {
                match this.target {
                    Target::Stable => route.stable.record_client_abort(),
                    Target::Canary => route.canary.record_client_abort(),
                }
            }
        }
    }
}

impl<FS, FC, B, E> Future for ResponseFuture<FS, FC>
where
    FS: Future<Output = Result<Response<B>, E>>,
    FC: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.kind.project() {
            KindProj::Stable { fut } => ready!(fut.poll(cx)),
            KindProj::Canary { fut } => ready!(fut.poll(cx)),
        };
        let route = this
            .route
            .take()
            .expect("ResponseFuture polled after it completed");
        // Time to the response head, as the proxy measures an upstream.
        let elapsed_us = u64::try_from(this.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (stats, version) = match this.target {
            Target::Stable => (&route.stable, &route.stable_header),
            Target::Canary => (&route.canary, &route.canary_header),
        };
        let status = match &result {
            Ok(resp) => resp.status().as_u16(),
            Err(_) => 500,
        };
        stats.record(status, elapsed_us);
        if *this.target == Target::Canary {
            if status >= 500 {
                route
                    .runtime
                    .canary_failure(Witness::Client(this.client.id()));
            } else {
                route.runtime.canary_success();
            }
        }
        Poll::Ready(result.map(|mut resp| {
            let headers = resp.headers_mut();
            headers.insert(X_CANARY_VERSION.clone(), version.clone());
            if let Some(id) = this.generated.take() {
                headers.append(SET_COOKIE, sticky_cookie(&route.cookie_prefix, &id));
            }
            resp
        }))
    }
}

/// `Set-Cookie` for a generated id: `name=id` and the proxy's attributes. The one
/// allocation a request without a sticky key costs (a `HeaderValue` owns its bytes).
fn sticky_cookie(prefix: &[u8], id: &[u8; 32]) -> HeaderValue {
    let mut v = BytesMut::with_capacity(prefix.len() + id.len() + COOKIE_ATTRIBUTES.len());
    v.put_slice(prefix);
    v.put_slice(id);
    v.put_slice(COOKIE_ATTRIBUTES.as_bytes());
    HeaderValue::from_maybe_shared(v.freeze())
        .expect("a checked cookie name, hex digits and fixed attributes")
}
