#!/usr/bin/env bash
# pgbench against PostgreSQL directly, through sidelight's PostgreSQL pooler and through
# PgBouncer (transaction mode, same pool size), in the same run: interleaved rounds, medians,
# throughput ratios and the pooler's CPU time per transaction (from /proc, like the HTTP
# benchmarks).
#
#   ROUNDS=5 DURATION=10 CLIENTS=100 POOL=20 bash benches/pg_bench.sh
#
# Knobs: ROUNDS (5), DURATION seconds per run (10), CLIENTS (100), THREADS pgbench -j (2),
# POOL server connections per pooler (20), SCALE pgbench -s (10), WORKERS sidelight's
# runtime.workers (0: one per CPU), MODES ("simple extended
# prepared"), SCRIPTS ("select-only tpcb"), PGBOUNCER (path; default Debian's
# /usr/sbin/pgbouncer), SKIP_BUILD=1 to use target/release/sidelight as it is. Needs Debian's
# postgresql and pgbouncer packages (installed with apt-get when root and missing).
#
# -M prepared: PgBouncer gets max_prepared_statements = 200 when it is 1.21 or newer (Debian's
# 1.18 cannot run it and is left out of that mode; ../shared/anchors/build_pgbouncer.sh builds
# 1.25.2, use it as PGBOUNCER=...). The TPC-B-like script with -M prepared runs with -j equal
# to -c: pgbench 15 prepares with a blocking call per thread, which stalls behind any pooler
# when threads share connections and the pool is smaller than the client count.
set -euo pipefail
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-100}
THREADS=${THREADS:-2}
POOL=${POOL:-20}
SCALE=${SCALE:-10}
MODES=${MODES:-"simple extended prepared"}
SCRIPTS=${SCRIPTS:-"select-only tpcb"}
SKIP_BUILD=${SKIP_BUILD:-0}
WORKERS=${WORKERS:-0}
PGBIN=/usr/lib/postgresql/15/bin
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
log() { printf '[pg_bench] %s\n' "$*" >&2; }
die() { printf 'pg_bench: error: %s\n' "$*" >&2; exit 1; }

need_pkg() {  # need_pkg FILE PACKAGE
    [[ -x $1 ]] && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing $2"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 || { apt-get update -q >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; }
    fi
    [[ -x $1 ]] || die "$1 missing; install it with: sudo apt-get install $2"
}
need_pkg "$PGBIN/postgres" postgresql
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
[[ $PGBOUNCER == /usr/sbin/pgbouncer ]] && need_pkg "$PGBOUNCER" pgbouncer
[[ -x $PGBOUNCER ]] || die "PGBOUNCER=$PGBOUNCER is not executable"
PGBENCH=$(command -v pgbench || echo "$PGBIN/pgbench")

if [[ $SKIP_BUILD != 1 ]]; then
    log "building sidelight (release)"
    (cd "$ROOT" && cargo build --release --locked --bin sidelight) >&2 || die "cargo build failed"
fi
SIDELIGHT=${CARGO_TARGET_DIR:-$ROOT/target}/release/sidelight
[[ -x $SIDELIGHT ]] || die "missing $SIDELIGHT"

