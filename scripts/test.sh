#!/usr/bin/env bash
# The test command: installs what the tests need, then runs format, lint and every test.
# Works on a fresh Debian machine as root (CI) and on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: promtool (from Debian's `prometheus`) checks /metrics.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "scripts/test.sh: need ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "==> installing ${missing[*]}"
    # Do not let package scripts start daemons (the prometheus server) on this machine.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    rm -f /usr/sbin/policy-rc.d
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --workspace
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "==> all tests passed"
