//! TLS in the data plane: the listener's side (handshake, then HTTP/2 or HTTP/1.1 as
//! ALPN agreed) and the pools' side (the connector of a pool with `tls`).
//!
//! Certificates, SNI, rotation and the rustls configs themselves are `canary_tls`'s;
//! this module only puts them on the proxy's connections.
//!
//! **Listener.** The handshake runs in the connection's own task with
//! `tls.handshake_timeout`, never in the accept loop. The connection is then served
//! by hyper (`connection::hand_over`): HTTP/2 when ALPN chose `h2`, HTTP/1.1
//! otherwise (hyper's auto server tells them apart by the preface). The proxy's own
//! HTTP/1.1 reader is not used over TLS: it reads the socket directly; a TLS
//! connection costs the handshake and the record layer anyway, and hyper's path is
//! the one every unusual request already takes.
//!
//! **Pools.** A pool with `tls` goes through hyper's client (as `http2: true` pools
//! do) with a hyper-rustls connector: ALPN `h2` and HTTP/2 when the pool has
//! `http2: true` (gRPC), no ALPN and HTTP/1.1 otherwise. The pool's client config is
//! built at every config load (so a replaced CA bundle or client certificate is read
//! at the next reload, and `insecure_skip_verify` warns every time), and its health
//! checks use the same connector settings.

use std::sync::Arc;
use std::time::Duration;

use canary_tls::{CertStore, ClientSettings, TlsError};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsAcceptor;

use canary_http1::conn::TCP_KEEPALIVE;

/// The proxy listener's TLS: what `tls` configures.
#[derive(Clone)]
pub struct ListenerTls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) handshake_timeout: Duration,
}

impl ListenerTls {
    /// Serves `store`'s certificates with ALPN `h2`, `http/1.1`.
    pub fn new(store: Arc<CertStore>, handshake_timeout_ms: u64) -> Result<ListenerTls, TlsError> {
        let config =
            canary_tls::server_config(store, &[canary_tls::ALPN_H2, canary_tls::ALPN_HTTP1])?;
        Ok(ListenerTls {
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: Duration::from_millis(handshake_timeout_ms),
        })
    }
}

/// A pool's client TLS, as its connector uses it.
#[derive(Clone, Debug)]
pub struct PoolTls {
    config: rustls::ClientConfig,
    server_name: Option<ServerName<'static>>,
}

impl PoolTls {
    /// Builds the settings of the pool `what` (`routes[0].stable.tls`). Validation
    /// checked the files; should one have become unusable since, the error is logged
    /// and the pool gets a config that trusts nothing: its requests fail (502) rather
    /// than go out unverified.
    pub fn new(settings: &ClientSettings, what: &str) -> PoolTls {
        let config = canary_tls::client_config(settings, &[], what).unwrap_or_else(|e| {
            tracing::error!("{what}: {e}; requests to this pool will fail until it is fixed");
            canary_tls::client::trusting_nothing()
        });
        let server_name = settings.server_name.as_deref().and_then(|n| {
            canary_tls::client::parse_server_name(n)
                .map_err(|e| tracing::error!("{what}.server_name: {e}"))
                .ok()
        });
        PoolTls {
            config,
            server_name,
        }
    }
}

/// The connector of a pool that goes through hyper's client: TCP with the pools'
/// socket settings, then TLS when `tls` is given (only `https` URIs then) or none
/// (only `http` URIs reach it).
pub(crate) fn connector(
    connect_ms: u64,
    tls: Option<&PoolTls>,
    http2: bool,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.enforce_http(false);
    let builder = match tls {
        Some(t) => {
            let b = HttpsConnectorBuilder::new()
                .with_tls_config(t.config.clone())
                .https_only();
            match &t.server_name {
                Some(n) => b.with_server_name_resolver(FixedServerNameResolver::new(n.clone())),
                None => b,
            }
        }
        None => HttpsConnectorBuilder::new()
            .with_tls_config(canary_tls::client::trusting_nothing())
            .https_or_http(),
    };
    if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    }
}
