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

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-2}
HIGH_CONNS=${HIGH_CONNS:-64}
SKIP_BUILD=${SKIP_BUILD:-0}
NO_NGINX=${NO_NGINX:-0}
TC=${TC:-0}
KEEP_TMP=${KEEP_TMP:-0}
READY_TIMEOUT=${READY_TIMEOUT:-30}
QUIET_WAIT=${QUIET_WAIT:-0}
QUIET_PCT=${QUIET_PCT:-10}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PARSE="$HERE/wrk_parse.py"
RESULTS_DIR="$HERE/results"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf 'proxy_bench: error: %s\n' "$*" >&2; exit 1; }

[[ $QUIET_WAIT =~ ^[0-9]+$ && $QUIET_PCT =~ ^[0-9]+$ ]] || die "QUIET_WAIT and QUIET_PCT must be integers"
for knob in ROUNDS DURATION WARMUP HIGH_CONNS READY_TIMEOUT; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer (got '${!knob}')"
done
(( HIGH_CONNS >= 2 )) || die "HIGH_CONNS must be at least 2 (1 connection is always measured)"
HIGH_THREADS=2   # wrk needs threads <= connections

command -v python3 >/dev/null || die "python3 is required (for $PARSE)"

# ------------------------------------------------------------------ tools

can_apt() { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; }

APT_UPDATED=0
apt_install() {  # apt_install PKG... ; returns non-zero if it could not install
    can_apt || return 1
    log "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q "$@" >&2; then return 0; fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        APT_UPDATED=1
        apt-get update -q >&2 || return 1
        apt-get install -y -q "$@" >&2 && return 0
    fi
    return 1
}

find_nginx() {
    if [[ -n ${NGINX:-} ]]; then echo "$NGINX"; return 0; fi
    command -v nginx 2>/dev/null && return 0
    [[ -x /usr/sbin/nginx ]] && { echo /usr/sbin/nginx; return 0; }
    return 1
}

if ! command -v wrk >/dev/null; then
    apt_install wrk || true
    command -v wrk >/dev/null || die "wrk is required but not installed.
  Install it with:  sudo apt-get install -y wrk   (Debian/Ubuntu)
  or build it from source: https://github.com/wg/wrk"
fi

NGINX_BIN=""
if [[ -n ${NGINX:-} && $NO_NGINX != 1 && ! -x $NGINX ]]; then
    die "NGINX=$NGINX is not an executable file"
fi
if [[ $NO_NGINX != 1 ]]; then
    if ! NGINX_BIN=$(find_nginx); then
        apt_install nginx-light || apt_install nginx || true
        NGINX_BIN=$(find_nginx) || NGINX_BIN=""
    fi
    if [[ -z $NGINX_BIN ]]; then
        log "nginx not found: SKIPPING the nginx column (c)."
        log "  To include it:  sudo apt-get install -y nginx-light   (or nginx)"
        log "  or point NGINX=/path/to/nginx at a binary."
    fi
fi

if command -v curl >/dev/null; then
    http_get() { curl -fsS --max-time 2 "$1"; }
else
    http_get() {
        python3 -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
    }
fi

# ------------------------------------------------------------------ build

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SIDELIGHT_BIN="$TARGET_DIR/release/sidelight"
MOCK_BIN="$TARGET_DIR/release/examples/mock_openai"
if [[ $SKIP_BUILD != 1 ]]; then
    command -v cargo >/dev/null || die "cargo not found (set SKIP_BUILD=1 to use existing binaries)"
    log "building release binaries (first build takes minutes; may wait on the cargo lock)"
    (cd "$ROOT" && cargo build --release --bin sidelight --example mock_openai) \
        || die "cargo build --release failed"
fi
[[ -x $SIDELIGHT_BIN ]] || die "missing $SIDELIGHT_BIN (build with: cargo build --release)"
[[ -x $MOCK_BIN ]] || die "missing $MOCK_BIN (build with: cargo build --release --example mock_openai)"

# ------------------------------------------------------------------ processes

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sidelight-bench.XXXXXX")
PIDS=()
NAMES=()
FAILED_LOGS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local i pid
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
        pid=${PIDS[i]}
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "${NAMES[i]} (pid $pid) did not exit on SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        for f in "$TMP"/*.log; do
            [[ -s $f ]] || continue
            printf -- '--- last lines of %s ---\n' "$f" >&2
            tail -n 20 "$f" >&2 || true
        done
    fi
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
        log "temp dir kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME LOGFILE CMD...
    local name=$1 logf=$2; shift 2
    "$@" >"$logf" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
}

