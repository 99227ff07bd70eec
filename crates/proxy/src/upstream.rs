//! The one place where the upstream protocol is chosen: [`Upstream`] names a pool's
//! way to an instance, cleartext HTTP/1.1 (the proxy's own exchange, `canary_http1`)
//! or hyper's client (`crate::http2`: HTTP/2, and any protocol over TLS, whose
//! connector is `crate::tls`'s), and [`send`] sends a request either way with one
//! error type, [`SendError`], so the handler classifies failures the same for both.
//!
//! Enum dispatch, as linkerd's `Client { H2, Http1 }` and Pingora's `HttpSession`: no
//! `dyn` on the request path. TLS came in as a connector of the client variant; a
//! TLS stream for the own HTTP/1.1 exchange (it is generic over its `Io`) would be a
//! variant here, not a branch in the handler.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
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
    /// Through this worker's hyper client of the pool: HTTP/2 (h2c, or h2 over TLS)
    /// or HTTP/1.1 over TLS (`crate::tls`).
    Client {
        client: &'a ProxyClient,
        /// The instance, as the request's absolute URI names it (a retry names
        /// another), and its `Host` (sent when the client's request had none).
        authority: &'a Authority,
        host: &'a HeaderValue,
        /// Whether the pool has another instance to retry on: only then is a copy of
        /// the request's head kept.
        others: bool,
    },
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
/// passed on. Through hyper's client (which takes the request) only a request without
/// a body is retried, from a copy of its head made before it is sent: on a connect
/// error, and on no response head when it is idempotent.
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
        Upstream::Client {
            client,
            authority,
            host,
            others,
        } => {
            // hyper's client takes the request by value.
            let parts = std::mem::replace(parts, Request::new(()).into_parts().0);
            let body = std::mem::replace(body, UpstreamBody::empty());
            let bodiless = http_body::Body::is_end_stream(&body);
            let again = (others && bodiless).then(|| copy_head(&parts));
            let req = Request::from_parts(parts, body);
            let first = crate::http2::send(client, req, body_end, timeout).await;
            let (e, mut head) = match (first, again) {
                (Err(e @ SendError::Connect(_)), Some(head)) => (e, head),
                (Err(e @ SendError::Protocol(_)), Some(head)) if head.method.is_idempotent() => {
                    (e, head)
                }
                (other, _) => return other,
            };
            let Some(Upstream::Client {
                client: next,
                authority: next_authority,
                host: next_host,
                ..
            }) = retry(&e)
            else {
                return Err(e);
            };
            tracing::debug!(upstream = %authority, next = %next_authority, error = %e, "no answer; sending to another instance");
            retarget(&mut head, host, (next_authority, next_host));
            let req = Request::from_parts(head, UpstreamBody::empty());
            crate::http2::send(next, req, None, timeout).await
        }
    }
}

/// A copy of a request's head (its extensions are the proxy's, cleared before this).
fn copy_head(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// Points a request made for one instance at another: the authority of its absolute
/// URI, and its `Host` when that was the first instance's own.
fn retarget(head: &mut Parts, from_host: &HeaderValue, (to, to_host): (&Authority, &HeaderValue)) {
    let mut uri = std::mem::take(&mut head.uri).into_parts();
    uri.authority = Some(to.clone());
    if let Ok(uri) = Uri::from_parts(uri) {
        head.uri = uri;
    }
    if head.headers.get(http::header::HOST) == Some(from_host) {
        head.headers.insert(http::header::HOST, to_host.clone());
    }
}
