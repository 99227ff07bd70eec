#!/usr/bin/env bash
# Side-by-side benchmark: canary vs nginx vs haproxy (and the direct upstream),
# on loopback, same upstreams and load. See scripts/bench/README.md.
#
#   scripts/bench.sh                      # full run (~11-13 min on 2 cores)
#   BENCH_QUICK=1 scripts/bench.sh        # ~2 min smoke run
#   BENCH_TARGETS="direct nginx haproxy" scripts/bench.sh
#   BENCH_SCENARIOS="idle connrate" scripts/bench.sh   # optional scenarios (README)
#
# Results: bench/results/<UTC>.md/.json and bench/results/latest.md/.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONDONTWRITEBYTECODE=1
HERE="$ROOT/scripts/bench"
BL="$HERE/benchlib.py"
RESULTS="$ROOT/bench/results"

# ------------------------------------------------------------------ knobs
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  : "${BENCH_DURATION:=3}" "${BENCH_REPS:=1}" "${BENCH_WARMUP:=1}"
fi
DURATION="${BENCH_DURATION:-8}"            # seconds per wrk run
OHA_DURATION="${BENCH_OHA_DURATION:-$DURATION}"   # seconds per oha run
WARMUP="${BENCH_WARMUP:-2}"                # seconds of wrk warm-up before measuring
REPS="${BENCH_REPS:-3}"
RATE="${BENCH_RATE:-2000}"                 # oha fixed rate, req/s
OHA_CONNS="${BENCH_OHA_CONNS:-50}"
CONNS="${BENCH_CONNS:-50 200}"             # wrk connection counts (last one is used for ratios)
WORKERS_LIST="${BENCH_WORKERS:-1 2}"       # proxy worker processes/threads per pass
TARGETS="${BENCH_TARGETS:-direct canary nginx haproxy}"
START_TIMEOUT="${BENCH_START_TIMEOUT:-20}" # seconds to wait for a server to listen
KEEP_TMP="${BENCH_KEEP_TMP:-0}"
# Whole-run wall-time budget in seconds (0: none). The issue asks for under 15 minutes;
# on a fresh machine installing oha and the first release build take ~8 of them, so the
# run durations shrink to fit what is left (see "budget" below and scripts/bench/README.md).
BUDGET="${BENCH_BUDGET:-840}"
MIN_DURATION=3                             # never shrink a wrk or oha run below this
# Scenarios: `keepalive` is the original side-by-side (wrk + oha over keep-alive
# connections); the others are optional rows, run only when asked for:
#   idle     RSS with BENCH_IDLE_CONNS idle keep-alive client connections open
#   connrate new plain TCP connection per request (wrk -H 'Connection: close')
#   tls      HTTPS: keep-alive HTTP/1.1 (wrk) and HTTP/2 (h2load), new TLS 1.3
#            connections/s with a full handshake and resumed (openssl s_time)
SCENARIOS="${BENCH_SCENARIOS:-keepalive}"
IDLE_CONNS="${BENCH_IDLE_CONNS:-10000}"    # idle connections held open per measurement
IDLE_CONC="${BENCH_IDLE_CONC:-100}"        # how many the idle client opens at a time
IDLE_SETTLE="${BENCH_IDLE_SETTLE:-2}"      # seconds between the last one open and the RSS reading
CONNRATE_CONNS="${BENCH_CONNRATE_CONNS:-50}"  # wrk connections for connrate (each reconnects per request)
TLS_WORKERS="${BENCH_TLS_WORKERS:-1}"      # worker counts for the TLS rows
TLS_CONNS="${BENCH_TLS_CONNS:-50}"         # wrk / h2load connections for keep-alive HTTPS
H2_STREAMS="${BENCH_H2_STREAMS:-1}"        # h2load -m: concurrent streams per connection
TLS_CLIENTS="${BENCH_TLS_CLIENTS:-4}"      # parallel `openssl s_time` processes

PORT_UP1=18001 PORT_UP2=18002 PORT_CANARY=18080 PORT_ADMIN=18901 PORT_NGINX=18081 PORT_HAPROXY=18082
ALL_PORTS="$PORT_UP1 $PORT_UP2 $PORT_CANARY $PORT_ADMIN $PORT_NGINX $PORT_HAPROXY"

T_START=$(date +%s)
log()  { printf '[bench %4ss] %s\n' "$(( $(date +%s) - T_START ))" "$*"; }
warn() { printf '[bench %4ss] WARNING: %s\n' "$(( $(date +%s) - T_START ))" "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
bl()   { python3 "$BL" "$@"; }

for v in DURATION OHA_DURATION WARMUP REPS RATE OHA_CONNS START_TIMEOUT BUDGET IDLE_CONNS IDLE_CONC \
         IDLE_SETTLE CONNRATE_CONNS TLS_CONNS H2_STREAMS TLS_CLIENTS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
for t in $TARGETS; do
  case "$t" in direct|canary|nginx|haproxy) ;; *) die "unknown target '$t' in BENCH_TARGETS";; esac
done
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
for sc in $SCENARIOS; do
  case "$sc" in keepalive|idle|connrate|tls) ;; *) die "unknown scenario '$sc' in BENCH_SCENARIOS (keepalive idle connrate tls)";; esac
done
has_scen() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ------------------------------------------------------------------ process bookkeeping
TMP=""
PIDS=()          # every server we started, each its own process group (setsid)
SAMPLER_PID=""
XLOAD_PIDS=()    # optional scenarios' clients running in the background (idle client, s_time)
OHA_INSTALL_PID=""
POLICY_RC_CREATED=0
CLEANED=0
CLEANUP_BAD=0

