#!/usr/bin/env bash
# Load benchmark: direct vs. sidelight vs. nginx in front of the same fast upstream.
#
#   bash benches/proxy_bench.sh                       # ROUNDS=5 DURATION=5
#   ROUNDS=1 DURATION=2 bash benches/proxy_bench.sh   # quick smoke run
#
# Measures requests/s and latency p50/p99 with wrk for
#   direct     wrk -> mock_openai
#   sidelight  wrk -> sidelight -> mock_openai
#   nginx      wrk -> nginx (keep-alive reverse proxy) -> mock_openai
#   nginx-fwd  the same nginx also doing the header work sidelight does by default: a request
#              id generated and sent both ways, X-Forwarded-For and X-Forwarded-Proto (for an
#              equal-work comparison; the target is measured against plain nginx)
# at 1 and 64 concurrent keep-alive connections, ROUNDS times (targets
# interleaved inside each round, order rotated per round), and reports medians.
# See benches/README.md.
#
# Environment knobs:
#   ROUNDS=5        rounds; every (target, connections) pair is measured once per round
#   DURATION=5      seconds per measured wrk run
#   WARMUP=2        seconds of warm-up (64 connections) per target before round 1
#   HIGH_CONNS=64   the "many connections" level (>= 2; wrk uses 2 threads for it)
#   SKIP_BUILD=1    don't run cargo build (use the existing target/release binaries)
#   NO_NGINX=1      skip the nginx column
#   TC=1            add a "sidelight-tc" target: sidelight with traffic control on (two rate
#                   limits that never reject, two endpoints balanced by P2C, retries with a
#                   budget, outlier detection, active health checks), to measure its cost
#   QUIET_WAIT=0    if > 0: before each run, wait up to this many seconds for other
#                   processes to use < QUIET_PCT% (default 10) of the CPU
#   KEEP_TMP=1      keep the temp dir (configs, server logs, raw wrk output)
#   READY_TIMEOUT=30  seconds to wait for each server to become ready
#   NGINX=/path     nginx binary to use (default: nginx on PATH, then /usr/sbin/nginx)
set -Eeuo pipefail

TC=${TC:-0}
BENCH_NAME=proxy_bench
BENCH_TAG='[bench]'
BENCH_NGINX_COLUMN='nginx column (c)'
BENCH_TMP=sidelight-bench
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

read -r P_UP P_SL P_ADMIN P_NGX P_TC P_TCADMIN P_NGXF < <(free_ports 7)
[[ -n ${P_NGXF:-} ]] || die "could not pick free ports"

# --- upstream
start mock "$TMP/mock.log" "$MOCK_BIN" --listen "127.0.0.1:$P_UP"
MOCK_PID=${PIDS[-1]}
wait_ready mock_openai "$MOCK_PID" "http://127.0.0.1:$P_UP/ping" pong
log "mock_openai ready on 127.0.0.1:$P_UP (pid $MOCK_PID)"

# --- sidelight
cat >"$TMP/sidelight.yaml" <<EOF
listeners:
  - name: main
    address: 127.0.0.1:$P_SL
admin:
  address: 127.0.0.1:$P_ADMIN
log:
  level: warn
  access_log: false
upstreams:
  - name: mock
    endpoints: ["http://127.0.0.1:$P_UP"]
    pool: { max_idle_per_endpoint: 256 }
routes:
  - name: mock
    match: { path_prefix: / }
    upstream: mock
EOF
start sidelight "$TMP/sidelight.log" "$SIDELIGHT_BIN" --config "$TMP/sidelight.yaml"
SL_PID=${PIDS[-1]}
wait_ready "sidelight admin" "$SL_PID" "http://127.0.0.1:$P_ADMIN/readyz"
wait_ready sidelight "$SL_PID" "http://127.0.0.1:$P_SL/ping" pong
log "sidelight ready on 127.0.0.1:$P_SL (admin $P_ADMIN, pid $SL_PID)"

TARGETS=(direct sidelight)
declare -A URL=(
    [direct]="http://127.0.0.1:$P_UP/ping"
    [sidelight]="http://127.0.0.1:$P_SL/ping"
)

# --- sidelight with traffic control (TC=1)
if [[ $TC == 1 ]]; then
    cat >"$TMP/sidelight-tc.yaml" <<EOF
listeners:
  - name: main
    address: 127.0.0.1:$P_TC
admin:
  address: 127.0.0.1:$P_TCADMIN
log:
  level: warn
  access_log: false
upstreams:
  - name: mock
    # The same server twice: two endpoints, two pools, P2C between them.
    endpoints: ["http://127.0.0.1:$P_UP", "http://127.0.0.1:$P_UP/"]
    pool: { max_idle_per_endpoint: 256 }
    health_check: { path: /ping, interval: 1s }