# Poll URL until it answers 2xx (and, if given, with body EXPECT), while
# checking that PID is still alive; die after READY_TIMEOUT seconds.
wait_ready() {  # wait_ready NAME PID URL [EXPECT]
    local name=$1 pid=$2 url=$3 expect=${4-} body deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        kill -0 "$pid" 2>/dev/null || die "$name exited during startup (its log follows)"
        if body=$(http_get "$url" 2>/dev/null); then
            if [[ -z $expect || $body == "$expect" ]]; then return 0; fi
            die "$name answered $url with unexpected body: '$body' (expected '$expect')"
        fi
        (( SECONDS < deadline )) || die "$name not ready at $url after ${READY_TIMEOUT}s"
        sleep 0.05
    done
}

# Pick 4 free loopback ports *below* the kernel's ephemeral range, so that
# outgoing connections (wrk's, the proxies', other jobs' on this machine) can't
# grab them between this check and the servers' bind().
read -r P_UP P_SL P_ADMIN P_NGX P_TC P_TCADMIN < <(python3 -c '
import random, socket
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    lo = 32768
lo = max(lo, 12000)
ports = []
for port in random.sample(range(lo - 10000, lo), 200):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    ports.append(port)
    if len(ports) == 6:
        break
print(*ports)') || true
[[ -n ${P_TCADMIN:-} ]] || die "could not pick free ports"

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
}
EOF
    "$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" >"$TMP/nginx-test.log" 2>&1 \
        || { cat "$TMP/nginx-test.log" "$TMP/nginx-error.log" >&2 2>/dev/null; die "nginx -t rejected the generated config"; }
    start nginx "$TMP/nginx.log" "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf"
    NGX_PID=${PIDS[-1]}
    wait_ready nginx "$NGX_PID" "http://127.0.0.1:$P_NGX/ping" pong
    log "nginx ready on 127.0.0.1:$P_NGX (pid $NGX_PID, $NGINX_VERSION)"
    TARGETS+=(nginx)
    URL[nginx]="http://127.0.0.1:$P_NGX/ping"
fi

# ------------------------------------------------------------------ measure

RUNS="$TMP/runs.jsonl"
: >"$RUNS"
NCPU=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
NOTE="wrk, the upstream and the proxy under test all run on this machine's $NCPU cores over loopback: they compete for CPU, so absolute numbers understate dedicated hardware and the proxies' numbers include wrk's and the upstream's share. Compare ratios within one run, not absolute numbers across machines."

run_wrk() {  # run_wrk TARGET THREADS CONNS SECONDS OUTFILE
    local target=$1 threads=$2 conns=$3 secs=$4 out=$5
    if ! wrk -t"$threads" -c"$conns" -d"${secs}s" --latency "${URL[$target]}" >"$out" 2>&1; then
        cat "$out" >&2
        die "wrk failed against $target (${URL[$target]})"
    fi
}

n_targets=${#TARGETS[@]}
total_runs=$(( ROUNDS * 2 * n_targets ))
est=$(( total_runs * DURATION + n_targets * WARMUP ))
log "targets: ${TARGETS[*]}; $ROUNDS round(s) x {1, $HIGH_CONNS} conns x ${DURATION}s => ~${est}s of load"
log "note: $NOTE"

# CPU snapshot of the machine and of everything this script runs (itself, wrk
# once reaped, the servers and their children): lets each run report how much
# CPU other processes / hypervisor steal took meanwhile.
# Groups named after a target give that target's CPU per request; "upstream"
# the upstream's, "direct" is the upstream too (the process under test there).
cpusnap() { python3 "$PARSE" cpusnap "${CPU_GROUPS[@]}"; }
CPU_GROUPS=("bench=$$" "upstream=$MOCK_PID" "direct=$MOCK_PID" "sidelight=$SL_PID")
[[ -n ${TC_PID:-} ]] && CPU_GROUPS+=("sidelight-tc=$TC_PID")
[[ -n ${NGX_PID:-} ]] && CPU_GROUPS+=("nginx=$NGX_PID")

# Is the machine already busy? Measure 1s of idle time before loading it.
snap0=$(cpusnap); sleep 1; snap1=$(cpusnap)
idle_other=$(python3 "$PARSE" otherload "$snap0" "$snap1")
if (( idle_other >= QUIET_PCT )); then
    log "WARNING: other processes are using ${idle_other}% of the machine's CPU before the benchmark starts;"
    log "         results will be noisy (see the other% column)"
else
    log "pre-flight: other processes use ${idle_other}% of the CPU"
fi

# With QUIET_WAIT=N, hold each run (up to N seconds) until other processes use
# less than QUIET_PCT% of the machine's CPU, measured over half a second.
wait_quiet() {
    (( QUIET_WAIT > 0 )) || return 0
    local deadline=$((SECONDS + QUIET_WAIT)) a b pct said=0
    while :; do
        a=$(cpusnap); sleep 0.5; b=$(cpusnap)
        pct=$(python3 "$PARSE" otherload "$a" "$b")
        (( pct < QUIET_PCT )) && return 0
        if (( SECONDS >= deadline )); then
            log "still ${pct}% busy after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        if (( !said )); then log "machine busy (${pct}% CPU used by others); waiting up to ${QUIET_WAIT}s"; said=1; fi
    done
}

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
