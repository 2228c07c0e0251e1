#!/usr/bin/env bash
# Upgrades the Berth agent on this node, safely. Served by the control plane
# at /update.sh, and installed by setup.sh as /usr/local/lib/berth/update.sh
# (which `berth nodes upgrade` runs):
#
#   curl -sSL https://CONTROL_PLANE/update.sh | sudo bash
#   curl -sSL https://CONTROL_PLANE/update.sh | sudo bash -s -- --version 1.4.0
#
# Downloads the release, checks its signature against the release key pinned
# by setup.sh and the SHA-256 of each binary, keeps the running binary as
# berth-agent.prev, restarts the agent (containers, tunnels and berth-proxy keep
# running) and waits for the new agent to report to the control plane. If it
# does not in time (it crashes, loops, or cannot connect), the previous
# binary is put back and restarted, and the node reports why.
set -euo pipefail

BERTH_URL="@@BERTH_URL@@"
BIN_DIR=/usr/local/bin
ETC_DIR=/etc/berth
DATA_DIR=/var/lib/berth
VERSION=""
TIMEOUT=60

usage() {
    cat <<EOF
Usage: update.sh [--version V] [--timeout SECONDS]

Upgrades berth-agent (and berth-proxy on proxy nodes) from $BERTH_URL.

  --version V        version to install (default: the control plane's latest)
  --timeout SECONDS  how long the new agent has to report before it is
                     reverted (default: $TIMEOUT)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "update.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'update.sh: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
case "$TIMEOUT" in '' | *[!0-9]*) die "--timeout must be a number of seconds" ;; esac
{ [ -x "$BIN_DIR/berth-agent" ] && [ -f "$ETC_DIR/release.pub" ]; } ||
    die "Berth is not installed here (no $BIN_DIR/berth-agent or $ETC_DIR/release.pub): run setup.sh first"
case "$(uname -m)" in
x86_64 | amd64) ARCH=amd64 ;;
aarch64 | arm64) ARCH=arm64 ;;
*) die "unsupported architecture $(uname -m)" ;;
esac

# One upgrade at a time.
exec 9>/run/berth-update.lock
flock -n 9 || die "another update.sh is running"

WORK=$(mktemp -d /tmp/berth-update.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fetch() {
    curl -fsS --retry 3 --cacert "$ETC_DIR/ca.pem" -o "$2" "$BERTH_URL$1" ||
        die "downloading $BERTH_URL$1 failed"
}

if [ -z "$VERSION" ]; then
    fetch /releases/latest "$WORK/latest"
    VERSION=$(tr -d '[:space:]' <"$WORK/latest")
fi
case "$VERSION" in
'' | *[!A-Za-z0-9.+_-]* | [.+_-]*) die "--version: '$VERSION' is not a version name" ;;
esac

say "downloading berth $VERSION ($ARCH) and checking its signature"
fetch "/releases/$VERSION/manifest" "$WORK/manifest"
fetch "/releases/$VERSION/manifest.sig" "$WORK/manifest.sig"
# The key pinned at setup, not one served now: the control plane alone
# cannot make a node run a build the release key did not sign.
openssl pkeyutl -verify -pubin -inkey "$ETC_DIR/release.pub" -rawin \
    -in "$WORK/manifest" -sigfile "$WORK/manifest.sig" >/dev/null 2>&1 ||
    die "release $VERSION is not signed by the pinned release key ($ETC_DIR/release.pub): refusing it"

# Fetches and checks NAME into $WORK; prints nothing, fails loudly.
get() {
    local file="$1-linux-$ARCH" sum
    sum=$(awk -v f="$file" '$2 == f { print $1 }' "$WORK/manifest")
    [ -n "$sum" ] || die "release $VERSION has no $file"
    fetch "/releases/$VERSION/$file" "$WORK/$1"
    echo "$sum  $WORK/$1" | sha256sum -c --status ||
        die "$file does not match the signed manifest's SHA-256: refusing it"
    chmod 0755 "$WORK/$1"
}
same() { cmp -s "$WORK/$1" "$BIN_DIR/$1"; }