routes:
  - name: mock
    match: { path_prefix: / }
    upstream: mock
    retries: { max_retries: 1 }
    rate_limits:
      - { name: route, rate: 100000000/s }
      - { name: per-ip, rate: 100000000/s, key: client_ip }
EOF
    start sidelight-tc "$TMP/sidelight-tc.log" "$SIDELIGHT_BIN" --config "$TMP/sidelight-tc.yaml"
    TC_PID=${PIDS[-1]}
    wait_ready "sidelight-tc admin" "$TC_PID" "http://127.0.0.1:$P_TCADMIN/readyz"
    wait_ready sidelight-tc "$TC_PID" "http://127.0.0.1:$P_TC/ping" pong
    log "sidelight-tc ready on 127.0.0.1:$P_TC (pid $TC_PID)"
    TARGETS+=(sidelight-tc)
    URL[sidelight-tc]="http://127.0.0.1:$P_TC/ping"
fi

# --- nginx
NGINX_VERSION="not run"
if [[ -n $NGINX_BIN ]]; then
    NGINX_VERSION=$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')
    # Keep every path under the temp prefix so /etc/nginx, /var/lib/nginx and
    # /var/log/nginx are never touched. Temp-path directives exist only for
    # compiled-in modules, so skip the ones the binary was built without.
    nginx_v=$("$NGINX_BIN" -V 2>&1)
    temp_paths="client_body_temp_path $TMP/nginx-temp/body;
    proxy_temp_path $TMP/nginx-temp/proxy;"
    for m in fastcgi uwsgi scgi; do
        [[ $nginx_v == *"--without-http_${m}_module"* ]] && continue
        temp_paths+="
    ${m}_temp_path $TMP/nginx-temp/$m;"
    done
    mkdir -p "$TMP/nginx-temp"
    # As root, nginx would switch workers to 'nobody', which can't enter the
    # 0700 temp dir; benchmark-only, so keep the invoking user.
    user_line=""
    [[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
    cat >"$TMP/nginx.conf" <<EOF
# Generated by benches/proxy_bench.sh
daemon off;
master_process on;
worker_processes 2;
$user_line
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log off;
    $temp_paths

    # Default is 1000 requests per connection; raise it so neither side of
    # nginx reconnects mid-run (sidelight/hyper has no such limit).
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream mock {
        server 127.0.0.1:$P_UP;
        keepalive 256;
        keepalive_requests 1000000;
    }

    server {
        listen 127.0.0.1:$P_NGX;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }

    # nginx-fwd: the headers sidelight adds by default, so both do the same work per request.
    server {
        listen 127.0.0.1:$P_NGXF;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-ID \$request_id;
            add_header X-Request-ID \$request_id;
        }
    }
}
EOF
    "$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" >"$TMP/nginx-test.log" 2>&1 \
        || { cat "$TMP/nginx-test.log" "$TMP/nginx-error.log" >&2 2>/dev/null; die "nginx -t rejected the generated config"; }
    start nginx "$TMP/nginx.log" "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf"
    NGX_PID=${PIDS[-1]}
    wait_ready nginx "$NGX_PID" "http://127.0.0.1:$P_NGX/ping" pong
    log "nginx ready on 127.0.0.1:$P_NGX (pid $NGX_PID, $NGINX_VERSION)"
    wait_ready nginx-fwd "$NGX_PID" "http://127.0.0.1:$P_NGXF/ping" pong
    TARGETS+=(nginx nginx-fwd)
    URL[nginx]="http://127.0.0.1:$P_NGX/ping"
    URL[nginx-fwd]="http://127.0.0.1:$P_NGXF/ping"
fi

# ------------------------------------------------------------------ measure

RUNS="$TMP/runs.jsonl"
: >"$RUNS"
NOTE="wrk, the upstream and the proxy under test all run on this machine's $NCPU cores over loopback: they compete for CPU, so absolute numbers understate dedicated hardware and the proxies' numbers include wrk's and the upstream's share. Compare ratios within one run, not absolute numbers across machines."

