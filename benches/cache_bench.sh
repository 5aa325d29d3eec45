#!/usr/bin/env bash
# Cache-hit benchmark: direct vs. sidelight (cache HIT) vs. nginx proxy_cache (HIT).
#
#   bash benches/cache_bench.sh                       # ROUNDS=5 DURATION=5
#   ROUNDS=1 DURATION=2 bash benches/cache_bench.sh   # quick smoke run
#
# Measures requests/s, latency p50/p99 and CPU per request with wrk for
#   direct         wrk -> mock_openai                          (GET /ping, the baseline)
#   sidelight-hit  wrk -> sidelight, route with cache: { ttl: 10m }   (every request a HIT)
#   nginx-hit      wrk -> nginx with proxy_cache (proxy_cache_valid 200 10m)  (every request a HIT)
# at 1 and 64 concurrent keep-alive connections, ROUNDS times (targets
# interleaved inside each round, order rotated per round), and reports medians
# and the ratios sidelight-hit/nginx-hit and sidelight-hit/direct.
# Before measuring, it checks with curl that both caches answer HIT (and stops
# if not); after each run it counts the upstream requests the run caused (0 for
# a pure cache-hit run). See benches/README.md.
#
# The process/port/readiness/CPU helpers are shared with proxy_bench.sh
# (benches/lib.sh), and wrk output is parsed by benches/wrk_parse.py.
#
# Environment knobs:
#   ROUNDS=5        rounds; every (target, connections) pair is measured once per round
#   DURATION=5      seconds per measured wrk run
#   WARMUP=2        seconds of warm-up (64 connections) per target before round 1
#   HIGH_CONNS=64   the "many connections" level (>= 2; wrk uses 2 threads for it)
#   SKIP_BUILD=1    don't run cargo build (use the existing target/release binaries)
#   NO_NGINX=1      skip the nginx column
#   QUIET_WAIT=0    if > 0: before each run, wait up to this many seconds for other
#                   processes to use < QUIET_PCT% (default 10) of the CPU
#   KEEP_TMP=1      keep the temp dir (configs, server logs, raw wrk output)
#   READY_TIMEOUT=30  seconds to wait for each server to become ready
#   NGINX=/path     nginx binary to use (default: nginx on PATH, then /usr/sbin/nginx)
set -Eeuo pipefail

BENCH_NAME=cache_bench
BENCH_TAG='[cache-bench]'
BENCH_NGINX_COLUMN='nginx-hit column'
BENCH_TMP=sidelight-cache-bench
BENCH_CURL_WHY='HIT checks read response headers'
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Response headers of one GET (body discarded), CRs stripped.
http_head() { curl -sS --max-time 5 -D - -o /dev/null "$1" | tr -d '\r'; }

# header_value HEADERS NAME: value of the first header NAME (case-insensitive), or empty.
header_value() {
    awk -v want="$(printf '%s' "$2" | tr '[:upper:]' '[:lower:]')" '
        { i = index($0, ":"); if (i == 0) next
          name = tolower(substr($0, 1, i - 1))
          if (name == want) { v = substr($0, i + 1); sub(/^[ \t]+/, "", v); print v; exit } }' <<<"$1"
}

# The mock upstream numbers the requests it serves (x-mock-request-count); one
# direct GET /ping reads the counter (and adds 1 to it).
upstream_count() {
    local h n
    h=$(http_head "$DIRECT_URL") || die "cannot reach the upstream at $DIRECT_URL"
    n=$(header_value "$h" x-mock-request-count)
    [[ $n =~ ^[0-9]+$ ]] || die "the upstream's answer has no x-mock-request-count header:
$h"
    echo "$n"
}

# Check that URL is answered from the cache: header NAME must be HIT. The
# first request after startup may be the MISS that fills the cache, so allow
# a few tries; then also check that a HIT did not reach the upstream.
expect_hit() {  # expect_hit LABEL URL HEADER
    local label=$1 url=$2 header=$3 h v try before after
    for try in 1 2 3 4 5; do
        h=$(http_head "$url") || die "$label: GET $url failed"
        v=$(header_value "$h" "$header")
        [[ $v == HIT ]] && break
        sleep 0.2
    done
    if [[ $v != HIT ]]; then
        printf '%s\n' "$h" >&2
        die "$label does not answer from its cache: after $try requests to $url, '$header' is '${v:-<missing>}' (expected HIT); response headers above"
    fi
    before=$(upstream_count)
    h=$(http_head "$url") || die "$label: GET $url failed"
    v=$(header_value "$h" "$header")
    after=$(upstream_count)
    if [[ $v != HIT ]] || (( after - before - 1 != 0 )); then
        printf '%s\n' "$h" >&2
        die "$label: a repeat of $url was '${v:-<missing>}' and caused $((after - before - 1)) upstream request(s) (expected HIT and 0)"
    fi
    log "$label: GET $url -> $header: HIT (and no upstream request)"
}

