//! An axum application with a stable and a canary handler behind `canary-tower`.
//!
//! ```text
//! cargo run -p canary-tower --example axum_app
//! curl -si -H 'x-user-id: alice' http://127.0.0.1:3000/    # v1 or v2, x-canary-version
//! canary status --admin http://127.0.0.1:3001               # the rollout, from the CLI
//! curl -s http://127.0.0.1:3001/metrics                     # Prometheus metrics
//! ```
//!
//! Environment:
//! - `LISTEN` (default `127.0.0.1:3000`): the application; `/` answers `v1` (stable)
//!   or `v2` (canary).
//! - `WEIGHT` (percent, default 10): the canary weight of the rollout's first step,
//!   which waits for `canary promote web` (a manual pause). The breaker aborts the
//!   rollout after 5 consecutive canary failures.
//! - `ADMIN` (default `127.0.0.1:3001`): the admin API (`/api/v1`) and `/metrics`.
//! - `CANARY_FAIL=1`: the canary handler answers 500, so the breaker trips and the
//!   rollout aborts (`canary status` shows `aborted`; every user then gets `v1`).
//! - `STATE_DIR`: where the rollout's state and journal are kept (default: a new
//!   directory under the system's temporary directory, so each run starts afresh;
//!   set it to have a restart resume the rollout).
//!
//! The sticky key is the `x-user-id` header, else the `canary_id` cookie; a client
//! with neither gets a generated id in a `canary_id` cookie.

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use canary_tower::{Canary, Rollout, RouteSpec};

/// The value of an environment variable, parsed, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v = std::env::var(name).unwrap_or_else(|_| default.to_string());
    v.parse()
        .map_err(|e| format!("{name}={v:?} is not valid: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listen: SocketAddr = env_or("LISTEN", "127.0.0.1:3000")?;
    let admin: SocketAddr = env_or("ADMIN", "127.0.0.1:3001")?;
    let weight: f64 = env_or("WEIGHT", "10")?;
    let fail = std::env::var("CANARY_FAIL").is_ok_and(|v| v == "1");
    let state_dir = match std::env::var_os("STATE_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("canary-axum-app-{}", std::process::id())),
    };

    let canary = Canary::builder()
        .state_dir(&state_dir)
        .route(
            RouteSpec::new("web", "v1", "v2")
                .rollout(Rollout::new().manual_step(weight).breaker(5)),
        )
        .start()?;

    let v2 = if fail {
        get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "v2 failed") })
    } else {
        get(|| async { "v2" })
    };
    let app = Router::new()
        .route("/", get(|| async { "v1" }))
        .layer(canary.layer("web", v2));

    let admin_listener = tokio::net::TcpListener::bind(admin).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, %admin, weight, canary_fails = fail, state_dir = %state_dir.display(), "axum_app serving");
    let admin_canary = canary.clone();
    tokio::spawn(async move {
        if let Err(e) = admin_canary.serve_admin(admin_listener).await {
            tracing::error!(error = %e, "admin API not served");
        }
    });
    axum::serve(
        listener,
        // The client address, for `source` rules.
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    canary.stop();
    Ok(())
}
