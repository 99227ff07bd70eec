//! TLS end to end: the real binary with certificates made by the test (a test CA and
//! its leaves, via `canary_tls::testing`), reached by rustls clients that choose SNI
//! and ALPN and look at the certificate served.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use canary_tls::testing::TestCa;
use common::tls::{self, Sender, Trust};
use common::{free_port, metric_value, run_canary};

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
