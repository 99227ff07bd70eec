//! HTTP/2 upstreams (h2c, prior knowledge): hyper-util's client, one per data-plane
//! worker, and the request body that tells how it ended.
//!
//! Why hyper's client here and the proxy's own exchange for HTTP/1.1
//! (`canary_http1`): HTTP/2 needs multiplexing and flow control, which are not worth
//! writing again; HTTP/1.1, which needs neither, is where hyper's client cost most
//! (docs/performance.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

use crate::body::ProxyBody;
use crate::headers::filter_trailers;
use crate::request::ClientBody;
use crate::worker::this_worker;
use canary_http1::client::SendError;
use canary_http1::conn::{IDLE_TIMEOUT_MS, MAX_IDLE, TCP_KEEPALIVE};
use canary_http1::BoxError;

/// The HTTP client that forwards to HTTP/2 pools; one per connect timeout and
/// data-plane worker, reused across reloads so its connections survive them.
/// HTTP/1.1 pools use [`canary_http1`] instead.
pub type ProxyClient = Client<HttpConnector, UpstreamBody>;

/// One HTTP/2 forwarding client per data-plane worker.
///
/// hyper-util's `Client` spawns each upstream connection's task on the runtime of the
/// thread that opened it. With one current-thread runtime per worker, a client (and
/// its pool) per worker keeps every upstream connection on the thread that uses it:
/// the pool's mutex is never contended and no request crosses threads. Our own
/// exchange would also drop the pool's checkout machinery and the connection tasks,
/// but would have to re-implement HTTP/2 (multiplexing, flow control); HTTP/1.1 pools,
/// which need none of it, use it ([`canary_http1`]).
#[derive(Clone, Debug)]
pub struct WorkerClients(Arc<[ProxyClient]>);

impl WorkerClients {
    pub fn new(workers: usize, connect_ms: u64) -> WorkerClients {
        WorkerClients(
            (0..workers.max(1))
                .map(|_| build_h2_client(connect_ms))
                .collect(),
        )
    }

    /// The current worker's client (worker 0's on any other thread).
    #[inline]
    pub fn get(&self) -> &ProxyClient {
        this_worker(&self.0)
    }
}

/// Builds an HTTP/2 (h2c, prior knowledge) forwarding client.
fn build_h2_client(connect_ms: u64) -> ProxyClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
    // The same keep-alive settings as the HTTP/1.1 pools.
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_millis(IDLE_TIMEOUT_MS))
        .pool_max_idle_per_host(MAX_IDLE);
    b.timer(hyper_util::rt::TokioTimer::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .http2_only(true);
    b.build(connector)
}

/// How a request body on its way to an HTTP/2 upstream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// The last byte was handed over.
    Sent,
    /// The body broke off (ended early, or failed).
    Broken,
}

impl BodyEnd {
    /// Whether this poll of a body ended it; `at_end` is the body's `is_end_stream()`
    /// after the poll (with a Content-Length, hyper stops polling there and never
    /// sees the `None`).
    fn of<T, E>(poll: &Poll<Option<Result<T, E>>>, at_end: bool) -> Option<BodyEnd> {
        match poll {
            Poll::Ready(Some(Ok(_))) if at_end => Some(BodyEnd::Sent),
            Poll::Ready(None) => Some(BodyEnd::Sent),
            Poll::Ready(Some(Err(_))) => Some(BodyEnd::Broken),
            _ => None,
        }
    }
}

/// The request body on its way upstream. To an HTTP/2 pool it reports how it ended,
/// so that `timeouts.request` times the upstream rather than a slow client upload, and
/// a client's broken body is not blamed on the upstream (an HTTP/1.1 exchange sees
/// both itself).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: ClientBody,
    end: Option<oneshot::Sender<BodyEnd>>,
}

impl UpstreamBody {
    /// No body (what is left where one was taken out).
    pub(crate) fn empty() -> UpstreamBody {
        UpstreamBody {
            inner: ClientBody::Empty,
            end: None,
        }
    }

    /// Wraps `body`; the receiver tells how it ended (`None` for a request without a
    /// body, nothing to wait for, or when not `reported`: an HTTP/1.1 exchange sees the
    /// body end itself).
    pub(crate) fn new(
        inner: ClientBody,
        reported: bool,
    ) -> (UpstreamBody, Option<oneshot::Receiver<BodyEnd>>) {
        if inner.is_end_stream() || !reported {
            return (UpstreamBody { inner, end: None }, None);
        }
        let (tx, rx) = oneshot::channel();
        (
            UpstreamBody {
                inner,
                end: Some(tx),
            },
            Some(rx),
        )
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        // A client's trailers pass only what may be a trailer (RFC 9110 §6.5.1).
        if let Poll::Ready(frame) = &mut r {
            filter_trailers(frame);
        }
        if let Some(end) = BodyEnd::of(&r, this.inner.is_end_stream()) {
            if let Some(tx) = this.end.take() {
                let _ = tx.send(end);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Waits for an HTTP/2 upstream's response headers, for at most `timeout` after the
/// request body has been sent whole (at once for a request without a body). Also
/// returns whether the client's body broke off. (An HTTP/1.1 exchange times itself,
/// on its connection's timer: `http1::client::send`.)
async fn response_within<F: Future>(
    response: F,
    body_end: Option<oneshot::Receiver<BodyEnd>>,
    timeout: Duration,
) -> (Result<F::Output, tokio::time::error::Elapsed>, bool) {
    tokio::pin!(response);
    let mut broken = false;
    if let Some(mut end) = body_end {
        tokio::select! {
            biased;
            e = &mut end => broken = e == Ok(BodyEnd::Broken),
            r = &mut response => {
                return (Ok(r), end.try_recv() == Ok(BodyEnd::Broken));
            }
        }
    }
    (tokio::time::timeout(timeout, response).await, broken)
}

/// Sends a request to an HTTP/2 upstream and waits for its response head, for at most
/// `timeout` after the body has been sent whole (see [`response_within`]).
pub(crate) async fn send(
    client: &ProxyClient,
    req: Request<UpstreamBody>,
    body_end: Option<oneshot::Receiver<BodyEnd>>,
    timeout: Duration,
) -> Result<Box<Response<ProxyBody>>, SendError> {
    let send = async {
        match client.request(req).await {
            Ok(resp) => Ok(Box::new(resp.map(ProxyBody::http2))),
            Err(e) if e.is_connect() => Err(SendError::Connect(e.into())),
            Err(e) => Err(SendError::Protocol(e.into())),
        }
    };
    match response_within(send, body_end, timeout).await {
        (Ok(Err(e)), true) => Err(SendError::ClientBody(e.into())),
        (Ok(r), _) => r,
        (Err(_), _) => Err(SendError::Timeout),
    }
}
