//! Handshake and bulk cost of rustls with ring vs aws-lc-rs, in memory (no sockets), so
//! only the crypto and the TLS state machines are measured. The server side is timed on
//! its own (the proxy's cost); the client's work is done but not counted. Both providers
//! run alternately in one process, several rounds, on the same ECDSA P-256 certificate.
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Counts, overridable for a quick run or a profile: `HANDSHAKES=200 BULK_MIB=16 ROUNDS=1`.
fn count(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Pair {
    client: ClientConnection,
    server: ServerConnection,
}

/// Moves everything one side wants to write to the other; returns the time spent in the
/// server's own calls.
fn pump(pair: &mut Pair, to_server: bool) -> Duration {
    let mut buf = Vec::new();
    let mut spent = Duration::ZERO;
    if to_server {
        while pair.client.wants_write() {
            pair.client.write_tls(&mut buf).unwrap();
        }
        let t = Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            pair.server.read_tls(&mut rd).unwrap();
            pair.server.process_new_packets().unwrap();
        }
        spent += t.elapsed();
    } else {
        let t = Instant::now();
        while pair.server.wants_write() {
            pair.server.write_tls(&mut buf).unwrap();
        }
        spent += t.elapsed();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            pair.client.read_tls(&mut rd).unwrap();
            pair.client.process_new_packets().unwrap();
        }
    }
    spent
}

fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> (Duration, bool) {
    let name = ServerName::try_from("localhost").unwrap();
    let t = Instant::now();
    let mut pair = Pair {
        client: ClientConnection::new(client.clone(), name).unwrap(),
        server: ServerConnection::new(server.clone()).unwrap(),
    };
    let mut spent = t.elapsed();
    while pair.client.is_handshaking() || pair.server.is_handshaking() {
        spent += pump(&mut pair, true);
        spent += pump(&mut pair, false);
    }
    // The session tickets the server sends after the handshake, so the next connection
    // can resume.
    spent += pump(&mut pair, false);
    let resumed = matches!(
        pair.server.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    (spent, resumed)
}

/// A client and a server connection past their handshake (and the session tickets
/// the server sends after it).
fn connected(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Pair {
    let name = ServerName::try_from("localhost").unwrap();
    let mut pair = Pair {
        client: ClientConnection::new(client.clone(), name).unwrap(),
        server: ServerConnection::new(server.clone()).unwrap(),
    };
    while pair.client.is_handshaking() || pair.server.is_handshaking() {
        pump(&mut pair, true);
        pump(&mut pair, false);
    }
    pump(&mut pair, false);
    pair
}

fn bulk(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> (Duration, Duration) {
    let mut pair = connected(client, server);
    let chunk = vec![0x5a_u8; 16 * 1024];
    let mut sink = vec![0u8; 64 * 1024];
    let (mut enc, mut dec) = (Duration::ZERO, Duration::ZERO);
    let mut sent = 0;
    while sent < (count("BULK_MIB", 256) as usize) << 20 {
        let t = Instant::now();
        pair.server.writer().write_all(&chunk).unwrap();
        let mut buf = Vec::with_capacity(17 * 1024);
        while pair.server.wants_write() {
            pair.server.write_tls(&mut buf).unwrap();
        }
        enc += t.elapsed();
        let t = Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            pair.client.read_tls(&mut rd).unwrap();
            pair.client.process_new_packets().unwrap();
        }
        let mut got = 0;
        while got < chunk.len() {
            got += pair.client.reader().read(&mut sink).unwrap();
        }
        dec += t.elapsed();
        sent += chunk.len();
    }
    (enc, dec)
}

/// `kx`: the client's key-exchange groups (its key share is the first). rustls 0.23.48's
/// ring provider prefers P-384 (slow in ring); real clients send X25519 or
/// X25519MLKEM768 shares, so the client decides the group here as it does there.
fn configs(
    provider: CryptoProvider,
    kx: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ticketer: fn() -> Arc<dyn rustls::server::ProducesTickets>,
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    resume: bool,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .unwrap();
    if resume {
        server.ticketer = ticketer();
    } else {
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
    }
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let client_provider = Arc::new(CryptoProvider {
        kx_groups: kx,
        ..(*provider).clone()
    });
    let mut client = ClientConfig::builder_with_provider(client_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        client.resumption = rustls::client::Resumption::disabled();
    }
    (Arc::new(client), Arc::new(server))
}

fn main() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    type Make = fn() -> CryptoProvider;
    type Tick = fn() -> Arc<dyn rustls::server::ProducesTickets>;
    type Kx = &'static dyn rustls::crypto::SupportedKxGroup;
    #[allow(deprecated)]
    let ring: Make = rustls::crypto::ring::default_provider;
    let providers: [(&str, Make, Tick, Kx); 3] = [
        (
            "ring X25519",
            ring,
            || rustls::crypto::ring::Ticketer::new().unwrap(),
            rustls::crypto::ring::kx_group::X25519,
        ),
        (
            "aws-lc-rs X25519",
            rustls::crypto::aws_lc_rs::default_provider,
            || rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            rustls::crypto::aws_lc_rs::kx_group::X25519,
        ),
        (
            "aws-lc-rs X25519MLKEM768",
            rustls::crypto::aws_lc_rs::default_provider,
            || rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        ),
    ];
    let (handshakes, bulk_mib, rounds) = (
        count("HANDSHAKES", 2_000),
        count("BULK_MIB", 256),
        count("ROUNDS", 3),
    );
    println!("TLS 1.3, ECDSA P-256 certificate, server-side time only; {handshakes} handshakes and {bulk_mib} MiB per row");
    for round in 1..=rounds {
        // `ONLY=ring` (a prefix of a row's name) runs one row: for `perf stat`.
        let only = std::env::var("ONLY").unwrap_or_default();
        for (name, make, ticketer, kx) in providers {
            if !name.starts_with(only.as_str()) {
                continue;
            }
            let (c, s) = configs(make(), vec![kx], ticketer, &cert, &key, false);
            let mut full = Duration::ZERO;
            for _ in 0..handshakes {
                let (d, resumed) = handshake(&c, &s);
                assert!(!resumed);
                full += d;
            }
            let (c, s) = configs(make(), vec![kx], ticketer, &cert, &key, true);
            handshake(&c, &s);
            let mut res = Duration::ZERO;
            for _ in 0..handshakes {
                let (d, resumed) = handshake(&c, &s);
                assert!(resumed, "{name}: the session was not resumed");
                res += d;
            }
            let (enc, dec) = bulk(&c, &s);
            let suite = connected(&c, &s)
                .server
                .negotiated_cipher_suite()
                .unwrap()
                .suite();
            let mib = f64::from(bulk_mib);
            println!(
                "round {round} {name:>24}: full handshake {:>6.1} us, resumed {:>6.1} us, \
                 {suite:?} encrypt {:>6.0} MiB/s, decrypt (client) {:>6.0} MiB/s",
                full.as_secs_f64() * 1e6 / f64::from(handshakes),
                res.as_secs_f64() * 1e6 / f64::from(handshakes),
                mib / enc.as_secs_f64(),
                mib / dec.as_secs_f64(),
            );
        }
    }
}
