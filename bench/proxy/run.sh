#!/usr/bin/env bash
# HTTPS reverse proxying: berth-proxy against nginx (1 worker) and Caddy, same upstream,
# same certificate, same load, in $ROUNDS interleaved rounds.
#
# Everything runs inside a private network namespace made by this script ($NS), on its
# loopback only; /etc/netns/$NS/hosts maps bench.example.com to 127.0.0.1 there, so the
# load generator connects to https://bench.example.com/ and sends that name as SNI.
# Nothing listens outside the namespace.
#
#   upstream   nginx, 2 workers, 127.0.0.1:8080, HTTP/1.1 keep-alive, a fixed 128-byte body
#              (pinned to CPU $UPSTREAM_CPUS, default 1 = the load generator's core)
#   proxy      one at a time on 127.0.0.1:443, TLS 1.3 only, the same P-256 leaf signed by a
#              CA made here, pinned to CPU 0; access logs off for all three
#   load       wrk -t1 -c$CONNS pinned to CPU 1
#
# Rounds: on a shared machine the throughput of one run moves by ±30 % with what else the
# host is doing, so one run per proxy, one after the other, is not a fair comparison.
# Phases 1 and 2 below run $ROUNDS times; each round runs every proxy once, in an order
# rotated by one per round (round 1: nginx caddy berth-proxy, round 2: caddy berth-proxy
# nginx, round 3: berth-proxy nginx caddy, …), so each proxy takes each position in turn.
# In each round and for each proxy:
#   1. keep-alive: wrk -t1 -c$CONNS -d${DURATION}s --latency  (the proxy freshly started,
#      after a ${WARMUP}s warm-up)
#   2. new connections: the same with -H 'Connection: close' for ${NEWCONN_DURATION}s, so
#      every request is a fresh TCP connection + full TLS 1.3 handshake (wrk does not resume
#      sessions) → handshakes/s
# Once per proxy, after the rounds (memory does not depend on the other load):
#   3. memory: the proxy restarted, then idle_conns.py opens $IDLE_CONNS TLS connections
#      (one GET each, certificate verified) and holds them idle; VmRSS of the proxy (nginx:
#      master + worker) before and with them open.
# Prints every run, then per proxy the median req/s, p50 and p99 over the rounds (with an
# even number of rounds, the mean of the middle two) and the min–max of req/s, the ratios
# of the medians, the berth-proxy ratios of each round (paired: the proxies of one round run
# within ~90 s of each other, under similar host load), and the targets (berth-proxy ≥ 1.0× nginx req/s,
# ≥ 2× Caddy req/s, p99 ≤ nginx's), judged on the medians, with how many rounds met each:
# met/MISSED, never a failure exit.
#
# Usage: bench/proxy/run.sh          (as root: installs packages, makes a network namespace)
# Env:   ROUNDS=3 DURATION=15 NEWCONN_DURATION=10 WARMUP=3 CONNS=64 IDLE_CONNS=10000
#        PROXIES="nginx caddy berth-proxy" UPSTREAM_CPUS=1 NS=berth-bench-proxy
#        SHOW_CONFIGS=1 prints the generated configs.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15}
NEWCONN_DURATION=${NEWCONN_DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
PROXIES=${PROXIES:-"nginx caddy berth-proxy"}
UPSTREAM_CPUS=${UPSTREAM_CPUS:-1}
NS=${NS:-berth-bench-proxy}
SHOW_CONFIGS=${SHOW_CONFIGS:-0}
DOMAIN=bench.example.com
URL="https://$DOMAIN/"
UPSTREAM=127.0.0.1:8080

root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/bench/proxy"

if ! [[ $ROUNDS =~ ^[1-9][0-9]*$ ]]; then
    echo "ROUNDS must be a positive integer (got '$ROUNDS')" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "run as root (network namespace, packages)" >&2
    exit 1
fi
if (($(nproc) < 2)); then
    echo "needs 2 CPUs (proxy on CPU 0, load generator on CPU 1)" >&2
    exit 1
fi

# --- packages ---------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1; }
missing=()
need nginx || missing+=(nginx)
need caddy || missing+=(caddy)
need wrk || missing+=(wrk)
need python3 || missing+=(python3)
need openssl || missing+=(openssl)
need curl || missing+=(curl)
need taskset || missing+=(util-linux)
need ip || missing+=(iproute2)
need ss || missing+=(iproute2)
need pgrep || missing+=(procps)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    # The packages' own services (nginx on :80 of every interface, caddy on :80) must not run.
    services=()
    for s in nginx caddy; do
        [[ " ${missing[*]} " == *" $s "* ]] && services+=("$s")
    done
    if ((${#services[@]})); then
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "${services[@]}" >&2 || true
        else
            if [[ " ${services[*]} " == *" nginx "* ]]; then
                if [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
                    echo "stopping the nginx service the package started" >&2
                    kill -QUIT "$(cat /run/nginx.pid)" || true
                fi
                update-rc.d nginx disable >/dev/null 2>&1 || true
            fi
        fi
    fi
fi

# --- build ------------------------------------------------------------------------------
echo "building berth-proxy (cargo build --release -p berth-proxy)" >&2
(cd "$root" && cargo build -q --release -p berth-proxy)
berth_bin="${CARGO_TARGET_DIR:-$root/target}/release/berth-proxy"

# --- scratch space, namespace, cleanup --------------------------------------------------
if ip netns list | grep -qw -- "$NS"; then
    echo "network namespace $NS already exists (another run, or one killed with SIGKILL?)." >&2
    echo "remove it with: ip netns pids $NS | xargs -r kill; ip netns del $NS; rm -rf /etc/netns/$NS" >&2
    exit 1
fi
tmp=$(mktemp -d /tmp/berth-bench-proxy.XXXXXX)
pids=()
made_ns=0
cleanup() {
    set +e
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    if ((made_ns)); then
        # Anything still running in our namespace was started by this script.
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        sleep 0.2
        ip netns del "$NS"
    fi
    rm -rf "/etc/netns/$NS" "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$NS"
made_ns=1
mkdir -p "/etc/netns/$NS"
printf '127.0.0.1 localhost\n::1 localhost\n127.0.0.1 %s\n' "$DOMAIN" >"/etc/netns/$NS/hosts"
nsx() { ip netns exec "$NS" "$@"; } # (started in the background: call ip netns exec directly, so $! is the process)
nsx ip link set lo up
# 10,000 idle connections plus TIME_WAIT from the new-connection runs: widen the port range.
nsx sysctl -q -w net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1

# Open files: 10,000 client connections in one process, as many (plus upstream) in the proxy.
# Raised to 65536, or to the hard limit when it is lower and cannot be raised (a container).
nofile=65536
if [ "$(ulimit -Hn)" != unlimited ] && (($(ulimit -Hn) < nofile)); then
    ulimit -Hn "$nofile" 2>/dev/null || nofile=$(ulimit -Hn)
fi
ulimit -Sn "$nofile"
if ((nofile < IDLE_CONNS + 500)); then
    echo "open-file limit $nofile is too low for IDLE_CONNS=$IDLE_CONNS" >&2
    exit 1
fi

# --- certificate: a CA and a P-256 leaf for bench.example.com ---------------------------
(
    cd "$tmp"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=Berth bench CA" -keyout ca.key -out ca.pem \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$DOMAIN" -keyout leaf.key -out leaf.csr 2>/dev/null
    printf 'subjectAltName=DNS:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$DOMAIN" >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile leaf.ext -out leaf.pem 2>/dev/null
    openssl verify -CAfile ca.pem leaf.pem >/dev/null
)

# --- configs ----------------------------------------------------------------------------
body=$(printf 'berth bench upstream %0106d\n' 0) # 128 bytes with the newline
mkdir -p "$tmp/upstream" "$tmp/nginx" "$tmp/caddy/home"
temp_paths() { # nginx temp dirs under $1
    local d
    for d in client_body proxy fastcgi uwsgi scgi; do echo "    ${d}_temp_path $1/${d};"; done
}

cat >"$tmp/upstream/nginx.conf" <<EOF
worker_processes 2;
daemon off;
master_process on;
user root root;
pid $tmp/upstream/nginx.pid;
error_log $tmp/upstream/error.log warn;
worker_rlimit_nofile $nofile;
events { worker_connections 8192; }
http {
    access_log off;
$(temp_paths "$tmp/upstream")
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {
        listen $UPSTREAM reuseport;
        location / {
            default_type text/plain;
            return 200 "$body\n";
        }
    }
}
EOF

cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
user root root;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
worker_rlimit_nofile $nofile;
events { worker_connections $nofile; }
http {
    access_log off;
$(temp_paths "$tmp/nginx")
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    upstream backend {
        server $UPSTREAM;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:443 ssl http2;
        server_name $DOMAIN;
        ssl_certificate $tmp/leaf.pem;
        ssl_certificate_key $tmp/leaf.key;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
}
EOF

cat >"$tmp/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $tmp/caddy/data
    servers {
        protocols h1 h2
        timeouts {
            idle 300s
        }
    }
}
https://$DOMAIN:443 {
    bind 127.0.0.1
    tls $tmp/leaf.pem $tmp/leaf.key {
        protocols tls1.3
    }
    reverse_proxy $UPSTREAM {
        transport http {
            keepalive 60s
            keepalive_idle_conns 64
            keepalive_idle_conns_per_host 64
        }
    }
}
EOF

python3 - "$tmp" "$DOMAIN" "$UPSTREAM" >"$tmp/berth.json" <<'EOF'
import json, sys
tmp, domain, upstream = sys.argv[1:4]
print(json.dumps({
    "revision": 1,
    "http_routes": [{"domain": domain, "upstreams": [{"addr": upstream, "local": True, "healthy": True}]}],
    "certs": [{"domain": domain, "chain_pem": open(f"{tmp}/leaf.pem").read(), "key_pem": open(f"{tmp}/leaf.key").read()}],
}, indent=2))
EOF
chmod 600 "$tmp/berth.json"

# --- commands ---------------------------------------------------------------------------
upstream_cmd=(taskset -c "$UPSTREAM_CPUS" nginx -c "$tmp/upstream/nginx.conf" -p "$tmp/upstream" -e "$tmp/upstream/error.log")
nginx_cmd=(taskset -c 0 nginx -c "$tmp/nginx/nginx.conf" -p "$tmp/nginx" -e "$tmp/nginx/error.log")
caddy_cmd=(taskset -c 0 env HOME="$tmp/caddy/home" XDG_DATA_HOME="$tmp/caddy/data" XDG_CONFIG_HOME="$tmp/caddy/config"
    caddy run --config "$tmp/caddy/Caddyfile" --adapter caddyfile)
berth_cmd=(taskset -c 0 env RUST_LOG=warn "$berth_bin" --config "$tmp/berth.json" --https 127.0.0.1:443
    --http 127.0.0.1:80 --metrics off --tcp-bind 127.0.0.1 --access-log off --header-timeout 300s --idle-timeout 300s)
wrk_ka=(taskset -c 1 wrk -t1 "-c$CONNS" "-d${DURATION}s" --latency "$URL")
wrk_warm=(taskset -c 1 wrk -t1 "-c$CONNS" "-d${WARMUP}s" "$URL")
wrk_nc=(taskset -c 1 wrk -t1 "-c$CONNS" "-d${NEWCONN_DURATION}s" --latency -H "Connection: close" "$URL")
idle_cmd=(taskset -c 1 python3 "$here/idle_conns.py" "$DOMAIN" 443 "$tmp/ca.pem" "$IDLE_CONNS" 100)

show() { # label command... → one line, arguments with spaces quoted, $tmp shown as $TMP
    local out=$1 a
    shift
    for a in "$@"; do
        [[ $a == *" "* ]] && a="'$a'"
        out+=" $a"
    done
    printf '  %s\n' "${out//$tmp/\$TMP}"
}

# --- helpers ----------------------------------------------------------------------------
proxy_pid=
start_proxy() { # name
    local var
    case "$1" in
    nginx) var=nginx_cmd ;;
    caddy) var=caddy_cmd ;;
    berth-proxy) var=berth_cmd ;;
    *)
        echo "unknown proxy $1" >&2
        exit 1
        ;;
    esac
    local -n cmd=$var
    ip netns exec "$NS" "${cmd[@]}" >>"$tmp/$1.log" 2>&1 &
    proxy_pid=$!
    pids+=("$proxy_pid")
    for _ in $(seq 100); do
        if nsx curl -sf -o /dev/null --cacert "$tmp/ca.pem" "$URL" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$proxy_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "$1 did not answer $URL; its log:" >&2
    cat "$tmp/$1.log" >&2
    exit 1
}
stop_proxy() {
    kill -TERM "$proxy_pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$proxy_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null || true
    # nginx workers exit after their master; wait until port 443 is free.
    for _ in $(seq 100); do
        [ -z "$(nsx ss -Htln 'sport = :443')" ] && return 0
        sleep 0.1
    done
    echo "port 443 still in use after stopping the proxy" >&2
    exit 1
}
tree_pids() {
    echo "$1"
    pgrep -P "$1" || true
}
rss_kb() { # VmRSS of a process and its children
    local p sum=0 v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
cpu_ticks() { # utime+stime of a process and its children
    local p sum=0 v
    for p in $(tree_pids "$1"); do
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        sum=$((sum + v))
    done
    echo "$sum"
}
core_busy() { grep -E '^cpu[01] ' /proc/stat | awk '{printf "%d %d ", $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}'; }
busy_pct() { # before after → "cpu0% cpu1%"
    awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " ");
        printf "%.0f%% %.0f%%", 100 * (y[1] - x[1]) / (y[2] - x[2]), 100 * (y[3] - x[3]) / (y[4] - x[4])}'
}
to_ms() { awk '{v = $1; if (v ~ /us$/) printf "%.3f", v / 1000; else if (v ~ /ms$/) printf "%.3f", v + 0;
    else if (v ~ /m$/) printf "%.3f", v * 60000; else printf "%.3f", v * 1000}'; }
