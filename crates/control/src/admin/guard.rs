//! What a web browser may do with the admin listener: the `Host` allow-list (against
//! DNS rebinding) and the refusal of cross-site mutations (against a page on another
//! origin posting a CORS "simple request", which needs no preflight).
//!
//! It is a middleware of its own, in front of every route of the admin router, so that
//! no handler (the API, `/metrics`, the dashboard, a 404) can be reached without it, and
//! so the rules live in one place with their tests.
//!
//! The rules (docs/admin-api.md, "Browsers: Host and Origin"):
//! 1. Every request is answered only when its `Host` names `localhost`, a
//!    `*.localhost` name, a literal IP address, the host of the `admin` address, or a
//!    name in `dashboard.allowed_hosts`; otherwise `421 Misdirected Request`. Literal
//!    IPs stay allowed because rebinding needs a name the attacker controls. Only the
//!    name is compared, not the port.
//! 2. A request that may change something (any method but GET, HEAD and OPTIONS) is
//!    refused with `403` when its `Origin` is not the listener's own origin or when its
//!    `Sec-Fetch-Site` is `cross-site` or `same-site`, whatever the token says. The CLI,
//!    curl and Prometheus send neither header, so they are not affected.
//! 3. No CORS header is ever sent (nothing here adds one), so cross-origin reads stay
//!    blocked by the browser.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The names the admin listener answers to, besides `localhost`, `*.localhost` and IP
/// addresses.
///
/// The host of the `admin` address is always an IP address (the config takes `IP:port`
/// only), so the literal-IP rule covers it.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    /// `dashboard.allowed_hosts`: lower case, no port, no trailing dot.
    names: Vec<String>,
}

impl HostPolicy {
    /// The policy with the extra `allowed_hosts`.
    pub fn new(allowed_hosts: &[String]) -> Self {
        HostPolicy {
            names: allowed_hosts
                .iter()
                .map(|h| normalize(h).to_string())
                .collect(),
        }
    }

    /// Whether a `Host` name (without port) may be answered.
    pub fn allows(&self, name: &str) -> bool {
        let name = normalize(name).to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if literal_ip(&name).is_some() {
            return true;
        }
        self.listed(&name)
    }

    /// Whether `name` is one of the configured `allowed_hosts` (an origin on such a name,
    /// e.g. a TLS reverse proxy in front, counts as the listener's own).
    fn listed(&self, name: &str) -> bool {
        let name = normalize(name);
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// A host name compared without its trailing dot (`localhost.` is `localhost`).
fn normalize(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

/// An IPv4 address, or an IPv6 address in brackets, as a `Host` carries them.
fn literal_ip(name: &str) -> Option<IpAddr> {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6),
        None => name.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into the name and the port text.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let (name, rest) = authority.split_at(end + 1);
                (name, rest.strip_prefix(':'))
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (authority, None),
    }
}

/// A refusal: the status and the message sent as `{"error": ...}` like every other
/// admin API error.
type Refusal = (StatusCode, String);

fn refuse(status: StatusCode, msg: String) -> Refusal {
    (status, msg)
}

/// The message of the 421, naming the host and the setting.
pub fn host_refusal(name: &str) -> String {
    format!(
        "host not allowed: {name}; the admin listener answers only to localhost, IP \
         addresses and the names in dashboard.allowed_hosts: add it to \
         dashboard.allowed_hosts if you reach canary by this name (a CLI or scraper using \
         a DNS name needs it too)"
    )
}

/// The middleware: `axum::middleware::from_fn_with_state(policy, guard)`.
pub async fn guard(State(policy): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    if let Err((status, msg)) = check(&policy, req.method(), req.version(), req.headers()) {
        return (status, Json(json!({ "error": msg }))).into_response();
    }
    next.run(req).await
}

/// Rules 1 and 2 for one request's method, version and header fields.
fn check(
    policy: &HostPolicy,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => Some(h.to_str().map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "the Host header is not valid text".into(),
            )
        })?),
        (Some(_), Some(_)) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "more than one Host header".into(),
            ))
        }
        (None, _) => None,
    };
    let Some(host) = host else {
        // HTTP/1.1 requires Host (RFC 9112 §3.2: answer 400). A browser always sends
        // it, so an HTTP/1.0 client without it cannot be a rebound page.
        return if version == Version::HTTP_10 {
            Ok(())
        } else {
            Err(refuse(
                StatusCode::BAD_REQUEST,
                "missing Host header".into(),
            ))
        };
    };
    let (name, _port) = split_host_port(host.trim());
    if !policy.allows(name) {
        return Err(refuse(StatusCode::MISDIRECTED_REQUEST, host_refusal(name)));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let cross = "cross-origin request refused: the admin API takes changes only from \
                 its own origin (the dashboard), the CLI or curl";
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("").trim();
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("{cross} (Sec-Fetch-Site: {site})"),
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !same_origin(policy, origin, host.trim()) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("{cross} (Origin: {origin})"),
            ));
        }
    }
    Ok(())
}

