#!/usr/bin/env bash
# Unpacks OpenSSH's server (Debian's openssh-server and libwrap0, not
# installed: no sshd service is started on this machine) into
# target/test-sshd for the agent's ssh deploy-key test, and prints the
# sshd binary's path as the last line on stdout.
#
#   export BERTH_TEST_SSHD="$(bash scripts/test-sshd.sh | tail -n 1)"
#   cargo test -p berth-agent --test git_auth
#
# Idempotent: what is unpacked already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="$PWD/target/test-sshd"
sshd="$dir/root/usr/sbin/sshd"
if [ ! -x "$sshd" ]; then
    mkdir -p "$dir/debs"
    # apt warns that root downloads unsandboxed: that is expected here.
    fetch() { (cd "$dir/debs" && apt-get download -qq openssh-server libwrap0 2>/dev/null) || true; }
    fetch
    if ! ls "$dir"/debs/openssh-server_*.deb >/dev/null 2>&1; then
        apt-get update -qq >&2
        fetch
    fi
    for deb in "$dir"/debs/openssh-server_*.deb "$dir"/debs/libwrap0_*.deb; do
        [ -f "$deb" ] || { echo "test-sshd: downloading openssh-server and libwrap0 failed" >&2; exit 1; }
        dpkg-deb -x "$deb" "$dir/root"
    done
fi
echo "$sshd"