n_targets=${#TARGETS[@]}
total_runs=$(( ROUNDS * 2 * n_targets ))
est=$(( total_runs * DURATION + n_targets * WARMUP ))
log "targets: ${TARGETS[*]}; $ROUNDS round(s) x {1, $HIGH_CONNS} conns x ${DURATION}s => ~${est}s of load"
log "note: $NOTE"

CPU_GROUPS=("bench=$$" "upstream=$MOCK_PID" "direct=$MOCK_PID" "sidelight=$SL_PID")
[[ -n ${TC_PID:-} ]] && CPU_GROUPS+=("sidelight-tc=$TC_PID")
[[ -n ${NGX_PID:-} ]] && CPU_GROUPS+=("nginx=$NGX_PID" "nginx-fwd=$NGX_PID")
preflight_idle

for t in "${TARGETS[@]}"; do
    log "warm-up: $t, ${WARMUP}s @ $HIGH_CONNS conns"
    run_wrk "$t" "$HIGH_THREADS" "$HIGH_CONNS" "$WARMUP" "$TMP/wrk-warmup-$t.txt"
done

run_no=0
for (( r=1; r<=ROUNDS; r++ )); do
    # Rotate the target order each round so position effects (thermal, page
    # cache, drift) spread over all targets.
    order=()
    for (( i=0; i<n_targets; i++ )); do order+=("${TARGETS[(i + r - 1) % n_targets]}"); done
    for conns in 1 "$HIGH_CONNS"; do
        threads=$(( conns == 1 ? 1 : HIGH_THREADS ))
        for t in "${order[@]}"; do
            run_no=$((run_no + 1))
            out="$TMP/wrk-r$r-c$conns-$t.txt"
            wait_quiet
            snap0=$(cpusnap)
            run_wrk "$t" "$threads" "$conns" "$DURATION" "$out"
            snap1=$(cpusnap)
            line=$(python3 "$PARSE" parse --target "$t" --conns "$conns" --round "$r" \
                       --cpu-before "$snap0" --cpu-after "$snap1" <"$out") \
                || { cat "$out" >&2; die "could not parse wrk output for $t @$conns"; }
            printf '%s\n' "$line" >>"$RUNS"
            python3 - "$line" "$run_no" "$total_runs" "$r" <<'EOF' >&2
import json, sys
d = json.loads(sys.argv[1]); n, tot, r = sys.argv[2:5]
err = d["socket_errors"] + d["non_2xx"]
other = d.get("other_cpu_pct", 0)
print(f"[bench] run {n:>3}/{tot} round {r} c={d['conns']:<3} {d['target']:<10}"
      f" {d['rps']:>10,.0f} req/s  p50 {d['p50_us']:>8,.0f}us  p99 {d['p99_us']:>8,.0f}us"
      f"  other-cpu {other:>3.0f}%" + (f"  ERRORS {err}" if err else ""))
EOF
        done
    done
done

# ------------------------------------------------------------------ report

mkdir -p "$RESULTS_DIR"
cmd="ROUNDS=$ROUNDS DURATION=$DURATION bash benches/proxy_bench.sh"
[[ $WARMUP != 2 ]] && cmd="WARMUP=$WARMUP $cmd"
[[ $HIGH_CONNS != 64 ]] && cmd="HIGH_CONNS=$HIGH_CONNS $cmd"
[[ $NO_NGINX == 1 ]] && cmd="NO_NGINX=1 $cmd"
[[ $TC == 1 ]] && cmd="TC=1 $cmd"
[[ $QUIET_WAIT != 0 ]] && cmd="QUIET_WAIT=$QUIET_WAIT QUIET_PCT=$QUIET_PCT $cmd"
cpu=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n1)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $rev != unknown ]] && [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    rev+=" (with uncommitted changes in src/)"
fi
# `wrk --version` exits 1, hence the `|| true`.
wrk_version=$({ wrk --version 2>&1 || true; } | awk 'NR==1 {print $2}')

echo
echo "sidelight proxy benchmark: medians of $ROUNDS round(s) x ${DURATION}s, wrk -t1 -c1 / -t$HIGH_THREADS -c$HIGH_CONNS, GET /ping"
[[ -z $NGINX_BIN ]] && echo "(nginx not installed: column (c) skipped; install with: apt-get install -y nginx-light)"
echo
python3 "$PARSE" report "$RUNS" --md "$RESULTS_DIR/latest.md" \
    --meta "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    --meta "host=$(uname -srm)" \
    --meta "nproc=$NCPU" \
    --meta "cpu=${cpu:-unknown}" \
    --meta "rounds=$ROUNDS (targets interleaved, order rotated per round; warm-up ${WARMUP}s per target)" \
    --meta "duration=${DURATION}s per run; wrk -t1 -c1 and -t$HIGH_THREADS -c$HIGH_CONNS, keep-alive, GET /ping" \
    --meta "wrk=$wrk_version" \
    --meta "nginx=$NGINX_VERSION (worker_processes 2, upstream keepalive 256)" \
    --meta "sidelight commit=$rev" \
    --meta "idle check=other processes used ${idle_other}% of the CPU in the second before the first run" \
    --meta "command=$cmd" \
    --meta "note=Note: $NOTE"
cp "$RUNS" "$RESULTS_DIR/latest-runs.jsonl"
echo
echo "note: $NOTE"
echo "wrote $RESULTS_DIR/latest.md (raw per-run numbers: $RESULTS_DIR/latest-runs.jsonl)"
