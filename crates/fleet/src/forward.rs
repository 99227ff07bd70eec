//! HTTP between members: a follower hands a command to the leader's admin API, the
//! leader pulls every member's counters (`/api/v1/fleet/sample`), and any member asks
//! the others for their applied revisions when `/api/v1/fleet` is read.
//!
//! A command is forwarded rather than queued in etcd so the caller gets the leader's
//! real answer (the new status, or the 409 of a refused promote) in one round trip.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use canary_control::Command;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::evidence::Sample;
use crate::node::Shared;

pub(crate) type Http = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    http: &Http,
    method: Method,
    url: &str,
    body: Option<Value>,
    auth: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = req
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(timeout, http.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| format!("{url}: body not received within {timeout:?}"))?
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
    Ok((status, v))
}

/// Sends `cmd` for `route` to the admin API at `admin` (the leader).
pub(crate) async fn send(
    http: &Http,
    admin: &str,
    route: &str,
    cmd: &Command,
    auth: Option<&str>,
) -> Result<Value, (u16, String)> {
    let (method, verb, body) = match cmd {
        Command::Promote { full } => (Method::POST, "promote", json!({ "full": full })),
        Command::Abort { reason } => {
            // The admin API prefixes a user's reason; send it back as the user wrote it.
            let r = reason
                .strip_prefix("user: ")
                .unwrap_or(if reason == "aborted by user" {
                    ""
                } else {
                    reason
                });
            (Method::POST, "abort", json!({ "reason": r }))
        }
        Command::Pause => (Method::POST, "pause", json!({})),
        Command::Resume => (Method::POST, "resume", json!({})),
        Command::Retry => (Method::POST, "retry", json!({})),
        Command::SetWeight(w) => (Method::PUT, "weight", json!({ "weight": w.percent() })),
    };
    let url = format!(
        "{}/api/v1/routes/{route}/{verb}",
        admin.trim_end_matches('/')
    );
    match call(http, method, &url, Some(body), auth, Duration::from_secs(5)).await {
        Ok((code, v)) if (200..300).contains(&code) => Ok(v),
        Ok((code, v)) => Err((
            code,
            v["error"]
                .as_str()
                .unwrap_or("error from the leader")
                .to_string(),
        )),
        Err(e) => Err((502, format!("cannot reach the fleet's leader: {e}"))),
    }
}

/// Every other member's `/api/v1/fleet/sample`, asked in parallel with `timeout`
/// each: `Err` says why a member did not answer with its own sample.
async fn samples(sh: &Shared, timeout: Duration) -> Vec<(String, Result<Sample, String>)> {
    let members = sh.mirror().members(&sh.keys);
    let mut tasks = tokio::task::JoinSet::new();
    for (name, info) in members {
        if name == sh.member {
            continue;
        }
        let http = sh.http.clone();
        tasks.spawn(async move {
            let url = format!("{}/api/v1/fleet/sample", info.admin.trim_end_matches('/'));
            let got = match call(&http, Method::GET, &url, None, None, timeout).await {
                Ok((200, v)) => match serde_json::from_value::<Sample>(v) {
                    Ok(s) if s.member == name => Ok(s),
                    Ok(s) => Err(format!("{url} answers as member {:?}", s.member)),
                    Err(e) => Err(format!("{url}: {e}")),
                },
                Ok((code, _)) => Err(format!("{url}: HTTP {code}")),
                Err(e) => Err(e),
            };
            (name, got)
        });
    }
    let mut out = Vec::new();
    while let Some(Ok(answer)) = tasks.join_next().await {
        out.push(answer);
    }
    out
}

/// The leader's pull of every other member's counters (150 ms per member at most).
pub(crate) async fn scrape(sh: std::sync::Arc<Shared>) {
    for (_, got) in samples(&sh, Duration::from_millis(150)).await {
        match got {
            Ok(s) => sh.evidence.record(&s),
            Err(_) => {
                sh.metrics.scrape_failures.fetch_add(1, Relaxed);
            }
        }
    }
}

/// How long `/api/v1/fleet` waits for one member's answer: a frozen or unreachable
/// member costs a status read this much, never more (the members are asked together).
const PEER_TIMEOUT: Duration = Duration::from_millis(300);

/// Every other member's applied revision, asked now (in parallel, [`PEER_TIMEOUT`]
/// each): `Err` says why a member did not answer.
///
/// Asked rather than published: a member that wrote its applied revision to etcd would
/// create a revision that every member applies, and then publishes again.
pub(crate) async fn applied_revisions(
    sh: &Shared,
) -> std::collections::BTreeMap<String, Result<i64, String>> {
    samples(sh, PEER_TIMEOUT)
        .await
        .into_iter()
        .map(|(name, got)| (name, got.map(|s| s.applied_revision)))
        .collect()
}