stop_group() {   # stop_group PID: TERM the process group, wait ≤5 s, then KILL
  local pid="$1" i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    warn "process group $pid did not stop on TERM; sending KILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
    sleep 0.2
  fi
  wait "$pid" 2>/dev/null || true
}

forget_pid() {
  local p keep=()
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

cleanup() {
  [[ "$CLEANED" == 1 ]] && return 0
  CLEANED=1
  set +e
  if [[ -n "$LOAD_PID" ]]; then kill "$LOAD_PID" 2>/dev/null; wait "$LOAD_PID" 2>/dev/null; fi
  if [[ -n "$SAMPLER_PID" ]]; then kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; fi
  local x
  for x in "${XLOAD_PIDS[@]+"${XLOAD_PIDS[@]}"}"; do kill "$x" 2>/dev/null; wait "$x" 2>/dev/null; done
  XLOAD_PIDS=()
  if [[ -n "$OHA_INSTALL_PID" ]]; then stop_group "$OHA_INSTALL_PID"; fi
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_group "$p"; done
  PIDS=()
  if [[ "$POLICY_RC_CREATED" == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
  local busy
  busy=$(python3 "$BL" busyports $ALL_PORTS 2>/dev/null)
  if [[ -n "$busy" ]]; then
    warn "ports still in use after cleanup: $busy"
    CLEANUP_BAD=1
  else
    log "cleanup done; ports $ALL_PORTS are free"
  fi
  if [[ -n "$TMP" && -d "$TMP" ]]; then
    if [[ "$KEEP_TMP" == 1 ]]; then log "kept temp dir $TMP"; else rm -rf "$TMP"; fi
  fi
}
trap 'rc=$?; cleanup; [[ $CLEANUP_BAD == 1 && $rc == 0 ]] && rc=3; exit $rc' EXIT
trap 'warn "interrupted"; cleanup; exit 130' INT
trap 'warn "terminated"; cleanup; exit 143' TERM

LOAD_PID=""
run_load() {     # run_load SECS OUTFILE CMD...: bounded, interruptible (bash runs traps during `wait`)
  local secs="$1" out="$2"; shift 2
  timeout --foreground "$secs" "$@" >"$out" 2>&1 </dev/null &
  LOAD_PID=$!
  local rc=0
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  return $rc
}

LAST_PID=""
start_bg() {     # start_bg LOGFILE CMD...: start in its own session/process group
  local logf="$1"; shift
  setsid "$@" >"$logf" 2>&1 </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# ------------------------------------------------------------------ 1. tools
ensure_tools() {
  local missing=()
  command -v nginx   >/dev/null || [[ -x /usr/sbin/nginx ]]   || missing+=(nginx)
  command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
  command -v wrk     >/dev/null || missing+=(wrk)
  if has_scen tls; then
    command -v h2load  >/dev/null || missing+=(nghttp2-client)
    command -v openssl >/dev/null || missing+=(openssl)
  fi
  if ((${#missing[@]})); then
    log "installing missing tools with apt-get: ${missing[*]}"
    [[ $(id -u) == 0 ]] || die "need root to apt-get install ${missing[*]}"
    # keep the nginx/haproxy packages from starting their system services
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
      POLICY_RC_CREATED=1
    fi
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ "$POLICY_RC_CREATED" == 1 ]]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
  fi
  export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"
  command -v nginx >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null \
    || die "tools still missing after install"
  if has_scen keepalive && ! command -v oha >/dev/null; then
    # Compiles for ~4 minutes on 2 cores. It runs alongside the canary build, whose
    # fat-LTO link is single-threaded, so the two together take ~7.7 minutes instead of
    # ~10 one after the other (measured on a fresh target dir).
    log "installing oha with cargo in the background (log: $TMP/oha-install.log)"
    # Without CARGO_TARGET_DIR, so it builds in its own temp dir instead of waiting on the
    # lock of the target dir the canary build holds.
    setsid env -u CARGO_TARGET_DIR timeout 1800 cargo install oha --locked >"$TMP/oha-install.log" 2>&1 </dev/null &
    OHA_INSTALL_PID=$!
  fi
}
wait_oha() {     # the background oha install, if one was started, must have worked
  has_scen keepalive || return 0
  if [[ -n "$OHA_INSTALL_PID" ]]; then
    log "waiting for the oha install to finish"
    local rc=0
    wait "$OHA_INSTALL_PID" || rc=$?
    OHA_INSTALL_PID=""
    if [[ $rc != 0 ]]; then
      tail -n 20 "$TMP/oha-install.log" >&2
      die "cargo install oha --locked failed (exit $rc)"
    fi
    log "oha installed"
  fi
  command -v oha >/dev/null || die "oha still missing after install"
}
bl selftest >/dev/null || die "scripts/bench/benchlib.py selftest failed: its parsers do not read the tools' output"
busy=$(bl busyports $ALL_PORTS) || die "ports already in use: $busy (another bench running?)"
TMP="$(mktemp -d /tmp/canary-bench.XXXXXX)"
chmod 755 "$TMP"
mkdir -p "$TMP/runs" "$TMP/state" "$RESULTS"
ensure_tools

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n); [[ "$NOFILE" =~ ^[0-9]+$ ]] || NOFILE=65536
HAPROXY_MAXCONN=$(( (NOFILE - 200) / 2 )); ((HAPROXY_MAXCONN > 10000)) && HAPROXY_MAXCONN=10000
((HAPROXY_MAXCONN >= 500)) || die "open-file limit $NOFILE is too low (need >= 1200)"
BUSY_MAX="${BENCH_BUSY_MAX:-25}"            # % of machine CPU busy before a run that flags it
STEAL_MAX="${BENCH_STEAL_MAX:-0.5}"           # % of machine CPU stolen by the hypervisor during a run that flags it
[[ "$STEAL_MAX" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BENCH_STEAL_MAX must be a number (got '$STEAL_MAX')"


RAW="$TMP/raw.jsonl"; : >"$RAW"
XRAW="$TMP/xraw.jsonl"; : >"$XRAW"   # the optional scenarios' runs
SKIPPED=()

# Per-scenario settings of the rendered configs (set_mode below); the defaults are the
# keep-alive scenario's.
R_WORKER_CONNS=4096 R_MAXCONN=$HAPROXY_MAXCONN R_STRICT="" R_MAX_CONNECTIONS=10000 R_TLS=0
R_HEADER_TIMEOUT=10s SCHEME=http
set_mode() {     # set_mode plain|idle|tls
  R_WORKER_CONNS=4096 R_MAXCONN=$HAPROXY_MAXCONN R_STRICT="" R_MAX_CONNECTIONS=10000 R_TLS=0
  R_HEADER_TIMEOUT=10s SCHEME=http
  case "$1" in
    idle)
      # room for every idle client connection plus the upstream ones, in each worker
      R_WORKER_CONNS=$((IDLE_CONNS + 1000)) R_MAX_CONNECTIONS=$((IDLE_CONNS + 1000))
      R_MAXCONN=$((IDLE_CONNS + 100))
      # canary's header_timeout is also its idle keep-alive timeout (10 s by default):
      # 300 s as nginx's keepalive_timeout here, so nothing closes while they are opened
      R_HEADER_TIMEOUT=300s
      # haproxy reserves 2 descriptors per maxconn and refuses to start when the hard
      # limit is lower (20000 here); idle client connections use one each.
      R_STRICT="no strict-limits";;
    tls) R_TLS=1 SCHEME=https;;
  esac
}
render() {       # render TEMPLATE OUT WORKERS
  local lt="" nt="" bt="" ct=""
  if [[ "$R_TLS" == 1 ]]; then
    lt="ssl http2 "
    nt="        ssl_certificate $TMP/tls/cert.pem; ssl_certificate_key $TMP/tls/key.pem; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:BENCH:10m; ssl_session_tickets on;"
    bt="ssl crt $TMP/tls/haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2"
    ct="tls: {certificates: [{cert: $TMP/tls/cert.pem, key: $TMP/tls/key.pem}]}"
  fi
  sed -e "s#@TMP@#$TMP#g" -e "s#@WORKERS@#$3#g" -e "s#@NOFILE@#$NOFILE#g" \
      -e "s#@MAXCONN@#$R_MAXCONN#g" -e "s#@WORKER_CONNS@#$R_WORKER_CONNS#g" \
      -e "s#@STRICT@#$R_STRICT#g" -e "s#@MAX_CONNECTIONS@#$R_MAX_CONNECTIONS#g" \
      -e "s#@HEADER_TIMEOUT@#$R_HEADER_TIMEOUT#g" \
      -e "s#@LISTEN_TLS@#$lt#g" -e "s#@NGINX_TLS@#$nt#g" -e "s#@BIND_TLS@#$bt#g" \
      -e "s#@CANARY_TLS@#$ct#g" "$1" >"$2"
}
if has_scen idle && ((IDLE_CONNS + 1000 > NOFILE)); then
  warn "open-file limit $NOFILE is too low for $IDLE_CONNS idle connections; holding $((NOFILE - 1000))"
  IDLE_CONNS=$((NOFILE - 1000))
fi
if has_scen tls; then
  # One ECDSA P-256 certificate for every target (haproxy wants cert and key in one file).
  mkdir -p "$TMP/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" >"$TMP/tls/openssl.log" 2>&1 \
    || { cat "$TMP/tls/openssl.log" >&2; die "could not make the benchmark certificate"; }
  cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/haproxy.pem"
fi

# ------------------------------------------------------------------ 2. canary binary
if has_target canary; then
  if [[ -n "${CANARY_BIN:-}" ]]; then
    log "using CANARY_BIN=$CANARY_BIN (no build)"
  else
    CANARY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/canary"
    log "building: cargo build --release -p canary (log: $TMP/build.log)"
    if ! (cd "$ROOT" && timeout --foreground 1200 cargo build --release -p canary) >"$TMP/build.log" 2>&1; then
      tail -n 20 "$TMP/build.log" >&2
      warn "canary build failed; skipping target canary"
      SKIPPED+=("canary: cargo build --release -p canary failed")
      TARGETS="${TARGETS//canary/}"
    fi
  fi
  if has_target canary && [[ ! -x "$CANARY_BIN" ]]; then
    warn "canary binary $CANARY_BIN not found; skipping target canary"
    SKIPPED+=("canary: binary $CANARY_BIN not found")
    TARGETS="${TARGETS//canary/}"
  fi
fi
TARGETS="$(echo $TARGETS)"
[[ -n "$TARGETS" ]] || die "no targets left to measure"
wait_oha

# ------------------------------------------------------------------ 3. upstreams
NGINX="$(command -v nginx)"
HAPROXY="$(command -v haproxy)"
render "$HERE/nginx-upstreams.conf.tmpl" "$TMP/upstreams.conf" 1
"$NGINX" -t -q -e "$TMP/upstreams-error.log" -p "$TMP" -c "$TMP/upstreams.conf" \
  || die "upstream nginx config test failed"
start_bg "$TMP/upstreams.out" "$NGINX" -e "$TMP/upstreams-error.log" -p "$TMP" -c "$TMP/upstreams.conf"
UPS_PID=$LAST_PID
bl waitport $PORT_UP1 "$START_TIMEOUT" "$UPS_PID" && bl waitport $PORT_UP2 "$START_TIMEOUT" "$UPS_PID" \
  || { cat "$TMP/upstreams.out" "$TMP/upstreams-error.log" >&2 2>/dev/null; die "upstream nginx did not start"; }
[[ "$(curl -sf --max-time 2 http://127.0.0.1:$PORT_UP1/)" == v1 ]] || die "upstream v1 answers wrongly"
[[ "$(curl -sf --max-time 2 http://127.0.0.1:$PORT_UP2/)" == v2 ]] || die "upstream v2 answers wrongly"
log "upstreams up (nginx pid $UPS_PID): :$PORT_UP1 -> v1, :$PORT_UP2 -> v2"

# ------------------------------------------------------------------ target start/stop
TGT_PID="" TGT_PORT="" START_WHY=""
start_target() { # start_target TARGET WORKERS -> TGT_PID, TGT_PORT; returns 1 on failure
  local t="$1" w="$2" url="" logf="$TMP/$1-w$2.log"
  case "$t" in
    direct)
      TGT_PID=$UPS_PID TGT_PORT=$PORT_UP1; return 0;;
    nginx)
      render "$HERE/nginx-proxy.conf.tmpl" "$TMP/nginx-proxy.conf" "$w"
      start_bg "$logf" "$NGINX" -e "$TMP/nginx-proxy-error.log" -p "$TMP" -c "$TMP/nginx-proxy.conf"
      TGT_PORT=$PORT_NGINX;;
    haproxy)
      render "$HERE/haproxy.cfg.tmpl" "$TMP/haproxy.cfg" "$w"
      start_bg "$logf" "$HAPROXY" -db -f "$TMP/haproxy.cfg"
      TGT_PORT=$PORT_HAPROXY;;
    canary)
      rm -rf "$TMP/state"; mkdir -p "$TMP/state"
      render "$HERE/canary.yaml.tmpl" "$TMP/canary.yaml" "$w"
      start_bg "$logf" env RUST_LOG="${RUST_LOG:-warn}" "$CANARY_BIN" serve --config "$TMP/canary.yaml"
      TGT_PORT=$PORT_CANARY
      url="http://127.0.0.1:$PORT_ADMIN/healthz";;
  esac
  TGT_PID=$LAST_PID
  local rc=0
  bl waitport "$TGT_PORT" "$START_TIMEOUT" "$TGT_PID" || rc=$?
  if [[ $rc == 0 && -n "$url" ]]; then
    # admin /healthz is preferred but optional: accept the listen port alone if it never answers
    bl waitport "$PORT_ADMIN" 3 "$TGT_PID" "$url" || warn "$t: $url did not answer 2xx; using the listen port only"
  fi
  if [[ $rc != 0 ]]; then
    if [[ $rc == 2 ]]; then
      local st=0; wait "$TGT_PID" 2>/dev/null || st=$?
      START_WHY="exited with status $st before listening on :$TGT_PORT"
    else
      START_WHY="not listening on :$TGT_PORT after ${START_TIMEOUT}s"
    fi
    [[ -s "$logf" ]] && START_WHY+="; log: $(tail -n 3 "$logf" | tr '\n' ' ' | cut -c1-300)" || START_WHY+=" (no output)"
    warn "$t (workers=$w): $START_WHY"
    tail -n 15 "$logf" >&2 || true
    stop_group "$TGT_PID"; forget_pid "$TGT_PID"
    return 1
  fi
  # one real request through it must succeed
  if ! curl -sfk --max-time 5 -o /dev/null "$SCHEME://127.0.0.1:$TGT_PORT/"; then
    START_WHY="GET $SCHEME://127.0.0.1:$TGT_PORT/ through it failed"
    warn "$t (workers=$w): $START_WHY"
    tail -n 15 "$logf" >&2 || true
    stop_group "$TGT_PID"; forget_pid "$TGT_PID"
    return 1
  fi
  return 0
}
stop_target() {
  [[ "$1" == direct ]] && return 0
  stop_group "$TGT_PID"; forget_pid "$TGT_PID"
}

