#!/usr/bin/env bash
# Fleet figures (docs/fleet.md): a real etcd and three `canary serve` members on
# loopback, then
#   - propagation: 20 weight changes (0 <-> 100 %) through a follower's admin API, each
#     timed until every member's data plane routes with the new weight (p50, max);
#   - failover: kill -9 of the leader until a survivor leads and a command through the
#     other survivor is applied;
#   - breaker: the first trip on one member until every member's canary is at 0.
# Reports, never asserts. Every loop is bounded; every process is stopped at the end.
# Needs etcd (Debian etcd-server) and python3. Usage: scripts/fleet-bench.sh [--debug]
# (CANARY_BIN=path skips the build and uses that binary.)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[[ ${1:-} == --debug ]] && profile=debug
target=${CARGO_TARGET_DIR:-target}
bin=${CANARY_BIN:-$target/$profile/canary}
if [[ -z ${CANARY_BIN:-} ]]; then
    if [[ $profile == release ]]; then cargo build --release -p canary >&2; else cargo build -p canary >&2; fi
fi
export PATH="$PWD/target/debian-tools/usr/bin:$PATH"
command -v etcd >/dev/null || { echo "fleet-bench: etcd not found (apt-get install etcd-server)" >&2; exit 1; }
exec python3 - "$bin" <<'PY'
import http.client, http.server, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

BIN = sys.argv[1]
tmp = tempfile.mkdtemp(prefix="fleet-bench-")
procs = []

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

class Up(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = self.server.status
        b = b"ok"
        self.send_response(status); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass

def upstream(status=200):
    s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Up); s.status = status
    threading.Thread(target=s.serve_forever, daemon=True).start(); return s