wrk_parse() { # file → "rps p50_ms p99_ms errors"
    local rps p50 p99 err non2xx
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$1")
    p50=$(awk '$1 == "50%" {print $2}' "$1" | to_ms)
    p99=$(awk '$1 == "99%" {print $2}' "$1" | to_ms)
    err=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$1")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$1")
    if [ -z "$rps" ] || [ -z "$p99" ]; then
        echo "could not parse wrk output:" >&2
        cat "$1" >&2
        exit 1
    fi
    echo "$rps $p50 $p99 $((${err:-0} + ${non2xx:-0}))"
}
run_wrk() { # name phase cmd... → prints the parsed line, stores the raw output
    local name=$1 phase=$2 t0 t1 c0 c1 u0 u1 hz
    shift 2
    hz=$(getconf CLK_TCK)
    c0=$(cpu_ticks "$proxy_pid")
    u0=$(cpu_ticks "$upstream_pid")
    t0=$(core_busy)
    nsx "$@" >"$tmp/wrk-$name-$phase.out" 2>&1
    t1=$(core_busy)
    c1=$(cpu_ticks "$proxy_pid")
    u1=$(cpu_ticks "$upstream_pid")
    local parsed dur
    parsed=$(wrk_parse "$tmp/wrk-$name-$phase.out")
    read -r rps p50 p99 errs <<<"$parsed"
    dur=$(awk '/requests in/ {v = $4; sub(/,$/, "", v); if (v ~ /ms$/) v = v / 1000; else if (v ~ /m$/) v = v * 60; print v + 0}' \
        "$tmp/wrk-$name-$phase.out")
    proxy_cpu=$(awk -v t=$((c1 - c0)) -v hz="$hz" -v d="$dur" 'BEGIN {printf "%.0f", 100 * t / hz / d}')
    # Proxy CPU time per request (µs): comparable even when the load side is the bottleneck.
    cpu_us=$(awk -v t=$((c1 - c0)) -v hz="$hz" -v d="$dur" -v r="$rps" 'BEGIN {printf "%.0f", 1e6 * t / hz / (r * d)}')
    upstream_cpu=$(awk -v t=$((u1 - u0)) -v hz="$hz" -v d="$dur" 'BEGIN {printf "%.0f%%", 100 * t / hz / d}')
    cores=$(busy_pct "$t0" "$t1")
}

