//! The proxy's header policy, in one place: the fields it sets on requests
//! (`X-Forwarded-*`, `X-Canary-*`) and answers (`X-Canary-Version`, a generated sticky
//! cookie), those it never passes on (hop-by-hop ones, a client's copies of its own),
//! and the sticky ids it generates.
//!
//! The wire code (`canary_http1`) leaves out what RFC 9112 has it leave out;
//! what the proxy adds or drops besides reaches it as [`ProxyFields`] (a
//! `Filter`) and as the lines it is given to write.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use canary_config::{Limits, Underscores};
use canary_core::sticky_id::IdSource;
use canary_http1::client::Filter;
use canary_http1::fields::{
    forbidden_in_trailers, hop_by_hop, is_name, te_lists_trailers, write_field,
};
use http_body::Frame;

pub(crate) static X_CANARY_VERSION: HeaderName = HeaderName::from_static("x-canary-version");
pub(crate) static X_CANARY_ROUTE: HeaderName = HeaderName::from_static("x-canary-route");
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fields the proxy sets on every upstream request (`forward::Added`): a client's
/// own are never passed on, `X-Forwarded-Host` even when the proxy sets none. The
/// HTTP/1.1 read path drops them by [`ProxyFields`], its own fast switch on the name's
/// length; a test keeps the two in step.
pub(crate) static PROXY_REQUEST_FIELDS: [&HeaderName; 5] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_HOST,
    &X_FORWARDED_PROTO,
    &X_CANARY_VERSION,
    &X_CANARY_ROUTE,
];

pub(crate) static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
/// `X-Forwarded-Proto` of a request that came over TLS.
pub(crate) static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// What the proxy leaves out of the messages the HTTP/1.1 exchange passes on: a
/// client's own copies of the fields the proxy sets on every request
/// ([`PROXY_REQUEST_FIELDS`]), request fields named with `_` under
/// `limits.headers_with_underscores: drop`, and an upstream's `X-Canary-Version`, which
/// the proxy sets on every answer. A switch on the name's length, as every field of
/// every request passes through it; a test keeps it in step with
/// [`PROXY_REQUEST_FIELDS`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyFields {
    drop_underscores: bool,
}

impl ProxyFields {
    /// The filter for a snapshot's `limits`.
    pub(crate) fn of(limits: &Limits) -> &'static ProxyFields {
        static DROP: ProxyFields = ProxyFields {
            drop_underscores: true,
        };
        static KEEP: ProxyFields = ProxyFields {
            drop_underscores: false,
        };
        match limits.headers_with_underscores {
            Underscores::Drop => &DROP,
            // `Reject` answers before forwarding; `Allow` passes them.
            Underscores::Reject | Underscores::Allow => &KEEP,
        }
    }

    /// Whether fields named with `_` are left out.
    pub(crate) fn drops_underscores(&self) -> bool {
        self.drop_underscores
    }
}

impl Filter for ProxyFields {
    #[inline]
    fn drop_request_field(&self, name: &[u8]) -> bool {
        let is = |n: &str| is_name(name, n);
        let ours = match name.len() {
            14 => is("x-canary-route"),
            15 => is("x-forwarded-for"),
            16 => is("x-canary-version") || is("x-forwarded-host"),
            17 => is("x-forwarded-proto"),
            _ => false,
        };
        ours || self.drop_underscores && has_underscore(name)
    }

    #[inline]
    fn drop_response_field(&self, name: &[u8]) -> bool {
        name.len() == 16 && is_name(name, "x-canary-version")
    }
}

/// A field the proxy adds to an answer.
#[derive(Clone, Debug)]
pub enum AddedField {
    /// A name and a whole value (`X-Canary-Version`).
    Value(&'static HeaderName, HeaderValue),
    /// `Set-Cookie` with a sticky id the proxy generated: `prefix` (`name=`, checked
    /// when the route was built), the id (hex digits), then [`STICKY_COOKIE_ATTRIBUTES`].
    /// Written in pieces; making it a `HeaderValue` first cost an allocation and a
    /// check of every byte per new visitor.
    /// `secure`: the request came over TLS, so the cookie gets `Secure` (a browser
    /// then never sends it over cleartext).
    StickyCookie {
        prefix: Bytes,
        id: [u8; 32],
        secure: bool,
    },
}

/// The attributes of a generated sticky cookie (docs/routing.md).
pub const STICKY_COOKIE_ATTRIBUTES: &str = canary_core::sticky_id::COOKIE_ATTRIBUTES;
/// Appended to [`STICKY_COOKIE_ATTRIBUTES`] on a request that came over HTTPS.
pub const SECURE_ATTRIBUTE: &str = "; Secure";

impl AddedField {
    /// The field's name.
    pub fn name(&self) -> &'static HeaderName {
        match self {
            AddedField::Value(name, _) => name,
            AddedField::StickyCookie { .. } => &header::SET_COOKIE,
        }
    }