# ------------------------------------------------------------------ preflight each proxy once
for t in $TARGETS; do
  [[ "$t" == direct ]] && continue
  if start_target "$t" 1; then
    stop_target "$t"
    log "preflight ok: $t"
  else
    SKIPPED+=("$t: $START_WHY")
    TARGETS="$(echo ${TARGETS//$t/})"
    warn "skipping target $t for this run"
  fi
done
[[ -n "$TARGETS" ]] || die "no targets left to measure"

# ------------------------------------------------------------------ budget
n_meas=0
first=1
has_scen keepalive || WORKERS_LIST_KA=""
for w in ${WORKERS_LIST_KA-$WORKERS_LIST}; do
  for t in $TARGETS; do
    [[ "$t" == direct && $first == 0 ]] && continue
    n_meas=$((n_meas + 1))
  done
  first=0
done
n_conns=$(echo $CONNS | wc -w)
SHORTENED=0
OVERHEAD=3       # seconds per measurement besides the load: start, busy check, stop, collect (measured)
plan_per() { echo $((WARMUP + n_conns * DURATION + OHA_DURATION + OVERHEAD)); }
per=$(plan_per)
# The optional scenarios are not shortened; their estimated time comes off the budget
# before the keep-alive runs are planned.
n_proxies=$(for t in $TARGETS; do [[ $t == direct ]] || echo "$t"; done | wc -l)
n_all=$(echo $TARGETS | wc -w)
n_workers=$(echo $WORKERS_LIST | wc -w)
X_EST=0
has_scen idle && X_EST=$((X_EST + n_proxies * n_workers * REPS * (IDLE_SETTLE + 25)))
has_scen connrate && X_EST=$((X_EST + (n_all + n_proxies * (n_workers - 1)) * REPS * (DURATION + 5)))
has_scen tls && X_EST=$((X_EST + n_proxies * $(echo $TLS_WORKERS | wc -w) * REPS * (4 * DURATION + 12)))
((X_EST > 0)) && log "plan: optional scenarios [$SCENARIOS] take about ${X_EST}s"
if ((BUDGET > 0 && n_meas > 0)); then
  # What is left of the budget, less ~20 s for the report and cleanup, is shared by the
  # runs: first the runs get shorter (not below MIN_DURATION), then, if that is not
  # enough, one repetition fewer (not below 2).
  left=$((BUDGET - ($(date +%s) - T_START) - 20 - X_EST))
  ((left > 0)) || left=1
  if ((n_meas * REPS * per > left)); then
    ((WARMUP > 1)) && WARMUP=1
    while :; do
      d=$(( (left / (n_meas * REPS) - OVERHEAD - WARMUP) / (n_conns + 1) ))
      ((d >= MIN_DURATION || REPS <= 2)) && break
      REPS=$((REPS - 1))
    done
    ((d < MIN_DURATION)) && d=$MIN_DURATION
    ((d < DURATION)) && DURATION=$d
    ((d < OHA_DURATION)) && OHA_DURATION=$d
    per=$(plan_per)
    SHORTENED=1
    log "budget: ${left}s of the ${BUDGET}s left for measuring: reps=$REPS, wrk=${DURATION}s, oha=${OHA_DURATION}s, warmup=${WARMUP}s (BENCH_BUDGET=0 turns this off)"
    ((n_meas * REPS * per > left)) && warn "the shortest plan needs ~$((n_meas * REPS * per))s, over the budget by ~$((n_meas * REPS * per - left))s"
  fi
