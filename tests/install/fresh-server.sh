#!/usr/bin/env bash
# Fresh-server test of setup.sh, update.sh and uninstall.sh.
#
# A Debian 12 root filesystem made with debootstrap is imported into Podman
# and run with systemd as PID 1. Inside it, the real
# `curl https://CP/setup.sh | bash` runs against a control plane on this
# host; then update.sh to a newer signed build, to a build that fails to start
# (reverted by itself), to tampered builds (refused), setup.sh again (nothing
# changes), a control-plane driven upgrade, and uninstall.sh. A second
# server joins as a proxy node (berth-proxy.service, sandboxed) and the two
# form a WireGuard mesh.
#
# Not covered here: containers inside the test servers. Podman nested in a
# Podman container cannot start containers on this cgroups-v1 host (runc
# fails to mount the cgroup tree), so that containers survive an agent
# restart is tested by the agent's own tests (agent/tests/containers.rs).
#
# Needs root, Podman (scripts/podman-setup.sh), debootstrap, and a debug
# build of the workspace (`cargo build --workspace`). Leaves nothing behind
# but target/fresh-server/ (the rootfs tarball is kept for the next run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$ROOT/target/fresh-server
BIN=$ROOT/target/debug
IMAGE=localhost/berth-test-fresh-debian12
CTR=berth-fresh-test
PROXY_CTR=berth-fresh-test-proxy
NET=berth-fresh-test
SUBNET=10.89.240.0/24
GW=10.89.240.1
PORT=17443
CP_URL=https://$GW:$PORT
NODE=fresh1
PROXY_NODE=fresh2

pass() { printf '  ok: %s\n' "$*"; }
fail() {
    printf '  FAILED: %s\n' "$*" >&2
    exit 1
}
step() { printf '\n--- %s\n' "$*"; }

CP_PID=""
cleanup() {
    set +e
    if [ "${KEEP:-}" = 1 ]; then
        echo "KEEP=1: leaving container $CTR and the control plane (pid $CP_PID) running"
        return
    fi
    podman rm -f -t 0 "$CTR" "$PROXY_CTR" >/dev/null 2>&1
    podman network rm -f "$NET" >/dev/null 2>&1
    podman rmi -f "$IMAGE" >/dev/null 2>&1
    [ -n "$CP_PID" ] && kill "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null
}
trap cleanup EXIT

in_node() { podman exec "$CTR" bash -c "$1"; }
in_proxy() { podman exec "$PROXY_CTR" bash -c "$1"; }
berth() { "$BIN/berth" --url "$CP_URL" --ca-file "$WORK/cp/ca.pem" --admin-token-file "$WORK/cp/admin.token" "$@"; }
node_field() { # FIELD [NODE] -> value of the node in `berth nodes list --json`
    berth nodes list --json | python3 -c "
import json, sys
n = [n for n in json.load(sys.stdin) if n['name'] == '${2:-$NODE}']
print(n[0].get('$1') if n else 'absent')"
}
wait_for() { # SECONDS DESCRIPTION COMMAND
    local until=$((SECONDS + $1))
    while [ $SECONDS -lt $until ]; do
        if eval "$3" >/dev/null 2>&1; then
            pass "$2"
            return 0
        fi
        sleep 1
    done
    fail "$2 (not within $1 s)"
}
sum_of() { sha256sum <"$1" | cut -d' ' -f1; }
installed_sum() { in_node "sha256sum </usr/local/bin/berth-agent" | cut -d' ' -f1; }
agent_pid() { in_node "systemctl show -p MainPID --value berth-agent.service"; }
wg_pid() { in_node "systemctl show -p MainPID --value berth-wireguard.service"; }

step "builds: $BIN, signed releases in $WORK/releases"
for b in berth-agent berth-proxy berth-control-plane berth; do
    [ -x "$BIN/$b" ] || fail "$BIN/$b is missing: run cargo build --workspace first"
