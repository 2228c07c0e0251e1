#!/usr/bin/env bash
# DNS throughput: the agent's DNS server against dnsmasq, same 50 names, same queries.
#
# Both serve svc0..svc49.<zone> with two A records each, on loopback port 5353; dnsperf
# sends the same query file to each for DURATION seconds. With two or more CPUs the
# server is pinned to CPU 0 and dnsperf to CPU 1, so each gets a core. Prints QPS, lost
# queries, latency and the server's CPU use per run, then the ratio of mean QPS.
#
# Usage: bench/dns/run.sh            (as root: installs packages, binds 127.0.0.x)
# Env:   DURATION=15 ROUNDS=3 AGENT_ADDR=127.0.0.71 DNSMASQ_ADDR=127.0.0.72 PORT=5353
#        MT=1 also runs the agent server on a multi-thread tokio runtime (1 worker).
set -euo pipefail

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
AGENT_ADDR=${AGENT_ADDR:-127.0.0.71}
DNSMASQ_ADDR=${DNSMASQ_ADDR:-127.0.0.72}
PORT=${PORT:-5353}
ZONE=internal
NAMES=50
MT=${MT:-0}

root=$(cd "$(dirname "$0")/../.." && pwd)

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need dnsperf || missing+=(dnsperf)
# dnsmasq-base is the dnsmasq binary without the system service (which would start a
# resolver on port 53 of every interface).
need dnsmasq || missing+=(dnsmasq-base)
need dig || missing+=(bind9-dnsutils)
need taskset || missing+=(util-linux)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

echo "building the agent's dns_serve example (release)" >&2
(cd "$root" && cargo build -q --release -p berth-agent --example dns_serve)
serve_bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/dns_serve"

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

for ((i = 0; i < NAMES; i++)); do
    echo "svc$i.$ZONE A" >>"$tmp/queries"
    # The same addresses dns_serve uses: 10.200.i.1 (local), 10.200.i.2 (remote).
    printf '10.200.%d.1 svc%d.%s\n10.200.%d.2 svc%d.%s\n' "$i" "$i" "$ZONE" "$i" "$i" "$ZONE" >>"$tmp/hosts"
done

if (($(nproc) >= 2)); then
    server_cpu=(taskset -c 0)
    client_cpu=(taskset -c 1)
    pinning="server on CPU 0, dnsperf on CPU 1"
else
    server_cpu=()
    client_cpu=()
    pinning="one CPU: no pinning"
fi

# Waits until $1:$PORT answers svc0 with two addresses, else fails.
wait_ready() {
    for _ in $(seq 50); do
        if [ "$(dig +short +tries=1 +time=1 @"$1" -p "$PORT" "svc0.$ZONE" A | wc -l)" = 2 ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "server on $1:$PORT is not answering" >&2
    return 1
}

start_server() { # name → sets server_pid
    case "$1" in
    berth)
        "${server_cpu[@]}" "$serve_bin" --listen "$AGENT_ADDR:$PORT" --zone "$ZONE" --names "$NAMES" --threads 0 \
            >"$tmp/berth.log" 2>&1 &
        ;;
    berth-mt)
        "${server_cpu[@]}" "$serve_bin" --listen "$AGENT_ADDR:$PORT" --zone "$ZONE" --names "$NAMES" --threads 1 \
            >"$tmp/berth.log" 2>&1 &
        ;;
    dnsmasq)
        "${server_cpu[@]}" dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$tmp/hosts" \
            --local="/$ZONE/" --local-ttl=5 --listen-address="$DNSMASQ_ADDR" --bind-interfaces --port="$PORT" \
            --user=root --group=root --pid-file= >"$tmp/dnsmasq.log" 2>&1 &
        ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
}

addr_of() { case "$1" in dnsmasq) echo "$DNSMASQ_ADDR" ;; *) echo "$AGENT_ADDR" ;; esac }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

servers=(berth dnsmasq)
((MT)) && servers=(berth berth-mt dnsmasq)

echo "dnsperf $(dnsperf -h 2>&1 | grep -o 'Version [0-9.]*' | head -1 || true), dnsmasq $(dnsmasq --version | head -1 | awk '{print $3}')"
echo "$(nproc) CPUs ($pinning); $NAMES names x 2 A records; ${DURATION}s per run; $ROUNDS rounds"
echo "dnsperf -d <50 queries> -l $DURATION -c 1 -q 100 (1 socket, up to 100 queries outstanding)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the host skews the figures)"
echo
printf '%-6s %-9s %12s %10s %8s %13s %11s\n' round server QPS completed lost "avg lat (ms)" "server CPU"

declare -A qps_sum
for s in "${servers[@]}"; do qps_sum[$s]=0; done
for ((round = 1; round <= ROUNDS; round++)); do
    for s in "${servers[@]}"; do
        start_server "$s"
        addr=$(addr_of "$s")
        wait_ready "$addr"
        hz=$(getconf CLK_TCK)
        before=$(cpu_ticks "$server_pid")
        "${client_cpu[@]}" dnsperf -s "$addr" -p "$PORT" -d "$tmp/queries" -l "$DURATION" -c 1 -q 100 \
            >"$tmp/perf.out" 2>&1
        after=$(cpu_ticks "$server_pid")
        kill "$server_pid"
        wait "$server_pid" 2>/dev/null || true
        qps=$(awk '/Queries per second/ {print $4}' "$tmp/perf.out")
        completed=$(awk '/Queries completed/ {print $3}' "$tmp/perf.out")
        lost=$(awk '/Queries lost/ {print $3}' "$tmp/perf.out")
        lat=$(awk '/Average Latency/ {printf "%.3f", $4 * 1000}' "$tmp/perf.out")
        if [ -z "$qps" ]; then
            cat "$tmp/perf.out" >&2
            exit 1
        fi
        cpu=$(awk -v t=$((after - before)) -v hz="$hz" -v d="$DURATION" 'BEGIN {printf "%.0f%%", 100 * t / hz / d}')
        printf '%-6s %-9s %12.0f %10s %8s %13s %11s\n' "$round" "$s" "$qps" "$completed" "$lost" "$lat" "$cpu"
        qps_sum[$s]=$(awk -v a="${qps_sum[$s]}" -v b="$qps" 'BEGIN {print a + b}')
    done
done

echo
for s in "${servers[@]}"; do
    awk -v s="$s" -v q="${qps_sum[$s]}" -v n="$ROUNDS" -v d="${qps_sum[dnsmasq]}" \
        'BEGIN {printf "%-9s mean %10.0f QPS  = %.2fx dnsmasq\n", s, q / n, q / d}'
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
