#!/usr/bin/env python3
"""Helpers for scripts/bench.sh: /proc sampling, port checks, output parsing,
aggregation and report writing.  Standard library only.

Subcommands (all bounded in time):
  cpu PID                  utime+stime clock ticks summed over PID and its descendants
  rss PID                  VmRSS kB summed over PID and its descendants
  sample PID OUT MAXSEC    every 0.5 s write max RSS seen so far to OUT; exits after MAXSEC
  waitport PORT TIMEOUT [PID] [URL]
                           wait until 127.0.0.1:PORT accepts (and URL answers 2xx if
                           given); exit 1 on timeout, 2 if PID died
  busy SECONDS             whole-machine CPU busy % over SECONDS
  stat                     whole-machine CPU clock ticks: "total steal" (from /proc/stat)
  busyports PORT...        print the ports that accept connections (exit 1 if any)
  collect RUNDIR           turn one measurement's raw files into a JSON line on stdout
  report RAW META OUTBASE [XRAW]
                           aggregate runs, write OUTBASE.md and OUTBASE.json; XRAW holds
                           the optional scenarios' runs (idle, connrate, tls-*)
  idle PORT N CONC READY STOP MAXSEC
                           open N keep-alive connections to 127.0.0.1:PORT (CONC at a
                           time), one GET each, keep them open and idle; write a JSON
                           status to READY, hold until the file STOP exists (at most
                           MAXSEC s), print how many the server closed meanwhile
  xcollect KIND RUNDIR     one optional-scenario measurement -> JSON line on stdout
  selftest                 check the parsers and the ratio arithmetic on recorded output
"""
import json
import os
import re
import socket
import statistics
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc
def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'
        rest = s[s.rfind(")") + 2:].split()
        ppid = int(rest[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid):
    pid = int(pid)
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ticks(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        # fields 14 (utime) and 15 (stime), 1-based; rest starts at field 3
        total += int(rest[11]) + int(rest[12])
    return total


def rss_kb(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def sample(pid, out, maxsec):
    deadline = time.monotonic() + float(maxsec)
    best = 0
    while time.monotonic() < deadline:
        best = max(best, rss_kb(pid))
        tmp = out + ".part"
        with open(tmp, "w") as f:
            f.write(f"{best}\n")
        os.replace(tmp, out)
        time.sleep(0.5)


def machine_ticks():
    """Whole-machine (total, steal) clock ticks from /proc/stat's first line."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), (v[7] if len(v) > 7 else 0)


def busy_pct(seconds):
    """Whole-machine CPU busy % over SECONDS, from /proc/stat."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle
    t0, i0 = snap()
    time.sleep(float(seconds))
    t1, i1 = snap()
    return 0.0 if t1 == t0 else 100.0 * (1 - (i1 - i0) / (t1 - t0))


def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def waitport(port, timeout, pid=None, url=None):
    deadline = time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        if pid and not os.path.exists(f"/proc/{pid}"):
            return 2
        if pid:
            try:  # zombie = exited
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return 2
            except OSError:
                return 2
        if _accepts(port):
            if not url:
                return 0
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if 200 <= r.status < 300:
                        return 0
            except Exception:
                pass
        time.sleep(0.1)
    return 1


# ---------------------------------------------------------------- parsing
_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_wrk(text):
    r = {"rps": None, "requests": None, "duration_s": None, "non2xx": 0,
         "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", text)
    if m:
        r["requests"] = int(m.group(1))
        mult = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60}[m.group(3)]
        r["duration_s"] = float(m.group(2)) * mult
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["socket_errors"] = dict(zip(["connect", "read", "write", "timeout"],
                                      map(int, m.groups())))
    r["errors"] = r["non2xx"] + sum(r["socket_errors"].values())
    return r


def parse_oha(path, rate):
    with open(path) as f:
        j = json.load(f)
    summ = j.get("summary", {})
    pct = j.get("latencyPercentiles", {})
    codes = j.get("statusCodeDistribution", {}) or {}
    errs = j.get("errorDistribution", {}) or {}
    total = sum(int(v) for v in codes.values())
    non2xx = sum(int(v) for k, v in codes.items() if not str(k).startswith("2"))
    nerr = sum(int(v) for v in errs.values())

    def ms(key):
        v = pct.get(key)
        return None if v is None else v * 1000.0

    r = {
        "p50_ms": ms("p50"), "p90_ms": ms("p90"), "p99_ms": ms("p99"),
        "p999_ms": ms("p99.9"),
        "rps": summ.get("requestsPerSec"), "success_rate": summ.get("successRate"),
        "responses": total, "non2xx": non2xx, "errors_total": nerr, "error_kinds": errs,
        "target_rate": rate,
    }
    r["errors"] = non2xx + nerr
    r["rate_shortfall"] = bool(r["rps"] is not None and rate and r["rps"] < 0.95 * rate)
    return r


def _read(path, conv=str, default=None):
    try:
        with open(path) as f:
            return conv(f.read().strip())
    except (OSError, ValueError):
        return default


def collect(rundir):
    meta = json.load(open(os.path.join(rundir, "meta.json")))
    rec = dict(meta)
    rec["wrk"] = {}
    for c in meta["conns"]:
        text = _read(os.path.join(rundir, f"wrk-c{c}.txt"), default="")
        w = parse_wrk(text)
        w["exit"] = _read(os.path.join(rundir, f"wrk-c{c}.rc"), int)
        t0 = _read(os.path.join(rundir, f"wrk-c{c}.cpu0"), int)
        t1 = _read(os.path.join(rundir, f"wrk-c{c}.cpu1"), int)
        w["cpu_ticks"] = None if t0 is None or t1 is None else t1 - t0
        if w["cpu_ticks"] is not None and w["requests"]:
            w["cpu_us_per_req"] = w["cpu_ticks"] / CLK_TCK / w["requests"] * 1e6
            w["cpu_cores"] = (w["cpu_ticks"] / CLK_TCK / w["duration_s"]
                              if w["duration_s"] else None)
        else:
            w["cpu_us_per_req"] = None
            w["cpu_cores"] = None
        if w["rps"] is None or w["exit"] not in (0, None):
            w["errors"] = (w.get("errors") or 0) + 1
            w["failed"] = True
        rec["wrk"][str(c)] = w
    op = os.path.join(rundir, "oha.json")
    try:
        rec["oha"] = parse_oha(op, meta["rate"])
    except Exception as e:  # noqa: BLE001
        rec["oha"] = {"failed": True, "why": str(e)[:200], "errors": 1,
                      "p50_ms": None, "p99_ms": None, "rate_shortfall": False}
    rec["rss_idle_kb"] = _read(os.path.join(rundir, "rss-idle"), int)
    rec["rss_max_kb"] = _read(os.path.join(rundir, "rss-max"), int)
    rec["busy_before_pct"] = _read(os.path.join(rundir, "busy-before"), float)
    flags, noise = [], []
    if rec["busy_before_pct"] is None and rec["rss_idle_kb"] is None:
        flags.append("target failed to start")
    bmax = meta.get("busy_max", 25)
    if rec["busy_before_pct"] is not None and rec["busy_before_pct"] > bmax:
        noise.append(f"machine {rec['busy_before_pct']:.0f}% busy with other work just before this run")
    # CPU time the hypervisor gave to other guests while the loads ran: on a shared VM
    # that stalls whatever runs (latency outliers, lower throughput) without showing as
    # busy beforehand.
    t0 = _read(os.path.join(rundir, "stat0"), str)
    t1 = _read(os.path.join(rundir, "stat1"), str)
    rec["steal_pct"] = None
    if t0 and t1:
        (a0, s0), (a1, s1) = (map(int, t.split()) for t in (t0, t1))
        if a1 > a0:
            rec["steal_pct"] = round(100.0 * (s1 - s0) / (a1 - a0), 2)
    smax = meta.get("steal_max", 0.5)
    if rec["steal_pct"] is not None and rec["steal_pct"] > smax:
        noise.append(f"the hypervisor took {rec['steal_pct']:.1f}% of the machine's CPU during this run (steal)")
    for c, w in rec["wrk"].items():
        if w.get("failed"):
            flags.append(f"wrk c{c} failed")
        elif w["errors"]:
            flags.append(f"wrk c{c}: {w['non2xx']} non-2xx, socket errors {w['socket_errors']}")
    o = rec["oha"]
    if o.get("failed"):
        flags.append("oha failed")
    else:
        if o["errors"]:
            flags.append(f"oha: {o['non2xx']} non-2xx, {o['errors_total']} errors {o['error_kinds']}")
        if o["rate_shortfall"]:
            flags.append(f"oha: achieved {o['rps']:.0f} req/s < 95% of {o['target_rate']}")
    rec["flags"] = flags        # errors: the figures of this run are suspect
    rec["noise"] = noise        # the machine was not quiet: figures are noisy
    print(json.dumps(rec))


# ---------------------------------------------------------------- idle connections
def idle(port, n, conc, ready, stop, maxsec):
    """Open N keep-alive connections, one request each, and keep them idle.

    asyncio streams, one task per connection: a client that costs little per
    connection, so 10,000 of them fit next to the proxies on a 2-core machine.
    """
    import asyncio

    port, n, conc, maxsec = int(port), int(n), int(conc), float(maxsec)
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: canary-bench-idle\r\n\r\n"

    async def one(sem):
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            try:
                w.write(req)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                lines = head.decode("latin-1").split("\r\n")
                if not lines[0].startswith("HTTP/1.1 2"):
                    raise ValueError("status " + lines[0][:40])
                cl = None
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    if k.strip().lower() == "content-length":
                        cl = int(v.strip())
                    if k.strip().lower() == "connection" and "close" in v.lower():
                        raise ValueError("server asked to close")
                if cl is None:
                    raise ValueError("no content-length")
                await asyncio.wait_for(r.readexactly(cl), 10)
            except BaseException:
                w.close()
                raise
            return r, w

    async def main():
        t0 = time.monotonic()
        sem = asyncio.Semaphore(conc)
        res = await asyncio.gather(*(one(sem) for _ in range(n)), return_exceptions=True)
        ok = [x for x in res if not isinstance(x, BaseException)]
        errs = {}
        for x in res:
            if isinstance(x, BaseException):
                k = f"{type(x).__name__}: {str(x)[:60]}"
                errs[k] = errs.get(k, 0) + 1
        status = {"requested": n, "open": len(ok), "failed": n - len(ok),
                  "errors": errs, "open_s": round(time.monotonic() - t0, 2)}
        with open(ready + ".part", "w") as f:
            json.dump(status, f)
        os.replace(ready + ".part", ready)
        # A read that finishes means the server sent something or closed: not idle.
        watch = [asyncio.ensure_future(r.read(1)) for r, _ in ok]
        deadline = time.monotonic() + maxsec
        while not os.path.exists(stop) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        status["closed_by_server_while_held"] = sum(1 for t in watch if t.done())
        for t in watch:
            t.cancel()
        for _, w in ok:
            w.close()
        print(json.dumps(status))

    asyncio.run(main())


# ---------------------------------------------------------------- optional scenarios
def _noise(rundir, busy_max, steal_max):
    """(busy_before_pct, steal_pct, [noise reasons]) for one run directory."""
    busy = _read(os.path.join(rundir, "busy-before"), float)
    noise = []
    if busy is not None and busy > busy_max:
        noise.append(f"machine {busy:.0f}% busy with other work just before this run")
    t0 = _read(os.path.join(rundir, "stat0"), str)
    t1 = _read(os.path.join(rundir, "stat1"), str)
    steal = None
    if t0 and t1:
        (a0, s0), (a1, s1) = (map(int, t.split()) for t in (t0, t1))
        if a1 > a0:
            steal = round(100.0 * (s1 - s0) / (a1 - a0), 2)
    if steal is not None and steal > steal_max:
        noise.append(f"the hypervisor took {steal:.1f}% of the machine's CPU during this run (steal)")
    return busy, steal, noise


def parse_h2load(text):
    r = {"rps": None, "requests": None, "duration_s": None, "errors": 0}
    m = re.search(r"finished in ([\d.]+)(us|ms|s),\s+([\d.]+) req/s", text)
    if m:
        r["duration_s"] = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1}[m.group(2)]
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        total, started, done, succ, failed, errored, tmo = map(int, m.groups())
        r["requests"] = succ
        r["errors"] = failed + errored + tmo
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        r["errors"] += sum(map(int, m.groups()[1:]))
    m = re.search(r"Application protocol: (\S+)", text)
    r["alpn"] = m.group(1) if m else None
    return r


def parse_s_time(texts, wall_s):
    """Sum parallel `openssl s_time` runs over the wall time they took together.

    s_time's own "real seconds" is a whole number, too coarse for a few seconds' run.
    """
    conns, resumed = 0, 0
    for t in texts:
        m = re.findall(r"(\d+) connections in \d+ real seconds", t)
        if m:
            conns += int(m[-1])
        # s_time prints one mark per connection: 'r' resumed, '*' a full handshake
        for line in t.splitlines():
            if re.fullmatch(r"[r*]+", line.strip()):
                resumed += line.count("r")
    return {"conns": conns, "rate": conns / wall_s if wall_s else None, "resumed": resumed}


def xcollect(kind, rundir):
    meta = json.load(open(os.path.join(rundir, "meta.json")))
    rec = dict(meta)
    rec["scenario"] = kind
    flags = []
    busy, steal, noise = _noise(rundir, meta.get("busy_max", 25), meta.get("steal_max", 0.5))
    rec["busy_before_pct"], rec["steal_pct"] = busy, steal
    m = {}
    if kind == "idle":
        before = _read(os.path.join(rundir, "rss-before"), int)
        held = _read(os.path.join(rundir, "rss-held"), int)
        try:
            st = json.load(open(os.path.join(rundir, "idle.json")))
        except (OSError, ValueError):
            st = {}
        end = {}
        try:
            end = json.loads(_read(os.path.join(rundir, "idle.out"), default="{}").splitlines()[-1])
        except (ValueError, IndexError):
            pass
        n_open = st.get("open")
        m["rss_before_kb"] = before
        m["rss_idle_kb"] = held
        m["conns_open"] = n_open
        m["open_s"] = st.get("open_s")
        m["kib_per_conn"] = ((held - before) / n_open
                             if held is not None and before is not None and n_open else None)
        if not st:
            flags.append("the idle client did not report")
        elif st.get("failed"):
            flags.append(f"{st['failed']} of {st['requested']} connections failed: {st.get('errors')}")
        closed = end.get("closed_by_server_while_held")
        m["closed_while_held"] = closed
        if closed:
            flags.append(f"the server closed {closed} idle connections while they were measured")
    else:
        t0 = _read(os.path.join(rundir, "cpu0"), int)
        t1 = _read(os.path.join(rundir, "cpu1"), int)
        ticks = None if t0 is None or t1 is None else t1 - t0
        rc = _read(os.path.join(rundir, "load.rc"), int)
        if kind in ("connrate", "tls-h1"):
            w = parse_wrk(_read(os.path.join(rundir, "load.txt"), default=""))
            m["rps"], n, err = w["rps"], w["requests"], w["errors"]
            if err:
                flags.append(f"wrk: {w['non2xx']} non-2xx, socket errors {w['socket_errors']}")
        elif kind == "tls-h2":
            h = parse_h2load(_read(os.path.join(rundir, "load.txt"), default=""))
            m["rps"], n, err = h["rps"], h["requests"], h["errors"]
            m["alpn"] = h["alpn"]
            if err:
                flags.append(f"h2load: {err} failed/errored/timed-out or non-2xx")
            if h["alpn"] != "h2":
                flags.append(f"h2load negotiated {h['alpn']!r}, not h2")
        else:  # tls-new, tls-resume: parallel openssl s_time
            texts = []
            for fn in sorted(os.listdir(rundir)):
                if fn.startswith("s_time-") and fn.endswith(".txt"):
                    texts.append(_read(os.path.join(rundir, fn), default=""))
            s = parse_s_time(texts, _read(os.path.join(rundir, "wall"), float))
            m["rps"], n = s["rate"], s["conns"]
            m["resumed"] = s["resumed"]
            if kind == "tls-resume" and n and s["resumed"] < 0.9 * n:
                flags.append(f"only {s['resumed']} of {n} connections were resumed")
            if kind == "tls-new" and s["resumed"]:
                flags.append(f"{s['resumed']} of {n} connections were resumed, not full handshakes")
        m["requests"] = n
        m["cpu_us_per_req"] = ticks / CLK_TCK / n * 1e6 if ticks is not None and n else None
        if kind.startswith("tls-"):
            m["rss_max_kb"] = _read(os.path.join(rundir, "rss-max"), int) or None
        if m["rps"] is None or rc not in (0, None):
            flags.append(f"load failed (exit {rc})")
        if (_read(os.path.join(rundir, "start-failed"), str)) is not None:
            flags.append("target failed to start")
    rec["m"] = m
    rec["flags"] = flags
    rec["noise"] = noise
    print(json.dumps(rec))


# What each optional scenario reports: (metric key, column title, decimals, scale,
# ratio direction): "up" = above 1x is better, "down" = below 1x is better, None = no ratio.
XSCEN = {
    "idle": ("Memory per idle keep-alive connection", [
        ("conns_open", "connections held", 0, 1, None),
        ("open_s", "s to open", 1, 1, None),
        ("rss_before_kb", "RSS before MiB", 1, 1 / 1024, "down"),
        ("rss_idle_kb", "RSS with them MiB", 1, 1 / 1024, "down"),
        ("kib_per_conn", "KiB per connection", 2, 1, "down"),
    ]),
    "connrate": ("New plain TCP connections (one request per connection)", [
        ("rps", "req/s = conn/s", 0, 1, "up"),
        ("cpu_us_per_req", "CPU µs/req", 1, 1, "down"),
    ]),
    "tls-h1": ("HTTPS keep-alive, HTTP/1.1 (wrk)", [
        ("rps", "req/s", 0, 1, "up"),
        ("cpu_us_per_req", "CPU µs/req", 1, 1, "down"),
        ("rss_max_kb", "RSS max MiB", 1, 1 / 1024, "down"),
    ]),
    "tls-h2": ("HTTPS keep-alive, HTTP/2 (h2load)", [
        ("rps", "req/s", 0, 1, "up"),
        ("cpu_us_per_req", "CPU µs/req", 1, 1, "down"),
        ("rss_max_kb", "RSS max MiB", 1, 1 / 1024, "down"),
    ]),
    "tls-new": ("New TLS 1.3 connections, full handshake (openssl s_time -new)", [
        ("rps", "conn/s", 0, 1, "up"),
        ("cpu_us_per_req", "CPU µs/conn", 1, 1, "down"),
        ("rss_max_kb", "RSS max MiB", 1, 1 / 1024, "down"),
    ]),
    "tls-resume": ("New TLS 1.3 connections, resumed (openssl s_time -reuse)", [
        ("rps", "conn/s", 0, 1, "up"),
        ("cpu_us_per_req", "CPU µs/conn", 1, 1, "down"),
        ("rss_max_kb", "RSS max MiB", 1, 1 / 1024, "down"),
        ("resumed", "resumed", 0, 1, None),
    ]),
}


def xreport(xruns, meta):
    """Markdown lines and a JSON summary for the optional scenarios."""
    L, summary = [], {}
    notes = meta.get("xnotes", {})
    for kind, (title, metrics) in XSCEN.items():
        rs_k = [r for r in xruns if r["scenario"] == kind]
        if not rs_k:
            continue
        for wk in sorted({r["workers"] for r in rs_k}):
            rs_w = [r for r in rs_k if r["workers"] == wk]
            by_rep = {(r["rep"], r["target"]): r for r in rs_w}
            targets = [t for t in meta["params"]["targets"] if any(r["target"] == t for r in rs_w)]
            L.append(f"## {title}, {wk} worker(s)/thread(s)")
            L.append("")
            if notes.get(kind):
                L.append(notes[kind])
                L.append("")
            hdr = ["target"] + [m[1] for m in metrics] + ["runs with errors"]
            L.append("| " + " | ".join(hdr) + " |")
            L.append("|" + "---|" * len(hdr))
            for t in targets:
                rs = [r for r in rs_w if r["target"] == t]
                s = {"runs": len(rs), "flags": [f"rep {r['rep']}: {f}" for r in rs for f in r["flags"]],
                     "noise": [f"rep {r['rep']}: {f}" for r in rs for f in r["noise"]],
                     "steal_pct": _med([r.get("steal_pct") for r in rs])}
                row = [f"**{t}**" + (" †" if s["noise"] else "")]
                for key, _, nd, scale, _ in metrics:
                    st = _med([r["m"].get(key) for r in rs])
                    s[key] = st
                    shown = None if st is None else {k: (v * scale if k != "n" else v) for k, v in st.items()}
                    row.append(_fmt(shown, nd))
                bad = sum(1 for r in rs if r["flags"])
                row.append(f"⚠ {bad}/{len(rs)}" if bad else "0")
                s["ratio"] = {}
                for base in ("nginx", "haproxy"):
                    if base == t:
                        continue
                    s["ratio"][base] = {}
                    for key, _, _, _, way in metrics:
                        if way is None:
                            continue
                        vals = []
                        for r in rs:
                            b = by_rep.get((r["rep"], base))
                            a = r["m"].get(key)
                            bv = b["m"].get(key) if b else None
                            if a is not None and bv:
                                vals.append(a / bv)
                        s["ratio"][base][key] = _med(vals)
                summary[f"{kind}/{wk}/{t}"] = s
                L.append("| " + " | ".join(row) + " |")
            L.append("")
            cols = [(k, h, w) for k, h, _, _, w in metrics if w]
            for base in ("nginx", "haproxy"):
                others = [t for t in targets if t != base and (base == "nginx" or t != "direct") and summary.get(f"{kind}/{wk}/{t}", {}).get("ratio", {}).get(base)]
                if base not in targets or not others:
                    continue
                L.append(f"Ratio to {base}, same repetition, median (min–max) "
                         f"({', '.join(h + (': >1 is better' if w == 'up' else ': <1 is better') for _, h, w in cols)}):")
                L.append("")
                L.append("| target | " + " | ".join(h for _, h, _ in cols) + " |")
                L.append("|" + "---|" * (len(cols) + 1))
                for t in others:
                    rv = summary[f"{kind}/{wk}/{t}"]["ratio"][base]
                    L.append(f"| {t} | " + " | ".join(_fmt(rv.get(k), 2, "×") for k, _, _ in cols) + " |")
                L.append("")
            fl = [(t, f) for t in targets for f in summary[f"{kind}/{wk}/{t}"]["flags"]]
            nz = [(t, f) for t in targets for f in summary[f"{kind}/{wk}/{t}"]["noise"]]
            if fl:
                L.append("⚠ Runs with errors (their figures are suspect):")
                L.append("")
                L += [f"- {t}: {f}" for t, f in fl]
                L.append("")
            if nz:
                L.append("† Noisy runs (other work or hypervisor steal during the run):")
                L.append("")
                L += [f"- {t}: {f}" for t, f in nz]
                L.append("")
    return L, summary


# ---------------------------------------------------------------- report
def _med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _fmt(s, nd=0, unit=""):
    if s is None:
        return "–"
    f = f"{{:,.{nd}f}}"
    if s["n"] == 1 or f.format(s["min"]) == f.format(s["max"]):
        return f.format(s["median"]) + unit
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}–{f.format(s['max'])})"


