//! `canary fleet push`: validate a fleet document and write it with a compare-and-swap.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

use crate::keys::Keys;
use crate::FleetError;

/// Connects to etcd with short timeouts (a CLI must not hang on a dead endpoint).
pub async fn connect(endpoints: &[String]) -> Result<Client, FleetError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
    Client::connect(urls, Some(opts))
        .await
        .map_err(|e| FleetError::Etcd(e.to_string()))
}

/// What a push wrote.
#[derive(Debug)]
pub struct Pushed {
    pub key: String,
    pub revision: i64,
    pub routes: usize,
}

/// Validates `file` exactly as `canary validate` checks routes (every problem with
/// file:line:column) and writes it to `<prefix>/config` if it did not change since it
/// was read. Nothing is written when the file is invalid.
pub async fn push(file: &Path, endpoints: &[String], prefix: &str) -> Result<Pushed, FleetError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| {
        FleetError::Config(canary_config::ConfigError::single(
            &name,
            0,
            0,
            format!("cannot read the file: {e}"),
        ))
    })?;
    let routes = canary_config::parse_document(&name, &text).map_err(FleetError::Config)?;
    let keys = Keys::new(prefix);
    let mut c = connect(endpoints).await?;
    let timeout = Duration::from_secs(5);
    let etcd = |e: String| FleetError::Etcd(e);
    let got = tokio::time::timeout(timeout, c.get(keys.config(), None))
        .await
        .map_err(|_| etcd(format!("no answer from etcd at {endpoints:?} within 5s")))?
        .map_err(|e| etcd(e.to_string()))?;
    let seen = got.kvs().first().map_or(0, |kv| kv.mod_revision());
    let txn = Txn::new()
        .when([Compare::mod_revision(keys.config(), CompareOp::Equal, seen)])
        .and_then([TxnOp::put(keys.config(), text, None)]);
    let resp = tokio::time::timeout(timeout, c.txn(txn))
        .await
        .map_err(|_| etcd("no answer from etcd within 5s".into()))?
        .map_err(|e| etcd(e.to_string()))?;
    if !resp.succeeded() {
        return Err(FleetError::Conflict(format!(
            "{} changed while pushing; run the push again",
            keys.config()
        )));
    }
    Ok(Pushed {
        key: keys.config(),
        revision: resp.header().map_or(0, |h| h.revision()),
        routes: routes.len(),
    })
}
