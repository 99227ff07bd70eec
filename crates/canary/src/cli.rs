//! The CLI verbs that talk to a running `canary serve` through the admin API.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::output::printable;

/// Where the admin API is and how to authenticate.
#[derive(Args, Clone)]
pub struct Conn {
    /// Base URL of the admin API.
    #[arg(long, env = "CANARY_ADMIN", default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// Environment variable holding the admin token (sent as a bearer token if set).
    #[arg(long, default_value = "CANARY_ADMIN_TOKEN")]
    token_env: String,
    /// PEM bundle of the CAs that verify an `https://` admin URL (`admin_tls`);
    /// default: the system's roots.
    #[arg(long, env = "CANARY_ADMIN_CA", value_name = "PEM")]
    cacert: Option<std::path::PathBuf>,
}

/// A plain number: `nan`, `inf` and overflowing literals are usage errors here rather
/// than a confusing "body must be …" from the API (JSON has no such numbers).
fn finite_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number")),
    }
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Show routes: versions, weight, phase, step, last verdict.
    Status {
        route: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show it again every second until Ctrl-C (live on a terminal).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set a route's canary weight in percent (pauses an automatic rollout).
    Weight {
        route: String,
        /// Percent, 0–100 with up to two decimals (a negative one gets the API's
        /// "out of range", not a flag error).
        #[arg(allow_negative_numbers = true, value_parser = finite_number)]
        weight: f64,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a rollout to its next step now (`--full`: straight to promoted).
    Promote {
        route: String,
        #[arg(long)]
        full: bool,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Abort a rollout: canary weight 0 at once.
    Abort {
        route: String,
        #[arg(long)]
        reason: Option<String>,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Hold a rollout's automatic progress.
    Pause {
        route: String,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Continue a paused rollout.
    Resume {
        route: String,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Restart an aborted rollout from its first step.
    Retry {
        route: String,
        /// Print the route's new status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a route's decision journal, oldest first.
    Events {
        route: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON (with --follow: one entry per line).
        #[arg(long)]
        json: bool,
        /// Keep printing new entries as they are journaled, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait for a rollout to finish: exit 0 when promoted (or its version is stable), 1
    /// when aborted or replaced by another version, 2 on timeout.
    Wait {
        route: String,
        /// The canary version to wait for (default: the one being rolled out when
        /// `wait` starts). With it, `wait` also waits for a config that has not been
        /// applied yet, and exits 0 at once if the version is already stable.
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// How long to wait, e.g. 90s, 10m.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// One JSON object per line: each status change, then the outcome.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Exit code for errors other than the outcome `wait` reports (unknown route,
/// rejected token, unreachable API, a usage error).
pub(crate) const EXIT_ERROR: u8 = 3;

/// The admin API's client: `http://` or `https://` (verified).
type AdminClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

pub(crate) struct Api {
    base: String,
    token: Option<String>,
    /// `Err`: the `--cacert` bundle cannot be used (reported by the first call).
    client: Result<AdminClient, String>,
}

impl Conn {
    /// A connection to the admin API at `admin`, token from the default variable.
    pub(crate) fn to(admin: &str) -> Conn {
        Conn {
            admin: admin.to_string(),
            token_env: "CANARY_ADMIN_TOKEN".into(),
            cacert: None,
        }
    }
}

/// A client for `http://` and, verified against `cacert` or the system's roots,
/// `https://` admin URLs.
fn admin_client(cacert: Option<&std::path::Path>) -> Result<AdminClient, String> {
    let settings = canary_tls::ClientSettings {
        ca: cacert.map(std::path::Path::to_path_buf),
        ..Default::default()
    };
    let tls = canary_tls::client_config(&settings, &[], "--cacert").map_err(|e| e.to_string())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

impl Api {
    pub(crate) fn new(conn: &Conn) -> Api {
        Api {
            base: conn.admin.trim_end_matches('/').to_string(),
            token: std::env::var(&conn.token_env)
                .ok()
                .filter(|t| !t.is_empty()),
            client: admin_client(conn.cacert.as_deref()),
        }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| {
                format!(
                    "no answer from the admin API at {} within 10s: {}",
                    self.base,
                    crate::hint::UNREACHABLE
                )
            })?
            .map_err(|e| {
                format!(
                    "cannot reach the admin API at {}: {e}: {}",
                    self.base,
                    crate::hint::UNREACHABLE
                )
            })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
        Ok((status, v))
    }

    /// Calls and turns a non-2xx answer into an error message.
    pub(crate) async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let (status, v) = self.call(method, path, body).await?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(crate::hint::answer(
                status.as_u16(),
                &printable(v["error"].as_str().unwrap_or("error")),
            ))
        }
    }
}

fn route_path(route: &str, suffix: &str) -> String {
    // Route names are restricted to [A-Za-z0-9_.-] by the config, so no escaping is
    // needed for valid names; anything else simply gets a 404.
    format!("/api/v1/routes/{route}{suffix}")
}

pub(crate) fn pct(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{f:.0}%"),
        Some(f) => format!("{f}%"),
        None => "-".into(),
    }
}

pub(crate) fn verdict_text(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let sum = |s: &Value| {
        let p99 = s["p99_ms"]
            .as_f64()
            .map_or("-".into(), |p| format!("{p:.1}ms"));
        format!(
            "{} req, {:.2}% err, p99 {p99}",
            s["requests"],
            s["error_rate"].as_f64().unwrap_or(0.0) * 100.0
        )
    };
    format!(
        "{} (canary {}; stable {})",
        v["result"].as_str().unwrap_or("?"),
        sum(&v["canary"]),
        sum(&v["stable"])
    )
}

pub(crate) fn step_text(r: &Value) -> String {
    match (r["step"].as_u64(), r["steps"].as_array()) {
        (Some(s), Some(all)) if !all.is_empty() => format!("{}/{}", s + 1, all.len()),
        _ => "-".into(),
    }
}

pub(crate) fn print_table(routes: &[Value]) {
    let rows: Vec<[String; 8]> = routes
        .iter()
        .map(|r| {
            [
                r["name"].as_str().unwrap_or("").to_string(),
                r["mode"].as_str().unwrap_or("").to_string(),
                r["stable_version"].as_str().unwrap_or("").to_string(),
                r["canary_version"].as_str().unwrap_or("-").to_string(),
                pct(&r["weight"]),
                r["phase"].as_str().unwrap_or("-").to_string(),
                step_text(r),
                r["last_verdict"]["result"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    let head = [
        "ROUTE", "MODE", "STABLE", "CANARY", "WEIGHT", "PHASE", "STEP", "VERDICT",
    ];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(&head.map(String::from));
    for r in &rows {
        line(r);
    }
}

pub(crate) fn print_route(r: &Value) {
    print_table(std::slice::from_ref(r));
    outln!();
    outln!("{}", printable(r["message"].as_str().unwrap_or("")));
    if let Some(steps) = r["steps"].as_array().filter(|s| !s.is_empty()) {
        let cur = r["step"].as_u64();
        let plan: Vec<String> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mark = if Some(i as u64) == cur { "*" } else { "" };
                format!(
                    "{mark}{} ({})",
                    pct(&s["weight"]),
                    s["pause"].as_str().unwrap_or("")
                )
            })
            .collect();
        outln!("steps: {}", plan.join(" → "));
    }
    if !r["last_verdict"].is_null() {
        outln!("last verdict: {}", verdict_text(&r["last_verdict"]));
        if let Some(reasons) = r["last_verdict"]["reasons"]
            .as_array()
            .filter(|a| !a.is_empty())
        {
            for reason in reasons {
                outln!("  - {}", printable(reason.as_str().unwrap_or("")));
            }
        }
    }
    if let Some(a) = r["abort_reason"].as_str() {
        outln!("abort reason: {}", printable(a));
    }
    if let Some(u) = r["unsaved"].as_str() {
        outln!(
            "not saved to state_dir (retried every 5 s): {}",
            printable(u)
        );
    }
}

/// A journal position: `phase weight` during a rollout, `manual weight` on a route
/// with a canary and no rollout, `stable` on a route without a canary.
fn position_text(p: &Value) -> String {
    if p["no_canary"].as_bool() == Some(true) {
        return "stable".into();
    }
    format!(
        "{} {}",
        p["phase"].as_str().unwrap_or("manual"),
        pct(&p["weight"])
    )
}

/// One journal entry: time, kind, from → to, reason.
pub(crate) fn event_line(e: &Value) -> String {
    let kind = e["kind"].as_str().unwrap_or("");
    // A `complete` entry always ends without a canary; journals written before
    // positions said so have `"to":{"weight":0.0}` there.
    let to = if kind == "complete" {
        "stable".to_string()
    } else {
        position_text(&e["to"])
    };
    format!(
        "{}  {kind:<8} {} → {to}  {}",
        fmt_time(e["at_ms"].as_u64().unwrap_or(0)),
        position_text(&e["from"]),
        printable(e["reason"].as_str().unwrap_or("")),
    )
}

pub(crate) fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The one-thread runtime the admin-API verbs run on; the error is already printed.
pub(crate) fn client_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            errln!("canary: {e}");
            ExitCode::from(EXIT_ERROR)
        })
}

pub fn main(cmd: AdminCmd) -> ExitCode {
    let rt = match client_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(run(cmd)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            errln!("canary: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(cmd: AdminCmd) -> Result<u8, String> {
    match cmd {
        AdminCmd::Status {
            route,
            json,
            watch,
            conn,
        } => {
            if watch {
                return crate::watch::status(&conn, route.as_deref(), json).await;
            }
            let api = Api::new(&conn);
            let v = match &route {
                Some(r) => api.ok(Method::GET, &route_path(r, ""), None).await?,
                None => api.ok(Method::GET, "/api/v1/routes", None).await?,
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(r) = &route {
                print_route(&v);
                // The dashboard's page of this route (docs/dashboard.md).
                outln!("dashboard: {}/ui/routes/{r}", api.base);
            } else {
                print_table(v.as_array().map(Vec::as_slice).unwrap_or_default());
            }
            Ok(0)
        }
        AdminCmd::Weight {
            route,
            weight,
            json,
            conn,
        } => {
            let v = Api::new(&conn)
                .ok(
                    Method::PUT,
                    &route_path(&route, "/weight"),
                    Some(json!({ "weight": weight })),
                )
                .await?;
            if json {
                return Ok(print_json(&v));
            }
            outln!(
                "{route}: weight {} ({})",
                pct(&v["weight"]),
                v["phase"]
                    .as_str()
                    .unwrap_or(v["mode"].as_str().unwrap_or(""))
            );
            Ok(0)
        }
        AdminCmd::Promote {
            route,
            full,
            json,
            conn,
        } => {
            let v = Api::new(&conn)
                .ok(
                    Method::POST,
                    &route_path(&route, "/promote"),
                    Some(json!({ "full": full })),
                )
                .await?;
            if json {
                return Ok(print_json(&v));
            }
            outln!(
                "{route}: {} at {} (step {})",
                v["phase"].as_str().unwrap_or("?"),
                pct(&v["weight"]),
                step_text(&v)
            );
            Ok(0)
        }
        AdminCmd::Abort {
            route,
            reason,
            json,
            conn,
        } => {
            let body = json!({ "reason": reason.unwrap_or_default() });
            let v = Api::new(&conn)
                .ok(Method::POST, &route_path(&route, "/abort"), Some(body))
                .await?;
            if json {
                return Ok(print_json(&v));
            }
            outln!("{route}: aborted, weight {}", pct(&v["weight"]));
            Ok(0)
        }
        AdminCmd::Pause { route, json, conn } => simple(&conn, &route, "pause", json).await,
        AdminCmd::Resume { route, json, conn } => simple(&conn, &route, "resume", json).await,
        AdminCmd::Retry { route, json, conn } => simple(&conn, &route, "retry", json).await,
        AdminCmd::Events {
            route,
            limit,
            json,
            follow,
            conn,
        } => {
            if follow {
                return crate::watch::events(&conn, &route, limit, json).await;
            }
            let v = Api::new(&conn)
                .ok(
                    Method::GET,
                    &route_path(&route, &format!("/events?limit={limit}")),
                    None,
                )
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(0);
            }
            for e in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                outln!("{}", event_line(e));
                if !e["verdict"].is_null() {
                    outln!("    evidence: {}", verdict_text(&e["verdict"]));
                }
            }
            Ok(0)
        }
        AdminCmd::Wait {
            route,
            version,
            timeout,
            json,
            conn,
        } => wait(&conn, &route, version, timeout, json).await,
    }
}

async fn simple(conn: &Conn, route: &str, verb: &str, json: bool) -> Result<u8, String> {
    let v = Api::new(conn)
        .ok(Method::POST, &route_path(route, &format!("/{verb}")), None)
        .await?;
    if json {
        return Ok(print_json(&v));
    }
    outln!(
        "{route}: {} at {} (step {})",
        v["phase"].as_str().unwrap_or("?"),
        pct(&v["weight"]),
        step_text(&v)
    );
    Ok(0)
}

/// `--json` of a command: the route's new status as the API answered it.
fn print_json(v: &Value) -> u8 {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    0
}

/// What `wait` follows: the canary version a pipeline deployed.
#[derive(Debug, Default)]
struct WaitTarget {
    /// The version waited for: from `--version`, else the canary of the first status
    /// that has a rollout.
    version: Option<String>,
    /// Whether the version has been seen on the route (as canary or stable) yet.
    seen: bool,
    /// Whether the version has been seen with a rollout: only then is a canary without
    /// one a rollout removed under `wait`, rather than nothing to wait for.
    rolled_out: bool,
}

impl WaitTarget {
    /// Judges one route status: `Some((exit code, message))` when the wait is over,
    /// `Err` when there is nothing to wait for.
    fn judge(&mut self, route: &str, r: &Value) -> Result<Option<(u8, String)>, String> {
        let stable = r["stable_version"].as_str().unwrap_or("");
        let canary = r["canary_version"].as_str();
        let phase = r["phase"].as_str();
        if self.version.is_none() {
            match (canary, phase) {
                (Some(c), Some(_)) => self.version = Some(c.to_string()),
                _ => {
                    return Err(format!(
                        "route {route:?} has no rollout to wait for (stable {stable}); \
                         `--version V` waits for V, and exits 0 if V is already stable"
                    ))
                }
            }
        }
        let want = self.version.clone().unwrap_or_default();
        if stable == want {
            return Ok(Some((
                0,
                format!("{route}: {want} is stable: rollout complete"),
            )));
        }
        if canary == Some(want.as_str()) {
            self.seen = true;
            if phase.is_none() && !self.rolled_out {
                // A canary at a fixed weight: nothing will ever promote it.
                return Err(format!(
                    "route {route:?} has no rollout to wait for: {want} is a canary at {} \
                     without a rollout (stable {stable}); it is promoted by making it the \
                     stable version in the config",
                    pct(&r["weight"])
                ));
            }
            self.rolled_out |= phase.is_some();
            return Ok(match phase {
                Some("promoted") => Some((
                    0,
                    format!(
                        "{route}: promoted — {}",
                        printable(r["message"].as_str().unwrap_or(""))
                    ),
                )),
                Some("aborted") => Some((
                    1,
                    format!(
                        "{route}: aborted — {}",
                        printable(r["abort_reason"].as_str().unwrap_or(""))
                    ),
                )),
                Some(_) => None,
                None => Some((
                    1,
                    format!(
                        "{route}: the rollout of {want} was removed from the config \
                         ({want} stays a canary at {} without a rollout)",
                        pct(&r["weight"])
                    ),
                )),
            });
        }
        if !self.seen {
            // `--version` named a version the running config does not have yet: the
            // pipeline has just deployed it and the reload is on its way.
            return Ok(None);
        }
        let now = match canary {
            Some(c) => format!("the canary is now {c}"),
            None => format!("the route has no canary; stable is {stable}"),
        };
        Ok(Some((
            1,
            format!("{route}: {want} will not be promoted: {now}"),
        )))
    }
}

/// Polls until the version waited for is promoted or stable (0), aborted or replaced
/// (1), or timeout (2), printing each change.
async fn wait(
    conn: &Conn,
    route: &str,
    version: Option<String>,
    timeout: Duration,
    json: bool,
) -> Result<u8, String> {
    let api = Api::new(conn);
    let deadline = Instant::now() + timeout;
    let mut view = crate::watch::WaitView::new(route, json);
    let mut target = WaitTarget {
        version,
        ..WaitTarget::default()
    };
    loop {
        match api.call(Method::GET, &route_path(route, ""), None).await {
            Ok((StatusCode::OK, r)) => {
                view.status(&r);
                if let Some((code, msg)) = target.judge(route, &r)? {
                    view.done(code, &msg);
                    return Ok(code);
                }
            }
            Ok((status, v)) => {
                return Err(crate::hint::answer(
                    status.as_u16(),
                    v["error"].as_str().unwrap_or("error"),
                ))
            }
            Err(e) => view.note(&format!("canary: {e}; retrying")),
        }
        if Instant::now() >= deadline {
            let msg = format!(
                "{route}: timed out after {}",
                humantime::format_duration(timeout)
            );
            view.done(2, &msg);
            return Ok(2);
        }
        tokio::time::sleep(
            Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_nan_and_inf_are_usage_errors_not_a_confusing_api_answer() {
        for bad in ["nan", "NaN", "inf", "-inf", "1e400", "30x", ""] {
            assert!(finite_number(bad).is_err(), "{bad}");
        }
        assert_eq!(finite_number("-1"), Ok(-1.0));
        assert_eq!(finite_number("12.5"), Ok(12.5));
    }

    fn status(stable: &str, canary: Option<&str>, phase: Option<&str>) -> Value {
        json!({"stable_version": stable, "canary_version": canary, "phase": phase,
               "mode": if phase.is_some() { "rollout" } else if canary.is_some() { "manual" } else { "stable" },
               "weight": 10.0, "message": "m", "abort_reason": "r"})
    }

    fn code(t: &mut WaitTarget, r: &Value) -> Option<u8> {
        t.judge("web", r)
            .expect("something to wait for")
            .map(|(c, _)| c)
    }

    #[test]
    fn wait_follows_the_first_version_it_sees() {
        let mut t = WaitTarget::default();
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("progressing"))),
            None
        );
        assert_eq!(t.version.as_deref(), Some("v2"));
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("paused"))),
            None
        );
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("promoted"))),
            Some(0)
        );
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("aborted"))),
            Some(1)
        );
        // Completed: the config names it stable (exit 0, not an error).
        assert_eq!(code(&mut t, &status("v2", None, None)), Some(0));
        // Replaced by another version, rolled back by the config, rollout removed.
        assert_eq!(
            code(&mut t, &status("v1", Some("v3"), Some("progressing"))),
            Some(1)
        );
        assert_eq!(code(&mut t, &status("v1", None, None)), Some(1));
        assert_eq!(code(&mut t, &status("v1", Some("v2"), None)), Some(1));
    }

    #[test]
    fn wait_without_a_rollout_needs_a_version_and_with_one_waits_for_it() {
        let mut t = WaitTarget::default();
        let err = t.judge("web", &status("v2", None, None)).unwrap_err();
        assert!(err.contains("--version"), "{err}");
        let mut t = WaitTarget {
            version: Some("v2".into()),
            ..WaitTarget::default()
        };
        assert_eq!(code(&mut t, &status("v2", None, None)), Some(0));
        let mut t = WaitTarget {
            version: Some("v3".into()),
            ..WaitTarget::default()
        };
        // Not deployed yet (another rollout still running, or no canary): keep waiting.
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("progressing"))),
            None
        );
        assert_eq!(code(&mut t, &status("v2", None, None)), None);
        assert_eq!(
            code(&mut t, &status("v2", Some("v3"), Some("waiting"))),
            None
        );
        // Once seen, another version replacing it ends the wait.
        assert_eq!(
            code(&mut t, &status("v2", Some("v4"), Some("progressing"))),
            Some(1)
        );
    }

    #[test]
    fn wait_for_a_canary_that_never_had_a_rollout_is_an_error_not_a_removed_rollout() {
        let plain = status("v1", Some("v2"), None);
        for version in [Some("v2".to_string()), None] {
            let mut t = WaitTarget {
                version,
                ..WaitTarget::default()
            };
            let err = t.judge("plain", &plain).unwrap_err();
            assert!(err.contains("has no rollout to wait for"), "{err}");
        }
        // Deployed as a canary without a rollout while `--version` waited for it.
        let mut t = WaitTarget {
            version: Some("v2".into()),
            ..WaitTarget::default()
        };
        assert_eq!(code(&mut t, &status("v1", None, None)), None);
        let err = t.judge("plain", &plain).unwrap_err();
        assert!(err.contains("without a rollout"), "{err}");
        // Its rollout removed while waiting: that is an outcome (1), as before.
        let mut t = WaitTarget::default();
        assert_eq!(
            code(&mut t, &status("v1", Some("v2"), Some("progressing"))),
            None
        );
        let (c, msg) = t.judge("web", &plain).unwrap().unwrap();
        assert_eq!(c, 1);
        assert!(msg.contains("was removed from the config"), "{msg}");
    }

    #[test]
    fn events_show_a_route_without_a_canary_as_stable_not_manual_0() {
        let e = |kind: &str, from: Value, to: Value| json!({"at_ms": 0, "kind": kind, "from": from, "to": to, "reason": "r"});
        let promoted = json!({"phase": "promoted", "step": 2, "weight": 100.0});
        let line = event_line(&e(
            "complete",
            promoted.clone(),
            json!({"weight": 0.0, "no_canary": true}),
        ));
        assert!(line.contains("promoted 100% → stable  r"), "{line}");
        // A journal written before `no_canary` existed.
        let line = event_line(&e("complete", promoted, json!({"weight": 0.0})));
        assert!(line.contains("promoted 100% → stable  r"), "{line}");
        let line = event_line(&e(
            "start",
            json!({"weight": 0.0, "no_canary": true}),
            json!({"phase": "progressing", "step": 0, "weight": 10.0}),
        ));
        assert!(
            line.contains("start    stable → progressing 10%  r"),
            "{line}"
        );
        let line = event_line(&e(
            "weight",
            json!({"weight": 10.0}),
            json!({"weight": 30.0}),
        ));
        assert!(
            line.contains("weight   manual 10% → manual 30%  r"),
            "{line}"
        );
    }

    #[test]
    fn an_abort_reason_with_a_newline_cannot_forge_a_journal_line() {
        let pos = json!({"phase": "progressing", "step": 0, "weight": 10.0});
        let forged =
            "oops\n2026-12-05T08:00:00Z  promote  progressing 10% → promoted 100%  ok\u{1b}[2J";
        let line = event_line(
            &json!({"at_ms": 0, "kind": "abort", "from": pos, "to": pos, "reason": forged}),
        );
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line:?}");
        assert!(line.ends_with("oops\\n2026-12-05T08:00:00Z  promote  progressing 10% → promoted 100%  ok\\u{1b}[2J"), "{line:?}");
    }
}
