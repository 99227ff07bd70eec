//! One fleet member at run time: the watch loop, the lease and the election, the
//! fenced writer, the controller loop, local aborts and breaker reports.
//!
//! Every member follows the store: it mirrors the prefix (a consistent read, then a
//! watch from the next revision) and applies the fleet document and the rollout states
//! it sees. Exactly one member, holding the lease-bound leader key, runs the controller's
//! ticks and writes; each of its writes is a transaction that only succeeds while the
//! leader key still has the create revision it won with (the fencing token).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use canary_config::Config;
use canary_control::controller::wall_ms;
use canary_control::store::ManualWeight;
use canary_control::{Command, Controller};
use canary_core::rollout::{Event, RolloutState};
use canary_core::Weight;
use canary_proxy::DataPlaneEvent;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::evidence::{Aggregator, RouteCounts, Sample};
use crate::keys::{Key, Keys};
use crate::metrics::Metrics;
use crate::mirror::{BreakerReport, Entry, LeaderInfo, ManualDoc, MemberInfo, Mirror, StateDoc};

/// A write the controller asked for, sent by the writer task while this member leads.
#[derive(Debug)]
pub enum Write {
    State(String, Option<RolloutState>),
    Manual(String, Option<ManualWeight>),
    Journal(String, Vec<Event>),
    DeleteBreaker(String, String),
}

/// A queued write: its sequence number, the leader term (fencing revision) it was
/// decided in, and the write.
pub(crate) type Queued = (u64, i64, Write);

/// What the writer has done: the highest sequence number it finished with, the highest
/// one etcd surely did not take, and the highest one whose fate is unknown (sent, no
/// answer, then leadership lost); 0: none.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stored {
    done: u64,
    refused: u64,
    unknown: u64,
}

/// How one write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Stored,
    /// Not in etcd: never sent, or the fence refused it.
    Refused,
    /// Sent without an answer, then this term ended: etcd may still apply it.
    Unknown,
}

/// How long the leader waits for etcd to take a command's writes before it answers.
/// Below the follower's 5 s forwarding timeout, so a forwarded command gets this
/// answer rather than a timeout.
const CONFIRM_WAIT: Duration = Duration::from_secs(4);

/// An abort made on this member while no leader was reachable: the canary stays at 0
/// here until the fleet's state shows the rollout no longer active.
#[derive(Clone, Debug)]
pub struct Hold {
    pub canary_version: String,
    pub reason: String,
    pub delivered: bool,
}