done
rm -rf "${WORK:?}/releases" "${WORK:?}/evil" "${WORK:?}/cp" "${WORK:?}/bin" "$WORK/release.key" "$WORK/release.key.pub" "$WORK/other.key" "$WORK/other.key.pub"
mkdir -p "$WORK/bin/v1" "$WORK/bin/v2" "$WORK/bin/broken"
V1=$("$BIN/berth-agent" --version | awk '{ print $2 }')
V2="$V1-fresh.2"
# Debug builds with their symbols are ~170 MB; the symbols are not needed here.
strip -o "$WORK/bin/v1/berth-agent" "$BIN/berth-agent"
strip -o "$WORK/bin/v1/berth-proxy" "$BIN/berth-proxy"
strip -o "$WORK/bin/cp" "$BIN/berth-control-plane"
# A newer build: the same code with another version compiled in.
BERTH_VERSION=$V2 cargo build -q -p berth-agent --bin berth-agent --target-dir "$ROOT/target" 2>&1 | tail -n 20
[ "$("$BIN/berth-agent" --version | awk '{ print $2 }')" = "$V2" ] || fail "the rebuilt agent does not say $V2"
strip -o "$WORK/bin/v2/berth-agent" "$BIN/berth-agent"
cp "$WORK/bin/v1/berth-proxy" "$WORK/bin/v2/berth-proxy"
# Leave target/debug as the test suite built it.
cargo build -q -p berth-agent --bin berth-agent --target-dir "$ROOT/target"
# A build that cannot start.
printf '#!/bin/sh\necho "berth-agent: this build is broken on purpose" >&2\nexit 1\n' >"$WORK/bin/broken/berth-agent"
cp "$WORK/bin/v1/berth-proxy" "$WORK/bin/broken/berth-proxy"

berth release keygen --out "$WORK/release.key" >/dev/null
berth release sign --key "$WORK/release.key" --dir "$WORK/releases" --version "$V1" "$WORK/bin/v1/berth-agent" "$WORK/bin/v1/berth-proxy" >/dev/null
berth release sign --key "$WORK/release.key" --dir "$WORK/releases" --version "$V2" --no-latest "$WORK/bin/v2/berth-agent" "$WORK/bin/v2/berth-proxy" >/dev/null
berth release sign --key "$WORK/release.key" --dir "$WORK/releases" --version broken --no-latest "$WORK/bin/broken/berth-agent" "$WORK/bin/broken/berth-proxy" >/dev/null
# Tampered after signing: the checksum no longer matches.
berth release sign --key "$WORK/release.key" --dir "$WORK/releases" --version tampered --no-latest "$WORK/bin/v2/berth-agent" "$WORK/bin/v2/berth-proxy" >/dev/null
printf 'evil' >>"$WORK/releases/tampered/berth-agent-linux-amd64"
# Signed with another key, with matching checksums.
berth release keygen --out "$WORK/other.key" >/dev/null
berth release sign --key "$WORK/other.key" --dir "$WORK/evil" --version badsig "$WORK/bin/v2/berth-agent" "$WORK/bin/v2/berth-proxy" >/dev/null
cp -r "$WORK/evil/badsig" "$WORK/releases/badsig"
pass "releases $V1 (latest), $V2, broken, tampered, badsig"

step "fresh Debian 12 server (debootstrap, systemd as PID 1)"
if [ ! -s "$WORK/rootfs.tar" ]; then
    rm -rf "$WORK/rootfs"
    echo "debootstrap bookworm (about a minute; kept in $WORK/rootfs.tar)"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates,iproute2 \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar.tmp" .
    mv "$WORK/rootfs.tar.tmp" "$WORK/rootfs.tar"
    rm -rf "$WORK/rootfs"
