"""psycopg 3 through sidelight as an app runs it, with the default prepare_threshold (5) and
fewer executions than that of each query, so nothing is prepared by name: queries with
parameters, a transaction, an error and recovery, a pipeline, COPY in and out, and the
startup parameter application_name. Usage: psycopg_simple.py <conninfo>; exit status 0 when
every check passed."""

import sys

import psycopg

conninfo = sys.argv[1]

with psycopg.connect(conninfo, application_name="psycopg-simple", autocommit=True) as conn:
    assert conn.info.parameter_status("application_name") == "psycopg-simple"
    assert conn.info.parameter_status("server_version").startswith("15")
    row = conn.execute("select %s::int + 1, %s::text", (41, "x")).fetchone()
    assert row == (42, "x"), row
    assert conn.execute("select current_setting('application_name')").fetchone()[0] == "psycopg-simple"
    conn.execute("drop table if exists py_items")
    conn.execute("create table py_items (n int, s text)")
    with conn.transaction():
        conn.execute("insert into py_items values (%s, %s)", (1, "one"))
        conn.execute("insert into py_items values (%s, %s)", (2, "two"))
    try:
        conn.execute("select 1/0")
        raise SystemExit("division by zero did not fail")
    except psycopg.errors.DivisionByZero:
        pass
    with conn.pipeline():
        a = conn.execute("select count(*) from py_items")
        b = conn.execute("select max(n) from py_items")
    assert a.fetchone()[0] == 2 and b.fetchone()[0] == 2
    with conn.cursor() as cur:
        with cur.copy("COPY py_items FROM STDIN") as copy:
            for i in range(3, 1003):
                copy.write_row((i, f"row {i}"))
        out = bytearray()
        with cur.copy("COPY py_items TO STDOUT") as copy:
            for chunk in copy:
                out += chunk
    assert out.count(b"\n") == 1002, out.count(b"\n")
    assert conn.execute("select count(*) from py_items").fetchone()[0] == 1002

print("psycopg simple: ok")
