//! How the verbs that follow a route over time print: `wait`, `status --watch` and
//! `events --follow`.
//!
//! On a terminal they draw live (one line of `wait` redrawn in place, the `status`
//! table redrawn like `watch(1)`) and in colour; into a pipe or a file, or with
//! `NO_COLOR` set (or `TERM=dumb`), they print plain lines only when something changed,
//! so CI logs stay readable. `--json` prints one JSON object per line instead. What
//! to print is decided here; what a route's state *means* for `wait` stays in `cli`.

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Method;
use serde_json::{json, Value};

use crate::cli::{self, Api, Conn};

/// How often `status --watch` and `events --follow` poll the admin API.
const POLL: Duration = Duration::from_secs(1);

/// What the terminal (stdout) can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// Redraw in place (a terminal, no `NO_COLOR`, not `TERM=dumb`).
    pub live: bool,
    /// ANSI colours: exactly when live (`NO_COLOR`: never).
    pub color: bool,
}

impl Term {
    /// Decides from stdout and the environment.
    pub fn detect() -> Term {
        Term::decide(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            std::env::var_os("TERM").is_some_and(|t| t == "dumb"),
        )
    }

    /// `NO_COLOR` (<https://no-color.org>: set and not empty) turns off colour and, as
    /// the issue asks, the redrawn line too: plain lines are what a user who opts out of
    /// terminal effects can copy and read back.
    fn decide(terminal: bool, no_color: bool, dumb: bool) -> Term {
        let fancy = terminal && !no_color && !dumb;
        Term {
            live: fancy,
            color: fancy,
        }
    }

    fn paint(&self, text: &str, c: Colour) -> String {
        if self.color {
            format!("\x1b[{}m{text}\x1b[0m", c as u8)
        } else {
            text.to_string()
        }
    }
}

#[derive(Clone, Copy)]
#[repr(u8)]
enum Colour {
    Red = 31,
    Green = 32,
    Yellow = 33,
    Cyan = 36,
    Dim = 2,
}

fn phase_colour(phase: &str) -> Colour {
    match phase {
        "promoted" | "stable" => Colour::Green,
        "aborted" => Colour::Red,
        "paused" | "waiting" => Colour::Yellow,
        "progressing" => Colour::Cyan,
        _ => Colour::Dim,
    }
}

fn verdict_colour(verdict: &str) -> Colour {
    match verdict {
        "pass" => Colour::Green,
        "fail" => Colour::Red,
        _ => Colour::Dim,
    }
}

/// `wait`'s exit code as a word, for `--json`.
fn outcome(code: u8) -> &'static str {
    match code {
        0 => "promoted",
        1 => "not_promoted",
        2 => "timed_out",
        _ => "error",
    }
}

/// A compact duration: `45s`, `1m12s`, `2h03m`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The width of stdout's terminal, so the live line never wraps (a wrapped line
/// cannot be redrawn in place with `\r`).
fn width() -> usize {
    // A pseudo-terminal nobody sized (0 columns) gets the classic 80.
    terminal_size::terminal_size_of(std::io::stdout())
        .map(|(w, _)| usize::from(w.0))
        .filter(|&w| w > 0)
        .unwrap_or(80)
}

/// The plain progress line of `wait` (unchanged since before the live line existed:
/// scripts may read it).
fn wait_plain(route: &str, r: &Value) -> String {
    format!(
        "{route}: {}, step {}, weight {}, verdict {}, canary {}",
        r["phase"]
            .as_str()
            .unwrap_or(r["mode"].as_str().unwrap_or("-")),
        cli::step_text(r),
        cli::pct(&r["weight"]),
        r["last_verdict"]["result"].as_str().unwrap_or("-"),
        r["canary_version"].as_str().unwrap_or("-"),
    )
}