fi
n_runs=$((n_meas * REPS))
log "plan: scenarios=[$SCENARIOS] targets=[$TARGETS] workers=[$WORKERS_LIST] reps=$REPS wrk=${DURATION}s x c{$CONNS} oha=${OHA_DURATION}s@${RATE}/s warmup=${WARMUP}s"
log "plan: $n_runs measurements x ~${per}s = ~$(( n_runs * per / 60 ))m$(( n_runs * per % 60 ))s"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_START=$(bl busy 2)
log "machine CPU busy before measuring: ${BUSY_START}% (loadavg $LOAD_START)"
if ((${BUSY_START%.*} > BUSY_MAX)); then
  warn "machine is busy (${BUSY_START}% CPU used by other processes): figures will be noisy; runs started while busy are flagged"
fi

# ------------------------------------------------------------------ 4/5. measure
measure() {      # measure TARGET WORKERS REP
  local t="$1" w="$2" r="$3" d="$TMP/runs/w$2-r$3-$1" c rc
  mkdir -p "$d"
  if ! start_target "$t" "$w"; then
    warn "$t workers=$w rep=$r: start failed, run recorded as failed"
    printf '{"target":"%s","workers":%s,"rep":%s,"conns":[%s],"rate":%s}\n' \
      "$t" "$w" "$r" "$(echo $CONNS | tr ' ' ',')" "$RATE" >"$d/meta.json"
    bl collect "$d" >>"$RAW"
    return 0
  fi
  local url="http://127.0.0.1:$TGT_PORT/"
  bl busy 1 >"$d/busy-before"   # machine CPU % while only idle servers run = foreign load
  bl rss "$TGT_PID" >"$d/rss-idle"
  echo 0 >"$d/rss-max"
  python3 "$BL" sample "$TGT_PID" "$d/rss-max" $((WARMUP + n_conns * DURATION + OHA_DURATION + 60)) &
  SAMPLER_PID=$!
  bl stat >"$d/stat0"
  if ((WARMUP > 0)); then
    run_load $((WARMUP + 20)) "$d/warmup.txt" wrk -t1 -c50 -d"${WARMUP}s" "$url" || true
  fi
  for c in $CONNS; do
    bl cpu "$TGT_PID" >"$d/wrk-c$c.cpu0"
    rc=0
    run_load $((DURATION + 30)) "$d/wrk-c$c.txt" wrk -t1 -c"$c" -d"${DURATION}s" --timeout 5s "$url" || rc=$?
    bl cpu "$TGT_PID" >"$d/wrk-c$c.cpu1"
    echo "$rc" >"$d/wrk-c$c.rc"
  done
  rc=0
  run_load $((OHA_DURATION + 30)) "$d/oha.out" oha -z "${OHA_DURATION}s" -q "$RATE" -c "$OHA_CONNS" \
    -w -t 10s --latency-correction --no-tui --output-format json -o "$d/oha.json" "$url" || rc=$?
  [[ $rc == 0 ]] || warn "$t: oha exited $rc: $(head -c 300 "$d/oha.out")"
  bl stat >"$d/stat1"
  kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
  stop_target "$t"
  printf '{"target":"%s","workers":%s,"rep":%s,"conns":[%s],"rate":%s,"busy_max":%s,"steal_max":%s}\n' \
    "$t" "$w" "$r" "$(echo $CONNS | tr ' ' ',')" "$RATE" "$BUSY_MAX" "$STEAL_MAX" >"$d/meta.json"
  bl collect "$d" >>"$RAW"
  python3 - "$RAW" <<'EOF'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
w = " ".join(f"c{c}={v['rps'] or 0:,.0f}/s {v['cpu_us_per_req'] or 0:.1f}us" for c, v in r["wrk"].items())
o = r["oha"]
p99 = f"{o['p99_ms']:.2f}ms" if o.get("p99_ms") is not None else "n/a"
print(f"    -> {w}  p99={p99}  rss {(r['rss_idle_kb'] or 0)/1024:.1f}->{(r['rss_max_kb'] or 0)/1024:.1f}MiB"
      + ("  ERRORS: " + "; ".join(r["flags"]) if r["flags"] else "")
      + ("  NOISY: " + "; ".join(r.get("noise", [])) if r.get("noise") else ""))
EOF
}

