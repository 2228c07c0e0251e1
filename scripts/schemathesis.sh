#!/usr/bin/env bash
# Installs schemathesis (pinned) into target/venv inside this clone and
# prints the path of its CLI. Nothing is cached outside the clone: pip's
# cache is turned off. Needs python3 with venv (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.32.5
venv="${CARGO_TARGET_DIR:-target}/venv"
bin="$venv/bin/schemathesis"
if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; }; then
    python3 -m venv "$venv" >&2
    PIP_NO_CACHE_DIR=1 "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version" >&2
fi
echo "$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
