# Shared by proxy_bench.sh and cache_bench.sh (sourced, not run): the common knobs, tools,
# release build, server processes, free ports, CPU snapshots and wrk runs.
#
# Before sourcing, the caller sets:
#   BENCH_NAME    its name, for error messages (proxy_bench)
#   BENCH_TAG     its log prefix ([bench])
#   BENCH_NGINX_COLUMN   how its report names the nginx column, for the "skipping" message
#   BENCH_TMP     the temp dir's name prefix
#   BENCH_CURL_WHY (optional)  set when curl is required, to say what for
# Sourcing validates the knobs, finds (or installs) wrk and nginx, builds the release
# binaries unless SKIP_BUILD=1, creates $TMP and installs the cleanup trap.

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-2}
HIGH_CONNS=${HIGH_CONNS:-64}
SKIP_BUILD=${SKIP_BUILD:-0}
NO_NGINX=${NO_NGINX:-0}
KEEP_TMP=${KEEP_TMP:-0}
READY_TIMEOUT=${READY_TIMEOUT:-30}
QUIET_WAIT=${QUIET_WAIT:-0}
QUIET_PCT=${QUIET_PCT:-10}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PARSE="$HERE/wrk_parse.py"
RESULTS_DIR="$HERE/results"

log() { printf '%s %s\n' "$BENCH_TAG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$BENCH_NAME" "$*" >&2; exit 1; }

[[ $QUIET_WAIT =~ ^[0-9]+$ && $QUIET_PCT =~ ^[0-9]+$ ]] || die "QUIET_WAIT and QUIET_PCT must be integers"
for knob in ROUNDS DURATION WARMUP HIGH_CONNS READY_TIMEOUT; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer (got '${!knob}')"
done
(( HIGH_CONNS >= 2 )) || die "HIGH_CONNS must be at least 2 (1 connection is always measured)"
HIGH_THREADS=2   # wrk needs threads <= connections

command -v python3 >/dev/null || die "python3 is required (for $PARSE)"
if [[ -n ${BENCH_CURL_WHY:-} ]]; then
    command -v curl >/dev/null || die "curl is required ($BENCH_CURL_WHY); install it with: apt-get install -y curl"
fi

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
        log "nginx not found: SKIPPING the $BENCH_NGINX_COLUMN."
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

TMP=$(mktemp -d "${TMPDIR:-/tmp}/$BENCH_TMP.XXXXXX")
PIDS=()
NAMES=()

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

# Prints N free loopback ports *below* the kernel's ephemeral range, so that
# outgoing connections (wrk's, the proxies', other jobs' on this machine) can't
# grab them between this check and the servers' bind(). Prints fewer on failure.
free_ports() {  # free_ports N
    python3 - "$1" <<'EOF' || true
import random, socket, sys
want = int(sys.argv[1])
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
    if len(ports) == want:
        break
print(*ports)
EOF
}

# ------------------------------------------------------------------ measure

NCPU=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)

run_wrk() {  # run_wrk TARGET THREADS CONNS SECONDS OUTFILE   (URL[TARGET] is the address)
    local target=$1 threads=$2 conns=$3 secs=$4 out=$5
    if ! wrk -t"$threads" -c"$conns" -d"${secs}s" --latency "${URL[$target]}" >"$out" 2>&1; then
        cat "$out" >&2
        die "wrk failed against $target (${URL[$target]})"
    fi
}

# CPU snapshot of the machine and of everything the script runs (itself, wrk
# once reaped, the servers and their children), by the caller's CPU_GROUPS:
# lets each run report how much CPU other processes / hypervisor steal took
# meanwhile. Groups named after a target give that target's CPU per request;
# "upstream" the upstream's, "direct" is the upstream too (the process under
# test there).
cpusnap() { python3 "$PARSE" cpusnap "${CPU_GROUPS[@]}"; }

# Is the machine already busy? Measures 1s of idle time before loading it and
# sets idle_other (the % of CPU other processes used).
preflight_idle() {
    local snap0 snap1
    snap0=$(cpusnap); sleep 1; snap1=$(cpusnap)
    idle_other=$(python3 "$PARSE" otherload "$snap0" "$snap1")
    if (( idle_other >= QUIET_PCT )); then
        log "WARNING: other processes are using ${idle_other}% of the machine's CPU before the benchmark starts;"
        log "         results will be noisy (see the other% column)"
    else
        log "pre-flight: other processes use ${idle_other}% of the CPU"
    fi
}

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
