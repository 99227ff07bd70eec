#!/usr/bin/env bash
# Slow-client attacks with slowhttptest (Debian package `slowhttptest`), bounded and
# on loopback only, not in CI: slowloris (-H), slow POST bodies (-B) and slow reading
# (-X) against canary with short timeouts, each for DOS_SECONDS, while a probe sends
# one ordinary request every 0.2 s. Reports the probe's failures, what slowhttptest
# saw, and canary's open descriptors and upstream sockets after each attack.
#
#   scripts/dos.sh                              # 3 attacks x 20 s
#   DOS_SECONDS=10 CANARY_BIN=target/release/canary scripts/dos.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/soak"
SECONDS_EACH="${DOS_SECONDS:-20}"
CONNS="${DOS_CONNECTIONS:-500}"
[[ "$SECONDS_EACH" =~ ^[0-9]+$ && "$CONNS" =~ ^[0-9]+$ ]] || { echo "dos: DOS_SECONDS and DOS_CONNECTIONS are whole numbers" >&2; exit 1; }
for tool in slowhttptest curl ss; do
  command -v "$tool" >/dev/null || { echo "dos: needs $tool (apt-get install slowhttptest curl iproute2)" >&2; exit 1; }
done
PU=19101 PC=19180 PA=19191
NAME=dos
# shellcheck source=soak/lib.sh
source "$HERE/lib.sh"

start_upstream $PU v1
cat >"$TMP/canary.yaml" <<YAML
listen: 127.0.0.1:$PC
admin: 127.0.0.1:$PA
state_dir: $TMP/state
workers: 1
limits: {header_timeout: 3s, body_timeout: 2s, send_timeout: 2s, max_connections: 10000}
routes:
  - name: web
    stable: {version: v1, upstreams: ["127.0.0.1:$PU"]}
    timeouts: {idle: 2s}
YAML
ulimit -n 65536 2>/dev/null || true
CANARY_LOG=warn bg "$TMP/canary.log" "$CANARY_BIN" serve --config "$TMP/canary.yaml"
CANARY_PID=$LAST
waitport $PC; waitport $PA
log "canary pid $CANARY_PID; limits: header 3s, body 2s, send 2s, upstream idle 2s"

report() {   # report NAME
  local fds ups
  fds=$(ls "/proc/$CANARY_PID/fd" | wc -l)
  ups=$(ss -Htn state established "( dport = :$PU )" | wc -l)
  log "$1: probe ${ok} ok / ${bad} failed; canary fds ${fds}, upstream sockets ${ups}; slowhttptest: $(sed 's/\x1b\[[0-9;]*m//g' "$TMP/$1.out" | grep -E 'closed|pending|connected|error' | tail -4 | tr -s ' \n' ' ')"
}
attack() {   # attack NAME ARGS...: runs slowhttptest for SECONDS_EACH with a probe
  local name="$1"; shift
  ok=0 bad=0
  timeout $((SECONDS_EACH + 30)) slowhttptest -c "$CONNS" -r 200 -l "$SECONDS_EACH" -u "http://127.0.0.1:$PC/" "$@" >"$TMP/$name.out" 2>&1 &
  local sp=$!
  local end=$(( $(date +%s) + SECONDS_EACH ))
  while (( $(date +%s) < end )); do
    if curl -sf --max-time 2 "http://127.0.0.1:$PC/" >/dev/null; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
    sleep 0.2
  done
  wait $sp || true
  sleep 3   # the timeouts close what is left
  report "$name"
}
attack slowloris -H -i 10 -x 24
attack slowbody -B -i 10 -s 8192 -x 10
attack slowread -X -k 3 -n 5 -w 10 -y 20 -z 32
kill -0 "$CANARY_PID" && log "canary still running"
