//! The CLI against an application that embeds `canary` (`canary-tower`): the real
//! `canary` binary's verbs talk to the embedded admin router as to `canary serve`.

mod common;

use std::time::Duration;

use canary_tower::{Canary, Rollout, RouteSpec};
use common::run_canary;

/// An embedded canary with a manual first step at 10 % and a timed 50 % step, its
/// admin router served on a loopback port; the returned address is the admin's.
async fn embedded(dir: &std::path::Path) -> (Canary, String, tokio::task::JoinHandle<()>) {
    let canary = Canary::builder()
        .state_dir(dir)
        .route(
            RouteSpec::new("web", "v1", "v2").rollout(
                Rollout::new()
                    .manual_step(10.0)
                    .step(50.0, Duration::from_secs(3600))
                    .breaker(5),
            ),
        )
        .start()
        .expect("start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn({
        let canary = canary.clone();
        async move {
            let _ = canary.serve_admin(listener).await;
        }
    });
    (canary, addr, server)
}

#[tokio::test]
async fn canary_status_and_promote_work_against_an_embedding_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (canary, admin, server) = embedded(dir.path()).await;

    let (code, out, err) = run_canary(&["status", "--admin", &admin], &[], None).await;
    assert_eq!(code, 0, "status: {out}{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("a row for web:\n{out}"));
    for want in ["rollout", "v1", "v2", "10%", "waiting", "1/2"] {
        assert!(
            row.split_whitespace().any(|w| w == want),
            "{want:?} in {row:?}"
        );
    }

    let (code, out, err) = run_canary(&["promote", "web", "--admin", &admin], &[], None).await;
    assert_eq!(code, 0, "promote: {out}{err}");
    let s = canary.status("web").expect("route");
    assert_eq!((s.step, s.weight), (Some(1), 50.0), "{s:?}");

    let (code, out, err) = run_canary(&["status", "web", "--admin", &admin], &[], None).await;
    assert_eq!(code, 0, "status web: {out}{err}");
    assert!(out.contains("50%"), "{out}");

    let (code, out, err) = run_canary(&["events", "web", "--admin", &admin], &[], None).await;
    assert_eq!(code, 0, "events: {out}{err}");
    assert!(out.contains("start") && out.contains("promote"), "{out}");
    server.abort();
}
