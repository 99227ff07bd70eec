//! Which certificate a ClientHello gets.
//!
//! Names come from each certificate's SANs. An exact name wins over a wildcard; a
//! wildcard `*.example.com` covers exactly one more label (`a.example.com`, not
//! `example.com` nor `a.b.example.com`), as RFC 6125 and browsers have it. When two
//! certificates name the same host, the first listed wins. A client that sends no SNI,
//! or one that matches no certificate, gets the first certificate (the default),
//! unless `require_sni` is set: then a client without SNI is refused (rustls ends
//! the handshake with an alert).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use crate::pem::LoadedCert;

/// The certificates of one listener and the names they answer for.
#[derive(Debug)]
pub struct Certificates {
    certs: Vec<LoadedCert>,
    /// Lowercase name → index in `certs`.
    exact: HashMap<String, usize>,
    /// The part after `*.` → index in `certs`.
    wildcard: HashMap<String, usize>,
    require_sni: bool,
}

impl Certificates {
    /// `certs` in configured order: the first is the default.
    pub fn new(certs: Vec<LoadedCert>, require_sni: bool) -> Certificates {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (i, c) in certs.iter().enumerate() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(rest) => wildcard.entry(rest.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Certificates {
            certs,
            exact,
            wildcard,
            require_sni,
        }
    }

    /// The certificates, in configured order.
    pub fn certs(&self) -> &[LoadedCert] {
        &self.certs
    }

    /// The certificate for a client's SNI; `None` refuses the handshake.
    pub fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let i = match sni {
            None if self.require_sni => return None,
            None => 0,
            Some(name) => self.index(name).unwrap_or(0),
        };
        self.certs.get(i).map(|c| &c.key)
    }

    fn index(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.');
        // rustls hands over SNI as sent; DNS names are case-insensitive.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::testing::{self, Key};

    fn certs(sets: &[&[&str]], require_sni: bool) -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let loaded = sets
            .iter()
            .enumerate()
            .map(|(i, names)| {
                let f = testing::self_signed(dir.path(), &format!("c{i}"), Key::EcdsaP256, names);
                crate::pem::load(&f, SystemTime::now()).unwrap()
            })
            .collect();
        Certificates::new(loaded, require_sni)
    }

    /// Which certificate (by index) `sni` gets.
    fn which(c: &Certificates, sni: Option<&str>) -> Option<usize> {
        let key = c.pick(sni)?;
        c.certs.iter().position(|l| Arc::ptr_eq(&l.key, key))
    }

    #[test]
    fn exact_names_then_one_label_wildcards_then_the_default() {
        let c = certs(
            &[
                &["shop.example"],
                &["api.example", "*.api.example"],
                &["*.example"],
            ],
            false,
        );
        assert_eq!(which(&c, Some("shop.example")), Some(0));
        assert_eq!(which(&c, Some("API.Example.")), Some(1));
        assert_eq!(which(&c, Some("v2.api.example")), Some(1));
        assert_eq!(which(&c, Some("www.example")), Some(2));
        // A wildcard covers one label only; the rest falls back to the default.
        assert_eq!(which(&c, Some("a.b.shop.example")), Some(0));
        assert_eq!(which(&c, Some("example")), Some(0));
        assert_eq!(which(&c, Some("other.test")), Some(0));
        assert_eq!(which(&c, None), Some(0));
    }

    #[test]
    fn the_first_certificate_naming_a_host_wins() {
        let c = certs(&[&["a.test"], &["a.test", "b.test"]], false);
        assert_eq!(which(&c, Some("a.test")), Some(0));
        assert_eq!(which(&c, Some("b.test")), Some(1));
    }

    #[test]
    fn require_sni_refuses_only_clients_without_sni() {
        let c = certs(&[&["a.test"], &["b.test"]], true);
        assert_eq!(which(&c, None), None);
        assert_eq!(which(&c, Some("b.test")), Some(1));
        assert_eq!(which(&c, Some("unknown.test")), Some(0));
    }
}
