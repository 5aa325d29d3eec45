#!/usr/bin/env python3
"""Helper for benches/proxy_bench.sh: parse wrk output and summarise runs.

  wrk_parse.py parse --target T --conns N --round R < wrk-output  >> runs.jsonl
      Reads one `wrk --latency` report on stdin, prints one JSON line:
      {"target", "conns", "round", "rps", "p50_us", "p99_us", "requests",
       "socket_errors", "non_2xx"}.  Exits 1 if the report can't be parsed.

      With --cpu-before/--cpu-after (two `cpusnap` outputs) it also records
      other_cpu_pct: share of the machine's CPU taken by processes outside the
      benchmark (plus hypervisor steal) during the run.

  wrk_parse.py cpusnap NAME=PID...
      Prints a JSON CPU snapshot (system-wide and for each PID's process tree).
      Groups named like the --target (and "upstream") also give the CPU time
      per request the proxy under test (and the upstream) spent in the run.

  wrk_parse.py report runs.jsonl --md OUT.md [--meta KEY=VALUE ...]
      Prints the median table and ratios, and writes the same as Markdown.

  wrk_parse.py selftest
      Checks the parser against canned wrk output.

Standard library only (python3 >= 3.8).
"""

import argparse
import json
import os
import re
import statistics
import sys

# wrk's format_time() uses these units (see wrk src/units.c).
_TIME_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
# Req/Sec per-thread stats may carry k/M/G suffixes; "Requests/sec:" never does.
_COUNT_UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
# Per-run share of total CPU taken by processes outside the benchmark (plus
# steal) above which the report warns.
OTHER_LOAD_WARN_PCT = 10.0


def to_us(value, unit):
    """Convert a wrk time value (e.g. 38.00, "us") to microseconds."""
    try:
        return float(value) * _TIME_UNITS_US[unit]
    except KeyError:
        raise ValueError(f"unknown wrk time unit {unit!r}") from None