fi
podman rm -f -t 0 "$CTR" "$PROXY_CTR" >/dev/null 2>&1 || true
podman network rm -f "$NET" >/dev/null 2>&1 || true
podman import -q "$WORK/rootfs.tar" "$IMAGE" >/dev/null
podman network create --subnet "$SUBNET" --gateway "$GW" "$NET" >/dev/null
# Podman inside: its overlay storage cannot sit on the container's own overlay.
for c in "$CTR:$NODE" "$PROXY_CTR:$PROXY_NODE"; do
    podman run -d --name "${c%%:*}" --hostname "${c#*:}" --network "$NET" --systemd=always --privileged \
        --tmpfs /var/lib/containers:rw,size=4g "$IMAGE" /sbin/init >/dev/null
done
wait_for 30 "systemd is up in both servers" "in_node 'systemctl is-system-running | grep -Eq \"running|degraded\"' && in_proxy 'systemctl is-system-running | grep -Eq \"running|degraded\"'"

step "control plane on $CP_URL"
"$WORK/bin/cp" serve --data-dir "$WORK/cp" --listen "$GW:$PORT" --san "$GW" --advertise-url "$CP_URL" \
    --releases-dir "$WORK/releases" >"$WORK/cp.log" 2>&1 &
CP_PID=$!
wait_for 20 "control plane answers" "curl -fsS --cacert $WORK/cp/ca.pem $CP_URL/healthz"
curl -fsS --cacert "$WORK/cp/ca.pem" "$CP_URL/setup.sh" >"$WORK/setup.sh"
curl -fsS --cacert "$WORK/cp/ca.pem" "$CP_URL/update.sh" >"$WORK/update.sh"
grep -q "@@" "$WORK/setup.sh" "$WORK/update.sh" && fail "served scripts still have placeholders"
shellcheck "$WORK/setup.sh" "$WORK/update.sh" || fail "shellcheck of the served scripts"
pass "served setup.sh and update.sh are filled in and pass shellcheck"
podman cp "$WORK/cp/ca.pem" "$CTR:/root/berth-ca.pem"
podman cp "$WORK/cp/ca.pem" "$PROXY_CTR:/root/berth-ca.pem"

step "setup.sh: a bad token stops with a clear message and starts nothing"
set +e
BAD_TOKEN=berth1.aaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.$(printf '0%.0s' $(seq 64))
out=$(in_node "curl -sSL --cacert /root/berth-ca.pem $CP_URL/setup.sh | bash -s -- --token $BAD_TOKEN --worker" 2>&1)
rc=$?
set -e
[ $rc -ne 0 ] || fail "setup.sh with a bad token succeeded"
echo "$out" | grep -q "registration failed" || { echo "$out"; fail "no clear registration error"; }
in_node "! systemctl is-active -q berth-agent.service" || fail "berth-agent started without a registration"
pass "bad token: exit $rc, 'registration failed', berth-agent not started"

step "setup.sh: curl | bash with REGISTRATION_TOKEN and IS_PROXY"
TOKEN=$(berth token create --quiet)
in_node "curl -sSL --cacert /root/berth-ca.pem $CP_URL/setup.sh | REGISTRATION_TOKEN=$TOKEN IS_PROXY=false bash" |
    tee "$WORK/setup-1.log"
wait_for 30 "$NODE is online in berth nodes list" "[ \"\$(node_field online)\" = True ]"
[ "$(node_field agent_version)" = "$V1" ] || fail "$NODE runs $(node_field agent_version), not $V1"
pass "$NODE reports version $V1"
for unit in berth-agent berth-wireguard podman.socket; do
    in_node "systemctl is-active -q $unit" || fail "$unit is not active"
done
pass "berth-agent, berth-wireguard and podman.socket are active"
in_node "ip link show berth0 >/dev/null" || fail "no berth0 interface"
in_node "grep -qx 1 /proc/sys/net/ipv4/ip_forward" || fail "IP forwarding is off"
pass "mesh interface berth0 is up, IP forwarding on"

