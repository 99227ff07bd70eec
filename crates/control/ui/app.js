// canary dashboard: plain JavaScript, no build step, no dependency but uPlot.
// Every URL is relative to <base href> (the server points it at .../ui/), so the page
// works behind a reverse-proxy prefix. Numbers are never computed here: the server
// sends them as the analysis computes them; this file only draws them.
"use strict";

(function () {
  const BASE = new URL(document.baseURI);
  const API = new URL("../api/v1/", BASE);
  const TOKEN_KEY = "canary-admin-token";
  const THEME_KEY = "canary-theme";
  const WINDOWS = ["5m", "15m", "1h"];
  const POLL_MS = 2000;

  const state = {
    info: null,
    routes: new Map(), // name -> status
    order: [],
    series: null, // of the route on screen
    events: [], // journal of the route on screen (history view)
    view: null, // {kind: "overview"|"route"|"history", name}
    charts: {},
    source: null,
    pollTimer: null,
    lastPhase: new Map(),
  };
  window.canary = state; // for the browser test and curious operators

  const $ = (sel, root) => (root || document).querySelector(sel);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids.flat()) {
      if (k === null || k === undefined || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  };

  // ---------------------------------------------------------------- formatting
  const pct = (v, d = 2) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(d)}%`);
  const ms = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`);
  const weightText = (w) => `${Number(w).toFixed(2).replace(/\.?0+$/, "")}%`;
  const time = (t) => {
    const d = new Date(t);
    return el("time", { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleTimeString());
  };
  const dur = (msv) => {
    const s = Math.round(msv / 1000);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  };
  const badge = (text, cls) => el("span", { class: `badge ${cls || text}` }, text);
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // ---------------------------------------------------------------- API
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }
  async function getJSON(path) {
    const r = await fetch(new URL(path, API), { headers: { Accept: "application/json" } });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `${r.status}`);
    return body;
  }
  async function command(method, path, body, tok) {
    const headers = { "Content-Type": "application/json", "X-Canary-Client": "dashboard" };
    if (tok) headers.Authorization = `Bearer ${tok}`;
    const r = await fetch(new URL(path, API), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer = await r.json().catch(() => ({}));
    return { ok: r.ok, status: r.status, body: answer };
  }

  // ---------------------------------------------------------------- routing
  function parseView() {
    const rel = location.pathname.slice(BASE.pathname.length);
    const parts = rel.split("/").filter(Boolean).map(decodeURIComponent);
    const q = new URLSearchParams(location.search);
    if (parts[0] === "routes" && parts[1]) {
      return { kind: parts[2] === "events" ? "history" : "route", name: parts[1], q };
    }
    return { kind: "overview", q };
  }
  function go(href) {
    history.pushState(null, "", new URL(href, BASE));
    render(true);
  }
  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[data-nav]");
    if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    go(a.getAttribute("href"));
  });
  window.addEventListener("popstate", () => render(true));

  const routeHref = (name, extra) => `routes/${encodeURIComponent(name)}${extra || ""}`;

  // ---------------------------------------------------------------- theme
  function applyTheme() {
    const t = localStorage.getItem(THEME_KEY) || "auto";
    if (t === "auto") delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = t;
    $("#theme").textContent = `theme: ${t}`;
  }
  $("#theme").addEventListener("click", () => {
    const order = ["auto", "light", "dark"];
    const t = localStorage.getItem(THEME_KEY) || "auto";
    localStorage.setItem(THEME_KEY, order[(order.indexOf(t) + 1) % order.length]);
    applyTheme();
    drawCharts(); // the charts take their colours from the CSS variables
  });
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", drawCharts);

  // ---------------------------------------------------------------- token
  function updateLock() {
    const b = $("#lock");
    const needed = state.info && state.info.token_required && !state.info.dashboard.read_only;
    b.hidden = !needed;
    b.textContent = token() ? "token: set for this tab" : "token: not set";
  }
  $("#lock").addEventListener("click", () => {
    $("#token-input").value = "";
    $("#token-dialog").showModal();
  });
  $("#token-save").addEventListener("click", () => {
    const v = $("#token-input").value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v);
    $("#token-dialog").close();
    updateLock();
  });
  $("#token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#token-dialog").close();
    updateLock();
  });
  $("#token-cancel").addEventListener("click", () => $("#token-dialog").close());

  // ---------------------------------------------------------------- live updates
  function setConn(kind, text) {
    const c = $("#conn");
    c.className = `conn ${kind}`;
    c.textContent = text;
  }
  function banner(text) {
    const b = $("#banner");
    b.hidden = !text;
    b.textContent = text || "";
  }
  function onStatus(s) {
    const before = state.lastPhase.get(s.name);
    if (before !== undefined && before !== s.phase) {
      $("#announce").textContent = `${s.name}: ${before || "no rollout"} → ${s.phase || "no rollout"}`;
    }
    state.lastPhase.set(s.name, s.phase);
    if (!state.routes.has(s.name)) state.order.push(s.name);
    state.routes.set(s.name, s);
  }
  function openStream() {
    if (state.source || document.hidden) return;
    const src = new EventSource(new URL("stream", API));
    state.source = src;
    src.addEventListener("open", () => {
      setConn("live", "live");
      banner("");
      // Back after a drop: refill what the stream did not carry meanwhile.
      if (state.pollTimer) refresh().then(renderSoon).catch(() => {});
      stopPolling();
    });
    src.addEventListener("status", (e) => {
      onStatus(JSON.parse(e.data));
      renderSoon();
    });
    src.addEventListener("point", (e) => {
      const p = JSON.parse(e.data);
      const v = state.view;
      if (v && v.kind === "route" && v.name === p.route && state.series) {
        appendPoint(state.series, p);
        updateCharts();
      }
    });
    src.addEventListener("event", (e) => {
      const ev = JSON.parse(e.data);
      const v = state.view;
      if (v && v.name === ev.route) {
        if (state.series) {
          state.series.events.push({ at_ms: ev.at_ms, kind: ev.kind, reason: ev.reason, weight: ev.to.weight });
          if (ev.verdict) state.series.verdicts.push(markOf(ev.verdict));
        }
        if (v.kind === "history") loadHistory(v.name).then(renderSoon);
        else renderSoon();
      }
    });
    src.addEventListener("resync", () => refresh().then(renderSoon));
    src.addEventListener("error", () => {
      // EventSource reconnects by itself (retry: 2 s); poll meanwhile.
      setConn("poll", "reconnecting…");
      banner("Connection lost, retrying… (polling every 2 s meanwhile)");
      startPolling();
    });
  }
  function closeStream() {
    if (state.source) state.source.close();
    state.source = null;
  }
  function startPolling() {
    if (state.pollTimer) return;
    state.pollTimer = setInterval(() => refresh().then(renderSoon).catch(() => {}), POLL_MS);
  }
  function stopPolling() {
    clearInterval(state.pollTimer);
    state.pollTimer = null;
  }
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      closeStream();
      stopPolling();
    } else {
      refresh().then(() => render(false));
      openStream();
    }
  });

  const markOf = (v) => ({
    at_ms: v.at_ms,
    result: v.result,
    canary_error_rate: v.canary.error_rate,
    stable_error_rate: v.stable.error_rate,
    canary_p99_ms: v.canary.p99_ms,
    stable_p99_ms: v.stable.p99_ms,
  });

  function appendPoint(s, p) {
    if (s.t.length && p.t <= s.t[s.t.length - 1]) return;
    s.t.push(p.t);
    s.weight.push(p.weight);
    for (const ver of ["stable", "canary"]) {
      for (const k of ["rps", "error_rate", "p50_ms", "p99_ms"]) s[ver][k].push(p[ver][k]);
    }
    const from = p.t - s.window_ms;
    while (s.t.length && s.t[0] < from) {
      s.t.shift();
      s.weight.shift();
      for (const ver of ["stable", "canary"]) {
        for (const k of ["rps", "error_rate", "p50_ms", "p99_ms"]) s[ver][k].shift();
      }
    }
  }

  // ---------------------------------------------------------------- data loading
  async function refresh() {
    const list = await getJSON("routes");
    for (const s of list) onStatus(s);
    // The API's order (config order), without routes a reload removed.
    state.order = list.map((s) => s.name);
    const v = state.view;
    if (v && v.kind === "route") await loadSeries(v.name, v.q.get("window") || "15m");
    if (v && v.kind === "history") await loadHistory(v.name);
  }
  async function loadSeries(name, win) {
    const s = await getJSON(`routes/${encodeURIComponent(name)}/series?window=${encodeURIComponent(win)}`);
    state.series = s;
  }
  async function loadHistory(name) {
    state.events = await getJSON(`routes/${encodeURIComponent(name)}/events?limit=1000`);
  }

  // ---------------------------------------------------------------- rendering
  let pending = false;
  function renderSoon() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      render(false);
    });
  }

  async function render(navigated) {
    const v = parseView();
    const changed = navigated || !state.view || v.kind !== state.view.kind || v.name !== state.view.name;
    state.view = v;
    if (changed) {
      destroyCharts();
      state.series = null;
      try {
        if (v.kind === "route") await loadSeries(v.name, v.q.get("window") || "15m");
        if (v.kind === "history") await loadHistory(v.name);
      } catch (e) {
        $("#main").replaceChildren(el("p", { class: "error" }, String(e.message)));
        return;
      }
    }
    crumbs(v);
    if (v.kind === "overview") renderOverview(v);
    else if (v.kind === "route") renderRoute(v, changed);
    else renderHistory(v);
    if (navigated) $("#main").focus({ preventScroll: true });
  }

  function crumbs(v) {
    const c = $("#crumbs");
    const parts = [el("a", { href: "./", "data-nav": true }, "routes")];
    if (v.name) parts.push("›", el("a", { href: routeHref(v.name), "data-nav": true }, v.name));
    if (v.kind === "history") parts.push("›", el("span", {}, "history"));
    c.replaceChildren(...parts);
    document.title = v.name ? `${v.name} · canary` : "canary";
  }

  function needsHuman(s) {
    if (s.phase === "waiting") return "waiting for promote";
    if (s.phase === "aborted") return "aborted";
    if (s.phase === "promoted") return "make the canary stable in the config";
    if (s.phase === "paused") return "paused";
    if (s.failed_verdicts > 0) return `failing ${s.failed_verdicts}/${s.analysis ? s.analysis.failure_limit : "?"}`;
    if (s.canary_available === false) return "canary unavailable";
    return "";
  }

  function renderOverview(v) {
    const attentionOnly = v.q.get("filter") === "attention";
    const rows = state.order.map((n) => state.routes.get(n)).filter(Boolean);
    const counts = {};
    for (const s of rows) counts[s.phase || s.mode] = (counts[s.phase || s.mode] || 0) + 1;
    const shown = rows.filter((s) => !attentionOnly || needsHuman(s));
    const filter = el(
      "a",
      { href: attentionOnly ? "./" : "./?filter=attention", "data-nav": true },
      attentionOnly ? "show all routes" : "only what needs attention",
    );
    const table = el(
      "table",
      { id: "routes" },
      el(
        "thead",
        {},
        el("tr", {}, ["route", "mode", "versions", "weight", "phase", "step", "last verdict", "needs a human"].map((h) => el("th", { scope: "col" }, h))),
      ),
      el(
        "tbody",
        {},
        shown.map((s) =>
          el(
            "tr",
            { dataset: { route: s.name } },
            el("td", {}, el("a", { href: routeHref(s.name), "data-nav": true }, s.name)),
            el("td", {}, s.mode),
            el("td", {}, el("span", { class: "stable" }, s.stable_version), s.canary_version ? [" → ", el("span", { class: "canary" }, s.canary_version)] : ""),
            el("td", { class: "num" }, el("span", { class: "weightbar", "aria-hidden": "true" }, el("span", { style: null, dataset: { w: s.weight } })), weightText(s.weight)),
            el("td", {}, s.phase ? badge(s.phase) : el("span", { class: "muted" }, "–")),
            el("td", {}, s.step !== null && s.step !== undefined ? `${s.step + 1}/${s.steps.length}` : "–"),
            el("td", {}, s.last_verdict ? badge(s.last_verdict.result) : "–", s.last_verdict && s.last_verdict.reasons.length ? el("div", { class: "muted" }, s.last_verdict.reasons[0]) : ""),
            el("td", {}, needsHuman(s)),
          ),
        ),
      ),
    );
    $("#main").replaceChildren(
      el("h1", {}, "Routes"),
      el("p", { class: "muted" }, Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(" · ") || "no routes", " · ", filter),
      table,
    );
    sizeBars();
    document.body.dataset.ready = "1";
  }

  // Widths through the CSSOM: the CSP forbids inline style attributes.
  function sizeBars() {
    for (const s of document.querySelectorAll(".weightbar > span[data-w]")) s.style.width = `${Math.min(100, Number(s.dataset.w))}%`;
  }

  function facts(s) {
    const a = s.analysis;
    const items = [
      ["phase", s.phase ? badge(s.phase) : s.mode, "phase"],
      ["canary weight", weightText(s.weight), "weight"],
      ["versions", [el("span", { class: "stable" }, s.stable_version), " → ", el("span", { class: "canary" }, s.canary_version || "none")]],
      ["step", s.step !== null && s.step !== undefined ? `${s.step + 1} of ${s.steps.length}` : "–"],
      ["step started", s.step_started_ms ? time(s.step_started_ms) : "–"],
      ["failed verdicts", a ? `${s.failed_verdicts}/${a.failure_limit}` : "–"],
      ["breaker", s.breaker_tripped ? "tripped" : a && a.breaker_failures ? `armed (${a.breaker_failures} in a row)` : "off"],
      ["canary pool", s.canary_available === null ? "–" : s.canary_available ? "available" : "unavailable"],
    ];
    return el(
      "dl",
      { class: "facts" },
      items.map(([k, val, id]) => el("div", {}, el("dt", {}, k), el("dd", { id: id || null, dataset: id === "phase" ? { phase: s.phase || "" } : null }, val))),
    );
  }

  function plan(s) {
    if (!s.steps.length) return el("p", { class: "muted" }, "No rollout plan (the weight comes from the config or the API).");
    return el(
      "ol",
      { class: "plan", "aria-label": "Step plan" },
      s.steps.map((st, i) =>
        el(
          "li",
          { class: i < s.step ? "done" : i === s.step ? "current" : "", "aria-current": i === s.step ? "step" : null },
          `${weightText(st.weight)} ${st.pause}`,
        ),
      ),
    );
  }

  // What each action does, in words, for the confirmation.
  function describe(action, s, extra) {
    const cv = s.canary_version, sv = s.stable_version, w = weightText(s.weight);
    const next = s.steps[(s.step || 0) + 1];
    switch (action) {
      case "promote":
        return next
          ? `Promote ${s.name} to step ${(s.step || 0) + 2} (${weightText(next.weight)}) now, whatever the analysis says.`
          : `Promote ${s.name}: ${cv} takes 100% of the traffic now.`;
      case "promote_full":
        return `Promote ${s.name} fully: ${cv} goes from ${w} to 100% at once, skipping the remaining steps and the analysis.`;
      case "pause":
        return `Pause ${s.name}: the canary ${cv} stays at ${w}; nothing advances until Resume.`;
      case "resume":
        return `Resume ${s.name}: the rollout of ${cv} continues from step ${(s.step || 0) + 1} at ${w}.`;
      case "abort":
        return `Abort ${s.name}: canary ${cv} goes from ${w} to 0% at once; its users go back to ${sv}.`;
      case "retry":
        return `Retry ${s.name}: the rollout of ${cv} starts again at step 1 (${s.steps[0] ? weightText(s.steps[0].weight) : "?"}).`;
      case "weight":
        return `Set the canary weight of ${s.name} to ${extra}%: ${cv} gets ${extra}% of the traffic${s.mode === "rollout" ? "; this pauses the rollout until Resume" : ""}.`;
    }
    return action;
  }
  const LABELS = {
    promote: "Promote",
    promote_full: "Promote full",
    pause: "Pause",
    resume: "Resume",
    abort: "Abort",
    retry: "Retry",
    weight: "Set weight",
  };

  function actionsBar(s) {
    if (state.info && state.info.dashboard.read_only) {
      return el("p", { class: "muted", id: "read-only" }, "Read-only dashboard: changes go through the CLI or the API.");
    }
    if (!s.canary_version) return el("p", { class: "muted" }, "No canary: nothing to change.");
    const all = s.mode === "rollout" ? ["promote", "promote_full", "pause", "resume", "abort", "retry", "weight"] : ["weight"];
    return el(
      "div",
      { class: "actions", role: "group", "aria-label": "Actions" },
      all.map((a) => {
        const ok = s.actions.includes(a);
        return el(
          "button",
          {
            type: "button",
            class: a === "abort" ? "danger" : "",
            disabled: !ok,
            title: ok ? describe(a, s, "…") : `not possible while ${s.phase || s.mode}`,
            dataset: { action: a },
            onclick: () => confirmAction(a, s.name),
          },
          LABELS[a],
        );
      }),
    );
  }

  function confirmAction(action, name) {
    const s = state.routes.get(name);
    const dlg = $("#confirm");
    const fields = $("#confirm-fields");
    fields.replaceChildren();
    let input = null;
    if (action === "abort") {
      input = el("input", { id: "confirm-reason", type: "text", maxlength: "200", placeholder: "why (goes into the journal)" });
      fields.append(el("label", {}, "Reason", input));
    } else if (action === "weight") {
      input = el("input", { id: "confirm-weight", type: "number", min: "0", max: "100", step: "0.01", value: String(s.weight) });
      fields.append(el("label", {}, "Canary weight (%)", input));
      input.addEventListener("input", () => ($("#confirm-text").textContent = describe(action, s, input.value || "?")));
    }
    $("#confirm-title").textContent = `${LABELS[action]} ${name}?`;
    $("#confirm-text").textContent = describe(action, s, input ? input.value : "");
    $("#confirm-error").textContent = "";
    const needToken = state.info.token_required;
    $("#confirm-token-row").hidden = !needToken || !!token();
    $("#confirm-token").value = "";
    const ok = $("#confirm-ok");
    ok.textContent = LABELS[action];
    ok.className = action === "abort" ? "danger" : "primary";
    ok.onclick = async () => {
      const tok = token() || $("#confirm-token").value.trim();
      if (needToken && !tok) {
        $("#confirm-error").textContent = "This server needs its admin token for changes.";
        $("#confirm-token-row").hidden = false;
        $("#confirm-token").focus();
        return;
      }
      let method = "POST", path = `routes/${encodeURIComponent(name)}/${action}`, body;
      if (action === "promote_full") {
        path = `routes/${encodeURIComponent(name)}/promote`;
        body = { full: true };
      } else if (action === "abort") {
        body = { reason: input.value };
      } else if (action === "weight") {
        method = "PUT";
        body = { weight: Number(input.value) };
      }
      ok.disabled = true;
      try {
        const r = await command(method, path, body, tok);
        if (r.status === 401) {
          sessionStorage.removeItem(TOKEN_KEY);
          updateLock();
          $("#confirm-token-row").hidden = false;
          $("#confirm-error").textContent = `${r.body.error || "unauthorized"}: nothing was changed.`;
          $("#confirm-token").select();
          return;
        }
        if (!r.ok) {
          $("#confirm-error").textContent = `${r.body.error || r.status}: nothing was changed.`;
          return;
        }
        if (tok) sessionStorage.setItem(TOKEN_KEY, tok);
        updateLock();
        onStatus(r.body);
        dlg.close();
        render(false);
      } catch (e) {
        $("#confirm-error").textContent = String(e.message || e);
      } finally {
        ok.disabled = false;
      }
    };
    dlg.showModal();
    (input || ok).focus();
  }
  $("#confirm-cancel").addEventListener("click", () => $("#confirm").close());

  function verdictReport(s) {
    const v = s.last_verdict;
    if (!v) return el("p", { class: "muted", id: "verdict" }, "No verdict yet.");
    const val = (name, x) => {
      if (x === null || x === undefined) return "–";
      if (name.includes("error_rate")) return pct(x);
      if (name === "min_requests") return String(Math.round(x));
      return ms(x);
    };
    return el(
      "div",
      { id: "verdict" },
      el("p", {}, badge(v.result), " at ", time(v.at_ms), ` · canary ${v.canary.requests} requests, stable ${v.stable.requests}`),
      el(
        "table",
        { id: "checks" },
        el("thead", {}, el("tr", {}, ["check", "canary", "stable", "limit", "result", ""].map((h) => el("th", { scope: "col" }, h)))),
        el(
          "tbody",
          {},
          s.last_verdict_checks.map((c) =>
            el(
              "tr",
              { dataset: { check: c.name } },
              el("td", {}, el("code", {}, c.name)),
              el("td", { class: "num" }, val(c.name, c.canary)),
              el("td", { class: "num" }, val(c.name, c.stable)),
              el("td", { class: "num" }, val(c.name, c.limit)),
              el("td", {}, badge(c.result)),
              el("td", { class: "muted" }, c.note),
            ),
          ),
        ),
      ),
    );
  }

  function instances(s) {
    const table = (label, list) =>
      el(
        "div",
        {},
        el("h3", {}, label),
        el(
          "table",
          {},
          el("thead", {}, el("tr", {}, ["upstream", "state", "ejections"].map((h) => el("th", { scope: "col" }, h)))),
          el(
            "tbody",
            {},
            list.map((i) =>
              el(
                "tr",
                {},
                el("td", {}, el("code", {}, i.upstream)),
                el("td", {}, i.available ? badge("healthy", "pass") : badge(i.ejected ? "ejected" : "failing checks", "fail")),
                el("td", { class: "num" }, i.ejections),
              ),
            ),
          ),
        ),
      );
    return el(
      "div",
      { class: "grid2", id: "instances" },
      table(`stable ${s.stable_version}`, s.pools.stable),
      s.canary_version ? table(`canary ${s.canary_version}`, s.pools.canary) : "",
    );
  }

  function renderRoute(v, fresh) {
    const s = state.routes.get(v.name);
    if (!s) {
      $("#main").replaceChildren(el("p", { class: "error" }, `No route ${v.name}.`));
      return;
    }
    const win = v.q.get("window") || "15m";
    if (fresh || !$("#charts")) {
      const picker = el(
        "div",
        { class: "toolbar", role: "group", "aria-label": "Time window" },
        "window:",
        WINDOWS.map((w) =>
          el("a", { href: routeHref(v.name, `?window=${w}`), "data-nav": true, "aria-current": w === win ? "true" : null }, w === win ? `[${w}]` : w),
        ),
        el("span", { class: "spacer" }),
        el("a", { href: routeHref(v.name, "/events"), "data-nav": true }, "history →"),
      );
      $("#main").replaceChildren(
        el("h1", {}, `Route ${s.name}`),
        el("p", { id: "message", class: "muted" }),
        el("div", { id: "facts" }),
        el("div", { id: "plan" }),
        el("div", { id: "actions" }),
        picker,
        el(
          "div",
          { class: "charts", id: "charts" },
          el("div", { class: "chart" }, el("h3", {}, "Error rate (%) over the analysis window"), el("div", { id: "chart-error" })),
          el("div", { class: "chart" }, el("h3", {}, "Latency p99 / p50 (ms) over the analysis window"), el("div", { id: "chart-latency" })),
          el("div", { class: "chart" }, el("h3", {}, "Requests/s, and the canary weight (%)"), el("div", { id: "chart-rate" })),
        ),
        el("h2", {}, "Last verdict"),
        el("div", { id: "verdict-box" }),
        el("h2", {}, "Instances"),
        el("div", { id: "instances-box" }),
      );
      drawCharts();
    }
    $("#message").textContent = s.message;
    $("#facts").replaceChildren(facts(s));
    $("#plan").replaceChildren(plan(s));
    // Rebuilt only when it changes, so a status update does not take the keyboard
    // focus away from a button.
    const key = JSON.stringify([s.actions, s.phase, s.weight, s.step, s.mode, s.canary_version]);
    if ($("#actions").dataset.key !== key) {
      $("#actions").dataset.key = key;
      $("#actions").replaceChildren(actionsBar(s));
    }
    $("#verdict-box").replaceChildren(verdictReport(s));
    $("#instances-box").replaceChildren(instances(s));
    updateCharts();
    document.body.dataset.ready = "1";
  }

  // ---------------------------------------------------------------- charts
  function destroyCharts() {
    for (const c of Object.values(state.charts)) c.destroy();
    state.charts = {};
    window.canaryCharts = state.charts;
  }

  const secs = (t) => t / 1000;

  // Verdict markers and journal events, drawn on the canvas (no extra DOM).
  function markersHook(kind) {
    return (u) => {
      const s = state.series;
      if (!s) return;
      const ctx = u.ctx;
      const { left, top, width, height } = u.bbox;
      ctx.save();
      ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
      for (const e of s.events) {
        const x = u.valToPos(secs(e.at_ms), "x", true);
        if (x < left || x > left + width) continue;
        ctx.strokeStyle = cssVar("--muted");
        ctx.setLineDash([3 * devicePixelRatio, 3 * devicePixelRatio]);
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, top + height);
        ctx.stroke();
        ctx.setLineDash([]);
        if (kind === "rate") {
          ctx.fillStyle = cssVar("--muted");
          ctx.fillText(e.kind, x + 3, top + 12 * devicePixelRatio);
        }
      }
      if (kind !== "rate") {
        for (const m of s.verdicts) {
          const x = u.valToPos(secs(m.at_ms), "x", true);
          const val = kind === "error" ? m.canary_error_rate * 100 : m.canary_p99_ms;
          if (val === null || val === undefined || x < left || x > left + width) continue;
          const y = Math.min(top + height, Math.max(top, u.valToPos(val, "y", true)));
          ctx.fillStyle = cssVar(`--${m.result}`);
          ctx.beginPath();
          ctx.arc(x, y, 4 * devicePixelRatio, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
      ctx.restore();
    };
  }

  function chartData(kind) {
    const s = state.series;
    const t = s.t.map(secs);
    const st = state.routes.get(s.route);
    const a = st && st.analysis;
    const konst = (v) => t.map(() => (v === null || v === undefined ? null : v));
    const times100 = (xs) => xs.map((x) => (x === null ? null : x * 100));
    if (kind === "error") {
      const inc = a && a.max_error_rate_increase;
      return [
        t,
        times100(s.stable.error_rate),
        times100(s.canary.error_rate),
        konst(a && a.max_error_rate !== null ? a.max_error_rate * 100 : null),
        s.stable.error_rate.map((x) => (x === null || inc === null || inc === undefined ? null : (x + inc) * 100)),
      ];
    }
    if (kind === "latency") {
      const f = a && a.max_latency_increase;
      const floor = a ? a.latency_noise_floor_ms : 0;
      return [
        t,
        s.stable.p99_ms,
        s.canary.p99_ms,
        s.stable.p50_ms,
        s.canary.p50_ms,
        konst(a ? a.max_p99_latency_ms : null),
        s.stable.p99_ms.map((x) => (x === null || f === null || f === undefined ? null : Math.max(x * f, x + floor))),
      ];
    }
    return [t, s.stable.rps, s.canary.rps, s.weight];
  }

  function drawCharts() {
    const v = state.view;
    if (!v || v.kind !== "route" || !state.series || !window.uPlot || !$("#charts")) return;
    destroyCharts();
    const stable = cssVar("--stable"), canary = cssVar("--canary"), limit = cssVar("--limit");
    const fg = cssVar("--fg"), grid = cssVar("--line");
    const width = Math.max(320, $("#charts").clientWidth - 24);
    const axis = (extra) => Object.assign({ stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } }, extra || {});
    const base = (kind, series, axes, scales) => ({
      width,
      height: 200,
      cursor: { sync: { key: "canary" } },
      scales: Object.assign({ x: { time: true } }, scales || {}),
      series: [{}].concat(series),
      axes: [axis()].concat(axes),
      hooks: { draw: [markersHook(kind)] },
      legend: { live: true },
    });
    const line = (label, stroke, extra) => Object.assign({ label, stroke, width: 2, spanGaps: false, points: { show: false } }, extra || {});
    const sv = state.routes.get(v.name);
    const sl = `stable ${sv ? sv.stable_version : ""}`, cl = `canary ${sv ? sv.canary_version || "" : ""}`;
    state.charts.error = new uPlot(
      base("error", [
        line(sl, stable),
        line(cl, canary),
        line("max_error_rate", limit, { width: 1 }),
        line("stable + max_error_rate_increase", limit, { width: 1, dash: [6, 4] }),
      ], [axis({ label: "%" })], { y: { range: (u, min, max) => [0, Math.max(1, max || 0)] } }),
      chartData("error"),
      $("#chart-error"),
    );
    state.charts.latency = new uPlot(
      base("latency", [
        line(`${sl} p99`, stable),
        line(`${cl} p99`, canary),
        line(`${sl} p50`, stable, { width: 1 }),
        line(`${cl} p50`, canary, { width: 1 }),
        line("max_p99_latency", limit, { width: 1 }),
        line("stable p99 × max_latency_increase", limit, { width: 1, dash: [6, 4] }),
      ], [axis({ label: "ms" })], { y: { range: (u, min, max) => [0, Math.max(1, max || 0)] } }),
      chartData("latency"),
      $("#chart-latency"),
    );
    state.charts.rate = new uPlot(
      base("rate", [
        line(sl, stable),
        line(cl, canary),
        line("weight %", cssVar("--weight"), { scale: "w", width: 1, paths: uPlot.paths.stepped({ align: 1 }) }),
      ], [axis({ label: "req/s" }), axis({ scale: "w", side: 1, label: "weight %", grid: { show: false } })], {
        y: { range: (u, min, max) => [0, Math.max(1, max || 0)] },
        w: { range: [0, 100] },
      }),
      chartData("rate"),
      $("#chart-rate"),
    );
    window.canaryCharts = state.charts;
  }

  function updateCharts() {
    if (!state.series || !state.charts.error) {
      drawCharts();
      return;
    }
    state.charts.error.setData(chartData("error"));
    state.charts.latency.setData(chartData("latency"));
    state.charts.rate.setData(chartData("rate"));
  }
  window.addEventListener("resize", () => {
    const w = $("#charts") ? Math.max(320, $("#charts").clientWidth - 24) : 0;
    for (const c of Object.values(state.charts)) c.setSize({ width: w, height: 200 });
  });

  // ---------------------------------------------------------------- history
  // The journal grouped per rollout: a group starts at `start` and ends at `promote`
  // (to 100%), `abort`, `complete` or `end`; entries outside a rollout form their own
  // groups (manual weights).
  function groups(events) {
    const out = [];
    let cur = null;
    for (const e of events) {
      if (e.kind === "start" || !cur || cur.closed) {
        cur = { version: e.canary_version, entries: [], closed: false, outcome: "running" };
        out.push(cur);
      }
      cur.entries.push(e);
      if (["abort", "complete", "end"].includes(e.kind) || (e.kind === "promote" && e.to.phase === "promoted")) {
        cur.outcome = e.kind === "promote" ? "promoted" : e.kind === "abort" ? "aborted" : e.kind;
        if (e.kind !== "promote" && e.kind !== "abort") cur.closed = true;
      }
      if (e.kind === "retry") cur.outcome = "running";
    }
    return out.reverse();
  }
  const who = (e) => {
    if (e.reason.startsWith("user") || ["pause", "resume", "retry"].includes(e.kind)) return "user";
    if (e.reason.startsWith("breaker")) return "breaker";
    if (e.kind === "verdict" || e.reason.startsWith("analysis") || e.verdict) return "analysis";
    if (e.kind === "weight" && e.reason.includes("by user")) return "user";
    if (["start", "complete", "end"].includes(e.kind) || e.reason.includes("config")) return "config";
    return "controller";
  };
  const pos = (p) => (p.no_canary ? "no canary" : `${p.phase || "manual"} ${weightText(p.weight)}`);

  function renderHistory(v) {
    const kind = v.q.get("kind") || "";
    const gs = groups(state.events);
    const kinds = [...new Set(state.events.map((e) => e.kind))].sort();
    const select = el(
      "select",
      { id: "kind", "aria-label": "Filter by kind", onchange: (e) => go(routeHref(v.name, `/events${e.target.value ? `?kind=${e.target.value}` : ""}`)) },
      el("option", { value: "" }, "all kinds"),
      kinds.map((k) => el("option", { value: k, selected: k === kind }, k)),
    );
    $("#main").replaceChildren(
      el("h1", {}, `History of ${v.name}`),
      el("div", { class: "toolbar" }, select, el("a", { href: routeHref(v.name), "data-nav": true }, "← charts")),
      gs.length ? "" : el("p", { class: "muted" }, "The journal is empty."),
      ...gs.map((g, i) => {
        const first = g.entries[0], last = g.entries[g.entries.length - 1];
        const entries = g.entries.filter((e) => !kind || e.kind === kind).slice().reverse();
        return el(
          "details",
          { class: "group", open: i === 0 },
          el("summary", {}, el("strong", {}, g.version || "–"), " · ", badge(g.outcome, g.outcome === "running" ? "progressing" : g.outcome), " · started ", time(first.at_ms), ` · ${dur(last.at_ms - first.at_ms)} · ${g.entries.length} entries`),
          el(
            "table",
            {},
            el("thead", {}, el("tr", {}, ["when", "kind", "who", "from → to", "reason and numbers"].map((h) => el("th", { scope: "col" }, h)))),
            el(
              "tbody",
              {},
              entries.map((e) =>
                el(
                  "tr",
                  { dataset: { kind: e.kind } },
                  el("td", {}, el("a", { href: routeHref(v.name, `?window=1h&at=${e.at_ms}`), "data-nav": true }, time(e.at_ms))),
                  el("td", {}, e.kind),
                  el("td", {}, who(e)),
                  el("td", {}, `${pos(e.from)} → ${pos(e.to)}`),
                  el(
                    "td",
                    {},
                    e.reason,
                    e.verdict
                      ? el("div", { class: "muted" }, `canary ${pct(e.verdict.canary.error_rate)} errors, p99 ${ms(e.verdict.canary.p99_ms)} (${e.verdict.canary.requests} req) · stable ${pct(e.verdict.stable.error_rate)}, p99 ${ms(e.verdict.stable.p99_ms)} (${e.verdict.stable.requests} req)`)
                      : "",
                  ),
                ),
              ),
            ),
          ),
        );
      }),
    );
    document.body.dataset.ready = "1";
  }

  // ---------------------------------------------------------------- start
  async function start() {
    applyTheme();
    try {
      state.info = await getJSON("info");
      updateLock();
      await refresh();
    } catch (e) {
      banner(`Cannot reach the admin API: ${e.message}`);
      startPolling();
    }
    await render(true);
    openStream();
  }
  start();
})();
