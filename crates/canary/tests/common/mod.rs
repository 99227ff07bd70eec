//! The end-to-end harness: real upstream servers, the real `canary` binary in a child
//! process, and small HTTP clients.
//!
//! Everything listens on 127.0.0.1 only, every wait is bounded, and every server and
//! child process is stopped when its handle is dropped, so a failing test cleans up
//! after itself. Each test binary uses a different subset of these helpers, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

pub mod fault;
pub mod h2raw;
mod promtool;
pub mod strict;

#[allow(unused_imports)] // not every test crate checks metrics
pub use promtool::promtool_check;

use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub mod tls;

/// How long `Canary::start` waits for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-request timeout of the test clients.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/1.1 client (connection pooling on).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2-only (prior knowledge, h2c) client.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A free loopback port: bind port 0, read it, release it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// An address nothing listens on (for "upstream unreachable").
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

// ---------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------

struct UpState {
    version: String,
    status: AtomicU16,
    delay_ms: AtomicU64,
    /// 0 = off; n = every n-th plain request answers 500.
    fail_every: AtomicU64,
    healthy: AtomicBool,
    requests: AtomicU64,
    /// `/healthz` requests answered.
    checks: AtomicU64,
    seq: AtomicU64,
}

/// A real HTTP server (HTTP/1.1 and h2c) standing in for one version of the app.
///
/// - any path: `hello from <version>` with the configured status and delay;
/// - `…/echo`: a JSON object of what it received (method, uri, version, headers);
/// - `…/ws`: a WebSocket echo server;
/// - `…/bytes/N`: `N` bytes of [`pattern_body`] with a `Content-Length`;
/// - `…/sink`: reads the whole request body, then answers with its length;
/// - `…/sum`: reads the request body as it comes, then answers `<length> <FNV-1a>`
///   (see [`fnv1a`]; hex, 16 digits);
/// - `/healthz`: 200, or 503 after `set_healthy(false)` (not counted in `requests`).
///
/// Dropping it closes the listener and every open connection.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpState>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(version: &str) -> Upstream {
        Upstream::start_with(version, None).await
    }

    /// The same server over TLS (`acceptor`: its certificate and ALPN); HTTP/2 when
    /// ALPN agrees on `h2`.
    pub async fn start_tls(version: &str, acceptor: tokio_rustls::TlsAcceptor) -> Upstream {
        Upstream::start_with(version, Some(acceptor)).await
    }

    async fn start_with(version: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let state = Arc::new(UpState {
            version: version.to_string(),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            fail_every: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let stop_rx = stop_rx.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => serve_upstream_conn(stream, state, stop_rx).await,
                            Some(tls) => {
                                if let Ok(stream) = tls.accept(stream).await {
                                    serve_upstream_conn(stream, state, stop_rx).await;
                                }
                            }
                        }
                    });
                }
            }
        });
        Upstream {
            addr,
            state,
            stop,
            accept,
        }
    }

    /// The status code plain requests get from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Relaxed);
    }

    /// Extra delay before each answer (except `/healthz`).
    pub fn set_delay_ms(&self, ms: u64) {
        self.state.delay_ms.store(ms, Relaxed);
    }

    /// Every `n`-th plain request answers 500 (0 turns it off).
    pub fn fail_every(&self, n: u64) {
        self.state.fail_every.store(n, Relaxed);
    }

    /// `/healthz` requests answered so far.
    pub fn checks(&self) -> u64 {
        self.state.checks.load(Relaxed)
    }

    /// What `/healthz` answers: 200 when healthy, 503 when not.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Relaxed);
    }

    /// Requests received, health checks excluded.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.accept.abort();
    }
}

