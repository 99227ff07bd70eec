#!/usr/bin/env bash
# The test command: installs what the tests need, then runs format, lint and every test.
# Works on a fresh Debian machine as root (CI) and on a developer machine.
#
# Tools come in two ways:
# - Go programs that Debian ships with a daemon (prometheus, etcd) are *extracted* from
#   their .deb into target/debian-tools/ with `apt-get download` + `dpkg-deb -x`: no
#   package script runs, so no service is created, started or enabled on this host, and
#   nothing outside the checkout changes. The tests find them through PATH.
# - Everything else (a C linker, procps' `kill`, protoc, chromium, ...) is installed with
#   `apt-get install -y`, with a policy-rc.d in place so no daemon starts; a policy-rc.d
#   that was there before is put back as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tools="$root/target/debian-tools"
export PATH="$tools/usr/bin:$tools/usr/sbin:$PATH"

say() { echo "scripts/test.sh: $*" >&2; }

# --- Rust: the toolchain itself cannot be installed here, only checked ---------------------
min_rust=1.85
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    say "need Rust >= $min_rust (cargo and rustc): install it from https://rustup.rs"
    exit 1
fi
have_rust=$(rustc --version | awk '{print $2}')
if [[ $(printf '%s\n%s\n' "$min_rust" "$have_rust" | sort -V | head -1) != "$min_rust" ]]; then
    say "need Rust >= $min_rust, found $have_rust: run \`rustup update stable\`"
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "==> rustup component add $component"
            rustup component add "$component"
        else
            say "need the $component component: run \`rustup component add $component\`"
            exit 1
        fi
    fi
done

# --- System packages ------------------------------------------------------------------------
# need PACKAGE COMMAND: install PACKAGE with apt-get unless COMMAND is on PATH.
# extract PACKAGE COMMAND: unpack PACKAGE into target/debian-tools unless COMMAND is there.
install=()
unpack=()
need() { command -v "$2" >/dev/null 2>&1 || install+=("$1"); }
extract() { command -v "$2" >/dev/null 2>&1 || unpack+=("$1"); }

need gcc cc              # the linker rustc calls
need make make           # builds jemalloc (tikv-jemalloc-sys), the default allocator
need procps kill         # tests stop the processes they start with kill(1)
need chromium chromium   # the dashboard's browser test (crates/canary/tests/dashboard.rs)
need chromium-driver chromedriver   # WebDriver for that test
need systemd systemd-analyze  # `systemd-analyze verify` of deploy/systemd/canary.service (no daemon starts)
need man-db man               # renders `canary man` (man -l)
need bsdutils script          # a pseudo-terminal for `canary wait`'s live line
need systemd systemd-socket-activate   # socket activation test (tests/restart.rs)
extract prometheus promtool   # checks /metrics; the Prometheus server for query tests
need protobuf-compiler protoc   # etcd-client's build script compiles etcd's protos
# ... and the well-known types they import (google/protobuf/descriptor.proto), no command
[[ -e /usr/include/google/protobuf/descriptor.proto ]] || install+=(libprotobuf-dev)
extract etcd-server etcd        # fleet tests start their own etcd on loopback
extract etcd-client etcdctl     # fleet tests put an invalid document with it

if ((${#install[@]} + ${#unpack[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "need Debian packages ${install[*]} ${unpack[*]}: run as root, or install them"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "==> apt-get update"
    apt-get update -q
    if ((${#install[@]})); then
        echo "==> installing ${install[*]}"
        # Keep package scripts from starting daemons; put back any policy-rc.d that was there.
        policy=/usr/sbin/policy-rc.d
        saved=""
        if [[ -e $policy ]]; then
            saved=$(mktemp)
            cp -p "$policy" "$saved"
        fi
        restore_policy() {
            if [[ -n $saved ]]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
        }
        trap restore_policy EXIT
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        apt-get install -y -q --no-install-recommends "${install[@]}"
        restore_policy
        trap - EXIT
    fi
    if ((${#unpack[@]})); then
        echo "==> extracting ${unpack[*]} into target/debian-tools"
        mkdir -p "$tools"
        debs=$(mktemp -d)
        (cd "$debs" && apt-get download -q "${unpack[@]}")
        for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$tools"; done
        rm -rf "$debs"
    fi
fi

echo "==> the HTTP/1.1 wing depends on no other canary crate"
if cargo tree -p canary-http1 --edges normal,build --prefix none 2>/dev/null \
    | grep -v '^canary-http1 ' | grep -q '^canary-'; then
    say "crates/http1 must not depend on another canary-* crate (ARCHITECTURE.md)"
    exit 1
fi
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --workspace --no-fail-fast
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "==> all tests passed"