    /// The field's value (for a map).
    pub fn value(&self) -> HeaderValue {
        match self {
            AddedField::Value(_, v) => v.clone(),
            AddedField::StickyCookie { prefix, id, secure } => {
                // Exactly as long as the value: `Bytes` takes a full `Vec` as it is,
                // and any other in a second allocation.
                let len = prefix.len()
                    + id.len()
                    + STICKY_COOKIE_ATTRIBUTES.len()
                    + if *secure { SECURE_ATTRIBUTE.len() } else { 0 };
                let mut v = Vec::with_capacity(len);
                write_cookie(&mut v, prefix, id, *secure);
                debug_assert_eq!(v.len(), v.capacity());
                HeaderValue::from_maybe_shared(Bytes::from(v))
                    .expect("a checked cookie name, hex digits and fixed attributes")
            }
        }
    }

    /// Writes the field line.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            AddedField::Value(name, v) => write_field(out, name.as_str().as_bytes(), v.as_bytes()),
            AddedField::StickyCookie { prefix, id, secure } => {
                out.extend_from_slice(b"set-cookie: ");
                write_cookie(out, prefix, id, *secure);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Whether a field name holds `_` (see `limits.headers_with_underscores`).
#[inline]
pub(crate) fn has_underscore(name: &[u8]) -> bool {
    name.contains(&b'_')
}

/// Removes the fields named with `_` from a request's map.
pub(crate) fn drop_underscored(h: &mut HeaderMap) {
    if !h.keys().any(|k| has_underscore(k.as_str().as_bytes())) {
        return;
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| has_underscore(k.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in names {
        h.remove(name);
    }
}

/// The `Upgrade` protocols passed on to an upstream (with `Connection: upgrade`); any
/// other (`h2c` above all: an upstream's `101` would open a raw HTTP/2 tunnel past
/// routing, rules, counters and `X-Forwarded-*`) is stripped and the request served as
/// plain HTTP/1.1, as Envoy does.
const UPGRADE_PROTOCOLS: [&str; 1] = ["websocket"];

/// Whether every protocol an `Upgrade` value lists is one the proxy passes on.
pub(crate) fn upgrade_allowed(value: &[u8]) -> bool {
    let mut any = false;
    for token in value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
        // `name/version`: the name decides.
        let name = token.split(|&c| c == b'/').next().unwrap_or(b"");
        if !UPGRADE_PROTOCOLS.iter().any(|p| is_name(name, p)) {
            return false;
        }
        any = true;
    }
    any
}

/// Whether `name` starts with `prefix` (lowercase) in any letter case.
fn has_prefix(name: &[u8], prefix: &str) -> bool {
    name.len() >= prefix.len() && is_name(&name[..prefix.len()], prefix)
}

/// Whether a trailer field is dropped on its way through the proxy, either way: what
/// RFC 9110 §6.5.1 forbids in trailers ([`forbidden_in_trailers`]), the fields the
/// proxy sets itself, `Forwarded`, and names with `_`.
pub(crate) fn dropped_trailer(name: &[u8]) -> bool {
    forbidden_in_trailers(name)
        || has_underscore(name)
        || is_name(name, "forwarded")
        || has_prefix(name, "x-canary-")
        || has_prefix(name, "x-forwarded-")
}

/// Drops the trailer fields [`dropped_trailer`] names from a trailers frame.
#[inline]
pub(crate) fn filter_trailers<E>(frame: &mut Option<Result<Frame<Bytes>, E>>) {
    let Some(Ok(f)) = frame else {
        return;
    };
    let Some(t) = f.trailers_mut() else {
        return;
    };
    if t.keys().any(|k| dropped_trailer(k.as_str().as_bytes())) {
        let names: Vec<HeaderName> = t
            .keys()
            .filter(|k| dropped_trailer(k.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in names {
            t.remove(name);
        }
    }
}

/// A generated sticky cookie's value: `name=`, the id, the attributes.
fn write_cookie(out: &mut Vec<u8>, prefix: &[u8], id: &[u8; 32], secure: bool) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(id);
    out.extend_from_slice(STICKY_COOKIE_ATTRIBUTES.as_bytes());
    if secure {
        out.extend_from_slice(SECURE_ATTRIBUTE.as_bytes());
    }
}

/// A fresh sticky id (see [`IdSource`]), from one source per process seeded from
/// std's `RandomState`.
pub(crate) fn generate_id() -> [u8; 32] {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    static IDS: OnceLock<IdSource> = OnceLock::new();
    IDS.get_or_init(|| {
        IdSource::new(std::hash::RandomState::new().hash_one(0x9e37_79b9_7f4a_7c15u64))
    })
    .next_id()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `keep_upgrade` keeps `Upgrade` (and `Connection: upgrade`) for a WebSocket
/// handshake; the other headers `Connection` names are removed even then.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the (few) names first: most messages carry no hop-by-hop header
    // but `Connection`, and each `remove` below hashes its name.
    let mut connection = false;
    let mut other = false;
    for name in h.keys() {
        if *name == header::CONNECTION {
            connection = true;
        } else if hop_by_hop(name.as_str().as_bytes()) {
            other = true;
        }
    }
    if connection {
        // Names listed in `Connection` besides the usual tokens are rare: collect them
        // only when present. `keep-alive`, `upgrade` and `te` are dealt with below
        // (`Upgrade` survives a handshake; `TE: trailers` always may pass), and a
        // header literally named `close` does not exist in practice.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if ["keep-alive", "close", "upgrade", "te"]
                .iter()
                .any(|t| token.eq_ignore_ascii_case(t))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(n);
            }
        }
        for n in named {
            h.remove(n);
        }
        if keep_upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            h.remove(header::CONNECTION);
        }
    }
    if !other {
        return;
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    h.remove("http2-settings");
    h.remove(header::PROXY_AUTHORIZATION);
    h.remove(header::TRANSFER_ENCODING);
    // `Trailer` is end to end (RFC 9110 §6.6.2), and hyper's HTTP/1.1 encoder sends
    // only the trailer fields it declares: removing it would drop every trailer.

    // Of TE only "trailers" may pass (gRPC needs it; HTTP/2 allows nothing else),
    // whatever the list or the number of lines it came in.
    if h.contains_key(header::TE) {
        let trailers = h
            .get_all(header::TE)
            .iter()
            .any(|v| te_lists_trailers(v.as_bytes()));
        h.remove(header::TE);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_distinct() {
        let a = generate_id();
        let b = generate_id();
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let cookie = AddedField::StickyCookie {
            prefix: Bytes::from_static(b"canary_id="),
            id: a,
            secure: false,
        };
        let want = format!(
            "canary_id={}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax",
            std::str::from_utf8(&a).unwrap()
        );
        assert_eq!(cookie.value().to_str().unwrap(), want);
        let mut line = Vec::new();
        cookie.write(&mut line);
        assert_eq!(line, format!("set-cookie: {want}\r\n").into_bytes());
        // Over HTTPS the same cookie is `Secure`, in the map and on the line.
        let secure = AddedField::StickyCookie {
            prefix: Bytes::from_static(b"canary_id="),
            id: a,
            secure: true,
        };
        assert_eq!(secure.value().to_str().unwrap(), format!("{want}; Secure"));
        let mut line = Vec::new();
        secure.write(&mut line);
        assert_eq!(line, format!("set-cookie: {want}; Secure\r\n").into_bytes());
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private, close"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);

        let mut h = map(&[("connection", "keep-alive"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);

        let mut h = map(&[("te", "trailers"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn upgrade_handshake_keeps_connection_and_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("connection") && h.contains_key("upgrade"));
        assert!(!h.contains_key("keep-alive"));
    }
}
