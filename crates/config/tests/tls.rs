//! The TLS keys: served certificates (`tls`, `admin_tls`), `http_redirect`, and a
//! pool's `tls`. Certificates are made by the test (rcgen) next to the config file,
//! which names them by relative paths.

use std::path::Path;
use std::time::{Duration, SystemTime};

use canary_config::{load, Config, Diagnostic};
use canary_tls::testing::{self, Key, TestCa};

const ROUTES: &str = "\
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
";

/// Writes `yaml` as `canary.yaml` in `dir` and loads it.
fn load_in(dir: &Path, yaml: &str) -> Result<Config, Vec<String>> {
    let path = dir.join("canary.yaml");
    std::fs::write(&path, yaml).unwrap();
    load(&path).map_err(|e| e.diagnostics.iter().map(Diagnostic::to_string).collect())
}

/// Asserts exactly one error, at `line:column` of the file, containing `needle`.
#[track_caller]
fn one_error(dir: &Path, yaml: &str, at: &str, needle: &str) {
    let errs = load_in(dir, yaml).expect_err("expected an error");
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let prefix = format!("{}:{at}: ", dir.join("canary.yaml").display());
    assert!(
        errs[0].starts_with(&prefix) && errs[0].contains(needle),
        "expected `{prefix}…{needle}…`, got `{}`",
        errs[0]
    );
}

#[test]
fn every_tls_key_is_read_with_relative_paths_from_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    testing::self_signed(
        &certs,
        "shop",
        Key::EcdsaP256,
        &["shop.example", "www.shop.example"],
    );
    testing::self_signed(&certs, "api", Key::Ed25519, &["*.api.example"]);
    let ca = TestCa::new(&certs, "upstream-ca");
    ca.issue(&certs, "client", &["canary.client"]);
    let yaml = "listen: 127.0.0.1:8443
tls:
  certificates:
    - {cert: certs/shop.pem, key: certs/shop-key.pem}
    - {cert: certs/api.pem, key: certs/api-key.pem}
  require_sni: true
  handshake_timeout: 3s
http_redirect: 127.0.0.1:8080
admin_tls: {certificates: [{cert: certs/shop.pem, key: certs/shop-key.pem}]}
routes:
  - name: api
    stable:
      version: v1
      upstreams: [\"127.0.0.1:9443\"]
      tls: {ca: certs/upstream-ca.pem, server_name: api.internal, cert: certs/client.pem, key: certs/client-key.pem}
    canary:
      version: v2
      upstreams: [\"127.0.0.1:9444\"]
      http2: true
      tls: {insecure_skip_verify: true}
";
    let c = load_in(dir.path(), yaml).unwrap_or_else(|e| panic!("{e:#?}"));
    let tls = c.tls.expect("tls");
    assert_eq!(tls.certificates.len(), 2);
    assert_eq!(
        tls.certificates[0].files.cert,
        dir.path().join("certs/shop.pem")
    );
    assert_eq!(
        tls.certificates[0].names,
        ["shop.example", "www.shop.example"]
    );
    assert_eq!(tls.certificates[1].names, ["*.api.example"]);
    let left = tls.certificates[0]
        .not_after
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(360 * 86_400), "{left:?}");
    assert!(tls.require_sni);
    assert_eq!(tls.handshake_timeout_ms, 3_000);
    assert_eq!(c.http_redirect, Some("127.0.0.1:8080".parse().unwrap()));
    let admin = c.admin_tls.expect("admin_tls");
    assert!(!admin.require_sni);
    assert_eq!(admin.handshake_timeout_ms, 10_000);

    let stable = c.routes[0].stable.tls.as_ref().expect("stable tls");
    assert_eq!(stable.ca, Some(dir.path().join("certs/upstream-ca.pem")));
    assert_eq!(stable.server_name.as_deref(), Some("api.internal"));
    assert_eq!(
        stable.client_cert.as_ref().map(|f| f.key.clone()),
        Some(dir.path().join("certs/client-key.pem"))
    );
    assert!(!stable.insecure_skip_verify);
    let canary = c.routes[0].canary.as_ref().unwrap();
    assert!(canary.http2);
    let ctls = canary.tls.as_ref().unwrap();
    assert!(ctls.insecure_skip_verify && ctls.ca.is_none());
}

#[test]
fn a_certificate_file_that_does_not_exist_is_an_error_at_its_path() {
    let dir = tempfile::tempdir().unwrap();
    testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
    let yaml = format!(
        "listen: 127.0.0.1:8443\ntls:\n  certificates:\n    - {{cert: a.pem, key: nope-key.pem}}\n{ROUTES}"
    );
    one_error(dir.path(), &yaml, "4:26", "tls.certificates[0].key: \"");
    let errs = load_in(dir.path(), &yaml).unwrap_err();
    assert!(
        errs[0].contains("nope-key.pem\" does not exist"),
        "{}",
        errs[0]
    );
}

