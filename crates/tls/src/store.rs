//! The certificates a listener serves, swapped atomically on reload.
//!
//! The store is the listener's rustls certificate resolver, so a handshake reads the
//! current [`Certificates`] with one atomic load and a swap reaches the next
//! handshake; connections already established keep the keys they were made with, so
//! nothing in flight is dropped. A reload re-reads every configured pair of files:
//! each pair that loads and passes the checks replaces its predecessor, and each that
//! does not is reported (file and reason) while its previous certificate keeps
//! serving. The set of files is fixed when the store is built (a change of the
//! `tls` config keys needs a restart, like the listen address).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pem::{self, CertificateFiles};
use crate::resolver::Certificates;
use crate::TlsError;

/// A listener's certificates (see the module docs).
#[derive(Debug)]
pub struct CertStore {
    /// What the store serves for, for logs and metrics (`proxy`, `admin`).
    listener: &'static str,
    require_sni: bool,
    current: ArcSwap<Certificates>,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Files whose new content is now served.
    pub replaced: Vec<CertificateFiles>,
    /// Files that failed; their previous certificate still serves.
    pub rejected: Vec<TlsError>,
}

impl CertStore {
    /// Loads every pair of `files` (in order; the first is the default certificate).
    /// Fails on the first pair that does not load: at start-up nothing serves yet.
    pub fn load(
        listener: &'static str,
        files: &[CertificateFiles],
        require_sni: bool,
    ) -> Result<CertStore, TlsError> {
        let now = SystemTime::now();
        let certs = files
            .iter()
            .map(|f| pem::load(f, now))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CertStore {
            listener,
            require_sni,
            current: ArcSwap::from_pointee(Certificates::new(certs, require_sni)),
        })
    }

    /// The listener this store serves (`proxy`, `admin`).
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// The certificates served now.
    pub fn current(&self) -> Arc<Certificates> {
        self.current.load_full()
    }

    /// Every file the store reads (the watcher watches them).
    pub fn files(&self) -> Vec<CertificateFiles> {
        self.current
            .load()
            .certs()
            .iter()
            .map(|c| c.files.clone())
            .collect()
    }

    /// Re-reads every pair of files as of `now`; see the module docs. Logs what it
    /// replaced and what it rejected.
    pub fn reload(&self, now: SystemTime) -> Reloaded {
        let old = self.current.load_full();
        let mut out = Reloaded::default();
        let mut certs = Vec::with_capacity(old.certs().len());
        for prev in old.certs() {
            match pem::load(&prev.files, now) {
                Ok(new) if new.digest == prev.digest => certs.push(prev.clone()),
                Ok(new) => {
                    tracing::info!(
                        listener = self.listener,
                        cert = %new.files.cert.display(),
                        names = %new.names.join(","),
                        not_after = %new.not_after_text(),
                        "certificate reloaded"
                    );
                    out.replaced.push(new.files.clone());
                    certs.push(new);
                }
                Err(e) => {
                    tracing::error!(
                        listener = self.listener,
                        "certificate rejected, the previous one keeps serving: {e}"
                    );
                    out.rejected.push(e);
                    certs.push(prev.clone());
                }
            }
        }
        if !out.replaced.is_empty() {
            self.current
                .store(Arc::new(Certificates::new(certs, self.require_sni)));
        }
        out
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let key = self.current.load().pick(sni).cloned();
        if key.is_none() {
            tracing::debug!(
                listener = self.listener,
                "TLS client without SNI refused (tls.require_sni)"
            );
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Key};

    fn serial(store: &CertStore) -> Vec<u8> {
        store.current().certs()[0].key.cert[0].to_vec()
    }

    #[test]
    fn a_reload_takes_good_files_and_keeps_the_old_certificate_for_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
        let b = testing::self_signed(dir.path(), "b", Key::EcdsaP256, &["b.test"]);
        let store = CertStore::load("proxy", &[a.clone(), b.clone()], false).unwrap();
        let (a0, b0) = (
            serial(&store),
            store.current().certs()[1].key.cert[0].to_vec(),
        );

        // Unchanged files: nothing replaced, nothing swapped.
        let before = store.current();
        let r = store.reload(SystemTime::now());
        assert!(r.replaced.is_empty() && r.rejected.is_empty());
        assert!(Arc::ptr_eq(&before, &store.current()));

        // a gets a new certificate; b's key is overwritten with another key.
        let dir2 = tempfile::tempdir().unwrap();
        let a2 = testing::self_signed(dir2.path(), "a", Key::EcdsaP384, &["a.test"]);
        std::fs::copy(&a2.cert, &a.cert).unwrap();
        std::fs::copy(&a2.key, &a.key).unwrap();
        let other = testing::self_signed(dir2.path(), "o", Key::EcdsaP256, &["o.test"]);
        std::fs::copy(&other.key, &b.key).unwrap();
        let r = store.reload(SystemTime::now());
        assert_eq!(r.replaced, std::slice::from_ref(&a));
        assert_eq!(r.rejected.len(), 1);
        assert!(matches!(r.rejected[0], TlsError::Mismatch { .. }));
        assert_ne!(serial(&store), a0);
        assert_eq!(store.current().certs()[1].key.cert[0].to_vec(), b0);
    }

    #[test]
    fn the_first_pair_that_fails_at_start_up_is_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
        let gone = CertificateFiles {
            cert: dir.path().join("nope.pem"),
            key: a.key.clone(),
        };
        let e = CertStore::load("proxy", &[a, gone], false).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }
}