/// The live line of `wait`: phase, step, weight, time in step, last verdict, elapsed,
/// as segments the width can cut from the end.
fn wait_live(term: Term, route: &str, r: &Value, now_ms: u64, elapsed: Duration) -> Vec<String> {
    let phase = r["phase"]
        .as_str()
        .unwrap_or(r["mode"].as_str().unwrap_or("-"));
    let verdict = r["last_verdict"]["result"].as_str().unwrap_or("-");
    let mut seg = vec![
        format!("{route}:"),
        term.paint(phase, phase_colour(phase)),
        format!("step {}", cli::step_text(r)),
        format!("weight {}", cli::pct(&r["weight"])),
    ];
    if let Some(started) = r["step_started_ms"].as_u64() {
        let d = Duration::from_millis(now_ms.saturating_sub(started));
        seg.push(format!("{} in step", short(d)));
    }
    seg.push(format!(
        "verdict {}",
        term.paint(verdict, verdict_colour(verdict))
    ));
    seg.push(format!("elapsed {}", short(elapsed)));
    seg
}

/// Joins segments with two spaces, dropping segments from the end until the visible
/// text fits in `width - 1` columns.
fn fit(segments: &[String], width: usize) -> String {
    let visible = |s: &str| {
        // Escape sequences (`ESC [ … m`) take no column.
        let mut n = 0;
        let mut esc = false;
        for c in s.chars() {
            match (esc, c) {
                (false, '\x1b') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, _) => n += 1,
            }
        }
        n
    };
    let mut out = String::new();
    let mut used = 0;
    for (i, s) in segments.iter().enumerate() {
        let add = visible(s) + if i == 0 { 0 } else { 2 };
        if used + add >= width.max(2) {
            break;
        }
        if i > 0 {
            out.push_str("  ");
        }
        out.push_str(s);
        used += add;
    }
    out
}

/// Clears the current terminal line (cursor to column 0, erase the line).
const CLEAR_LINE: &str = "\r\x1b[2K";

/// `wait`'s output: a live line on a terminal, plain lines on change otherwise, JSON
/// lines with `--json`. Dropping it ends a drawn live line, so an error printed after
/// it starts on a line of its own.
pub struct WaitView {
    route: String,
    term: Term,
    json: bool,
    started: Instant,
    last: String,
    drawn: bool,
}

impl WaitView {
    pub fn new(route: &str, json: bool) -> WaitView {
        WaitView::with_term(route, json, Term::detect())
    }

    fn with_term(route: &str, json: bool, term: Term) -> WaitView {
        WaitView {
            route: route.to_string(),
            term: if json {
                Term {
                    live: false,
                    color: false,
                }
            } else {
                term
            },
            json,
            started: Instant::now(),
            last: String::new(),
            drawn: false,
        }
    }

    /// Shows one status of the route.
    pub fn status(&mut self, r: &Value) {
        if self.json {
            let line = r.to_string();
            if line != self.last {
                outln!("{line}");
                self.last = line;
            }
        } else if self.term.live {
            let seg = wait_live(self.term, &self.route, r, now_ms(), self.started.elapsed());
            crate::output::raw(&format!("{CLEAR_LINE}{}", fit(&seg, width())));
            self.drawn = true;
        } else {
            let line = wait_plain(&self.route, r);
            if line != self.last {
                outln!("{line}");
                self.last = line;
            }
        }
    }

    /// A message on stderr (the API unreachable, retrying): the live line is cleared
    /// first and drawn again at the next status.
    pub fn note(&mut self, msg: &str) {
        if self.drawn {
            crate::output::raw(CLEAR_LINE);
            self.drawn = false;
        }
        errln!("{msg}");
    }

    /// The outcome: the live line stays as the last state, the message follows.
    pub fn done(&mut self, code: u8, msg: &str) {
        self.end_line();
        if self.json {
            outln!(
                "{}",
                json!({"route": self.route, "result": outcome(code), "exit_code": code, "message": msg})
            );
        } else {
            let colour = match code {
                0 => Colour::Green,
                1 => Colour::Red,
                _ => Colour::Yellow,
            };
            outln!("{}", self.term.paint(msg, colour));
        }
    }

    fn end_line(&mut self) {
        if self.drawn {
            outln!();
            self.drawn = false;
        }
    }
}

impl Drop for WaitView {
    fn drop(&mut self) {
        self.end_line();
    }
}