def parse_wrk(text):
    """Parse one `wrk --latency` report. Returns a dict or raises ValueError."""
    out = {}
    m = re.search(r"^Requests/sec:\s*" + _NUM + r"\s*$", text, re.M)
    if not m:
        raise ValueError("no 'Requests/sec:' line in wrk output")
    out["rps"] = float(m.group(1))

    for pct, key in (("50", "p50_us"), ("99", "p99_us")):
        m = re.search(r"^\s*" + pct + r"(?:\.0+)?%\s+" + _NUM + r"\s*(us|ms|s|m|h)\s*$", text, re.M)
        if not m:
            raise ValueError(f"no '{pct}%' latency line in wrk output (was --latency passed?)")
        out[key] = to_us(m.group(1), m.group(2))

    m = re.search(r"^\s*([0-9]+) requests in ", text, re.M)
    out["requests"] = int(m.group(1)) if m else None

    # Only printed when non-zero.
    m = re.search(
        r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", text
    )
    out["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    out["socket_errors_detail"] = m.group(0) if m else ""
    m = re.search(r"Non-2xx or 3xx responses:\s*([0-9]+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    return out


# ---------------------------------------------------------------- CPU accounting
#
# The machine is shared (other builds, hypervisor steal). To tell how much of a
# run's CPU went to something other than the benchmark, snapshot before and after
# it: system-wide user+nice+system and steal ticks from /proc/stat, and the CPU
# ticks of "our" process trees (the bench script, whose reaped children such as
# wrk land in its cutime/cstime, and the servers plus their children). Softirq
# time is left out: loopback networking is charged there, not to a process.


def _read_proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces/parens; fields resume after the last ')'.
    rest = data[data.rindex(")") + 2 :].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, utime + stime + cutime + cstime


def cpu_snapshot(groups):
    """groups: {name: pid}. Returns machine-wide ticks, ticks of all the groups'
    process trees together ("ours") and of each tree ("groups")."""
    import time

    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    user, nice, system = cpu[0], cpu[1], cpu[2]
    steal = cpu[7] if len(cpu) > 7 else 0
    # Walk all processes once: (ppid, ticks) by pid, then take descendants.
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                procs[int(name)] = _read_proc_stat(name)
            except (OSError, ValueError, IndexError):
                pass
    children = {}
    for pid, (ppid, _t) in procs.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root):
        seen, stack = set(), [root] if root in procs else []
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.add(p)
                stack.extend(children.get(p, []))
        return seen

    me = os.getpid()
    trees = {name: tree(pid) - {me} for name, pid in groups.items()}
    everyone = set().union(*trees.values()) if trees else set()
    return {
        "t": time.clock_gettime(time.CLOCK_MONOTONIC),
        "busy": user + nice + system,
        "steal": steal,
        "ours": sum(procs[p][1] for p in everyone),
        "groups": {name: sum(procs[p][1] for p in t) for name, t in trees.items()},
        "hz": os.sysconf("SC_CLK_TCK"),
        "ncpu": os.cpu_count() or 1,
    }


def group_cpu_us(before, after, name):
    """CPU microseconds used by group `name` between two snapshots (None if unknown)."""
    try:
        ticks = after["groups"][name] - before["groups"][name]
    except KeyError:
        return None
    return ticks * 1e6 / after["hz"]


def other_load(before, after):
    """(foreign_pct, steal_pct) of total CPU capacity between two snapshots."""
    cap = (after["t"] - before["t"]) * after["hz"] * after["ncpu"]
    if cap <= 0:
        return 0.0, 0.0
    foreign = (after["busy"] - before["busy"]) - (after["ours"] - before["ours"])
    steal = after["steal"] - before["steal"]
    return max(0.0, 100.0 * foreign / cap), max(0.0, 100.0 * steal / cap)


# ---------------------------------------------------------------- report


def _fmt_rps(x):
    return f"{x:,.0f}" if x is not None else "-"


def _fmt_us(x):
    return f"{x:,.0f}" if x is not None else "-"


def _fmt_cpu(x):
    return f"{x:.1f}us" if x is not None else "-"


def _median(xs):
    return statistics.median(xs) if xs else None


def summarise(runs):
    """Group runs by (conns, target) -> medians and spread."""
    groups = {}
    for r in runs:
        groups.setdefault((r["conns"], r["target"]), []).append(r)
    summary = {}
    for key, rs in groups.items():
        rps = [r["rps"] for r in rs]
        summary[key] = {
            "n": len(rs),
            "rps": _median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_us": _median([r["p50_us"] for r in rs]),
            "p99_us": _median([r["p99_us"] for r in rs]),
            "errors": sum(r.get("socket_errors", 0) for r in rs),
            "non_2xx": sum(r.get("non_2xx", 0) for r in rs),
            "proxy_cpu": _median([r["proxy_cpu_us_per_req"] for r in rs if r.get("proxy_cpu_us_per_req") is not None]),
            "other_max": max((r.get("other_cpu_pct", 0.0) for r in rs), default=0.0),
        }
    return summary


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_report(
    summary, targets_order=("direct", "sidelight", "sidelight-tc", "nginx", "nginx-fwd")
):
    """Returns (rows, ratio_lines, warnings)."""
    conns_levels = sorted({c for c, _ in summary})
    rows = []
    for c in conns_levels:
        for t in targets_order:
            s = summary.get((c, t))
            if s:
                rows.append((c, t, s))

    def get(c, t, field):
        s = summary.get((c, t))
        return s[field] if s else None

    hi = max(conns_levels) if conns_levels else None
    lo = min(conns_levels) if conns_levels else None
    ratios = []
    warnings = []
    have_nginx = any(t == "nginx" for _, t in summary)

    if have_nginx:
        r = _ratio(get(hi, "sidelight", "rps"), get(hi, "nginx", "rps"))
        if r is not None:
            verdict = "MET" if r >= 1.0 else "NOT MET"
            ratios.append(f"sidelight/nginx throughput @{hi} = {r:.2f} (target >= 1.0: {verdict})")
    else:
        ratios.append(f"sidelight/nginx throughput @{hi} = n/a (nginx not run)")
    r = _ratio(get(hi, "sidelight", "rps"), get(hi, "nginx-fwd", "rps"))
    if r is not None:
        ratios.append(
            f"sidelight/nginx-fwd throughput @{hi} = {r:.2f} (equal work: nginx also adding "
            "request ids and X-Forwarded-*)"
        )

    d50 = get(lo, "direct", "p50_us")
    s50 = get(lo, "sidelight", "p50_us")
    if d50 is not None and s50 is not None:
        added = s50 - d50
        verdict = "MET" if added < 100 else "NOT MET"
        line = f"sidelight added p50 @{lo} = {added:.0f}us (target < 100us: {verdict})"
        n50 = get(lo, "nginx", "p50_us")
        if n50 is not None:
            line += f"; nginx added p50 @{lo} = {n50 - d50:.0f}us"
        ratios.append(line)

    for c in conns_levels:
        r = _ratio(get(c, "sidelight", "rps"), get(c, "direct", "rps"))
        if r is not None:
            line = f"sidelight/direct throughput @{c} = {r:.2f}"
            rn = _ratio(get(c, "nginx", "rps"), get(c, "direct", "rps"))
            if rn is not None:
                line += f"; nginx/direct = {rn:.2f}"
            ratios.append(line)
    for c in conns_levels:
        sc, nc = get(c, "sidelight", "proxy_cpu"), get(c, "nginx", "proxy_cpu")
        if sc is not None and nc is not None and nc > 0:
            line = f"proxy CPU per request @{c}: sidelight {sc:.1f}us vs nginx {nc:.1f}us (= {sc / nc:.2f}x)"
            fc = get(c, "nginx-fwd", "proxy_cpu")
            if fc:
                line += f"; vs nginx-fwd {fc:.1f}us (= {sc / fc:.2f}x)"
            ratios.append(line)
    for c in conns_levels:
        r = _ratio(get(c, "sidelight-tc", "rps"), get(c, "sidelight", "rps"))
        if r is not None:
            line = f"sidelight-tc/sidelight throughput @{c} = {r:.2f}"
            if c == hi:
                verdict = "MET" if r >= 0.90 else "NOT MET"
                line += f" (traffic control costs < 10%: {verdict})"
            ratios.append(line)
    if have_nginx and lo != hi:
        r = _ratio(get(lo, "sidelight", "rps"), get(lo, "nginx", "rps"))
        if r is not None:
            ratios.append(f"sidelight/nginx throughput @{lo} = {r:.2f}")

    for c, t, s in rows:
        if s["errors"] or s["non_2xx"]:
            warnings.append(
                f"WARNING: {t} @{c} conns: {s['errors']} socket errors, "
                f"{s['non_2xx']} non-2xx/3xx responses (summed over {s['n']} rounds)"
            )
    busy = [(c, t, s["other_max"]) for c, t, s in rows if s["other_max"] >= OTHER_LOAD_WARN_PCT]
    if busy:
        worst = ", ".join(f"{t}@{c} {pct:.0f}%" for c, t, pct in busy)
        warnings.append(
            f"WARNING: other processes / hypervisor steal took >= {OTHER_LOAD_WARN_PCT:.0f}% of the "
            f"machine's CPU during some runs (worst per row: {worst}); those numbers are noisy, "
            "rerun on a quieter machine if the ratios matter"
        )
    return rows, ratios, warnings


def render_text(rows, ratios, warnings):
    lines = []
    hdr = f"{'connections':<12}{'target':<11}{'req/s':>10}{'p50(us)':>10}{'p99(us)':>10}  {'req/s min..max':<20}{'proxyCPU/req':>13}{'errors':>7}{'other%':>7}"
    lines.append(hdr)
    prev = None
    for c, t, s in rows:
        if prev is not None and c != prev:
            lines.append("")
        prev = c
        spread = f"{_fmt_rps(s['rps_min'])}..{_fmt_rps(s['rps_max'])}"
        lines.append(
            f"{c:<12}{t:<11}{_fmt_rps(s['rps']):>10}{_fmt_us(s['p50_us']):>10}{_fmt_us(s['p99_us']):>10}"
            f"  {spread:<20}{_fmt_cpu(s['proxy_cpu']):>13}{s['errors'] + s['non_2xx']:>7}{s['other_max']:>7.0f}"
        )
    lines.append("")
    for i, r in enumerate(ratios):
        lines.append(("ratios: " if i == 0 else "        ") + r)
    lines.extend(warnings)
    return "\n".join(lines)


def render_md(rows, ratios, warnings, meta):
    L = []
    L.append("# sidelight proxy benchmark")
    L.append("")
    for key in ("date", "host", "nproc", "cpu", "rounds", "duration", "wrk", "nginx", "sidelight commit"):
        if key in meta:
            L.append(f"- **{key}**: {meta[key]}")
    for key, val in meta.items():
        if key not in (
            "date", "host", "nproc", "cpu", "rounds", "duration", "wrk", "nginx",
            "sidelight commit", "command", "note",
        ):
            L.append(f"- **{key}**: {val}")
    if "command" in meta:
        L.append("")
        L.append("Command:")
        L.append("")
        L.append("```sh")
        L.append(meta["command"])
        L.append("```")
    L.append("")
    L.append(
        "Medians over all rounds. req/s range = min..max over rounds; errors = socket errors + "
        "non-2xx, summed over rounds; proxy CPU/req = median CPU time (user+sys) the process under "
        "test spent per request (for direct: the upstream itself); other% = highest share of the machine's total CPU taken by "
        "processes outside the benchmark plus hypervisor steal during any one run of that row."
    )
    L.append("")
    L.append("| connections | target | req/s | p50 (µs) | p99 (µs) | req/s min..max | proxy CPU/req | errors | other% |")
    L.append("|---:|---|---:|---:|---:|---|---:|---:|---:|")
    for c, t, s in rows:
        L.append(
            f"| {c} | {t} | {_fmt_rps(s['rps'])} | {_fmt_us(s['p50_us'])} | {_fmt_us(s['p99_us'])} "
            f"| {_fmt_rps(s['rps_min'])}..{_fmt_rps(s['rps_max'])} | {_fmt_cpu(s['proxy_cpu'])} "
            f"| {s['errors'] + s['non_2xx']} "
            f"| {s['other_max']:.0f} |"
        )
    L.append("")
    for r in ratios:
        L.append(f"- {r}")
    for w in warnings:
        L.append(f"- **{w}**")
    if "note" in meta:
        L.append("")
        L.append(meta["note"])
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- CLI


def cmd_parse(args):
    text = sys.stdin.read()
    try:
        rec = parse_wrk(text)
    except ValueError as e:
        print(f"wrk_parse: {e}", file=sys.stderr)
        return 1
    rec = {"target": args.target, "conns": args.conns, "round": args.round, **rec}
    if args.cpu_before and args.cpu_after:
        foreign, steal = other_load(json.loads(args.cpu_before), json.loads(args.cpu_after))
        rec["foreign_cpu_pct"] = round(foreign, 1)
        rec["steal_pct"] = round(steal, 1)
        rec["other_cpu_pct"] = round(foreign + steal, 1)
        before, after = json.loads(args.cpu_before), json.loads(args.cpu_after)
        for group, key in ((args.target, "proxy_cpu_us_per_req"), ("upstream", "upstream_cpu_us_per_req")):
            us = group_cpu_us(before, after, group)
            if us is not None and rec.get("requests"):
                rec[key] = round(us / rec["requests"], 2)
    print(json.dumps(rec))
    return 0


def cmd_cpusnap(args):
    groups = {}
    for kv in args.groups:
        name, _, pid = kv.partition("=")
        groups[name] = int(pid)
    print(json.dumps(cpu_snapshot(groups)))
    return 0


def cmd_otherload(args):
    foreign, steal = other_load(json.loads(args.before), json.loads(args.after))
    print(f"{foreign + steal:.0f}")
    return 0


def cmd_report(args):
    runs = []
    with open(args.runs) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    if not runs:
        print("wrk_parse: no runs recorded", file=sys.stderr)
        return 1
    meta = {}
    for kv in args.meta or []:
        k, _, v = kv.partition("=")
        meta[k] = v
    rows, ratios, warnings = build_report(summarise(runs))
    print(render_text(rows, ratios, warnings))
    if args.md:
        with open(args.md, "w") as f:
            f.write(render_md(rows, ratios, warnings, meta))
    return 0


_SAMPLE = """Running 2s test @ http://127.0.0.1:18080/ping
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21ms  350.12us   9.87ms   80.00%
    Req/Sec    26.50k     1.20k   28.00k    70.00%
  Latency Distribution
     50%    1.10ms
     75%    1.40ms
     90%    1.70ms
     99%  812.00us
  105000 requests in 2.00s, 9.91MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:  52487.35
Transfer/sec:      4.95MB
"""


def cmd_selftest(_args):
    r = parse_wrk(_SAMPLE)
    assert r["rps"] == 52487.35, r
    assert abs(r["p50_us"] - 1100.0) < 1e-6, r
    assert abs(r["p99_us"] - 812.0) < 1e-6, r
    assert r["requests"] == 105000, r
    assert r["socket_errors"] == 3 and r["non_2xx"] == 3, r
    assert to_us("1.5", "s") == 1.5e6
    try:
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    except ValueError:
        pass
    else:
        raise AssertionError("bad input parsed")
    runs = [
        {"target": t, "conns": c, "round": i, "rps": rps, "p50_us": p50, "p99_us": p50 * 3,
         "socket_errors": 0, "non_2xx": 0}
        for i in range(3)
        for (t, c, rps, p50) in [
            ("direct", 1, 30000 + i, 30.0), ("sidelight", 1, 15000 + i, 60.0 + i),
            ("nginx", 1, 12000, 80.0), ("direct", 64, 90000, 700.0),
            ("sidelight", 64, 44000, 1400.0), ("nginx", 64, 40000, 1500.0),
        ]
    ]
    rows, ratios, _w = build_report(summarise(runs))
    assert len(rows) == 6
    assert "1.10" in ratios[0] and "MET" in ratios[0], ratios
    assert "= 31us" in ratios[1], ratios
    snap = cpu_snapshot({"self": os.getppid()})
    assert "self" in snap["groups"], snap
    assert snap["busy"] > 0 and snap["hz"] > 0, snap
    f, st = other_load(snap, dict(snap, t=snap["t"] + 1))
    assert f == 0.0 and st == 0.0
    print("selftest ok")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("--target", required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--cpu-before", help="cpusnap JSON taken just before the run")
    p.add_argument("--cpu-after", help="cpusnap JSON taken just after the run")
    p.set_defaults(func=cmd_parse)
    p = sub.add_parser("cpusnap", help="print a CPU snapshot (JSON) for NAME=PID process trees")
    p.add_argument("groups", nargs="*", metavar="NAME=PID")
    p.set_defaults(func=cmd_cpusnap)
    p = sub.add_parser("otherload", help="percent of CPU taken by others between two cpusnaps")
    p.add_argument("before")
    p.add_argument("after")
    p.set_defaults(func=cmd_otherload)
    p = sub.add_parser("report")
    p.add_argument("runs")
    p.add_argument("--md")
    p.add_argument("--meta", action="append")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("selftest")
    p.set_defaults(func=cmd_selftest)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