fn text_response(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Serves one connection of an [`Upstream`] until it closes or the server stops.
async fn serve_upstream_conn<IO>(io: IO, state: Arc<UpState>, mut stop_rx: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| serve_upstream(state.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop_rx.wait_for(|s| *s) => {}
    }
}

async fn serve_upstream(
    st: Arc<UpState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        st.checks.fetch_add(1, Relaxed);
        return Ok(if st.healthy.load(Relaxed) {
            text_response(200, "ok\n".into())
        } else {
            text_response(503, "unhealthy\n".into())
        });
    }
    st.requests.fetch_add(1, Relaxed);
    if path.ends_with("/ws") {
        return Ok(websocket_echo(req));
    }
    let delay = st.delay_ms.load(Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if path.ends_with("/sum") {
        let mut body = req.into_body();
        let (mut len, mut hash) = (0usize, FNV_OFFSET);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        len += d.len();
                        hash = fnv1a(hash, d);
                    }
                }
                Err(e) => return Ok(text_response(400, format!("body: {e}\n"))),
            }
        }
        return Ok(text_response(200, format!("{len} {hash:016x}\n")));
    }
    if path.ends_with("/sink") {
        return Ok(match req.into_body().collect().await {
            Ok(b) => text_response(200, format!("{}\n", b.to_bytes().len())),
            Err(e) => text_response(400, format!("body: {e}\n")),
        });
    }
    if let Some(n) = path
        .rsplit_once("/bytes/")
        .and_then(|(_, n)| n.parse().ok())
    {
        return Ok(text_response(200, pattern_body(n)));
    }
    if path.ends_with("/echo") {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            match headers.get_mut(k.as_str()) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&v);
                }
                _ => {
                    headers.insert(k.as_str().to_string(), Value::String(v));
                }
            }
        }
        let body = json!({
            "served_by": st.version,
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        return Ok(text_response(200, body.to_string()));
    }
    let n = st.seq.fetch_add(1, Relaxed) + 1;
    let every = st.fail_every.load(Relaxed);
    let status = if every > 0 && n.is_multiple_of(every) {
        500
    } else {
        st.status.load(Relaxed)
    };
    Ok(text_response(
        status,
        format!("hello from {}\n", st.version),
    ))
}