def report(raw, metapath, outbase, xraw=None):
    runs = [json.loads(l) for l in open(raw) if l.strip()]
    xruns = [json.loads(l) for l in open(xraw) if l.strip()] if xraw else []
    meta = json.load(open(metapath))
    conns = [str(c) for c in meta["params"]["conns"]]
    hi = conns[-1]
    groups = {}
    for r in runs:
        groups.setdefault((r["workers"], r["target"]), []).append(r)
    by_run = {(r["workers"], r["rep"], r["target"]): r for r in runs}

    def ratio(r, base, get):
        a, b = get(r), get(base)
        if a is None or b in (None, 0):
            return None
        return a / b

    # "throughput"/"cpu_per_req" are at the highest connection count (the JSON keeps
    # those names); the per-count ones are in the table too.
    getters = {
        "throughput": lambda r: r["wrk"][hi]["rps"],
        "cpu_per_req": lambda r: r["wrk"][hi]["cpu_us_per_req"],
    }
    for c in conns:
        getters[f"throughput_c{c}"] = lambda r, c=c: r["wrk"][c]["rps"]
        getters[f"cpu_per_req_c{c}"] = lambda r, c=c: r["wrk"][c]["cpu_us_per_req"]
    getters["p99"] = lambda r: r["oha"].get("p99_ms")
    getters["rss_max"] = lambda r: r["rss_max_kb"]
    shown = [f"throughput_c{c}" for c in conns] + [f"cpu_per_req_c{c}" for c in conns] + ["p99", "rss_max"]
    summary = {}
    for (wk, tgt), rs in sorted(groups.items()):
        s = {"runs": len(rs), "flags": [f"rep {r['rep']}: {f}" for r in rs for f in r["flags"]],
             "noise": [f"rep {r['rep']}: {f}" for r in rs for f in r.get("noise", [])],
             "runs_with_errors": sum(1 for r in rs if r["flags"]),
             "runs_noisy": sum(1 for r in rs if r.get("noise"))}
        for c in conns:
            s[f"rps_c{c}"] = _med([r["wrk"][c]["rps"] for r in rs])
            s[f"cpu_us_per_req_c{c}"] = _med([r["wrk"][c]["cpu_us_per_req"] for r in rs])
            s[f"cpu_cores_c{c}"] = _med([r["wrk"][c]["cpu_cores"] for r in rs])
        for k in ("p50_ms", "p99_ms", "p999_ms"):
            s[k] = _med([r["oha"].get(k) for r in rs])
        s["oha_rps"] = _med([r["oha"].get("rps") for r in rs])
        s["rss_idle_kb"] = _med([r["rss_idle_kb"] for r in rs])
        s["rss_max_kb"] = _med([r["rss_max_kb"] for r in rs])
        s["ratio_vs_nginx"] = {}
        for name, g in getters.items():
            vals = []
            for r in rs:
                base = by_run.get((wk, r["rep"], "nginx"))
                if base is not None:
                    vals.append(ratio(r, base, g))
            s["ratio_vs_nginx"][name] = _med(vals)
        summary[f"{wk}/{tgt}"] = s

    p = meta["params"]
    L = []
    L.append(f"# canary side-by-side benchmark — {meta['date_utc']}")
    L.append("")
    L.append("## Environment")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k in ("host_cpu", "nproc", "kernel", "loadavg_at_start", "cpu_busy_pct_at_start", "git"):
        L.append(f"| {k} | {meta.get(k, '')} |")
    for k, v in meta.get("versions", {}).items():
        L.append(f"| {k} | {v} |")
    L.append("")
    if meta.get("scenarios"):
        L.append("Scenarios: " + ", ".join(f"`{x}`" for x in meta["scenarios"])
                 + " (`BENCH_SCENARIOS`; see scripts/bench/README.md).")
        L.append("")
    if runs:
        L.append(f"Load: `wrk -t1 -c{{{','.join(conns)}}} -d{p['duration']}s` after a {p['warmup']} s warm-up; "
                 f"latency: `oha -z {p['oha_duration']}s -q {p['rate']} -c {p['oha_conns']} --latency-correction`; "
                 f"{p['reps']} repetition(s), targets alternated within each repetition "
                 f"({' '.join(p['targets'])}, the order rotated by one each repetition). Cells: median (min–max). "
                 f"CPU = utime+stime of the proxy's processes during the wrk run / requests completed. "
                 f"For `direct` the CPU and RSS are the upstream nginx's own. "
                 f"Upstreams: one nginx, 1 worker, `return 200` on :18001 (v1) / :18002 (v2). "
                 f"Workers = nginx `worker_processes`, haproxy `nbthread`, canary `workers`. "
                 f"Everything shares {meta.get('nproc')} cores with the load generator; "
                 f"† = machine busy with other work before the run (noisy).")
    L.append("")
    if meta.get("skipped"):
        L.append("**Skipped targets:** " + "; ".join(meta["skipped"]))
        L.append("")
    for wk in p["workers"]:
        keys = [k for k in summary if k.split("/")[0] == str(wk)]
        if not keys:
            continue
        L.append(f"## {wk} worker(s)/thread(s) per proxy")
        L.append("")
        hdr = ["target"] + [f"req/s c{c}" for c in conns] + [f"CPU µs/req c{c}" for c in conns] + \
              [f"p50 ms @{p['rate']}/s", f"p99 ms @{p['rate']}/s", "RSS idle MiB", "RSS max MiB", "runs with errors"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for tgt in p["targets"]:
            k = f"{wk}/{tgt}"
            if k not in summary:
                continue
            s = summary[k]

            def mib(x):
                if x is None:
                    return None
                return {kk: (vv / 1024 if kk != "n" else vv) for kk, vv in x.items()}

            name = f"**{tgt}**" + (" †" if s["noise"] else "")
            row = [name] + [_fmt(s[f"rps_c{c}"]) for c in conns] + \
                  [_fmt(s[f"cpu_us_per_req_c{c}"], 1) for c in conns] + \
                  [_fmt(s["p50_ms"], 2), _fmt(s["p99_ms"], 2),
                   _fmt(mib(s["rss_idle_kb"]), 1), _fmt(mib(s["rss_max_kb"]), 1),
                   (f"⚠ {s['runs_with_errors']}/{s['runs']}") if s["flags"] else "0"]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        others = [t for t in p["targets"] if t != "nginx" and f"{wk}/{t}" in summary]
        if f"{wk}/nginx" in summary and others:
            L.append("Ratio to nginx, same repetition, median (min–max) over the repetitions "
                     "(throughput: >1 is better; CPU/req, p99, RSS max: <1 is better):")
            L.append("")
            cols = [f"throughput c{c}" for c in conns] + [f"CPU/req c{c}" for c in conns] + ["p99", "RSS max"]
            L.append("| target | " + " | ".join(cols) + " |")
            L.append("|" + "---|" * (len(cols) + 1))
            for tgt in p["targets"]:
                k = f"{wk}/{tgt}"
                if k not in summary or tgt == "nginx":
                    continue
                rv = summary[k]["ratio_vs_nginx"]
                L.append(f"| {tgt} | " + " | ".join(_fmt(rv[n], 2, "×") for n in shown) + " |")
            L.append("")
    allflags = [(k, f) for k, s in summary.items() for f in s["flags"]]
    if allflags:
        L.append("## ⚠ Runs with errors (their figures are suspect)")
        L.append("")
        for k, f in allflags:
            L.append(f"- workers={k.replace('/', ' ')}: {f}")
        L.append("")
    allnoise = [(k, f) for k, s in summary.items() for f in s["noise"]]
    if allnoise:
        L.append("## † Noisy runs")
        L.append("")
        L.append("The machine was not quiet for these runs: other processes used the CPU just before, or "
                 "the hypervisor gave CPU time to other guests during them (steal, which shows first as "
                 "latency outliers). Their figures are lower/wider than the proxy's real capacity. Rerun on "
                 "a quiet machine to confirm.")
        L.append("")
        for k, f in allnoise:
            L.append(f"- workers={k.replace('/', ' ')}: {f}")
        L.append("")
    xl, xsummary = xreport(xruns, meta)
    L += xl
    L.append(f"Wall time: {meta.get('wall_s', '?')} s. Raw per-run figures are in the JSON file.")
    if p.get("shortened_by_budget"):
        L.append("")
        L.append(f"The runs were shortened (or a repetition dropped) to keep the whole script within its "
                 f"{p['budget_s']} s budget: this run also installed tools or built the binary. "
                 f"A second run uses the full durations.")
    L.append("")
    with open(outbase + ".md", "w") as f:
        f.write("\n".join(L))
    with open(outbase + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs,
                   "xsummary": xsummary, "xruns": xruns}, f, indent=1)
    return "\n".join(L)


