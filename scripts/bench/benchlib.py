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
  report RAW META OUTBASE  aggregate runs, write OUTBASE.md and OUTBASE.json
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


def report(raw, metapath, outbase):
    runs = [json.loads(l) for l in open(raw) if l.strip()]
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
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    return "\n".join(L)


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
        print(report(argv[2], argv[3], argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
