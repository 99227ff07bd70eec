//! TLS for `canary`: certificates from PEM files, chosen by SNI, swapped while serving,
//! and the client side of TLS to upstreams.
//!
//! A crate of its own because it is a dependency boundary: it knows rustls and X.509,
//! and nothing of HTTP, routes or the config file (the config crate uses it to check
//! certificate files at validate time; the proxy and the admin listener use it to
//! terminate TLS; the proxy's pools use it to connect).
//!
//! One crypto provider, aws-lc-rs ([`provider`]); `docs/tls.md` has the measurements
//! behind the choice.
//!
//! # Layout
//!
//! - [`pem`]: a certificate chain and its key from PEM files, checked (key matches,
//!   not expired), with the names from its SANs and its expiry.
//! - [`resolver`]: the certificate for a ClientHello's SNI (exact names, `*.`
//!   wildcards, the first certificate as the default).
//! - [`store`]: the certificates in use, swapped atomically on reload; a file that
//!   fails keeps its previous certificate serving.
//! - [`watch`]: reloads a store when its files change (same symlink rules as the
//!   config file) or on SIGHUP.
//! - [`server`]: the listener's `ServerConfig` (ALPN, TLS 1.2/1.3, session tickets).
//! - [`client`]: an upstream pool's `ClientConfig` (roots, CA bundle, client
//!   certificate, `insecure_skip_verify`).
//! - `testing` (feature `testing`, for tests of this and other crates): test
//!   certificates of every supported key type, self-signed or from a test CA.

#![forbid(unsafe_code)]

pub mod client;
pub mod pem;
pub mod resolver;
pub mod server;
pub mod store;
pub mod watch;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use client::{client_config, ClientSettings};
pub use pem::{CertificateFiles, LoadedCert};
pub use server::{server_config, ALPN_H2, ALPN_HTTP1};
pub use store::CertStore;

/// Why a certificate, key or TLS setting cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not PEM, no block of the kind needed, or a block that does not parse.
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{cert}: the certificate does not match the private key in {key}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the certificate expired at {not_after}")]
    Expired { path: PathBuf, not_after: String },
    /// rustls refused a configuration built from files that did load.
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

/// Key exchange groups, in order of preference (a client sends a key share for the
/// first, and for X25519 along with a hybrid). The post-quantum hybrid first, as
/// current browsers and OpenSSL 3.5 offer it; then the classical groups, X25519 before
/// the NIST curves (rustls 0.23.48 lists P-384 before X25519).
const KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
    rustls::crypto::aws_lc_rs::kx_group::X25519,
    rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
    rustls::crypto::aws_lc_rs::kx_group::SECP384R1,
];

/// The crypto provider every TLS config here is built with (aws-lc-rs; see
/// `docs/tls.md`).
/// Passed explicitly rather than installed as the process default, so nothing depends
/// on which crate happened to install one first.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.kx_groups = KX_GROUPS.to_vec();
            Arc::new(p)
        })
        .clone()
}

#[cfg(feature = "testing")]
pub mod testing;
