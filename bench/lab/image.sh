#!/usr/bin/env bash
# What one lab node pays to get the test image: the per-node import the lab
# used to do (scripts/make-test-image.sh into fresh storage) against the
# pull from the lab's fleet registry it does now, ROUNDS times each.
# Prints figures; asserts nothing.
#
#   target/debug/berth-lab up --nodes 2 --id 7 --dir /tmp/berth-lab-7 --no-demo
#   bench/lab/image.sh [LAB_ID] [LAB_DIR] [ROUNDS]
#   target/debug/berth-lab down --id 7 --dir /tmp/berth-lab-7
set -euo pipefail
cd "$(dirname "$0")/../.."
id=${1:-7}
dir=${2:-/tmp/berth-lab-$id}
rounds=${3:-3}
image="198.18.$id.1:5000/berth-test/busybox:latest"
creds="admin:$(cat "$dir/cp/admin.token")"
certs="$dir/registry-certs"   # the lab wrote the CA there at lab up
[ -f "$certs/ca.crt" ] || { echo "no lab at $dir (run berth-lab up first)" >&2; exit 1; }

ms() { echo $(( $(date +%s%N) / 1000000 )); }
fresh() {
    local d
    d=$(mktemp -d /tmp/berth-image-bench.XXXXXX)
    echo "$d"
}
flags() { echo "--root $1/root --runroot $1/run --cgroup-manager cgroupfs --runtime runc --events-backend file"; }
gone() {
    # shellcheck disable=SC2046
    podman $(flags "$1") rmi -a -f >/dev/null 2>&1 || true
    umount -R "$1/root/overlay" 2>/dev/null || true
    rm -rf "$1"
}

for i in $(seq "$rounds"); do
    a=$(fresh)
    t0=$(ms)
    # shellcheck disable=SC2046
    bash scripts/make-test-image.sh --ws-echo target/debug/berth-ws-echo $(flags "$a") >/dev/null 2>&1
    t1=$(ms)
    b=$(fresh)
    # shellcheck disable=SC2046
    podman $(flags "$b") pull --quiet --cert-dir "$certs" --creds "$creds" "$image" >/dev/null
    t2=$(ms)
    echo "round $i: import $((t1 - t0)) ms, pull from the fleet registry $((t2 - t1)) ms"
    gone "$a"
    gone "$b"
done
