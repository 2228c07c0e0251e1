#!/usr/bin/env bash
# Installs Podman and what Berth needs around it on Debian 12 (run as root), and
# configures it for this kind of machine: cgroups v1 (hybrid) where crun fails,
# no systemd-managed cgroups, no journald events, low default ulimits.
# Idempotent: packages already present are left alone and the drop-in config is
# only rewritten when its content changes.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "podman-setup.sh: run as root" >&2
    exit 1
fi

have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

need=()
have podman || need+=(podman)
have runc || need+=(runc)
have conmon || need+=(conmon)
# Bridge networks: netavark (Podman 4's default network backend). Its firewall
# rules go through iptables (iptables-nft on Debian 12).
installed netavark || need+=(netavark)
have iptables || need+=(iptables)
# uidmap (newuidmap/newgidmap) for rootless use; harmless for root.
have newuidmap || need+=(uidmap)
# The statically linked busybox is what test images are built from
# (scripts/make-test-image.sh). It replaces the dynamic `busybox` package.
installed busybox-static || need+=(busybox-static)

if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# Podman (containers/common) reads /etc/containers/containers.conf and then every
# *.conf in /etc/containers/containers.conf.d/ in lexical order; later files
# override single keys, so a drop-in leaves the rest of the system config alone.
dropin_dir=/etc/containers/containers.conf.d
dropin="$dropin_dir/50-berth.conf"
want=$(
    cat <<'CONF'
# Written by Berth (scripts/podman-setup.sh). Changes are overwritten.
# cgroups v1 (hybrid) host: crun fails here, systemd cgroups are not used, and
# the default ulimits of the host are too high for runc to apply.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
# Debian's podman package ships a CNI config in /etc/cni/net.d, which would make
# a fresh storage root pick the CNI backend (whose plugins are not installed).
network_backend = "netavark"
CONF
)
mkdir -p "$dropin_dir"
if [ ! -f "$dropin" ] || [ "$(cat "$dropin")" != "$want" ]; then
    printf '%s\n' "$want" >"$dropin.tmp"
    mv "$dropin.tmp" "$dropin"
    echo "wrote $dropin" >&2
fi

# Check that Podman picked the settings up (a Podman without drop-in support,
# older than 4.x, would ignore the file; containers.conf.d works on 4.3).
got=$(podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Host.EventLogger}} {{.Host.NetworkBackend}}')
if [ "$got" != "runc cgroupfs file netavark" ]; then
    echo "podman-setup.sh: Podman does not apply $dropin (runtime, cgroups, events, network: $got)" >&2
    exit 1
fi

podman version --format '{{.Client.Version}}'