read -r P_UP P_SL P_ADMIN P_NGX < <(free_ports 4)
[[ -n ${P_NGX:-} ]] || die "could not pick free ports"

# --- upstream
start mock "$TMP/mock.log" "$MOCK_BIN" --listen "127.0.0.1:$P_UP"
MOCK_PID=${PIDS[-1]}
DIRECT_URL="http://127.0.0.1:$P_UP/ping"
wait_ready mock_openai "$MOCK_PID" "$DIRECT_URL" pong
log "mock_openai ready on 127.0.0.1:$P_UP (pid $MOCK_PID)"

# --- sidelight, one caching route
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
    cache: { ttl: 10m }
EOF
start sidelight "$TMP/sidelight.log" "$SIDELIGHT_BIN" --config "$TMP/sidelight.yaml"
SL_PID=${PIDS[-1]}
wait_ready "sidelight admin" "$SL_PID" "http://127.0.0.1:$P_ADMIN/readyz"
wait_ready sidelight "$SL_PID" "http://127.0.0.1:$P_SL/ping" pong
log "sidelight ready on 127.0.0.1:$P_SL (admin $P_ADMIN, pid $SL_PID)"
expect_hit sidelight "http://127.0.0.1:$P_SL/ping" x-sidelight-cache

TARGETS=(direct sidelight-hit)
declare -A URL=(
    [direct]="$DIRECT_URL"
    [sidelight-hit]="http://127.0.0.1:$P_SL/ping"
)

