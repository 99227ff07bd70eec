//! TLS end to end: the real binary with certificates made by the test (a test CA and
//! its leaves, via `canary_tls::testing`), reached by rustls clients that choose SNI
//! and ALPN and look at the certificate served.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use canary_tls::testing::TestCa;
use canary_tls::{CertStore, CertificateFiles, ALPN_H2, ALPN_HTTP1};
use common::tls::{self, Sender, Trust};
use common::{addrs, free_port, metric_value, run_canary, Canary, Upstream};

/// Certificates for the proxy listener: `shop.test` (the first, the default) and
/// `api.test` + `*.api.test`, both from one test CA.
struct Certs {
    /// Holds the files.
    _dir: tempfile::TempDir,
    ca: TestCa,
    shop: CertificateFiles,
    api: CertificateFiles,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "ca");
        let shop = ca.issue(dir.path(), "shop", &["shop.test"]);
        let api = ca.issue(dir.path(), "api", &["api.test", "*.api.test"]);
        Certs {
            _dir: dir,
            ca,
            shop,
            api,
        }
    }

    /// The `tls:` block serving both.
    fn tls_block(&self) -> String {
        format!(
            "tls:\n  certificates:\n    - {{cert: {}, key: {}}}\n    - {{cert: {}, key: {}}}\n",
            self.shop.cert.display(),
            self.shop.key.display(),
            self.api.cert.display(),
            self.api.key.display()
        )
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        tls::config(Trust::Ca(&self.ca.cert_path), alpn)
    }
}

/// A route `web`: stable v1, canary v2 at 50 %, sticky by `x-user-id`.
fn split_route(v1: &Upstream, v2: &Upstream) -> String {
    format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: 50\n    sticky: {{header: x-user-id}}\n",
        addrs(&[v1]),
        addrs(&[v2])
    )
}

/// A TLS upstream's acceptor for a certificate issued by `ca` for `names`.
fn upstream_acceptor(
    ca: &TestCa,
    dir: &Path,
    stem: &str,
    names: &[&str],
) -> tokio_rustls::TlsAcceptor {
    let files = ca.issue(dir, stem, names);
    let store = Arc::new(CertStore::load("upstream", &[files], false).unwrap());
    tokio_rustls::TlsAcceptor::from(
        canary_tls::server_config(store, &[ALPN_H2, ALPN_HTTP1]).unwrap(),
    )
}

