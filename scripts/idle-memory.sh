#!/usr/bin/env bash
# Memory per idle keep-alive client connection, canary next to nginx (not in CI):
# each proxy in front of the same nginx upstream, IDLE_CONNS connections opened (one
# request each) and held idle; the proxy's RSS (all its processes) before and with
# them. Loopback only, bounded (each phase at most a minute).
#
#   scripts/idle-memory.sh                    # 10,000 connections
#   IDLE_CONNS=2000 CANARY_BIN=target/release/canary scripts/idle-memory.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/soak"
N="${IDLE_CONNS:-10000}"
[[ "$N" =~ ^[0-9]+$ ]] || { echo "idle-memory: IDLE_CONNS must be a whole number" >&2; exit 1; }
PU=19201 PC=19280 PA=19291 PN=19281
NAME=idle
# shellcheck source=soak/lib.sh
source "$HERE/lib.sh"
ulimit -n $((N + 1024)) || { echo "idle-memory: cannot raise the descriptor limit to $((N + 1024))" >&2; exit 1; }

rss_kib() {   # rss_kib PID...: the summed VmRSS of these processes and their children
  local total=0 p
  for p in "$@" $(pgrep -P "$(echo "$@" | tr ' ' ',')" 2>/dev/null || true); do
    total=$(( total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}
measure() {   # measure NAME PORT PID...
  local name="$1" port="$2"; shift 2
  sleep 1
  local before; before=$(rss_kib "$@")
  python3 "$ROOT/scripts/bench/idle_conns.py" 127.0.0.1 "$port" "$N" 8 >"$TMP/$name.idle" 2>&1 &
  local client=$!
  for _ in $(seq 120); do grep -q '^open' "$TMP/$name.idle" && break; sleep 0.5; done
  sleep 2
  local with; with=$(rss_kib "$@")
  wait $client || true
  log "$name: $(head -1 "$TMP/$name.idle"); RSS ${before} KiB idle -> ${with} KiB with them: $(( (with - before) * 1024 / N )) bytes per connection"
}

start_upstream $PU v1
cat >"$TMP/canary.yaml" <<YAML
listen: 127.0.0.1:$PC
admin: 127.0.0.1:$PA
state_dir: $TMP/state
workers: 1
limits: {header_timeout: 120s, max_connections: $((N + 100))}
routes:
  - name: web
    stable: {version: v1, upstreams: ["127.0.0.1:$PU"]}
YAML
CANARY_LOG=warn bg "$TMP/canary.log" "$CANARY_BIN" serve --config "$TMP/canary.yaml"
CANARY_PID=$LAST
waitport $PC
measure canary $PC "$CANARY_PID"
kill -TERM "$CANARY_PID"

mkdir -p "$TMP/ngx-proxy"
cat >"$TMP/nginx-proxy.conf" <<NGX
worker_processes 1;
worker_rlimit_nofile $((N + 1024));
daemon off;
pid $TMP/nginx-proxy.pid;
error_log $TMP/nginx-proxy.err warn;
events { worker_connections $((N + 1024)); }
http {
  access_log off;
  client_body_temp_path $TMP/ngx-proxy/body;
  proxy_temp_path $TMP/ngx-proxy/proxy;
  fastcgi_temp_path $TMP/ngx-proxy/fcgi;
  uwsgi_temp_path $TMP/ngx-proxy/uwsgi;
  scgi_temp_path $TMP/ngx-proxy/scgi;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
  upstream v1 { server 127.0.0.1:$PU; keepalive 64; }
  server {
    listen 127.0.0.1:$PN backlog=4096;
    location / { proxy_pass http://v1; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
bg "$TMP/nginx-proxy.out" "$NGINX" -e "$TMP/nginx-proxy.err" -p "$TMP/ngx-proxy" -c "$TMP/nginx-proxy.conf"
NGINX_PID=$LAST
waitport $PN
measure nginx $PN "$NGINX_PID"
