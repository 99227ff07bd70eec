//! The one place where the upstream protocol is chosen: [`Upstream`] names a pool's
//! way to an instance, HTTP/1.1 (the proxy's own exchange, `canary_http1`) or HTTP/2
//! (hyper's client, `crate::http2`), and [`send`] sends a request either way with one
//! error type, [`SendError`], so the handler classifies failures the same for both.
//!
//! Enum dispatch, as linkerd's `Client { H2, Http1 }` and Pingora's `HttpSession`: no
//! `dyn` on the request path. A new way to reach an upstream (TLS, say) is a variant
//! here or a stream type for the HTTP/1.1 exchange, not a branch in the handler.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::headers::ProxyFields;
use crate::http2::{BodyEnd, ProxyClient, UpstreamBody};
use canary_http1::client::Extra;
use canary_http1::conn::{connect_tcp, IdleList};

pub use canary_http1::client::SendError;

/// How a request reaches one upstream instance.
#[derive(Clone, Copy)]
pub(crate) enum Upstream<'a> {
    /// HTTP/1.1 over TCP to `addr`, on this worker's idle connections to it.
    Http1 {
        idle: &'a Arc<IdleList<TcpStream>>,
        addr: &'a str,
        connect_ms: u64,
    },
    /// HTTP/2 (h2c), by this worker's client of the pool.
    Http2(&'a ProxyClient),
}

/// The request on its way: its parts and body (borrowed: the HTTP/1.1 exchange only
/// reads them, and moving ~250 bytes of parts into the send cost a `memcpy` per
/// request), how the body ends (reported for HTTP/2 only; the HTTP/1.1 exchange sees
/// it itself), and what an HTTP/1.1 request carries besides its map.
pub(crate) struct Outgoing<'a> {
    pub parts: &'a mut Parts,
    pub body: &'a mut UpstreamBody,
    pub body_end: Option<oneshot::Receiver<BodyEnd>>,
    pub extra: Extra<'a, ProxyFields>,
}

/// Sends `req` to `upstream` and waits for the response head, for at most `timeout`
/// after the request (its body included) has been sent; `started` is when the
/// handler began it (an HTTP/1.1 request without a body on a pooled connection is
/// timed from then: one clock read less per request).
///
/// `retry`: the request goes once more, to the upstream `retry` gives for the first
/// one's error (another instance of the same pool, never the other version), when an
/// HTTP/1.1 upstream could not be connected to (refused, unreachable, connect
/// timeout: the request has not reached it, its body untouched), or when an
/// idempotent request without a body got no response head (closed or reset: an
/// instance dying under it; the keep-alive race is the exchange's own). nginx's
/// `proxy_next_upstream error`. Never for a body that was streamed, never after a
/// timeout (the request may still be at work), never after any of the answer was
/// passed on. (An HTTP/2 pool's request is hyper's once sent: not retried.)
pub(crate) async fn send<'a>(
    upstream: Upstream<'a>,
    retry: impl FnOnce(&SendError) -> Option<Upstream<'a>>,
    req: Outgoing<'_>,
    (started, timeout): (Instant, Duration),
) -> Result<Box<Response<ProxyBody>>, SendError> {
    let Outgoing {
        parts,
        body,
        body_end,
        extra,
    } = req;
    match upstream {
        Upstream::Http1 {
            idle,
            addr,
            connect_ms,
        } => {
            let bodiless = http_body::Body::is_end_stream(&body);
            let first = canary_http1::client::send(
                idle,
                addr,
                || connect_tcp(addr, connect_ms),
                (started, timeout),
                (&*parts, &mut *body),
                extra,
            )
            .await;
            let e = match first {
                Err(e @ SendError::Connect(_)) => e,
                Err(e @ SendError::Protocol(_)) if bodiless && parts.method.is_idempotent() => e,
                other => return other,
            };
            let Some(Upstream::Http1 {
                idle,
                addr: next,
                connect_ms,
            }) = retry(&e)
            else {
                return Err(e);
            };
            tracing::debug!(upstream = addr, next, error = %e, "no answer; sending to another instance");
            canary_http1::client::send(
                idle,
                next,
                || connect_tcp(next, connect_ms),
                (Instant::now(), timeout),
                (&*parts, &mut *body),
                extra,
            )
            .await
        }
        Upstream::Http2(client) => {
            // hyper's client takes the request by value.
            let parts = std::mem::replace(parts, Request::new(()).into_parts().0);
            let body = std::mem::replace(body, UpstreamBody::empty());
            let req = Request::from_parts(parts, body);
            crate::http2::send(client, req, body_end, timeout).await
        }
    }
}
