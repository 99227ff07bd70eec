#!/usr/bin/env bash
# Soak test (not in CI): canary under steady load for an hour, with a config reload
# every 30 s, an upstream instance bounced every 5 minutes and a few slow clients.
# Samples canary's RSS, open descriptors and upstream sockets every 10 s into a CSV
# and draws them (SVG, no plotting package needed). See docs/operations.md ("Soak").
#
#   scripts/soak.sh                                  # 60 min, ~22k req/s served
#   SOAK_MINUTES=5 SOAK_RATE=5000 scripts/soak.sh    # a short run
#   CANARY_BIN=target/release/canary scripts/soak.sh # skip the build
#
# Results: bench/results/soak-<UTC>.csv, .svg and .md (summary), and soak-latest.*.
# Loopback only: upstreams are nginx (`return 200`) on 127.0.0.1:19001-19003, canary
# on :19080 (admin :19901); load is wrk with a per-request delay (a steady rate).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/soak"
RESULTS="$ROOT/bench/results"

MINUTES="${SOAK_MINUTES:-60}"
# Asked for; wrk's per-connection delay plus the round trip serves about 0.65 of it:
# ~22k req/s, 27% of one worker's measured capacity (~80k req/s, docs/performance.md).
RATE="${SOAK_RATE:-34000}"
RELOAD_EVERY="${SOAK_RELOAD_EVERY:-30}"    # seconds between config reloads
BOUNCE_EVERY="${SOAK_BOUNCE_EVERY:-300}"   # seconds between instance bounces
BOUNCE_DOWN="${SOAK_BOUNCE_DOWN:-10}"      # seconds an instance stays down
SAMPLE_EVERY="${SOAK_SAMPLE_EVERY:-10}"    # seconds between samples
SLOW="${SOAK_SLOW_CLIENTS:-6}"             # slow clients (half slow heads, half slow bodies)
WORKERS="${SOAK_WORKERS:-1}"

for v in MINUTES RATE RELOAD_EVERY BOUNCE_EVERY BOUNCE_DOWN SAMPLE_EVERY SLOW WORKERS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || { echo "soak: $v must be a positive whole number" >&2; exit 1; }
done
for tool in wrk ss python3 curl; do
  command -v "$tool" >/dev/null || { echo "soak: needs $tool" >&2; exit 1; }
done

P1=19001 P2=19002 P3=19003 PC=19080 PA=19901
NAME=soak
# shellcheck source=soak/lib.sh
source "$HERE/lib.sh"

start_upstream $P1 v1; start_upstream $P2 v1; start_upstream $P3 v2
log "upstreams: v1 on :$P1 and :$P2, v2 on :$P3"

# ---------------------------------------------------------------- canary
write_config() {   # write_config WEIGHT
  cat >"$TMP/canary.yaml.tmp" <<YAML
listen: 127.0.0.1:$PC
admin: 127.0.0.1:$PA
state_dir: $TMP/state
workers: $WORKERS
routes:
  - name: soak
    stable: {version: v1, upstreams: ["127.0.0.1:$P1", "127.0.0.1:$P2"]}
    canary: {version: v2, upstreams: ["127.0.0.1:$P3"]}
    weight: $1
    sticky: {header: x-user-id}
    ejection: {consecutive_failures: 5, base: 5s, max: 30s}
YAML
  mv "$TMP/canary.yaml.tmp" "$TMP/canary.yaml"
}
write_config 10
CANARY_LOG=warn bg "$TMP/canary.log" "$CANARY_BIN" serve --config "$TMP/canary.yaml"
CANARY_PID=$LAST
waitport $PC; waitport $PA
log "canary pid $CANARY_PID ($("$CANARY_BIN" --version)), $WORKERS worker(s)"

# ---------------------------------------------------------------- load
# wrk with a delay per request and connection: about RATE requests per second.
CONNS=$(( (RATE + 799) / 800 ))
cat >"$TMP/rate.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", {["x-user-id"] = "u" .. (n % 100000)})
end
delay = function() return 1 end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk_total requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p99_ms=%.2f\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout, latency:percentile(99) / 1000))
end
LUA
bg "$TMP/wrk.out" wrk -t1 -c"$CONNS" -d"$((MINUTES * 60))s" --timeout 10s -s "$TMP/rate.lua" "http://127.0.0.1:$PC/"
WRK_PID=$LAST
bg "$TMP/slow.out" python3 "$HERE/slow_clients.py" 127.0.0.1 $PC "$SLOW" "$((MINUTES * 60))"
log "load: wrk $CONNS connections (~$RATE req/s), $SLOW slow clients, for $MINUTES min"

