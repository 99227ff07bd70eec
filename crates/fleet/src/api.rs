//! The fleet's admin endpoints and the command gate.
//!
//! - `GET /api/v1/fleet`: this member's view (leader, connection, applied revision,
//!   config error, members); answered from memory, so it works while etcd is down,
//!   plus each other member's applied revision, asked of that member as it answers.
//! - `GET /api/v1/fleet/sample`: this member's cumulative counters, for the leader.
//! - The [`CommandGate`]: commands run here when this member leads, and are answered
//!   once etcd took their writes; a follower forwards them to the leader; with no
//!   leader reachable only `abort` acts, locally.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use canary_control::controller::wall_ms;
use canary_control::gate::{CommandGate, GateFuture};
use canary_control::Command;
use canary_proxy::expo::Exposition;
use serde_json::{json, Value};

use crate::node::{local_sample, Shared};

/// What `GET /api/v1/fleet` answers; `peers`: the other members' applied revisions as
/// they answered just now (`Err`: why not), see `forward::applied_revisions`.
pub fn status(sh: &Shared, peers: &BTreeMap<String, Result<i64, String>>) -> Value {
    let m = sh.mirror();
    let leader = m.leader(&sh.keys).map(|(l, _)| l);
    let leading = sh.leading.load(Relaxed);
    let members: Vec<Value> = m
        .members(&sh.keys)
        .into_iter()
        .map(|(name, info)| {
            let (applied, error) = if name == sh.member {
                (Some(sh.applied_rev.load(Relaxed)), None)
            } else {
                match peers.get(&name) {
                    Some(Ok(rev)) => (Some(*rev), None),
                    Some(Err(e)) => (None, Some(e.clone())),
                    // Listed since the member answered: it joined meanwhile.
                    None => (None, Some("not asked yet".to_string())),
                }
            };
            json!({
                "member": name,
                "admin": info.admin,
                "boot_id": info.boot_id,
                "applied_revision": applied,
                "error": error,
                "leader": leader.as_ref().is_some_and(|l| l.member == name),
            })
        })
        .collect();
    let connected = sh.connected.load(Relaxed);
    let last = sh.last_event_ms.load(Relaxed);
    let local_aborts: Vec<String> = sh
        .holds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    json!({
        "member": sh.member,
        "prefix": sh.keys.range().trim_end_matches('/'),
        "leader": leader.map(|l| l.member),
        "leading": leading,
        "connected": connected,
        "stale": !connected,
        "applied_revision": sh.applied_rev.load(Relaxed),
        "config_revision": sh.config_rev.load(Relaxed),
        "config_error": *sh.config_error.lock().unwrap_or_else(|p| p.into_inner()),
        "last_event_age_seconds": if last == 0 { Value::Null } else { json!(wall_ms().saturating_sub(last) as f64 / 1000.0) },
        "lease_ttl_seconds": sh.lease_ttl.as_secs(),
        "local_aborts": local_aborts,
        "members": members,
    })
}

/// The fleet endpoints, merged into the admin router.
pub fn router(sh: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/v1/fleet",
            get(|State(sh): State<Arc<Shared>>| async move {
                let peers = crate::forward::applied_revisions(&sh).await;
                Json(status(&sh, &peers))
            }),
        )
        .route(
            "/api/v1/fleet/sample",
            get(|State(sh): State<Arc<Shared>>| async move { Json(local_sample(&sh)) }),
        )
        .with_state(sh)
}

/// The gate over the admin API's commands.
pub struct Gate(pub Arc<Shared>);

impl CommandGate for Gate {
    fn command(&self, route: &str, cmd: &Command, auth: Option<&str>) -> Option<GateFuture> {
        let sh = self.0.clone();
        if sh.acting_leader() {
            // Run here, and answer once etcd took the writes (see `Shared::confirm`).
            let ctl = sh.controller()?.clone();
            let (route, cmd) = (route.to_string(), cmd.clone());
            return Some(Box::pin(async move {
                let since = sh.queued();
                let status = ctl
                    .command(&route, cmd)
                    .map_err(|e| (e.http_status(), e.to_string()))?;
                sh.confirm(since).await?;
                Ok(serde_json::to_value(status).unwrap_or_default())
            }));
        }
        let leader = sh
            .leader()
            .filter(|l| l.member != sh.member && sh.connected.load(Relaxed));
        let (route, cmd, auth) = (route.to_string(), cmd.clone(), auth.map(str::to_string));
        Some(Box::pin(async move {
            if let Some(l) = leader {
                let answer =
                    crate::forward::send(&sh.http, &l.admin, &route, &cmd, auth.as_deref()).await;
                match (&answer, &cmd) {
                    // The leader is gone: an abort still acts here.
                    (Err((502, _)), Command::Abort { reason }) => sh.local_abort(&route, reason),
                    _ => answer,
                }
            } else if let Command::Abort { reason } = &cmd {
                sh.local_abort(&route, reason)
            } else {
                Err((
                    503,
                    "fleet store unavailable: no leader is reachable (etcd down or an election \
                     under way); only `abort` acts now, on this member. Retry when `canary \
                     fleet status` shows a leader"
                        .to_string(),
                ))
            }
        }))
    }

    fn encode_metrics(&self, e: &mut Exposition) {
        let sh = &self.0;
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        let last = sh.last_event_ms.load(Relaxed);
        sh.metrics.encode(
            e,
            &[
                (
                    "canary_fleet_connected",
                    "1 while this member's watch on etcd is live.",
                    b(sh.connected.load(Relaxed)),
                ),
                (
                    "canary_fleet_leader",
                    "1 while this member is the fleet's leader.",
                    b(sh.leading.load(Relaxed)),
                ),
                (
                    "canary_fleet_applied_revision",
                    "The etcd revision this member has applied.",
                    sh.applied_rev.load(Relaxed) as f64,
                ),
                (
                    "canary_fleet_config_error",
                    "1 while the fleet document in etcd is rejected.",
                    b(sh.config_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some()),
                ),
                (
                    "canary_fleet_members",
                    "Members with a live lease, as this member sees them.",
                    sh.mirror().members(&sh.keys).len() as f64,
                ),
                (
                    "canary_fleet_last_event_age_seconds",
                    "Seconds since the last message from etcd.",
                    if last == 0 {
                        0.0
                    } else {
                        wall_ms().saturating_sub(last) as f64 / 1000.0
                    },
                ),
            ],
        );
    }
}
