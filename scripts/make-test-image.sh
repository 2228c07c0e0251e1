#!/usr/bin/env bash
# Builds Berth's test image without a registry: a rootfs around Debian's
# statically linked busybox (package busybox-static), imported with
# `podman import` as localhost/berth-test/busybox:latest.
#
# Usage: make-test-image.sh [--force] [--ws-echo PATH] [PODMAN FLAGS...]
#   PODMAN FLAGS are passed to every podman call (e.g. --root DIR --runroot DIR
#   --storage-driver vfs); PODMAN_OPTS (split on spaces) is prepended to them.
#   Without --force nothing is done when the image already exists and was
#   built from the same contents: the image carries the label
#   berth.test-image.hash, the SHA-256 of its root filesystem (made
#   reproducibly) and its config, so a changed script, busybox or
#   berth-ws-echo gives a new hash and the image is built again.
#   --ws-echo PATH (or BERTH_WS_ECHO=PATH) puts that berth-ws-echo binary
#   (crate ws-echo/, built with the workspace) into the image, with the shared
#   libraries `ldd` lists for it.
#
# The image's default command, /bin/serve, starts `berth-ws-echo 8081` (a
# WebSocket echo server) when the image has it and then runs
#   busybox httpd -f -p 8080 -h /www
# as PID 1 (exec). /www/index.html is a static page, /www/cgi-bin/env prints
# the environment (so tests can see the container's env and $HOSTNAME) and
# /www/cgi-bin/hostname prints the hostname, /www/cgi-bin/sse streams two
# server-sent events (the second once /tmp/sse-go exists) and
# /www/cgi-bin/slow answers `slow done` after 3 s (or after $QUERY_STRING
# seconds when that is a number: /cgi-bin/slow?0.5).
set -euo pipefail

image=localhost/berth-test/busybox:latest
force=0
ws_echo=${BERTH_WS_ECHO:-}
podman_flags=()
if [ -n "${PODMAN_OPTS:-}" ]; then
    read -r -a podman_flags <<<"$PODMAN_OPTS"
fi
while [ "$#" -gt 0 ]; do
    case "$1" in
    --force) force=1 ;;
    --ws-echo)
        [ "$#" -ge 2 ] || { echo "make-test-image.sh: --ws-echo needs a path" >&2; exit 2; }
        ws_echo=$2
        shift
        ;;
    --ws-echo=*) ws_echo=${1#--ws-echo=} ;;
    *) podman_flags+=("$1") ;;
    esac
    shift
done
if [ -n "$ws_echo" ] && [ ! -x "$ws_echo" ]; then
    echo "make-test-image.sh: $ws_echo is not an executable (build it: cargo build -p berth-ws-echo)" >&2
    exit 1
fi

pm() { podman "${podman_flags[@]}" "$@"; }

busybox=""
for candidate in /bin/busybox /usr/bin/busybox; do
    if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
        busybox=$candidate
        break
    fi
done
if [ -z "$busybox" ]; then
    echo "make-test-image.sh: no statically linked busybox; install busybox-static (scripts/podman-setup.sh)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,run,var/tmp,www/cgi-bin}
chmod 1777 "$root/tmp" "$root/var/tmp"
cp "$busybox" "$root/bin/busybox"
# The equivalent of `busybox --install -s`, without running in a chroot.
while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/www:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
www-data:x:33:
nogroup:x:65534:
GROUP
: >"$root/etc/hosts"
: >"$root/etc/resolv.conf"

cat >"$root/www/index.html" <<'HTML'
<!doctype html>
<title>berth test</title>
<p>berth test image: see /cgi-bin/env and /cgi-bin/hostname</p>
HTML
cat >"$root/www/cgi-bin/env" <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
env
CGI
cat >"$root/www/cgi-bin/hostname" <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
hostname
CGI
# Server-sent events: one event, then (once /tmp/sse-go exists in the
# container) a second; tests see whether the first arrives while the script
# still waits, i.e. unbuffered.
cat >"$root/www/cgi-bin/sse" <<'CGI'
#!/bin/sh
printf 'Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n'
printf 'data: first\n\n'
n=0
while [ ! -f /tmp/sse-go ] && [ "$n" -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
printf 'data: second\n\n'
CGI
# A slow response: 3 s, or $QUERY_STRING seconds if it is a number (an
# integer or a decimal such as 0.5), then `slow done`. For requests that are
# in flight while a replica is replaced.
cat >"$root/www/cgi-bin/slow" <<'CGI'
#!/bin/sh
seconds=3
if printf '%s' "$QUERY_STRING" | grep -Eq '^[0-9]+(\.[0-9]+)?$'; then
    seconds=$QUERY_STRING
fi
sleep "$seconds"
printf 'Content-Type: text/plain\r\n\r\n'
printf 'slow done\n'
CGI
chmod 0755 "$root/www/cgi-bin/env" "$root/www/cgi-bin/hostname" "$root/www/cgi-bin/sse" "$root/www/cgi-bin/slow"

# The WebSocket echo server: the binary (without its debug info) and the
# shared libraries it loads, at the paths the binary names (the interpreter
# /lib64/ld-linux-x86-64.so.2, libc, libgcc_s).
if [ -n "$ws_echo" ]; then
    if ! strip --strip-debug -o "$root/bin/berth-ws-echo" "$ws_echo" 2>/dev/null; then
        cp "$ws_echo" "$root/bin/berth-ws-echo"
    fi
    chmod 0755 "$root/bin/berth-ws-echo"
    # `ldd` fails for a static binary: then there is nothing to copy.
    libs=$(ldd "$ws_echo" 2>/dev/null | grep -o '/[^ ]*' || true)
    for lib in $libs; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
fi
cat >"$root/bin/serve" <<'SERVE'
#!/bin/sh
# The image's default command: the WebSocket echo on 8081 (if the image has
# it) in the background, busybox httpd on 8080 as PID 1.
if [ -x /bin/berth-ws-echo ]; then
    /bin/berth-ws-echo 8081 &
fi
exec /bin/busybox httpd -f -p 8080 -h /www
SERVE
chmod 0755 "$root/bin/serve"

# Reproducible: names sorted, one mtime, no owners but root, GNU format (no
# pax atime/ctime headers), so the same contents give the same bytes.
tar --sort=name --mtime=@0 --format=gnu --numeric-owner --owner=0 --group=0 \
    -C "$root" -cf "$work/rootfs.tar" .
changes=(
    'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin'
    'WORKDIR /'
    'CMD ["/bin/serve"]'
)
hash=$({ cat "$work/rootfs.tar"; printf '%s\n' "${changes[@]}"; } | sha256sum | cut -d' ' -f1)
hash_label=berth.test-image.hash

if [ "$force" -eq 0 ] && pm image exists "$image"; then
    have=$(pm image inspect --format "{{index .Labels \"$hash_label\"}}" "$image" 2>/dev/null || true)
    if [ "$have" = "$hash" ]; then
        echo "$image already exists (same contents)" >&2
        exit 0
    fi
    echo "$image exists but was built from other contents: building it again" >&2
fi

change_args=()
for c in "${changes[@]}" "LABEL $hash_label=$hash"; do
    change_args+=(--change "$c")
done
pm import \
    "${change_args[@]}" \
    --quiet \
    --message 'berth test image (busybox-static)' \
    "$work/rootfs.tar" "$image" >/dev/null
echo "built $image${ws_echo:+ (with berth-ws-echo)}" >&2
