#!/usr/bin/env bash
# Builds Berth in release mode and runs the five benchmarks in order:
# bench-convergence, bench-cp-scale, bench-agent-idle, bench-services, bench-rollout. They print figures;
# none of them asserts on timing. Each cleans up what it made (labs 90/91,
# the control plane it started, temporary directories), also on Ctrl-C.
# bench-services and bench-rollout need Podman (scripts/podman-setup.sh);
# bench-rollout also Pebble (scripts/install-deps.sh installs both).
#
# Needs root (the labs build network namespaces) and wireguard-go.
# Extra flags per benchmark: CONVERGENCE_ARGS, CP_SCALE_ARGS, AGENT_IDLE_ARGS, SERVICES_ARGS,
# ROLLOUT_ARGS,
# e.g.  CP_SCALE_ARGS="--agents 500" bench/run-all.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ "$(id -u)" != 0 ]; then
    echo "run-all.sh: run as root (the labs create network namespaces)" >&2
    exit 1
fi
# bench-cp-scale keeps ~2 connections per simulated agent open on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
echo "open-file limit: $(ulimit -n)"

cargo build --release --workspace || exit 1
bin="${CARGO_TARGET_DIR:-target}/release"

echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"

failed=()
run() {
    local name="$1"
    shift
    echo
    echo "################ $name $* (load average: $(cut -d" " -f1-3 /proc/loadavg))"
    if ! "$bin/$name" "$@"; then
        failed+=("$name")
    fi
}

# shellcheck disable=SC2086 # word splitting of the *_ARGS variables is wanted
run bench-convergence ${CONVERGENCE_ARGS:-}
# shellcheck disable=SC2086
run bench-cp-scale ${CP_SCALE_ARGS:-}
# shellcheck disable=SC2086
run bench-agent-idle ${AGENT_IDLE_ARGS:-}
# shellcheck disable=SC2086
run bench-services ${SERVICES_ARGS:-}
# shellcheck disable=SC2086
run bench-rollout ${ROLLOUT_ARGS:-}

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "run-all.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "run-all.sh: all five benchmarks ran"