/// FNV-1a's starting value: `fnv1a(FNV_OFFSET, bytes)` hashes `bytes`.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a (64 bit) of `bytes`, continued from `hash`: the checksum `…/sum` answers
/// with, which a test computes over what it sent (a body cut, reordered or with a
/// piece twice does not match).
pub fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` bytes of a repeating alphabet whose period (23) is prime to every buffer
/// size, so a body cut, shifted or spliced anywhere never equals it.
pub fn pattern_body(n: usize) -> String {
    // By whole periods (a copy each), not byte by byte: bodies of tens of MiB.
    let mut s = "abcdefghijklmnopqrstuvw".repeat(n / 23 + 1);
    s.truncate(n);
    s
}

/// Accepts a WebSocket handshake and echoes every text or binary message.
fn websocket_echo(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text_response(400, "not a websocket handshake\n".into());
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Long enough for a test that keeps a WebSocket open across its whole run.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            else {
                break;
            };
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::default())
        .expect("101 response")
}

// ---------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------

/// A response as the tests look at it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The `x-canary-version` the proxy put on the response.
    pub fn version(&self) -> Option<&str> {
        self.header("x-canary-version")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON (for `/echo`).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// One request with a bounded wait; `Err` for transport errors and timeouts.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| format!("{url}: no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Parses one sample of a Prometheus text exposition: the value of `name` whose
/// labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, lbls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let have: Vec<(&str, &str)> = lbls
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            if labels.iter().all(|l| have.contains(l)) {
                value.parse().ok()
            } else {
                None
            }
        })
}

/// Runs the `canary` binary with `args` (bounded: killed after 60 s).
pub async fn run_canary(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cwd = cwd.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canary"));
        cmd.args(&args)
            .env_remove("CANARY_ADMIN_TOKEN")
            .env_remove("CANARY_ADMIN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        if let Some(d) = &cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().expect("spawn canary");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    break;
                }
            }
        }
        let out = child.wait_with_output().expect("canary output");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("cli task")
}

// ---------------------------------------------------------------------------------
// The canary process
// ---------------------------------------------------------------------------------

/// A `canary serve` child process with its own tempdir, config file, state_dir and
/// ports. Killed on drop.
pub struct Canary {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    env: Vec<(String, String)>,
    /// A program (and its arguments) that runs `canary serve`, `{listen}` replaced
    /// by the proxy address: e.g. `systemd-socket-activate -l {listen}`.
    wrapper: Vec<String>,
    child: Option<Child>,
    client: HttpClient,
}

impl Canary {
    /// Starts `canary serve` with `body` (everything but `listen`, `admin` and
    /// `state_dir`, which the harness adds) and waits until it is ready.
    pub async fn start(body: &str) -> Canary {
        Canary::start_with(body, &[]).await
    }

    /// Like [`Canary::start`] with extra environment variables for the child.
    pub async fn start_with(body: &str, env: &[(&str, &str)]) -> Canary {
        Canary::start_wrapped(body, env, &[]).await
    }

    /// Like [`Canary::start_with`], `canary serve` run by `wrapper` (see
    /// [`Canary::wrapper`]'s field doc).
    pub async fn start_wrapped(body: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Canary {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("canary.yaml");
        let log_path = dir.path().join("canary.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = Canary {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            config_path,
            log_path,
            env,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            child: None,
            client: client(),
            dir,
        };
        // A port picked here may be taken by someone else before the child binds it:
        // retry with fresh ports in that (rare) case.
        for attempt in 0..3 {
            if attempt > 0 || c.listen == c.admin {
                c.kill9();
                c.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
                c.admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            }
            let _ = std::fs::remove_file(&c.log_path);
            c.write_config(body);
            c.spawn();
            match c.wait_ready().await {
                Ok(()) => return c,
                Err(log) if log.contains("binding") && attempt < 2 => {}
                Err(log) => panic!("canary did not become ready:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts `canary serve` without waiting for `/readyz` (a fleet member is not
    /// ready before a fleet document exists); returns once `/healthz` answers.
    pub async fn start_unready(body: &str) -> Canary {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Canary {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            config_path: dir.path().join("canary.yaml"),
            log_path: dir.path().join("canary.log"),
            env: Vec::new(),
            wrapper: Vec::new(),
            child: None,
            client: client(),
            dir,
        };
        c.write_config(body);
        c.spawn();
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("http://{}/healthz", c.admin);
        loop {
            let fut = send(&c.client, Method::GET, &url, &[], "");
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), fut).await {
                if r.status == 200 {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "canary did not answer /healthz:\n{}",
                c.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until `/readyz` answers 200; panics with the log otherwise.
    pub async fn wait_until_ready(&mut self) {
        if let Err(log) = self.wait_ready().await {
            panic!("canary did not become ready:\n{log}");
        }
    }

    /// The text written before `body`: the per-instance addresses and state dir.
    pub fn header(&self) -> String {
        format!(
            "listen: {}\nadmin: {}\nstate_dir: {}\n",
            self.listen,
            self.admin,
            self.dir.path().join("state").display()
        )
    }

    /// The whole file as it is written for `body`.
    pub fn full_config(&self, body: &str) -> String {
        format!("{}{}", self.header(), body)
    }

    /// Replaces the config file the way editors do (write a temp file, rename).
    pub fn write_config(&self, body: &str) {
        self.write_raw_config(&self.full_config(body));
    }

    /// Replaces the config file with exactly `text`.
    pub fn write_raw_config(&self, text: &str) {
        let tmp = self.dir.path().join(".canary.yaml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    fn spawn(&mut self) {
        self.child = Some(self.command().spawn().expect("spawn canary serve"));
    }

    /// The `canary serve` command line, output to the log files.
    fn command(&self) -> Command {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let out = File::create(self.dir.path().join("canary.stdout")).expect("stdout file");
        let bin = env!("CARGO_BIN_EXE_canary");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                let listen = self.listen.to_string();
                cmd.args(args.iter().map(|a| a.replace("{listen}", &listen)));
                cmd.arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("CANARY_LOG", "info")
            .env_remove("CANARY_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Replaces the running child by a new `canary serve --takeover`, which takes its
    /// listening sockets; waits (bounded) until the old one has drained and exited
    /// and the new one is ready. Panics (both killed) if either does not.
    pub async fn takeover(&mut self) {
        let mut old = self
            .child
            .take()
            .expect("a running canary to take over from");
        let mut cmd = self.command();
        cmd.arg("--takeover");
        self.child = Some(cmd.spawn().expect("spawn canary serve --takeover"));
        let deadline = Instant::now() + READY_TIMEOUT + Duration::from_secs(15);
        loop {
            match old.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "the old canary exited with {status}:\n{}",
                        self.log()
                    );
                    break;
                }
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = old.kill();
                    let _ = old.wait();
                    self.kill9();
                    panic!(
                        "the old canary did not exit after a takeover:\n{}",
                        self.log()
                    );
                }
            }
        }
        if let Err(log) = self.wait_ready().await {
            panic!("the new canary is not ready after a takeover:\n{log}");
        }
    }

    /// Waits (bounded) until `/readyz` answers 200; `Err(log)` if the child exits or
    /// the time is up.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("http://{}/readyz", self.admin);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("canary exited with {status}:\n{}", self.log()));
                }
            }
            if !self.wrapper.is_empty() {
                // A socket-activating wrapper starts canary at the first connection.
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(self.listen),
                )
                .await;
            }
            let fut = send(&self.client, Method::GET, &url, &[], "");
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), fut).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the child with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the child again with the same tempdir, state_dir, config and ports.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(log) = self.wait_ready().await {
            panic!("canary did not come back after a restart:\n{log}");
        }
    }

    /// The child's process id while it runs (for signals and `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the child wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The proxy's base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// A GET through the proxy; panics on transport errors.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let url = self.url(path);
        send(&self.client, Method::GET, &url, headers, "")
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// Any call to the admin API: (status, JSON body or `null`).
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("http://{}{path}", self.admin);
        let r = send(&self.client, method.clone(), &url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.admin(Method::GET, path, "", &[]).await
    }

    pub async fn admin_put(&self, path: &str, body: &str) -> (u16, Value) {
        self.admin(Method::PUT, path, body, &[]).await
    }

    pub async fn admin_post(&self, path: &str, body: &str) -> (u16, Value) {
        self.admin(Method::POST, path, body, &[]).await
    }

    /// `GET /api/v1/routes/{route}`, which must answer 200.
    pub async fn status(&self, route: &str) -> Value {
        let (code, v) = self.admin_get(&format!("/api/v1/routes/{route}")).await;
        assert_eq!(code, 200, "status of {route}: {v}");
        v
    }

    /// Polls the route's status until `pred` holds; panics with the last status (and
    /// the log) after `timeout`.
    pub async fn wait_status(
        &self,
        route: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(route).await;
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "route {route}: not {what} within {timeout:?}; last status: {s:#}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the route's weight is `w` (e.g. after a reload).
    pub async fn wait_weight(&self, route: &str, w: f64) -> Value {
        self.wait_status(
            route,
            &format!("at weight {w}"),
            Duration::from_secs(10),
            |s| s["weight"].as_f64() == Some(w),
        )
        .await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let r = send(&self.client, Method::GET, &url, &[], "")
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(r.status, 200, "/metrics: {}", r.body);
        r.body
    }

    /// Runs a CLI verb against this instance's admin API: (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_env(args, &[]).await
    }

    /// Like [`Canary::cli`] with extra environment variables.
    pub async fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let admin = format!("http://{}", self.admin);
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--admin", admin.as_str()]);
        run_canary(&all, env, Some(self.dir.path())).await
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------