step "setup.sh on a terminal, answering its questions: a proxy server"
PTOKEN=$(berth token create --proxy --quiet)
# A real terminal (a pty) for `podman exec -t`; setup.sh asks on /dev/tty.
python3 - "$PROXY_CTR" "$CP_URL" "$PTOKEN" "$WORK/setup-proxy.log" <<'PY' || fail "interactive setup.sh"
import os, pty, sys, time
ctr, url, token, log = sys.argv[1:]
cmd = ["podman", "exec", "-it", ctr, "bash", "-c", f"curl -sSL --cacert /root/berth-ca.pem {url}/setup.sh | bash"]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)
out, answers = b"", [(b"Join token", token), (b"proxy node", "y")]
deadline = time.time() + 300
while time.time() < deadline:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    if answers and answers[0][0] in out:
        os.write(fd, (answers.pop(0)[1] + "\r").encode())
_, status = os.waitpid(pid, 0)
open(log, "wb").write(out)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(0 if status == 0 and not answers else 1)
PY
wait_for 30 "$PROXY_NODE is online" "[ \"\$(node_field online $PROXY_NODE)\" = True ]"
for unit in berth-agent berth-proxy berth-wireguard; do
    in_proxy "systemctl is-active -q $unit" || fail "$unit is not active on $PROXY_NODE"
done
ppid=$(in_proxy "systemctl show -p MainPID --value berth-proxy")
[ "$(in_proxy "stat -c %U /proc/$ppid")" = berth-proxy ] || fail "berth-proxy does not run as the berth-proxy user"
in_proxy "grep -E '^Cap(Eff|Bnd):' /proc/$ppid/status" >"$WORK/proxy-caps"
if ! grep -q "CapEff:.*0000000000000400" "$WORK/proxy-caps" || ! grep -q "CapBnd:.*0000000000000400" "$WORK/proxy-caps"; then
    cat "$WORK/proxy-caps"
    fail "berth-proxy has capabilities beyond CAP_NET_BIND_SERVICE"
fi
# The agent wrote the config and berth-proxy (not the agent) loaded it.
rev=$(node_field applied_revision $PROXY_NODE)
wait_for 20 "berth-proxy loaded the agent's config" \
    "in_proxy 'curl -fsS http://127.0.0.1:9180/metrics' | grep -q '^berth_proxy_config_revision [1-9]'"
in_proxy "curl -sS -o /dev/null -w '%{http_code}' -H 'Host: nosuch.example' http://127.0.0.1/" | grep -qx 404 ||
    fail "berth-proxy does not answer on port 80"
pass "berth-proxy runs as berth-proxy with only CAP_NET_BIND_SERVICE, serves port 80, loaded revision ${rev}"

step "the two servers form a mesh"
wait_for 30 "WireGuard handshakes between $NODE and $PROXY_NODE" \
    "in_node 'wg show berth0 latest-handshakes' | awk '\$2 > 0' | grep -q . && in_proxy 'wg show berth0 latest-handshakes' | awk '\$2 > 0' | grep -q ."

