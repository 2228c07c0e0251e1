#!/usr/bin/env bash
# Removes what Berth's setup.sh added to this server. Installed by setup.sh as
# /usr/local/lib/berth/uninstall.sh; also served at https://CONTROL_PLANE/uninstall.sh.
#
#   sudo /usr/local/lib/berth/uninstall.sh           # keeps /var/lib/berth (node identity)
#   sudo /usr/local/lib/berth/uninstall.sh --purge   # removes it too
#
# Stops and removes the Berth services, their units, binaries and settings,
# Berth's containers and Podman network, its nftables table and WireGuard
# interface. Packages (Podman, WireGuard tools, ...) stay: other software may
# use them. Remove the node from the fleet on the control plane with
# `berth nodes remove NAME`.
set -euo pipefail

PURGE=false
case "${1:-}" in
--purge) PURGE=true ;;
"") ;;
-h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
*) echo "uninstall.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: must run as root" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }

say "stopping the Berth services"
for unit in berth-agent berth-proxy berth-wireguard; do
    if systemctl list-unit-files -q "$unit.service" >/dev/null 2>&1; then
        systemctl disable -q --now "$unit.service" 2>/dev/null || true
    fi
done
# KillMode=process leaves the agent's helpers running on purpose; not now.
for comm in /proc/[0-9]*/comm; do
    if [ "$(cat "$comm" 2>/dev/null)" = berth-proxy ]; then
        pid=${comm#/proc/}
        kill "${pid%/comm}" 2>/dev/null || true
    fi
done

if command -v podman >/dev/null; then
    say "removing Berth's containers and network"
    mapfile -t ids < <(podman ps -aq --filter label=io.berth.owner=berth 2>/dev/null || true)
    if [ ${#ids[@]} -gt 0 ]; then
        podman rm -f -t 5 "${ids[@]}" >/dev/null
    fi
    podman network rm -f berth >/dev/null 2>&1 || true
fi

say "removing the firewall table and the mesh interface"
nft delete table inet berth 2>/dev/null || true
ip link del berth0 2>/dev/null || true
rm -f /var/run/wireguard/berth0.sock

say "removing units, binaries and settings"
rm -f /etc/systemd/system/berth-agent.service /etc/systemd/system/berth-proxy.service \
    /etc/systemd/system/berth-wireguard.service
systemctl daemon-reload
rm -f /usr/local/bin/berth-agent /usr/local/bin/berth-agent.prev \
    /usr/local/bin/berth-proxy /usr/local/bin/berth-proxy.prev
rm -f /etc/berth/ca.pem /etc/berth/release.pub /etc/berth/agent.env
rmdir /etc/berth 2>/dev/null || true # control-plane.env of a control plane on this host stays
rm -rf /usr/local/lib/berth
rm -f /etc/sysctl.d/90-berth.conf /etc/containers/containers.conf.d/90-berth.conf
if id berth-proxy >/dev/null 2>&1; then
    userdel berth-proxy 2>/dev/null || true
fi
if $PURGE; then
    rm -rf /var/lib/berth
    say "removed /var/lib/berth (node identity, cached state, volumes)"
else
    say "kept /var/lib/berth (node identity and volumes); --purge removes it"
fi
echo "Berth is removed from this server. On the control plane: berth nodes remove <name>"
