//! The dashboard in a real browser: Debian's Chromium driven over W3C WebDriver
//! (`chromedriver`, plain HTTP/JSON with the harness's own client) against a real
//! `canary serve` with traffic.
//!
//! Without `chromium` and `chromedriver` on PATH the test prints why and passes, except
//! under `CI=true`, where it fails (scripts/test.sh installs both). Screenshots go to
//! the test's temp dir, and into `docs/img/` with `CANARY_UPDATE_SCREENSHOTS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{addrs, client, free_port, send, Canary, HttpClient, Load, LoadSpec, Upstream};
use http::Method;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-dashboard-token";
/// Generous: a debug build on a busy 2-core machine.
const EVENTUALLY: Duration = Duration::from_secs(20);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// `chromium` and `chromedriver`, or `None` (a panic under CI=true).
fn browser() -> Option<(PathBuf, PathBuf)> {
    match (on_path("chromium"), on_path("chromedriver")) {
        (Some(b), Some(d)) => Some((b, d)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but chromium or chromedriver is missing: apt-get install chromium chromium-driver (scripts/test.sh does)")
        }
        _ => {
            eprintln!("SKIPPED: no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)");
            None
        }
    }
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebDriver session; deleted, and chromedriver stopped, on drop.
struct Driver {
    base: String,
    session: String,
    http: HttpClient,
    _proc: Proc,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start(chromium: &Path, chromedriver: &Path) -> Driver {
        let port = free_port();
        let proc = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let proc = Proc(proc);
        let base = format!("http://127.0.0.1:{port}");
        let http = client();
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let r = send(&http, Method::GET, &format!("{base}/status"), &[], "").await;
            if r.is_ok_and(|r| r.json()["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1400", "--hide-scrollbars",
                    // A foreign site and a rebinding name, both on loopback.
                    "--host-resolver-rules=MAP evil.example 127.0.0.1, MAP rebind.example 127.0.0.1",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let r = send(
            &http,
            Method::POST,
            &format!("{base}/session"),
            &[("content-type", "application/json")],
            &caps.to_string(),
        )
        .await
        .expect("new session");
        let v = r.json();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Driver {
            base,
            session,
            http,
            _proc: proc,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let body = if method == Method::GET {
            String::new()
        } else {
            body.to_string()
        };
        let r = send(
            &self.http,
            method,
            &url,
            &[("content-type", "application/json")],
            &body,
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        let v = r.json();
        assert_eq!(r.status, 200, "{path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; a returned promise is awaited).
    async fn js(&self, script: &str) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Waits until `script` returns true; panics with `what` and the last value.
    async fn wait(&self, script: &str, what: &str) {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let v = self.js(script).await;
            if v == true {
                return;
            }
            if Instant::now() >= deadline {
                let page = self
                    .js("return location.href + '\\n' + (document.querySelector('main') || document.body).innerText.slice(0, 3000)")
                    .await;
                let console = self.console_errors().await;
                panic!(
                    "{what}: last {v}\npage: {}\nconsole errors: {console:#?}",
                    page.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        // The page may re-render between finding and clicking: find it again then.
        for _ in 0..5 {
            let id = self.find(css).await;
            let url = format!("{}/session/{}/element/{id}/click", self.base, self.session);
            let r = send(
                &self.http,
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                "{}",
            )
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
            if r.status == 200 {
                return;
            }
            assert!(r.body.contains("stale element"), "click {css}: {}", r.body);
        }
        panic!("click {css}: the element kept going stale");
    }

    async fn type_text(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(Method::POST, &format!("/element/{id}/clear"), json!({}))
            .await;
        self.cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd(Method::GET, "/screenshot", Value::Null).await;
        let png = data_encoding::BASE64
            .decode(v.as_str().expect("base64").as_bytes())
            .expect("png");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-shots");
        std::fs::create_dir_all(&dir).expect("shots dir");
        std::fs::write(dir.join(name), &png).expect("write shot");
        if std::env::var("CANARY_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/img");
            std::fs::create_dir_all(&docs).expect("docs/img");
            std::fs::write(docs.join(name), &png).expect("write docs shot");
        }
    }

    /// The browser console's entries of level SEVERE.
    async fn console_errors(&self) -> Vec<String> {
        let v = self
            .cmd(Method::POST, "/se/log", json!({"type": "browser"}))
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Best effort: closing the session ends Chromium; chromedriver is killed by
        // its guard right after.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            // A client of this thread's own runtime.
            let http = client();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = send(&http, Method::DELETE, &url, &[], "").await;
                });
            }
        })
        .join();
    }
}

fn config(v1: &Upstream, v2: &Upstream) -> String {
    format!(
        "admin_token_env: CANARY_DASHBOARD_TEST_TOKEN
routes:
  - name: web
    stable: {{version: v1, upstreams: {ups1}}}
    canary: {{version: v2, upstreams: {ups2}}}
    rollout:
      steps: [{{weight: 50, pause: manual}}, {{weight: 100, pause: 1h}}]
      analysis: {{interval: 2s, window: 10s, min_requests: 10, max_error_rate: 0.05}}
  - name: plain
    stable: {{version: v1, upstreams: {ups1}}}
    canary: {{version: v2, upstreams: {ups2}}}
    weight: 10
",
        ups1 = addrs(&[v1]),
        ups2 = addrs(&[v2]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_shows_live_charts_and_takes_actions_with_the_token() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let c = Canary::start_with(&config(&v1, &v2), &[("CANARY_DASHBOARD_TEST_TOKEN", TOKEN)]).await;
    // About 100 requests/s, bounded in count and time.
    let load = Load::start(
        c.listen,
        LoadSpec {
            concurrency: 2,
            max_requests: 20_000,
            max_duration: Duration::from_secs(90),
            pause: Duration::from_millis(20),
            path: "/".into(),
        },
    );
    let admin = format!("http://{}", c.admin);
    let d = Driver::start(&chromium, &chromedriver).await;

    // 1. The cross-site abort of issue 14 and a rebinding name are refused in the
    //    browser too (the page on evil.example is whatever the proxy serves there).
    d.goto(&format!("http://evil.example:{}/", c.listen.port()))
        .await;
    let sent = d
        .js(&format!(
            "return fetch('{admin}/api/v1/routes/web/abort', {{method: 'POST', mode: 'no-cors', \
             body: '{{\"reason\":\"cross-site probe\"}}'}}).then(() => 'sent', e => 'error ' + e)"
        ))
        .await;
    assert_eq!(sent, "sent");
    d.goto(&format!(
        "http://rebind.example:{}/api/v1/routes",
        c.admin.port()
    ))
    .await;
    let text = d.js("return document.body.innerText").await;
    assert!(
        text.as_str()
            .unwrap_or("")
            .contains("host not allowed: rebind.example"),
        "{text}"
    );
    let (_, before) = c.admin_get("/api/v1/routes/web").await;
    assert_ne!(
        before["phase"], "aborted",
        "the cross-site abort went through: {before}"
    );
    // Those refusals are console errors of those pages; read (and so clear) them.
    d.console_errors().await;

    // 2. The overview lists both routes as the API does; its link opens the route page
    //    with live charts for both versions, agreeing with the API.
    d.goto(&format!("{admin}/")).await;
    d.wait(
        "return document.querySelectorAll('#routes tr[data-route]').length === 2",
        "the overview lists both routes",
    )
    .await;
    let (_, list) = c.admin_get("/api/v1/routes").await;
    let rows = d
        .js("return [...document.querySelectorAll('#routes tr[data-route]')].map(r => [r.dataset.route, r.cells[1].textContent, r.cells[4].textContent])")
        .await;
    for (row, api) in rows
        .as_array()
        .expect("rows")
        .iter()
        .zip(list.as_array().expect("list"))
    {
        assert_eq!(row[0], api["name"], "{rows} vs {list}");
        assert_eq!(row[1], api["mode"], "{rows} vs {list}");
        let phase = api["phase"].as_str().unwrap_or("–");
        assert_eq!(row[2], phase, "{rows} vs {list}");
    }
    d.click("#routes tr[data-route=web] a").await;
    d.wait(
        "return location.pathname.endsWith('/ui/routes/web')",
        "the overview links to the route page",
    )
    .await;
    d.wait(
        "return document.body.dataset.ready === '1' && !!window.canaryCharts && !!window.canaryCharts.rate",
        "the route page renders its charts",
    )
    .await;
    d.js("window.__noReload = 'still here'; return true").await;
    // Points keep arriving over the stream: at least 5, with traffic on both versions.
    d.wait(
        "const d = window.canaryCharts.rate.data; \
         const some = (xs) => xs.slice(-3).every(v => v !== null && v > 0); \
         return d[0].length >= 5 && some(d[1]) && some(d[2])",
        "the requests/s chart holds points for stable and canary",
    )
    .await;
    d.wait(
        "const d = window.canaryCharts.error.data; \
         return d[1].some(v => v !== null) && d[2].some(v => v !== null)",
        "the error-rate chart holds values for both versions",
    )
    .await;
    let (_, api) = c.admin_get("/api/v1/routes/web").await;
    let page = d
        .js("return [document.querySelector('#phase').dataset.phase, document.querySelector('#weight').textContent]")
        .await;
    assert_eq!(page[0], api["phase"], "page {page} vs API {api}");
    assert_eq!(
        page[1].as_str().unwrap_or(""),
        format!("{}%", api["weight"].as_f64().unwrap_or(-1.0)),
        "page {page} vs API {api}"
    );
    // The verdict report lists every check once a verdict is in.
    d.wait(
        "return document.querySelectorAll('#checks tbody tr').length === 5",
        "the verdict report lists the five checks",
    )
    .await;

    // Screenshots, light then dark (the toggle cycles auto → light → dark).
    d.click("#theme").await;
    d.wait(
        "return document.documentElement.dataset.theme === 'light'",
        "light theme",
    )
    .await;
    d.screenshot("dashboard-light.png").await;
    d.click("#theme").await;
    d.wait(
        "return document.documentElement.dataset.theme === 'dark' && \
         getComputedStyle(document.body).backgroundColor === 'rgb(18, 22, 28)'",
        "dark theme",
    )
    .await;
    d.screenshot("dashboard-dark.png").await;

    // 3. Abort through the page's dialog: first with a wrong token (nothing changes).
    let phase_before = api["phase"].clone();
    d.click("button[data-action=abort]").await;
    d.wait(
        "return document.querySelector('#confirm').open",
        "the confirmation opens",
    )
    .await;
    let words = d
        .js("return document.querySelector('#confirm-text').textContent")
        .await;
    assert!(
        words
            .as_str()
            .unwrap_or("")
            .contains("canary v2 goes from 50% to 0% at once"),
        "{words}"
    );
    d.type_text("#confirm-reason", "seen in the dashboard")
        .await;
    d.type_text("#confirm-token", "wrong-token").await;
    d.click("#confirm-ok").await;
    d.wait(
        "return document.querySelector('#confirm-error').textContent.includes('missing or wrong bearer token')",
        "the API's 401 text is shown",
    )
    .await;
    let (_, after_wrong) = c.admin_get("/api/v1/routes/web").await;
    assert_eq!(after_wrong["phase"], phase_before, "{after_wrong}");
    // Then with the right one.
    d.type_text("#confirm-token", TOKEN).await;
    d.click("#confirm-ok").await;
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let (_, v) = c.admin_get("/api/v1/routes/web").await;
        if v["phase"] == "aborted" {
            assert_eq!(v["abort_reason"], "user: seen in the dashboard", "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abort did not reach the API: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.wait(
        "return document.querySelector('#phase').dataset.phase === 'aborted' && \
         window.__noReload === 'still here'",
        "the page shows the abort without a reload",
    )
    .await;
    let stored = d
        .js("return [sessionStorage.getItem('canary-admin-token'), localStorage.getItem('canary-admin-token'), document.cookie, location.href]")
        .await;
    assert_eq!(stored[0], TOKEN, "{stored}");
    assert!(stored[1].is_null() && stored[2] == "", "{stored}");
    assert!(
        !stored[3].as_str().unwrap_or("").contains(TOKEN),
        "{stored}"
    );

    // 4. Retry, then promote, through the page (the token is kept for the tab).
    d.wait(
        "const b = document.querySelector('button[data-action=retry]'); return !!b && !b.disabled",
        "retry is offered after the abort",
    )
    .await;
    d.click("button[data-action=retry]").await;
    d.click("#confirm-ok").await;
    d.wait(
        "const b = document.querySelector('button[data-action=promote]'); return !!b && !b.disabled && !document.querySelector('#confirm').open",
        "promote is offered after the retry",
    )
    .await;
    d.click("button[data-action=promote]").await;
    d.click("#confirm-ok").await;
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let (_, v) = c.admin_get("/api/v1/routes/web").await;
        if v["step"] == 1 && v["weight"] == 100.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the promote did not reach the API: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.wait(
        "return document.querySelector('#weight').textContent === '100%'",
        "the page shows the promoted weight",
    )
    .await;

    // 5. The history view lists the abort; nothing came from another origin; the
    //    console has no error but the 401 the wrong token was meant to get.
    d.click("a[href$='/events']").await;
    d.wait(
        "return !!document.querySelector('tr[data-kind=abort]')",
        "the history lists the abort",
    )
    .await;
    let resources = d
        .js("return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")
        .await;
    for r in resources.as_array().expect("resources") {
        let r = r.as_str().unwrap_or("");
        assert!(
            r.starts_with(&format!("{admin}/")),
            "fetched from elsewhere: {r}"
        );
    }
    let errors: Vec<String> = d
        .console_errors()
        .await
        .into_iter()
        .filter(|m| !(m.contains("/api/v1/routes/web/abort") && m.contains("401")))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    // 6. A read-only dashboard has no mutation control (another `serve`).
    let ro = Canary::start(&format!(
        "dashboard: {{read_only: true}}\n{}",
        config(&v1, &v2).replace("admin_token_env: CANARY_DASHBOARD_TEST_TOKEN\n", "")
    ))
    .await;
    d.goto(&format!("http://{}/ui/routes/web", ro.admin)).await;
    d.wait(
        "return document.body.dataset.ready === '1' && !!document.querySelector('#read-only')",
        "the read-only page renders",
    )
    .await;
    let buttons = d
        .js("return document.querySelectorAll('button[data-action], #lock:not([hidden])').length")
        .await;
    assert_eq!(buttons, 0, "mutation controls on a read-only dashboard");
    drop(ro);

    // 7. SIGTERM with the page open (its stream connected): serve still stops.
    d.goto(&format!("{admin}/ui/routes/web")).await;
    d.wait(
        "return document.querySelector('#conn').textContent === 'live'",
        "the stream is connected",
    )
    .await;
    drop(load);
    let pid = c.pid().expect("running");
    let stopped_at = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(st.success());
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if state.is_empty() || state.contains("State:\tZ") {
            break;
        }
        // The drain time is 10 s; a stream held open would keep it running forever.
        assert!(
            stopped_at.elapsed() < Duration::from_secs(15),
            "still running after SIGTERM with the dashboard open:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.wait_log("stopping", Duration::from_secs(1)).await,
        "{}",
        c.log()
    );
}
