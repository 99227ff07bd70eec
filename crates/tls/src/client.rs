//! An upstream pool's TLS client settings (`tls:` on a pool).
//!
//! Verification is on by default: against the system's roots (read once per process
//! with `rustls-native-certs`, from the OS trust store) or, when `ca` is given,
//! against that bundle only. The name checked is `server_name` when given, else the
//! host of the upstream address (an IP address is checked against the certificate's
//! IP SANs). A client certificate (`cert`/`key`) is checked like a served one.
//! `insecure_skip_verify` accepts any certificate; it logs a warning every time a
//! config with it is loaded, because nobody should run with it unnoticed.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::pem::{self, CertificateFiles};
use crate::TlsError;

/// A pool's `tls:` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientSettings {
    /// PEM bundle of the CAs to trust instead of the system roots (`ca`).
    pub ca: Option<PathBuf>,
    /// The name to send as SNI and to verify (`server_name`); default: the upstream's
    /// host.
    pub server_name: Option<String>,
    /// A client certificate for mutual TLS (`cert` and `key`).
    pub client_cert: Option<CertificateFiles>,
    /// Accept any server certificate (`insecure_skip_verify`).
    pub insecure_skip_verify: bool,
}

/// The `ClientConfig` for `settings`, offering `alpn`. `what` names the pool in
/// messages (`routes[0].stable.tls`).
pub fn client_config(
    settings: &ClientSettings,
    alpn: &[&[u8]],
    what: &str,
) -> Result<ClientConfig, TlsError> {
    let provider = crate::provider();
    let rustls = |source| TlsError::Rustls {
        what: what.to_string(),
        source,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls)?;
    let builder = if settings.insecure_skip_verify {
        tracing::warn!(
            "{what}.insecure_skip_verify is on: the upstream's certificate is NOT verified; \
             anyone on the path can impersonate it"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let roots = match &settings.ca {
            Some(path) => Arc::new(ca_bundle(path)?),
            None => system_roots(),
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match &settings.client_cert {
        Some(files) => {
            let cert = pem::load(files, SystemTime::now())?;
            builder.with_client_cert_resolver(Arc::new(ClientCert(cert.key)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A config that trusts no server: for a connector that never does TLS, and for a
/// pool whose TLS files became unusable after validation (its requests then fail
/// instead of going out unverified).
pub fn trusting_nothing() -> ClientConfig {
    ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// The name to verify for an upstream at `host` (`server_name` when set).
pub fn server_name(settings: &ClientSettings, host: &str) -> Result<ServerName<'static>, String> {
    parse_server_name(settings.server_name.as_deref().unwrap_or(host))
}

/// A DNS name or an IP address (IPv6 with or without brackets), as TLS verifies it.
pub fn parse_server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string())
        .map_err(|_| format!("{name:?} is not a DNS name or IP address"))
}

/// Every certificate of a PEM CA bundle.
pub fn ca_bundle(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in pem::chain(path, &text)? {
        roots.add(cert).map_err(|e| TlsError::Parse {
            path: path.to_path_buf(),
            reason: format!("a CA certificate cannot be used: {e}"),
        })?;
    }
    Ok(roots)
}

/// The OS trust store, read once per process.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found (install ca-certificates, or give the \
                     pool's tls.ca); TLS upstreams without `ca` will fail verification"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

/// Always presents the configured client certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `insecure_skip_verify`: any certificate for any name. The handshake signature is
/// still checked, so the connection is at least with the holder of the key it shows.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls 0.23.48 lists P-384 before X25519; a client sends key shares for its
    /// first group (and X25519 along with a hybrid), so the order decides the cost.
    #[test]
    fn an_upstream_handshake_offers_the_hybrid_then_x25519() {
        let c = trusting_nothing();
        let names: Vec<_> = c
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            names[..2],
            [
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519
            ]
        );
    }
}