step "systemd-analyze verify on every unit"
podman cp "$WORK/bin/cp" "$CTR:/usr/local/bin/berth-control-plane"
podman cp "$WORK/bin/v1/berth-proxy" "$CTR:/usr/local/bin/berth-proxy"
for u in "$ROOT"/systemd/*.service; do podman cp "$u" "$CTR:/root/$(basename "$u")"; done
in_node "useradd --system berth-proxy 2>/dev/null; cd /root && systemd-analyze verify berth-*.service" ||
    fail "systemd-analyze verify"
in_node "userdel berth-proxy; rm /usr/local/bin/berth-control-plane /usr/local/bin/berth-proxy /root/berth-*.service"
pass "berth-agent, berth-proxy, berth-wireguard and berth-control-plane units verify"

step "setup.sh again: nothing changes"
before="$(agent_pid) $(wg_pid) $(in_node 'stat -c %Y /usr/local/bin/berth-agent /etc/systemd/system/berth-agent.service /etc/berth/agent.env')"
in_node "curl -sSL --cacert /root/berth-ca.pem $CP_URL/setup.sh | bash" | tee "$WORK/setup-2.log"
grep -q "nothing changed" "$WORK/setup-2.log" || fail "setup.sh changed something on the second run"
after="$(agent_pid) $(wg_pid) $(in_node 'stat -c %Y /usr/local/bin/berth-agent /etc/systemd/system/berth-agent.service /etc/berth/agent.env')"
[ "$before" = "$after" ] || fail "pids or files changed: $before -> $after"
pass "same agent and wireguard-go pids, same files"

step "update.sh to $V2"
wg_before=$(wg_pid)
in_node "curl -sSL --cacert /root/berth-ca.pem $CP_URL/update.sh | bash -s -- --version $V2"
wait_for 20 "$NODE reports $V2" "[ \"\$(node_field agent_version)\" = $V2 ]"
[ "$(wg_pid)" = "$wg_before" ] || fail "wireguard-go was restarted by the upgrade"
in_node "ip link show berth0 >/dev/null" || fail "berth0 went away"
in_node "test -x /usr/local/bin/berth-agent.prev" || fail "no previous binary kept"
pass "the tunnel (wireguard-go pid $wg_before, berth0) survived; berth-agent.prev kept"

step "update.sh to a build that fails to start: reverted by itself"
set +e
in_node "/usr/local/lib/berth/update.sh --version broken --timeout 15" >"$WORK/update-broken.log" 2>&1
rc=$?
set -e
cat "$WORK/update-broken.log"
[ $rc -ne 0 ] || fail "update.sh to a broken build succeeded"
grep -q "reverted" "$WORK/update-broken.log" || fail "update.sh did not say it reverted"
wait_for 20 "$NODE reports $V2 again" "[ \"\$(node_field agent_version)\" = $V2 ]"
[ "$(installed_sum)" = "$(sum_of "$WORK/bin/v2/berth-agent")" ] || fail "the previous binary is not back"
in_node "test -f /var/lib/berth/upgrade-failed-broken" || fail "no record of the failed upgrade"

step "tampered builds are refused"
for v in tampered badsig; do
    set +e
    out=$(in_node "/usr/local/lib/berth/update.sh --version $v" 2>&1)
    rc=$?
    set -e
    [ $rc -ne 0 ] || fail "update.sh installed the $v build"
    case $v in
    tampered) echo "$out" | grep -q "does not match the signed manifest" || { echo "$out"; fail "no checksum error"; } ;;
    badsig) echo "$out" | grep -q "not signed by the pinned release key" || { echo "$out"; fail "no signature error"; } ;;
    esac
    [ "$(installed_sum)" = "$(sum_of "$WORK/bin/v2/berth-agent")" ] || fail "$v changed the binary"
    pass "$v: refused ($(echo "$out" | tail -n 1))"
done

step "berth nodes upgrade: the control plane asks the node to run $V1"
berth nodes upgrade --version "$V1" --canary "$NODE"
wait_for 60 "$NODE reports $V1" "[ \"\$(node_field agent_version)\" = $V1 ]"
set +e
out=$(berth nodes upgrade --version nosuch 2>&1)
rc=$?
set -e
if [ $rc -eq 0 ] || ! echo "$out" | grep -q "version: no signed release nosuch"; then
    echo "$out"
    fail "unknown version accepted"
fi
pass "unknown version refused: $out"

step "uninstall.sh --purge removes what setup.sh added"
in_node "/usr/local/lib/berth/uninstall.sh --purge"
for path in /usr/local/bin/berth-agent /etc/berth/agent.env /etc/berth/release.pub /usr/local/lib/berth /var/lib/berth \
    /etc/systemd/system/berth-agent.service /etc/systemd/system/berth-wireguard.service /etc/sysctl.d/90-berth.conf; do
    in_node "! test -e $path" || fail "$path is still there"
done
in_node "! ip link show berth0 2>/dev/null && ! nft list table inet berth 2>/dev/null && ! grep -qxE 'wireguard-go|berth-agent' /proc/[0-9]*/comm" ||
    fail "something still runs"
pass "binaries, units, settings, data, berth0, nftables table and processes are gone"

echo
echo "fresh-server test passed"
