#!/usr/bin/env bash
# The transport floor under a status report: what the control plane's CPU
# spends per request on TLS, HTTP/2 and the socket alone.
#
# Starts berth-control-plane on loopback with a fresh data directory and
# sends it `GET /healthz` (a handler that returns a constant) with h2load:
# CONNS HTTP/2 connections over TLS, one request at a time on each, at RATES
# requests a second per connection. A fleet's agents keep one connection
# each and report every 10 s, so CONNS=1000 at 0.1 is 1,000 agents'
# heartbeats; bench-cp-scale's second window is 0.5. Each rate runs twice:
# in bursts (h2load fires every connection's requests at the same ticks,
# so one wake-up of the control plane serves many) and spread (the
# connections start 10 ms apart in groups, so requests arrive spread over
# time, as a fleet's do, and most wake the control plane alone). Printed:
# the control plane's CPU (utime + stime from /proc) per request over
# MEASURE seconds, once every connection is open. A status report costs
# this plus what bench-status-report prints (the control plane's own code).
#
# Usage: bench/transport-floor.sh    (installs nghttp2-client for h2load)
# Env:   CONNS=1000 RATES="0.1 0.5 2.5" WARMUP=5 MEASURE=20 PORT=39555
set -euo pipefail

CONNS=${CONNS:-1000}
RATES=${RATES:-0.1 0.5 2.5}
WARMUP=${WARMUP:-5}
MEASURE=${MEASURE:-20}
PORT=${PORT:-39555}

root=$(cd "$(dirname "$0")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$root/target}/release/berth-control-plane"

if ! command -v h2load >/dev/null 2>&1; then
    echo "installing nghttp2-client (h2load)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >&2
fi
echo "building berth-control-plane (release)" >&2
(cd "$root" && cargo build -q --release -p berth-control-plane)
ulimit -n 65536 2>/dev/null || true

dir=$(mktemp -d /tmp/berth-transport-floor-XXXXXX)
cp_pid=
cleanup() {
    [ -n "$cp_pid" ] && kill "$cp_pid" 2>/dev/null && wait "$cp_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
"$bin" serve --data-dir "$dir/data" --listen "127.0.0.1:$PORT" >"$dir/cp.log" 2>&1 &
cp_pid=$!
for _ in $(seq 1 100); do
    curl -skf "https://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    kill -0 "$cp_pid" 2>/dev/null || { cat "$dir/cp.log" >&2; exit 1; }
    sleep 0.1
done

tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$cp_pid/stat"; }

# Runs h2load ("$@") in the background, samples the control plane's CPU
# from $1 s to $1 + MEASURE s, waits for h2load, prints a line for $2.
measure() {
    local from=$1 label=$2 rate=$3
    shift 3
    h2load "$@" >"$dir/h2load.log" 2>&1 &
    local load=$!
    sleep "$from"
    local before t0 after t1 failed
    before=$(cpu_ticks)
    t0=$(date +%s.%N)
    sleep "$MEASURE"
    after=$(cpu_ticks)
    t1=$(date +%s.%N)
    wait "$load" || { cat "$dir/h2load.log" >&2; exit 1; }
    failed=$(awk '/^requests:/ {print $10 + $12 + $14}' "$dir/h2load.log")
    awk -v r="$rate" -v c="$CONNS" -v b="$before" -v a="$after" -v t="$tck" -v t0="$t0" -v t1="$t1" \
        -v f="$failed" -v l="$label" 'BEGIN {
        wall = t1 - t0; reqs = r * c * wall; cpu = (a - b) / t
        printf "  %5.1f requests/s per connection (%6.0f/s), %-6s: control plane CPU %.2f s over %.1f s = %5.1f µs per request; %d failed\n",
            r, r * c, l, cpu, wall, cpu * 1e6 / reqs, f
    }'
}

echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "h2load: $CONNS connections over TLS (HTTP/2), GET /healthz, one request at a time on each"
echo "  bursts: every connection's requests fire at the same ticks (h2load's --rps), so one wake-up serves many"
echo "  spread: the connections start 10 ms apart in groups, so requests arrive spread over time, as a fleet's do"
url="https://127.0.0.1:$PORT/healthz"
for rate in $RATES; do
    measure "$WARMUP" bursts "$rate" -c "$CONNS" -m 1 --rps "$rate" -D $((WARMUP + MEASURE + 2)) "$url"
    # Connections created per 10 ms so that all start within one request
    # period; each makes enough requests to last past the window.
    per=$(awk -v c="$CONNS" -v r="$rate" 'BEGIN { n = int(c * r / 100 + 0.999); print (n < 1 ? 1 : n) }')
    ramp=$(awk -v c="$CONNS" -v p="$per" 'BEGIN { print int(c / p / 100 + 0.999) }')
    each=$(awk -v r="$rate" -v s=$((ramp + MEASURE + 3)) 'BEGIN { print int(r * s + 1.999) }')
    measure $((ramp + 1)) spread "$rate" -c "$CONNS" -m 1 --rps "$rate" -r "$per" --rate-period 10ms \
        -n $((each * CONNS)) "$url"
done