/// A `canary serve` child started with a config of the test's own (for listeners the
/// shared harness does not wait on, like an HTTPS admin API). Killed on drop.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, config: &str) -> Serve {
        let path = dir.join("canary.yaml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.join("canary.log");
        let child = Command::new(env!("CARGO_BIN_EXE_canary"))
            .args(["serve", "--config"])
            .arg(&path)
            .current_dir(dir)
            .env("CANARY_LOG", "info")
            .env_remove("CANARY_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn canary serve");
        Serve { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `GET path` over TLS to `addr` (SNI `name`) answers 200.
async fn wait_https(serve: &mut Serve, addr: SocketAddr, name: &str, ca: &Path, path: &str) {
    let deadline = Instant::now() + common::READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = serve.child.try_wait() {
            panic!("canary exited with {status}:\n{}", serve.log());
        }
        let config = tls::config(Trust::Ca(ca), &[canary_tls::ALPN_HTTP1]);
        if let Ok(conn) = tls::connect(addr, Some(name), config).await {
            if Sender::new(conn).await.get(name, path, &[]).await.status == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr} not ready over TLS:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn canary_validate_prints_each_certificate_with_names_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    ca.issue(dir.path(), "shop", &["shop.test", "www.shop.test"]);
    ca.issue(dir.path(), "admin", &["localhost"]);
    let config = "listen: 127.0.0.1:8443
tls:
  certificates: [{cert: shop.pem, key: shop-key.pem}]
admin_tls: {certificates: [{cert: admin.pem, key: admin-key.pem}]}
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"], tls: {insecure_skip_verify: true}}
";
    let path = dir.path().join("canary.yaml");
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = run_canary(&["validate", path.to_str().unwrap()], &[], None).await;
    assert_eq!(code, 0, "{out}{err}");
    let shop = out
        .lines()
        .find(|l| l.starts_with("tls.certificates[0] "))
        .unwrap_or_else(|| panic!("no tls certificate line in:\n{out}"));
    assert!(
        shop.contains("shop.pem: shop.test, www.shop.test; expires "),
        "{shop}"
    );
    assert!(shop.contains("(in 36"), "about a year left: {shop}");
    assert!(out.contains("admin_tls.certificates[0] "), "{out}");
    assert!(
        err.contains("warning: route web stable: tls.insecure_skip_verify is on"),
        "{err}"
    );
}

#[tokio::test]
async fn admin_tls_serves_the_api_over_https_and_exports_certificate_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let cert = ca.issue(dir.path(), "admin", &["localhost"]);
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = format!(
        "listen: 127.0.0.1:{}
admin: {admin}
state_dir: state
admin_tls: {{certificates: [{{cert: admin.pem, key: admin-key.pem}}], handshake_timeout: 2s}}
routes:
  - name: web
    stable: {{version: v1, upstreams: [\"127.0.0.1:9\"]}}
",
        free_port()
    );
    let mut serve = Serve::start(dir.path(), &config);
    wait_https(&mut serve, admin, "localhost", &ca.cert_path, "/readyz").await;

    // The certificate is verified by the test CA for the name asked for, and only
    // HTTP/1.1 is offered.
    let conn = tls::connect(
        admin,
        Some("localhost"),
        tls::config(Trust::Ca(&ca.cert_path), &[b"h2", b"http/1.1"]),
    )
    .await
    .expect("TLS to the admin listener");
    assert_eq!(tls::served(&conn), tls::cert_der(&cert.cert));
    assert_eq!(tls::alpn(&conn).as_deref(), Some(&b"http/1.1"[..]));
    let metrics = Sender::new(conn)
        .await
        .get("localhost", "/metrics", &[])
        .await;
    assert_eq!(metrics.status, 200);
    let left = metric_value(
        &metrics.body,
        "canary_tls_certificate_expiry_seconds",
        &[("listener", "admin"), ("names", "localhost")],
    )
    .unwrap_or_else(|| panic!("no expiry sample in:\n{}", metrics.body));
    assert!(
        (360.0 * 86_400.0..366.0 * 86_400.0).contains(&left),
        "{left}"
    );

    // The CLI's admin verbs speak HTTPS, verified with `--cacert`.
    let url = format!("https://localhost:{}", admin.port());
    let ca_arg = ca.cert_path.to_str().unwrap();
    let (code, out, err) =
        run_canary(&["status", "--admin", &url, "--cacert", ca_arg], &[], None).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("web"), "{out}");
    let (code, _, err) = run_canary(&["status", "--admin", &url], &[], None).await;
    assert_eq!(code, 3, "the test CA is not a system root: {err}");

    // Plain HTTP on the TLS port gets no API answer.
    let plain = common::send(
        &common::client(),
        http::Method::GET,
        &format!("http://{admin}/readyz"),
        &[],
        "",
    )
    .await;
    assert!(plain.is_err() || plain.unwrap().status != 200);

    // A client that does not know the CA refuses the certificate.
    let other = TestCa::new(dir.path(), "other");
    let refused = tls::connect(
        admin,
        Some("localhost"),
        tls::config(Trust::Ca(&other.cert_path), &[]),
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_picks_h2_or_http1_and_both_get_the_same_sticky_split_and_version() {
    let certs = Certs::new();
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let c = Canary::start(&format!("{}{}", certs.tls_block(), split_route(&v1, &v2))).await;

    let h2 = tls::connect(
        c.listen,
        Some("shop.test"),
        certs.client(&[ALPN_H2, ALPN_HTTP1]),
    )
    .await
    .expect("TLS with h2 offered");
    assert_eq!(tls::alpn(&h2).as_deref(), Some(ALPN_H2));
    let h1 = tls::connect(c.listen, Some("shop.test"), certs.client(&[ALPN_HTTP1]))
        .await
        .expect("TLS with http/1.1 offered");
    assert_eq!(tls::alpn(&h1).as_deref(), Some(ALPN_HTTP1));
    let none = tls::connect(c.listen, Some("shop.test"), certs.client(&[]))
        .await
        .expect("TLS without ALPN");
    assert_eq!(tls::alpn(&none), None);

    let (mut h2, mut h1, mut none) = (
        Sender::new(h2).await,
        Sender::new(h1).await,
        Sender::new(none).await,
    );
    assert!(matches!(h2, Sender::Http2(_)) && matches!(h1, Sender::Http1(_)));
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let user = format!("user-{i}");
        let a = h2.get("shop.test", "/echo", &[("x-user-id", &user)]).await;
        let b = h1.get("shop.test", "/echo", &[("x-user-id", &user)]).await;
        let n = none.get("shop.test", "/", &[("x-user-id", &user)]).await;
        assert_eq!((a.status, b.status, n.status), (200, 200, 200));
        let v = a.version().expect("x-canary-version over h2").to_string();
        assert_eq!(
            b.version(),
            Some(v.as_str()),
            "{user}: h2 and http/1.1 disagree"
        );
        assert_eq!(n.version(), Some(v.as_str()), "{user}: no ALPN disagrees");
        assert_eq!(a.json()["served_by"], v.as_str(), "{user}");
        assert_eq!(
            a.json()["version"],
            "HTTP/1.1",
            "the upstream is HTTP/1.1 either way"
        );
        seen.insert(v);
    }
    assert_eq!(
        seen.len(),
        2,
        "40 users at 50 % reach both versions: {seen:?}"
    );
    // Both protocols are counted like any request.
    let m = c.metrics().await;
    let total: f64 = ["v1", "v2"]
        .iter()
        .filter_map(|v| {
            let labels = [("route", "web"), ("version", *v), ("class", "2xx")];
            metric_value(&m, "canary_requests_total", &labels)
        })
        .sum();
    assert_eq!(total, 120.0, "requests over TLS are counted: {total}\n{m}");
}

#[tokio::test]
async fn sni_picks_the_certificate_and_a_client_without_sni_gets_the_first() {
    let certs = Certs::new();
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let c = Canary::start(&format!("{}{}", certs.tls_block(), split_route(&v1, &v2))).await;
    let shop = tls::cert_der(&certs.shop.cert);
    let api = tls::cert_der(&certs.api.cert);
    for (sni, want) in [
        (Some("shop.test"), &shop),
        (Some("api.test"), &api),
        (Some("v2.api.test"), &api),
        (Some("other.test"), &shop),
        (None, &shop),
    ] {
        let conn = tls::connect(c.listen, sni, tls::config(Trust::Any, &[]))
            .await
            .unwrap_or_else(|e| panic!("{sni:?}: {e}"));
        assert!(
            &tls::served(&conn) == want,
            "{sni:?} got the wrong certificate"
        );
    }
    // Verified the way `curl --cacert` does: the name matches the certificate.
    tls::connect(c.listen, Some("v2.api.test"), certs.client(&[]))
        .await
        .expect("api's wildcard verifies");
    assert!(
        tls::connect(c.listen, Some("other.test"), certs.client(&[]))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn https_requests_get_x_forwarded_proto_https_and_a_secure_sticky_cookie() {
    let certs = Certs::new();
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    // No sticky key: the proxy generates one and sets it as a cookie.
    let routes = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    weight: 50\n",
        addrs(&[&v1]),
        addrs(&[&v2])
    );
    let c = Canary::start(&format!("{}{routes}", certs.tls_block())).await;
    for alpn in [ALPN_HTTP1, ALPN_H2] {
        let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[alpn]))
            .await
            .unwrap();
        let r = Sender::new(conn).await.get("shop.test", "/echo", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https", "{r:?}");
        let cookie = r.header("set-cookie").expect("a generated sticky cookie");
        assert!(
            cookie.ends_with("; HttpOnly; SameSite=Lax; Secure"),
            "{cookie}"
        );
    }
}

/// A Kubernetes Secret mount: `tls.crt -> ..data/tls.crt`, `..data -> ..v<n>`; a new
/// version is written to its own directory and `..data` swapped to it atomically.
struct SecretMount {
    root: PathBuf,
    n: u32,
}

impl SecretMount {
    fn new(root: &Path, first: &CertificateFiles) -> SecretMount {
        std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).unwrap();
        let mut m = SecretMount {
            root: root.to_path_buf(),
            n: 0,
        };
        m.swap_to(
            &std::fs::read(&first.cert).unwrap(),
            &std::fs::read(&first.key).unwrap(),
        );
        m
    }

    /// Writes `..v<n+1>/` and swaps `..data` to it (rename over the link).
    fn swap_to(&mut self, cert: &[u8], key: &[u8]) {
        self.n += 1;
        let dir = format!("..v{}", self.n);
        std::fs::create_dir(self.root.join(&dir)).unwrap();
        std::fs::write(self.root.join(&dir).join("tls.crt"), cert).unwrap();
        std::fs::write(self.root.join(&dir).join("tls.key"), key).unwrap();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&dir, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_in_through_symlinks_serves_new_connections_and_a_long_request_on_an_old_one_finishes(
) {
    let certs = Certs::new();
    let mount = tempfile::tempdir().unwrap();
    let mut secret = SecretMount::new(mount.path(), &certs.shop);
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let tls_block = format!(
        "tls:\n  certificates:\n    - {{cert: {0}/tls.crt, key: {0}/tls.key}}\n",
        mount.path().display()
    );
    let c = Canary::start(&format!("{tls_block}{}", split_route(&v1, &v2))).await;
    let old = tls::cert_der(&certs.shop.cert);

    // A slow request on a connection made with the old certificate.
    let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[ALPN_HTTP1]))
        .await
        .unwrap();
    assert_eq!(tls::served(&conn), old);
    v1.set_delay_ms(3_000);
    v2.set_delay_ms(3_000);
    let mut sender = Sender::new(conn).await;
    let long =
        tokio::spawn(async move { sender.get("shop.test", "/", &[("x-user-id", "u")]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new certificate (same name, new key), swapped in the way a Secret update does.
    let next = certs.ca.issue(certs._dir.path(), "shop2", &["shop.test"]);
    secret.swap_to(
        &std::fs::read(&next.cert).unwrap(),
        &std::fs::read(&next.key).unwrap(),
    );
    let new = tls::cert_der(&next.cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[]))
            .await
            .unwrap();
        if tls::served(&conn) == new {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = long.await.unwrap();
    assert_eq!(r.status, 200, "the request on the old connection finished");
    v1.set_delay_ms(0);
    v2.set_delay_ms(0);

    // A broken certificate is rejected with the file and the reason; the last good one
    // keeps serving.
    secret.swap_to(
        b"-----BEGIN CERTIFICATE-----\nbroken\n",
        &std::fs::read(&next.key).unwrap(),
    );
    assert!(
        c.wait_log(
            "certificate rejected, the previous one keeps serving",
            Duration::from_secs(10)
        )
        .await,
        "{}",
        c.log()
    );
    assert!(
        c.log().contains("tls.crt"),
        "the log names the file:\n{}",
        c.log()
    );
    let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[]))
        .await
        .unwrap();
    assert_eq!(tls::served(&conn), new);
    let r = Sender::new(conn).await.get("shop.test", "/", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_tls_verifies_its_upstream_by_ca_and_name_and_checks_health_over_tls() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let up_ca = TestCa::new(dir.path(), "upstream-ca");
    let ok = Upstream::start_tls(
        "v1",
        upstream_acceptor(&up_ca, dir.path(), "up", &["api.internal"]),
    )
    .await;
    let grpc = Upstream::start_tls(
        "g1",
        upstream_acceptor(&up_ca, dir.path(), "g", &["grpc.internal"]),
    )
    .await;
    let ca = up_ca.cert_path.display();
    let routes = format!(
        "routes:
  - name: good
    path_prefix: /good
    stable:
      version: v1
      upstreams: {good}
      tls: {{ca: {ca}, server_name: api.internal}}
      health_check: {{path: /healthz, interval: 200ms, timeout: 150ms}}
  - name: wrong
    path_prefix: /wrong
    stable:
      version: v1
      upstreams: {good}
      tls: {{ca: {ca}, server_name: other.internal}}
  - name: untrusted
    path_prefix: /untrusted
    stable:
      version: v1
      upstreams: {good}
      tls: {{server_name: api.internal, ca: {other}}}
  - name: insecure
    path_prefix: /insecure
    stable:
      version: v1
      upstreams: {good}
      tls: {{server_name: other.internal, insecure_skip_verify: true}}
  - name: grpc
    path_prefix: /grpc
    stable:
      version: g1
      upstreams: {g}
      http2: true
      tls: {{ca: {ca}, server_name: grpc.internal}}
      health_check: {{path: /healthz, interval: 200ms, timeout: 150ms}}
",
        good = addrs(&[&ok]),
        g = addrs(&[&grpc]),
        other = certs.ca.cert_path.display(),
    );
    let c = Canary::start(&format!("{}{routes}", certs.tls_block())).await;
    let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[ALPN_HTTP1])).await;
    let mut s = Sender::new(conn.unwrap()).await;
    let r = s.get("shop.test", "/good/echo", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(
        r.json()["headers"]["host"],
        "shop.test",
        "the client's host is kept"
    );
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");
    let r = s.get("shop.test", "/grpc/echo", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["version"],
        "HTTP/2.0",
        "h2 by ALPN to an http2 pool"
    );
    for path in ["/wrong/", "/untrusted/"] {
        let r = s.get("shop.test", path, &[]).await;
        assert_eq!(r.status, 502, "{path}: {r:?}");
    }
    // insecure_skip_verify takes what the others refuse, and says so in the log.
    assert_eq!(s.get("shop.test", "/insecure/", &[]).await.status, 200);
    assert!(
        c.log()
            .contains("tls.insecure_skip_verify is on: the upstream's certificate is NOT verified"),
        "{}",
        c.log()
    );
    // Health checks go over TLS with the pool's settings and pass.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.checks() < 3 || grpc.checks() < 3 {
        assert!(
            Instant::now() < deadline,
            "health checks did not reach the TLS upstreams"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = c.metrics().await;
    for route in ["good", "grpc"] {
        let healthy = metric_value(&m, "canary_upstream_healthy", &[("route", route)]);
        assert_eq!(healthy, Some(1.0), "{route}:\n{m}");
    }
}

#[tokio::test]
async fn http_redirect_answers_308_to_the_same_host_and_target_on_https() {
    let certs = Certs::new();
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let redirect: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let c = Canary::start(&format!(
        "{}http_redirect: {redirect}\n{}",
        certs.tls_block(),
        split_route(&v1, &v2)
    ))
    .await;
    let client = common::client();
    let url = format!("http://{redirect}/a/b?c=d");
    let r = common::send(
        &client,
        http::Method::POST,
        &url,
        &[("host", "shop.test:80")],
        "x",
    )
    .await
    .expect("an answer from the redirect listener");
    assert_eq!(r.status, 308, "{r:?}");
    let port = c.listen.port();
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.test:{port}/a/b?c=d").as_str())
    );
    assert_eq!(v1.requests() + v2.requests(), 0, "nothing was proxied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_a_client_certificate_reaches_an_upstream_that_requires_one() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let up_ca = TestCa::new(dir.path(), "upstream-ca");
    let client_ca = TestCa::new(dir.path(), "client-ca");
    let client = client_ca.issue(dir.path(), "client", &["canary.client"]);
    // An upstream that demands a certificate from `client_ca`.
    let server_cert = up_ca.issue(dir.path(), "up", &["api.internal"]);
    let roots = Arc::new(canary_tls::client::ca_bundle(&client_ca.cert_path).unwrap());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, canary_tls::provider())
            .build()
            .unwrap();
    let loaded = canary_tls::pem::load(&server_cert, std::time::SystemTime::now()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(canary_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(loaded.key)));
    let up = Upstream::start_tls("v1", tokio_rustls::TlsAcceptor::from(Arc::new(config))).await;
    let ca = up_ca.cert_path.display();
    let routes = format!(
        "routes:
  - name: mtls
    path_prefix: /mtls
    stable:
      version: v1
      upstreams: {u}
      tls: {{ca: {ca}, server_name: api.internal, cert: {c}, key: {k}}}
  - name: anonymous
    path_prefix: /anonymous
    stable:
      version: v1
      upstreams: {u}
      tls: {{ca: {ca}, server_name: api.internal}}
",
        u = addrs(&[&up]),
        c = client.cert.display(),
        k = client.key.display(),
    );
    let c = Canary::start(&format!("{}{routes}", certs.tls_block())).await;
    let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[ALPN_H2])).await;
    let mut s = Sender::new(conn.unwrap()).await;
    assert_eq!(s.get("shop.test", "/mtls/", &[]).await.status, 200);
    assert_eq!(s.get("shop.test", "/anonymous/", &[]).await.status, 502);
}

/// Always the same certificate (the mTLS upstream has one name).
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_https_reaches_a_tls_pool_and_messages_round_trip() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let up_ca = TestCa::new(dir.path(), "upstream-ca");
    let up = Upstream::start_tls(
        "v1",
        upstream_acceptor(&up_ca, dir.path(), "up", &["api.internal"]),
    )
    .await;
    let routes = format!(
        "routes:\n  - name: ws\n    stable:\n      version: v1\n      upstreams: {}\n      tls: {{ca: {}, server_name: api.internal}}\n",
        addrs(&[&up]),
        up_ca.cert_path.display()
    );
    let c = Canary::start(&format!("{}{routes}", certs.tls_block())).await;
    let conn = tls::connect(c.listen, Some("shop.test"), certs.client(&[ALPN_HTTP1]))
        .await
        .unwrap();
    let req = "wss://shop.test/chat/ws".into_client_request().unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        common::REQUEST_TIMEOUT,
        tokio_tungstenite::client_async(req, conn),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let got = tokio::time::timeout(common::REQUEST_TIMEOUT, ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("message");
        assert_eq!(got, Message::text(text));
    }
}