# --- header -----------------------------------------------------------------------------
echo "== berth-proxy vs nginx vs Caddy: HTTPS reverse proxy, HTTP/1.1, TLS 1.3 =="
echo "machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr)"
echo "versions: $(nginx -v 2>&1 | sed 's/^nginx version: //'), caddy $(caddy version | awk '{print $1}'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $(python3 -c 'import ssl, sys; print("python", sys.version.split()[0], ssl.OPENSSL_VERSION)'), $(openssl version | awk '{print "openssl", $2}')"
echo "berth-proxy: $("$berth_bin" --version), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$root" diff --quiet HEAD -- proxy-node protocol 2>/dev/null || echo ' + uncommitted changes in proxy-node/protocol')"
echo "namespace $NS (loopback only), $DOMAIN → 127.0.0.1 via /etc/netns/$NS/hosts; certificate: P-256 leaf + own CA (\$TMP = $tmp)"
echo "pinning: proxy on CPU 0; wrk / idle client on CPU 1; upstream nginx (2 workers) on CPU $UPSTREAM_CPUS"
echo "open files limit: $nofile (ulimit -n, inherited by every process)"
echo "rounds: $ROUNDS (warm-up + keep-alive + new-conn for each proxy in each round, freshly started; proxy order rotated by one each round); memory once per proxy"
s0=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
sleep 2
s1=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); all CPUs $(awk -v a="$s0" -v b="$s1" 'BEGIN {split(a, x, " "); split(b, y, " "); printf "%.0f%%", 100 * (y[1] - x[1]) / (y[2] - x[2])}') busy in the last 2 s (other work on the host skews the figures)"
echo "commands (each run as: ip netns exec $NS <command>):"
show "upstream:" "${upstream_cmd[@]}"
show "nginx:" "${nginx_cmd[@]}"
show "caddy:" "${caddy_cmd[@]}"
show "berth-proxy:" "${berth_cmd[@]}"
show "warm-up:" "${wrk_warm[@]}"
show "keep-alive:" "${wrk_ka[@]}"
show "new conns:" "${wrk_nc[@]}"
show "idle conns:" "${idle_cmd[@]}"
if ((SHOW_CONFIGS)); then
    for f in upstream/nginx.conf nginx/nginx.conf caddy/Caddyfile; do
        echo "--- $f"
        sed "s|$tmp|\$TMP|g" "$tmp/$f"
    done
    echo "--- berth.json (PEMs elided)"
    python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); [x.update(chain_pem="…", key_pem="…") for x in c["certs"]]; print(json.dumps(c))' "$tmp/berth.json"
