#!/usr/bin/env bash
# CPU per request in fleet mode against file mode (issue 12; docs/fleet.md, "Figures"):
# user-space instructions per proxied request under callgrind, which do not move with
# the machine's load (wall-clock rates do: this machine is shared). The same binary,
# the bench's route (scripts/bench/canary.yaml.tmpl: 10 % canary, sticky header) and
# nginx upstreams, 1 worker, `wrk -t1 -c50` for 5 s after a 1 s warm-up, in three set-ups:
#   file      routes in the local file (the embedded default)
#   leader    a fleet of one: the member leads (runs the ticks, writes to etcd)
#   follower  a fleet of two: the measured member follows a leader running natively
#             (it watches etcd, renews its lease, answers the leader's counter pulls)
# Each set-up runs REPS times (default 2), rotated. Reports, never asserts; every
# process is stopped at the end. Needs valgrind, wrk, nginx, etcd (scripts/test.sh
# unpacks it into target/debian-tools).
#
#   scripts/fleet-cpu.sh                       # builds the release binary
#   CANARY_BIN=target/release/canary REPS=3 scripts/fleet-cpu.sh
#   SETUPS="file follower" scripts/fleet-cpu.sh   # a subset of the set-ups
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPS="${REPS:-2}"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || { echo "fleet-cpu: REPS must be a positive whole number" >&2; exit 1; }
export PATH="$ROOT/target/debian-tools/usr/bin:$PATH"
for tool in valgrind callgrind_control callgrind_annotate wrk nginx etcd curl; do
  command -v "$tool" >/dev/null || { echo "fleet-cpu: needs $tool" >&2; exit 1; }
done
BIN="${CANARY_BIN:-}"
if [[ -z "$BIN" ]]; then
  (cd "$ROOT" && cargo build --release -p canary >&2)
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/canary"
fi

TMP="$(mktemp -d /tmp/fleet-cpu.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
log() { echo "[fleet-cpu $(date -u +%H:%M:%S)] $*" >&2; }
waitport() { for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "fleet-cpu: nothing on :$1" >&2; exit 1; }

# The bench's upstreams (v1 on :18001, v2 on :18002) and route.
sed -e "s#@TMP@#$TMP#g" -e "s#@NOFILE@#8192#g" "$ROOT/scripts/bench/nginx-upstreams.conf.tmpl" >"$TMP/ups.conf"
nginx -c "$TMP/ups.conf" >/dev/null 2>&1 &
PIDS+=($!)
waitport 18001
sed -e "s#@TMP@#$TMP#g" -e "s#@WORKERS@#1#" -e "s#@MAX_CONNECTIONS@#10000#" \
    -e "s#@HEADER_TIMEOUT@#10s#" -e "s#@CANARY_TLS@##" \
    "$ROOT/scripts/bench/canary.yaml.tmpl" >"$TMP/file.yaml"
# The fleet document: the same routes, without the process settings.
sed -n '/^routes:/,$p' "$TMP/file.yaml" >"$TMP/doc.yaml"

EC=18379 EP=18380
etcd --name fc --data-dir "$TMP/etcd" \
  --listen-client-urls "http://127.0.0.1:$EC" --advertise-client-urls "http://127.0.0.1:$EC" \
  --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
  --initial-cluster "fc=http://127.0.0.1:$EP" >"$TMP/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do "$BIN" fleet push "$TMP/doc.yaml" --etcd "127.0.0.1:$EC" --prefix /fc >/dev/null 2>&1 && break; sleep 0.2; done

member() {   # member NAME LISTEN ADMIN: a fleet member's local file
  cat >"$TMP/$1.yaml" <<YAML
listen: 127.0.0.1:$2
admin: 127.0.0.1:$3
state_dir: $TMP/state-$1
workers: 1
limits: {max_connections: 10000, header_timeout: 10s}
fleet:
  etcd: ["127.0.0.1:$EC"]
  prefix: /fc
  member: $1
  lease_ttl: 2s
YAML
}
member lead 18180 18191
member meas 18080 18901
sed -i 's/^listen: .*/listen: 127.0.0.1:18080/; s/^admin: .*/admin: 127.0.0.1:18901/' "$TMP/file.yaml"

measure() {   # measure SETUP CONFIG: prints "SETUP REQUESTS IR IR_PER_REQ"
  local out="$TMP/cg-$1.out"
  CANARY_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" serve --config "$2" >"$TMP/vg-$1.log" 2>&1 &
  local p=$!
  waitport 18080
  wrk -t1 -c50 -d1s http://127.0.0.1:18080/ >/dev/null
  callgrind_control -z "$p" >/dev/null 2>&1
  wrk -t1 -c50 -d5s http://127.0.0.1:18080/ >"$TMP/wrk-$1.txt"
  callgrind_control -d "$p" >/dev/null 2>&1
  kill -TERM "$p"; wait "$p" 2>/dev/null || true
  local reqs ir
  reqs=$(awk '/requests in/ {print $1}' "$TMP/wrk-$1.txt")
  ir=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  rm -f "$out"*
  echo "$1 $reqs $ir $(( ir / reqs ))"
}

leader_pid=""
for rep in $(seq "$REPS"); do
  for setup in ${SETUPS:-file leader follower}; do
    case "$setup" in
      file) cfg="$TMP/file.yaml" ;;
      leader) cfg="$TMP/meas.yaml" ;;
      follower)
        cfg="$TMP/meas.yaml"
        CANARY_LOG=warn "$BIN" serve --config "$TMP/lead.yaml" >"$TMP/lead.log" 2>&1 &
        leader_pid=$!; PIDS+=("$leader_pid")
        for _ in $(seq 100); do
          curl -s "http://127.0.0.1:18191/api/v1/fleet" | grep -q '"leading":true' && break
          sleep 0.1
        done ;;
    esac
    log "rep $rep: $setup"
    measure "$setup" "$cfg"
    if [[ -n "$leader_pid" ]]; then kill -TERM "$leader_pid"; wait "$leader_pid" 2>/dev/null || true; leader_pid=""; fi
    # The measured member's lease must lapse before the next set-up (lease_ttl 2 s).
    sleep 3
  done
done | awk '{ printf "%-9s %8d requests %14d Ir %7d Ir/req\n", $1, $2, $3, $4 }'