TMP=$(mktemp -d /tmp/pg_bench.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ $rc -eq 0 ]] || { for f in "$TMP"/*.log; do [[ -s $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done; }
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT INT TERM

as_user() {  # PostgreSQL and PgBouncer refuse root. exec: started with &, $! is the server's pid
    if [[ $(id -u) -eq 0 ]]; then exec setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; else exec "$@"; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT NAME
    for _ in $(seq 1 300); do
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$1" && return 0
        sleep 0.1
    done
    die "$2 did not come up on port $1"
}
[[ $(id -u) -eq 0 ]] && chown nobody:nogroup "$TMP"

PG_PORT=$(free_port); SL_PORT=$(free_port); SL_ADMIN=$(free_port); PB_PORT=$(free_port)
log "PostgreSQL on $PG_PORT"
(as_user "$PGBIN/initdb" -D "$TMP/data" -U postgres --auth=trust --no-sync) >"$TMP/initdb.log" 2>&1
as_user "$PGBIN/postgres" -D "$TMP/data" -p "$PG_PORT" -k "$TMP" -c listen_addresses=127.0.0.1 \
    -c max_connections=$((CLIENTS + 50)) -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off \
    >"$TMP/postgres.log" 2>&1 &
PIDS+=($!); PG_PID=$!
wait_port "$PG_PORT" postgres
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$TMP/init.log" 2>&1

cat >"$TMP/sidelight.yaml" <<YAML
listeners: [{ address: "127.0.0.1:0" }]
admin: { address: "127.0.0.1:$SL_ADMIN" }
log: { level: warn, access_log: false }
runtime: { workers: $WORKERS }
postgres:
  listeners: [{ address: "127.0.0.1:$SL_PORT" }]
  users: [{ name: postgres, password: "" }]
  pools:
    - { name: postgres, servers: ["127.0.0.1:$PG_PORT"], user: postgres, auth_type: trust, pool_size: $POOL }
YAML
"$SIDELIGHT" --config "$TMP/sidelight.yaml" >"$TMP/sidelight.log" 2>&1 &
PIDS+=($!); SL_PID=$!
wait_port "$SL_PORT" sidelight

cat >"$TMP/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $((CLIENTS + 50))
logfile = $TMP/pgbouncer.log
INI
# PgBouncer 1.21+ rewrites named statements (1.18 rejects the setting).
PB_VERSION=$("$PGBOUNCER" --version | sed -n 's/.*[Pp]g[Bb]ouncer \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
PB_PREPARED=$(python3 -c "v='${PB_VERSION:-0.0}'.split('.'); print(1 if (int(v[0]), int(v[1])) >= (1, 21) else 0)")
[[ $PB_PREPARED == 1 ]] && echo "max_prepared_statements = 200" >>"$TMP/pgbouncer.ini"
echo '"postgres" ""' >"$TMP/userlist.txt"
[[ $(id -u) -eq 0 ]] && chown nobody:nogroup "$TMP"/pgbouncer.ini "$TMP"/userlist.txt
as_user "$PGBOUNCER" "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.out.log" 2>&1 &
PIDS+=($!); PB_PID=$!
wait_port "$PB_PORT" pgbouncer
log "sidelight $("$SIDELIGHT" --version 2>/dev/null || echo) on $SL_PORT, pgbouncer $("$PGBOUNCER" --version | head -1) on $PB_PORT"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
RESULTS="$TMP/results.tsv"
run_one() {  # run_one TARGET PORT PID SCRIPT MODE ROUND
    local threads=$THREADS
    [[ $4 == tpcb && $5 == prepared ]] && threads=$CLIENTS
    local flags=(-n -c "$CLIENTS" -j "$threads" -T "$DURATION" -M "$5" -h 127.0.0.1 -p "$2" -U postgres)
    [[ $4 == select-only ]] && flags+=(-S)
    local before=0 after=0
    [[ $3 != - ]] && before=$(cpu_ticks "$3")
    local out
    out=$("$PGBENCH" "${flags[@]}" postgres 2>&1) || { echo "$out" >&2; die "pgbench against $1 failed"; }
    [[ $3 != - ]] && after=$(cpu_ticks "$3")
    local tps txns
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | tail -1)
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    local cpu_us=""
    [[ $3 != - ]] && cpu_us=$(python3 -c "print(f'{($after-$before)/$TICK*1e6/max($txns,1):.1f}')")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$4" "$5" "$1" "$6" "$tps" "$cpu_us" >>"$RESULTS"
    log "round $6 $4 -M $5 $1: $tps tps${cpu_us:+, $cpu_us µs CPU/txn}"
}

for round in $(seq 1 "$ROUNDS"); do
    for script in $SCRIPTS; do
        for mode in $MODES; do
            # Interleaved, rotating the order each round so no target always runs first.
            targets=("direct $PG_PORT -" "sidelight $SL_PORT $SL_PID")
            [[ $mode != prepared || $PB_PREPARED == 1 ]] && targets+=("pgbouncer $PB_PORT $PB_PID")
            for i in "${!targets[@]}"; do
                read -r name port pid <<<"${targets[$(( (i + round) % ${#targets[@]} ))]}"
                run_one "$name" "$port" "$pid" "$script" "$mode" "$round"
            done
        done
    done
done

python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CLIENTS" "$POOL" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
cpu = collections.defaultdict(list)
for line in open(sys.argv[1]):
    script, mode, target, rnd, tps, c = line.rstrip("\n").split("\t")
    rows[(script, mode, target)].append(float(tps))
    if c:
        cpu[(script, mode, target)].append(float(c))
print(f"\n{sys.argv[2]} rounds of {sys.argv[3]} s, {sys.argv[4]} clients, pool {sys.argv[5]}; medians\n")
print("| script | mode | target | tps | vs direct | vs pgbouncer | CPU per transaction |")
print("|---|---|---|---:|---:|---:|---:|")
for script in dict.fromkeys(k[0] for k in rows):
    for mode in dict.fromkeys(k[1] for k in rows if k[0] == script):
        med = {t: statistics.median(rows[(script, mode, t)]) for t in ("direct", "sidelight", "pgbouncer") if (script, mode, t) in rows}
        pb = lambda v: f"{v/med['pgbouncer']:.2f}x" if "pgbouncer" in med else "n/a"
        for t, v in med.items():
            c = cpu.get((script, mode, t))
            print(f"| {script} | {mode} | {t} | {v:,.0f} | {v/med['direct']:.2f}x | {pb(v)} | {statistics.median(c):.1f} µs |" if c else
                  f"| {script} | {mode} | {t} | {v:,.0f} | 1.00x | {pb(v)} | (server) |")
# The prepared-statement targets: sidelight -M prepared against its own -M simple and against
# PgBouncer's -M prepared, per script.
def med(script, mode, target):
    v = rows.get((script, mode, target))
    return statistics.median(v) if v else None
for script in dict.fromkeys(k[0] for k in rows):
    sp, ss, pp = med(script, "prepared", "sidelight"), med(script, "simple", "sidelight"), med(script, "prepared", "pgbouncer")
    if sp and ss:
        line = f"{script}: sidelight -M prepared = {sp/ss:.2f}x sidelight -M simple"
        if pp:
            line += f", {sp/pp:.2f}x pgbouncer -M prepared"
        print(f"\n{line}")
PY
