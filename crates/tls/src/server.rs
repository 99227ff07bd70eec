//! A TLS listener's `ServerConfig`.
//!
//! TLS 1.3 and 1.2 only (rustls has nothing older), the certificate chosen per
//! handshake by the listener's [`CertStore`], ALPN as given (`h2` before `http/1.1`
//! on the proxy, so HTTP/2-capable clients get HTTP/2), session resumption on:
//! stateless tickets (TLS 1.3 and 1.2) from a rotating ticketer shared by every
//! worker, and rustls' in-memory session cache for TLS 1.2 clients without tickets.
//! No 0-RTT early data (it can be replayed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::store::CertStore;
use crate::TlsError;

/// ALPN name of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN name of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A `ServerConfig` serving `store`'s certificates with the ALPN protocols `alpn` (in
/// order of preference).
pub fn server_config(store: Arc<CertStore>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls = |source| TlsError::Rustls {
        what: format!("{} listener's TLS settings", store.listener()),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls)?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(rustls)?;
    Ok(Arc::new(config))
}

/// Runs the server side of a handshake on `io` within `timeout`. `None`: the client
/// failed it, took too long or went away (logged at debug: a port scanner or a client
/// that distrusts the certificate is not the proxy's error). Run it in the
/// connection's own task, never in the accept loop, so one slow client cannot hold up
/// the others.
pub async fn handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &TlsAcceptor,
    io: IO,
    timeout: Duration,
    peer: SocketAddr,
) -> Option<TlsStream<IO>> {
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
