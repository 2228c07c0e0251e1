#!/usr/bin/env bash
# Berth node installer. The control plane serves it at /setup.sh with its URL,
# CA and release key filled in:
#
#   curl -sSL https://CONTROL_PLANE/setup.sh | sudo bash
#   curl -sSL https://CONTROL_PLANE/setup.sh | sudo REGISTRATION_TOKEN=... IS_PROXY=false bash
#   curl -sSL https://CONTROL_PLANE/setup.sh | sudo bash -s -- --token ... [--proxy]
#
# Installs the packages a node needs, the signed agent (and proxy) binaries,
# the systemd units, registers the node and starts it. Running it again is
# safe: what is already right is left alone, and nothing is restarted unless
# it changed. Every step says what it does; a failure says what to do.
set -euo pipefail

BERTH_URL="@@BERTH_URL@@"
BERTH_LATEST="@@BERTH_LATEST@@"
BERTH_CA_PEM=$(
    cat <<'BERTH_EOF'
@@BERTH_CA_PEM@@
BERTH_EOF
)
BERTH_RELEASE_KEY=$(
    cat <<'BERTH_EOF'
@@BERTH_RELEASE_KEY@@
BERTH_EOF
)

BIN_DIR=/usr/local/bin
LIB_DIR=/usr/local/lib/berth
ETC_DIR=/etc/berth
DATA_DIR=/var/lib/berth
UNIT_DIR=/etc/systemd/system