/// State shared by the member's tasks, the store, the admin endpoints and the gate.
pub struct Shared {
    pub keys: Keys,
    pub member: String,
    pub boot_id: String,
    pub admin_url: String,
    pub lease_ttl: Duration,
    pub local: Config,
    pub client: Client,
    mirror: Mutex<Mirror>,
    pub leading: AtomicBool,
    leader_rev: AtomicI64,
    lease_id: AtomicI64,
    pub connected: AtomicBool,
    pub applied_rev: AtomicI64,
    pub last_event_ms: AtomicU64,
    pub config_error: Mutex<Option<String>>,
    pub config_rev: AtomicI64,
    writes: mpsc::UnboundedSender<Queued>,
    /// The last sequence number given to a write; held while sending, so the writer
    /// receives them in order.
    queued: Mutex<u64>,
    stored: tokio::sync::watch::Sender<Stored>,
    pub holds: Mutex<BTreeMap<String, Hold>>,
    pending_breakers: Mutex<Vec<(String, BreakerReport)>>,
    pub metrics: Metrics,
    pub evidence: Arc<Aggregator>,
    controller: OnceLock<Arc<Controller>>,
    pub(crate) http: crate::forward::Http,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn entry(kv: &KeyValue) -> (String, Entry) {
    (
        String::from_utf8_lossy(kv.key()).into_owned(),
        Entry {
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            create_rev: kv.create_revision(),
            mod_rev: kv.mod_revision(),
        },
    )
}

/// Journal entries kept per route in etcd; older ones are deleted by the leader.
pub(crate) const JOURNAL_KEEP: u64 = 10_000;

/// The largest etcd answer a member decodes: a reload reads the whole prefix in one
/// answer, and a watch that catches up sends up to 1000 revisions in one. gRPC's
/// default of 4 MB is less than one route's full journal can take (10 000 events of
/// half a kilobyte and more), and a member that cannot decode its snapshot can never
/// reload again.
const MAX_MESSAGE: usize = 256 << 20;

/// How long one etcd request may take before it counts as failed.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from etcd within {RPC_TIMEOUT:?}")),
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        keys: Keys,
        member: String,
        boot_id: String,
        admin_url: String,
        lease_ttl: Duration,
        local: Config,
        client: Client,
        writes: mpsc::UnboundedSender<Queued>,
    ) -> Shared {
        Shared {
            keys,
            member,
            boot_id,
            admin_url,
            lease_ttl,
            local,
            client,
            mirror: Mutex::new(Mirror::default()),
            leading: AtomicBool::new(false),
            leader_rev: AtomicI64::new(0),
            lease_id: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            applied_rev: AtomicI64::new(0),
            last_event_ms: AtomicU64::new(0),
            config_error: Mutex::new(None),
            config_rev: AtomicI64::new(0),
            writes,
            queued: Mutex::new(0),
            stored: tokio::sync::watch::Sender::new(Stored::default()),
            holds: Mutex::new(BTreeMap::new()),
            pending_breakers: Mutex::new(Vec::new()),
            metrics: Metrics::default(),
            evidence: Arc::new(Aggregator::default()),
            controller: OnceLock::new(),
            http: crate::forward::http(),
        }
    }

    pub fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    pub(crate) fn set_controller(&self, c: Arc<Controller>) {
        let _ = self.controller.set(c);
    }

    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.controller.get()
    }

    pub(crate) fn write(&self, w: Write) {
        if self.leading.load(Relaxed) {
            let mut q = lock(&self.queued);
            *q += 1;
            let _ = self.writes.send((*q, self.leader_rev.load(Relaxed), w));
        }
    }

    /// The sequence number of the last write queued.
    pub(crate) fn queued(&self) -> u64 {
        *lock(&self.queued)
    }

    /// Waits until etcd took every write queued so far, and answers an error if one
    /// queued after `since` was not taken (leadership lost first) or etcd did not
    /// confirm within [`CONFIRM_WAIT`]. A leader answers a command only after this:
    /// "accepted" means stored, so the fleet cannot silently lose it.
    pub(crate) async fn confirm(&self, since: u64) -> Result<(), (u16, String)> {
        let target = self.queued();
        let mut rx = self.stored.subscribe();
        let got = tokio::time::timeout(CONFIRM_WAIT, rx.wait_for(|s| s.done >= target)).await;
        match got.map(|r| r.map(|s| *s)) {
            Ok(Ok(s)) if s.unknown <= since && s.refused <= since => Ok(()),
            Ok(Ok(s)) if s.unknown > since => Err((
                504,
                "etcd did not confirm the change before this member stopped leading: it may \
                 or may not be stored; check `canary status` and send it again if needed"
                    .to_string(),
            )),
            Ok(_) => Err((
                503,
                "not stored: this member stopped leading before etcd took the change, so \
                 the fleet keeps its stored state; retry the command"
                    .to_string(),
            )),
            Err(_) => Err((
                504,
                format!(
                    "etcd has not confirmed the change within {CONFIRM_WAIT:?}: it is made on \
                     the leader and is stored if etcd answers while this member leads; \
                     check `canary status` and retry if it is not there"
                ),
            )),
        }
    }

    /// Whether this member leads and reaches etcd: then commands run here.
    pub fn acting_leader(&self) -> bool {
        self.leading.load(Relaxed) && self.connected.load(Relaxed)
    }

    /// The leader as this member last saw it.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.mirror().leader(&self.keys).map(|(l, _)| l)
    }

    // ---- applying what the store holds ------------------------------------------

    /// Applies the changed keys: the document first, then route states, then breaker
    /// reports (leader only) and the leader key.
    /// `live`: the changes came from the watch (not a reload), so their write-to-apply
    /// delay is a propagation figure.
    fn on_changes(&self, changed: Vec<Key>, live: bool) {
        let mut config = false;
        let mut routes = BTreeSet::new();
        let mut breakers = false;
        let mut leader = false;
        for k in changed {
            match k {
                Key::Config => config = true,
                Key::State(r) | Key::Manual(r) => {
                    routes.insert(r);
                }
                Key::Breaker(..) => breakers = true,
                Key::Leader => leader = true,
                _ => {}
            }
        }
        // Also before the first document: the reason it is not ready is reported.
        if config || self.config_rev.load(Relaxed) == 0 {
            self.apply_config();
        }
        if live {
            let m = self.mirror();
            for r in &routes {
                let written = [
                    m.state(&self.keys, r).map(|d| d.written_ms),
                    m.manual(&self.keys, r).map(|d| d.written_ms),
                ];
                if let Some(w) = written.into_iter().flatten().max() {
                    self.metrics.observe_delay(wall_ms().saturating_sub(w));
                }
            }
        }
        if !self.leading.load(Relaxed) {
            if config {
                self.adopt_all();
            } else {
                for r in &routes {
                    self.adopt(r);
                }
            }
        }
        if breakers && self.leading.load(Relaxed) {
            self.handle_breakers();
        }
        if leader && self.leading.load(Relaxed) {
            let m = self.mirror();
            let ours = m
                .leader(&self.keys)
                .is_some_and(|(_, rev)| rev == self.leader_rev.load(Relaxed));
            let caught_up = m.revision >= self.leader_rev.load(Relaxed);
            drop(m);
            if caught_up && !ours {
                self.demote("the leader key is gone or no longer ours");
            }
        }
        if config || !routes.is_empty() {
            self.save_cache();
        }
    }

    fn apply_config(&self) {
        let Some(ctl) = self.controller() else { return };
        let Some((text, rev)) = self.mirror().config(&self.keys) else {
            let mut err = lock(&self.config_error);
            if self.config_rev.load(Relaxed) == 0 {
                *err = Some(format!(
                    "no fleet document at {} yet: push one with `canary fleet push`",
                    self.keys.config()
                ));
            } else {
                // A wiped or emptied store: keep serving what was applied.
                *err = Some(format!(
                    "{} is missing; serving the document of revision {}",
                    self.keys.config(),
                    self.config_rev.load(Relaxed)
                ));
            }
            return;
        };
        if rev == self.config_rev.load(Relaxed) {
            return;
        }
        let source = format!("etcd:{}@{rev}", self.keys.config());
        match canary_config::parse_document(&source, &text) {
            Ok(routes) => {
                let cfg = Config {
                    routes,
                    ..self.local.clone()
                };
                if let Err(e) = ctl.apply(&cfg) {
                    tracing::error!(error = %e, "fleet: applying the document");
                }
                self.config_rev.store(rev, Relaxed);
                *lock(&self.config_error) = None;
                tracing::info!(
                    revision = rev,
                    routes = cfg.routes.len(),
                    "fleet: document applied"
                );
            }
            Err(e) => {
                self.metrics.config_errors.fetch_add(1, Relaxed);
                ctl.reload_failed();
                let msg = e.to_string();
                tracing::error!("fleet: document rejected, keeping the last one:\n{msg}");
                *lock(&self.config_error) = Some(msg);
            }
        }
    }

    fn route_names(&self) -> Vec<String> {
        self.controller()
            .map(|c| c.statuses().into_iter().map(|s| s.name).collect())
            .unwrap_or_default()
    }

    fn adopt_all(&self) {
        for r in self.route_names() {
            self.adopt(&r);
        }
    }

    /// Puts one route's controller state and data plane in line with the store.
    fn adopt(&self, route: &str) {
        let Some(ctl) = self.controller() else { return };
        let (state, manual) = {
            let m = self.mirror();
            (m.state(&self.keys, route), m.manual(&self.keys, route))
        };
        let state = state.map(|d| d.state);
        let version = ctl.status(route).and_then(|s| s.canary_version);
        // The state of another canary version than this member's document names: the
        // leader has not written the new version's state yet; keep the local one.
        if state
            .as_ref()
            .is_some_and(|s| Some(&s.canary_version) != version.as_ref())
        {
            return;
        }
        ctl.adopt(route, state.clone(), manual.map(|d| d.manual));
        let mut holds = lock(&self.holds);
        if let Some(h) = holds.get(route) {
            let still = state
                .as_ref()
                .is_some_and(|s| s.phase.is_active() && s.canary_version == h.canary_version);
            if still {
                if let Some(rt) = ctl.proxy().runtime(route) {
                    rt.set_weight(Weight::ZERO);
                }
            } else {
                holds.remove(route);
            }
        }
    }

    fn handle_breakers(&self) {
        let Some(ctl) = self.controller() else { return };
        let reports = self.mirror().breakers(&self.keys);
        for (route, member, report) in reports {
            let current = ctl.status(&route);
            let live = current.as_ref().is_some_and(|s| {
                s.canary_version.as_deref() == Some(report.canary_version.as_str())
                    && s.phase.is_some_and(|p| p.is_active())
            });
            if live {
                tracing::warn!(
                    route,
                    member,
                    "fleet: breaker tripped on a member: aborting fleet-wide"
                );
                ctl.on_event(DataPlaneEvent::BreakerTripped {
                    route: route.clone(),
                    failures: report.failures,
                    // The member's own breaker counted the clients before it tripped.
                    clients: None,
                });
            }
            self.write(Write::DeleteBreaker(route, member));
        }
    }

    // ---- leadership ---------------------------------------------------------------

    fn promote(&self, rev: i64) {
        self.leader_rev.store(rev, Relaxed);
        self.evidence.reset();
        if let Some(ctl) = self.controller() {
            ctl.fresh_windows();
        }
        self.leading.store(true, Relaxed);
        self.metrics.leader_changes.fetch_add(1, Relaxed);
        tracing::info!(member = %self.member, fencing = rev, "fleet: this member leads");
        self.handle_breakers();
    }

    pub(crate) fn demote(&self, why: &str) {
        if self.leading.swap(false, Relaxed) {
            self.metrics.leader_changes.fetch_add(1, Relaxed);
            tracing::warn!(member = %self.member, "fleet: no longer leading: {why}");
            // What this member decided but etcd did not take is not the fleet's state.
            self.adopt_all();
        }
    }

    // ---- local aborts and breaker reports -----------------------------------------

    /// `abort` with no leader reachable: the canary of this member goes to 0 now; the
    /// abort is sent to the leader once there is one.
    pub fn local_abort(
        &self,
        route: &str,
        reason: &str,
    ) -> Result<serde_json::Value, (u16, String)> {
        let ctl = self.controller().ok_or((503, "not ready".to_string()))?;
        let status = ctl
            .status(route)
            .ok_or((404, format!("unknown route {route:?}")))?;
        let version = status
            .canary_version
            .clone()
            .ok_or((409, format!("route {route:?} has no canary")))?;
        if let Some(rt) = ctl.proxy().runtime(route) {
            rt.set_weight(Weight::ZERO);
        }
        lock(&self.holds).insert(
            route.to_string(),
            Hold {
                canary_version: version,
                reason: reason.to_string(),
                delivered: false,
            },
        );
        tracing::warn!(
            route,
            "fleet: no leader reachable: canary cut on this member, abort queued for the fleet"
        );
        let mut v = serde_json::to_value(ctl.status(route)).unwrap_or_default();
        v["fleet"] = serde_json::json!(
            "aborted on this member only (no leader reachable); sent to the fleet's leader when there is one"
        );
        Ok(v)
    }

    fn report_breaker(&self, route: String, failures: u32) {
        let Some(version) = self
            .controller()
            .and_then(|c| c.status(&route))
            .and_then(|s| s.canary_version)
        else {
            return;
        };
        lock(&self.pending_breakers).push((
            route,
            BreakerReport {
                canary_version: version,
                failures,
                at_ms: wall_ms(),
            },
        ));
    }

    /// Sends queued breaker reports and local aborts, when etcd and a leader answer.
    async fn deliver_pending(&self) {
        if !self.connected.load(Relaxed) {
            return;
        }
        let reports: Vec<_> = lock(&self.pending_breakers).drain(..).collect();
        for (route, report) in reports {
            let mut c = self.client.clone();
            let key = self.keys.breaker(&route, &self.member);
            let value = serde_json::to_string(&report).unwrap_or_default();
            if let Err(e) = timed(c.put(key, value, None)).await {
                tracing::warn!(route, error = %e, "fleet: breaker report not sent; retrying");
                lock(&self.pending_breakers).push((route, report));
            }
        }
        let due: Vec<(String, Hold)> = lock(&self.holds)
            .iter()
            .filter(|(_, h)| !h.delivered)
            .map(|(r, h)| (r.clone(), h.clone()))
            .collect();
        for (route, hold) in due {
            let cmd = Command::Abort {
                reason: hold.reason.clone(),
            };
            let done = if self.acting_leader() {
                matches!(
                    self.controller().map(|c| c.command(&route, cmd)),
                    Some(Ok(_) | Err(canary_control::ControlError::Conflict(_)))
                )
            } else if let Some(l) = self.leader().filter(|l| l.member != self.member) {
                match crate::forward::send(&self.http, &l.admin, &route, &cmd, None).await {
                    Ok(_) => true,
                    Err((code, _)) => code == 409,
                }
            } else {
                false
            };
            if done {
                tracing::info!(route, "fleet: queued abort delivered to the leader");
                if let Some(h) = lock(&self.holds).get_mut(&route) {
                    h.delivered = true;
                }
            }
        }
    }

    // ---- cache ------------------------------------------------------------------------

    fn cache_path(&self) -> std::path::PathBuf {
        self.local.state_dir.join("fleet-cache.json")
    }

    /// Writes the view to `fleet-cache.json` (temp file, fsync, rename) off the
    /// runtime thread, so a slow disk never delays applying the next change; a write
    /// older than one already made is skipped.
    fn save_cache(&self) {
        let (rev, bytes) = {
            let m = self.mirror();
            match serde_json::to_vec(&*m) {
                Ok(b) => (m.revision, b),
                Err(_) => return,
            }
        };
        let path = self.cache_path();
        let dir = self.local.state_dir.clone();
        static WRITING: Mutex<i64> = Mutex::new(0);
        let write = move || {
            let mut last = lock(&WRITING);
            if *last > rev {
                return;
            }
            let tmp = path.with_extension("json.tmp");
            let res = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&tmp, &bytes))
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path));
            match res {
                Ok(()) => *last = rev,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "fleet: cannot write the cache")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// Serves from the cache of a previous run, when etcd did not answer in time.
    pub(crate) fn load_cache(&self) -> bool {
        let Ok(bytes) = std::fs::read(self.cache_path()) else {
            return false;
        };
        let Ok(cached) = serde_json::from_slice::<Mirror>(&bytes) else {
            tracing::warn!("fleet: unreadable cache ignored");
            return false;
        };
        let kvs = cached.entries.into_iter().collect();
        let changed = self.mirror().replace(&self.keys, cached.revision, kvs);
        self.applied_rev.store(cached.revision, Relaxed);
        tracing::warn!(
            revision = cached.revision,
            "fleet: etcd unreachable: serving from the cache"
        );
        self.on_changes(changed, false);
        true
    }

    /// Gives up the lease at shutdown, so another member leads at once.
    pub(crate) async fn resign(&self) {
        let id = self.lease_id.load(Relaxed);
        if id != 0 {
            let mut c = self.client.clone();
            let _ = timed(c.lease_revoke(id)).await;
        }
    }
}

