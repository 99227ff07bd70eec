# Shared by scripts/soak.sh and scripts/dos.sh: logging, cleanup of everything
# started, waiting for a port, the canary binary, and nginx upstreams (one process
# per instance, so one can be stopped alone). Sourced; expects ROOT and a tag in NAME.
T0=$(date +%s)
log() { printf "[$NAME %5ss] %s\n" "$(( $(date +%s) - T0 ))" "$*"; }
TMP="$(mktemp -d /tmp/canary-$NAME.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
  for f in "$TMP"/nginx-*.pid; do [[ -f $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null || true; done
  sleep 1
  [[ "${SOAK_KEEP_TMP:-0}" == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
bg() { local out="$1"; shift; setsid "$@" >"$out" 2>&1 </dev/null & PIDS+=($!); LAST=$!; }
waitport() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "$NAME: nothing listens on :$1" >&2; return 1
}

# ---------------------------------------------------------------- canary binary
if [[ -z "${CANARY_BIN:-}" ]]; then
  CANARY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/canary"
  log "building: cargo build --release -p canary"
  (cd "$ROOT" && cargo build --release -p canary) >"$TMP/build.log" 2>&1 || { tail -20 "$TMP/build.log"; exit 1; }
fi
[[ -x "$CANARY_BIN" ]] || { echo "$NAME: no binary at $CANARY_BIN" >&2; exit 1; }

# ---------------------------------------------------------------- upstreams
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[[ -x "$NGINX" ]] || { echo "$NAME: needs nginx (the upstreams)" >&2; exit 1; }
# One nginx per instance, so one can be bounced alone.
start_upstream() {   # start_upstream PORT BODY
  local conf="$TMP/nginx-$1.conf"
  mkdir -p "$TMP/ngx-$1"
  cat >"$conf" <<NGX
worker_processes 1;
daemon off;
pid $TMP/nginx-$1.pid;
error_log $TMP/nginx-$1.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $TMP/ngx-$1/body;
  proxy_temp_path $TMP/ngx-$1/proxy;
  fastcgi_temp_path $TMP/ngx-$1/fcgi;
  uwsgi_temp_path $TMP/ngx-$1/uwsgi;
  scgi_temp_path $TMP/ngx-$1/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / { return 200 "$2\n"; }
  }
}
NGX
  setsid "$NGINX" -e "$TMP/nginx-$1.err" -p "$TMP/ngx-$1" -c "$conf" >"$TMP/nginx-$1.out" 2>&1 </dev/null &
  waitport "$1"
}
stop_upstream() { [[ -f "$TMP/nginx-$1.pid" ]] && kill -TERM "$(cat "$TMP/nginx-$1.pid")" 2>/dev/null; sleep 0.5; rm -f "$TMP/nginx-$1.pid"; }
