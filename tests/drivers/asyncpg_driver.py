"""asyncpg through sidelight. Usage: asyncpg_driver.py <host> <port> <database> <user>
<password> <mode>. Mode `unnamed`: statement_cache_size=0, so asyncpg uses unnamed statements
(what it needs with PgBouncer before 1.21). Mode `cached` (asyncpg's default): named prepared
statements, reused across server connections: a third connection holds a transaction on the
server connection a statement was prepared on, so the next use runs on the other one (pool of
two), which needs prepared-statement support in transaction mode."""

import asyncio
import sys

import asyncpg

host, port, database, user, password, mode = sys.argv[1:7]


async def main():
    cache = 0 if mode == "unnamed" else 100
    conns = [
        await asyncpg.connect(
            host=host,
            port=int(port),
            database=database,
            user=user,
            password=password,
            statement_cache_size=cache,
            server_settings={"application_name": f"asyncpg-{mode}"},
        )
        for _ in range(2)
    ]
    a, b = conns
    assert await a.fetchval("select current_setting('application_name')") == f"asyncpg-{mode}"
    for i in range(10):
        assert await a.fetchval("select $1::int * 2", i) == i * 2
        assert await b.fetchval("select $1::int * 3", i) == i * 3
    # Occupy the server connection `a` used last: its next statement runs on the other one.
    holder = await asyncpg.connect(
        host=host, port=int(port), database=database, user=user, password=password,
        statement_cache_size=0,
    )
    tx = holder.transaction()
    await tx.start()
    await holder.execute("select 1")
    for i in range(10):
        assert await a.fetchval("select $1::int * 2", i) == i * 2
    await tx.rollback()
    await holder.close()
    async with a.transaction():
        await a.execute(f"drop table if exists apg_{mode}")
        await a.execute(f"create table apg_{mode} (n int, s text)")
    await a.executemany(f"insert into apg_{mode} values ($1, $2)", [(i, str(i)) for i in range(200)])
    assert await b.fetchval(f"select count(*) from apg_{mode}") == 200
    try:
        await a.fetchval("select 1/0")
        raise SystemExit("division by zero did not fail")
    except asyncpg.exceptions.DivisionByZeroError:
        pass
    await a.copy_records_to_table(f"apg_{mode}", records=[(1000 + i, "c") for i in range(500)])
    assert await a.fetchval(f"select count(*) from apg_{mode}") == 700
    for c in conns:
        await c.close()
    print(f"asyncpg {mode}: ok")


asyncio.run(main())