# --- nginx with proxy_cache
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
    mkdir -p "$TMP/nginx-temp" "$TMP/nginx-cache"
    # As root, nginx would switch workers to 'nobody', which can't enter the
    # 0700 temp dir; benchmark-only, so keep the invoking user.
    user_line=""
    [[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
    cat >"$TMP/nginx.conf" <<EOF
# Generated by benches/cache_bench.sh
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

    # The response cache: metadata in shared memory, bodies in files under the
    # temp dir (served from the page cache once read).
    proxy_cache_path $TMP/nginx-cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=60m use_temp_path=off;

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
            proxy_cache bench;
            proxy_cache_key \$request_uri;
            proxy_cache_valid 200 10m;
            add_header X-Cache-Status \$upstream_cache_status;
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
    expect_hit nginx "http://127.0.0.1:$P_NGX/ping" x-cache-status
    TARGETS+=(nginx-hit)
    URL[nginx-hit]="http://127.0.0.1:$P_NGX/ping"
fi

# ------------------------------------------------------------------ measure

RUNS="$TMP/runs.jsonl"
: >"$RUNS"
NOTE="wrk, the upstream and the proxy under test all run on this machine's $NCPU cores over loopback: they compete for CPU, so absolute numbers understate dedicated hardware. Compare ratios within one run, not absolute numbers across machines."

n_targets=${#TARGETS[@]}
total_runs=$(( ROUNDS * 2 * n_targets ))
est=$(( total_runs * DURATION + n_targets * WARMUP ))
log "targets: ${TARGETS[*]}; $ROUNDS round(s) x {1, $HIGH_CONNS} conns x ${DURATION}s => ~${est}s of load"
log "note: $NOTE"

CPU_GROUPS=("bench=$$" "upstream=$MOCK_PID" "direct=$MOCK_PID" "sidelight-hit=$SL_PID")
[[ -n ${NGX_PID:-} ]] && CPU_GROUPS+=("nginx-hit=$NGX_PID")
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
            up0=$(upstream_count)
            snap0=$(cpusnap)
            run_wrk "$t" "$threads" "$conns" "$DURATION" "$out"
            snap1=$(cpusnap)
            up1=$(upstream_count)
            line=$(python3 "$PARSE" parse --target "$t" --conns "$conns" --round "$r" \
                       --cpu-before "$snap0" --cpu-after "$snap1" <"$out") \
                || { cat "$out" >&2; die "could not parse wrk output for $t @$conns"; }
            # Upstream requests caused by the run (the first counter read is one
            # of them): 0 when every answer came from the cache. Not meaningful
            # for direct, where every request is an upstream request.
            line=$(python3 - "$line" "$t" "$((up1 - up0 - 1))" <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
d["upstream_calls"] = None if sys.argv[2] == "direct" else int(sys.argv[3])
print(json.dumps(d))
EOF
)
            printf '%s\n' "$line" >>"$RUNS"
            python3 - "$line" "$run_no" "$total_runs" "$r" <<'EOF' >&2
import json, sys
d = json.loads(sys.argv[1]); n, tot, r = sys.argv[2:5]
err = d["socket_errors"] + d["non_2xx"]
other = d.get("other_cpu_pct", 0)
up = d.get("upstream_calls")
cpu = d.get("proxy_cpu_us_per_req")
print(f"[cache-bench] run {n:>3}/{tot} round {r} c={d['conns']:<3} {d['target']:<14}"
      f" {d['rps']:>10,.0f} req/s  p50 {d['p50_us']:>8,.0f}us  p99 {d['p99_us']:>8,.0f}us"
      + (f"  cpu/req {cpu:>5.1f}us" if cpu is not None else "")
      + f"  other-cpu {other:>3.0f}%"
      + (f"  upstream-calls {up}" if up is not None else "")
      + (f"  ERRORS {err}" if err else ""))
EOF
        done
    done
done

# Still HITs after the load (and nothing expired or was evicted meanwhile)?
expect_hit sidelight "${URL[sidelight-hit]}" x-sidelight-cache
if [[ -n ${URL[nginx-hit]:-} ]]; then expect_hit nginx "${URL[nginx-hit]}" x-cache-status; fi

# sidelight's own view: cache lookups by result over the whole benchmark.
sl_lookups=$(curl -fsS --max-time 5 "http://127.0.0.1:$P_ADMIN/metrics" 2>/dev/null \
    | awk '/^sidelight_cache_lookups_total\{/ {
               match($0, /result="[a-z]+"/); r = substr($0, RSTART + 8, RLENGTH - 9)
               n[r] += $NF }
           END { for (r in n) printf "%s%s=%d", (c++ ? " " : ""), r, n[r] }') || true

# ------------------------------------------------------------------ report

mkdir -p "$RESULTS_DIR"
cmd="ROUNDS=$ROUNDS DURATION=$DURATION bash benches/cache_bench.sh"
[[ $WARMUP != 2 ]] && cmd="WARMUP=$WARMUP $cmd"
[[ $HIGH_CONNS != 64 ]] && cmd="HIGH_CONNS=$HIGH_CONNS $cmd"
[[ $NO_NGINX == 1 ]] && cmd="NO_NGINX=1 $cmd"
[[ $SKIP_BUILD == 1 ]] && cmd="SKIP_BUILD=1 $cmd"
[[ $QUIET_WAIT != 0 ]] && cmd="QUIET_WAIT=$QUIET_WAIT QUIET_PCT=$QUIET_PCT $cmd"
cpu=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n1)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $rev != unknown ]] && [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    rev+=" (with uncommitted changes in src/)"
fi
# `wrk --version` exits 1, hence the `|| true`.
wrk_version=$({ wrk --version 2>&1 || true; } | awk 'NR==1 {print $2}')

echo
echo "sidelight cache-hit benchmark: medians of $ROUNDS round(s) x ${DURATION}s, wrk -t1 -c1 / -t$HIGH_THREADS -c$HIGH_CONNS, GET /ping"
[[ -z $NGINX_BIN ]] && echo "(nginx not run: nginx-hit column skipped; install with: apt-get install -y nginx-light)"
echo
python3 - "$PARSE" "$RUNS" "$RESULTS_DIR/cache-latest.md" \
    "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    "host=$(uname -srm)" \
    "nproc=$NCPU" \
    "cpu=${cpu:-unknown}" \
    "rounds=$ROUNDS (targets interleaved, order rotated per round; warm-up ${WARMUP}s per target)" \
    "duration=${DURATION}s per run; wrk -t1 -c1 and -t$HIGH_THREADS -c$HIGH_CONNS, keep-alive, GET /ping" \
    "wrk=$wrk_version" \
    "sidelight=route with cache: { ttl: 10m } (default methods GET, HEAD), runtime workers = nproc; HIT checked with curl before and after the runs" \
    "nginx=$NGINX_VERSION (worker_processes 2; proxy_cache_path in the temp dir, proxy_cache_key \$request_uri, proxy_cache_valid 200 10m, upstream keepalive 256; X-Cache-Status HIT checked before and after the runs)" \
    "sidelight commit=$rev" \
    "sidelight cache lookups=${sl_lookups:-unavailable} (whole benchmark, from /metrics)" \
    "idle check=other processes used ${idle_other}% of the CPU in the second before the first run" \
    "command=$cmd" \
    "note=Note: $NOTE" <<'EOF'
import json, os, statistics, sys

parse_path, runs_path, md_path, *meta_kv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(parse_path))
import wrk_parse as wp  # summarise() and formatting, shared with proxy_bench.sh

