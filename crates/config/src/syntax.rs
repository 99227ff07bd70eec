//! What well-formed names, hosts, upstreams and networks look like.
//!
//! Plain predicates and parsers over strings, kept apart from `validate` so the
//! grammar of each value is in one place and tested on its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use canary_core::routing::HostMatch;
use ipnet::IpNet;

/// Route names appear in URLs and metric labels: `[A-Za-z0-9_.-]+`.
pub(crate) fn is_route_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Version labels are sent in a header and a metric label: `[A-Za-z0-9_.+-]+`.
pub(crate) fn is_version(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-'))
}

/// An RFC 9110 token: valid as an HTTP header name and as a cookie name.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A POSIX-style environment variable name.
pub(crate) fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A DNS host name: dot-separated labels of letters, digits, '-' and '_' (seen in the
/// wild), each 1–63 characters not starting or ending with '-'.
pub(crate) fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A `hosts` entry: `shop.example.com`, `*.example.com`, an IPv4 address or an
/// IPv6 address (with or without brackets). Returns why it is invalid otherwise.
pub(crate) fn host_pattern(s: &str) -> Result<HostMatch, &'static str> {
    const WHY: &str = "is not a host pattern (a host name like shop.example.com, a \
                       wildcard like *.example.com, or an IP address; no port or scheme)";
    if s == "*" {
        return Err("matches every host; omit `hosts` (or leave it empty) to match any host");
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        // The proxy compares the Host header without brackets.
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| HostMatch::parse(inner))
            .map_err(|_| WHY);
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Ok(HostMatch::parse(s));
    }
    let name = s.strip_prefix("*.").unwrap_or(s);
    if is_dns_name(name) {
        Ok(HostMatch::parse(s))
    } else {
        Err(WHY)
    }
}

/// An upstream `host:port`; returns why it is invalid otherwise.
pub(crate) fn upstream(s: &str) -> Result<(), &'static str> {
    if s.contains("://") {
        return Err("must be host:port without a scheme (e.g. 127.0.0.1:9001)");
    }
    let (host_ok, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((ip, port)) => (ip.parse::<Ipv6Addr>().is_ok(), port),
            None => return Err("is not host:port (an IPv6 upstream is written [::1]:9001)"),
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err("is not host:port (an IPv6 upstream is written [::1]:9001)")
            }
            Some((host, port)) => {
                let ok = host.parse::<Ipv4Addr>().is_ok()
                    || (is_dns_name(host)
                        // A name whose last label is all digits is a mistyped IPv4 address.
                        && !host
                            .trim_end_matches('.')
                            .rsplit('.')
                            .next()
                            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())));
                (ok, port)
            }
            None => return Err("has no port (write host:port, e.g. 127.0.0.1:9001)"),
        }
    };
    if !host_ok {
        return Err("has an invalid host (an IPv4 address, [IPv6] address or DNS name)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err("has an invalid port (1–65535)"),
    }
}

/// A CIDR network, or a single address as a /32 or /128. Host bits are cleared
/// (`10.1.2.3/8` means `10.0.0.0/8`).
pub(crate) fn network(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        for ok in [
            "127.0.0.1:9001",
            "[::1]:9001",
            "api.internal:80",
            "localhost:8080",
            "svc-1.ns.svc.cluster.local.:443",
        ] {
            assert_eq!(upstream(ok), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "::1:9001",
            "[::1]9001",
            "[::zz]:80",
            "http://a:80",
            "999.1.1.1:80",
            "-a.b:80",
            ":80",
            "a b:80",
        ] {
            assert!(upstream(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            host_pattern("*.Example.org"),
            Ok(HostMatch::Suffix(".example.org".into()))
        );
        assert_eq!(host_pattern("[::1]"), Ok(HostMatch::Exact("::1".into())));
        assert_eq!(
            host_pattern("10.0.0.1"),
            Ok(HostMatch::Exact("10.0.0.1".into()))
        );
        for bad in [
            "*",
            "",
            "a..b",
            "shop.example.com:80",
            "*example.com",
            "a.*.b",
        ] {
            assert!(host_pattern(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(network("10.1.2.3/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            network("192.168.1.7"),
            Some("192.168.1.7/32".parse().unwrap())
        );
        assert_eq!(network("::1"), Some("::1/128".parse().unwrap()));
        assert_eq!(network("10.0.0.0/33"), None);
        assert_eq!(network("example.com"), None);
    }

    #[test]
    fn names_and_tokens() {
        assert!(is_route_name("web-1.eu_west"));
        assert!(!is_route_name("web/1"));
        assert!(!is_route_name(""));
        assert!(is_version("1.2.3+build-7"));
        assert!(!is_version("v 2"));
        assert!(is_token("X-User-Id"));
        assert!(!is_token("x user"));
        assert!(!is_token("x:y"));
        assert!(is_env_name("CANARY_ADMIN_TOKEN"));
        assert!(!is_env_name("1TOKEN"));
        assert!(!is_env_name("s3cr3t-token"));
    }
}
