//! A certificate chain and its private key, read from PEM files and checked.
//!
//! What is checked is what would otherwise fail at a client: the chain has at least
//! one certificate, the key is one the provider can sign with (RSA, ECDSA P-256 and
//! P-384, Ed25519; PKCS#8, PKCS#1 or SEC1), the key belongs to the first certificate,
//! and that certificate has not expired. The names a client may ask for come from the
//! certificate's subject alternative names (`DNS:` entries), as browsers use them.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use crate::TlsError;

/// Where a certificate chain and its key are (`{cert, key}` in the config).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    /// PEM: the certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key.
    pub key: PathBuf,
}

/// A loaded, checked certificate.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub files: CertificateFiles,
    /// The chain and the signing key, as rustls serves them.
    pub key: Arc<CertifiedKey>,
    /// `DNS:` names from the certificate's SANs, lowercase, in order (`*.` wildcards
    /// included as written).
    pub names: Vec<String>,
    /// The end of the certificate's validity (`notAfter`).
    pub not_after: SystemTime,
    /// A hash of both files' bytes: a reload that reads the same bytes changes nothing.
    pub(crate) digest: u64,
}

impl LoadedCert {
    /// Seconds from `now` until the certificate expires (negative once it has).
    pub fn expires_in(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    /// `notAfter` as an HTTP date (`Sat, 05 Dec 2026 08:00:00 GMT`).
    pub fn not_after_text(&self) -> String {
        httpdate::fmt_http_date(self.not_after)
    }
}

/// Reads and checks `files` as of `now`.
pub fn load(files: &CertificateFiles, now: SystemTime) -> Result<LoadedCert, TlsError> {
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let chain = chain(&files.cert, &cert_pem)?;
    let key = private_key(&files.key, &key_pem)?;
    let signing = crate::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Parse {
            path: files.key.clone(),
            reason: format!(
                "the private key cannot be used ({e}); RSA, ECDSA P-256/P-384 and Ed25519 \
                 keys are supported"
            ),
        })?;
    let (names, not_after) = leaf_facts(&files.cert, &chain[0])?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        // Every aws-lc-rs key type reports its public key; any other answer is a
        // certificate rustls cannot read.
        Err(e) => {
            return Err(TlsError::Parse {
                path: files.cert.clone(),
                reason: format!("cannot compare the certificate with its key: {e}"),
            })
        }
    }
    if not_after <= now {
        return Err(TlsError::Expired {
            path: files.cert.clone(),
            not_after: httpdate::fmt_http_date(not_after),
        });
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cert_pem.hash(&mut h);
    key_pem.hash(&mut h);
    Ok(LoadedCert {
        files: files.clone(),
        key: Arc::new(certified),
        names,
        not_after,
        digest: h.finish(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every `CERTIFICATE` block of a PEM file, in order.
pub(crate) fn chain(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Parse {
            path: path.to_path_buf(),
            reason: format!("not a readable PEM file: {}", pem_error(&e)),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Parse {
            path: path.to_path_buf(),
            reason: "no `-----BEGIN CERTIFICATE-----` block".into(),
        });
    }
    Ok(chain)
}

/// The first private key block of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Parse {
        path: path.to_path_buf(),
        reason: match e {
            pem::Error::NoItemsFound => "no private key block (`-----BEGIN PRIVATE KEY-----`, \
                 `RSA PRIVATE KEY` or `EC PRIVATE KEY`)"
                .into(),
            e => format!("not a readable PEM file: {}", pem_error(&e)),
        },
    })
}

fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(e) => e.to_string(),
        e => format!("{e:?}"),
    }
}

/// The end-entity certificate's DNS names and `notAfter`.
fn leaf_facts(
    path: &Path,
    der: &CertificateDer<'_>,
) -> Result<(Vec<String>, SystemTime), TlsError> {
    let bad = |reason: String| TlsError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("the first certificate is not valid X.509: {e}")))?;
    let mut names = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("unreadable subject alternative names: {e}")))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                let n = n.trim_end_matches('.').to_ascii_lowercase();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
    }
    let secs = cert.validity().not_after.timestamp();
    let not_after = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH
    };
    Ok((names, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Key};

    #[test]
    fn every_supported_key_type_loads_with_its_names_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        for (i, kind) in [Key::EcdsaP256, Key::EcdsaP384, Key::Ed25519, Key::Rsa]
            .into_iter()
            .enumerate()
        {
            let files = testing::self_signed(
                dir.path(),
                &format!("c{i}"),
                kind,
                &["Shop.Example", "*.example.org"],
            );
            let c = load(&files, SystemTime::now()).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(c.names, ["shop.example", "*.example.org"], "{kind:?}");
            let days = c.expires_in(SystemTime::now()) / 86_400.0;
            assert!((360.0..=366.0).contains(&days), "{kind:?}: {days}");
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
        let b = testing::self_signed(dir.path(), "b", Key::EcdsaP256, &["b.test"]);
        let crossed = CertificateFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = load(&crossed, SystemTime::now()).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("a.pem") && text.contains("b-key.pem"),
            "{text}"
        );
    }

    #[test]
    fn an_expired_certificate_is_rejected_with_its_date() {
        let dir = tempfile::tempdir().unwrap();
        let files = testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
        let later = SystemTime::now() + Duration::from_secs(400 * 86_400);
        let e = load(&files, later).unwrap_err();
        assert!(matches!(e, TlsError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired at"), "{e}");
    }

    #[test]
    fn broken_files_say_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let good = testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let cases = [
            (
                junk.clone(),
                good.key.clone(),
                "no `-----BEGIN CERTIFICATE-----` block",
            ),
            (good.cert.clone(), junk.clone(), "no private key block"),
            (missing.clone(), good.key.clone(), "cannot read"),
            (good.cert.clone(), good.cert.clone(), "no private key block"),
        ];
        for (cert, key, want) in cases {
            let e = load(&CertificateFiles { cert, key }, SystemTime::now()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should say {want}");
        }
        // A truncated certificate block.
        let text = std::fs::read_to_string(&good.cert).unwrap();
        std::fs::write(&junk, &text[..text.len() / 2]).unwrap();
        let e = load(
            &CertificateFiles {
                cert: junk,
                key: good.key,
            },
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("junk.pem"), "{e}");
    }
}