meta = dict(kv.partition("=")[::2] for kv in meta_kv)
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
if not runs:
    sys.exit("cache_bench: no runs recorded")
summary = wp.summarise(runs)
for (c, t), s in summary.items():
    ups = [r["upstream_calls"] for r in runs if r["conns"] == c and r["target"] == t
           and r.get("upstream_calls") is not None]
    s["upstream_calls"] = sum(ups) if ups else None

ORDER = ("direct", "sidelight-hit", "nginx-hit")
levels = sorted({c for c, _ in summary})
lo, hi = levels[0], levels[-1]
rows = [(c, t, summary[(c, t)]) for c in levels for t in ORDER if (c, t) in summary]

def get(c, t, f):
    s = summary.get((c, t))
    return s[f] if s else None

def paired(c, a, b, f="rps"):
    """Per-round ratios a/b (both measured in the same round) -> (median, min, max)."""
    by = {}
    for r in runs:
        if r["conns"] == c:
            by.setdefault(r["round"], {})[r["target"]] = r[f]
    xs = [d[a] / d[b] for d in by.values() if a in d and b in d and d[b]]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None

def ratio_line(c, a, b, label, target=None):
    ra, rb = get(c, a, "rps"), get(c, b, "rps")
    if ra is None or rb is None or not rb:
        return None
    r = ra / rb
    line = f"{label} throughput @{c} = {r:.2f}"
    if target is not None:
        line += f" (target >= {target}: {'MET' if r >= target else 'NOT MET'})"
    p = paired(c, a, b)
    if p and len([x for x in runs if x["conns"] == c and x["target"] == a]) > 1:
        line += f"; per-round {p[0]:.2f} median, {p[1]:.2f}..{p[2]:.2f}"
    return line

ratios, warnings = [], []
have_nginx = any(t == "nginx-hit" for _, t in summary)
if have_nginx:
    for c in (hi, lo) if lo != hi else (hi,):
        line = ratio_line(c, "sidelight-hit", "nginx-hit", "sidelight-hit/nginx-hit", 1.0 if c == hi else None)
        if line:
            ratios.append(line)
else:
    ratios.append(f"sidelight-hit/nginx-hit throughput @{hi} = n/a (nginx not run)")
for c in levels:
    line = ratio_line(c, "sidelight-hit", "direct", "sidelight-hit/direct")
    if line:
        rn = wp._ratio(get(c, "nginx-hit", "rps"), get(c, "direct", "rps"))
        if rn is not None:
            line += f"; nginx-hit/direct = {rn:.2f}"
        ratios.append(line)
for c in levels:
    s50, n50, d50 = get(c, "sidelight-hit", "p50_us"), get(c, "nginx-hit", "p50_us"), get(c, "direct", "p50_us")
    parts = []
    if s50 is not None and n50:
        parts.append(f"sidelight-hit/nginx-hit = {s50 / n50:.2f}")
    if s50 is not None and d50:
        parts.append(f"sidelight-hit/direct = {s50 / d50:.2f}")
    if parts:
        ratios.append(f"p50 @{c}: " + "; ".join(parts))
for c in levels:
    sc, nc = get(c, "sidelight-hit", "proxy_cpu"), get(c, "nginx-hit", "proxy_cpu")
    if sc is not None and nc:
        ratios.append(f"CPU per request @{c}: sidelight-hit {sc:.1f}us vs nginx-hit {nc:.1f}us (= {sc / nc:.2f}x)")