first=1
WORKERS_DONE=()
# The order rotates by one target each repetition (A B C, B C A, C A B, ...), so no
# target always runs right after the same one (after `direct`, say, which loads the
# upstream hardest): a position effect then shows as spread, not as a bias.
rotated() {
  local -a ts=($TARGETS)
  local n=${#ts[@]} k=$(( ($1 - 1) % ${#ts[@]} )) i
  for ((i = 0; i < n; i++)); do printf '%s ' "${ts[$(( (i + k) % n ))]}"; done
}
for w in ${WORKERS_LIST_KA-$WORKERS_LIST}; do
  for r in $(seq "$REPS"); do
    for t in $(rotated "$r"); do
      [[ "$t" == direct && $first == 0 ]] && continue   # direct has no workers knob: measured in the first pass only
      log "workers=$w rep $r/$REPS: $t"
      measure "$t" "$w" "$r"
    done
  done
  WORKERS_DONE+=("$w")
  first=0
done


# ------------------------------------------------------------------ optional scenarios
xmeta() {        # xmeta DIR TARGET WORKERS REP
  printf '{"target":"%s","workers":%s,"rep":%s,"busy_max":%s,"steal_max":%s}\n' \
    "$2" "$3" "$4" "$BUSY_MAX" "$STEAL_MAX" >"$1/meta.json"
}
xshow() {        # one line per optional run, as the keep-alive runs have
  python3 -c '
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
m = ", ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r["m"].items())
sc = r["scenario"]
print(f"    -> {sc}: {m}" + ("  ERRORS: " + "; ".join(r["flags"]) if r["flags"] else "")
      + ("  NOISY: " + "; ".join(r["noise"]) if r["noise"] else ""))
' "$XRAW"
}

measure_idle() { # measure_idle TARGET WORKERS REP: RSS with IDLE_CONNS idle keep-alive connections
  local t="$1" w="$2" r="$3" d="$TMP/runs/idle-w$2-r$3-$1" i cpid
  mkdir -p "$d"; xmeta "$d" "$t" "$w" "$r"
  set_mode idle
  if ! start_target "$t" "$w"; then
    echo 1 >"$d/start-failed"; bl xcollect idle "$d" >>"$XRAW"; set_mode plain; return 0
  fi
  bl busy 1 >"$d/busy-before"   # also lets the allocator settle after the start-up GET
  bl rss "$TGT_PID" >"$d/rss-before"
  bl stat >"$d/stat0"
  # the client holds its connections until the file "stop" exists (at most 180 s)
  timeout 240 python3 "$BL" idle "$TGT_PORT" "$IDLE_CONNS" "$IDLE_CONC" "$d/idle.json" "$d/stop" 180 \
    >"$d/idle.out" 2>"$d/idle.err" </dev/null &
  cpid=$!
  XLOAD_PIDS+=("$cpid")
  for i in $(seq 1200); do   # at most 120 s to open them all
    [[ -e "$d/idle.json" ]] && break
    kill -0 "$cpid" 2>/dev/null || break
    sleep 0.1
  done
  sleep "$IDLE_SETTLE"
  bl rss "$TGT_PID" >"$d/rss-held"
  bl stat >"$d/stat1"
  touch "$d/stop"
  wait "$cpid" 2>/dev/null || true
  XLOAD_PIDS=()
  stop_target "$t"
  set_mode plain
  bl xcollect idle "$d" >>"$XRAW"
  xshow
}

measure_connrate() { # measure_connrate TARGET WORKERS REP: one request per new TCP connection
  local t="$1" w="$2" r="$3" d="$TMP/runs/connrate-w$2-r$3-$1" rc=0
  mkdir -p "$d"; xmeta "$d" "$t" "$w" "$r"
  set_mode plain
  if ! start_target "$t" "$w"; then
    echo 1 >"$d/start-failed"; bl xcollect connrate "$d" >>"$XRAW"; return 0
  fi
  local url="http://127.0.0.1:$TGT_PORT/"
  bl busy 1 >"$d/busy-before"
  bl stat >"$d/stat0"
  run_load 20 "$d/warmup.txt" wrk -t1 -c"$CONNRATE_CONNS" -d1s -H 'Connection: close' "$url" || true
  bl cpu "$TGT_PID" >"$d/cpu0"
  run_load $((DURATION + 30)) "$d/load.txt" wrk -t1 -c"$CONNRATE_CONNS" -d"${DURATION}s" --timeout 5s \
    -H 'Connection: close' "$url" || rc=$?
  bl cpu "$TGT_PID" >"$d/cpu1"
  echo "$rc" >"$d/load.rc"
  bl stat >"$d/stat1"
  stop_target "$t"
  bl xcollect connrate "$d" >>"$XRAW"
  xshow
}

measure_tls() {  # measure_tls TARGET WORKERS REP: four HTTPS loads on one fresh proxy
  local t="$1" w="$2" r="$3" kind d rc i how t0
  set_mode tls
  if ! start_target "$t" "$w"; then
    [[ " ${SKIPPED[*]-} " == *"$t over TLS:"* ]] || SKIPPED+=("$t over TLS: $START_WHY")
    for kind in tls-h1 tls-h2 tls-new tls-resume; do
      d="$TMP/runs/$kind-w$w-r$r-$t"; mkdir -p "$d"; xmeta "$d" "$t" "$w" "$r"
      echo 1 >"$d/start-failed"; bl xcollect "$kind" "$d" >>"$XRAW"
    done
    set_mode plain
    return 0
  fi
  local url="https://127.0.0.1:$TGT_PORT/" hp="127.0.0.1:$TGT_PORT"
  run_load 20 "$TMP/runs/tls-warmup-$t.txt" wrk -t1 -c"$TLS_CONNS" -d1s "$url" || true
  for kind in tls-h1 tls-h2 tls-new tls-resume; do
    d="$TMP/runs/$kind-w$w-r$r-$t"; mkdir -p "$d"; xmeta "$d" "$t" "$w" "$r"
    bl busy 1 >"$d/busy-before"
    bl stat >"$d/stat0"
    bl cpu "$TGT_PID" >"$d/cpu0"
    # The proxy's largest RSS during this load (summed over its processes).
    echo 0 >"$d/rss-max"
    python3 "$BL" sample "$TGT_PID" "$d/rss-max" $((DURATION + 40)) &
    local sampler=$!
    rc=0
    case "$kind" in
      tls-h1)
        run_load $((DURATION + 30)) "$d/load.txt" wrk -t1 -c"$TLS_CONNS" -d"${DURATION}s" --timeout 5s "$url" || rc=$?;;
      tls-h2)
        run_load $((DURATION + 30)) "$d/load.txt" h2load -t1 -c"$TLS_CONNS" -m"$H2_STREAMS" -D"$DURATION" \
          "$url" || rc=$?;;
      tls-new|tls-resume)
        # openssl s_time makes one connection at a time: TLS_CLIENTS of them in parallel
        how=-new; [[ $kind == tls-resume ]] && how=-reuse
        t0=$(date +%s.%N)
        for i in $(seq "$TLS_CLIENTS"); do
          timeout $((DURATION + 30)) openssl s_time -connect "$hp" "$how" -tls1_3 -time "$DURATION" -www / \
            >"$d/s_time-$i.txt" 2>&1 </dev/null &
          XLOAD_PIDS+=($!)
        done
        for i in "${XLOAD_PIDS[@]}"; do wait "$i" || rc=$?; done
        XLOAD_PIDS=()
        python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.3f}")' "$t0" "$(date +%s.%N)" >"$d/wall";;
    esac
    bl cpu "$TGT_PID" >"$d/cpu1"
    kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
    echo "$rc" >"$d/load.rc"
    bl stat >"$d/stat1"
    bl xcollect "$kind" "$d" >>"$XRAW"
    xshow
  done
  stop_target "$t"
  set_mode plain
}