// ---- the tasks ------------------------------------------------------------------------

/// Mirrors the prefix: snapshot, then watch; reloads after any break.
pub(crate) async fn watch_loop(sh: Arc<Shared>, first: tokio::sync::watch::Sender<bool>) {
    let mut backoff = Duration::from_millis(100);
    let mut reason = "start";
    loop {
        match sync_once(&sh, reason, &first).await {
            Ok(next) => {
                reason = next;
                backoff = Duration::from_millis(100);
                tracing::info!(reason, "fleet: watch ended; reloading");
            }
            Err(e) => {
                if sh.connected.swap(false, Relaxed) || reason == "start" {
                    tracing::warn!(error = %e, "fleet: cannot read from etcd; serving the last config");
                }
                reason = "reconnect";
            }
        }
        sh.connected.store(false, Relaxed);
        // Jitter from the clock's low bits: members do not reconnect in lockstep.
        let jitter = Duration::from_millis(u64::from(std::process::id() % 50));
        tokio::time::sleep(backoff + jitter).await;
        // At most a second: with one etcd node of several down the client's balancer
        // still sends some requests to it, so a reconnect may take a few tries, and a
        // member should follow the store again soon after a good node answers.
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn sync_once(
    sh: &Arc<Shared>,
    reason: &'static str,
    first: &tokio::sync::watch::Sender<bool>,
) -> Result<&'static str, String> {
    let c = sh.client.clone();
    let mut kv = c.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let resp = timed(kv.get(sh.keys.range(), Some(GetOptions::new().with_prefix()))).await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let had = sh.mirror().revision;
    let reason = if rev < had {
        tracing::warn!(
            had,
            now = rev,
            "fleet: etcd's revision went backwards (wiped or restored): full reload"
        );
        "revision_back"
    } else {
        reason
    };
    let kvs: Vec<_> = resp.kvs().iter().map(entry).collect();
    let changed = sh.mirror().replace(&sh.keys, rev, kvs);
    sh.metrics.reload(reason);
    sh.connected.store(true, Relaxed);
    sh.applied_rev.store(rev, Relaxed);
    sh.last_event_ms.store(wall_ms(), Relaxed);
    sh.on_changes(changed, false);
    let _ = first.send(true);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1)
        .with_progress_notify();
    let mut watch = c.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let stream = timed(watch.watch(sh.keys.range(), Some(opts))).await?;
    let (mut requests, mut responses) = stream.split();
    let mut last = rev;
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    let mut last_msg = Instant::now();
    loop {
        tokio::select! {
            _ = progress.tick() => {
                // etcd-client does not notice a silently dead stream: ask for progress
                // and give up on a stream that answers nothing for 3 s.
                if last_msg.elapsed() > Duration::from_secs(3) {
                    return Ok("stalled");
                }
                let _ = requests.request_progress().await;
            }
            msg = responses.message() => {
                let Some(resp) = msg.map_err(|e| e.to_string())? else {
                    return Err("the watch stream ended".into());
                };
                last_msg = Instant::now();
                sh.last_event_ms.store(wall_ms(), Relaxed);
                let answer = Answer {
                    canceled: resp.canceled(),
                    created: resp.created(),
                    compact_revision: resp.compact_revision(),
                    watch_id: resp.watch_id(),
                    events: resp.events().len(),
                    revision: resp.header().map(|h| h.revision()),
                };
                let hrev = match answer.meaning(last) {
                    Meaning::Alive => continue,
                    Meaning::Reload(why) => {
                        if why == "revision_back" {
                            tracing::warn!(had = last, ?answer, "fleet: a watch answer's revision went backwards");
                        }
                        return Ok(why);
                    }
                    Meaning::Apply(rev) => rev,
                };
                let mut changed = Vec::new();
                {
                    let mut m = sh.mirror();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let (key, e) = entry(kv);
                        let value = match ev.event_type() {
                            EventType::Put => Some(e),
                            EventType::Delete => None,
                        };
                        if let Some(k) = m.apply(&sh.keys, &key, value) {
                            changed.push(k);
                        }
                    }
                    m.revision = m.revision.max(hrev);
                }
                last = hrev;
                sh.applied_rev.store(hrev, Relaxed);
                if !changed.is_empty() {
                    sh.on_changes(changed, true);
                }
            }
        }
    }
}

