#!/usr/bin/env bash
# Memory of idle keep-alive client connections: sidelight vs. nginx in front of the same
# upstream (issue 13, item 5).
#
#   bash benches/idle_bench.sh              # CONNS=10000
#   CONNS=2000 bash benches/idle_bench.sh   # quick run
#
# For each proxy: warm it up with wrk, read its RSS (baseline), open CONNS connections that
# each send one request and then stay idle (benches/idle_hold.py), read RSS again, close them
# all, wait until the proxy has seen them close, and read RSS a last time. Prints the RSS each
# idle connection costs (KiB per connection) and how far RSS is from the baseline once they
# are gone. nginx's RSS is its master's plus its workers'.
#
# Environment knobs:
#   CONNS=10000     idle connections to hold
#   SETTLE=3        seconds to wait after the connections close before the last reading
#   SKIP_BUILD=1    don't run cargo build (use the existing target/release binaries)
#   NO_NGINX=1      skip nginx
#   KEEP_TMP=1      keep the temp dir
#   NGINX=/path     nginx binary to use
set -Eeuo pipefail

CONNS=${CONNS:-10000}
SETTLE=${SETTLE:-3}
BENCH_NAME=idle_bench
BENCH_TAG='[idle]'
BENCH_NGINX_COLUMN='nginx row'
BENCH_TMP=sidelight-idle
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer"

# Every connection is a file descriptor in the holder and one in the proxy.
ulimit -n $((CONNS + 1024)) 2>/dev/null \
    || die "cannot raise the open-files limit to $((CONNS + 1024)) (ulimit -n); run as root or lower CONNS"

read -r P_UP P_SL P_ADMIN P_NGX < <(free_ports 4)
[[ -n ${P_NGX:-} ]] || die "could not pick free ports"

start mock "$TMP/mock.log" "$MOCK_BIN" --listen "127.0.0.1:$P_UP"
wait_ready mock_openai "${PIDS[-1]}" "http://127.0.0.1:$P_UP/ping" pong

cat >"$TMP/sidelight.yaml" <<YAML
listeners: [{ name: main, address: "127.0.0.1:$P_SL" }]
admin: { address: "127.0.0.1:$P_ADMIN" }
log: { level: warn, access_log: false }
limits: { max_client_connections: $((CONNS + 100)), header_read_timeout: 10m }
upstreams:
  - name: mock
    endpoints: ["http://127.0.0.1:$P_UP"]
routes:
  - { name: mock, match: { path_prefix: / }, upstream: mock }
YAML
start sidelight "$TMP/sidelight.log" "$SIDELIGHT_BIN" --config "$TMP/sidelight.yaml"
SL_PID=${PIDS[-1]}
wait_ready sidelight "$SL_PID" "http://127.0.0.1:$P_SL/ping" pong

NGX_PID=""
if [[ -n $NGINX_BIN ]]; then
    mkdir -p "$TMP/nginx-temp"
    user_line=""
    [[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
    cat >"$TMP/nginx.conf" <<NGINX
daemon off;
worker_processes 2;
worker_rlimit_nofile $((CONNS * 2 + 1024));
$user_line
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections $((CONNS + 1024)); }
http {
    access_log off;
    client_body_temp_path $TMP/nginx-temp/body;
    proxy_temp_path $TMP/nginx-temp/proxy;
    keepalive_timeout 10m;
    upstream mock { server 127.0.0.1:$P_UP; keepalive 64; }
    server {
        listen 127.0.0.1:$P_NGX;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
    start nginx "$TMP/nginx.log" "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf"
    NGX_PID=${PIDS[-1]}
    wait_ready nginx "$NGX_PID" "http://127.0.0.1:$P_NGX/ping" pong
fi

# RSS in KiB of a process and its children (nginx's workers).
rss_kib() {
    local pid=$1 total=0 p
    for p in $pid $(pgrep -P "$pid" || true); do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Open connections of the proxy (its sockets on the listening port), to wait for closes.
conns_of() { ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l; }

measure() {  # measure NAME PID PORT
    local name=$1 pid=$2 port=$3 base open after deadline
    wrk -t2 -c64 -d2s "http://127.0.0.1:$port/ping" >/dev/null 2>&1 || die "wrk against $name failed"
    sleep 1
    base=$(rss_kib "$pid")
    coproc HOLD { python3 "$HERE/idle_hold.py" 127.0.0.1 "$port" "$CONNS" 2>&1; }
    local line
    read -r line <&"${HOLD[0]}" || die "idle_hold.py against $name failed"
    [[ $line == ready ]] || die "idle_hold.py against $name: $line"
    sleep 1
    open=$(rss_kib "$pid")
    echo >&"${HOLD[1]}"
    read -r line <&"${HOLD[0]}" || true
    wait "$HOLD_PID" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while (( $(conns_of "$port") > 0 && SECONDS < deadline )); do sleep 0.2; done
    sleep "$SETTLE"
    after=$(rss_kib "$pid")
    python3 - "$name" "$CONNS" "$base" "$open" "$after" <<'PY'
import sys
name, n, base, opened, after = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
per = (opened - base) / n
back = (after - base) / base * 100
print(f"| {name} | {n} | {base / 1024:.1f} | {opened / 1024:.1f} | {per:.2f} | {after / 1024:.1f} | {back:+.1f}% |")
PY
}

echo "| proxy | idle connections | RSS before (MiB) | RSS with them (MiB) | KiB per connection | RSS after they close (MiB) | after vs before |"
echo "|---|---|---|---|---|---|---|"
measure sidelight "$SL_PID" "$P_SL"
[[ -n $NGX_PID ]] && measure "nginx $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: nginx\///')" "$NGX_PID" "$P_NGX"
echo
echo "command: CONNS=$CONNS bash benches/idle_bench.sh ($(nproc) CPUs, sidelight workers = CPUs, nginx worker_processes 2)"