# The order rotates by one target each repetition, as for the keep-alive runs.
xrotated() {     # xrotated REP TARGET...
  local r="$1"; shift
  local -a ts=("$@")
  local n=${#ts[@]} k i
  k=$(( (r - 1) % n ))
  for ((i = 0; i < n; i++)); do printf '%s ' "${ts[$(( (i + k) % n ))]}"; done
}
X_TARGETS="$(for t in $TARGETS; do [[ $t == direct ]] || printf '%s ' "$t"; done)"
if has_scen idle && [[ -n "$X_TARGETS" ]]; then
  for w in $WORKERS_LIST; do
    for r in $(seq "$REPS"); do
      for t in $(xrotated "$r" $X_TARGETS); do
        log "idle: workers=$w rep $r/$REPS: $t, $IDLE_CONNS idle connections"
        measure_idle "$t" "$w" "$r"
      done
    done
  done
fi
if has_scen connrate; then
  first=1
  for w in $WORKERS_LIST; do
    for r in $(seq "$REPS"); do
      for t in $(xrotated "$r" $TARGETS); do
        [[ "$t" == direct && $first == 0 ]] && continue   # direct has no workers knob
        log "connrate: workers=$w rep $r/$REPS: $t"
        measure_connrate "$t" "$w" "$r"
      done
    done
    first=0
  done
fi
if has_scen tls && [[ -n "$X_TARGETS" ]]; then
  for w in $TLS_WORKERS; do
    for r in $(seq "$REPS"); do
      for t in $(xrotated "$r" $X_TARGETS); do
        log "tls: workers=$w rep $r/$REPS: $t"
        measure_tls "$t" "$w" "$r"
      done
    done
  done
fi

stop_group "$UPS_PID"; forget_pid "$UPS_PID"

# ------------------------------------------------------------------ 6. report
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
[[ -e "$RESULTS/$STAMP.md" ]] && STAMP="$(date -u +%Y-%m-%dT%H%M%SZ)"
ver() { "$@" 2>&1 | head -n1 | tr -d '"\\' || true; }
CANARY_VER="n/a"
has_target canary && CANARY_VER="$(timeout 5 "$CANARY_BIN" --version 2>&1 | head -n1 | tr -d '"\\' || true)"
GIT_DESC="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo none)"
GIT_DIRTY="$(cd "$ROOT" && git status --porcelain 2>/dev/null | wc -l)"
export META_BUSY="$BUSY_START" META_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  META_CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
  META_NPROC="$(nproc)" META_KERNEL="$(uname -srm)" META_LOAD="$LOAD_START" \
  META_GIT="$GIT_DESC ($GIT_DIRTY files modified/untracked)" \
  V_NGINX="$(ver "$NGINX" -v)" V_HAPROXY="$(ver "$HAPROXY" -v)" V_WRK="$(ver wrk -v)" \
  V_OHA="$(command -v oha >/dev/null && ver oha --version || echo n/a)" V_CANARY="$CANARY_VER" V_RUSTC="$(ver rustc --version)" \
  V_PY="$(ver python3 --version)" \
  P_DUR="$DURATION" P_OHA="$OHA_DURATION" P_WARM="$WARMUP" P_REPS="$REPS" P_RATE="$RATE" \
  P_OHAC="$OHA_CONNS" P_CONNS="$CONNS" P_WORKERS="${WORKERS_DONE[*]}" P_TARGETS="$TARGETS" \
  P_QUICK="${BENCH_QUICK:-0}" P_BUDGET="$BUDGET" P_SHORT="$SHORTENED" \
  P_WALL="$(( $(date +%s) - T_START ))" P_SCEN="$SCENARIOS" \
  X_IDLE="$IDLE_CONNS" X_IDLEC="$IDLE_CONC" X_SETTLE="$IDLE_SETTLE" X_CRC="$CONNRATE_CONNS" \
  X_TLSC="$TLS_CONNS" X_H2M="$H2_STREAMS" X_TLSCL="$TLS_CLIENTS" X_TLSW="$TLS_WORKERS" \
  V_H2LOAD="$(command -v h2load >/dev/null && ver h2load --version || echo n/a)" \
  V_OPENSSL="$(ver openssl version)"
SKIPPED_JSON="$(printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))')"
export SKIPPED_JSON
python3 - "$TMP/meta.json" <<'EOF'
import json, os, sys
e = os.environ
meta = {
  "date_utc": e["META_DATE"], "host_cpu": e["META_CPU"], "nproc": int(e["META_NPROC"]),
  "kernel": e["META_KERNEL"], "loadavg_at_start": e["META_LOAD"], "cpu_busy_pct_at_start": float(e["META_BUSY"]), "git": e["META_GIT"],
  "versions": {"nginx": e["V_NGINX"], "haproxy": e["V_HAPROXY"], "wrk": e["V_WRK"],
               "oha": e["V_OHA"], "canary": e["V_CANARY"], "rustc": e["V_RUSTC"], "python": e["V_PY"]},
  "params": {"duration": int(e["P_DUR"]), "oha_duration": int(e["P_OHA"]), "warmup": int(e["P_WARM"]),
             "reps": int(e["P_REPS"]), "rate": int(e["P_RATE"]), "oha_conns": int(e["P_OHAC"]),
             "conns": [int(c) for c in e["P_CONNS"].split()], "workers": [int(w) for w in e["P_WORKERS"].split()],
             "targets": e["P_TARGETS"].split(), "quick": e["P_QUICK"] == "1",
             "budget_s": int(e["P_BUDGET"]), "shortened_by_budget": e["P_SHORT"] == "1"},
  "skipped": json.loads(e["SKIPPED_JSON"]),
  "wall_s": int(e["P_WALL"]),
  "scenarios": e["P_SCEN"].split(),
}
meta["versions"]["h2load"] = e["V_H2LOAD"]
meta["versions"]["openssl"] = e["V_OPENSSL"]
d = e["P_DUR"]
meta["xnotes"] = {
  "idle": f"`python3 benchlib.py idle`: {e['X_IDLE']} keep-alive connections opened {e['X_IDLEC']} at a time, "
          f"one `GET /` each (answered 200), then held idle; RSS (VmRSS summed over the proxy's processes) "
          f"read before and {e['X_SETTLE']} s after the last one was open. KiB per connection = "
          f"(RSS with them − RSS before) / connections held. Limits raised for this scenario only: "
          f"nginx `worker_connections` and canary `limits.max_connections` to {int(e['X_IDLE']) + 1000}, "
          f"haproxy `maxconn` {int(e['X_IDLE']) + 100} with `no strict-limits`.",
  "connrate": f"`wrk -t1 -c{e['X_CRC']} -d{d}s -H 'Connection: close'` after a 1 s warm-up: every request on "
              f"a new TCP connection, which the server closes. CPU = utime+stime of the proxy's processes "
              f"during the run / requests completed. For `direct` the figures are the upstream nginx's own.",
  "tls-h1": f"`wrk -t1 -c{e['X_TLSC']} -d{d}s https://…` (keep-alive, HTTP/1.1) against a fresh proxy after a 1 s "
            f"warm-up; ECDSA P-256 self-signed certificate, the same for every target.",
  "tls-h2": f"`h2load -t1 -c{e['X_TLSC']} -m{e['X_H2M']} -D{d}` (ALPN h2) on the same proxy process.",
  "tls-new": f"{e['X_TLSCL']} × `openssl s_time -new -tls1_3 -time {d} -www /` in parallel: each connection a "
             f"full TLS 1.3 handshake and one HTTP/1.0 request.",
  "tls-resume": f"{e['X_TLSCL']} × `openssl s_time -reuse -tls1_3 -time {d} -www /`: the same, resuming the "
                f"first connection's session (the resumed column counts the connections s_time marks `r`).",
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
echo
bl report "$RAW" "$TMP/meta.json" "$RESULTS/$STAMP" "$XRAW"
echo
if has_scen keepalive; then
  cp "$RESULTS/$STAMP.md" "$RESULTS/latest.md"
  cp "$RESULTS/$STAMP.json" "$RESULTS/latest.json"
  log "wrote $RESULTS/$STAMP.md and .json (copied to latest.md / latest.json)"
else
  # latest.md stays the last keep-alive run, which the docs quote
  log "wrote $RESULTS/$STAMP.md and .json (no keep-alive runs: latest.md / latest.json left as they were)"
fi
if ((${#SKIPPED[@]})); then
  warn "some requested targets were skipped: ${SKIPPED[*]}"
  exit 2
fi