def req(addr, method, path, body=None, timeout=5):
    c = http.client.HTTPConnection(addr, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        r = c.getresponse(); data = r.read()
        return r.status, r.getheader("x-canary-version"), data
    finally:
        c.close()

def jget(addr, path):
    s, _, d = req(addr, "GET", path); return json.loads(d)

def until(pred, limit, step=0.002):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if pred(): return time.monotonic()
        except OSError:
            pass
        time.sleep(step)
    raise SystemExit("fleet-bench: timed out")

try:
    ec, ep, em = port(), port(), port()
    procs.append(subprocess.Popen(["etcd", "--name", "b", "--data-dir", f"{tmp}/etcd",
        "--listen-client-urls", f"http://127.0.0.1:{ec}", "--advertise-client-urls", f"http://127.0.0.1:{ec}",
        "--listen-peer-urls", f"http://127.0.0.1:{ep}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{ep}",
        "--initial-cluster", f"b=http://127.0.0.1:{ep}", "--listen-metrics-urls", f"http://127.0.0.1:{em}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    stable, canary = upstream(), upstream()
    members = []
    for i in range(3):
        listen, admin = f"127.0.0.1:{port()}", f"127.0.0.1:{port()}"
        cfg = f"{tmp}/m{i}.yaml"
        open(cfg, "w").write(f"listen: {listen}\nadmin: {admin}\nstate_dir: {tmp}/s{i}\nworkers: 1\n"
            f"fleet:\n  etcd: [\"127.0.0.1:{ec}\"]\n  prefix: /bench\n  member: m{i}\n  lease_ttl: 2s\n")
        log = open(f"{tmp}/m{i}.log", "w")
        p = subprocess.Popen([BIN, "serve", "-c", cfg], stdout=log, stderr=log)
        procs.append(p); members.append({"name": f"m{i}", "listen": listen, "admin": admin, "proc": p})
    time.sleep(0.5)
    def push(doc):
        open(f"{tmp}/doc.yaml", "w").write(doc)
        subprocess.run([BIN, "fleet", "push", f"{tmp}/doc.yaml", "--etcd", f"127.0.0.1:{ec}", "--prefix", "/bench"],
                       check=True, stdout=subprocess.DEVNULL)
    s_addr, c_addr = f"127.0.0.1:{stable.server_port}", f"127.0.0.1:{canary.server_port}"
    push(f"routes:\n  - name: web\n    stable: {{version: v1, upstreams: [\"{s_addr}\"]}}\n"
         f"    canary: {{version: v2, upstreams: [\"{c_addr}\"]}}\n    weight: 0\n")
    until(lambda: all(req(m["admin"], "GET", "/readyz")[0] == 200 for m in members), 30, 0.05)
    until(lambda: all(jget(m["admin"], "/api/v1/fleet")["leader"] for m in members), 30, 0.05)
    leader = jget(members[0]["admin"], "/api/v1/fleet")["leader"]
    follower = next(m for m in members if m["name"] != leader)

    # Propagation.
    times = []
    for i in range(20):
        w, want = (100, "v2") if i % 2 == 0 else (0, "v1")
        t0 = time.monotonic()
        s, _, body = req(follower["admin"], "PUT", "/api/v1/routes/web/weight", json.dumps({"weight": w}))
        assert s == 200, body
        t1 = max(until(lambda m=m: req(m["listen"], "GET", "/")[1] == want, 5, 0.001) for m in members)
        times.append((t1 - t0) * 1000)
        time.sleep(0.05)
    times.sort()
    print(f"propagation (follower API -> every member's data plane), 20 changes, 3 members: "
          f"p50 {statistics.median(times):.1f} ms, max {times[-1]:.1f} ms")
    # What etcd's own disk cost meanwhile (each leader write is one fsynced raft entry).
    text = req(f"127.0.0.1:{em}", "GET", "/metrics")[2].decode()
    val = lambda n: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(n + " "))
    fs_sum, fs_n = val("etcd_disk_wal_fsync_duration_seconds_sum"), val("etcd_disk_wal_fsync_duration_seconds_count")
    if fs_n:
        print(f"  etcd WAL fsync meanwhile: mean {fs_sum / fs_n * 1000:.1f} ms over {fs_n:.0f} fsyncs")
    delays = []
    for m in members:
        t = req(m["admin"], "GET", "/metrics")[2].decode()
        get = lambda n: next((float(l.split()[-1]) for l in t.splitlines() if l.startswith(n + " ")), 0.0)
        if get("canary_fleet_apply_delay_seconds_count"):
            delays.append(get("canary_fleet_apply_delay_seconds_sum") / get("canary_fleet_apply_delay_seconds_count") * 1000)
    if delays:
        print(f"  leader write -> member applied (canary_fleet_apply_delay_seconds), mean per follower: "
              + ", ".join(f"{d:.1f} ms" for d in delays))

    # Failover.
    lm = next(m for m in members if m["name"] == leader)
    survivors = [m for m in members if m is not lm]
    t0 = time.monotonic(); lm["proc"].kill(); lm["proc"].wait()
    t1 = until(lambda: all(jget(m["admin"], "/api/v1/fleet")["leader"] not in (None, leader) for m in survivors), 20, 0.01)
    new = jget(survivors[0]["admin"], "/api/v1/fleet")["leader"]
    other = next(m for m in survivors if m["name"] != new)
    while True:
        s, _, _ = req(other["admin"], "PUT", "/api/v1/routes/web/weight", json.dumps({"weight": 100}))
        if s == 200: break
        time.sleep(0.01)
    t2 = until(lambda: all(req(m["listen"], "GET", "/")[1] == "v2" for m in survivors), 10, 0.002)
    print(f"failover (kill -9 of the leader, lease TTL 2 s): new leader after {(t1 - t0) * 1000:.0f} ms, "
          f"its first command applied everywhere after {(t2 - t0) * 1000:.0f} ms")

    # Breaker across the fleet.
    push(f"routes:\n  - name: web\n    stable: {{version: v1, upstreams: [\"{s_addr}\"]}}\n"
         f"    canary: {{version: v3, upstreams: [\"{c_addr}\"]}}\n    rollout:\n"
         f"      steps: [{{weight: 50, pause: 1h}}]\n      breaker: {{consecutive_failures: 3, min_clients: 1}}\n")
    until(lambda: all(jget(m["admin"], "/api/v1/routes/web")["phase"] == "progressing" for m in survivors), 10, 0.01)
    canary.status = 500
    a = survivors[0]
    t0 = None
    for _ in range(200):
        sent = time.monotonic()
        req(a["listen"], "GET", "/")
        st = jget(a["admin"], "/api/v1/routes/web")
        # Tripped, or already cut (the leader's abort can land before this poll): the
        # trip happened during the request just sent, so time from its start (an upper
        # bound by that request's own latency).
        if st["breaker_tripped"] or st["weight"] == 0:
            t0 = sent; break
    assert t0, f"the breaker never tripped: {st}"
    t1 = until(lambda: all(jget(m["admin"], "/api/v1/routes/web")["weight"] == 0 and
                           jget(m["admin"], "/api/v1/routes/web")["phase"] == "aborted" for m in survivors), 10, 0.002)
    print(f"breaker: first trip on one member -> every member aborted at 0 after {(t1 - t0) * 1000:.1f} ms")
finally:
    for p in procs:
        try: p.send_signal(signal.SIGKILL); p.wait(timeout=5)
        except Exception: pass
    shutil.rmtree(tmp, ignore_errors=True)
PY
