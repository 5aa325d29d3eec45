#!/usr/bin/env bash
# Soak: steady load through the release binary while the upstream misbehaves, watching
# sidelight's memory and file descriptors. Not part of the test suite; bounded by DURATION.
#
#   bash benches/soak.sh                 # 120 s of load
#   DURATION=30 bash benches/soak.sh     # shorter
#
# Not wrk (it cannot tell a sidelight error type from a reset): examples/soak_client.rs sends
# the load (keep-alive workers, every outcome recorded) and examples/faulty_upstream.rs
# answers it, with resets, stalls past sidelight's first-byte timeout and 500/503s at the mix
# below. sidelight runs in front with short timeouts, retries and outlier detection. Every second the script samples sidelight's RSS
# (VmRSS) and open fds (/proc/PID/fd). At the end it prints the outcomes and the samples, and
# exits non-zero when
#   - any request got an unclear outcome (connection reset or closed by sidelight mid-request,
#     malformed response, body cut short, no answer within HANG_AFTER, failed connect), or
#   - RSS or fds did not stay flat: the last 5 s under load (median) above the 5 s after the
#     warm-up by more than 10% + RSS_SLACK_KIB / FD_SLACK, or fds once the load stopped (and
#     idle pooled connections timed out) above the pre-load count + FD_SLACK.
#
# Environment knobs:
#   DURATION=120       seconds of load
#   SOAK_WARMUP=10     seconds of load before the reference sample (less than DURATION/2)
#   CONCURRENCY=16     client connections (each a worker sending requests back to back)
#   RESET_PCT=5 STALL_PCT=5 ERROR_PCT=10   the upstream's fault mix (percent of requests)
#   STALL_FOR=1s       how long a stalled answer sends nothing (sidelight's first_byte is 300ms)
#   HANG_AFTER=5s      a request with no complete answer by then counts as a hang
#   RSS_SLACK_KIB=4096 FD_SLACK=16  absolute slack of the flatness checks
#   SKIP_BUILD=1       use the existing release binaries; KEEP_TMP=1 keep configs and logs
#   READY_TIMEOUT=30   seconds to wait for each server to become ready
set -Eeuo pipefail

DURATION=${DURATION:-120}
SOAK_WARMUP=${SOAK_WARMUP:-10}
CONCURRENCY=${CONCURRENCY:-16}
RESET_PCT=${RESET_PCT:-5}
STALL_PCT=${STALL_PCT:-5}
ERROR_PCT=${ERROR_PCT:-10}
STALL_FOR=${STALL_FOR:-1s}
HANG_AFTER=${HANG_AFTER:-5s}
RSS_SLACK_KIB=${RSS_SLACK_KIB:-4096}
FD_SLACK=${FD_SLACK:-16}
# Longer than the upstream pool's idle_timeout below, so idle upstream connections are gone.
IDLE_WAIT=4

for knob in SOAK_WARMUP CONCURRENCY RSS_SLACK_KIB FD_SLACK; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || { echo "soak: error: $knob must be an integer" >&2; exit 1; }
done
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "soak: error: DURATION must be a positive integer" >&2; exit 1; }
(( SOAK_WARMUP * 2 < DURATION )) || { echo "soak: error: SOAK_WARMUP must be less than DURATION/2" >&2; exit 1; }

# Build everything in one cargo run (the binaries share one fat-LTO build of the library),
# then let lib.sh find them.
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "[soak] building release binaries (first build takes minutes; may wait on the cargo lock)" >&2
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo build --release --bin sidelight \
        --example mock_openai --example faulty_upstream --example soak_client) \
        || { echo "soak: error: cargo build --release failed" >&2; exit 1; }
fi
SKIP_BUILD=1
NO_NGINX=1
BENCH_NAME=soak
BENCH_TAG='[soak]'
BENCH_NGINX_COLUMN='nginx'
BENCH_TMP=sidelight-soak
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FAULTY_BIN="$TARGET_DIR/release/examples/faulty_upstream"
CLIENT_BIN="$TARGET_DIR/release/examples/soak_client"
[[ -x $FAULTY_BIN && -x $CLIENT_BIN ]] \
    || die "missing $FAULTY_BIN or $CLIENT_BIN (build with: cargo build --release --example faulty_upstream --example soak_client)"

read -r P_UP P_SL P_ADMIN < <(free_ports 3)
[[ -n ${P_ADMIN:-} ]] || die "could not pick free ports"

# --- the faulty upstream
start faulty_upstream "$TMP/upstream.log" "$FAULTY_BIN" --listen "127.0.0.1:$P_UP" \
    --reset "$RESET_PCT" --stall "$STALL_PCT" --error "$ERROR_PCT" --stall-for "$STALL_FOR"