/// Whether `origin` is the listener's own: `http://` + the request's `Host` exactly, or
/// `http(s)://` a name from `allowed_hosts` (a reverse proxy in front, which may speak
/// TLS and rewrite `Host`). `null` and anything unparsable are not.
fn same_origin(policy: &HostPolicy, origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if authority.contains('/') {
        return false;
    }
    let scheme = scheme.to_ascii_lowercase();
    if scheme == "http" && authority.eq_ignore_ascii_case(host) {
        return true;
    }
    let (name, _) = split_host_port(authority);
    (scheme == "http" || scheme == "https") && policy.listed(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn policy(names: &[&str]) -> Arc<HostPolicy> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Arc::new(HostPolicy::new(&names))
    }

    /// A router with a read, a mutation and a fallback behind the guard.
    fn app(p: Arc<HostPolicy>) -> Router {
        Router::new()
            .route("/read", get(|| async { "read" }))
            .route("/write", post(|| async { "written" }))
            .fallback(|| async { (StatusCode::NOT_FOUND, "nothing") })
            .layer(axum::middleware::from_fn_with_state(p, guard))
    }

    async fn send(
        r: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String, HeaderMap) {
        let mut b = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = r
            .clone()
            .oneshot(b.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), headers)
    }

    #[tokio::test]
    async fn loopback_names_and_ip_literals_are_answered() {
        let r = app(policy(&[]));
        for host in [
            "localhost",
            "localhost:9901",
            "LOCALHOST:9901",
            "localhost.",
            "canary.localhost:9901",
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.1.2.3:80",
            "[::1]:9901",
            "[::1]",
            "[fe80::1]:9901",
        ] {
            let (status, body, _) = send(&r, "GET", "/read", &[("host", host)]).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "read"), "{host}");
        }
    }

    #[tokio::test]
    async fn a_foreign_host_name_is_a_421_naming_the_host_and_the_setting() {
        let r = app(policy(&[]));
        for (host, named) in [
            ("rebind.example:9901", "rebind.example"),
            ("rebind.example", "rebind.example"),
            ("localhost.evil.example", "localhost.evil.example"),
            ("127.0.0.1.nip.io:9901", "127.0.0.1.nip.io"),
            ("evil-localhost", "evil-localhost"),
            ("", ""),
        ] {
            for (method, path) in [("GET", "/read"), ("POST", "/write"), ("GET", "/nope")] {
                let (status, body, _) = send(&r, method, path, &[("host", host)]).await;
                assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{host} {path}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                let msg = v["error"].as_str().expect("error text");
                assert!(
                    msg.starts_with(&format!("host not allowed: {named};")),
                    "{msg}"
                );
                assert!(msg.contains("dashboard.allowed_hosts"), "{msg}");
            }
        }
    }

    #[tokio::test]
    async fn a_listed_name_is_answered_in_any_case_and_port() {
        let r = app(policy(&["canary.example.com"]));
        for host in [
            "canary.example.com",
            "Canary.Example.Com:443",
            "canary.example.com.",
        ] {
            let (status, _, _) = send(&r, "GET", "/read", &[("host", host)]).await;
            assert_eq!(status, StatusCode::OK, "{host}");
        }
        let (status, _, _) = send(&r, "GET", "/read", &[("host", "other.example.com")]).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    }

    #[tokio::test]
    async fn a_missing_host_is_a_400_on_http_1_1_and_answered_on_http_1_0() {
        let r = app(policy(&[]));
        let (status, _, _) = send(&r, "GET", "/read", &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let req = axum::http::Request::builder()
            .uri("/read")
            .version(Version::HTTP_10)
            .body(Body::empty())
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let (status, _, _) = send(
            &r,
            "GET",
            "/read",
            &[("host", "localhost"), ("host", "evil.example")],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_cross_site_mutation_is_a_403_and_a_cross_site_read_is_not() {
        let r = app(policy(&[]));
        let host = ("host", "127.0.0.1:9901");
        for h in [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
            ("origin", "http://evil.example:18000"),
            ("origin", "http://127.0.0.1:8000"),
            ("origin", "https://127.0.0.1:9901"),
            ("origin", "http://localhost:9901"),
            ("origin", "null"),
            ("origin", "http://127.0.0.1:9901/path"),
        ] {
            for method in ["POST", "PUT", "DELETE", "PATCH"] {
                let (status, body, _) = send(&r, method, "/write", &[host, h]).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {h:?}: {body}");
                assert!(body.contains("cross-origin request refused"), "{body}");
            }
            // Reads are not refused: the browser keeps their answer from the page
            // (no CORS header is sent).
            let (status, _, _) = send(&r, "GET", "/read", &[host, h]).await;
            assert_eq!(status, StatusCode::OK, "{h:?}");
        }
    }

    #[tokio::test]
    async fn own_origin_and_header_less_clients_may_mutate() {
        let r = app(policy(&["canary.example.com"]));
        for headers in [
            // The CLI, curl: neither Origin nor Sec-Fetch-*.
            vec![("host", "127.0.0.1:9901")],
            vec![("host", "localhost:9901")],
            // The dashboard itself.
            vec![
                ("host", "127.0.0.1:9901"),
                ("origin", "http://127.0.0.1:9901"),
                ("sec-fetch-site", "same-origin"),
            ],
            vec![("host", "127.0.0.1:9901"), ("sec-fetch-site", "none")],
            // Behind a TLS reverse proxy that rewrites Host.
            vec![
                ("host", "127.0.0.1:9901"),
                ("origin", "https://canary.example.com"),
            ],
            vec![
                ("host", "canary.example.com"),
                ("origin", "http://canary.example.com"),
            ],
        ] {
            let (status, body, _) = send(&r, "POST", "/write", &headers).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::OK, "written"),
                "{headers:?}"
            );
        }
    }

    #[tokio::test]
    async fn no_cors_header_is_ever_sent() {
        let r = app(policy(&[]));
        for (method, path, extra) in [
            ("GET", "/read", ("origin", "http://evil.example")),
            ("OPTIONS", "/write", ("origin", "http://evil.example")),
            ("POST", "/write", ("origin", "http://evil.example")),
            ("GET", "/read", ("host", "evil.example")),
        ] {
            let (_, _, headers) = send(&r, method, path, &[("host", "127.0.0.1"), extra]).await;
            for (name, _) in &headers {
                assert!(
                    !name.as_str().starts_with("access-control-"),
                    "{method} {path}: {name}"
                );
            }
        }
    }
}
