#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then `cargo test`.
#
# Debian packages the tests use are installed with apt-get when missing and we are root;
# otherwise the tests that need them fail with a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the integration tests use: `postgresql` (initdb, postgres, psql) for
# tests/postgres*.rs, `prometheus` for promtool, which checks and unit-tests the alert rules
# (tests/metrics.rs). The Redis shared tier will add `redis-server` here.
packages=(postgresql prometheus)
missing=()
for pkg in "${packages[@]+"${packages[@]}"}"; do
    # "install ok installed" only: a removed package keeps its config and `dpkg -s` still finds it.
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "warning: missing packages ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    fi
fi

# Python drivers for tests/postgres_drivers.rs (psycopg 3, asyncpg), pinned, in a virtual
# environment of their own; never installed into the system Python.
PY_VENV="${SIDELIGHT_PY_VENV:-target/py-drivers}"
PY_PACKAGES=("psycopg[binary]==3.2.3" "asyncpg==0.30.0")
if ! command -v python3 >/dev/null; then
    echo "error: python3 not found; install it with: sudo apt-get install python3 python3-venv" >&2
    exit 1
fi
if [ ! -x "$PY_VENV/bin/python" ] || ! "$PY_VENV/bin/python" -c "import psycopg, asyncpg" 2>/dev/null; then
    if ! python3 -m venv "$PY_VENV"; then
        echo "error: python3 -m venv failed; install it with: sudo apt-get install python3-venv" >&2
        exit 1
    fi
    "$PY_VENV/bin/pip" install -q "${PY_PACKAGES[@]}"
fi
export SIDELIGHT_PY_VENV="$PY_VENV"

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi

cargo test --locked "$@"