/// One request of a load run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub sent: Instant,
    pub done: Instant,
    /// 0 for a transport error or timeout.
    pub status: u16,
    pub version: Option<String>,
}

/// What a load run does; every run is bounded in count and time.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub max_requests: u64,
    pub max_duration: Duration,
    /// Pause between two requests of one task.
    pub pause: Duration,
    pub path: String,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            concurrency: 4,
            max_requests: 20_000,
            max_duration: Duration::from_secs(8),
            pause: Duration::ZERO,
            path: "/".into(),
        }
    }
}

/// Background traffic of distinct users (`x-user-id: load-<n>`, n never repeats).
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let c = client();
        let tasks = (0..spec.concurrency)
            .map(|_| {
                let (stop, samples, counter, c, spec) = (
                    stop.clone(),
                    samples.clone(),
                    counter.clone(),
                    c.clone(),
                    spec.clone(),
                );
                let url = format!("http://{addr}{}", spec.path);
                tokio::spawn(async move {
                    while !stop.load(Relaxed) && started.elapsed() < spec.max_duration {
                        let n = counter.fetch_add(1, Relaxed);
                        if n >= spec.max_requests {
                            break;
                        }
                        let user = format!("load-{n}");
                        let sent = Instant::now();
                        let r = send(&c, Method::GET, &url, &[("x-user-id", &user)], "").await;
                        let s = Sample {
                            sent,
                            done: Instant::now(),
                            status: r.as_ref().map_or(0, |r| r.status),
                            version: r.ok().and_then(|r| r.version().map(str::to_string)),
                        };
                        let failed = s.status == 0;
                        samples.lock().unwrap().push(s);
                        if failed {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        } else if !spec.pause.is_zero() {
                            tokio::time::sleep(spec.pause).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            samples,
        }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Stops the tasks, waits for them (bounded) and returns every sample.
    pub async fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            let abort = t.abort_handle();
            if tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let s = self.samples.lock().unwrap().clone();
        s
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Sends one GET per user concurrently (`concurrency` in flight) and returns, in
/// order, the version each user got. Panics on a non-200 answer.
pub async fn versions_for(
    c: &Canary,
    path: &str,
    header: &str,
    users: &[String],
    concurrency: usize,
) -> Vec<String> {
    let url = c.url(path);
    let http = client();
    let mut out = vec![String::new(); users.len()];
    let chunks: Vec<Vec<(usize, String)>> = (0..concurrency)
        .map(|k| {
            users
                .iter()
                .enumerate()
                .skip(k)
                .step_by(concurrency)
                .map(|(i, u)| (i, u.clone()))
                .collect()
        })
        .collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (http, url, header) = (http.clone(), url.clone(), header.to_string());
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(chunk.len());
                for (i, user) in chunk {
                    let r = send(
                        &http,
                        Method::GET,
                        &url,
                        &[(header.as_str(), user.as_str())],
                        "",
                    )
                    .await
                    .unwrap_or_else(|e| panic!("GET {url} as {user}: {e}"));
                    assert_eq!(r.status, 200, "GET {url} as {user}: {r:?}");
                    let v = r.version().expect("x-canary-version").to_string();
                    got.push((i, v));
                }
                got
            })
        })
        .collect();
    for t in tasks {
        for (i, v) in t.await.expect("request task") {
            out[i] = v;
        }
    }
    out
}

/// Share of `v` in `versions`, in percent.
pub fn share(versions: &[String], v: &str) -> f64 {
    100.0 * versions.iter().filter(|x| *x == v).count() as f64 / versions.len().max(1) as f64
}

/// A YAML flow list of upstream addresses: `["127.0.0.1:1", "127.0.0.1:2"]`.
pub fn addrs(ups: &[&Upstream]) -> String {
    let v: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!("[{}]", v.join(", "))
}