get berth-agent
PROXY=false
if [ -x "$BIN_DIR/berth-proxy" ]; then
    PROXY=true
    get berth-proxy
fi
if same berth-agent && { ! $PROXY || same berth-proxy; }; then
    rm -f "$DATA_DIR/upgrade-failed-$VERSION"
    say "already running $VERSION; nothing to do"
    exit 0
fi

status_field() { sed -n "s/^$1=//p" "$DATA_DIR/agent.status" 2>/dev/null; }
# Waits until the agent run by systemd (its current pid) reported WANT to the
# control plane after START.
wait_reported() {
    local want=$1 start=$2 deadline=$((SECONDS + $3)) pid at
    while [ $SECONDS -lt $deadline ]; do
        pid=$(systemctl show -p MainPID --value berth-agent.service)
        at=$(status_field reported_at)
        if [ "$pid" != 0 ] && [ "$(status_field pid)" = "$pid" ] &&
            [ "$(status_field version)" = "$want" ] && [ "${at:-0}" -ge "$start" ]; then
            return 0
        fi
        sleep 1
    done
    return 1
}

if ! same berth-agent; then
    OLD=$("$BIN_DIR/berth-agent" --version 2>/dev/null | awk '{ print $2 }' || true)
    say "upgrading berth-agent ${OLD:-?} -> $VERSION"
    cp -p "$BIN_DIR/berth-agent" "$BIN_DIR/berth-agent.prev"
    install -m 0755 "$WORK/berth-agent" "$BIN_DIR/.berth-agent.new"
    mv -f "$BIN_DIR/.berth-agent.new" "$BIN_DIR/berth-agent"
    start=$(date +%s)
    systemctl restart berth-agent.service || true
    say "waiting up to ${TIMEOUT}s for the new agent to report to $BERTH_URL"
    if ! wait_reported "$VERSION" "$start" "$TIMEOUT"; then
        why="berth-agent $VERSION did not report to the control plane within ${TIMEOUT}s ($(systemctl show -p NRestarts --value berth-agent.service) restarts); reverted to ${OLD:-the previous binary}"
        echo "update.sh: $why" >&2
        journalctl -u berth-agent.service -n 20 --no-pager 2>/dev/null | sed 's/^/    /' >&2 || true
        # Marked before the restart: the old agent must not start this upgrade again.
        echo "$why" >"$DATA_DIR/upgrade-failed-$VERSION"
        mv -f "$BIN_DIR/berth-agent.prev" "$BIN_DIR/berth-agent"
        start=$(date +%s)
        systemctl restart berth-agent.service || true
        if wait_reported "${OLD:-}" "$start" "$TIMEOUT"; then
            say "the previous agent (${OLD:-?}) runs and reports again"
        else
            echo "update.sh: the previous agent has not reported either: see journalctl -u berth-agent" >&2
        fi
        exit 1
    fi
    rm -f "$DATA_DIR/upgrade-failed-$VERSION"
    say "berth-agent $VERSION runs and reports to the control plane"
fi

if $PROXY && ! same berth-proxy; then
    # berth-proxy is only restarted once the new agent is known good.
    cp -p "$BIN_DIR/berth-proxy" "$BIN_DIR/berth-proxy.prev"
    install -m 0755 "$WORK/berth-proxy" "$BIN_DIR/.berth-proxy.new"
    mv -f "$BIN_DIR/.berth-proxy.new" "$BIN_DIR/berth-proxy"
    systemctl try-restart berth-proxy.service
    sleep 2
    if systemctl is-active -q berth-proxy.service; then
        say "berth-proxy $VERSION runs"
    else
        mv -f "$BIN_DIR/berth-proxy.prev" "$BIN_DIR/berth-proxy"
        systemctl restart berth-proxy.service || true
        die "berth-proxy $VERSION did not stay up; the previous binary is back"
    fi
fi
say "upgraded to $VERSION"