# ---------------------------------------------------------------- self-test
def selftest():
    """Check the parsers and the ratio arithmetic on recorded tool output (no servers)."""
    h2 = parse_h2load(
        "Application protocol: h2\n"
        "finished in 2.02s, 3971.00 req/s, 268.77KB/s\n"
        "requests: 7942 total, 7992 started, 7942 done, 7942 succeeded, 0 failed, 0 errored, 0 timeout\n"
        "status codes: 7940 2xx, 0 3xx, 2 4xx, 0 5xx\n")
    assert (h2["rps"], h2["requests"], h2["errors"], h2["alpn"]) == (3971.0, 7942, 2, "h2"), h2
    st = parse_s_time([
        "Collecting connection statistics for 2 seconds\n" + "*" * 151 + "\n\n"
        "151 connections in 0.15s; 1006.67 connections/user sec, bytes read 21895\n"
        "151 connections in 3 real seconds, 145 bytes read per connection\n",
        "\n\nNow timing with session id reuse.\nstarting\n" + "r" * 255 + "*\n\n"
        "256 connections in 0.13s; 1969.23 connections/user sec, bytes read 37120\n"
        "256 connections in 3 real seconds, 145 bytes read per connection\n"], 2.5)
    assert (st["conns"], st["resumed"], round(st["rate"], 1)) == (407, 255, 162.8), st
    w = parse_wrk("  5096 requests in 2.01s, 746.48KB read\nRequests/sec:   2534.42\n"
                  "  Socket errors: connect 0, read 3, write 0, timeout 1\n")
    assert (w["rps"], w["requests"], w["errors"]) == (2534.42, 5096, 4), w
    runs = []
    for rep, (a, b, c) in enumerate([(100, 50, 80), (90, 60, 90), (120, 40, 60)], 1):
        for t, v in (("canary", a), ("nginx", b), ("haproxy", c)):
            runs.append({"scenario": "connrate", "target": t, "workers": 1, "rep": rep,
                         "m": {"rps": v, "cpu_us_per_req": 1000 / v}, "flags": [], "noise": []})
    _, summ = xreport(runs, {"params": {"targets": ["canary", "nginx", "haproxy"]}})
    r = summ["connrate/1/canary"]["ratio"]
    # per repetition: 2.0, 1.5, 3.0 to nginx; 1.25, 1.0, 2.0 to haproxy
    assert r["nginx"]["rps"]["median"] == 2.0 and r["haproxy"]["rps"]["median"] == 1.25, r
    assert abs(r["nginx"]["cpu_us_per_req"]["median"] - 0.5) < 1e-9, r
    assert summ["connrate/1/nginx"]["rps"]["median"] == 50
    print("benchlib selftest: ok")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "cpu":
        print(cpu_ticks(argv[2]))
    elif cmd == "rss":
        print(rss_kb(argv[2]))
    elif cmd == "sample":
        sample(argv[2], argv[3], argv[4])
    elif cmd == "waitport":
        return waitport(argv[2], argv[3], argv[4] if len(argv) > 4 and argv[4] else None,
                        argv[5] if len(argv) > 5 else None)
    elif cmd == "busy":
        print(f"{busy_pct(argv[2]):.1f}")
    elif cmd == "stat":
        print(*machine_ticks())
    elif cmd == "busyports":
        busy = [p for p in argv[2:] if _accepts(p)]
        if busy:
            print(" ".join(busy))
            return 1
    elif cmd == "collect":
        collect(argv[2])
    elif cmd == "report":
        print(report(argv[2], argv[3], argv[4], argv[5] if len(argv) > 5 else None))
    elif cmd == "idle":
        idle(*argv[2:8])
    elif cmd == "xcollect":
        xcollect(argv[2], argv[3])
    elif cmd == "selftest":
        selftest()
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
