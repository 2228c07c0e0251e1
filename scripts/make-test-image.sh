#!/usr/bin/env bash
# Builds Berth's test image without a registry: a rootfs around Debian's
# statically linked busybox (package busybox-static), imported with
# `podman import` as localhost/berth-test/busybox:latest.
#
# Usage: make-test-image.sh [--force] [PODMAN FLAGS...]
#   PODMAN FLAGS are passed to every podman call (e.g. --root DIR --runroot DIR
#   --storage-driver vfs); PODMAN_OPTS (split on spaces) is prepended to them.
#   Without --force nothing is done when the image already exists.
#
# The image serves HTTP with its default command,
#   busybox httpd -f -p 8080 -h /www
# /www/index.html is a static page, /www/cgi-bin/env prints the environment
# (so tests can see the container's env and $HOSTNAME) and
# /www/cgi-bin/hostname prints the hostname, /www/cgi-bin/sse streams two
# server-sent events (the second once /tmp/sse-go exists).
set -euo pipefail

image=localhost/berth-test/busybox:latest
force=0
podman_flags=()
if [ -n "${PODMAN_OPTS:-}" ]; then
    read -r -a podman_flags <<<"$PODMAN_OPTS"
fi
for arg in "$@"; do
    case "$arg" in
    --force) force=1 ;;
    *) podman_flags+=("$arg") ;;
    esac
done

pm() { podman "${podman_flags[@]}" "$@"; }

if [ "$force" -eq 0 ] && pm image exists "$image"; then
    echo "$image already exists" >&2
    exit 0
fi

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
chmod 0755 "$root/www/cgi-bin/env" "$root/www/cgi-bin/hostname" "$root/www/cgi-bin/sse"

tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$work/rootfs.tar" .
pm import \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /' \
    --change 'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]' \
    --quiet \
    --message 'berth test image (busybox-static)' \
    "$work/rootfs.tar" "$image" >/dev/null
echo "built $image" >&2
