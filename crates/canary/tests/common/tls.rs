//! TLS clients for the end-to-end tests: a handshake with chosen SNI and ALPN that
//! reports which certificate was served, and HTTP/1.1 or HTTP/2 requests over it.
//! The client side is rustls, configured by `canary_tls::client_config` (the roots
//! are the test CA's, or none with `insecure_skip_verify` when a test looks at the
//! served certificate itself).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{Reply, REQUEST_TIMEOUT};

/// What the client trusts.
pub enum Trust<'a> {
    /// Only this CA bundle (verification on, as `curl --cacert`).
    Ca(&'a Path),
    /// Anything (the test compares the served certificate itself).
    Any,
}

/// A client config offering `alpn`.
pub fn config(trust: Trust<'_>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let settings = match trust {
        Trust::Ca(ca) => canary_tls::ClientSettings {
            ca: Some(ca.to_path_buf()),
            ..Default::default()
        },
        Trust::Any => canary_tls::ClientSettings {
            insecure_skip_verify: true,
            ..Default::default()
        },
    };
    Arc::new(canary_tls::client_config(&settings, alpn, "test client").expect("client config"))
}

/// Connects and shakes hands; `sni: None` sends no SNI (the name is an IP address).
pub async fn connect(
    addr: SocketAddr,
    sni: Option<&str>,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).map_err(|e| e.to_string())?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let fut = TlsConnector::from(config).connect(name, tcp);
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("read certificate")
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// The certificate the server presented on `tls`.
pub fn served(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .to_vec()
}

/// The ALPN protocol agreed on `tls`.
pub fn alpn(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// A connection to send requests on: HTTP/2 if ALPN agreed on `h2`, else HTTP/1.1.
pub enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub async fn new(tls: TlsStream<TcpStream>) -> Sender {
        let h2 = alpn(&tls).as_deref() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            Sender::Http2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http1 handshake");
            tokio::spawn(conn);
            Sender::Http1(s)
        }
    }

    /// A GET of `path` for `host` with extra `headers`.
    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let h2 = matches!(self, Sender::Http2(_));
        let mut b = Request::builder().method("GET");
        b = if h2 {
            b.uri(format!("https://{host}{path}"))
        } else {
            b.uri(path).header("host", host)
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).expect("request");
        let fut = async {
            // `ready` first: after a response, the connection takes a moment to be
            // free for the next request.
            let resp = match self {
                Sender::Http1(s) => match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                },
                Sender::Http2(s) => match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                },
            }
            .expect("response");
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.expect("body").to_bytes();
            Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))
    }
}
