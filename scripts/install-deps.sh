#!/usr/bin/env bash
# Installs what Berth's lab and tests need on Debian 12 (run as root).
# Idempotent: packages already present are left alone.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have wireguard-go || need+=(wireguard-go)
have wg || need+=(wireguard-tools)
have nft || need+=(nftables)
have ip || need+=(iproute2)
have ping || need+=(iputils-ping)
have pg_ctlcluster || need+=(postgresql)
have pkill || need+=(procps)
have curl || need+=(curl)
have dig || need+=(bind9-dnsutils)
have cc || need+=(build-essential)
have pebble || need+=(pebble)        # ACME test server (proxy tests, lab --proxies)
have setpriv || need+=(util-linux)
have openssl || need+=(openssl)  # berth-proxy as an unprivileged user
have debootstrap || need+=(debootstrap)  # the fresh-server installer test
have shellcheck || need+=(shellcheck)
have strip || need+=(binutils)
have systemd-analyze || need+=(systemd)
have git || need+=(git)              # git builds
have ssh || need+=(openssh-client)   # git builds over ssh
have busybox || need+=(busybox)      # test servers (httpd)
have docker-registry || need+=(docker-registry)  # the fleet registry the control plane runs
have prometheus || need+=(prometheus)  # the metrics test scrapes every part of a lab
have script || need+=(bsdutils)  # the exec test drives a terminal through script(1)
have chromium || need+=(chromium)    # the dashboard's browser tests (headless)
have npm || need+=(npm)              # playwright-core for them (tests/browser)
have python3 || need+=(python3)
# The API fuzz test installs schemathesis into a venv in the clone (scripts/schemathesis.sh).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
# The package's own service would hold port 5000 with Debian's config; the
# control plane runs the registry itself.
# Prometheus's likewise: the tests start their own.
for unit in docker-registry prometheus prometheus-node-exporter; do
    if [ -d /run/systemd/system ] && systemctl is-enabled --quiet "$unit" 2>/dev/null; then
        systemctl disable --now "$unit" >&2 || true
    fi
done

if ! have cargo; then
    echo "cargo not found: install a Rust toolchain (https://rustup.rs) and run this again" >&2
    exit 1
fi
