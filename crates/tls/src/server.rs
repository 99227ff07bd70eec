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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::testing::TestCa;
    use crate::ClientSettings;

    /// Shakes hands over an in-memory pipe; the client's view of the connection.
    async fn connect(
        server: &Arc<ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
    ) -> rustls::ClientConnection {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.clone());
        let peer = (Ipv4Addr::LOCALHOST, 1).into();
        let timeout = Duration::from_secs(10);
        let name = ServerName::try_from("shop.test").unwrap();
        let (s, c) = tokio::join!(
            handshake(&acceptor, a, timeout, peer),
            TlsConnector::from(client.clone()).connect(name, b)
        );
        let (mut s, mut c) = (s.expect("server side"), c.expect("client side"));
        // The TLS 1.3 session tickets follow the handshake: let the client read them.
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.unwrap();
        let (_, conn) = c.into_inner();
        conn
    }

    #[tokio::test]
    async fn tls_13_and_12_with_alpn_and_a_second_connection_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "ca");
        let files = ca.issue(dir.path(), "shop", &["shop.test"]);
        let store = Arc::new(CertStore::load("proxy", &[files], false).unwrap());
        let server = server_config(store, &[ALPN_H2, ALPN_HTTP1]).unwrap();
        let settings = ClientSettings {
            ca: Some(ca.cert_path.clone()),
            ..Default::default()
        };
        let client13 = Arc::new(crate::client_config(&settings, &[ALPN_H2], "test").unwrap());

        let first = connect(&server, &client13).await;
        assert_eq!(
            first.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(first.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        let second = connect(&server, &client13).await;
        assert_eq!(
            second.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );

        // A TLS 1.2-only client is served too, and resumes by ticket.
        let client12 = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(crate::client::ca_bundle(&ca.cert_path).unwrap())
            .with_no_client_auth();
        let client12 = Arc::new(client12);
        let first = connect(&server, &client12).await;
        assert_eq!(
            first.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let second = connect(&server, &client12).await;
        assert_eq!(
            second.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }
}
