"""psycopg 3 with prepare_threshold=0: every query is a named prepared statement (`_pg3_0`,
...). Two connections take turns on a pool of one server connection, so each one's statements
must survive the other's use of it. Needs prepared-statement support in transaction mode.
Usage: psycopg_prepared.py <conninfo>."""

import sys

import psycopg

conninfo = sys.argv[1]

a = psycopg.connect(conninfo, prepare_threshold=0, autocommit=True)
b = psycopg.connect(conninfo, prepare_threshold=0, autocommit=True)
for i in range(20):
    assert a.execute("select %s::int * 2", (i,)).fetchone()[0] == i * 2
    assert b.execute("select %s::int * 3", (i,)).fetchone()[0] == i * 3
    with a.transaction():
        assert a.execute("select %s::text || 'a'", (str(i),)).fetchone()[0] == f"{i}a"
a.close()
b.close()
print("psycopg prepared: ok")