fi
echo

ip netns exec "$NS" "${upstream_cmd[@]}" >"$tmp/upstream.log" 2>&1 &
upstream_pid=$!
pids+=("$upstream_pid")
for _ in $(seq 50); do
    nsx curl -sf -o /dev/null "http://$UPSTREAM/" && break
    sleep 0.1
done
nsx curl -sf -o /dev/null "http://$UPSTREAM/"

read -r -a plist <<<"$PROXIES"
nprox=${#plist[@]}
# Results of every run, keyed "proxy:round"; the medians etc. keyed by proxy.
declare -A KA_RPS KA_P50 KA_P99 KA_CPU KA_US NC_RPS NC_P50 NC_P99 NC_CPU NC_US RSS0 RSS1 HELD TLS_INFO ORDER
row() { printf '%-12s %-10s %10.0f %9s %9s %7s %9s %9s %11s\n' "$@"; }
printf '%-12s %-10s %10s %9s %9s %7s %9s %9s %11s\n' proxy phase req/s p50_ms p99_ms errors "proxy CPU" upstream "cpu0 cpu1"
bench_t0=$SECONDS
# shellcheck disable=SC2034 # the per-round arrays are read through the nameref in per_round
for ((r = 1; r <= ROUNDS; r++)); do
    order=()
    for ((i = 0; i < nprox; i++)); do order+=("${plist[(i + r - 1) % nprox]}"); done
    ORDER[$r]="${order[*]}"
    echo "# round $r of $ROUNDS: ${order[*]}"
    for p in "${order[@]}"; do
        start_proxy "$p"
        if [ -z "${TLS_INFO[$p]:-}" ]; then
            TLS_INFO[$p]=$(nsx openssl s_client -connect 127.0.0.1:443 -servername "$DOMAIN" -CAfile "$tmp/ca.pem" -brief </dev/null 2>&1 |
                awk -F': ' '/Protocol version/ {v = $2} /Ciphersuite/ {c = $2} /Verification:/ {ok = $2} /Server Temp Key/ {k = $2}
                    END {printf "%s %s, %s, verify %s", v, c, k, ok}')
            echo "# $p: ${TLS_INFO[$p]}"
        fi
        nsx "${wrk_warm[@]}" >/dev/null 2>&1
        run_wrk "$p" "keepalive-$r" "${wrk_ka[@]}"
        KA_RPS[$p:$r]=$rps KA_P50[$p:$r]=$p50 KA_P99[$p:$r]=$p99 KA_CPU[$p:$r]=$proxy_cpu KA_US[$p:$r]=$cpu_us
        row "$p" keep-alive "$rps" "$p50" "$p99" "$errs" "$proxy_cpu%" "$upstream_cpu" "$cores"
        run_wrk "$p" "newconn-$r" "${wrk_nc[@]}"
        NC_RPS[$p:$r]=$rps NC_P50[$p:$r]=$p50 NC_P99[$p:$r]=$p99 NC_CPU[$p:$r]=$proxy_cpu NC_US[$p:$r]=$cpu_us
        row "$p" new-conn "$rps" "$p50" "$p99" "$errs" "$proxy_cpu%" "$upstream_cpu" "$cores"
        stop_proxy
    done
done

echo "# memory: once per proxy"
for p in "${plist[@]}"; do
    # Memory: a fresh process, then $IDLE_CONNS idle keep-alive TLS connections.
    start_proxy "$p"
    sleep 1
    RSS0[$p]=$(rss_kb "$proxy_pid")
    ip netns exec "$NS" "${idle_cmd[@]}" >"$tmp/idle-$p.out" 2>"$tmp/idle-$p.err" &
    idle_pid=$!
    pids+=("$idle_pid")
    for _ in $(seq 600); do
        grep -q '^ready' "$tmp/idle-$p.out" && break
        kill -0 "$idle_pid" 2>/dev/null || break
        sleep 0.5
    done
    if ! grep -q '^ready' "$tmp/idle-$p.out"; then
        echo "idle client for $p did not finish:" >&2
        cat "$tmp/idle-$p.out" "$tmp/idle-$p.err" >&2
        exit 1
    fi
    sleep 3
    RSS1[$p]=$(rss_kb "$proxy_pid")
    HELD[$p]=$(nsx ss -Htn state established 'sport = :443' | wc -l)
    read -r _ opened failed secs <"$tmp/idle-$p.out"
    printf '%-12s %-10s %s connections opened in %ss (%s failed), %s held by the proxy 3 s later; VmRSS %.1f → %.1f MB\n' \
        "$p" idle "$opened" "$secs" "$failed" "${HELD[$p]}" "$(awk -v k="${RSS0[$p]}" 'BEGIN {print k / 1024}')" \
        "$(awk -v k="${RSS1[$p]}" 'BEGIN {print k / 1024}')"
    if ((failed)); then head -3 "$tmp/idle-$p.err" >&2; fi
    kill "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" 2>/dev/null || true
    stop_proxy
done
bench_secs=$((SECONDS - bench_t0))

# --- summary ----------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else printf "-"}'; }
k() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
per_round() { # array proxy → its values, one per round
    local -n arr=$1
    local i
    for ((i = 1; i <= ROUNDS; i++)); do echo "${arr[$2:$i]}"; done
}
median() { # array proxy [printf format] → the median over the rounds (even count: mean of the middle two)
    per_round "$1" "$2" | sort -g | awk -v f="${3:-%.3f}" '{v[NR] = $1}
        END {printf f, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
range() { # array proxy → "min-max" of req/s
    per_round "$1" "$2" | sort -g | awk '{v[NR] = $1} END {printf "%.0f-%.0f", v[1], v[NR]}'
}
declare -A M_KA_RPS M_KA_P50 M_KA_P99 M_KA_CPU M_KA_US M_NC_RPS M_NC_P50 M_NC_P99 M_NC_CPU M_NC_US
# shellcheck disable=SC2034 # most are read through the namerefs in summary
for p in "${plist[@]}"; do
    M_KA_RPS[$p]=$(median KA_RPS "$p" %.2f) M_KA_P50[$p]=$(median KA_P50 "$p") M_KA_P99[$p]=$(median KA_P99 "$p")
    M_KA_CPU[$p]=$(median KA_CPU "$p" %.0f) M_KA_US[$p]=$(median KA_US "$p" %.0f)
    M_NC_RPS[$p]=$(median NC_RPS "$p" %.2f) M_NC_P50[$p]=$(median NC_P50 "$p") M_NC_P99[$p]=$(median NC_P99 "$p")
    M_NC_CPU[$p]=$(median NC_CPU "$p" %.0f) M_NC_US[$p]=$(median NC_US "$p" %.0f)
done

echo
if ((ROUNDS > 1)); then
    echo "medians of $ROUNDS rounds (req/s min-max = the lowest and highest round); ratios are of the medians"
fi
summary() { # KA|NC rate-title per → the table of that phase's medians
    local ph=$1 title=$2 w=$((${#2} > 10 ? ${#2} : 10)) p
    local -n rps=M_${ph}_RPS p50=M_${ph}_P50 p99=M_${ph}_P99 cpu=M_${ph}_CPU us=M_${ph}_US
    printf '%-12s %*s %13s %8s %8s %9s %9s %10s %12s\n' proxy "$w" "$title" "min-max" p50_ms p99_ms "vs nginx" "vs Caddy" \
        "proxy CPU" "CPU us/$3"
    for p in "${plist[@]}"; do
        # shellcheck disable=SC2183 # %*.0f takes the width as an argument too
        printf '%-12s %*.0f %13s %8s %8s %9s %9s %9s%% %12s\n' "$p" "$w" "${rps[$p]}" "$(range "${ph}_RPS" "$p")" \
            "${p50[$p]}" "${p99[$p]}" "$(ratio "${rps[$p]}" "${rps[nginx]:-0}")" "$(ratio "${rps[$p]}" "${rps[caddy]:-0}")" \
            "${cpu[$p]}" "${us[$p]}"
    done
}
echo "keep-alive: wrk -t1 -c$CONNS -d${DURATION}s --latency (HTTP/1.1 over TLS 1.3, connections reused)"
summary KA req/s req
echo
echo "new connections: the same with -H 'Connection: close' for ${NEWCONN_DURATION}s: one TCP connection + full TLS 1.3 handshake per request"
summary NC handshake/s conn
echo
echo "memory: VmRSS of a freshly started proxy (nginx: master + worker), idle and with $IDLE_CONNS idle keep-alive TLS connections (once per proxy)"
printf '%-12s %12s %16s %10s %8s\n' proxy "RSS idle MB" "RSS ${IDLE_CONNS}c MB" "KiB/conn" held
for p in "${plist[@]}"; do
    printf '%-12s %12s %16s %10s %8s\n' "$p" "$(k "${RSS0[$p]}")" "$(k "${RSS1[$p]}")" \
        "$(awk -v a="${RSS0[$p]}" -v b="${RSS1[$p]}" -v n="$IDLE_CONNS" 'BEGIN {printf "%.1f", (b - a) / n}')" "${HELD[$p]}"
done
echo "(proxy CPU = the proxy's utime+stime over the run, 100% = its whole core; CPU us = that per request or connection."
echo " cpu0/cpu1 above = how busy each core was in total: cpu1 near 100% means the load side (wrk + upstream) was the"
echo " limit; cpu0 near 100% with the proxy well below means other processes on the host took part of the proxy's core.)"

b=berth-proxy
if [ -n "${M_KA_RPS[$b]:-}" ] && [ -n "${M_KA_RPS[nginx]:-}" ] && [ -n "${M_KA_RPS[caddy]:-}" ]; then
    holds() { awk -v a="$1" -v b="$2" "BEGIN {exit !(a $3 b)}"; }
    verdict() { if holds "$@"; then echo met; else echo MISSED; fi; }
    declare -A MET=()
    echo
    echo "paired, per round: berth-proxy against nginx and Caddy of the same round"
    printf '%-5s %-28s %12s %9s %19s %12s %9s\n' round order "ka vs nginx" "vs Caddy" "p99 ms berth/nginx" "hs vs nginx" "vs Caddy"
    for ((r = 1; r <= ROUNDS; r++)); do
        printf '%-5s %-28s %12s %9s %19s %12s %9s\n' "$r" "${ORDER[$r]}" \
            "$(ratio "${KA_RPS[$b:$r]}" "${KA_RPS[nginx:$r]}")" "$(ratio "${KA_RPS[$b:$r]}" "${KA_RPS[caddy:$r]}")" \
            "${KA_P99[$b:$r]} / ${KA_P99[nginx:$r]}" \
            "$(ratio "${NC_RPS[$b:$r]}" "${NC_RPS[nginx:$r]}")" "$(ratio "${NC_RPS[$b:$r]}" "${NC_RPS[caddy:$r]}")"
        if holds "${KA_RPS[$b:$r]}" "${KA_RPS[nginx:$r]}" ">="; then MET[nginx]=$((${MET[nginx]:-0} + 1)); fi
        if holds "${KA_RPS[$b:$r]}" "$(awk -v c="${KA_RPS[caddy:$r]}" 'BEGIN {print 2 * c}')" ">="; then
            MET[caddy]=$((${MET[caddy]:-0} + 1))
        fi
        if holds "${KA_P99[$b:$r]}" "${KA_P99[nginx:$r]}" "<="; then MET[p99]=$((${MET[p99]:-0} + 1)); fi
    done
    of() { printf '%d of %d round%s' "${MET[$1]:-0}" "$ROUNDS" "$( ((ROUNDS == 1)) || echo s)"; }
    echo
    echo "targets (judged on the medians):"
    printf '  berth-proxy req/s >= 1.0x nginx: %-6s (median %s; %s)\n' \
        "$(verdict "${M_KA_RPS[$b]}" "${M_KA_RPS[nginx]}" ">=")" "$(ratio "${M_KA_RPS[$b]}" "${M_KA_RPS[nginx]}")" "$(of nginx)"
    printf '  berth-proxy req/s >= 2.0x Caddy: %-6s (median %s; %s)\n' \
        "$(verdict "${M_KA_RPS[$b]}" "$(awk -v c="${M_KA_RPS[caddy]}" 'BEGIN {print 2 * c}')" ">=")" \
        "$(ratio "${M_KA_RPS[$b]}" "${M_KA_RPS[caddy]}")" "$(of caddy)"
    printf '  berth-proxy p99 <= nginx p99:    %-6s (median %s ms vs %s ms; %s)\n' \
        "$(verdict "${M_KA_P99[$b]}" "${M_KA_P99[nginx]}" "<=")" "${M_KA_P99[$b]}" "${M_KA_P99[nginx]}" "$(of p99)"
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS round(s) + memory took $((bench_secs / 60))m$((bench_secs % 60))s"
