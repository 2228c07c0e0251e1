#!/usr/bin/env bash
# Runs every Berth test on a fresh Debian 12 machine (as root): installs the
# packages (and Podman), starts PostgreSQL, builds once, then runs checks,
# unit tests, store/API tests (SQLite and PostgreSQL), the agent's Podman,
# DNS, mesh and firewall tests, the lab end-to-end tests, and the
# fresh-server test of the installer scripts (Debian 12 under systemd in Podman).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh needs root (network namespaces, WireGuard, nftables)" >&2
    exit 1
fi

step() { printf '\n=== %s ===\n' "$*"; }

step "dependencies"
bash scripts/install-deps.sh
bash scripts/podman-setup.sh

step "PostgreSQL"
BERTH_TEST_POSTGRES="$(bash scripts/test-postgres.sh | tail -n 1)"
export BERTH_TEST_POSTGRES

step "build"
cargo build --workspace --all-targets --locked
# The dashboard's browser tests drive Debian's Chromium with playwright-core
# (pinned in tests/browser/package-lock.json; it downloads no browser).
npm ci --prefix tests/browser --no-audit --no-fund

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
shellcheck installer/*.sh scripts/*.sh tests/install/*.sh bench/*.sh bench/*/*.sh

step "unit tests (as nobody: unit tests need no root)"
# Build the library test binaries as root, then run each as an unprivileged
# user from its package directory, as `cargo test --lib` would. Each binary
# is copied where nobody can read it, wherever this clone is.
unit_dir=$(mktemp -d /tmp/berth-unit.XXXXXX)
chmod 1777 "$unit_dir"   # nobody writes its temp files here
cargo test --workspace --lib --locked --no-run --message-format=json \
    | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["target"]["kind"] == ["lib"]:
        print(os.path.dirname(m["manifest_path"]), m["executable"])
' | while read -r dir exe; do
    name=$(basename "$exe")
    echo "--- $name (as nobody)"
    install -m 0755 "$exe" "$unit_dir/$name"
    (cd "$dir" && setpriv --reuid=65534 --regid=65534 --clear-groups \
        env HOME="$unit_dir" TMPDIR="$unit_dir" "$unit_dir/$name") || exit 1
done
rm -rf "$unit_dir"
cargo test --workspace --bins --locked

step "store and API tests (SQLite and PostgreSQL)"
cargo test -p berth-control-plane --tests --locked

step "agent tests on real Podman, DNS, wireguard-go, nftables, git servers and sshd"
BERTH_TEST_SSHD="$(bash scripts/test-sshd.sh | tail -n 1)"
export BERTH_TEST_SSHD
cargo test -p berth-agent --test dns --test podman --test containers --test mesh --test firewall --test git_auth --test buildkit --test control_plane \
    --locked -- --test-threads=2

step "berth-proxy tests (real TLS, HTTP/1.1 and HTTP/2, WebSocket, SSE, reloads)"
cargo test -p berth-proxy --tests --locked

step "lab tests: its network (namespaces, links, bridge) and its guard"
cargo test -p berth-lab --test net --test guard --locked

step "lab end-to-end tests"
# Lab tests build namespaces and WireGuard meshes; two at a time fit 2 cores.
cargo test -p berth-tests --locked -- --test-threads=2

step "fresh-server test: setup.sh, update.sh and uninstall.sh on Debian 12 with systemd"
bash tests/install/fresh-server.sh