UP_PID=${PIDS[-1]}

# --- sidelight: short timeouts, retries, outlier detection over two endpoints (the same server)
cat >"$TMP/sidelight.yaml" <<EOF
listeners:
  - name: main
    address: 127.0.0.1:$P_SL
admin:
  address: 127.0.0.1:$P_ADMIN
log:
  level: error
  access_log: false
upstreams:
  - name: faulty
    endpoints: ["http://127.0.0.1:$P_UP", "http://127.0.0.1:$P_UP/"]
    pool: { max_idle_per_endpoint: 64, idle_timeout: 2s }
    timeouts: { connect: 500ms, first_byte: 300ms, idle: 1s, total: 2s }
    outlier_detection: { consecutive_failures: 5, base_ejection_time: 1s }
routes:
  - name: soak
    match: { path_prefix: / }
    upstream: faulty
    retries: { max_retries: 2, backoff: 10ms, max_backoff: 100ms }
EOF
start sidelight "$TMP/sidelight.log" "$SIDELIGHT_BIN" --config "$TMP/sidelight.yaml"
SL_PID=${PIDS[-1]}
wait_ready "sidelight admin" "$SL_PID" "http://127.0.0.1:$P_ADMIN/healthz"
# /ping answers "pong" unless the draw made it a fault: wait_ready retries until one passes.
wait_ready sidelight "$SL_PID" "http://127.0.0.1:$P_SL/ping" pong
kill -0 "$UP_PID" 2>/dev/null || die "faulty_upstream exited during startup"
log "faulty_upstream on 127.0.0.1:$P_UP (pid $UP_PID): reset ${RESET_PCT}%, stall ${STALL_PCT}% ($STALL_FOR), 5xx ${ERROR_PCT}%"
log "sidelight on 127.0.0.1:$P_SL (admin $P_ADMIN, pid $SL_PID)"