# ---------------------------------------------------------------- the run
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RESULTS"
CSV="$RESULTS/soak-$STAMP.csv"
echo "t_s,rss_kib,fds,upstream_sockets,client_conns,requests,failures,client_aborts,event" >"$CSV"
metric_sum() {   # metric_sum NAME: the sum of every series of NAME in /metrics
  curl -sf --max-time 2 "http://127.0.0.1:$PA/metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {printf "%d", s}'
}
sample() {   # sample EVENT
  local t rss fds ups cli
  t=$(( $(date +%s) - START ))
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$CANARY_PID/status" 2>/dev/null || echo 0)
  fds=$(ls "/proc/$CANARY_PID/fd" 2>/dev/null | wc -l)
  ups=$(ss -Htn state established "( dport = :$P1 or dport = :$P2 or dport = :$P3 )" | wc -l)
  cli=$(ss -Htn state established "( sport = :$PC )" | wc -l)
  echo "$t,$rss,$fds,$ups,$cli,$(metric_sum canary_requests_total),$(metric_sum canary_request_failures_total),$(metric_sum canary_client_aborts_total),$1" >>"$CSV"
}
START=$(date +%s)
END=$(( START + MINUTES * 60 ))
next_sample=$START next_reload=$(( START + RELOAD_EVERY )) next_bounce=$(( START + BOUNCE_EVERY )) up_at=0
weight=10 reloads=0 bounces=0 event=""
while (( $(date +%s) < END )); do
  now=$(date +%s)
  kill -0 "$CANARY_PID" 2>/dev/null || { log "canary exited!"; tail -20 "$TMP/canary.log"; exit 1; }
  if (( now >= next_reload )); then
    weight=$(( weight == 10 ? 20 : 10 )); write_config $weight
    reloads=$((reloads + 1)); next_reload=$(( next_reload + RELOAD_EVERY )); event="${event}reload "
  fi
  if (( now >= next_bounce )); then
    stop_upstream $P2; up_at=$(( now + BOUNCE_DOWN ))
    bounces=$((bounces + 1)); next_bounce=$(( next_bounce + BOUNCE_EVERY )); event="${event}down "
    log "bounce $bounces: instance :$P2 down for ${BOUNCE_DOWN}s"
  fi
  if (( up_at > 0 && now >= up_at )); then
    start_upstream $P2 v1; up_at=0; event="${event}up "
  fi
  if (( now >= next_sample )); then
    sample "${event% }"; event=""; next_sample=$(( next_sample + SAMPLE_EVERY ))
    log "$(tail -1 "$CSV")"
  fi
  sleep 0.5
done
sample "end"
log "waiting for wrk's and the slow clients' summaries"
for _ in $(seq 60); do grep -q wrk_total "$TMP/wrk.out" && grep -q slow_clients "$TMP/slow.out" && break; sleep 1; done

# ---------------------------------------------------------------- report
SVG="$RESULTS/soak-$STAMP.svg" MD="$RESULTS/soak-$STAMP.md"
python3 "$HERE/report.py" "$CSV" "$SVG" "$MD" \
  "minutes=$MINUTES rate=$RATE conns=$CONNS workers=$WORKERS reloads=$reloads bounces=$bounces slow=$SLOW reload_every=$RELOAD_EVERY bounce_every=$BOUNCE_EVERY bounce_down=$BOUNCE_DOWN" \
  "$(grep wrk_total "$TMP/wrk.out" || echo 'wrk_total missing')" \
  "$(grep slow_clients "$TMP/slow.out" 2>/dev/null || true)" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(grep -E ' (WARN|ERROR) ' "$TMP/canary.log" | sed -E 's/^[^ ]+ +//; s/(upstream|instance)=[^ ]+/\1=…/g; s/ (failures|ejected_ms)=[0-9]+//g' | sort | uniq -c | sed -E 's/^ *([0-9]+) (.*)/\2 (×\1)/' | paste -sd ';' - || true)"
cp "$CSV" "$RESULTS/soak-latest.csv"; cp "$SVG" "$RESULTS/soak-latest.svg"; cp "$MD" "$RESULTS/soak-latest.md"
cat "$MD"
log "results: $MD, $CSV, $SVG"
