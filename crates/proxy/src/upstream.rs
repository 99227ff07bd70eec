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
    /// Through this worker's hyper client of the pool: HTTP/2 (h2c, or h2 over TLS)
    /// or HTTP/1.1 over TLS (`crate::tls`).
    Client(&'a ProxyClient),
}

/// The request on its way: its parts and body, how the body ends (reported for
/// HTTP/2 only; the HTTP/1.1 exchange sees it itself), and what an HTTP/1.1 request
/// carries besides its map.
pub(crate) struct Outgoing<'a> {
    pub parts: Parts,
    pub body: UpstreamBody,
    pub body_end: Option<oneshot::Receiver<BodyEnd>>,
    pub extra: Extra<'a, ProxyFields>,
}

/// Sends `req` to `upstream` and waits for the response head, for at most `timeout`
/// after the request (its body included) has been sent; `started` is when the
/// handler began it (an HTTP/1.1 request without a body on a pooled connection is
/// timed from then: one clock read less per request).
pub(crate) async fn send(
    upstream: Upstream<'_>,
    req: Outgoing<'_>,
    (started, timeout): (Instant, Duration),
) -> Result<Box<Response<ProxyBody>>, SendError> {
    let Outgoing {
        parts,
        mut body,
        body_end,
        extra,
    } = req;
    match upstream {
        Upstream::Http1 {
            idle,
            addr,
            connect_ms,
        } => {
            canary_http1::client::send(
                idle,
                addr,
                || connect_tcp(addr, connect_ms),
                (started, timeout),
                (&parts, &mut body),
                extra,
            )
            .await
        }
        Upstream::Client(client) => {
            let req = Request::from_parts(parts, body);
            crate::http2::send(client, req, body_end, timeout).await
        }
    }
}