/// One watch answer, as far as the watch loop looks at it.
#[derive(Clone, Copy, Debug)]
struct Answer {
    canceled: bool,
    /// The answer that confirms the watch: its revision is the store's at that moment,
    /// not what the watch has delivered.
    created: bool,
    compact_revision: i64,
    /// -1: the answer to a progress request (not tied to one watch).
    watch_id: i64,
    events: usize,
    /// The header's revision.
    revision: Option<i64>,
}

/// What the watch loop does with an [`Answer`].
#[derive(Debug, PartialEq, Eq)]
enum Meaning {
    /// Proof the stream lives, nothing to apply.
    Alive,
    /// Apply the answer's events; the member has then seen the store up to this revision.
    Apply(i64),
    /// Give up the stream and read the whole prefix again, for this reason.
    Reload(&'static str),
}

impl Answer {
    /// `last`: the revision this member has applied so far.
    fn meaning(&self, last: i64) -> Meaning {
        if self.canceled {
            return Meaning::Reload(if self.compact_revision > 0 {
                "compacted"
            } else {
                "canceled"
            });
        }
        // etcd 3.4 answers a progress request at once with its current revision, ahead
        // of events still queued for a stream that fell behind (etcd-io/etcd#15220, fixed
        // after 3.4.23). Taken as applied, it made a member that woke from a freeze claim
        // a revision it had not applied, and then see its next event as going backwards.
        if (self.watch_id == -1 || self.created) && self.events == 0 {
            return Meaning::Alive;
        }
        let rev = self.revision.unwrap_or(last);
        if rev < last {
            return Meaning::Reload("revision_back");
        }
        Meaning::Apply(rev)
    }
}

/// Holds this member's lease (membership) and campaigns for the leader key.
pub(crate) async fn election_loop(sh: Arc<Shared>) {
    loop {
        if let Err(e) = lease_term(&sh).await {
            tracing::debug!(error = %e, "fleet: lease lost");
        }
        sh.demote("the lease was not renewed in time");
        sh.lease_id.store(0, Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn lease_term(sh: &Arc<Shared>) -> Result<(), String> {
    let mut c = sh.client.clone();
    let ttl = sh.lease_ttl.as_secs().max(2) as i64;
    let lease = timed(c.lease_grant(ttl, None)).await?.id();
    sh.lease_id.store(lease, Relaxed);
    let info = MemberInfo {
        admin: sh.admin_url.clone(),
        boot_id: sh.boot_id.clone(),
        started_ms: wall_ms(),
    };
    let value = serde_json::to_string(&info).unwrap_or_default();
    timed(c.put(
        sh.keys.member(&sh.member),
        value,
        Some(PutOptions::new().with_lease(lease)),
    ))
    .await?;
    let (mut keeper, mut acks) = timed(c.lease_keep_alive(lease)).await?;
    let mut last_ack = Instant::now();
    // Stop acting a second before the lease can expire: by then another member may
    // already lead (client-go's renew deadline < lease duration).
    let deadline = sh.lease_ttl.saturating_sub(Duration::from_secs(1));
    let mut renew = tokio::time::interval(sh.lease_ttl / 3);
    let mut check = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = renew.tick() => {
                keeper.keep_alive().await.map_err(|e| e.to_string())?;
            }
            ack = acks.message() => {
                match ack.map_err(|e| e.to_string())? {
                    Some(a) if a.ttl() > 0 => last_ack = Instant::now(),
                    Some(_) => return Err("the lease expired".into()),
                    None => return Err("the keep-alive stream ended".into()),
                }
            }
            _ = check.tick() => {
                if last_ack.elapsed() > deadline {
                    return Ok(());
                }
                let leaderless = sh.connected.load(Relaxed) && sh.mirror().leader(&sh.keys).is_none();
                if !sh.leading.load(Relaxed) && leaderless {
                    campaign(sh, lease).await?;
                }
            }
        }
    }
}

async fn campaign(sh: &Arc<Shared>, lease: i64) -> Result<(), String> {
    let key = sh.keys.leader();
    let info = LeaderInfo {
        member: sh.member.clone(),
        admin: sh.admin_url.clone(),
        boot_id: sh.boot_id.clone(),
    };
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            serde_json::to_string(&info).unwrap_or_default(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let mut c = sh.client.clone();
    let resp = timed(c.txn(txn)).await?;
    if resp.succeeded() {
        let rev = resp.header().map_or(0, |h| h.revision());
        sh.promote(rev);
    }
    Ok(())
}

/// Sends the leader's writes, each fenced by the leader key's create revision.
pub(crate) async fn writer_loop(sh: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut term = 0;
    let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
    while let Some((seq, fence, w)) = rx.recv().await {
        let outcome = if sh.leading.load(Relaxed) && sh.leader_rev.load(Relaxed) == fence {
            store_one(&sh, fence, &w, &mut term, &mut next_seq).await
        } else {
            Outcome::Refused
        };
        sh.stored.send_modify(|s| {
            s.done = seq;
            match outcome {
                Outcome::Stored => {}
                Outcome::Refused => s.refused = seq,
                Outcome::Unknown => s.unknown = seq,
            }
        });
    }
}

/// Sends one write, fenced by `fence`; retries while this member still leads in that
/// term.
async fn store_one(
    sh: &Arc<Shared>,
    fence: i64,
    w: &Write,
    term: &mut i64,
    next_seq: &mut BTreeMap<String, u64>,
) -> Outcome {
    if fence != *term {
        next_seq.clear();
        *term = fence;
    }
    let now = wall_ms();
    let k = &sh.keys;
    let json = |v: &dyn erased::Json| v.json();
    let ops: Vec<TxnOp> = match w {
        Write::State(r, Some(s)) => vec![TxnOp::put(
            k.state(r),
            json(&StateDoc {
                state: s.clone(),
                written_ms: now,
            }),
            None,
        )],
        Write::State(r, None) => vec![TxnOp::delete(k.state(r), None)],
        Write::Manual(r, Some(m)) => vec![TxnOp::put(
            k.manual(r),
            json(&ManualDoc {
                manual: m.clone(),
                written_ms: now,
            }),
            None,
        )],
        Write::Manual(r, None) => vec![TxnOp::delete(k.manual(r), None)],
        Write::Journal(r, evs) => {
            let seq = next_seq
                .entry(r.clone())
                .or_insert_with(|| sh.mirror().next_seq(r));
            let mut ops: Vec<TxnOp> = evs
                .iter()
                .map(|e| {
                    let op = TxnOp::put(k.journal(r, *seq), json(e), None);
                    *seq += 1;
                    op
                })
                .collect();
            // Keep the newest JOURNAL_KEEP entries of the route: one range delete
            // in the same fenced txn.
            if *seq > JOURNAL_KEEP + 1 {
                let end = k.journal(r, *seq - JOURNAL_KEEP);
                ops.push(TxnOp::delete(
                    k.journal(r, 0),
                    Some(DeleteOptions::new().with_range(end)),
                ));
            }
            ops
        }
        Write::DeleteBreaker(r, m) => vec![TxnOp::delete(k.breaker(r, m), None)],
    };
    // Puts of whole values are idempotent, so a write whose outcome is unknown (a
    // timeout) is simply sent again, still fenced. There is no attempt limit: a
    // leader reaches etcd (its lease is renewed there), so failures are an election
    // or a lost node, which pass; an unreachable etcd ends the lease and with it
    // this term, and a demoted member adopts what etcd holds.
    let mut attempt = 0u32;
    loop {
        if !sh.leading.load(Relaxed) || sh.leader_rev.load(Relaxed) != fence {
            return if attempt == 0 {
                Outcome::Refused
            } else {
                Outcome::Unknown
            };
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                k.leader(),
                CompareOp::Equal,
                fence,
            )])
            .and_then(ops.clone());
        let mut c = sh.client.clone();
        match timed(c.txn(txn)).await {
            Ok(r) if r.succeeded() => return Outcome::Stored,
            Ok(_) => {
                sh.metrics.fenced.fetch_add(1, Relaxed);
                sh.demote("a write was fenced: another member leads");
                // An earlier attempt without an answer may have landed before the fence.
                return if attempt == 0 {
                    Outcome::Refused
                } else {
                    Outcome::Unknown
                };
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "fleet: write failed; retrying");
                let pause =
                    Duration::from_millis(200 * u64::from(attempt)).min(Duration::from_secs(1));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Small helper so the writer can serialise its different value types in one closure.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// The controller loop of fleet mode: ticks and data-plane events while leading;
/// breaker reports and queued aborts always.
pub(crate) async fn controller_loop(sh: Arc<Shared>, ctl: Arc<Controller>) {
    let mut events = ctl.proxy().take_events();
    let mut tick = tokio::time::interval(canary_control::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The pull of the other members' counters runs beside the ticks, so a slow member
    // delays its own numbers, never the controller.
    let mut pull: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if sh.acting_leader() {
                    sh.evidence.record(&local_sample(&sh));
                    if pull.as_ref().is_none_or(|p| p.is_finished()) {
                        pull = Some(tokio::spawn(crate::forward::scrape(sh.clone())));
                    }
                    ctl.tick();
                }
                sh.deliver_pending().await;
            }
            Some(ev) = async { match events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                if let DataPlaneEvent::BreakerTripped { route, failures, .. } = &ev {
                    // Always reported: if this member's own abort does not reach etcd,
                    // the next leader still aborts the fleet.
                    sh.report_breaker(route.clone(), *failures);
                }
                if sh.acting_leader() {
                    ctl.on_event(ev);
                }
                sh.deliver_pending().await;
            }
        }
    }
}

/// This member's cumulative counters, as the sample endpoint answers.
pub fn local_sample(sh: &Shared) -> Sample {
    let mut routes = BTreeMap::new();
    if let Some(ctl) = sh.controller() {
        for name in sh.route_names() {
            // Routes with a canary: the only ones an analysis judges.
            if let Some((canary, stable)) = ctl.proxy().counts(&name) {
                routes.insert(
                    name,
                    RouteCounts {
                        canary: (&canary).into(),
                        stable: (&stable).into(),
                    },
                );
            }
        }
    }
    Sample {
        member: sh.member.clone(),
        boot_id: sh.boot_id.clone(),
        applied_revision: sh.applied_rev.load(Relaxed),
        routes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(watch_id: i64, events: usize, revision: i64) -> Answer {
        Answer {
            canceled: false,
            created: false,
            compact_revision: 0,
            watch_id,
            events,
            revision: Some(revision),
        }
    }

    #[test]
    fn a_progress_answer_ahead_of_queued_events_is_not_an_applied_revision() {
        // The member applied up to 17 and froze; etcd queued events 18..166 for it. On
        // waking it asks for progress and etcd 3.4 answers 167 before those events.
        assert_eq!(answer(-1, 0, 167).meaning(17), Meaning::Alive);
        assert_eq!(answer(0, 1, 18).meaning(17), Meaning::Apply(18));
        assert_eq!(answer(0, 2, 167).meaning(18), Meaning::Apply(167));
    }

    #[test]
    fn a_watch_answer_that_goes_back_or_is_canceled_reloads() {
        assert_eq!(answer(0, 1, 5).meaning(9), Meaning::Reload("revision_back"));
        let compacted = Answer {
            canceled: true,
            compact_revision: 40,
            ..answer(0, 0, 0)
        };
        assert_eq!(compacted.meaning(9), Meaning::Reload("compacted"));
        let canceled = Answer {
            compact_revision: 0,
            ..compacted
        };
        assert_eq!(canceled.meaning(9), Meaning::Reload("canceled"));
        // A watch created at 12 after a snapshot at 9: events 10..12 are still to come.
        let created = Answer {
            created: true,
            ..answer(0, 0, 12)
        };
        assert_eq!(created.meaning(9), Meaning::Alive);
        // etcd's own progress notice on a watch that is in sync: the store is at 14.
        assert_eq!(answer(0, 0, 14).meaning(12), Meaning::Apply(14));
    }
}
