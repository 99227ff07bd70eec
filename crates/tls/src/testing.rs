//! Test certificates, made with rcgen: self-signed ones of every supported key type, a
//! test CA and certificates it signs, expired ones. Behind the `testing` feature, for
//! the tests of this crate and of the crates that serve or reach TLS.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
};
use time::{Duration, OffsetDateTime};

use crate::CertificateFiles;

/// A key type a test certificate can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    /// 2048 bits; always the same key ([`RSA_KEY`]): ring signs with RSA keys but
    /// cannot make them.
    Rsa,
}

/// A fixed RSA-2048 test key (PKCS#8), made once with `openssl genpkey`.
pub const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC6BuLfkjDM5YZ4
bH/kY/K/IJVcm1V0jGW6uWW6te1XhIDs295Tu5kSQ6vhxNUMtcX1qKxKMQ3MndLP
IZ99vANw1tHwr+w2CAgTSuf1wx7tzIvD1Xcd4JK3V9lVhzbkLd+mQjs3FJuCK18G
XiYb1A+v7mCeCf+5I7zlZDmvWSnyDRk44BEDxLbTCPfyMTeojWMqJcMoTmBlCGdg
/BkSOsGH/yO3aMmPp5uVfzCfvL7H2Fvd6lOp+E+/X1Lqm5Ras399BaQIELfrCAB4
FvqdyW0RSJp2eJdQ0GR83rDPmaV++iyT/pU+6XZbohtLolIm01JoItxKFzmjkSyw
cshdEbPFAgMBAAECggEABeaJhDNoIlumagPxA47LCJZxPmR776wzXtqaGDPEkTnV
+A1aTjgdWRe16D2cz2AlpQ7iViEbsbGQ2fqUS0HvLwFVW+fMm4MiNHB0DpbPkJXk
GgRXmKZCqRebgGu/SToORcEEjVD1RMn44+QRG+FcVQV/4YtqJdZ1G6aT8NSocLG9
JrfQjOFNuFb7+N04JYpb+d0A/ZJvxyL37FFwDQpTzkycn/SvYq+6gJup0mja/slg
3L+uCmyprzAi0bZd2MHP+I4Fd6usEYVfqU+ytgU6hmBAkFdUKbtZJ3eRWEeYQPd7
02+4KVytk1w9D+VOe4NUp5xRDtwJHnewBATObNtaWQKBgQD/c54jVrAbTK+Ro4X1
zPAAue1oUuS0GJtwwI09+p33bDlp3biTsOs0MfrSmnM9ihftTm/AKSp0/BwG1wgF
93Duty+IOMDPpddyCKpDzli4aKsTBOqkOGpiEe+KcBG3bwc6/k/LcVO/uk6uQuvg
QlOh9eUptCNkrtoJgJNUkppyTQKBgQC6bR3P6UH57uES1GMmq8z69tOaxTo3gvth
TTseJo87JTv9srwFjJSKkYY5IMI8OnkUD0YERAjsPN2im9HsxIeYJb241Zs/CX/X
11m/APRRUxVshgqjr7AhKqchODj0jQqFl1b4OI+n6K8XLmm8ovmGxFMa51f8q/T9
+FKquhVTWQKBgFfGa4UrCVIoFH/Pl30xURp+yJO7P/ieJ/MjRqUQU20sE8JLvFuL
RBZoQg5Rod14cOZKuF1oB72wzxSOmKQsNPLhoQSGs8Hl81Sso4yu/49F79qWKuYI
uI1AKnYAMiY8kVh1AAggxa0woE6Ckjg5sjEJpBejXTIAXs07D+TUhxtVAoGAcD07
wq5cE37XsX9/hovO6JXshnUR/NP2Rvm5iwiKGYDsYmzWuLyPvfGpjwGDD8Hgncwo
Sm8vtBNdGQaZV+RnAppOZFbulgBBIRE9rjqD3eaYsnLtOumOsBk+8EgqOkokOJQK
P33GN8Bmkh1WecThWFsg8cSw+6YH5VQ5aSKJrlkCgYEAz460qTvLC+pCDW5PURYv
qR/av6Qqu0LEzk9EH3R1vHDuNVmJvkShkxYgihCh0AnZ2lLtHQ+7WkfO5DhwAGPe
+TYDVpy0qi3VoYiC73lGAtgz05U/ImKi9L+V/0jEVYTaImEOWDkqec6vxt07J99j
0UhGVh5+A+RXWWw7kr/JATE=
-----END PRIVATE KEY-----
";

fn key_pair(kind: Key) -> KeyPair {
    match kind {
        Key::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        Key::EcdsaP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
        Key::Ed25519 => KeyPair::generate_for(&PKCS_ED25519),
        Key::Rsa => KeyPair::from_pem(RSA_KEY),
    }
    .expect("test key")
}

/// Certificate parameters for `names`, valid from yesterday for 365 days.
fn params(names: &[&str]) -> CertificateParams {
    let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
    let mut p = CertificateParams::new(names).expect("test certificate names");
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(365);
    p
}

/// Writes `{stem}.pem` and `{stem}-key.pem` in `dir`.
fn write(dir: &Path, stem: &str, cert: &str, key: &str) -> CertificateFiles {
    let files = CertificateFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    std::fs::write(&files.cert, cert).expect("write test certificate");
    std::fs::write(&files.key, key).expect("write test key");
    files
}

/// A self-signed certificate for `names` (its SANs), valid for a year.
pub fn self_signed(dir: &Path, stem: &str, kind: Key, names: &[&str]) -> CertificateFiles {
    let key = key_pair(kind);
    let cert = params(names).self_signed(&key).expect("self-sign");
    write(dir, stem, &cert.pem(), &key.serialize_pem())
}

/// A self-signed ECDSA P-256 certificate that expired yesterday.
pub fn expired(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
    let key = key_pair(Key::EcdsaP256);
    let mut p = params(names);
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(30);
    p.not_after = now - Duration::days(1);
    let cert = p.self_signed(&key).expect("self-sign");
    write(dir, stem, &cert.pem(), &key.serialize_pem())
}

/// A test certificate authority that signs leaf certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), written as `ca.pem` by [`TestCa::new`].
    pub cert_pem: String,
    pub cert_path: PathBuf,
}

impl TestCa {
    /// A new ECDSA P-256 CA; its certificate is written to `dir/{stem}.pem`.
    pub fn new(dir: &Path, stem: &str) -> TestCa {
        let key = key_pair(Key::EcdsaP256);
        let mut p = params(&[]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("canary test CA {stem}"));
        let cert = p.self_signed(&key).expect("self-sign CA");
        let cert_path = dir.join(format!("{stem}.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write CA");
        TestCa {
            issuer: Issuer::new(p, key),
            cert_pem: cert.pem(),
            cert_path,
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
        let key = key_pair(Key::EcdsaP256);
        let cert = params(names)
            .signed_by(&key, &self.issuer)
            .expect("sign leaf");
        write(dir, stem, &cert.pem(), &key.serialize_pem())
    }
}
