#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then `cargo test`.
#
# Debian packages the tests use are installed with apt-get when missing and we are root;
# otherwise the tests that need them fail with a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the integration tests start servers from: `postgresql` (initdb, postgres, psql) for
# tests/postgres.rs (the Redis shared tier will add `redis-server` here).
packages=(postgresql)
missing=()
for pkg in "${packages[@]+"${packages[@]}"}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "warning: missing packages ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi

cargo test --locked "$@"