usage() {
    cat <<EOF
Usage: setup.sh [--token TOKEN] [--proxy | --worker] [--name NAME] [--version V]

Joins this server to the Berth fleet at $BERTH_URL.

  --token TOKEN   join token from \`berth token create\` (env REGISTRATION_TOKEN);
                  not needed when this server is already registered
  --proxy         this is a proxy node: public HTTPS on ports 80 and 443 (env IS_PROXY=true)
  --worker        this is a worker node (env IS_PROXY=false; the default)
  --name NAME     node name, a DNS label (env BERTH_NODE_NAME; default: the host name)
  --version V     agent version to install (default: the one installed, else the
                  latest, $BERTH_LATEST; upgrade a running node with update.sh)
  -h, --help      this text

With a terminal and no token, it asks for the token and the node's role.
EOF
}

TOKEN="${REGISTRATION_TOKEN:-}"
PROXY="${IS_PROXY:-}"
NAME="${BERTH_NODE_NAME:-}"
VERSION="${BERTH_VERSION:-}"
while [ $# -gt 0 ]; do
    case "$1" in
    --token) TOKEN="${2:?--token needs a value}"; shift 2 ;;
    --token=*) TOKEN="${1#*=}"; shift ;;
    --proxy) PROXY=true; shift ;;
    --worker) PROXY=false; shift ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

STEP="starting"
step() {
    STEP="$*"
    printf '==> %s\n' "$*"
}
note() { printf '    %s\n' "$*"; }
die() {
    printf 'setup.sh: %s\n' "$*" >&2
    exit 1
}
on_error() {
    printf '\nsetup.sh: failed while: %s (line %s).\n' "$STEP" "$1" >&2
    printf 'Steps before this one are complete; nothing after it was changed.\n' >&2
    printf 'Fix the cause above and run setup.sh again: it is safe to re-run.\n' >&2
}
trap 'on_error $LINENO' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root: curl -sSL $BERTH_URL/setup.sh | sudo bash"
[ -n "$BERTH_RELEASE_KEY" ] || die "the control plane at $BERTH_URL has no release key: publish a build with \`berth release sign\` first"
[ -n "$VERSION$BERTH_LATEST" ] || die "the control plane at $BERTH_URL has no release yet: publish one with \`berth release sign\`"
case "$PROXY" in
"" | true | false) ;;
*) die "IS_PROXY must be true or false, not '$PROXY'" ;;
esac

WORK=$(mktemp -d /tmp/berth-setup.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CHANGED=()

# Writes stdin to PATH (mode MODE) only when the content differs; records it.
put() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$WORK/put.XXXXXX")
    cat >"$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        return 0
    fi
    mkdir -p "$(dirname "$path")"
    install -m "$mode" "$tmp" "$path.berth-new"
    mv -f "$path.berth-new" "$path"
    CHANGED+=("$path")
    note "wrote $path"
}
changed() {
    local p
    for p in "${CHANGED[@]}"; do
        [ "$p" = "$1" ] && return 0
    done
    return 1
}

# --- questions ---------------------------------------------------------------
REGISTERED=false
[ -f "$DATA_DIR/node.json" ] && REGISTERED=true
if [ -r /dev/tty ] && (exec </dev/tty) 2>/dev/null && [ -t 1 ]; then
    if ! $REGISTERED && [ -z "$TOKEN" ]; then
        read -r -p "Join token (berth token create): " TOKEN </dev/tty
    fi
    if ! $REGISTERED && [ -z "$PROXY" ]; then
        read -r -p "Is this a proxy node (public HTTPS on ports 80/443)? [y/N] " answer </dev/tty
        case "$answer" in [yY]*) PROXY=true ;; *) PROXY=false ;; esac
    fi
fi
if $REGISTERED; then
    # The role was fixed at registration; a later run keeps it.
    was_proxy=$(grep -o '"proxy": *[a-z]*' "$DATA_DIR/node.json" | grep -o '[a-z]*$' || echo false)
    if [ -n "$PROXY" ] && [ "$PROXY" != "$was_proxy" ]; then
        die "this server is registered as proxy=$was_proxy; run uninstall.sh --purge first to change its role"
    fi
    PROXY=$was_proxy
else
    [ -n "$TOKEN" ] || die "no join token: pass --token TOKEN or REGISTRATION_TOKEN=... (create one with \`berth token create\`)"
fi
PROXY=${PROXY:-false}

# --- platform ----------------------------------------------------------------
step "checking the platform"
[ -r /etc/os-release ] || die "cannot tell the distribution: /etc/os-release is missing"
# In a subshell: os-release sets VERSION, NAME and friends.
# shellcheck disable=SC1091
OS_NAME=$(. /etc/os-release && echo "${PRETTY_NAME:-$ID}")
case "$(uname -m)" in
x86_64 | amd64) ARCH=amd64 ;;
aarch64 | arm64) ARCH=arm64 ;;
*) die "unsupported architecture $(uname -m): Berth ships amd64 and arm64" ;;
esac
if command -v apt-get >/dev/null; then
    PKG=apt
elif command -v dnf >/dev/null; then
    PKG=dnf
else
    die "unsupported distribution $OS_NAME: need apt (Debian, Ubuntu) or dnf (Fedora, RHEL family)"
fi
{ command -v systemctl >/dev/null && [ -d /run/systemd/system ]; } || die "systemd is not running: Berth runs as systemd services"
CGROUP_V1=false
[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ] || CGROUP_V1=true
KERNEL_WG=false
if ip link add berth-wgprobe type wireguard 2>/dev/null; then
    ip link del berth-wgprobe
    KERNEL_WG=true
fi
note "$OS_NAME on $ARCH, package manager $PKG, kernel WireGuard: $KERNEL_WG, role: $($PROXY && echo proxy || echo worker)"

# --- packages ----------------------------------------------------------------
step "installing packages"
if [ $PKG = apt ]; then
    want=(ca-certificates curl openssl iproute2 nftables wireguard-tools podman runc)
    $KERNEL_WG || want+=(wireguard-go)
    # Workers build images: Podman's builder, git (and ssh for deploy keys)
    # for git builds.
    $PROXY || want+=(git tar openssh-client)
    missing=()
    for p in "${want[@]}"; do
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        note "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed (see above)"
    else
        note "all present"
    fi
else
    want=(ca-certificates curl openssl iproute nftables wireguard-tools podman crun)
    $KERNEL_WG || want+=(wireguard-go)
    $PROXY || want+=(git tar openssh-clients)
    $CGROUP_V1 && want+=(runc)
    missing=()
    for p in "${want[@]}"; do
        rpm -q "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        note "dnf install ${missing[*]}"
        dnf install -y -q "${missing[@]}" ||
            die "dnf install ${missing[*]} failed (wireguard-go may need EPEL or a kernel with WireGuard)"
    else
        note "all present"
    fi
fi

# --- system settings ---------------------------------------------------------
step "configuring IP forwarding and Podman"
printf 'net.ipv4.ip_forward = 1\n' | put /etc/sysctl.d/90-berth.conf 0644
# Written to /proc directly: minimal images have no sysctl(8).
[ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || echo 1 >/proc/sys/net/ipv4/ip_forward
if $CGROUP_V1; then
    # cgroups v1: crun and the systemd cgroup manager fail here.
    printf '# Written by Berth setup.sh: this host has cgroups v1.\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' |
        put /etc/containers/containers.conf.d/90-berth.conf 0644
fi
podman info >"$WORK/podman-info" 2>&1 ||
    die "Podman does not work on this server: $(tail -n 1 "$WORK/podman-info")"
systemctl enable --now podman.socket >/dev/null 2>&1 ||
    die "cannot start podman.socket: see \`systemctl status podman.socket\`"

# --- trust -------------------------------------------------------------------
step "pinning the control plane's CA and the release key"
printf '%s\n' "$BERTH_CA_PEM" | put "$ETC_DIR/ca.pem" 0644
if [ -f "$ETC_DIR/release.pub" ] && ! printf '%s\n' "$BERTH_RELEASE_KEY" | cmp -s - "$ETC_DIR/release.pub"; then
    die "the release key served by $BERTH_URL differs from the pinned $ETC_DIR/release.pub; if the key was rotated on purpose, remove that file and run setup.sh again"
fi
printf '%s\n' "$BERTH_RELEASE_KEY" | put "$ETC_DIR/release.pub" 0644

# --- binaries ----------------------------------------------------------------
# An installed agent is kept at its version: upgrades go through update.sh,
# which reverts a bad build. --version picks another one explicitly.
if [ -z "$VERSION" ] && [ -x "$BIN_DIR/berth-agent" ]; then
    VERSION=$("$BIN_DIR/berth-agent" --version 2>/dev/null | awk '{ print $2 }' || true)
fi
VERSION=${VERSION:-$BERTH_LATEST}
fetch() {
    curl -fsS --retry 3 --cacert "$ETC_DIR/ca.pem" -o "$2" "$BERTH_URL$1" ||
        die "downloading $BERTH_URL$1 failed (is the control plane reachable from here?)"
}
step "downloading berth $VERSION ($ARCH) and checking its signature"
fetch "/releases/$VERSION/manifest" "$WORK/manifest"
fetch "/releases/$VERSION/manifest.sig" "$WORK/manifest.sig"
openssl pkeyutl -verify -pubin -inkey "$ETC_DIR/release.pub" -rawin \
    -in "$WORK/manifest" -sigfile "$WORK/manifest.sig" >/dev/null 2>&1 ||
    die "the manifest of release $VERSION is not signed by the pinned release key: refusing to install it"
install_binary() {
    local name=$1 file="$1-linux-$ARCH" sum
    sum=$(awk -v f="$file" '$2 == f { print $1 }' "$WORK/manifest")
    [ -n "$sum" ] || die "release $VERSION has no $file"
    if [ -f "$BIN_DIR/$name" ] && echo "$sum  $BIN_DIR/$name" | sha256sum -c --status; then
        return 0
    fi
    fetch "/releases/$VERSION/$file" "$WORK/$file"
    echo "$sum  $WORK/$file" | sha256sum -c --status ||
        die "$file does not match the signed manifest's SHA-256: refusing to install it"
    install -m 0755 "$WORK/$file" "$BIN_DIR/.$name.berth-new"
    mv -f "$BIN_DIR/.$name.berth-new" "$BIN_DIR/$name"
    CHANGED+=("$BIN_DIR/$name")
    note "installed $BIN_DIR/$name ($VERSION)"
}
install_binary berth-agent
$PROXY && install_binary berth-proxy

step "installing update.sh and uninstall.sh"
fetch /update.sh "$WORK/update.sh"
fetch /uninstall.sh "$WORK/uninstall.sh"
put "$LIB_DIR/update.sh" 0755 <"$WORK/update.sh"
put "$LIB_DIR/uninstall.sh" 0755 <"$WORK/uninstall.sh"

# --- services ----------------------------------------------------------------
step "writing the systemd units"
AGENT_ARGS=""
if $PROXY; then
    if ! id berth-proxy >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin berth-proxy
        note "created the system user berth-proxy"
    fi
    AGENT_ARGS="--proxy-external --proxy-user berth-proxy"
fi
{
    echo "# Written by Berth setup.sh."
    echo "BERTH_URL=$BERTH_URL"
    echo "BERTH_AGENT_ARGS=\"$AGENT_ARGS\""
} | put "$ETC_DIR/agent.env" 0644
cat <<'BERTH_EOF' | put "$UNIT_DIR/berth-agent.service" 0644
@@UNIT:berth-agent.service@@
BERTH_EOF
if ! $KERNEL_WG; then
    cat <<'BERTH_EOF' | put "$UNIT_DIR/berth-wireguard.service" 0644
@@UNIT:berth-wireguard.service@@
BERTH_EOF
fi
if $PROXY; then
    cat <<'BERTH_EOF' | put "$UNIT_DIR/berth-proxy.service" 0644
@@UNIT:berth-proxy.service@@
BERTH_EOF
fi
if changed "$UNIT_DIR/berth-agent.service" || changed "$UNIT_DIR/berth-wireguard.service" ||
    changed "$UNIT_DIR/berth-proxy.service"; then
    systemctl daemon-reload
fi

mkdir -p "$DATA_DIR"
chmod 0711 "$DATA_DIR"
if $PROXY; then
    # berth-proxy reads its config (which holds certificate keys) from here.
    install -d -m 0750 -o root -g berth-proxy "$DATA_DIR/proxy"
fi

if ! $REGISTERED; then
    step "registering with $BERTH_URL"
    args=(--data-dir "$DATA_DIR" --url "$BERTH_URL" --token "$TOKEN" --register-only)
    $PROXY && args+=(--proxy)
    [ -n "$NAME" ] && args+=(--name "$NAME")
    BERTH_LOG=warn "$BIN_DIR/berth-agent" "${args[@]}" ||
        die "registration failed (above). A token is single-use and expires: create a new one with \`berth token create$($PROXY && echo ' --proxy')\`"
    CHANGED+=("$DATA_DIR/node.json")
fi

step "starting the services"
start() {
    local unit=$1
    shift
    local need_restart=false p
    for p in "$@"; do changed "$p" && need_restart=true; done
    systemctl enable -q "$unit"
    if ! systemctl is-active -q "$unit"; then
        systemctl start "$unit" || die "$unit did not start: see \`journalctl -u $unit\`"
        note "started $unit"
    elif $need_restart; then
        systemctl restart "$unit" || die "$unit did not restart: see \`journalctl -u $unit\`"
        note "restarted $unit"
    fi
}
$KERNEL_WG || start berth-wireguard.service "$UNIT_DIR/berth-wireguard.service"
$PROXY && start berth-proxy.service "$UNIT_DIR/berth-proxy.service" "$BIN_DIR/berth-proxy"
start berth-agent.service "$UNIT_DIR/berth-agent.service" "$BIN_DIR/berth-agent" "$ETC_DIR/agent.env" \
    "$ETC_DIR/ca.pem" "$DATA_DIR/node.json"

step "waiting for the agent to report to the control plane"
pid=$(systemctl show -p MainPID --value berth-agent.service)
for _ in $(seq 1 60); do
    if grep -qx "pid=$pid" "$DATA_DIR/agent.status" 2>/dev/null; then
        break
    fi
    sleep 1
done
grep -qx "pid=$pid" "$DATA_DIR/agent.status" 2>/dev/null ||
    die "the agent runs but has not reached $BERTH_URL in 60 s: see \`journalctl -u berth-agent\`"
node=$(grep -o '"name": *"[^"]*"' "$DATA_DIR/node.json" | sed 's/.*"\([^"]*\)"$/\1/')
if [ ${#CHANGED[@]} -eq 0 ]; then
    echo "Berth is already installed and running on this server as node $node; nothing changed."
else
    echo "Berth $(grep '^version=' "$DATA_DIR/agent.status" | cut -d= -f2) is running on this server as node $node ($($PROXY && echo proxy || echo worker))."
fi
echo "Upgrade: curl -sSL $BERTH_URL/update.sh | sudo bash   Remove: sudo $LIB_DIR/uninstall.sh"