#[test]
fn an_expired_or_mismatched_certificate_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    testing::expired(dir.path(), "old", &["old.test"]);
    let yaml = format!(
        "listen: 127.0.0.1:8443\ntls:\n  certificates:\n    - {{cert: old.pem, key: old-key.pem}}\n{ROUTES}"
    );
    one_error(
        dir.path(),
        &yaml,
        "4:14",
        "old.pem: the certificate expired at",
    );

    testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
    testing::self_signed(dir.path(), "b", Key::Rsa, &["b.test"]);
    let yaml = format!(
        "listen: 127.0.0.1:8443\ntls:\n  certificates:\n    - {{cert: a.pem, key: b-key.pem}}\n{ROUTES}"
    );
    one_error(
        dir.path(),
        &yaml,
        "4:14",
        "a.pem: the certificate does not match the private key in",
    );

    std::fs::write(dir.path().join("junk.pem"), "not pem\n").unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:8443\ntls:\n  certificates:\n    - {{cert: junk.pem, key: a-key.pem}}\n{ROUTES}"
    );
    one_error(
        dir.path(),
        &yaml,
        "4:14",
        "no `-----BEGIN CERTIFICATE-----` block",
    );
}

#[test]
fn tls_mistakes_are_each_reported_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
    let no_names = testing::self_signed(dir.path(), "anon", Key::EcdsaP256, &[]);
    assert!(no_names.cert.exists());
    let ca = TestCa::new(dir.path(), "ca");
    ca.issue(dir.path(), "client", &["c.test"]);

    // No `tls`, so `http_redirect` has nothing to redirect to.
    one_error(
        dir.path(),
        &format!("listen: 127.0.0.1:8443\nhttp_redirect: 127.0.0.1:8080\n{ROUTES}"),
        "2:16",
        "http_redirect: needs `tls`",
    );
    let cases = [
        ("  certificates: []\n", "3:17", "tls.certificates: the list is empty"),
        ("  certificates:\n    - {cert: a.pem}\n", "4:7", "tls.certificates[0]: missing required key `key`"),
        (
            "  certificates:\n    - {cert: a.pem, key: a-key.pem}\n    - {cert: anon.pem, key: anon-key.pem}\n",
            "5:14",
            "tls.certificates[1].cert: the certificate has no DNS names",
        ),
        (
            "  certificates: [{cert: a.pem, key: a-key.pem}]\n  requires_sni: true\n",
            "4:3",
            "unknown field `requires_sni`",
        ),
        (
            "  certificates: [{cert: a.pem, key: a-key.pem}]\n  handshake_timeout: soon\n",
            "4:22",
            "tls.handshake_timeout",
        ),
    ];
    for (tls, at, needle) in cases {
        let yaml = format!("listen: 127.0.0.1:8443\ntls:\n{tls}{ROUTES}");
        one_error(dir.path(), &yaml, at, needle);
    }

    let pool = |tls: &str| {
        format!(
            "listen: 127.0.0.1:8443\nroutes:\n  - name: web\n    stable:\n      version: v1\n      upstreams: [\"127.0.0.1:9001\"]\n      tls: {tls}\n"
        )
    };
    let cases = [
        (
            "{cert: client.pem}",
            "7:12",
            "routes[0].stable.tls: missing required key `key`",
        ),
        (
            "{server_name: \"bad name\"}",
            "7:26",
            "is not a DNS name or IP address",
        ),
        (
            "{ca: ca.pem, insecure_skip_verify: true}",
            "7:47",
            "insecure_skip_verify: turns verification off",
        ),
        (
            "{ca: missing-ca.pem}",
            "7:17",
            "routes[0].stable.tls.ca: \"",
        ),
        (
            "{ca: a-key.pem}",
            "7:17",
            "no `-----BEGIN CERTIFICATE-----` block",
        ),
        (
            "{cert: client.pem, key: a-key.pem}",
            "7:19",
            "client certificate:",
        ),
        ("{verify: false}", "7:13", "unknown field `verify`"),
    ];
    for (tls, at, needle) in cases {
        one_error(dir.path(), &pool(tls), at, needle);
    }
    // The right pair loads.
    load_in(
        dir.path(),
        &pool("{cert: client.pem, key: client-key.pem, ca: ca.pem}"),
    )
    .unwrap_or_else(|e| panic!("{e:#?}"));
}

#[test]
fn a_change_of_served_certificates_needs_a_restart_and_a_pool_tls_change_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    testing::self_signed(dir.path(), "a", Key::EcdsaP256, &["a.test"]);
    testing::self_signed(dir.path(), "b", Key::EcdsaP256, &["b.test"]);
    let config = |cert: &str, pool_tls: &str| {
        format!(
            "listen: 127.0.0.1:8443\ntls:\n  certificates: [{{cert: {cert}.pem, key: {cert}-key.pem}}]\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: [\"127.0.0.1:9001\"]{pool_tls}}}\n"
        )
    };
    let old = load_in(dir.path(), &config("a", "")).unwrap();
    let new = load_in(dir.path(), &config("b", ", tls: {}")).unwrap();
    assert_eq!(
        canary_config::diff(&old, &new),
        [
            "tls changed (needs a restart)",
            "route web: stable tls changed"
        ]
    );
    assert!(canary_config::diff(&old, &old).is_empty());
}
