//! Validation of the TLS keys: `tls` and `admin_tls` (served certificates),
//! `http_redirect`, and a pool's `tls` (the client side).
//!
//! Files are checked here, not when the listener starts: a path that does not exist,
//! a certificate that does not parse, does not match its key or has expired is a
//! diagnostic at the key that names it, so `canary validate` and a reload reject it
//! before anything is served with it. Relative paths are taken from the config
//! file's directory, so a config and its `certs/` directory can move together.

use std::path::PathBuf;

use canary_tls::pem;
use serde_saphyr::Location;

use super::Checker;
use crate::model::{CertificateFiles, ServedCertificate, TlsConfig, UpstreamTls};
use crate::raw::{RawTls, RawUpstreamTls, S};

/// Default `handshake_timeout`.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

impl Checker {
    /// `tls` or `admin_tls` (`p`).
    pub(super) fn tls(&mut self, p: &str, raw: S<RawTls>) -> TlsConfig {
        let at = raw.referenced;
        let r = raw.value;
        let mut certificates = Vec::new();
        match r.certificates {
            None => self.err(
                at,
                format!(
                    "{p}: missing required key `certificates` (a list of {{cert, key}} PEM \
                     file pairs; the first is the default)"
                ),
            ),
            Some(list) if list.value.is_empty() => self.err(
                list.referenced,
                format!("{p}.certificates: the list is empty; give at least one {{cert, key}}"),
            ),
            Some(list) => {
                for (i, c) in list.value.into_iter().enumerate() {
                    let q = format!("{p}.certificates[{i}]");
                    let (cert, key) = (c.value.cert.as_ref(), c.value.key.as_ref());
                    let Some((files, at)) = self.cert_pair(&q, c.referenced, cert, key) else {
                        continue;
                    };
                    match pem::load(&files, self.now) {
                        Ok(loaded) if i > 0 && loaded.names.is_empty() => self.err(
                            at,
                            format!(
                                "{q}.cert: the certificate has no DNS names in its subject \
                                 alternative names, so no client can select it by SNI; only \
                                 the first certificate (the default) may have none"
                            ),
                        ),
                        Ok(loaded) => certificates.push(ServedCertificate {
                            files,
                            names: loaded.names,
                            not_after: loaded.not_after,
                        }),
                        Err(e) => self.err(at, format!("{q}: {e}")),
                    }
                }
            }
        }
        TlsConfig {
            certificates,
            require_sni: r.require_sni.is_some_and(|v| v.value),
            handshake_timeout_ms: self.duration_or(
                &format!("{p}.handshake_timeout"),
                r.handshake_timeout.as_ref(),
                DEFAULT_HANDSHAKE_TIMEOUT_MS,
                false,
            ),
        }
    }

    /// A pool's `tls` (`p` is its path).
    pub(super) fn upstream_tls(&mut self, p: &str, raw: S<RawUpstreamTls>) -> UpstreamTls {
        let at = raw.referenced;
        let r = raw.value;
        let ca = r.ca.as_ref().and_then(|v| {
            let path = self.file(&format!("{p}.ca"), v)?;
            if let Err(e) = canary_tls::client::ca_bundle(&path) {
                self.err(v.referenced, format!("{p}.ca: {e}"));
            }
            Some(path)
        });
        let server_name = r.server_name.as_ref().map(|v| {
            if let Err(why) = canary_tls::client::parse_server_name(&v.value) {
                self.err(v.referenced, format!("{p}.server_name: {why}"));
            }
            v.value.clone()
        });
        let client_cert = match (&r.cert, &r.key) {
            (None, None) => None,
            (cert, key) => {
                self.cert_pair(p, at, cert.as_ref(), key.as_ref())
                    .and_then(|(files, at)| match pem::load(&files, self.now) {
                        Ok(_) => Some(files),
                        Err(e) => {
                            self.err(at, format!("{p}: client certificate: {e}"));
                            None
                        }
                    })
            }
        };
        let insecure = r.insecure_skip_verify.as_ref().is_some_and(|v| v.value);
        if let (true, Some(v), Some(_)) = (insecure, &r.insecure_skip_verify, &r.ca) {
            self.err(
                v.referenced,
                format!(
                    "{p}.insecure_skip_verify: turns verification off, so `ca` would be \
                     ignored; remove one of the two"
                ),
            );
        }
        UpstreamTls {
            ca,
            server_name,
            client_cert,
            insecure_skip_verify: insecure,
        }
    }

    /// `cert` and `key` under `p` (both required), as existing files. Returns them
    /// with the location to report a problem with their content at.
    fn cert_pair(
        &mut self,
        p: &str,
        at: Location,
        cert: Option<&S<String>>,
        key: Option<&S<String>>,
    ) -> Option<(CertificateFiles, Location)> {
        for (name, v) in [("cert", cert), ("key", key)] {
            if v.is_none() {
                self.err(
                    at,
                    format!(
                        "{p}: missing required key `{name}` (`cert`: the PEM certificate \
                         chain, `key`: its PEM private key)"
                    ),
                );
            }
        }
        let (cert, key) = (cert?, key?);
        // Both checked before either `?`, so both missing files are reported.
        let cert_path = self.file(&format!("{p}.cert"), cert);
        let key_path = self.file(&format!("{p}.key"), key);
        Some((
            CertificateFiles {
                cert: cert_path?,
                key: key_path?,
            },
            cert.referenced,
        ))
    }

    /// A path to an existing file, relative to the config file's directory.
    fn file(&mut self, p: &str, v: &S<String>) -> Option<PathBuf> {
        if v.value.trim().is_empty() {
            self.err(
                v.referenced,
                format!("{p}: must not be empty (a file path)"),
            );
            return None;
        }
        let path = self.base.join(&v.value);
        let why = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => return Some(path),
            Ok(_) => "is not a file".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut why = "does not exist".to_string();
                if std::path::Path::new(&v.value).is_relative() {
                    why.push_str(" (relative paths are taken from the config file's directory)");
                }
                why
            }
            Err(e) => format!("cannot be read: {e}"),
        };
        self.err(
            v.referenced,
            format!("{p}: {:?} {why}", path.display().to_string()),
        );
        None
    }
}
