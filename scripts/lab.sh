#!/usr/bin/env bash
# Brings up a local Berth cluster on this machine (Debian 12, as root):
# installs what it needs (packages, Podman), builds Berth, and runs `berth lab up`.
# Usage: scripts/lab.sh [up|down|status] [berth lab flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-up}"
shift || true

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/lab.sh needs root (network namespaces, WireGuard, nftables)" >&2
    exit 1
fi
bash scripts/install-deps.sh
if [ "$cmd" = up ]; then
    bash scripts/podman-setup.sh
fi
echo "building Berth (release)..." >&2
cargo build --release --locked --bins >&2
exec ./target/release/berth lab "$cmd" "$@"