for c, t, s in rows:
    if s["errors"] or s["non_2xx"]:
        warnings.append(f"WARNING: {t} @{c} conns: {s['errors']} socket errors, {s['non_2xx']} non-2xx/3xx "
                        f"responses (summed over {s['n']} rounds)")
    if s["upstream_calls"]:
        warnings.append(f"WARNING: {t} @{c} conns: {s['upstream_calls']} request(s) reached the upstream during "
                        f"the runs (summed over {s['n']} rounds): not every answer was a cache HIT")
busy = [(c, t, s["other_max"]) for c, t, s in rows if s["other_max"] >= wp.OTHER_LOAD_WARN_PCT]
if busy:
    worst = ", ".join(f"{t}@{c} {p:.0f}%" for c, t, p in busy)
    warnings.append(f"WARNING: other processes / hypervisor steal took >= {wp.OTHER_LOAD_WARN_PCT:.0f}% of the "
                    f"machine's CPU during some runs (worst per row: {worst}); those numbers are noisy")

def up(s):
    return "-" if s["upstream_calls"] is None else str(s["upstream_calls"])

# ---- text
T = [f"{'connections':<12}{'target':<15}{'req/s':>10}{'p50(us)':>10}{'p99(us)':>10}  {'req/s min..max':<20}"
     f"{'CPU/req':>9}{'upstream':>9}{'errors':>7}{'other%':>7}"]
prev = None
for c, t, s in rows:
    if prev is not None and c != prev:
        T.append("")
    prev = c
    spread = f"{wp._fmt_rps(s['rps_min'])}..{wp._fmt_rps(s['rps_max'])}"
    T.append(f"{c:<12}{t:<15}{wp._fmt_rps(s['rps']):>10}{wp._fmt_us(s['p50_us']):>10}{wp._fmt_us(s['p99_us']):>10}"
             f"  {spread:<20}{wp._fmt_cpu(s['proxy_cpu']):>9}{up(s):>9}{s['errors'] + s['non_2xx']:>7}{s['other_max']:>7.0f}")
T.append("")
for i, r in enumerate(ratios):
    T.append(("ratios: " if i == 0 else "        ") + r)
T.extend(warnings)
print("\n".join(T))

# ---- Markdown
L = ["# sidelight cache-hit benchmark", ""]
for k, v in meta.items():
    if k not in ("command", "note"):
        L.append(f"- **{k}**: {v}")
L += ["", "Command:", "", "```sh", meta.get("command", ""), "```", ""]
L.append("Targets: `direct` = wrk → mock upstream (baseline); `sidelight-hit` = wrk → sidelight, caching "
         "route, every request a HIT; `nginx-hit` = wrk → nginx `proxy_cache`, every request a HIT. "
         "Medians over all rounds. req/s range = min..max over rounds; CPU/req = median CPU time "
         "(user+sys) the process under test spent per request (for direct: the upstream itself); "
         "upstream = requests that reached the upstream during the measured runs, summed over rounds "
         "(0 = all HITs); errors = socket errors + non-2xx, summed over rounds; other% = highest share "
         "of the machine's CPU taken by processes outside the benchmark plus steal during any one run "
         "of that row. Per-round ratios pair the targets measured in the same round.")
L += ["", "| connections | target | req/s | p50 (µs) | p99 (µs) | req/s min..max | CPU/req | upstream | errors | other% |",
      "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
for c, t, s in rows:
    L.append(f"| {c} | {t} | {wp._fmt_rps(s['rps'])} | {wp._fmt_us(s['p50_us'])} | {wp._fmt_us(s['p99_us'])} "
             f"| {wp._fmt_rps(s['rps_min'])}..{wp._fmt_rps(s['rps_max'])} | {wp._fmt_cpu(s['proxy_cpu'])} "
             f"| {up(s)} | {s['errors'] + s['non_2xx']} | {s['other_max']:.0f} |")
L.append("")
L += [f"- {r}" for r in ratios]
L += [f"- **{w}**" for w in warnings]
if "note" in meta:
    L += ["", meta["note"]]
L.append("")
with open(md_path, "w") as f:
    f.write("\n".join(L))
EOF
cp "$RUNS" "$RESULTS_DIR/cache-latest-runs.jsonl"
echo
echo "note: $NOTE"
echo "wrote $RESULTS_DIR/cache-latest.md (raw per-run numbers: $RESULTS_DIR/cache-latest-runs.jsonl)"