# --- sampling: "<seconds since load start> <VmRSS KiB> <open fds>" once a second
sample() {
    local rss fds
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SL_PID/status" 2>/dev/null) || return 1
    fds=$(find "/proc/$SL_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    printf '%s %s %s\n' "$1" "$rss" "$fds"
}
sample pre >"$TMP/samples"
LOAD_START=$SECONDS
(
    while kill -0 "$SL_PID" 2>/dev/null; do
        sample $((SECONDS - LOAD_START)) || break
        sleep 1
    done
) >>"$TMP/samples" &
PIDS+=("$!")
NAMES+=(sampler)
SAMPLER_PID=$!

log "load: ${DURATION}s, $CONCURRENCY connections, GET /ping (warm-up reference at ${SOAK_WARMUP}s)"
"$CLIENT_BIN" --url "http://127.0.0.1:$P_SL/ping" --concurrency "$CONCURRENCY" \
    --duration "${DURATION}s" --hang-after "$HANG_AFTER" >"$TMP/client.json" 2>"$TMP/client.log" \
    || die "soak_client failed"
LOAD_END=$((SECONDS - LOAD_START))
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
kill -0 "$SL_PID" 2>/dev/null || die "sidelight exited during the soak"
echo "load-end $(sample x | cut -d' ' -f2-)" >>"$TMP/samples"
sleep "$IDLE_WAIT"
echo "after-idle $(sample x | cut -d' ' -f2-)" >>"$TMP/samples"

# The upstream prints what it did when asked to stop.
kill -TERM "$UP_PID" 2>/dev/null || true
for _ in $(seq 1 50); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
UP_COUNTS=$(grep '^{' "$TMP/upstream.log" | tail -n1 || true)

cmd="DURATION=$DURATION bash benches/soak.sh"
for knob in SOAK_WARMUP=10 CONCURRENCY=16 RESET_PCT=5 STALL_PCT=5 ERROR_PCT=10 STALL_FOR=1s; do
    name=${knob%%=*}
    if [[ ${!name} != "${knob#*=}" ]]; then cmd="$name=${!name} $cmd"; fi
done
mkdir -p "$RESULTS_DIR"
# The report also goes to benches/results/soak-latest.txt; its exit status is the verdict.
python3 - "$TMP/samples" "$TMP/client.json" "${UP_COUNTS:-}" <<EOF | tee "$RESULTS_DIR/soak-latest.txt"
import json, sys
samples_path, client_path, up_counts = sys.argv[1:4]
duration, warm, conc = $DURATION, $SOAK_WARMUP, $CONCURRENCY
rss_slack, fd_slack = $RSS_SLACK_KIB, $FD_SLACK
timed, named = [], {}
for line in open(samples_path):
    parts = line.split()
    if len(parts) != 3:
        continue
    tag, rss, fds = parts[0], int(parts[1]), int(parts[2])
    if tag.isdigit():
        timed.append((int(tag), rss, fds))
    else:
        named[tag] = (rss, fds)
if not timed:
    sys.exit("soak: error: no samples taken")
under_load = [s for s in timed if s[0] <= duration]
def window(picked):
    # Median of a few samples: one second's count of in-flight and pooled connections is noisy.
    picked = picked or under_load[-1:]
    mid = len(picked) // 2
    rss = sorted(s[1] for s in picked)[mid]
    fds = sorted(s[2] for s in picked)[mid]
    return (picked[0][0], rss, fds)
warm_s = window([s for s in under_load if warm <= s[0] < warm + 5])
mid_s = window([s for s in under_load if abs(s[0] - duration // 2) <= 2])
end_s = window(under_load[-5:])
client = json.load(open(client_path))
clear, unclear = client["clear"], client["unclear"]
ok = clear.get("200 ok", 0)
total = sum(clear.values()) + sum(unclear.values())
errors = {k: v for k, v in clear.items() if k != "200 ok"}

print()
print(f"sidelight soak: {duration}s, {conc} connections, GET /ping through sidelight to an upstream")
print(f"injecting resets ${RESET_PCT}%, stalls ${STALL_PCT}% (${STALL_FOR}, past first_byte 300ms), 500/503 ${ERROR_PCT}%")
print(f"(sidelight: 2 endpoints, retries 2, outlier detection; command: $cmd)")
print()
print(f"requests         {total:>9}")
print(f"  succeeded      {ok:>9}  ({100 * ok / max(total, 1):.1f}%)")
print(f"  clear errors   {sum(errors.values()):>9}")
for k, v in sorted(errors.items(), key=lambda kv: -kv[1]):
    status, source = k.split(" ", 1)
    what = "upstream's own answer, passed through" if source == "upstream" else f"sidelight: {source}"
    print(f"    {status}  {what:<42} {v:>9}")
print(f"  unclear        {sum(unclear.values()):>9}")
for k, v in sorted(unclear.items(), key=lambda kv: -kv[1]):
    print(f"    {k:<48} {v:>9}   e.g. {client['examples'].get(k, '')[:100]}")
print(f"  slowest answer {client['max_latency_ms']:>7}ms")
try:
    up = json.loads(up_counts)
    print(f"upstream did: " + ", ".join(f"{k} {v}" for k, v in up.items()))
except ValueError:
    pass
print()
pre = named.get("pre")
after = named.get("after-idle")
cols = [("pre-load", pre), (f"warm {warm_s[0]}s+", warm_s[1:]), (f"middle {mid_s[0]}s+", mid_s[1:]),
        (f"end {end_s[0]}s+", end_s[1:]), ("after idle", after)]
print(f"{'':10}" + "".join(f"{c[0]:>14}" for c in cols))
print(f"{'RSS MiB':10}" + "".join(f"{(c[1][0] / 1024 if c[1] else float('nan')):>14.1f}" for c in cols))
print(f"{'open fds':10}" + "".join(f"{(c[1][1] if c[1] else '-'):>14}" for c in cols))
peak_rss = max(s[1] for s in under_load)
print(f"(medians of 5 one-second samples from the time shown; peak RSS under load {peak_rss / 1024:.1f} MiB; {len(timed)} samples)")
print()
fail = []
rss_limit = warm_s[1] * 1.10 + rss_slack
rss_flat = end_s[1] <= rss_limit
print(f"RSS flat:  {'yes' if rss_flat else 'NO'}  (end {end_s[1] / 1024:.1f} MiB <= {rss_limit / 1024:.1f} MiB = warm + 10% + {rss_slack // 1024} MiB)")
fd_limit = warm_s[2] * 1.10 + fd_slack
fd_flat = end_s[2] <= fd_limit
print(f"fds flat:  {'yes' if fd_flat else 'NO'}  (end {end_s[2]} <= {fd_limit:.0f} = warm + 10% + {fd_slack})")
fd_back = after is not None and pre is not None and after[1] <= pre[1] + fd_slack
print(f"fds back:  {'yes' if fd_back else 'NO'}  (after idle {after[1] if after else '-'} <= pre-load {pre[1] if pre else '-'} + {fd_slack})")
all_clear = total > 0 and ok > 0 and not unclear
print(f"outcomes:  {'yes' if all_clear else 'NO'}  (every request succeeded or got a clear error)")
for name, good in [("RSS grew", rss_flat), ("fds grew", fd_flat), ("fds not released", fd_back), ("unclear outcomes", all_clear)]:
    if not good:
        fail.append(name)
print()
print("PASS" if not fail else "FAIL: " + ", ".join(fail))
sys.exit(1 if fail else 0)
EOF