/// `canary status [ROUTE] --watch`: the table (or one route's details) again every
/// second; live on a terminal, else printed again only when it changed.
pub async fn status(conn: &Conn, route: Option<&str>, json: bool) -> Result<u8, String> {
    let api = Api::new(conn);
    let term = Term::detect();
    let path = match route {
        Some(r) => format!("/api/v1/routes/{r}"),
        None => "/api/v1/routes".to_string(),
    };
    let mut last = Value::Null;
    loop {
        let v = tokio::select! {
            v = api.ok(Method::GET, &path, None) => v?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let now = cli::fmt_time(now_ms());
        let key = shown(&v, route.is_some());
        if json {
            if key != last {
                outln!("{v}");
            }
        } else if term.live {
            // Home and clear, as watch(1) does: the table may change height.
            crate::output::raw("\x1b[H\x1b[2J");
            outln!(
                "{}",
                term.paint(
                    &format!(
                        "canary status · {now} · every {}s · Ctrl-C to stop",
                        POLL.as_secs()
                    ),
                    Colour::Dim
                )
            );
            print(&v, route.is_some());
        } else if key != last {
            outln!("--- {now}");
            print(&v, route.is_some());
        }
        last = key;
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

/// What `status` shows of `v`: a new verdict with the same result and numbers, or
/// the same table, is no change worth printing again.
fn shown(v: &Value, one: bool) -> Value {
    let strip = |r: &Value| {
        let mut r = r.clone();
        if let Some(o) = r.as_object_mut() {
            o.remove("step_started_ms");
        }
        if let Some(o) = r["last_verdict"].as_object_mut() {
            o.remove("at_ms");
            if !one {
                // The table shows the verdict's result only.
                o.retain(|k, _| k == "result");
            }
        }
        r
    };
    match v {
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        r => strip(r),
    }
}

fn print(v: &Value, one: bool) {
    if one {
        cli::print_route(v);
    } else {
        cli::print_table(v.as_array().map(Vec::as_slice).unwrap_or_default());
    }
}

/// The entries of `now` that come after `last` (the last one printed). The journal is
/// append-only, so they are the ones after its position in the newest page; if it is
/// not there (more new entries than a page), everything newer than it by time.
fn new_entries<'a>(now: &'a [Value], last: Option<&Value>) -> &'a [Value] {
    let Some(last) = last else { return now };
    match now.iter().rposition(|e| e == last) {
        Some(i) => &now[i + 1..],
        None => {
            let t = last["at_ms"].as_u64().unwrap_or(0);
            let first_newer = now
                .iter()
                .position(|e| e["at_ms"].as_u64().unwrap_or(0) > t)
                .unwrap_or(now.len());
            &now[first_newer..]
        }
    }
}

/// `canary events ROUTE --follow`: the last `limit` entries, then each new one as it is
/// journaled, until Ctrl-C. `--json`: one entry per line.
pub async fn events(conn: &Conn, route: &str, limit: usize, json: bool) -> Result<u8, String> {
    let api = Api::new(conn);
    let term = Term::detect();
    let mut last: Option<Value> = None;
    let mut first = true;
    loop {
        // After the first page, a page of 1000 (the API's default) is far more than a
        // second of journal; `new_entries` copes with more anyway.
        let n = if first { limit } else { 1000 };
        let path = format!("/api/v1/routes/{route}/events?limit={n}");
        let v = tokio::select! {
            v = api.ok(Method::GET, &path, None) => v?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let all = v.as_array().map(Vec::as_slice).unwrap_or_default();
        let fresh = if first {
            all
        } else {
            new_entries(all, last.as_ref())
        };
        for e in fresh {
            if json {
                outln!("{e}");
                continue;
            }
            let line = cli::event_line(e);
            let line = match e["kind"].as_str().unwrap_or("") {
                "abort" => term.paint(&line, Colour::Red),
                "promote" | "complete" => term.paint(&line, Colour::Green),
                _ => line,
            };
            outln!("{line}");
            if !e["verdict"].is_null() {
                outln!("    evidence: {}", cli::verdict_text(&e["verdict"]));
            }
        }
        // Remember the newest entry seen, even one `--limit` did not print.
        if let Some(e) = all.last() {
            last = Some(e.clone());
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_or_a_pipe_or_a_dumb_terminal_means_plain_lines_without_colour() {
        let plain = Term {
            live: false,
            color: false,
        };
        assert_eq!(Term::decide(false, false, false), plain);
        assert_eq!(Term::decide(true, true, false), plain);
        assert_eq!(Term::decide(true, false, true), plain);
        let t = Term::decide(true, false, false);
        assert!(t.live && t.color);
        assert_eq!(plain.paint("x", Colour::Red), "x");
        assert_eq!(t.paint("x", Colour::Red), "\x1b[31mx\x1b[0m");
    }

    fn route(step_started_ms: u64) -> Value {
        json!({"phase": "progressing", "mode": "rollout", "step": 1,
               "steps": [{}, {}, {}, {}], "weight": 25.0, "canary_version": "v2",
               "step_started_ms": step_started_ms, "last_verdict": {"result": "pass"}})
    }

    #[test]
    fn the_live_line_has_phase_step_weight_time_in_step_verdict_and_elapsed() {
        let plain = Term::decide(false, false, false);
        let seg = wait_live(
            plain,
            "web",
            &route(1_000),
            73_000,
            Duration::from_secs(185),
        );
        assert_eq!(
            fit(&seg, 200),
            "web:  progressing  step 2/4  weight 25%  1m12s in step  verdict pass  elapsed 3m05s"
        );
        // Narrow terminal: segments are dropped from the end, never wrapped.
        assert_eq!(fit(&seg, 40), "web:  progressing  step 2/4  weight 25%");
        // Colour codes take no column.
        let colour = Term::decide(true, false, false);
        let seg = wait_live(
            colour,
            "web",
            &route(1_000),
            73_000,
            Duration::from_secs(185),
        );
        let line = fit(&seg, 40);
        assert!(line.contains("\x1b[36mprogressing\x1b[0m"), "{line:?}");
        assert!(line.ends_with("weight 25%"), "{line:?}");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short(Duration::from_secs(5)), "5s");
        assert_eq!(short(Duration::from_secs(65)), "1m05s");
        assert_eq!(short(Duration::from_secs(7380)), "2h03m");
    }

    #[test]
    fn follow_prints_only_entries_after_the_last_one_printed() {
        let e = |t: u64, k: &str| json!({"at_ms": t, "kind": k});
        let page = [
            e(1, "start"),
            e(2, "advance"),
            e(3, "advance"),
            e(4, "abort"),
        ];
        assert_eq!(new_entries(&page, None).len(), 4);
        assert_eq!(new_entries(&page, Some(&e(2, "advance"))), &page[2..]);
        assert!(new_entries(&page, Some(&e(4, "abort"))).is_empty());
        // The last one printed scrolled out of the page: everything newer by time.
        assert_eq!(new_entries(&page[2..], Some(&e(2, "x"))), &page[2..]);
    }

    #[test]
    fn status_watch_prints_again_only_when_what_it_shows_changed() {
        let at = |t: u64, requests: u64, phase: &str| {
            json!({"name": "web", "phase": phase, "step_started_ms": t,
                   "last_verdict": {"at_ms": t, "result": "pass", "canary": {"requests": requests}}})
        };
        let table = |r: Value| Value::Array(vec![r]);
        assert_eq!(
            shown(&table(at(1, 5, "waiting")), false),
            shown(&table(at(2, 9, "waiting")), false)
        );
        assert_ne!(
            shown(&table(at(1, 5, "waiting")), false),
            shown(&table(at(1, 5, "paused")), false)
        );
        // One route's view prints the verdict's numbers.
        assert_eq!(
            shown(&at(1, 5, "waiting"), true),
            shown(&at(2, 5, "waiting"), true)
        );
        assert_ne!(
            shown(&at(1, 5, "waiting"), true),
            shown(&at(1, 9, "waiting"), true)
        );
    }

    #[test]
    fn wait_json_outcome_names() {
        assert_eq!(outcome(0), "promoted");
        assert_eq!(outcome(1), "not_promoted");
        assert_eq!(outcome(2), "timed_out");
    }
}
